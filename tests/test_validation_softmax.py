"""The ``softmax`` validation section and ``ppl-kbnn validate`` (quick, few samples)."""

from __future__ import annotations

import json
import math

import pytest

from ppl_kbnn import __version__
from ppl_kbnn.cli import main
from ppl_kbnn.validation import softmax_section
from ppl_kbnn.validation.softmax import NS, ORDERS, SCALES

ROW_KEYS = ("mean_max_abs_err", "mean_mc_stderr", "cov_rel_fro_err", "row_sum_err")


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    out = tmp_path_factory.mktemp("softmax")
    return out, softmax_section(quick=True, seed=0, out_dir=out, progress=False, samples=100_000)


def test_grid_complete_and_finite(section):
    _, result = section
    grid = result["grid"]
    assert len(grid) == len(NS) * len(SCALES) * len(ORDERS) == 30
    assert {(r["n"], r["scale"], r["order"]) for r in grid} == {(n, s, o) for n in NS for s in SCALES for o in ORDERS}
    for r in grid:
        for key in ROW_KEYS:
            assert math.isfinite(r[key]) and r[key] >= 0, (r, key)
        if r["order"] == 2:
            assert math.isfinite(r["order2_gain"]) and r["order2_gain"] > 0
        else:
            assert "order2_gain" not in r
    assert result["config"]["samples"] == 100_000
    assert result["config"]["dtype"] == "float64"


def test_files_written(section):
    out, result = section
    assert json.loads((out / "softmax.json").read_text()) == result
    md = (out / "softmax.md").read_text()
    assert "Command:" in md
    assert md.count("\n| ") >= 31  # header + 30 rows
    png = (out / "softmax.png").read_bytes()
    assert len(png) > 10_000 and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_acceptance_checks_pass(section):
    _, result = section
    checks = {c["name"]: c for c in result["checks"]}
    assert set(checks) == {"order2_mean_gain_small_scale", "cov_rel_fro_err_small_scale", "row_sums_to_one"}
    for c in checks.values():
        assert c["passed"], c
        assert isinstance(c["detail"], str) and c["detail"]


def test_order_one_bias_resolved_by_mc(section):
    """The order-1 bias is many MC standard errors at every scale (the comparison has power)."""
    _, result = section
    for r in result["grid"]:
        if r["order"] == 1:
            assert r["mean_max_abs_err"] > 10 * r["mean_mc_stderr"], r


def test_cli_validate_quick(quick_validate):
    """The session's ``ppl-kbnn validate --quick`` run (tests/conftest.py)."""
    tmp_path, report = quick_validate["out"], quick_validate["report"]
    assert quick_validate["code"] == 0
    assert report["passed"] is True
    assert report["version"] == __version__
    assert report["seed"] == 0 and report["quick"] is True
    assert report["environment"]["dtype"] == "float64"
    for key in ("python", "torch", "numpy", "platform", "cpu_count"):
        assert key in report["environment"]
    softmax = report["sections"]["softmax"]
    assert len(softmax["grid"]) == 30
    assert all(c["passed"] for c in softmax["checks"])
    for name in ("report.md", "softmax.md", "softmax.json", "softmax.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "## Softmax" in (tmp_path / "report.md").read_text()
    assert "all passed" in quick_validate["stdout"]


def test_cli_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
