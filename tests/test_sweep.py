"""Sweeps across seeds (:mod:`ppl_kbnn.sweep`, ``ppl-kbnn validate --seeds``): seed lists, executors, intervals,
and per-seed reports equal to single-seed runs, locally and on a local Ray of 2 CPUs.

The sweeps run only the cheapest section (``linear_exact``, a few seconds a seed). Their per-seed reports are
compared with single-seed runs of the same section made here: the session's ``quick_validate`` fixture would run
every section, NUTS included, whenever this file runs alone. Every run here (single-seed, local sweep, and the Ray
workers, which are fresh processes) has torch's default dtype float32, as a fresh ``ppl-kbnn`` process has: the
section builds its transformer in the default dtype before casting it to float64, so its round-off-sized errors
depend on it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from ppl_kbnn import cli, sweep
from ppl_kbnn.sweep import SweepError, interval, merge_details, parse_seeds, run_tasks

ROOT = Path(__file__).resolve().parents[1]
SECTION = "linear_exact"
SEEDS = (0, 1)
TIMING_KEYS = {"seconds", "elapsed_s", "wall_s", "chain_seconds"}


@contextlib.contextmanager
def _fresh_process_dtype():
    """torch's default dtype of a fresh process (float32) inside the block; conftest's float64 after it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _strip_times(obj):
    """A report (or section) without its wall times, the only entries that differ between runs."""
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


def _square(x: int, offset: int = 0) -> int:
    return x * x + offset


def _fail(x: int) -> int:
    raise ValueError(f"task {x} failed")


# --- seed lists ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seeds",
    [("0-9", list(range(10))), ("0,3,5", [0, 3, 5]), ("0-2,7", [0, 1, 2, 7]), ("4", [4]), (" 7 , 2-3 ", [7, 2, 3]),
     ("5-5", [5])],
)  # fmt: skip
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    "text, match",
    [("", "expected e.g."), ("  ", "expected e.g."), ("3-1", "ends below its start"), ("-1", "not a non-negative"),
     ("a", "not a non-negative"), ("1.5", "not a non-negative"), ("0,,2", "'' is not"), ("0-2,1", r"\[1\] listed"),
     ("0-", "not a non-negative")],
)  # fmt: skip
def test_parse_seeds_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_seeds(text)


# --- executors -----------------------------------------------------------------------------------------------


def test_run_tasks_local_in_order():
    seen = []
    out = run_tasks(_square, [{"x": 3}, {"x": 1, "offset": 10}, {"x": 2}], on_done=lambda i, r: seen.append((i, r)))
    assert out == [9, 11, 4]
    assert seen == [(0, 9), (1, 11), (2, 4)]
    assert run_tasks(_square, []) == []
    with pytest.raises(ValueError, match="task 1 failed"):
        run_tasks(_fail, [{"x": 1}])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"executor": "dask"}, "unknown executor 'dask'"), ({"address": "auto"}, "executor='ray' only"),
     ({"num_cpus": 2}, "executor='ray' only"), ({"executor": "ray", "address": "auto", "num_cpus": 2}, "local Ray"),
     ({"executor": "ray", "num_cpus": 0}, "integer >= 1")],
)  # fmt: skip
def test_run_tasks_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_tasks(_square, [{"x": 1}], **kwargs)


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SweepError, match=r'pip install "ppl-kbnn\[ray\]"'):
        run_tasks(_square, [{"x": 1}], executor="ray")


class _FakeRay:
    """Just enough of Ray's API for :func:`run_tasks`: tasks finish in reverse order of submission."""

    def __init__(self, initialized=False):
        self.initialized, self.calls = initialized, []

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        self.initialized = True

    def shutdown(self):
        self.calls.append(("shutdown",))
        self.initialized = False

    def remote(self, **resources):
        fake = self

        class Remote:
            def __init__(self, fn):
                self.fn = fn

            def options(self, **options):
                fake.calls.append(("options", resources, options))
                return self

            def remote(self, *args):
                return ("ref", len(fake.calls), self.fn(*args))

        fake.calls.append(("remote", resources))
        return Remote

    def wait(self, pending, num_returns):
        return [pending[-1]], pending[:-1]

    def get(self, ref):
        return ref[2]


