r"""Sweeps across seeds: run independent tasks in turn or as Ray tasks, and merge per-seed results.

* :func:`parse_seeds` reads a seed list (``"0-9"``, ``"0,3,5"``, ``"0-2,7"``).
* :func:`run_tasks` calls a top-level function once per keyword-argument dict, either one after another in
  this process (``executor="local"``) or as Ray tasks of one CPU each (``executor="ray"``: an existing
  cluster at ``address``, or a local Ray with the machine's cores that is shut down afterwards), and
  returns the results in input order.
* :func:`interval` and :func:`merge_details` are the across-seed statistics of a merged report: the mean
  of a value over seeds with a 95% t-interval (``mean ± t_{0.975, n-1} s / √n``, ``s`` the sample standard
  deviation over seeds) from three seeds on, and the min/max range for one or two seeds.
* :func:`validate_sweep` is ``ppl-kbnn validate --seeds``: every (seed, section) pair is one task; each
  task's files go into ``OUT/seed_<s>/``, exactly the files a single-seed run ``--seed s`` writes, and
  ``OUT/report.json`` / ``OUT/report.md`` merge the seeds.

Ray is an optional dependency (``pip install "ppl-kbnn[ray]"``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SweepError",
    "interval",
    "merge_details",
    "parse_seeds",
    "run_tasks",
    "validate_section_task",
    "validate_sweep",
]

EXECUTORS = ("local", "ray")
RAY_INSTALL = 'pip install "ppl-kbnn[ray]"'
T_INTERVAL = "95% t-interval of the mean across seeds: mean ± t(0.975, n-1) · s / √n (s: sample std over seeds)"
MIN_MAX = "min and max across seeds (fewer than 3 seeds: no t-interval)"


class SweepError(RuntimeError):
    """A sweep cannot run: Ray is not installed, or the Ray cluster cannot be reached."""


# ------------------------------------------------------------------------------------------------- seeds


def parse_seeds(text: str) -> list[int]:
    """Read a seed list: comma-separated non-negative integers and inclusive ranges ``a-b``.

    ``"0-9"`` → ``[0, …, 9]``, ``"0,3,5"`` → ``[0, 3, 5]``, ``"0-2,7"`` → ``[0, 1, 2, 7]`` (in the given
    order; spaces around the items are allowed).

    Raises:
        ValueError: an empty list or item, a negative or non-integer seed, a range whose end is below its
            start, or a seed listed twice.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"invalid seeds {text!r}: expected e.g. '0-9', '0,3,5' or '0-2,7'")
    seeds: list[int] = []
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        if m is None:
            raise ValueError(f"invalid seeds {text!r}: {item!r} is not a non-negative integer or a range a-b")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise ValueError(f"invalid seeds {text!r}: range {item!r} ends below its start")
        seeds.extend(range(lo, hi + 1))
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"invalid seeds {text!r}: seed(s) {dup} listed more than once")
    return seeds


# ------------------------------------------------------------------------------------------------- executors


