"""The validation sections ``linear_exact``, ``network_moments`` and ``posterior`` in their ``--quick`` versions,
checked on the session's one ``ppl-kbnn validate --quick`` run (tests/conftest.py): structure of the JSON,
thresholds of the checks, the files, and the failure path (a non-converged NUTS reference fails the run with the
reason on stderr)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppl_kbnn.cli import SECTIONS, main
from ppl_kbnn.propagate import MODES
from ppl_kbnn.validation import linear_exact, network_section, posterior, to_docs

torch.set_num_threads(1)

NEW = ("linear_exact", "network_moments", "posterior")
METRICS = ("mean_err_max", "mean_err_mean", "std_ratio_min", "std_ratio_max", "log_std_ratio_max", "nll", "coverage90",
           "wall_s")  # fmt: skip


@pytest.fixture(scope="module")
def run(quick_validate):
    """The session's ``ppl-kbnn validate --quick`` run (tests/conftest.py): its directory and report."""
    return quick_validate["out"], quick_validate["report"]


def test_sections_registered_in_order():
    assert list(SECTIONS)[-3:] == list(NEW)


def test_report_passes_and_records_environment(run):
    out, report = run
    failed = [(n, c) for n, s in report["sections"].items() for c in s["checks"] if not c["passed"]]
    assert report["passed"] is True, failed
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report["sections"]) >= set(NEW)
    env = report["environment"]
    for key in ("python", "torch", "numpy", "pyro", "platform", "cpu_count", "torch_threads", "dtype"):
        assert key in env
    assert env["dtype"] == "float64" and report["seed"] == 0 and report["quick"] is True
    md = (out / "report.md").read_text()
    for title in ("## Linear-exact", "## Network moments", "## Posterior", "Findings"):
        assert title in md
    for name in NEW:
        section = report["sections"][name]
        assert json.loads((out / f"{name}.json").read_text()) == section
        assert (out / f"{name}.md").read_text().startswith("## ")
        png = (out / section["figure"]).read_bytes()
        assert len(png) > 10_000 and png[:8] == b"\x89PNG\r\n\x1a\n"
        assert section["config"]["seed"] == 0 and section["config"]["elapsed_s"] > 0
        for c in section["checks"]:
            assert set(c) >= {"name", "passed", "detail"} and c["detail"]


def test_linear_exact_matches_to_1e10(run):
    sec = run[1]["sections"]["linear_exact"]
    rows = sec["rows"]
    assert len(rows) == len(linear_exact.PROBLEMS)
    assert {r["reference"] for r in rows} == {"conjugate BLR", "Kalman filter"}
    assert {r["net"] for r in rows} == {"linear", "transformer head"}
    for r in rows:
        assert r["n_updates"] == 100 and len(r["trace"]["mean_err"]) == len(r["trace"]["cov_err"]) == 100
        assert 0 <= r["max_err"] <= 1e-10, r["label"]
        assert r["max_err"] == max(r["mean_err"], r["cov_err"])
        assert r["final_cov_shrink"] > 0  # the reference moved: not a vacuous comparison
    assert {c["name"] for c in sec["checks"]} == {"conjugate_blr", "kalman_filter"}


def test_network_moments_rows_and_joint_thresholds(run):
    sec = run[1]["sections"]["network_moments"]
    cfg = network_section.QUICK
    n = len(cfg["cases"]) * len(cfg["scales"]) * len(cfg["n_updates"]) * len(cfg["w_kinds"]) * len(MODES)
    assert len(sec["rows"]) == n
    assert len(sec["summary"]) == n // len(cfg["cases"])
    assert {r["mode"] for r in sec["rows"]} == set(MODES)
    assert {r["prior_scale"] for r in sec["rows"]} == {0.01, 0.05, 0.1}
    assert {r["updates"] for r in sec["rows"]} == {0, 50}
    for r in sec["rows"]:
        assert math.isfinite(r["mean_err"]) and 0 < r["std_ratio_min"] <= r["std_ratio_max"]
        if r["mode"] == "joint" and r["prior_scale"] <= 0.05:
            assert r["mean_err"] <= 0.2 and 0.8 <= r["std_ratio_min"] and r["std_ratio_max"] <= 1.25, r
    assert {c["name"] for c in sec["checks"]} == {"joint_mean_err", "joint_std_ratio", "float32_vs_mc",
                                                  "float32_vs_float64"}  # fmt: skip
    f32 = sec["float32"]["rows"]  # float32 beside float64: same case, scale, updates, the joint mode
    assert len(f32) == len(cfg["float32_cases"]) * len(cfg["float32_scales"]) * len(cfg["n_updates"])
    for r in f32:
        assert r["dtype"] == "float32" and r["mode"] == "joint" and math.isfinite(r["mean_err_float64"])
        assert max(r["rel_mean_diff"], r["rel_std_diff"]) <= network_section.FLOAT32_TOL, r


