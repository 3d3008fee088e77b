"""Command line: ``ppl-kbnn validate``, ``ppl-kbnn pendulum``, ``ppl-kbnn bench`` and ``ppl-kbnn --version``.

``ppl-kbnn validate [--quick] [--seed N] [--out DIR] [--sections NAME ...]`` runs the
validation sections of :data:`SECTIONS`, writes each section's files into ``DIR`` plus
``DIR/report.json`` and ``DIR/report.md``, and exits with 0 when every check passed, 1 otherwise.

``ppl-kbnn pendulum [--quick] [--seed N] [--out DIR]`` runs the pendulum study
(:func:`ppl_kbnn.pendulum.run_study`: ``results.json``, ``results.md``, PNGs);
``ppl-kbnn bench [--quick] [--out DIR]`` the benchmarks (:func:`ppl_kbnn.bench.run_bench`:
``bench.json``, ``bench.md``, PNGs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__

Section = Callable[..., dict[str, Any]]


def _softmax(**kwargs: Any) -> dict[str, Any]:
    from .validation.softmax import softmax_section

    return softmax_section(**kwargs)


def _ops(**kwargs: Any) -> dict[str, Any]:
    from .validation.ops import ops_section

    return ops_section(**kwargs)


def _linear_exact(**kwargs: Any) -> dict[str, Any]:
    from .validation.linear_exact import linear_exact_section

    return linear_exact_section(**kwargs)


def _network_moments(**kwargs: Any) -> dict[str, Any]:
    from .validation.network_section import network_section

    return network_section(**kwargs)


def _posterior(**kwargs: Any) -> dict[str, Any]:
    from .validation.posterior import posterior_section

    return posterior_section(**kwargs)


# name -> section(*, quick, seed, out_dir, progress, command) -> dict with a "checks" list (and
# optionally "findings": measured statements that are reported, not checked); each section writes
# <name>.json, <name>.md and its figures into out_dir.
SECTIONS: dict[str, Section] = {
    "softmax": _softmax,
    "ops": _ops,
    "linear_exact": _linear_exact,
    "network_moments": _network_moments,
    "posterior": _posterior,
}


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded in the report."""
    import numpy
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import pyro

        env["pyro"] = pyro.__version__
    except ImportError:  # pragma: no cover - pyro is a dependency, but the report should not need it
        env["pyro"] = None
    env.update(
        {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "dtype": "float64",
        }
    )
    return env


def _report_md(report: dict[str, Any], command: str, out_dir: Path) -> str:
    env = report["environment"]
    status = "all checks passed" if report["passed"] else "SOME CHECKS FAILED"
    lines = [
        f"# ppl-kbnn validation report ({status})",
        "",
        f"Command: `{command}`",
        "",
        f"ppl-kbnn {report['version']}, seed {report['seed']}, {'quick' if report['quick'] else 'full'} run, "
        f"{report['elapsed_s']:.1f} s.",
        "",
        "Environment:",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines.append("")
    for name in report["sections"]:
        lines.append((out_dir / f"{name}.md").read_text().rstrip("\n"))
        lines.append("")
    return "\n".join(lines)


def validate(
    *,
    out_dir: Path,
    quick: bool,
    seed: int,
    sections: Sequence[str] | None = None,
    progress: bool = True,
    command: str = "ppl-kbnn validate",
) -> dict[str, Any]:
    """Run the validation sections; write ``report.json`` / ``report.md`` into ``out_dir``; return the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(SECTIONS) if sections is None else list(sections)
    t0 = time.perf_counter()
    results = {
        name: SECTIONS[name](quick=quick, seed=seed, out_dir=out_dir, progress=progress, command=command)
        for name in names
    }
    passed = all(bool(c["passed"]) for r in results.values() for c in r["checks"])
    report = {
        "version": __version__,
        "seed": seed,
        "quick": quick,
        "command": command,
        "sections": results,
        "environment": environment(),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "passed": passed,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(_report_md(report, command, out_dir))
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppl-kbnn", description="Kalman Bayesian Transformer: closed-form moments and their validation."
    )
    parser.add_argument("--version", action="version", version=f"ppl-kbnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    val = sub.add_parser("validate", help="check the closed forms against Monte Carlo and write a report")
    val.add_argument("--quick", action="store_true", help="fewer Monte-Carlo samples (a minute or less)")
    val.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    val.add_argument("--out", type=Path, default=Path("validation-out"), help="output folder (default validation-out)")
    val.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), default=None, metavar="NAME",
        help=f"sections to run (default all: {', '.join(SECTIONS)})",
    )  # fmt: skip
    val.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name, help_, out in (("pendulum", "the pendulum adaptation study (DESIGN §7)", "pendulum-out"),
                             ("bench", "update time and memory benchmarks", "bench-out")):  # fmt: skip
        p = sub.add_parser(name, help=help_)
        p.add_argument("--quick", action="store_true", help="a small version (minutes)")
        p.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
        p.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ppl-kbnn``; returns the exit code (0: all checks passed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --version, --help and usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "validate":
        command = shlex.join(["ppl-kbnn", *argv])
        report = validate(
            out_dir=args.out,
            quick=args.quick,
            seed=args.seed,
            sections=args.sections,
            progress=not args.no_progress,
            command=command,
        )
        failed = [(name, c) for name, r in report["sections"].items() for c in r["checks"] if not c["passed"]]
        for name, c in failed:
            print(f"FAILED {name}/{c['name']}: {c['detail']}", file=sys.stderr)
        n_checks = sum(len(r["checks"]) for r in report["sections"].values())
        verdict = "all passed" if not failed else f"{len(failed)} failed"
        print(f"{n_checks} checks, {verdict}; report: {args.out / 'report.md'}", file=sys.stderr)
        return 0 if not failed else 1
    if args.command in ("pendulum", "bench"):
        command = shlex.join(["ppl-kbnn", *argv])
        if args.command == "pendulum":
            from .pendulum import run_study as run
        else:
            from .bench import run_bench as run
        run(out_dir=args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress, command=command)
        print(f"results: {args.out}", file=sys.stderr)
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2  # pragma: no cover
