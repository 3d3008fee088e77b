"""``ppl-kbnn bench``: a tiny run has every section, the files and the keys docs/bench.md relies on.
No timing thresholds here (timings depend on the machine); the numbers are checked for sanity only."""

import json
import math

import pytest
import torch

from ppl_kbnn.bench import (
    FIGURES,
    MLP_TARGET_MS,
    TARGETS,
    BenchSettings,
    count_ops,
    fit_exponent,
    run_bench,
    time_interleaved,
)
from ppl_kbnn.cli import main


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the bench must not depend on the caller's default dtype
    try:
        report = run_bench(out_dir=out, settings=BenchSettings.tiny(), seed=1, progress=False, command="tiny bench")
    finally:
        torch.set_default_dtype(old)
    return out, report


def test_files_and_json_round_trip(tiny_report):
    out, report = tiny_report
    for name in ["bench.json", "bench.md", *FIGURES.values()]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["command"] == "tiny bench" and on_disk["seed"] == 1
    assert set(on_disk) >= {"version", "settings", "environment", "headline", "mlp", "breakdown", "retrain",
                            "svi_nuts", "scaling", "elapsed_s", "figures"}  # fmt: skip
    assert on_disk["environment"]["torch_threads"] == 1
    md = (out / "bench.md").read_text()
    assert "Command: `tiny bench`" in md
    for heading in ("AdamW", "Overhead: a 1-8-1 ReLU MLP", "ATen ops", "Where the update time goes", "retraining",
                    "SVI and NUTS", "Scaling", "exponents"):  # fmt: skip
        assert heading in md


def test_headline_has_both_kbt_kinds_against_adamw(tiny_report):
    _, report = tiny_report
    h = report["headline"]
    assert h["config"]["dtype"] == "float64" and h["config"]["n_params"] > 0
    methods = {(r["method"], r["hidden"]) for r in h["rows"]}
    assert ("adamw", None) in methods
    for cov in ("kbt-diag", "kbt-block"):
        for hidden in BenchSettings.tiny().hidden_modes:
            assert (cov, hidden) in methods
    for r in h["rows"]:
        assert r["n"] == BenchSettings.tiny().repeats
        assert 0 < r["min_ms"] <= r["median_ms"] and r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
        assert r["ratio"] > 0 and r["cpu_ratio"] > 0 and r["state_bytes"] > 0
    adamw = next(r for r in h["rows"] if r["method"] == "adamw")
    diag = next(r for r in h["rows"] if r["method"] == "kbt-diag" and r["hidden"] == "diag")
    block = next(r for r in h["rows"] if r["method"] == "kbt-block" and r["hidden"] == "diag")
    assert math.isclose(diag["ratio"], diag["median_ms"] / adamw["median_ms"])
    # a diagonal belief holds a mean and a variance per weight, as AdamW holds two moments per weight
    assert diag["state_bytes"] <= adamw["state_bytes"] < block["state_bytes"]
    assert set(h["targets"]) == set(TARGETS)
    for name, t in h["targets"].items():
        assert t["limit"] == TARGETS[name] and t["met"] == (t["ratio"] <= t["limit"])


def test_breakdown_retrain_svi_nuts(tiny_report):
    _, report = tiny_report
    b = report["breakdown"]
    assert set(b) == {"kbt-diag", "kbt-block", "profile"}
    assert set(b["kbt-diag"]) == {"forward (predict)", "forward + Jacobian (linearise)", "update"}
    assert b["profile"]["top"] and all(r["tottime_ms"] >= 0 for r in b["profile"]["top"])
    rows = report["retrain"]["rows"]
    assert [r["memory"] for r in rows] == sorted(r["memory"] for r in rows)
    assert any("kbt-diag" in r["reason"] for r in rows) and any("kbt-block" in r["reason"] for r in rows)
    for r in rows:
        assert r["median_ms"] > 0 and r["ratio_to_kbt_diag"] > 0 and r["state_bytes"] > 0
    assert [r["method"] for r in report["svi_nuts"]["rows"]] == ["svi-normal", "nuts"]
    for r in report["svi_nuts"]["rows"]:
        assert r["refit_s"] > 0 and math.isclose(r["per_sample_ms"], 1e3 * r["refit_s"] / r["n"])