def test_posterior_methods_metrics_and_nuts_convergence(run):
    sec = run[1]["sections"]["posterior"]
    assert [p["problem"] for p in sec["problems"]] == ["mlp-head"]  # --quick: the head-only MLP
    p = sec["problems"][0]
    assert p["n_params"] == 17 and p["n_train"] == 50
    nuts = p["nuts"]
    assert nuts["max_rhat"] <= 1.01 and nuts["min_ess_bulk"] >= 100
    assert nuts["num_chains"] == 2 and len(nuts["chain_seconds"]) == 2
    by = {m["method"]: m for m in p["methods"]}
    assert tuple(by) == tuple(m for m in posterior.METHODS if not m.startswith("laplace") or m in by)
    for m in by.values():
        for key in METRICS:
            assert math.isfinite(m[key]), (m["method"], key)
        assert 0 <= m["coverage90"] <= 1 and m["std_ratio_min"] > 0 and m["memory_bytes"] > 0
        assert len(m["per_input"]["mean_err"]) == p["n_test"]
    assert by["nuts"]["mean_err_max"] == 0 and by["nuts"]["std_ratio_min"] == by["nuts"]["std_ratio_max"] == 1
    assert p["speedup_kbt_block"] == pytest.approx(nuts["wall_s"] / by["kbt-block"]["wall_s"])
    assert 0 < nuts["nuts_mean_mcse_max"] < 0.5
    # the findings are stated with their numbers, whichever way they come out
    findings = {f["name"]: f for f in sec["findings"]}
    assert {"kbt_block_vs_svi_normal_mlp-head", "kbt_block_100x_faster_mlp-head", "not_run"} <= set(findings)
    vs_svi = findings["kbt_block_vs_svi_normal_mlp-head"]
    assert isinstance(vs_svi["holds"], bool) and f"{by['kbt-block']['mean_err_max']:.3f}" in vs_svi["detail"]
    # KBT-block is exact on this problem (linear in the Bayesian weights): it matches NUTS within NUTS's own
    # Monte-Carlo error
    assert by["kbt-block"]["mean_err_max"] <= 5 * nuts["nuts_mean_mcse_max"]
    assert by["kbt-block"]["log_std_ratio_max"] <= 0.1
    assert (run[0] / sec["figure_mlp"]).stat().st_size > 10_000
    # trace / rank plots of the NUTS reference's least-mixed weights, linked from posterior.md with their R-hat / ESS
    shown = nuts["trace_weights"]
    assert len(shown) == posterior.TRACE_WEIGHTS and shown[0]["why"] == "max R-hat"
    assert shown[0]["r_hat"] == pytest.approx(nuts["max_rhat"], rel=1e-9)
    assert min(w["ess_bulk"] for w in shown) == pytest.approx(nuts["min_ess_bulk"], rel=1e-9)
    assert min(w["ess_tail"] for w in shown) == pytest.approx(nuts["min_ess_tail"], rel=1e-9)
    assert p["nuts_trace_figure"] == "posterior_nuts_trace_mlp-head.png"
    assert (run[0] / p["nuts_trace_figure"]).stat().st_size > 10_000
    md = (run[0] / "posterior.md").read_text()
    assert f"]({p['nuts_trace_figure']})" in md and f"`{shown[0]['weight']}`" in md


def test_unconverged_nuts_fails_the_run_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(posterior.QUICK, "nuts", {"mlp-head": {"warmup": 10, "draws": 10}})
    monkeypatch.setitem(posterior.QUICK, "svi_steps", {"mlp-head": 10})
    monkeypatch.setitem(posterior.QUICK, "n_test", 10)
    assert main(["validate", "--quick", "--sections", "posterior", "--no-progress", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().out  # results (the FAILED lines) go to stdout
    assert "FAILED posterior/nuts_converged_mlp-head" in err and "R-hat" in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False
    assert "not converged" in (tmp_path / "report.md").read_text()


def test_progress_is_shown(tmp_path, capsys):
    linear_exact.linear_exact_section(quick=True, seed=0, out_dir=tmp_path, progress=True, command="test")
    assert "linear exact" in capsys.readouterr().err


def test_report_publishes_into_the_docs(run, tmp_path):
    out, report = run
    page = to_docs.publish(out, tmp_path)
    text = page.read_text()
    assert text.startswith("# Latest quick validation report (seed 0, all checks passed)")
    assert "\n### Posterior: KBT vs NUTS vs SVI" in text and "\n#### mlp-head" in text  # one level down
    figures = [s["figure"] for s in report["sections"].values() if "figure" in s]  # long_stream has none
    assert len(figures) >= len(NEW)
    for figure in figures:
        assert (tmp_path / "validation" / figure).read_bytes() == (out / figure).read_bytes()
    posterior_md = (out / "posterior.md").read_text()
    table_row = next(line for line in posterior_md.splitlines() if line.startswith("| kbt-block |"))
    assert table_row in text  # the run's numbers, verbatim
