r"""Validation section ``long_stream``: a belief stays a covariance over a very long stream of updates.

A small MLP (``2 → 8 → 8 → 1``, ReLU) with a Gaussian prior (std 0.3, observation noise 0.1) is updated by
the Kalman guide, one sample at a time, on a noisy non-linear stream ``y = sin(x₁ + x₂) + 0.5 ε`` with a
small random-walk process noise (``q = 10⁻⁶``), for both weight-covariance kinds (``block`` and ``diag``),
no numerical guard switched on. After every ``check_every``-th update every belief is checked:

* **finite**: no NaN or inf in any mean or covariance;
* **symmetric** (``block``): every block equals its transpose exactly (bit for bit);
* **PSD**: ``block``: smallest eigenvalue ``≥ −100 p ε · max|C|`` (``p`` the block size, ``ε`` the float64
  machine epsilon; the round-off of an eigenvalue solver); ``diag``: every variance ``≥ 0``.

Checks: every one of these holds at every checkpoint, for both kinds (``{kind}_finite``,
``{kind}_symmetric``, ``{kind}_psd``). Reported: the smallest eigenvalue seen, the guard counts (none
should fire: every guard is off) and the throughput in updates per second.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ._md import checks_md

FULL = {"n_updates": 100_000, "check_every": 100, "kinds": ("block", "diag"), "process_noise": 1e-6}
QUICK = {"n_updates": 2_000, "check_every": 100, "kinds": ("block", "diag"), "process_noise": 1e-6}
WIDTHS = (2, 8, 8, 1)
PRIOR_SCALE = 0.3
OBS_NOISE = 0.1


def _mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def belief_health(guide: Any) -> dict[str, Any]:
    """Finiteness, exact symmetry and PSD-ness of every belief of a :class:`~ppl_kbnn.KalmanGuide`.

    Returns ``{"finite": bool, "symmetric": bool, "psd": bool, "min_eig": float, "min_eig_rel": float}``:
    ``min_eig`` the smallest eigenvalue of any ``block`` (the smallest variance for ``diag``), ``min_eig_rel``
    the same in units of that layer's ``max|C|``; ``psd`` holds when ``min_eig_rel ≥ −100 p ε``.
    """
    finite = symmetric = psd = True
    min_eig, min_rel = float("inf"), float("inf")
    for mean, cov in guide.beliefs().values():
        finite &= bool(torch.isfinite(mean).all() and torch.isfinite(cov).all())
        if not finite:
            continue
        scale = float(cov.abs().max().clamp_min(torch.finfo(cov.dtype).tiny))
        if cov.dim() == 3:  # block: (rows, p, p)
            symmetric &= bool(torch.equal(cov, cov.mT))
            low = float(torch.linalg.eigvalsh(cov).min())
            tol = 100.0 * cov.shape[-1] * torch.finfo(cov.dtype).eps
        else:  # diag: (rows, p)
            low = float(cov.min())
            tol = 0.0
        psd &= low >= -tol * scale
        min_eig, min_rel = min(min_eig, low), min(min_rel, low / scale)
    return {"finite": finite, "symmetric": symmetric, "psd": psd, "min_eig": min_eig, "min_eig_rel": min_rel}


def long_stream_run(
    kind: str,
    *,
    n_updates: int,
    check_every: int = 100,
    process_noise: float = 1e-6,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Update a small MLP's Kalman guide ``n_updates`` times and check its belief every ``check_every`` updates.

    Args:
        kind: weight-covariance kind, ``"block"`` or ``"diag"``.
        n_updates: number of samples (one update each), a multiple of ``check_every``.
        check_every: check the belief (:func:`belief_health`) after every this many updates.
        process_noise: the guide's random-walk variance ``q``.
        seed: seeds the network and the stream.
        progress: optional callable ``progress(n)`` called with the number of updates done after each chunk.

    Returns:
        ``{"kind", "n_updates", "checks_done", "finite", "symmetric", "psd", "first_failure", "min_eig",
        "min_eig_rel", "guard_counts", "seconds", "updates_per_s", "cpu_seconds", "updates_per_cpu_s"}``
        (wall-clock and process CPU time of the updates alone, without the checks); ``first_failure`` is the
        update count at the first failed checkpoint (``None`` if none failed).
    """
    from ..guide import KalmanGuide
    from ..model import BayesianModel

    if n_updates < 1 or check_every < 1 or n_updates % check_every:
        raise ValueError(f"n_updates={n_updates} must be a positive multiple of check_every={check_every}")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = BayesianModel(_mlp(seed), prior_scale=PRIOR_SCALE, obs_noise=OBS_NOISE)
        guide = KalmanGuide(model, kind, process_noise=process_noise)
    finally:
        torch.set_default_dtype(old)
    gen = torch.Generator().manual_seed(seed + 1)
    ok = {"finite": True, "symmetric": True, "psd": True}
    first_failure = None
    min_eig, min_rel = float("inf"), float("inf")
    seconds, cpu, checks = 0.0, 0.0, 0
    for done in range(check_every, n_updates + 1, check_every):
        x = torch.randn(check_every, WIDTHS[0], generator=gen, dtype=torch.float64)  # (c, 2)
        y = torch.sin(x.sum(1, keepdim=True)) + 0.5 * torch.randn(check_every, 1, generator=gen, dtype=torch.float64)
        t0, c0 = time.perf_counter(), time.process_time()
        guide.update(x, y)
        seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
        health = belief_health(guide)
        checks += 1
        for k in ok:
            ok[k] &= health[k]
        if first_failure is None and not all(health[k] for k in ok):
            first_failure = done
        min_eig, min_rel = min(min_eig, health["min_eig"]), min(min_rel, health["min_eig_rel"])
        if progress is not None:
            progress(done)
    return {
        "kind": kind, "n_updates": guide.n_updates, "checks_done": checks, **ok, "first_failure": first_failure,
        "min_eig": min_eig, "min_eig_rel": min_rel, "guard_counts": guide.guard_counts, "seconds": round(seconds, 3),
        "updates_per_s": round(guide.n_updates / seconds, 1), "cpu_seconds": round(cpu, 3),
        "updates_per_cpu_s": round(guide.n_updates / cpu, 1),
    }  # fmt: skip


