"""Command line: ``ppl-kbnn validate``, ``ppl-kbnn pendulum``, ``ppl-kbnn bench`` and ``ppl-kbnn --version``.

``ppl-kbnn validate [--quick] [--seed N] [--out DIR] [--sections NAME ...]`` runs the
validation sections of :data:`SECTIONS`, writes each section's files into ``DIR`` plus
``DIR/report.json`` and ``DIR/report.md``, and exits with 0 when every check passed, 1 otherwise.
``ppl-kbnn validate --seeds 0-9 [--executor local|ray] [--address ADDR] [--num-cpus N]`` runs the
sections at every seed (:func:`ppl_kbnn.sweep.validate_sweep`): ``DIR/seed_<s>/`` gets what
``--seed s`` writes, ``DIR/report.json`` / ``report.md`` merge the seeds.

``ppl-kbnn pendulum [--quick] [--seed N] [--out DIR]`` runs the pendulum study
(:func:`ppl_kbnn.pendulum.run_study`: ``results.json``, ``results.md``, PNGs);
``ppl-kbnn bench [--quick] [--device cpu|cuda] [--out DIR]`` the benchmarks (:func:`ppl_kbnn.bench.run_bench`:
``bench.json``, ``bench.md``, PNGs).

Conventions of every command: results (the summary lines, the paths of the reports) go to stdout,
progress to stderr; progress bars are drawn only when stderr is a terminal (otherwise one line per
stage), ``--no-progress`` hides the progress and nothing else. A ``--quick`` run is a smoke test and
says so on stdout, in its markdown report and in its figures. Before a run, the earlier outputs of the
same command in ``--out`` (the files listed by :data:`OUTPUTS`, nothing else; ``pendulum --resume`` keeps
its pre-trained networks) are removed, so an
interrupted run never leaves a complete-looking earlier report beside its own partial outputs; the
reports are written atomically (temporary file, then rename). A user error (bad option, unusable
``--out``, bad setting) prints one line on stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from ._io import OutputDirError, prepare_out_dir, write_text_atomic

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


def _long_stream(**kwargs: Any) -> dict[str, Any]:
    from .validation.long_stream import long_stream_section

    return long_stream_section(**kwargs)


def _hyper(**kwargs: Any) -> dict[str, Any]:
    from .validation.hyper import hyper_section

    return hyper_section(**kwargs)


def _posterior(**kwargs: Any) -> dict[str, Any]:
    from .validation.posterior import posterior_section

    return posterior_section(**kwargs)


# name -> section(*, quick, seed, out_dir, progress, command) -> dict with a "checks" list (and
# optionally "findings": measured statements that are reported, not checked); each section writes
# <name>.json, <name>.md and its figures into out_dir.
SECTIONS: dict[str, Section] = {
    "softmax": _softmax,
    "ops": _ops,
    "long_stream": _long_stream,
    "hyper": _hyper,
    "linear_exact": _linear_exact,
    "network_moments": _network_moments,
    "posterior": _posterior,
}


SMOKE_TEST = "SMOKE TEST (--quick): not a result"

# command -> the file names / glob patterns of its outputs in --out, summary files first (removed before a run)
OUTPUTS: dict[str, tuple[str, ...]] = {
    "validate": (
        "report.json",
        "report.md",
        *(f"{n}.json" for n in SECTIONS),
        *(f"{n}.md" for n in SECTIONS),
        *(f"{n}*.png" for n in SECTIONS),
    ),  # fmt: skip
    "pendulum": (
        "results.json",
        "results.md",
        "pretrained.pt",
        "pretrained_seed*.pt",
        "success_vs_bytes.png",
        "rmse_vs_samples.png",
        "offset_tolerance.png",
        "pretrained.json",
        "pretrain_loss.png",
        "success_vs_samples.png",
        "success_vs_memory.png",
        "time_per_sample.png",
        "uncertainty.png",
    ),  # fmt: skip
    "bench": ("bench.json", "bench.md", "bench_*.png"),
}


def outputs_to_remove(args: argparse.Namespace) -> tuple[str, ...]:
    """The earlier outputs removed from ``--out`` before a run: :data:`OUTPUTS` of the command, except that
    ``pendulum --resume`` keeps the pre-trained networks (``pretrained_seed*.pt``), which the finished units it
    reuses were run on (removing them would make the study pre-train every network again)."""
    outputs = OUTPUTS[args.command]
    if args.command == "pendulum" and getattr(args, "resume", False):
        outputs = tuple(o for o in outputs if o != "pretrained_seed*.pt")
    return outputs


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
    lines = [f"# ppl-kbnn validation report ({status})", ""]
    if report["quick"]:
        lines += [
            f"> **{SMOKE_TEST}.** A `--quick` run uses fewer Monte-Carlo draws and cases and skips the NUTS",
            "> references of the larger problems; it checks that the suite runs. Run without `--quick` for the",
            "> validation.",
            "",
        ]
    lines += [
        f"Command: `{command}`",
        "",
        f"ppl-kbnn {report['version']}, seed {report['seed']}, "
        f"{'quick (smoke test)' if report['quick'] else 'full'} run, {report['elapsed_s']:.1f} s.",
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


def _stage(enabled: bool, msg: str) -> None:
    """One progress line on stderr (``--no-progress`` hides it)."""
    if enabled:
        print(f"[ppl-kbnn] {msg}", file=sys.stderr, flush=True)


def validate(
    *,
    out_dir: Path,
    quick: bool,
    seed: int,
    sections: Sequence[str] | None = None,
    progress: bool = True,
    command: str = "ppl-kbnn validate",
) -> dict[str, Any]:
    """Run the validation sections; write ``report.json`` / ``report.md`` into ``out_dir``; return the report.

    Progress (when ``progress``) goes to stderr: one line per section, and the sections' bars only when
    stderr is a terminal. An earlier run's outputs in ``out_dir`` (:data:`OUTPUTS`) are removed first;
    the reports are written atomically.

    Raises:
        ValueError: an unknown section name, or an unusable ``out_dir``.
    """
    names = list(SECTIONS) if sections is None else list(sections)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, OUTPUTS["validate"])
    bars = progress and sys.stderr.isatty()
    t0 = time.perf_counter()
    results = {}
    for name in names:
        _stage(progress, f"validate: section {name} ...")
        ts = time.perf_counter()
        results[name] = SECTIONS[name](quick=quick, seed=seed, out_dir=out_dir, progress=bars, command=command)
        n_failed = sum(not c["passed"] for c in results[name]["checks"])
        _stage(progress, f"validate: section {name} done in {time.perf_counter() - ts:.1f} s "
                         f"({len(results[name]['checks'])} checks, {n_failed} failed)")  # fmt: skip
    return write_report(out_dir, seed=seed, quick=quick, command=command, results=results,
                        environment=environment(), elapsed_s=round(time.perf_counter() - t0, 3))  # fmt: skip


def write_report(
    out_dir: Path,
    *,
    seed: int,
    quick: bool,
    command: str,
    results: dict[str, dict[str, Any]],
    environment: dict[str, Any],
    elapsed_s: float,
) -> dict[str, Any]:
    """Write ``report.json`` / ``report.md`` of a single-seed validation run whose sections wrote into ``out_dir``.

    Used by :func:`validate` and, per seed, by :func:`ppl_kbnn.sweep.validate_sweep`.

    Args:
        out_dir: the folder holding the sections' files (``<name>.md`` is read back into ``report.md``).
        seed, quick, command: the run's settings and command line.
        results: section name -> the section's dict, in run order.
        environment: :func:`environment` of the process that ran the sections.
        elapsed_s: the run's wall time.

    Returns:
        The report written to ``report.json``.
    """
    passed = all(bool(c["passed"]) for r in results.values() for c in r["checks"])
    report = {
        "version": __version__,
        "seed": seed,
        "quick": quick,
        "command": command,
        "sections": results,
        "environment": environment,
        "elapsed_s": elapsed_s,
        "passed": passed,
    }
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_dir / "report.md", _report_md(report, command, out_dir))
    return report


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: expected a non-negative integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid seed {value}: expected a non-negative integer")
    return value


def _seeds(text: str) -> list[int]:
    """``"0-2"`` -> ``[0, 1, 2]``; ``"0,3"`` -> ``[0, 3]``."""
    try:
        if "-" in text:
            a, b = (int(v) for v in text.split("-", 1))
            seeds = list(range(a, b + 1))
        else:
            seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seeds {text!r}: expected A-B or A,B,...") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"invalid seeds {text!r}: expected distinct non-negative integers")
    return seeds


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid workers {text!r}: expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid workers {value}: expected an integer >= 1")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``ppl-kbnn validate: error: ... (see --help)`` and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print one line on stderr and exit with 2 (no usage block)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_EPILOG = (
    "Results go to stdout, progress to stderr (bars only on a terminal, otherwise one line per stage). "
    "Before the run, the earlier outputs of this command in --out ({files}) are removed, and nothing else; "
    "the reports are written atomically. Exit codes: 0 success, 1 failed checks (validate), 2 user error."
)


def _seeds(text: str) -> list[int]:
    from .sweep import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _num_cpus(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid CPU count {text!r}: expected an integer >= 1")
    return value


def _sweep_arguments(p: argparse.ArgumentParser, seed_args: Any) -> None:
    """``--seeds``, ``--executor``, ``--address``, ``--num-cpus`` of ``ppl-kbnn validate``."""
    seed_args.add_argument(
        "--seeds", type=_seeds, default=None, metavar="SEEDS",
        help="run a sweep over these seeds instead of one seed: '0-9', '0,3,5' or '0-2,7'. Every section at every "
             "seed is one task; OUT/seed_<s>/ gets what --seed s writes, OUT/report.json and report.md merge the "
             "seeds (across-seed means and intervals, pass counts)",
    )  # fmt: skip
    _executor_arguments(p, "with --seeds: run the tasks one after another in this process (local, the default)")


def _executor_arguments(p: argparse.ArgumentParser, local: str) -> None:
    """``--executor``, ``--address``, ``--num-cpus`` (``validate`` sweeps and the pendulum study's units)."""
    p.add_argument("--executor", choices=("local", "ray"), default=None,
                   help=f"{local} or as Ray tasks of one CPU each (ray; needs pip install "
                        "\"ppl-kbnn[ray]\")")  # fmt: skip
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --executor ray: the address of an existing Ray cluster (default: start a local Ray "
                        "with the machine's cores)")  # fmt: skip
    p.add_argument("--num-cpus", type=_num_cpus, default=None, metavar="N",
                   help="with --executor ray and no --address: CPUs of the local Ray (default: the machine's "
                        "cores)")  # fmt: skip


def _sweep_usage_error(args: argparse.Namespace) -> str | None:
    """The misuse of the sweep options of ``validate`` (and of the executor options of ``pendulum``), if any."""
    if args.command == "pendulum":
        if args.first_design and args.executor is not None:
            return "--executor only with the on-policy design (not with --first-design)"
        if args.executor == "ray" and args.workers > 1:
            return "--workers is the local process pool; with --executor ray use --num-cpus"
    elif args.seeds is None:
        used = [f for f, v in (("--executor", args.executor), ("--address", args.address),
                               ("--num-cpus", args.num_cpus)) if v is not None]  # fmt: skip
        return f"{', '.join(used)} only with --seeds" if used else None
    if (args.address is not None or args.num_cpus is not None) and args.executor != "ray":
        return "--address and --num-cpus only with --executor ray"
    if args.address is not None and args.num_cpus is not None:
        return "--num-cpus applies to a local Ray only, not with --address"
    return None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ppl-kbnn",
        description="Kalman Bayesian Transformer: closed-form Bayesian sequential fine-tuning of a pre-trained "
        "network, its validation against Monte Carlo and NUTS, the pendulum study and the benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"ppl-kbnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands = {
        "validate": (
            "check the closed forms against Monte Carlo and KBT against NUTS/SVI; write a report",
            "Check every closed-form moment against Monte Carlo, the Kalman guide against exact conjugate "
            "regression, and KBT against NUTS and SVI on identical data and prior. Writes report.json, "
            "report.md, one <section>.json/.md and PNGs per section; exits 1 when a check fails.",
            "validation-out",
            "fewer Monte-Carlo draws and cases, NUTS only on the smallest problem: a smoke test",
        ),
        "pendulum": (
            "the pendulum study: KBT vs retraining vs no adaptation under distribution shift",
            "A decision transformer pre-trained on the nominal inverted pendulum adapts one label at a time "
            "to three shifted pendulums, on on-policy streams (every 25 labels its current network runs an "
            "episode that the recomputed expert labels), with KBT (all weights; the 16 state-embedding biases) "
            "and warm-started retraining of the same subsets (learning rate chosen on development streams, memory "
            "matched to KBT's bytes and larger); success under noisy evaluation with 95 % intervals across "
            "streams, memory, time per sample, RMSE, offset tolerance, predicted uncertainty vs label noise. "
            "Writes results.json, results.md, pretrained_seed<N>.pt and PNGs. The default run takes about 10 "
            "minutes on 2 cores; --full is the complete design (3 networks x 10 streams per shift, checkpoints every "
            "25 to 200).",
            "pendulum-out",
            "a small version (few episodes and samples): a smoke test, not a result",
        ),
        "bench": (
            "update time and memory of KBT vs AdamW, retraining, SVI, NUTS; scaling",
            "Benchmarks: the per-sample cost of a KBT update against one AdamW step, retraining, SVI and NUTS "
            "on the same network, and its scaling with width, depth, context and precision. Writes bench.json, "
            "bench.md and PNGs.",
            "bench-out",
            "fewer repeats and smaller baselines: a smoke test",
        ),
    }
    for name, (help_, description, out, quick_help) in commands.items():
        p = sub.add_parser(name, help=help_, description=description,
                           epilog=_EPILOG.format(files=", ".join(OUTPUTS[name])))  # fmt: skip
        p.add_argument("--quick", action="store_true", help=quick_help)
        seed_args = p.add_mutually_exclusive_group() if name == "validate" else p
        seed_args.add_argument("--seed", type=_seed, default=0, help="base random seed, >= 0 (default 0)")
        p.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")
        if name == "pendulum":
            p.add_argument("--full", action="store_true",
                           help="the full design (3 networks x 10 streams per shift, checkpoints every 25 to 200)")
            p.add_argument("--seeds", type=_seeds, default=None, metavar="A-B|A,B,..",
                           help="pre-trained network seeds (e.g. 0-2); overrides --seed and the preset's networks")
            p.add_argument("--workers", type=_workers, default=1,
                           help="processes running the study's units in parallel (default 1: in turn)")
            p.add_argument("--resume", action="store_true",
                           help="reuse the units an interrupted run with the same settings finished (DIR/units)")
            p.add_argument("--first-design", action="store_true",
                           help="run the first design instead (i.i.d. expert stream, one seed, no intervals)")
            _executor_arguments(p, "run the study's units here (local, the default: in turn or in --workers "
                                   "processes)")  # fmt: skip
        if name == "validate":
            p.add_argument(
                "--sections", nargs="+", choices=list(SECTIONS), default=None, metavar="NAME",
                help=f"sections to run (default all: {', '.join(SECTIONS)})",
            )  # fmt: skip
            _sweep_arguments(p, seed_args)
        if name == "bench":
            p.add_argument("--device", default="cpu", metavar="DEVICE",
                           help="where the networks and beliefs live: cpu (default) or cuda (skipped with a message "
                                "when CUDA is not available)")  # fmt: skip
        p.add_argument("--no-progress", action="store_true",
                       help="no progress on stderr (the result lines on stdout stay)")  # fmt: skip
    return parser


def _pendulum_summary(results: dict[str, Any]) -> list[str]:
    """The result lines of a pendulum run: the chosen shift and each method's success at each checkpoint."""
    if results.get("stopped"):
        return [f"stopped: {results['stopped']}"]
    from .pendulum.report import label

    lines = [f"shift: {results['stream']['task']}"]
    for name, m in results["methods"].items():
        cps = ", ".join(f"n={c['n_samples']} {c['successes']}/{c['n']}" for c in m["checkpoints"])
        lines.append(f"  {label(name):>18}: {cps}")
    return lines


def _run(args: argparse.Namespace, command: str) -> int:
    progress = not args.no_progress
    if args.command == "validate" and args.seeds is not None:
        return _run_sweep(args, command, progress)
    if args.command == "validate":
        report = validate(out_dir=args.out, quick=args.quick, seed=args.seed, sections=args.sections,
                          progress=progress, command=command)  # fmt: skip
        failed = [(name, c) for name, r in report["sections"].items() for c in r["checks"] if not c["passed"]]
        for name, c in failed:
            print(f"FAILED {name}/{c['name']}: {c['detail']}")
        n_checks = sum(len(r["checks"]) for r in report["sections"].values())
        verdict = "all passed" if not failed else f"{len(failed)} failed"
        print(f"{n_checks} checks, {verdict}; report: {args.out / 'report.md'}")
        return 0 if not failed else 1
    if args.command == "bench":
        from .bench import check_device

        try:
            check_device(args.device)
        except ValueError as err:
            if not str(args.device).startswith("cuda") or "not available" not in str(err):
                print(f"ppl-kbnn bench: error: --device: {err} (see ppl-kbnn bench --help)", file=sys.stderr)
                return 2
            print(f"ppl-kbnn bench: skipped: {err}; nothing was run", file=sys.stderr)  # never required: exit 0
            return 0
    prepare_out_dir(args.out, outputs_to_remove(args))
    if args.command == "pendulum":
        from . import pendulum

        if args.first_design:
            results = pendulum.run_study(out_dir=args.out, quick=args.quick, seed=args.seed, progress=progress,
                                         command=command)  # fmt: skip
            lines = _pendulum_summary(results)
        else:
            preset = "quick" if args.quick else "full" if args.full else "default"
            networks = args.seeds if args.seeds is not None else ([args.seed] if args.seed else None)
            results = pendulum.run_onpolicy_study(out_dir=args.out, preset=preset, networks=networks,
                                                  workers=args.workers, progress=progress, command=command,
                                                  resume=args.resume, executor=args.executor or "local",
                                                  address=args.address, num_cpus=args.num_cpus)  # fmt: skip
            lines = list(results.get("conclusion", []))
        for line in lines:
            print(line)
        print(f"results: {args.out / 'results.md'}")
        return 0
    from .bench import run_bench

    run_bench(out_dir=args.out, quick=args.quick, seed=args.seed, progress=progress, command=command,
              device=args.device)  # fmt: skip
    print(f"results: {args.out / 'bench.md'}")
    return 0


def _run_sweep(args: argparse.Namespace, command: str, progress: bool) -> int:
    """``validate --seeds``: :func:`ppl_kbnn.sweep.validate_sweep`, failed checks and a summary on stdout."""
    from .sweep import validate_sweep

    report = validate_sweep(out_dir=args.out, quick=args.quick, seeds=args.seeds, sections=args.sections,
                            executor=args.executor or "local", address=args.address, num_cpus=args.num_cpus,
                            progress=progress, command=command)  # fmt: skip
    for name, sec in report["sections"].items():
        for c in sec["checks"]:
            for s, r in c["per_seed"].items():
                if not r["passed"]:
                    print(f"FAILED seed {s} {name}/{c['name']}: {r['detail']}")
    n_seeds = len(report["seeds"])
    seeds = f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"
    verdict = "all passed" if report["passed"] else f"{report['n_failed']} failed"
    print(f"{report['n_checks']} checks over {seeds}, {verdict}; report: {args.out / 'report.md'} "
          f"(per seed: {args.out / 'seed_<s>'})")  # fmt: skip
    return 0 if report["passed"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ppl-kbnn``; returns the exit code (0 success, 1 failed checks, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --version, --help and usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command in ("validate", "pendulum") and (misuse := _sweep_usage_error(args)):
        print(f"ppl-kbnn {args.command}: error: {misuse} (see ppl-kbnn {args.command} --help)", file=sys.stderr)
        return 2
    command = shlex.join(["ppl-kbnn", *argv])
    if args.quick:
        print(f"{SMOKE_TEST}: a --quick run checks that `ppl-kbnn {args.command}` runs end to end")
    from .hyper import OutlierWarning  # (imports torch: not needed for --help / --version)
    from .sweep import SweepError

    try:
        with warnings.catch_warnings():
            # the studies and checks use deliberately surprising data (priors far from the truth, mis-set noise):
            # their reports carry the outlier counts (guard_counts), so the library's warning would only be noise
            warnings.filterwarnings("ignore", category=OutlierWarning)
            return _run(args, command)
    except SweepError as exc:  # Ray missing or unreachable
        print(f"ppl-kbnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OutputDirError as exc:  # user errors only: a ValueError from inside a run is a bug and keeps its traceback
        print(f"ppl-kbnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
