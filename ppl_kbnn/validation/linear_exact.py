r"""Validation section ``linear_exact``: the Kalman guide on models that are linear in their Bayesian weights.

When the output is linear in the Bayesian weights, the Gaussian posterior is known in closed form and
the guide must reproduce it to rounding error. Every problem streams
:data:`N_UPDATES` samples one at a time through ``KalmanGuide(covariance="block")`` and, after every
update, compares the belief of every Bayesian linear map (mean ``(rows, p)`` and covariance
``(rows, p, p)``, bias last) with an independent reference. Everything is float64.

Problems (:data:`PROBLEMS`):

* ``linear`` — ``nn.Linear(d_in, d_out)`` alone, Bayesian weights and bias, prior ``N(θ̂, s0² I)``,
  ``y = W x + b + ε``, ``ε ~ N(0, r² I)``. Each output row ``n`` has its own independent posterior (the
  prior and the noise are independent across rows), so the per-row block covariance is exact.
* ``transformer head`` — a tiny :class:`~ppl_kbnn.nn.Transformer` (d_model 8, 1 layer, 1 head, 5 tokens)
  with only the head Bayesian (``bayesian="head"``): given the frozen body, ``y`` is linear in the head
  weights with features ``φ(x)`` = the head's input at the last token (read with a forward hook on the
  deterministic network, not through the guide). Hidden mode ``"joint"``.

References:

* without process noise: **conjugate Bayesian linear regression** in batch (precision) form, recomputed
  from all samples seen so far at every step,
  ``Λ_t = I/s0² + Φ_tᵀΦ_t/r²``, ``Σ_t = Λ_t⁻¹``, ``μ_t = Σ_t (θ̂/s0² + Φ_tᵀ y_t/r²)`` (per output row);
* with process noise ``q`` (random walk ``θ_t = θ_{t-1} + N(0, q I)``): the **Kalman filter** in
  covariance form with the Joseph update, ``P⁻ = P + qI``, ``k = P⁻h/(hᵀP⁻h + r²)``,
  ``m = m + k (y - hᵀm)``, ``P = (I - khᵀ) P⁻ (I - khᵀ)ᵀ + r² k kᵀ``, per output row.

Both are written here from the formulas, independently of :mod:`ppl_kbnn.kalman`. The inputs are
``x ~ N(0, I)`` and the targets a random linear function of the features plus noise ``r``; seeds are
derived from ``seed``.

Metrics per problem: ``mean_err`` / ``cov_err`` = the largest absolute difference of any mean / covariance
entry over all ``N_UPDATES`` steps, ``worst_step`` (1-based), ``max_abs_cov`` (the largest covariance entry
seen, for scale) and the per-step trace (for the plot).

Checks: (1) ``conjugate_blr``: every problem without process noise has ``max(mean_err, cov_err) ≤ 1e-10``;
(2) ``kalman_filter``: the same for every problem with process noise.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..guide import KalmanGuide
from ..model import BayesianModel
from ..nn import Transformer, TransformerConfig
from ._md import checks_md

N_UPDATES = 100
TOL = 1e-10
DTYPE = torch.float64


def _spec(net: str, d_in: int, d_out: int, s0: float, r: float, q: float, hidden: str) -> dict[str, Any]:
    return {"net": net, "d_in": d_in, "d_out": d_out, "prior_scale": s0, "obs_noise": r, "process_noise": q,
            "hidden": hidden}  # fmt: skip


PROBLEMS: tuple[dict[str, Any], ...] = (
    _spec("linear", 3, 2, 0.7, 0.3, 0.0, "diag"),
    _spec("linear", 3, 2, 0.7, 0.3, 0.0, "full"),
    _spec("linear", 3, 2, 0.5, 0.2, 0.01, "diag"),
    _spec("linear", 3, 2, 0.5, 0.2, 0.01, "full"),
    _spec("transformer head", 2, 1, 0.3, 0.1, 0.0, "joint"),
    _spec("transformer head", 2, 1, 0.3, 0.1, 0.01, "joint"),
)
"""The problems: (network, sizes, prior std ``s0``, noise std ``r``, process noise ``q``, hidden mode)."""

T_TOKENS = 5  # transformer problems: tokens per sequence


def _generator(*key: int) -> torch.Generator:
    state = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state)


def _problem(spec: dict[str, Any], seed: int, index: int):
    """``(model, x, y, Φ)``: the Bayesian model, the stream, and the features ``Φ`` ``(N, p)`` (bias column last)."""
    gen = _generator(seed, index)
    n = N_UPDATES
    if spec["net"] == "linear":
        net = torch.nn.Linear(spec["d_in"], spec["d_out"]).to(DTYPE)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE))
        model = BayesianModel(net, prior_scale=spec["prior_scale"], obs_noise=spec["obs_noise"])
        x = torch.randn(n, spec["d_in"], generator=gen, dtype=DTYPE)  # (N, d_in)
        feats = x
    else:
        torch.manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))  # module init
        cfg = TransformerConfig(d_in=spec["d_in"], d_out=spec["d_out"], d_model=8, n_layer=1, n_head=1,
                                max_len=T_TOKENS)  # fmt: skip
        net = Transformer(cfg).to(DTYPE).requires_grad_(False)
        model = BayesianModel(net, prior_scale=spec["prior_scale"], obs_noise=spec["obs_noise"], bayesian="head")
        x = torch.randn(n, T_TOKENS, spec["d_in"], generator=gen, dtype=DTYPE)  # (N, T, d_in)
        seen: list[torch.Tensor] = []
        hook = net.head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0][:, -1].detach()))
        try:
            with torch.no_grad():
                net(x)
        finally:
            hook.remove()
        feats = seen[0]  # (N, d_model): the head's input at the last token
    phi = torch.cat([feats, torch.ones(n, 1, dtype=DTYPE)], -1)  # (N, p)
    w_true = torch.randn(spec["d_out"], phi.shape[1], generator=gen, dtype=DTYPE)  # (d_out, p)
    y = phi @ w_true.T + spec["obs_noise"] * torch.randn(n, spec["d_out"], generator=gen, dtype=DTYPE)
    return model, x, y, phi


def _blr(mu0: torch.Tensor, s0: float, r: float, phi: torch.Tensor, y: torch.Tensor):
    """Batch conjugate posterior of every output row: mean ``(rows, p)``, covariance ``(p, p)`` (shared by rows)."""
    p = phi.shape[1]
    prec = torch.eye(p, dtype=DTYPE) / s0**2 + phi.T @ phi / r**2  # (p, p)
    cov = torch.linalg.inv(prec)
    cov = 0.5 * (cov + cov.T)
    mean = (cov @ (mu0.T / s0**2 + phi.T @ y / r**2)).T  # (rows, p)
    return mean, cov.expand(mu0.shape[0], p, p)


def _kf_step(m: torch.Tensor, P: torch.Tensor, h: torch.Tensor, y: torch.Tensor, r: float, q: float):
    """One covariance-form Kalman step (random-walk predict, Joseph update) for every row: m ``(rows, p)``,
    P ``(rows, p, p)``, h ``(p,)``, y ``(rows,)``."""
    p = h.shape[0]
    eye = torch.eye(p, dtype=DTYPE)
    P = P + q * eye  # predict
    Ph = P @ h  # (rows, p)
    s = Ph @ h + r**2  # (rows,)
    k = Ph / s[:, None]  # (rows, p)
    m = m + k * (y - m @ h)[:, None]
    A = eye - k[:, :, None] * h[None, None, :]  # (rows, p, p)
    P = A @ P @ A.mT + r**2 * k[:, :, None] * k[:, None, :]
    return m, 0.5 * (P + P.mT)


def _run(spec: dict[str, Any], seed: int, index: int) -> dict[str, Any]:
    model, x, y, phi = _problem(spec, seed, index)
    guide = KalmanGuide(model, covariance="block", hidden=spec["hidden"], process_noise=spec["process_noise"])
    ((layer, (mu0, cov0)),) = guide.beliefs().items()  # exactly one Bayesian linear map
    mu0, cov0 = mu0.clone(), cov0.clone()
    s0, r, q = spec["prior_scale"], spec["obs_noise"], spec["process_noise"]
    m_kf, P_kf = mu0.clone(), cov0.clone()
    mean_trace, cov_trace = [], []
    max_abs_cov = 0.0
    t0 = time.perf_counter()
    for t in range(N_UPDATES):
        guide.update(x[t : t + 1], y[t : t + 1])
        g_mean, g_cov = guide.beliefs()[layer]
        if q == 0:
            ref_mean, ref_cov = _blr(mu0, s0, r, phi[: t + 1], y[: t + 1])
        else:
            m_kf, P_kf = _kf_step(m_kf, P_kf, phi[t], y[t], r, q)
            ref_mean, ref_cov = m_kf, P_kf
        mean_trace.append(float((g_mean - ref_mean).abs().max()))
        cov_trace.append(float((g_cov - ref_cov).abs().max()))
        max_abs_cov = max(max_abs_cov, float(ref_cov.abs().max()))
    seconds = time.perf_counter() - t0
    worst = [max(a, b) for a, b in zip(mean_trace, cov_trace, strict=True)]
    return {
        **spec,
        "label": _label(spec),
        "layer": layer,
        "reference": "conjugate BLR" if q == 0 else "Kalman filter",
        "n_updates": N_UPDATES,
        "p": int(phi.shape[1]),
        "mean_err": max(mean_trace),
        "cov_err": max(cov_trace),
        "max_err": max(worst),
        "worst_step": int(np.argmax(worst)) + 1,
        "max_abs_cov": max_abs_cov,
        "final_cov_shrink": float(torch.diagonal(ref_cov, dim1=-2, dim2=-1).max() / (s0**2)),
        "seconds": seconds,
        "trace": {"mean_err": mean_trace, "cov_err": cov_trace},
    }


def _label(spec: dict[str, Any]) -> str:
    q = spec["process_noise"]
    return f"{spec['net']} {spec['d_in']}→{spec['d_out']}, hidden {spec['hidden']}" + (f", q={q:g}" if q else "")


def _checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for name, ref, keep in (("conjugate_blr", "conjugate BLR", lambda r: r["process_noise"] == 0),
                            ("kalman_filter", "exact Kalman filter", lambda r: r["process_noise"] > 0)):  # fmt: skip
        sel = [r for r in rows if keep(r)]
        worst = max(sel, key=lambda r: r["max_err"])
        checks.append({
            "name": name,
            "passed": bool(all(r["max_err"] <= TOL for r in sel)),
            "detail": (
                f"max abs error of the block belief (mean and covariance) vs the {ref} over {N_UPDATES} updates, "
                f"{len(sel)} problems: {worst['max_err']:.3g} (at {worst['label']}, step {worst['worst_step']}; "
                f"need <= {TOL:g})"
            ),
        })  # fmt: skip
    return checks


def _markdown(result: dict[str, Any], command: str) -> str:
    cfg = result["config"]
    lines = [
        "## Linear-exact: Kalman guide vs conjugate Bayesian linear regression and the Kalman filter",
        "",
        f"Command: `{command}`",
        "",
        f'Models linear in their Bayesian weights, `KalmanGuide(covariance="block")`, {cfg["n_updates"]} updates '
        f"one sample at a time, seed {cfg['seed']}, {cfg['dtype']}. Error = largest |guide − reference| of any "
        "mean / covariance entry over all steps. Reference without process noise: batch conjugate BLR on all "
        "samples so far; with process noise q: covariance-form Kalman filter (Joseph update). "
        "Transformer head: only the head Bayesian, features read from the frozen body.",
        "",
        "| problem | p | s0 | r | q | reference | mean err | cov err | worst step | max \\|cov\\| | final var / s0² |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['p']} | {r['prior_scale']:g} | {r['obs_noise']:g} | {r['process_noise']:g} "
            f"| {r['reference']} | {r['mean_err']:.2e} | {r['cov_err']:.2e} | {r['worst_step']} "
            f"| {r['max_abs_cov']:.3g} | {r['final_cov_shrink']:.3g} |"
        )
    lines += ["", "Checks:", ""]
    lines += checks_md(result["checks"])
    lines.append("")
    if result.get("figure"):
        lines += [f"![linear_exact]({result['figure']})", ""]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Max abs error of the mean (solid) and covariance (dashed) after each update, per problem."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = np.arange(1, N_UPDATES + 1)
    for i, r in enumerate(rows):
        for key, ls in (("mean_err", "-"), ("cov_err", "--")):
            vals = np.maximum(np.asarray(r["trace"][key]), 1e-18)  # exact zeros drawn at the floor
            ax.plot(steps, vals, ls=ls, color=f"C{i}", lw=1, label=f"{r['label']} ({key.split('_')[0]})")
    ax.axhline(TOL, color="grey", lw=0.8, ls=":", label=f"check: {TOL:g}")
    ax.set(yscale="log", xlabel="update", ylabel="max |guide − exact|", ylim=(1e-18, 1e-8))
    ax.set_title("Kalman guide vs exact posterior, linear-in-weights models (float64)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def linear_exact_section(
    *,
    quick: bool,
    seed: int,
    out_dir: Path,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Compare the guide with the exact posterior on every problem of :data:`PROBLEMS`; write json/md/png.

    Args:
        quick: recorded only (the section takes a few seconds; quick and full runs are identical).
        seed: base seed of the networks and streams.
        out_dir: folder for ``linear_exact.json``, ``linear_exact.md`` and ``linear_exact.png``.
        progress: show a tqdm progress bar on stderr.
        command: the command line recorded in ``linear_exact.md`` (default: from ``sys.argv``).

    Returns:
        The dict written to ``linear_exact.json``: ``rows`` (one per problem, with the per-step ``trace``),
        ``config`` and ``checks``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    t0 = time.perf_counter()
    rows = [
        _run(spec, seed, i)
        for i, spec in enumerate(tqdm(PROBLEMS, desc="linear exact", disable=not progress, file=sys.stderr))
    ]
    result: dict[str, Any] = {
        "rows": rows,
        "config": {
            "seed": seed,
            "quick": quick,
            "dtype": "float64",
            "n_updates": N_UPDATES,
            "tol": TOL,
            "covariance": "block",
        },  # fmt: skip
        "checks": _checks(rows),
    }
    _plot(rows, out_dir / "linear_exact.png")
    result["figure"] = "linear_exact.png"
    result["config"]["elapsed_s"] = round(time.perf_counter() - t0, 3)
    (out_dir / "linear_exact.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "linear_exact.md").write_text(_markdown(result, command))
    return result
