"""The ``ops`` validation section: every moment op against Monte Carlo (quick, few samples)."""

from __future__ import annotations

import json
import math
from numbers import Number
from typing import Any

import pytest

from ppl_kbnn.cli import SECTIONS
from ppl_kbnn.validation.ops import LN_METHODS, SCALES, SERIES_ACTS, SERIES_ORDERS, Z_MAX, ops_section

SAMPLES = 50_000
CHECKS = (
    "exact_ops_max_z",
    "sigmoid_mean_err",
    "tanh_mean_err",
    "probit_var_ratio",
    "layernorm_order2_envelope",
    "series_order10_offdiag",
)


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    out = tmp_path_factory.mktemp("ops")
    return out, ops_section(quick=True, seed=0, out_dir=out, progress=False, samples=SAMPLES, command="pytest")


def _numbers(row: dict[str, Any]) -> list[float]:
    """Every numeric value of a table row (nested metric lists included)."""
    vals: list[float] = []
    for key, val in row.items():
        if isinstance(val, bool) or key == "passed":
            continue
        if isinstance(val, Number):
            vals.append(float(val))
        elif isinstance(val, list):
            for item in val:
                vals.extend(_numbers(item))
    return vals


def test_exact_table_complete_and_finite(section):
    _, result = section
    exact = result["exact"]
    assert exact["threshold"] == Z_MAX == 4.5
    rows = exact["rows"]
    ops = {(r["op"], r["kind"]) for r in rows}
    for kind in ("diag", "token", "joint"):
        for op in ("linear", "attention × values", "residual"):
            assert (op, kind) in ops
    assert ("scores", "joint") in ops and ("relu", "marginal") in ops and ("gelu", "token") in ops
    assert sum(r["op"] == "linear" for r in rows) == 6 and sum(r["op"] == "scores" for r in rows) == 3
    for r in rows:
        names = [m["name"] for m in r["metrics"]]
        assert names[0] == "mean" and len(names) >= 3 and any(n.startswith("Cov(") for n in names), r
        for m in r["metrics"]:
            assert math.isfinite(m["max_z"]) and m["max_z"] >= 0 and m["n"] > 0, (r["op"], m)
        assert r["max_z"] == max(m["max_z"] for m in r["metrics"])
        assert r["passed"] == (r["max_z"] < Z_MAX)


def test_approximate_tables_complete_and_finite(section):
    _, result = section
    assert len(result["probit"]) == 2 * len(SCALES)
    assert len(result["series"]) == len(SERIES_ACTS) * len(SCALES) * len(SERIES_ORDERS)
    assert len(result["layernorm"]) == len(LN_METHODS) * len(SCALES)
    assert len(result["softmax_cross"]) == len(result["scores_softmax"]) == len(SCALES)
    for table in ("probit", "series", "layernorm", "softmax_cross", "scores_softmax"):
        for r in result[table]:
            vals = _numbers(r)
            assert vals and all(math.isfinite(v) for v in vals), (table, r)
    for r in result["probit"]:
        assert ("kbnn_var_ratio_min" in r) == (r["activation"] == "sigmoid")
    # the series converges: order 10 is never worse than order 1 beyond the MC noise
    for act in SERIES_ACTS:
        for s in SCALES:
            by_k = {r["order"]: r for r in result["series"] if r["activation"] == act and r["scale"] == s}
            assert by_k[10]["offdiag_max_rel_err"] <= by_k[1]["offdiag_max_rel_err"] + 4 * by_k[1]["mc_rel_stderr"]
    assert result["config"]["samples"] == SAMPLES and result["config"]["dtype"] == "float64"


def test_files_written(section):
    out, result = section
    assert json.loads((out / "ops.json").read_text()) == result
    md = (out / "ops.md").read_text()
    assert "Command: `pytest`" in md
    assert "### (a) Exact ops" in md and "### (b) Approximate ops" in md
    assert md.count("\n| ") >= len(result["exact"]["rows"]) + len(result["series"]) + len(result["layernorm"])
    png = (out / "ops.png").read_bytes()
    assert len(png) > 10_000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["figure"] == "ops.png"


def test_registered_in_cli():
    assert list(SECTIONS)[:2] == ["softmax", "ops"]


@pytest.mark.parametrize("name", CHECKS)
def test_acceptance_check(section, name):
    _, result = section
    checks = {c["name"]: c for c in result["checks"]}
    assert set(checks) == set(CHECKS)
    c = checks[name]
    assert isinstance(c["detail"], str) and c["detail"]
    assert c["passed"], c["detail"]