def _checks(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        at = "" if r["first_failure"] is None else f"; first failure after update {r['first_failure']}"
        low = "smallest eigenvalue" if r["kind"] != "diag" else "smallest variance"
        for prop in ("finite", "symmetric", "psd"):
            out.append({
                "name": f"{r['kind']}_{prop}",
                "passed": bool(r[prop]),
                "detail": f"{r['kind']}: {prop} at all {r['checks_done']} checkpoints of {r['n_updates']:,} updates "
                f"({low} {r['min_eig']:.3g}, {r['min_eig_rel']:.3g} of max abs(C)){at}",
            })  # fmt: skip
    return out


def _markdown(result: dict[str, Any], command: str) -> str:
    cfg = result["config"]
    lines = [
        "## Long stream: the belief stays a covariance",
        "",
        f"Command: `{command}`",
        "",
        f"MLP {' → '.join(map(str, cfg['widths']))} (ReLU), prior std {cfg['prior_scale']:g}, observation noise "
        f"{cfg['obs_noise']:g}, process noise {cfg['process_noise']:g}, no guard on; {cfg['n_updates']:,} updates "
        f"on a noisy sin stream, belief checked every {cfg['check_every']} updates; seed {cfg['seed']}, float64.",
        "",
        "| covariance | updates | checkpoints | finite | symmetric | PSD | smallest eigenvalue (diag: variance) "
        "| rel. to max abs(C) "
        "| guard firings | updates/s (wall) | updates per CPU s |",
        "|---|---:|---:|---|---|---|---:|---:|---|---:|---:|",
    ]
    for r in result["runs"]:
        guards = ", ".join(f"{k} {v}" for k, v in r["guard_counts"].items()) or "none"
        lines.append(
            f"| {r['kind']} | {r['n_updates']:,} | {r['checks_done']} | {r['finite']} | {r['symmetric']} | {r['psd']} "
            f"| {r['min_eig']:.3g} | {r['min_eig_rel']:.3g} | {guards} | {r['updates_per_s']:.0f} "
            f"| {r['updates_per_cpu_s']:.0f} |"
        )
    lines += ["", "Checks:", ""]
    lines += checks_md(result["checks"])
    lines.append("")
    return "\n".join(lines)


def long_stream_section(
    *,
    quick: bool,
    seed: int,
    out_dir: Path,
    progress: bool = True,
    command: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the long-stream belief check for each covariance kind; write ``long_stream.json`` and ``.md``.

    Args:
        quick: use :data:`QUICK` (2,000 updates) instead of :data:`FULL` (100,000 updates).
        seed: seeds the network and the stream.
        out_dir: folder for ``long_stream.json`` and ``long_stream.md``.
        progress: show a tqdm progress bar on stderr.
        command: the command line recorded in the markdown (default: from ``sys.argv``).
        settings: override entries of the chosen settings (``n_updates``, ``check_every``, ``kinds``,
            ``process_noise``), e.g. fewer updates in tests.

    Returns:
        The dict written to ``long_stream.json``: ``runs`` (one per kind, see :func:`long_stream_run`),
        ``config`` and ``checks``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    cfg = {**(QUICK if quick else FULL), **(settings or {})}
    t0 = time.perf_counter()
    runs = []
    total = cfg["n_updates"] * len(cfg["kinds"])
    with tqdm(total=total, desc="long stream", disable=not progress, file=sys.stderr) as bar:
        for i, kind in enumerate(cfg["kinds"]):
            base = i * cfg["n_updates"]
            runs.append(long_stream_run(kind, n_updates=cfg["n_updates"], check_every=cfg["check_every"],
                                        process_noise=cfg["process_noise"], seed=seed,
                                        progress=lambda n, b=base: bar.update(b + n - bar.n)))  # fmt: skip
    result: dict[str, Any] = {
        "runs": runs,
        "config": {
            "n_updates": cfg["n_updates"],
            "check_every": cfg["check_every"],
            "kinds": list(cfg["kinds"]),
            "process_noise": cfg["process_noise"],
            "widths": list(WIDTHS),
            "prior_scale": PRIOR_SCALE,
            "obs_noise": OBS_NOISE,
            "seed": seed,
            "quick": quick,
            "dtype": "float64",
            "elapsed_s": round(time.perf_counter() - t0, 3),
        },  # fmt: skip
        "checks": _checks(runs),
    }
    (out_dir / "long_stream.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "long_stream.md").write_text(_markdown(result, command))
    return result