def test_run_tasks_ray_protocol(monkeypatch):
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    seen = []
    out = run_tasks(_square, [{"x": 1}, {"x": 2}, {"x": 3}], executor="ray", num_cpus=3,
                    on_done=lambda i, r: seen.append(i))  # fmt: skip
    assert out == [1, 4, 9] and seen == [2, 1, 0]  # results in input order, whatever the completion order
    init = fake.calls[0][1]
    assert init["address"] == "local" and init["num_cpus"] == 3  # always a new local Ray
    assert fake.calls[1] == ("remote", {"num_cpus": 1})
    env = fake.calls[2][2]["runtime_env"]["env_vars"]
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert fake.calls[-1] == ("shutdown",) and not fake.initialized
    # an existing cluster: joined, and disconnected from afterwards (ray.shutdown)
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert run_tasks(_square, [{"x": 5}], executor="ray", address="auto") == [25]
    assert fake.calls[0] == ("init", {"logging_level": 40, "log_to_driver": False, "address": "auto"})
    assert "PYTHONPATH" not in fake.calls[2][2]["runtime_env"]["env_vars"]
    # a Ray this process initialised itself is used and left running
    fake = _FakeRay(initialized=True)
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert run_tasks(_square, [{"x": 2}], executor="ray") == [4]
    assert [c[0] for c in fake.calls] == ["remote", "options"] and fake.initialized


# --- across-seed statistics ----------------------------------------------------------------------------------


def test_interval_small_n_is_min_max():
    assert interval([2.0]) == {"mean": 2.0, "lo": 2.0, "hi": 2.0, "n": 1, "method": "minmax", "values": [2.0]}
    r = interval([3.0, 1.0])
    assert (r["mean"], r["lo"], r["hi"], r["method"]) == (2.0, 1.0, 3.0, "minmax")
    assert interval([1.0, float("nan")])["mean"] is None
    with pytest.raises(ValueError, match="no values"):
        interval([])


def test_interval_is_the_t_interval():
    r = interval([1.0, 2.0, 3.0])  # s = 1, t(0.975, 2) = 4.302653 (Student t table, 7 digits)
    assert r["method"] == "t95" and r["mean"] == 2.0
    assert math.isclose(r["hi"] - 2.0, 4.302653 / math.sqrt(3), rel_tol=1e-6)
    assert math.isclose(2.0 - r["lo"], r["hi"] - 2.0, rel_tol=1e-12)


def test_interval_covers_the_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, n = 4000, 4
    hits = 0
    for _ in range(trials):
        r = interval(rng.normal(1.5, 2.0, size=n).tolist())
        hits += r["lo"] <= 1.5 <= r["hi"]
    se = math.sqrt(0.95 * 0.05 / trials)  # binomial standard error of the coverage
    assert abs(hits / trials - 0.95) < 4 * se, hits / trials


def test_merge_details_same_wording():
    m = merge_details(["err over 2,000 updates in TF d8: 1e-12 (at step 5; need <= 1e-10)",
                       "err over 2,000 updates in TF d8: 3e-12 (at step 9; need <= 1e-10)"])  # fmt: skip
    assert m["complete"]
    # numbers inside words (d8) are words; "2,000" is one number; equal numbers are written as they are
    # whole numbers that differ are listed per seed
    assert m["detail"] == "err over 2,000 updates in TF d8: 2e-12 [1e-12, 3e-12] (at step {5, 9}; need <= 1e-10)"
    assert [v["values"] for v in m["values"]] == [[2000.0, 2000.0], [1e-12, 3e-12], [5.0, 9.0], [1e-10, 1e-10]]
    assert [v["same"] for v in m["values"]] == [True, False, False, True]


def test_merge_details_wording_differs():
    m = merge_details(["max error 0.5 (at relu, scale 0.1)", "max error 0.7 (at gelu, scale 1)",
                       "max error 0.3 (at relu, scale 0.1)"])  # fmt: skip
    assert not m["complete"]
    assert [v["values"] for v in m["values"]] == [[0.5, 0.7, 0.3]]  # the location is not merged
    r = stats.t.interval(0.95, 2, loc=0.5, scale=stats.sem([0.5, 0.7, 0.3]))
    assert m["detail"] == f"max error 0.5 [{r[0]:.3g}, {r[1]:.3g}] …"
    assert merge_details(["only words"])["detail"] == "only words"


