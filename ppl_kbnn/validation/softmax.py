r"""Validation section ``softmax``: the Taylor softmax moments against Monte Carlo.

For every grid point ``(n, scale)`` a random Gaussian logit vector ``S ~ N(μ, Σ)`` is drawn
once (``μ ~ N(0, I_n)``, ``Σ = scale · A Aᵀ / n`` with ``A`` an ``n × n`` standard normal
matrix) and the closed-form moments of ``a = softmax(S)`` from
:func:`ppl_kbnn.moments.softmax_moments` (order 1 and order 2 mean, first-order covariance)
are compared with a Monte-Carlo estimate. Everything is float64.

Metrics per ``(n, scale, order)``:

* ``mean_max_abs_err``: ``max_i |E_closed[a_i] - E_mc[a_i]|``;
* ``mean_mc_stderr``: ``max_i`` standard error of the Monte-Carlo mean (the noise floor);
* ``cov_rel_fro_err``: ``‖Cov_closed - Cov_mc‖_F / ‖Cov_mc‖_F`` (the covariance is first
  order for both orders, so it is the same on both rows);
* ``row_sum_err``: ``|Σ_i E_closed[a_i] - 1|``;
* ``order2_gain`` (order-2 rows): ``mean_max_abs_err(order 1) / mean_max_abs_err(order 2)``.

Checks: (a) at every scale ≤ 0.03 the order-2 mean error is ≥ 5× smaller than the order-1
error for every ``n`` (an order-2 error below 2 MC standard errors counts as
``2·stderr``: "resolved by MC"); (b) at every scale ≤ 0.03 the covariance relative error is
≤ 0.15; (c) every closed-form mean sums to 1 within 1e-12.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from ..mc import sample_gaussian
from ..moments import softmax_moments
from ._md import checks_md

NS: tuple[int, ...] = (4, 10, 30)
SCALES: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
ORDERS: tuple[int, ...] = (1, 2)
FULL_SAMPLES = 1_000_000
QUICK_SAMPLES = 200_000
CHUNK = 200_000

SMALL_SCALE = 0.03  # checks (a) and (b) apply at scales <= this
GAIN_MIN = 5.0  # (a): order-1 error / order-2 error
MC_RESOLVED_Z = 2.0  # (a): an order-2 error below this many MC stderrs is "resolved by MC"
COV_REL_MAX = 0.15  # (b)
ROW_SUM_TOL = 1e-12  # (c)

DTYPE = torch.float64


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (mixed by :class:`numpy.random.SeedSequence`)."""
    state = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state)


def _scale_key(scale: float) -> int:
    return round(scale * 1_000_000)