def _one_thread_call(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    """The body of a Ray task: one torch thread (the task holds one CPU), then ``fn(**kwargs)``."""
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    return fn(**kwargs)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise SweepError(f"--executor ray needs Ray, which is not installed ({exc}); install it with "
                         f"`{RAY_INSTALL}`, or use --executor local") from None  # fmt: skip
    return ray


def run_tasks(
    fn: Callable[..., Any],
    kwargs_list: Sequence[Mapping[str, Any]],
    *,
    executor: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Call ``fn(**kwargs)`` for every ``kwargs`` of ``kwargs_list``; return the results in input order.

    ``executor="local"``: one call after another in this process (nothing about threads changes).
    ``executor="ray"``: each call is one Ray task holding one CPU, run with ``OMP_NUM_THREADS=1`` and one torch
    thread. With ``address`` it joins that Ray cluster (``ray.init(address=address)``; its workers must be able to
    import ``fn``, i.e. have ppl-kbnn installed); without it, it starts a local Ray with ``num_cpus`` CPUs (default:
    the machine's cores) whose workers import ppl-kbnn from where this process does. Afterwards
    ``ray.shutdown()`` stops the local Ray this call started, or disconnects from the cluster it joined (which
    keeps running); a Ray already initialised in this process is used as it is and left initialised.

    Args:
        fn: a top-level (picklable by reference) function taking keyword arguments; its result must pickle.
        kwargs_list: one dict of keyword arguments per task.
        executor: ``"local"`` or ``"ray"``.
        address: the address of an existing Ray cluster (``executor="ray"`` only), e.g. ``"auto"`` or
            ``"ray://host:10001"``.
        num_cpus: CPUs of the local Ray (``executor="ray"`` without ``address`` only).
        on_done: called as ``on_done(index, result)`` when a task finishes (in completion order with Ray).

    Returns:
        ``[fn(**kwargs) for kwargs in kwargs_list]``.

    Raises:
        ValueError: an unknown executor, ``address`` or ``num_cpus`` where they do not apply, ``num_cpus < 1``.
        SweepError: Ray is not installed, or the cluster at ``address`` cannot be reached.
        Exception: the first exception raised by a task (with Ray: wrapped in Ray's task error, which is also an
            instance of the original exception's class).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose from {list(EXECUTORS)}")
    if executor == "local" and (address is not None or num_cpus is not None):
        raise ValueError("address and num_cpus apply to executor='ray' only")
    if address is not None and num_cpus is not None:
        raise ValueError("num_cpus applies to a local Ray only, not to an existing cluster (address)")
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"num_cpus must be an integer >= 1, got {num_cpus!r}")
    kwargs_list = [dict(kw) for kw in kwargs_list]
    if executor == "local":
        results = []
        for i, kw in enumerate(kwargs_list):
            results.append(fn(**kw))
            if on_done is not None:
                on_done(i, results[-1])
        return results

    ray = _import_ray()
    env_vars = {"OMP_NUM_THREADS": "1"}
    started = not ray.is_initialized()
    if started:
        import logging

        init: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
        if address is None:
            # address="local": a new local Ray, never one that `ray start` left running (or its stale address)
            init.update(address="local", num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
                        include_dashboard=False)  # fmt: skip
            # the local workers import ppl-kbnn (and fn's module) from where this process does
            import ppl_kbnn

            here = str(Path(ppl_kbnn.__file__).resolve().parents[1])
            env_vars["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
        else:
            init["address"] = address
        try:
            ray.init(**init)
        except ConnectionError as exc:
            raise SweepError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    try:
        remote = ray.remote(num_cpus=1)(_one_thread_call).options(runtime_env={"env_vars": env_vars})
        refs = [remote.remote(fn, kw) for kw in kwargs_list]
        index = {ref: i for i, ref in enumerate(refs)}
        results = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                results[i] = ray.get(ref)
                if on_done is not None:
                    on_done(i, results[i])
        return results
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------- statistics


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Across-seed mean and 95% interval of one value.

    From three values on: the t-interval of the mean, ``mean ± t_{0.975, n-1} s / √n`` (``s`` the sample
    standard deviation, ``ddof=1``), ``method="t95"``; with one or two values: ``lo, hi`` = min, max,
    ``method="minmax"``. A non-finite value makes ``mean``, ``lo``, ``hi`` ``None``.

    Returns:
        ``{mean, lo, hi, n, method, values}``.

    Raises:
        ValueError: no values.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("interval of no values")
    method = "t95" if n >= 3 else "minmax"
    out: dict[str, Any] = {"mean": None, "lo": None, "hi": None, "n": n, "method": method, "values": vals}
    if not all(math.isfinite(v) for v in vals):
        out["values"] = [v if math.isfinite(v) else repr(v) for v in vals]  # JSON has no nan/inf
        return out
    mean = math.fsum(vals) / n
    if n >= 3:
        from scipy.stats import t

        s = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
        half = float(t.ppf(0.975, n - 1)) * s / math.sqrt(n)
        lo, hi = mean - half, mean + half
    else:
        lo, hi = min(vals), max(vals)
    out.update(mean=mean, lo=lo, hi=hi)
    return out


# a number in a detail text; not inside a word ("d8", "err2") or a longer number; "2,000" is one number
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\d)")


def _split_numbers(text: str) -> tuple[list[str], list[str]]:
    """``text`` as ``texts[0] num[0] texts[1] … num[n-1] texts[n]``."""
    texts, nums, pos = [], [], 0
    for m in _NUMBER.finditer(text):
        texts.append(text[pos : m.start()])
        nums.append(m.group())
        pos = m.end()
    texts.append(text[pos:])
    return texts, nums


def _fmt(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "non-finite (" + ", ".join(str(v) for v in stats["values"]) + ")"
    return f"{stats['mean']:.3g} [{stats['lo']:.3g}, {stats['hi']:.3g}]"


def merge_details(details: Sequence[str]) -> dict[str, Any]:
    """Merge one check's detail texts across seeds: every number they state, with its across-seed interval.

    The texts are cut into words and numbers. The numbers that follow the same words in every seed's text
    (all of them when the texts differ only in their numbers; otherwise those before the first words that
    differ, e.g. before a location such as "at relu" vs "at gelu") are the same quantity, and each gets
    :func:`interval` across seeds. The merged text states each such number once: as it is when every seed
    has the same; as the per-seed values ``{a, b, …}`` (in seed order) when they are integers (counts, steps,
    sizes); else as ``mean [lo, hi]``. A text cut where the words differ ends in ``…``.

    Returns:
        ``{detail, complete, values}``: ``detail`` the merged text, ``complete`` whether the seeds' texts
        have the same words throughout, ``values`` one ``{position, context, same, mean, lo, hi, n,
        method, values}`` per merged number (``context``: up to 60 characters of the text before it).

    Raises:
        ValueError: no details.
    """
    if not details:
        raise ValueError("merge_details of no details")
    split = [_split_numbers(d) for d in details]
    first_texts, first_nums = split[0]
    n_same = 0  # leading text pieces equal in every seed's detail
    while n_same < len(first_texts) and all(len(t) > n_same and t[n_same] == first_texts[n_same] for t, _ in split):
        n_same += 1
    complete = all(t == first_texts for t, _ in split)
    k = len(first_nums) if complete else min(n_same, min(len(nums) for _, nums in split))
    values, pieces = [], []
    context = ""
    for i in range(k):
        tokens = [nums[i] for _, nums in split]
        context = (context + first_texts[i])[-60:]
        same = all(tok == tokens[0] for tok in tokens)
        stats = interval([float(tok.replace(",", "")) for tok in tokens])
        values.append({"position": i, "context": context.strip(), "same": same, **stats})
        integers = all(re.fullmatch(r"-?[\d,]+", tok) for tok in tokens)  # counts, steps, sizes: listed per seed
        pieces += [first_texts[i], tokens[0] if same else "{" + ", ".join(tokens) + "}" if integers else _fmt(stats)]
        context += tokens[0]
    pieces.append(first_texts[k] if complete else (first_texts[k] if k < n_same else "") + " …")
    return {"detail": "".join(pieces), "complete": complete, "values": values}


def _numeric_leaves(obj: Any, path: str = "") -> dict[str, float]:
    """Every int/float leaf of a JSON-like value by path (``rows[0].mean_err``); lists of plain numbers (traces,
    grids) and booleans are left out."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_numeric_leaves(value, f"{path}.{key}" if path else str(key)))
    elif isinstance(obj, list):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            for i, value in enumerate(obj):
                out.update(_numeric_leaves(value, f"{path}[{i}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[path] = obj
    return out


def _merge_items(per_seed: dict[int, list[dict[str, Any]]], flag: str) -> list[dict[str, Any]]:
    """Merge the checks (``flag="passed"``) or findings (``flag="holds"``) of one section across seeds, by name."""
    names: list[str] = []
    for items in per_seed.values():
        names += [it["name"] for it in items if it["name"] not in names]
    merged = []
    for name in names:
        found = {s: next((it for it in items if it["name"] == name), None) for s, items in per_seed.items()}
        have = {s: it for s, it in found.items() if it is not None}
        details = merge_details([it["detail"] for it in have.values()])
        flags = [it[flag] for it in have.values()]
        merged.append({
            "name": name,
            f"n_{flag}": sum(f is True for f in flags),
            "n": len(have),
            "missing_seeds": [s for s, it in found.items() if it is None],
            "detail": details["detail"],
            "detail_complete": details["complete"],
            "values": details["values"],
            "per_seed": {str(s): {flag: it[flag], "detail": it["detail"]} for s, it in have.items()},
        })  # fmt: skip
    return merged


# ------------------------------------------------------------------------------------------------- validate sweep


def validate_section_task(*, name: str, quick: bool, seed: int, command: str) -> dict[str, Any]:
    """One task of a validation sweep: section ``name`` at ``seed``, as a single-seed run would run it.

    The section writes into a fresh temporary folder (so the task can run on any machine of a Ray cluster);
    its files come back with the result and the folder is removed.

    Returns:
        ``{name, seed, result, elapsed_s, environment, files}``: the section's dict, its wall time, this worker's
        :func:`ppl_kbnn.cli.environment`, and ``{file name: bytes}`` of every file it wrote.
    """
    from .cli import SECTIONS, environment
    from .hyper import OutlierWarning

    with tempfile.TemporaryDirectory(prefix=f"ppl-kbnn-{name}-{seed}-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=OutlierWarning)  # as in the command (its reports count them)
        t0 = time.perf_counter()
        result = SECTIONS[name](quick=quick, seed=seed, out_dir=Path(tmp), progress=False, command=command)
        elapsed = time.perf_counter() - t0
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return {"name": name, "seed": seed, "result": result, "elapsed_s": round(elapsed, 3),
            "environment": environment(), "files": files}  # fmt: skip


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _seed_command(quick: bool, seed: int, out: Path, sections: Sequence[str] | None) -> str:
    """The single-seed command whose outputs a sweep's ``seed_<seed>/`` folder holds."""
    argv = ["ppl-kbnn", "validate", *(["--quick"] if quick else []), "--seed", str(seed), "--out", str(out)]
    return shlex.join(argv + (["--sections", *sections] if sections is not None else []))


def _stage(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"[ppl-kbnn] {msg}", file=sys.stderr, flush=True)


def validate_sweep(
    *,
    out_dir: Path,
    quick: bool,
    seeds: Sequence[int],
    sections: Sequence[str] | None = None,
    executor: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    command: str = "ppl-kbnn validate --seeds",
) -> dict[str, Any]:
    """``ppl-kbnn validate --seeds``: every section at every seed as one task; per-seed and merged reports.

    ``out_dir/seed_<s>/`` receives what ``ppl-kbnn validate --seed s`` (same ``--quick`` and ``--sections``)
    writes: each section's ``.json``/``.md``/PNG files as the section wrote them, and ``report.json`` /
    ``report.md`` built by the same code (:func:`ppl_kbnn.cli.write_report`), whose ``command`` is that
    single-seed command and whose ``elapsed_s`` is the sum of its sections' times. ``out_dir/report.json`` /
    ``report.md`` merge the seeds: per section, every check and finding with its pass (or holds) count, the
    across-seed :func:`interval` of every number its detail states (:func:`merge_details`), each seed's
    result, and the interval of every numeric entry of the section's tables (``values``). The earlier outputs
    (:data:`ppl_kbnn.cli.OUTPUTS`) in ``out_dir`` and in each ``seed_<s>/`` are removed first.

    Args:
        out_dir: the output folder.
        quick: the smoke-test settings of every section.
        seeds: the seeds (distinct, >= 0).
        sections: section names (default all of :data:`ppl_kbnn.cli.SECTIONS`).
        executor, address, num_cpus: see :func:`run_tasks`.
        progress: one line on stderr per finished task.
        command: the command line recorded in the merged report.

    Returns:
        The merged report (written to ``out_dir/report.json``).

    Raises:
        ValueError: no seeds, a negative or repeated seed, an unknown section, an unusable ``out_dir``.
        SweepError: see :func:`run_tasks`.
    """
    from . import __version__
    from ._io import prepare_out_dir, write_text_atomic
    from .cli import OUTPUTS, SECTIONS, environment, write_report

    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds listed more than once: {seeds!r}")
    names = list(SECTIONS) if sections is None else list(sections)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose from {list(EXECUTORS)}")
    if executor == "ray":
        _import_ray()  # before any file is touched
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, OUTPUTS["validate"])
    for s in seeds:
        prepare_out_dir(out_dir / f"seed_{s}", OUTPUTS["validate"])
    tasks = [{"name": n, "quick": quick, "seed": s,
              "command": _seed_command(quick, s, out_dir / f"seed_{s}", sections)}
             for s in seeds for n in names]  # fmt: skip
    _stage(progress, f"validate: {len(tasks)} tasks ({len(seeds)} seeds x {len(names)} sections) on {executor}"
                     + (f" ({address})" if address else "") + " ...")  # fmt: skip
    finished = [0]

    def done(i: int, r: dict[str, Any]) -> None:
        finished[0] += 1
        n_failed = sum(not c["passed"] for c in r["result"]["checks"])
        _stage(
            progress,
            f"validate: seed {r['seed']} section {r['name']} done in {r['elapsed_s']:.1f} s "
            f"({len(r['result']['checks'])} checks, {n_failed} failed) [{finished[0]}/{len(tasks)}]",
        )

    t0 = time.perf_counter()
    runs = run_tasks(validate_section_task, tasks, executor=executor, address=address, num_cpus=num_cpus,
                     on_done=done)  # fmt: skip
    elapsed = time.perf_counter() - t0

    per_seed: dict[int, dict[str, Any]] = {}
    for s in seeds:
        seed_dir = out_dir / f"seed_{s}"
        mine = [r for r in runs if r["seed"] == s]  # in section order
        for r in mine:
            for fname, data in r["files"].items():
                _write_bytes_atomic(seed_dir / fname, data)
        per_seed[s] = write_report(
            seed_dir, seed=s, quick=quick, command=tasks[seeds.index(s) * len(names)]["command"],
            results={r["name"]: r["result"] for r in mine}, environment=mine[0]["environment"],
            elapsed_s=round(sum(r["elapsed_s"] for r in mine), 3),
        )  # fmt: skip

    method = T_INTERVAL if len(seeds) >= 3 else MIN_MAX
    merged_sections: dict[str, Any] = {}
    for name in names:
        results = {s: per_seed[s]["sections"][name] for s in seeds}
        leaves = {s: _numeric_leaves({k: v for k, v in r.items() if k not in ("checks", "findings")})
                  for s, r in results.items()}  # fmt: skip
        common = [p for p in leaves[seeds[0]] if all(p in leaves[s] for s in seeds)]
        entry: dict[str, Any] = {
            "checks": _merge_items({s: r["checks"] for s, r in results.items()}, "passed"),
            "values": {p: interval([leaves[s][p] for s in seeds]) for p in common},
        }
        if any("findings" in r for r in results.values()):
            entry["findings"] = _merge_items({s: r.get("findings", []) for s, r in results.items()}, "holds")
        merged_sections[name] = entry
    n_checks = sum(len(r["checks"]) for p in per_seed.values() for r in p["sections"].values())
    n_failed = sum(not c["passed"] for p in per_seed.values() for r in p["sections"].values() for c in r["checks"])
    report = {
        "version": __version__,
        "seeds": seeds,
        "quick": quick,
        "command": command,
        "executor": {"name": executor, "address": address, "num_cpus": num_cpus},
        "interval": method,
        "per_seed": {
            str(s): {
                "dir": f"seed_{s}",
                "report": f"seed_{s}/report.json",
                "command": per_seed[s]["command"],
                "passed": per_seed[s]["passed"],
                "elapsed_s": per_seed[s]["elapsed_s"],
            }
            for s in seeds
        },  # fmt: skip
        "sections": merged_sections,
        "environment": environment(),
        "elapsed_s": round(elapsed, 3),
        "n_checks": n_checks,
        "n_failed": n_failed,
        "passed": n_failed == 0,
    }
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_dir / "report.md", _sweep_md(report))
    return report


def _sweep_md(report: dict[str, Any]) -> str:
    """The merged report as markdown."""
    from .cli import SMOKE_TEST

    status = "all checks passed at every seed" if report["passed"] else "SOME CHECKS FAILED"
    seeds = report["seeds"]
    ex = report["executor"]
    lines = [f"# ppl-kbnn validation sweep over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({status})", ""]
    if report["quick"]:
        lines += [f"> **{SMOKE_TEST}.** Every seed ran with the `--quick` settings: a smoke test.", ""]
    lines += [
        f"Command: `{report['command']}`",
        "",
        f"ppl-kbnn {report['version']}, seeds {', '.join(map(str, seeds))}, "
        f"{'quick (smoke test)' if report['quick'] else 'full'} runs, executor {ex['name']}"
        + (f" at {ex['address']}" if ex["address"] else "")
        + f", {report['elapsed_s']:.1f} s wall; {report['n_checks']} checks, {report['n_failed']} failed.",
        "",
        "Each `seed_<s>/` folder holds exactly what the single-seed command beside it writes (its `elapsed_s` "
        "is the sum of its sections' times). Below, per check, the number of seeds at which it passed and its "
        "detail text with each number that differs across seeds written `mean [lo, hi]`, where [lo, hi] is the "
        f"{report['interval']}, or, for whole numbers (counts, steps, sizes), as the per-seed values "
        "`{a, b, ...}` in seed order. A detail whose wording differs across seeds is cut where it starts to "
        "differ (…); the per-seed reports have the full texts.",
        "",
        "| seed | passed | time (s) | report | single-seed command |",
        "|---:|---|---:|---|---|",
    ]
    for s, p in report["per_seed"].items():
        lines.append(f"| {s} | {'yes' if p['passed'] else '**NO**'} | {p['elapsed_s']:.1f} | "
                     f"[{p['dir']}/report.md]({p['dir']}/report.md) | `{p['command']}` |")  # fmt: skip
    lines.append("")
    for name, sec in report["sections"].items():
        lines += [f"## {name}", "", "| check | passed | across seeds |", "|---|---:|---|"]
        for c in sec["checks"]:
            lines.append(f"| `{c['name']}` | {c['n_passed']}/{c['n']} | {_cell(c['detail'])} |")
        if sec.get("findings"):
            lines += ["", "Findings (reported, not checks):", "", "| finding | holds | across seeds |",
                      "|---|---:|---|"]  # fmt: skip
            for f in sec["findings"]:
                lines.append(f"| `{f['name']}` | {f['n_holds']}/{f['n']} | {_cell(f['detail'])} |")
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text for a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
