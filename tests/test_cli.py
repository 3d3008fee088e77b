"""The command line: user errors, stdout/stderr, progress, smoke-test labels, atomic and clean outputs.

Runs only the cheapest validation section (``linear_exact``, a few seconds) and a tiny pendulum study through
:func:`run_study`'s settings; nothing here runs NUTS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppl_kbnn import _io, cli
from ppl_kbnn._io import OutputDirError, prepare_out_dir, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def _python_m(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ppl_kbnn", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, **kwargs)  # fmt: skip


# --- user errors: one line on stderr, exit 2, no traceback -------------------------------------------------


def test_out_at_an_existing_file_exits_2_without_traceback(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    proc = _python_m("pendulum", "--no-progress", "--out", str(f))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "exists and is not a folder" in lines[0] and str(f) in lines[0], proc.stderr
    assert f.read_text() == "x"


@pytest.mark.parametrize("command", ["validate", "pendulum", "bench"])
def test_out_at_an_existing_file(tmp_path, command, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert cli.main([command, "--quick", "--no-progress", "--out", str(f)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"ppl-kbnn {command}: error: --out {f}: exists and is not a folder"
    assert f.read_text() == "x"


def test_out_at_an_unwritable_path(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    # below a file: cannot be created, whoever runs the test (root included)
    assert cli.main(["pendulum", "--quick", "--no-progress", "--out", str(f / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create the folder" in err[0]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write into a read-only folder")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(["bench", "--quick", "--no-progress", "--out", str(ro)]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["pendulum", "--seed", "-1"], "invalid seed -1"),
        (["pendulum", "--seed", "x"], "invalid seed 'x'"),
        (["validate", "--sections", "nope"], "invalid choice: 'nope'"),
        (["nope"], "invalid choice: 'nope'"),
        (["bench", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_one_line(argv, match, capsys):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "--help" in lines[0], err


def test_help_describes_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("validate", "pendulum", "bench"):
        assert name in out
    assert "distribution shift" in out and "Monte Carlo" in out
    for name in ("validate", "pendulum", "bench"):
        assert cli.main([name, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "smoke test" in text and "are removed" in text and "stdout" in text
        assert all(f in text for f in cli.OUTPUTS[name][:2])


# --- validate: results on stdout, progress on stderr ---------------------------------------------------------


def test_validate_results_on_stdout_progress_on_stderr(tmp_path):
    out = tmp_path / "v"
    proc = _python_m("validate", "--quick", "--sections", "linear_exact", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(cli.SMOKE_TEST)
    assert "checks, all passed; report: " in proc.stdout
    # stderr is a pipe here: one line per stage and no bars (tqdm would redraw with carriage returns)
    assert "\r" not in proc.stderr
    assert "[ppl-kbnn] validate: section linear_exact ..." in proc.stderr
    assert "section linear_exact done in" in proc.stderr
    assert len(proc.stderr.splitlines()) == 2, proc.stderr
    md = (out / "report.md").read_text()
    assert cli.SMOKE_TEST in md and "quick (smoke test) run" in md


def test_no_progress_keeps_the_results(tmp_path, capsys):
    assert cli.main(["validate", "--quick", "--sections", "linear_exact", "--no-progress", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "checks, all passed" in out and cli.SMOKE_TEST in out


def test_rerun_removes_the_earlier_outputs_only(tmp_path, capsys):
    for name in ("report.json", "report.md", "posterior.json", "posterior.md", "posterior_mlp.png", "ops.png"):
        (tmp_path / name).write_text("from an earlier run")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "posterior").mkdir()  # a folder is never removed, even if its name matches
    assert cli.main(["validate", "--quick", "--sections", "linear_exact", "--no-progress", "--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"report.json", "report.md", "linear_exact.json", "linear_exact.md", "linear_exact.png",
                     "notes.txt", "posterior"}  # fmt: skip
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "report.json").read_text())["sections"].keys() == {"linear_exact"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_interrupted_rerun_leaves_no_earlier_results(tmp_path, monkeypatch, capsys):
    import ppl_kbnn.pendulum as pendulum

    for name in ("results.json", "results.md", "pretrained.pt", "uncertainty.png"):
        (tmp_path / name).write_text("complete earlier run")
    (tmp_path / "keep.csv").write_text("mine")

    def interrupted(**kwargs):
        (Path(kwargs["out_dir"]) / "pretrained.pt").write_text("new, partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(pendulum, "run_onpolicy_study", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["pendulum", "--no-progress", "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {"pretrained.pt", "keep.csv"}


def test_pendulum_resume_keeps_the_pretrained_networks(tmp_path, monkeypatch):
    """A rerun removes the earlier networks; ``--resume`` keeps them (its cached units were run on them) and still
    removes the earlier summary files."""
    import ppl_kbnn.pendulum as pendulum

    seen = []

    def study(**kw):
        seen.append(sorted(p.name for p in Path(kw["out_dir"]).iterdir()))
        return {}

    monkeypatch.setattr(pendulum, "run_onpolicy_study", study)
    for resume, left in ((["--resume"], ["pretrained_seed0.pt", "pretrained_seed1.pt"]), ([], [])):
        for name in ("results.json", "results.md", "pretrained_seed0.pt", "pretrained_seed1.pt"):
            (tmp_path / name).write_text("earlier run")
        assert cli.main(["pendulum", *resume, "--no-progress", "--out", str(tmp_path)]) == 0
        assert seen[-1] == left


def test_pendulum_result_lines_on_stdout(tmp_path, monkeypatch, capsys):
    import ppl_kbnn.pendulum as pendulum

    fake = {"stopped": None, "stream": {"task": "sensor_bias_0.1"},
            "methods": {"kbt_block": {"checkpoints": [{"n_samples": 0, "successes": 0, "n": 5},
                                                      {"n_samples": 25, "successes": 3, "n": 5}]}}}  # fmt: skip
    monkeypatch.setattr(pendulum, "run_study", lambda **kwargs: fake)
    assert cli.main(["pendulum", "--first-design", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith(cli.SMOKE_TEST)
    assert "shift: sensor_bias_0.1" in out and "KBT block: n=0 0/5, n=25 3/5" in out
    assert lines[-1] == f"results: {tmp_path / 'results.md'}"
    # the default (on-policy) study prints its conclusion lines; --seeds and --workers reach it
    seen = {}

    def onpolicy(**kwargs):
        seen.update(kwargs)
        return {"conclusion": ["sensor_bias_0.1: a line"]}

    monkeypatch.setattr(pendulum, "run_onpolicy_study", onpolicy)
    assert cli.main(["pendulum", "--seeds", "0-2", "--workers", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["sensor_bias_0.1: a line", f"results: {tmp_path / 'results.md'}"]
    assert seen["networks"] == [0, 1, 2] and seen["workers"] == 2 and seen["preset"] == "default"


# --- the pendulum report of a quick run says it is a smoke test ----------------------------------------------


def test_quick_pendulum_report_is_labelled_a_smoke_test(tmp_path):
    import torch

    from ppl_kbnn.pendulum import run_study
    from ppl_kbnn.pendulum.report import SMOKE_TEST

    assert SMOKE_TEST == cli.SMOKE_TEST
    tiny = {"n_nominal_episodes": 1, "episode_steps": 1, "pretrain_steps": 5, "candidates": ("sensor_bias_0.1",),
            "n_eval": 2}  # fmt: skip
    torch.set_num_threads(1)
    run_study(out_dir=tmp_path, quick=True, seed=0, progress=False, settings=tiny)
    md = (tmp_path / "results.md").read_text()
    assert md.splitlines()[0].startswith("# Pendulum study (SMOKE TEST, --quick run")
    assert f"**{SMOKE_TEST}.**" in md
    run_study(out_dir=tmp_path / "full", quick=False, seed=0, progress=False, settings=tiny)
    assert SMOKE_TEST not in (tmp_path / "full" / "results.md").read_text()


# --- atomic writes and the output folder ---------------------------------------------------------------------


def test_write_text_atomic_replaces_or_keeps(tmp_path, monkeypatch):
    p = tmp_path / "results.json"
    write_text_atomic(p, "one")
    write_text_atomic(p, "two")
    assert p.read_text() == "two"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(_io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(p, "three")
    assert p.read_text() == "two"
    assert [q.name for q in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_prepare_out_dir(tmp_path):
    d = tmp_path / "a" / "b"
    assert prepare_out_dir(d, ["x.json"]) == []
    assert d.is_dir()
    (d / "x.json").write_text("{}")
    (d / "y.png").write_text("")
    (d / "z.txt").write_text("")
    assert prepare_out_dir(d, ["x.json", "*.png"]) == ["x.json", "y.png"]
    assert [p.name for p in d.iterdir()] == ["z.txt"]
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        prepare_out_dir(d / "z.txt")
    assert issubclass(OutputDirError, ValueError)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--executor", "ray", "--workers", "2"], "--workers is the local process pool"),
        (["--first-design", "--executor", "ray"], "only with the on-policy design"),
        (["--address", "auto"], "only with --executor ray"),
        (["--executor", "ray", "--address", "auto", "--num-cpus", "2"], "local Ray only"),
    ],
)
def test_pendulum_executor_misuse_exits_2_before_running(tmp_path, capsys, args, message):
    """The executor options of ``pendulum`` are checked before anything runs (nothing is written to --out)."""
    assert cli.main(["pendulum", *args, "--no-progress", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "ppl-kbnn pendulum: error:" in err
    assert not (tmp_path / "out").exists()


def test_onpolicy_study_rejects_an_unknown_executor(tmp_path):
    """``run_onpolicy_study`` names a bad ``executor`` and the workers/Ray conflict."""
    from ppl_kbnn.pendulum import run_onpolicy_study

    with pytest.raises(ValueError, match="executor must be"):
        run_onpolicy_study(out_dir=tmp_path, executor="dask", progress=False)
    with pytest.raises(ValueError, match="workers > 1"):
        run_onpolicy_study(out_dir=tmp_path, executor="ray", workers=2, progress=False)