def _problem(seed: int, n: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid point's logit distribution: ``μ`` ``(n,)`` and ``Σ = scale · A Aᵀ / n`` ``(n, n)``.

    ``μ`` and ``A`` are drawn from a generator seeded from ``(seed, n)`` only, so for a given ``n``
    every scale sees the same mean and the same covariance shape, scaled: the error curves
    against ``scale`` then show the order of the approximation, not a change of problem.
    """
    gen = _generator(seed, n, 0)
    mu = torch.randn(n, generator=gen, dtype=DTYPE)  # (n,)
    A = torch.randn(n, n, generator=gen, dtype=DTYPE)  # (n, n)
    cov = scale * (A @ A.mT) / n
    return mu, 0.5 * (cov + cov.mT)


class _MCMoments(NamedTuple):
    """Monte-Carlo moments of ``a = softmax(S)``."""

    mean: torch.Tensor  # (n,) control-variate estimate of E[a]
    cov: torch.Tensor  # (n, n) plain sample covariance
    stderr: torch.Tensor  # (n,) standard error of ``mean``
    stderr_plain: torch.Tensor  # (n,) standard error of the plain sample mean (for reference)


def _mc_softmax(
    mu: torch.Tensor, cov: torch.Tensor, samples: int, gen: torch.Generator, chunk: int = CHUNK
) -> _MCMoments:
    """Monte-Carlo moments of ``softmax(S)``, ``S ~ N(μ, Σ)``, drawn in chunks of ``chunk``.

    Accumulates float64 sums of ``d = a - p`` and ``d dᵀ`` with ``p = softmax(μ)`` (shifting by a
    constant leaves the moments unchanged and avoids cancellation when the covariance is tiny
    compared with ``E[a] E[a]ᵀ``); the covariance is the plain sample covariance.

    The mean uses the linearisation as a control variate: ``E[a] = p + E[d - J (S - μ)]`` with
    ``J = diag(p) - ppᵀ``, exactly, because ``E[S - μ] = 0``. The estimator is unbiased and
    its noise is the non-linear part of ``a`` only (``O(scale)`` instead of ``O(√scale)``), so the
    small order-1 and order-2 biases at small scales stand out of the noise. The linear term
    has mean zero under both orders, so the control variate favours neither.
    """
    n = mu.shape[-1]
    p = torch.softmax(mu, dim=-1)  # (n,)
    J = torch.diag(p) - p[:, None] * p[None, :]  # (n, n), symmetric
    s1 = torch.zeros(n, dtype=DTYPE)  # Σ d
    s2 = torch.zeros(n, n, dtype=DTYPE)  # Σ d dᵀ
    y1 = torch.zeros(n, dtype=DTYPE)  # Σ y,  y = d - J (S - μ)
    y2 = torch.zeros(n, dtype=DTYPE)  # Σ y²
    done = 0
    while done < samples:
        m = min(chunk, samples - done)
        S = sample_gaussian(mu, cov, m, gen)  # (m, n)
        d = torch.softmax(S, dim=-1) - p  # (m, n)
        y = d - (S - mu) @ J  # (m, n)
        s1 += d.sum(0)
        s2 += d.mT @ d
        y1 += y.sum(0)
        y2 += (y * y).sum(0)
        done += m
    dbar = s1 / samples  # (n,)
    ybar = y1 / samples  # (n,)
    mc_cov = (s2 - samples * dbar[:, None] * dbar[None, :]) / (samples - 1)  # (n, n)
    y_var = (y2 - samples * ybar * ybar) / (samples - 1)  # (n,)
    stderr = (y_var.clamp_min(0.0) / samples).sqrt()
    stderr_plain = (torch.diagonal(mc_cov).clamp_min(0.0) / samples).sqrt()
    return _MCMoments(p + ybar, mc_cov, stderr, stderr_plain)


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def _checks(grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checks (a), (b), (c) on the grid rows."""
    by_key = {(r["n"], r["scale"], r["order"]): r for r in grid}
    small = [(n, s) for n in NS for s in SCALES if s <= SMALL_SCALE]

    # (a) order-2 gain at small scales
    worst: tuple[float, int, float] | None = None
    resolved: list[str] = []
    for n, s in small:
        r1, r2 = by_key[(n, s, 1)], by_key[(n, s, 2)]
        floor = MC_RESOLVED_Z * r2["mean_mc_stderr"]
        if r2["mean_max_abs_err"] < floor:
            resolved.append(f"n={n} scale={s:g}")
        ratio = r1["mean_max_abs_err"] / max(r2["mean_max_abs_err"], floor)
        if worst is None or ratio < worst[0]:
            worst = (ratio, n, s)
    assert worst is not None
    detail_a = (
        f"min over n, scale<={SMALL_SCALE:g} of err1 / max(err2, {MC_RESOLVED_Z:g}·stderr) = {worst[0]:.3g} "
        f"(at n={worst[1]}, scale={worst[2]:g}; need >= {GAIN_MIN:g}). "
    )
    detail_a += (
        f"Order-2 error resolved by MC (below {MC_RESOLVED_Z:g} stderr, compared against {MC_RESOLVED_Z:g}·stderr) "
        f"at {len(resolved)}/{len(small)} points: {', '.join(resolved)}."
        if resolved
        else "Order-2 error above the MC noise floor at every point."
    )
    check_a = {
        "name": "order2_mean_gain_small_scale",
        "passed": bool(worst[0] >= GAIN_MIN),
        "detail": detail_a,
    }

    # (b) covariance at small scales
    cov_rows = [by_key[(n, s, 1)] for n, s in small]
    worst_cov = max(cov_rows, key=lambda r: r["cov_rel_fro_err"])
    check_b = {
        "name": "cov_rel_fro_err_small_scale",
        "passed": bool(all(r["cov_rel_fro_err"] <= COV_REL_MAX for r in cov_rows)),
        "detail": (
            f"max cov relative Frobenius error at scale<={SMALL_SCALE:g} = {worst_cov['cov_rel_fro_err']:.3g} "
            f"(at n={worst_cov['n']}, scale={worst_cov['scale']:g}; need <= {COV_REL_MAX:g})"
        ),
    }

    # (c) rows sum to one
    worst_sum = max(grid, key=lambda r: r["row_sum_err"])
    check_c = {
        "name": "row_sums_to_one",
        "passed": bool(all(r["row_sum_err"] <= ROW_SUM_TOL for r in grid)),
        "detail": (
            f"max |Σ_i E[a_i] - 1| over the grid = {worst_sum['row_sum_err']:.3g} "
            f"(at n={worst_sum['n']}, scale={worst_sum['scale']:g}, order={worst_sum['order']}; "
            f"need <= {ROW_SUM_TOL:g})"
        ),
    }
    return [check_a, check_b, check_c]


def _markdown(result: dict[str, Any], command: str) -> str:
    """The section as markdown: description, command, table of every grid point, checks."""
    cfg = result["config"]
    lines = [
        "## Softmax: Taylor moments vs Monte Carlo",
        "",
        f"Command: `{command}`",
        "",
        f"Logits `S ~ N(μ, Σ)`, `μ ~ N(0, I_n)`, `Σ = scale · A Aᵀ / n` (A standard normal n×n), "
        f"{cfg['samples']:,} Monte-Carlo samples per grid point, seed {cfg['seed']}, {cfg['dtype']}. "
        "Mean error = max_i |E_closed[a_i] − E_mc[a_i]|; z = mean error / max MC stderr; "
        "covariance (first order for both orders) error = ‖Cov_closed − Cov_mc‖_F / ‖Cov_mc‖_F; "
        "gain = order-1 mean error / order-2 mean error.",
        "",
        "| n | scale | order | mean max abs err | MC stderr | z | cov rel Fro err | row-sum err | order-2 gain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["grid"]:
        lines.append(
            f"| {r['n']} | {r['scale']:g} | {r['order']} | {_fmt(r['mean_max_abs_err'], '.3e')} "
            f"| {_fmt(r['mean_mc_stderr'], '.2e')} | {_fmt(r['mean_err_z'], '.2f')} "
            f"| {_fmt(r['cov_rel_fro_err'], '.3e')} | {_fmt(r['row_sum_err'], '.1e')} "
            f"| {_fmt(r.get('order2_gain'), '.3g')} |"
        )
    lines += ["", "Checks:", ""]
    lines += checks_md(result["checks"])
    lines.append("")
    if result.get("figure"):
        lines += [f"![softmax]({result['figure']})", ""]
    return "\n".join(lines)


def _plot(grid: list[dict[str, Any]], path: Path) -> None:
    """Two panels: mean error (and MC stderr, dotted) vs scale; covariance relative error vs scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a bare Figure on the Agg canvas: no pyplot, no global backend switch
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax0, ax1 = fig.subplots(1, 2)
    colors = {n: f"C{i}" for i, n in enumerate(NS)}
    styles = {1: ("-", "o"), 2: ("--", "s")}
    for n in NS:
        for order in ORDERS:
            rows = [r for r in grid if r["n"] == n and r["order"] == order]
            ls, mk = styles[order]
            ax0.plot(
                [r["scale"] for r in rows],
                [max(r["mean_max_abs_err"], 1e-300) for r in rows],
                ls=ls,
                marker=mk,
                color=colors[n],
                label=f"n={n}, order {order}",
            )
        rows = [r for r in grid if r["n"] == n and r["order"] == 1]
        ax0.plot(
            [r["scale"] for r in rows],
            [r["mean_mc_stderr"] for r in rows],
            ls=":",
            color=colors[n],
            label=f"n={n}, MC stderr",
        )
        ax1.plot(
            [r["scale"] for r in rows],
            [r["cov_rel_fro_err"] for r in rows],
            marker="o",
            color=colors[n],
            label=f"n={n}",
        )
    ax0.set(xscale="log", yscale="log", xlabel="covariance scale", ylabel="max_i |E_closed[a_i] − E_mc[a_i]|")
    ax0.set_title("softmax mean error")
    ax0.legend(fontsize=7, ncol=3)
    ax1.axhline(COV_REL_MAX, color="grey", lw=0.8, ls="--", label=f"check (b): {COV_REL_MAX:g}")
    ax1.set(xscale="log", yscale="log", xlabel="covariance scale", ylabel="‖Cov_closed − Cov_mc‖_F / ‖Cov_mc‖_F")
    ax1.set_title("softmax covariance (first order) relative error")
    ax1.legend(fontsize=7)
    for ax in (ax0, ax1):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def softmax_section(
    *,
    quick: bool,
    seed: int,
    out_dir: Path,
    progress: bool = True,
    samples: int | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Tabulate the Taylor softmax approximation error against Monte Carlo; write json/md/png.

    Args:
        quick: use :data:`QUICK_SAMPLES` (2e5) Monte-Carlo samples instead of :data:`FULL_SAMPLES` (1e6).
        seed: base seed; ``μ, A`` are seeded from ``(seed, n)``, the Monte-Carlo draws
            from ``(seed, n, scale)``.
        out_dir: folder for ``softmax.json``, ``softmax.md`` and ``softmax.png`` (created if missing).
        progress: show a tqdm progress bar on stderr.
        samples: override the number of Monte-Carlo samples (e.g. fewer in tests).
        command: the command line recorded in ``softmax.md`` (default: reconstructed from ``sys.argv``).

    Returns:
        The dict written to ``softmax.json``: ``grid`` (one row per ``(n, scale, order)``),
        ``config`` and ``checks`` (list of ``{name, passed, detail}``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_samples = int(samples if samples is not None else (QUICK_SAMPLES if quick else FULL_SAMPLES))
    if n_samples < 2:
        raise ValueError(f"samples must be >= 2, got {n_samples}")
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])

    t0 = time.perf_counter()
    grid: list[dict[str, Any]] = []
    points = [(n, s) for n in NS for s in SCALES]
    for n, scale in tqdm(points, desc="softmax vs MC", disable=not progress, file=sys.stderr):
        mu, cov = _problem(seed, n, scale)  # (n,), (n, n)
        mc = _mc_softmax(mu, cov, n_samples, _generator(seed, n, _scale_key(scale), 1))
        mc_mean, mc_cov = mc.mean, mc.cov  # (n,), (n, n)
        se = float(mc.stderr.max())
        cov_norm = float(torch.linalg.matrix_norm(mc_cov))
        errs: dict[int, float] = {}
        for order in ORDERS:
            a_mean, a_cov = softmax_moments(mu, cov, order)  # (n,), (n, n)
            err = float((a_mean - mc_mean).abs().max())
            errs[order] = err
            row: dict[str, Any] = {
                "n": n,
                "scale": scale,
                "order": order,
                "mean_max_abs_err": err,
                "mean_mc_stderr": se,
                "mean_mc_stderr_plain": float(mc.stderr_plain.max()),
                "mean_err_z": err / se if se > 0 else math.inf,
                "cov_rel_fro_err": float(torch.linalg.matrix_norm(a_cov - mc_cov)) / cov_norm,
                "row_sum_err": float((a_mean.sum() - 1.0).abs()),
            }
            if order == 2:
                row["order2_gain"] = errs[1] / err if err > 0 else math.inf
            grid.append(row)

    result: dict[str, Any] = {
        "grid": grid,
        "config": {
            "samples": n_samples,
            "chunk": CHUNK,
            "seed": seed,
            "quick": quick,
            "dtype": "float64",
            "ns": list(NS),
            "scales": list(SCALES),
            "orders": list(ORDERS),
        },
        "checks": _checks(grid),
    }
    _plot(grid, out_dir / "softmax.png")
    result["figure"] = "softmax.png"
    result["config"]["elapsed_s"] = round(time.perf_counter() - t0, 3)
    (out_dir / "softmax.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "softmax.md").write_text(_markdown(result, command))
    return result