# --- ppl-kbnn validate --seeds -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [(["--seed", "1", "--seeds", "0-1"], "not allowed with argument"), (["--seeds", "3-1"], "ends below its start"),
     (["--executor", "ray"], "--executor only with --seeds"), (["--address", "auto"], "--address only with --seeds"),
     (["--seeds", "0-1", "--address", "auto"], "only with --executor ray"),
     (["--seeds", "0-1", "--executor", "ray", "--address", "auto", "--num-cpus", "2"], "not with --address"),
     (["--seeds", "0-1", "--executor", "ray", "--num-cpus", "0"], "invalid CPU count '0'")],
)  # fmt: skip
def test_sweep_usage_errors(argv, match, tmp_path, capsys):
    assert cli.main(["validate", "--quick", "--no-progress", "--out", str(tmp_path / "v"), *argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "--help" in lines[0], err
    assert not (tmp_path / "v").exists()


def test_sweep_without_ray_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    argv = ["validate", "--quick", "--no-progress", "--sections", SECTION, "--seeds", "0-1", "--executor", "ray"]
    assert cli.main([*argv, "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "ppl-kbnn[ray]"' in err[0] and "--executor local" in err[0]
    assert not (tmp_path / "v").exists()  # nothing written


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """``ppl-kbnn validate --quick --sections linear_exact --seed s`` for each seed: {seed: (out, report)}."""
    runs = {}
    for s in SEEDS:
        out = tmp_path_factory.mktemp(f"single-{s}")
        with _fresh_process_dtype():
            runs[s] = (out, cli.validate(out_dir=out, quick=True, seed=s, sections=[SECTION], progress=False))
    return runs


def _sweep(out, executor, *extra):
    argv = ["validate", "--quick", "--no-progress", "--sections", SECTION, "--seeds", "0-1", "--executor", executor,
            *extra, "--out", str(out)]  # fmt: skip
    with _fresh_process_dtype():
        return cli.main(argv)


def _check_sweep(out, single_runs, executor):
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == list(SEEDS) and report["executor"]["name"] == executor and report["passed"]
    assert report["interval"] == sweep.MIN_MAX  # two seeds
    for s in SEEDS:
        single_out, single = single_runs[s]
        seed_dir = out / f"seed_{s}"
        mine = json.loads((seed_dir / "report.json").read_text())
        # the per-seed report is the single-seed run's, numbers and all (wall times and the command aside)
        assert _strip_times(mine["sections"]) == _strip_times(single["sections"])
        assert (mine["seed"], mine["quick"], mine["passed"]) == (s, True, True)
        assert mine["command"] == f"ppl-kbnn validate --quick --seed {s} --out {seed_dir} --sections {SECTION}"
        assert sorted(p.name for p in seed_dir.iterdir()) == sorted(p.name for p in single_out.iterdir())
        assert (seed_dir / f"{SECTION}.png").read_bytes() == (single_out / f"{SECTION}.png").read_bytes()
        assert report["per_seed"][str(s)]["report"] == f"seed_{s}/report.json"
    # merged: pass counts, and every number of a check's detail with its across-seed min/max
    merged = report["sections"][SECTION]
    details = {s: {c["name"]: c["detail"] for c in single_runs[s][1]["sections"][SECTION]["checks"]} for s in SEEDS}
    for c in merged["checks"]:
        assert (c["n_passed"], c["n"]) == (2, 2)
        assert {int(s): r["detail"] for s, r in c["per_seed"].items()} == {s: details[s][c["name"]] for s in SEEDS}
        assert c["detail_complete"] and c["values"]
        for v in c["values"]:
            assert (v["lo"], v["hi"]) == (min(v["values"]), max(v["values"]))
    err = {s: single_runs[s][1]["sections"][SECTION]["rows"][0]["max_err"] for s in SEEDS}
    v = merged["values"]["rows[0].max_err"]
    assert v["values"] == [err[0], err[1]] and v["mean"] == pytest.approx((err[0] + err[1]) / 2, rel=1e-15)
    md = (out / "report.md").read_text()
    assert cli.SMOKE_TEST in md and "[seed_1/report.md](seed_1/report.md)" in md and "| `conjugate_blr` | 2/2 |" in md


def test_local_sweep_equals_single_seed_runs(tmp_path, single_runs, capsys):
    assert _sweep(tmp_path, "local") == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines()[-1].startswith("4 checks over 2 seeds, all passed; report: ")
    _check_sweep(tmp_path, single_runs, "local")


def test_ray_sweep_equals_single_seed_runs(tmp_path, single_runs, capsys):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ppl-kbnn[ray]')")
    assert _sweep(tmp_path, "ray", "--num-cpus", "2") == 0
    assert not ray.is_initialized()  # the sweep shut down the Ray it started
    _check_sweep(tmp_path, single_runs, "ray")
    env = json.loads((tmp_path / "seed_0" / "report.json").read_text())["environment"]
    assert env["torch_threads"] == 1  # one thread inside a task