def test_scaling_rows_and_exponents(tiny_report):
    _, report = tiny_report
    s = BenchSettings.tiny()
    sc = report["scaling"]
    rows = [r for r in sc["rows"] if "error" not in r]
    n_configs = len(s.scaling_d) + len(s.scaling_layers) + len(s.scaling_context) - 2 + len(s.scaling_extra)
    assert len(rows) == 3 * n_configs * len(s.scaling_dtypes)  # adamw, kbt-diag, kbt-block per configuration
    for d_model, n_layer in s.scaling_extra:  # the 2-layer rows outside the one-factor sweeps
        extra = [r for r in rows if r["d_model"] == d_model and r["n_layer"] == n_layer]
        assert {(r["dtype"], r["method"]) for r in extra} == {
            (dt, m) for dt in s.scaling_dtypes for m in ("adamw", "kbt-diag", "kbt-block")
        }
    assert {r["dtype"] for r in rows} == set(s.scaling_dtypes)
    f32 = next(r for r in rows if r["dtype"] == "float32" and r["method"] == "kbt-diag")
    same = ("method", "d_model", "n_layer", "context")
    f64 = next(r for r in rows if r["dtype"] == "float64" and all(r[k] == f32[k] for k in same))
    assert f64["state_bytes"] == 2 * f32["state_bytes"]
    exps = {(e["factor"], e["dtype"], e["method"]): e for e in sc["exponents"]}
    e = exps[("d_model", "float64", "kbt-block")]
    assert e["values"] == list(s.scaling_d) and e["time_exponent"] is not None
    assert 1.5 < e["memory_exponent"] < 3.5  # block belief: rows · (in + 1)² ~ d³ (minus lower-order terms)
    assert exps[("n_layer", "float64", "kbt-diag")]["memory_exponent"] < 1.2  # ~linear in layers
    # the d_model exponent at 2 layers: the layer sweep's default-width row and the scaling_extra rows
    e2 = exps[("d_model (2 layers)", "float64", "kbt-block")]
    assert e2["values"] == sorted({s.d_model} | {d for d, n in s.scaling_extra if n == 2})
    assert 1.5 < e2["memory_exponent"] < 3.5


def test_ops_per_update_in_headline(tiny_report):
    _, report = tiny_report
    rows = report["headline"]["rows"]
    for r in rows:
        assert r["ops"]["aten"] >= r["ops"]["top"] > 0
    ops = {(r["method"], r["hidden"]): r["ops"]["aten"] for r in rows}
    # a Kalman update runs the moment pass, its Jacobian and every row's update: more ops than one AdamW step
    assert ops[("kbt-diag", "diag")] > ops[("adamw", None)]


def test_mlp_overhead_section(tiny_report):
    _, report = tiny_report
    s = BenchSettings.tiny()
    m = report["mlp"]
    assert m["config"]["width"] == s.mlp_hidden and m["config"]["n_params"] == 3 * s.mlp_hidden + 1
    rows = {r["method"]: r for r in m["rows"]}
    assert set(rows) == {"kbnn-block", "kbnn-diag", "adamw"}
    for r in rows.values():
        assert r["n"] == s.mlp_repeats and 0 < r["min_ms"] <= r["median_ms"]
        assert math.isclose(r["ratio"], r["median_ms"] / rows["adamw"]["median_ms"])
        assert r["ops"]["aten"] >= r["ops"]["top"] > 0
    # block: a (p, p) covariance per row; diag: p variances; AdamW: two moments per weight and a step count
    assert rows["kbnn-diag"]["state_bytes"] <= rows["adamw"]["state_bytes"] < rows["kbnn-block"]["state_bytes"]
    t = m["target"]
    assert t["limit_ms"] == MLP_TARGET_MS and t["met"] == (rows["kbnn-block"]["median_ms"] <= MLP_TARGET_MS)


def test_count_ops():
    assert count_ops(lambda: None) == {"aten": 0, "top": 0}
    x = torch.ones(3)
    out = count_ops(lambda: (x + 1).sum())  # two calls from Python, whatever they run inside
    assert out["top"] == 2 and out["aten"] >= 2


def test_fit_exponent_and_interleaved_timer():
    assert fit_exponent([1, 2, 4, 8], [3 * x**2.5 for x in (1, 2, 4, 8)]) == pytest.approx(2.5)
    assert fit_exponent([2], [1.0]) is None and fit_exponent([2, 2], [1.0, 3.0]) is None
    calls = []
    out = time_interleaved({"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))}, 4, 1)
    assert calls[:2] == [("a", -1), ("b", -1)]  # warm-up
    assert calls[2:] == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert out["a"]["n"] == out["b"]["n"] == 4


def test_cli_dispatch(tmp_path, monkeypatch):
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr("ppl_kbnn.bench.run_bench", fake)
    assert main(["bench", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen["quick"] is True and seen["progress"] is False and seen["out_dir"] == tmp_path
    assert seen["command"].startswith("ppl-kbnn bench --quick")


def test_belief_family_section(tiny_report):
    """Every (covariance, update) pair of the belief section is timed against AdamW at each d_model (or says why
    not), with its bytes; the low-rank belief holds D (r + 2) numbers: mean, diagonal and the rank-r factor."""
    from ppl_kbnn.bench_beliefs import COMBOS, RANK

    _, report = tiny_report
    sec = report["beliefs"]
    for d in sec["d_models"]:
        rows = {r["method"]: r for r in sec["rows"] if r["d_model"] == d}
        assert set(rows) == {"adamw", *(f"{c}-{u}" for c, u in COMBOS)}
        assert rows["block-kbnn"]["ratio_to_kbt_block"] == 1.0
        for name, r in rows.items():
            if "skipped" in r or name == "adamw":
                continue
            assert r["median_ms"] > 0 and r["ratio_to_adamw"] > 0 and r["state_bytes"] > 0
        low = rows["lowrank-ekf"]
        assert low["state_bytes"] == low["n_params"] * (RANK + 2) * 8
        assert low["lowrank_numbers_ratio"] == pytest.approx((RANK + 2) / (RANK + 1))
    assert {e["method"] for e in sec["exponents"]} == {"adamw", *(f"{c}-{u}" for c, u in COMBOS)}
