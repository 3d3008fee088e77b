r"""Validation section ``network_moments``: the closed-form predictive of whole transformers vs Monte Carlo.

For each small random transformer of :data:`~ppl_kbnn.validation.network.CASES` (d_model 8–16, 1–2 layers,
1–2 heads, up to 12 tokens, ReLU/GELU, one decision transformer), each prior scale, each weight-covariance
kind (``block``/``diag``) and each belief — the prior (0 updates) and the belief after 50 Kalman updates
on a teacher stream — the closed-form predictive mean and std of every observed output of 4 test inputs,
in every hidden-state mode (``diag``, ``token``, ``feature``, ``joint``), is compared with weight draws from
the same belief pushed through the deterministic network (:func:`network_moments_rows`, shared with
``tests/test_kbt.py``). Everything is float64.

Metrics per (case, scale, updates, covariance, mode): ``mean_err`` = the largest ``|mean_closed − mean_mc|``
over the outputs in units of the Monte-Carlo std; ``std_ratio_min`` / ``std_ratio_max`` = the range of
``std_closed / std_mc`` (the closed-form std without the observation noise); ``std_ratio_mc_se`` =
``1/√(2(n−1))``, the Monte-Carlo standard error of a std ratio; ``seconds`` = closed-form predict time.

Checks: for the ``"joint"`` mode, at every prior scale ≤ 0.05, every case,
both covariance kinds, 0 and 50 updates: (1) ``mean_err ≤ 0.2``; (2) std ratio in ``[0.8, 1.25]``.
The other modes and prior scale 0.1 are reported, not checked.
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

from ..propagate import MODES
from .network import CASES, network_moments_rows

FULL = {"cases": CASES, "scales": (0.01, 0.05, 0.1), "n_updates": (0, 50), "w_kinds": ("block", "diag"),
        "n_draws": 4000}  # fmt: skip
QUICK = {"cases": (CASES[0], CASES[3]), "scales": (0.01, 0.05, 0.1), "n_updates": (0, 50), "w_kinds": ("block",),
         "n_draws": 2000}  # fmt: skip

CHECK_MODE = "joint"
CHECK_SCALE_MAX = 0.05
MEAN_ERR_MAX = 0.2
STD_RATIO_RANGE = (0.8, 1.25)


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (prior scale, updates, covariance, mode): worst values over the cases."""
    keys = sorted({(r["prior_scale"], r["updates"], r["covariance"], r["mode"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], MODES.index(k[3])))  # fmt: skip
    out = []
    for scale, n, cov, mode in keys:
        sel = [r for r in rows if (r["prior_scale"], r["updates"], r["covariance"], r["mode"]) == (scale, n, cov, mode)]
        worst = max(sel, key=lambda r: r["mean_err"])
        out.append({
            "prior_scale": scale, "updates": n, "covariance": cov, "mode": mode, "n_cases": len(sel),
            "mean_err_max": worst["mean_err"], "mean_err_case": worst["case"],
            "std_ratio_min": min(r["std_ratio_min"] for r in sel),
            "std_ratio_max": max(r["std_ratio_max"] for r in sel),
            "seconds_mean": sum(r["seconds"] for r in sel) / len(sel),
        })  # fmt: skip
    return out


def _checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sel = [r for r in rows if r["mode"] == CHECK_MODE and r["prior_scale"] <= CHECK_SCALE_MAX]
    where = f"mode {CHECK_MODE!r}, prior scale <= {CHECK_SCALE_MAX:g}, {len(sel)} (case, scale, covariance, updates)"
    worst_mean = max(sel, key=lambda r: r["mean_err"])
    lo = min(sel, key=lambda r: r["std_ratio_min"])
    hi = max(sel, key=lambda r: r["std_ratio_max"])

    def at(r: dict[str, Any]) -> str:
        return f"{r['case']}, scale {r['prior_scale']:g}, {r['covariance']}, {r['updates']} updates"

    return [
        {
            "name": "joint_mean_err",
            "passed": bool(all(r["mean_err"] <= MEAN_ERR_MAX for r in sel)),
            "detail": f"{where}: max mean error = {worst_mean['mean_err']:.3g} MC std (at {at(worst_mean)}; "
            f"need <= {MEAN_ERR_MAX:g})",
        },
        {
            "name": "joint_std_ratio",
            "passed": bool(
                all(STD_RATIO_RANGE[0] <= r["std_ratio_min"] and r["std_ratio_max"] <= STD_RATIO_RANGE[1] for r in sel)
            ),  # fmt: skip
            "detail": f"{where}: std ratio closed/MC in [{lo['std_ratio_min']:.3f} (at {at(lo)}), "
            f"{hi['std_ratio_max']:.3f} (at {at(hi)})] (need within [{STD_RATIO_RANGE[0]:g}, {STD_RATIO_RANGE[1]:g}]; "
            f"MC standard error of a ratio {sel[0]['std_ratio_mc_se']:.3f})",
        },
    ]


def _markdown(result: dict[str, Any], command: str) -> str:
    cfg = result["config"]
    lines = [
        "## Network moments: closed-form transformer predictive vs Monte Carlo",
        "",
        f"Command: `{command}`",
        "",
        f"{len(cfg['cases'])} random transformers ({'; '.join(cfg['cases'])}), 4 test inputs each, prior scales "
        f"{', '.join(f'{s:g}' for s in cfg['scales'])}, weight covariance {' and '.join(cfg['w_kinds'])}, the prior "
        f"and the belief after {max(cfg['n_updates'])} Kalman updates (hidden mode joint) on a teacher stream; "
        f"{cfg['n_draws']:,} weight draws per belief pushed through the deterministic network; seed {cfg['seed']}, "
        f"float64. Mean error = max over outputs |mean_closed − mean_MC| / std_MC; std ratio = "
        f"std_closed / std_MC (without observation noise), MC standard error of a ratio "
        f"{cfg['std_ratio_mc_se']:.3f}. Worst values over the cases:",
        "",
        "| prior scale | updates | covariance | mode | max mean err (MC std) | at case | std ratio min "
        "| std ratio max | predict s |",
        "|---:|---:|---|---|---:|---|---:|---:|---:|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['prior_scale']:g} | {s['updates']} | {s['covariance']} | {s['mode']} | {s['mean_err_max']:.3f} "
            f"| {s['mean_err_case']} | {s['std_ratio_min']:.3f} | {s['std_ratio_max']:.3f} | {s['seconds_mean']:.3f} |"
        )
    lines += [
        "",
        "<details><summary>Every case</summary>",
        "",
        "| case | prior scale | updates | covariance | mode | mean err | std ratio min | std ratio max | predict s |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['case']} | {r['prior_scale']:g} | {r['updates']} | {r['covariance']} | {r['mode']} "
            f"| {r['mean_err']:.3f} | {r['std_ratio_min']:.3f} | {r['std_ratio_max']:.3f} | {r['seconds']:.3f} |"
        )
    lines += ["", "</details>", "", "Checks:", ""]
    for c in result["checks"]:
        lines.append(f"- **{'PASS' if c['passed'] else 'FAIL'}** `{c['name']}`: {c['detail']}")
    lines.append("")
    if result.get("figure"):
        lines += [f"![network_moments]({result['figure']})", ""]
    return "\n".join(lines)


def _plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Three panels against the prior scale, one colour per mode, solid: prior, dashed: after updates;
    worst over cases and covariance kinds: max mean error, largest std ratio, smallest std ratio."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    updates = sorted({s["updates"] for s in summary})
    styles = ["-", "--", ":", "-."]
    for mi, mode in enumerate(MODES):
        for ui, n in enumerate(updates):
            sel = [s for s in summary if s["mode"] == mode and s["updates"] == n]
            scales = sorted({s["prior_scale"] for s in sel})
            if not scales:
                continue
            pick = {
                "mean_err_max": [max(s["mean_err_max"] for s in sel if s["prior_scale"] == x) for x in scales],
                "std_ratio_max": [max(s["std_ratio_max"] for s in sel if s["prior_scale"] == x) for x in scales],
                "std_ratio_min": [min(s["std_ratio_min"] for s in sel if s["prior_scale"] == x) for x in scales],
            }
            for ax, key in zip(axes, pick, strict=True):
                ax.plot(scales, pick[key], ls=styles[ui % 4], marker="o", color=f"C{mi}",
                        label=f"{mode}, {n} updates")  # fmt: skip
    axes[0].axhline(MEAN_ERR_MAX, color="grey", lw=0.8, ls="--", label=f"check (joint): {MEAN_ERR_MAX:g}")
    axes[0].set(ylabel="max |mean_closed − mean_MC| / std_MC", title="predictive mean error")
    axes[1].axhline(STD_RATIO_RANGE[1], color="grey", lw=0.8, ls="--", label=f"check (joint): {STD_RATIO_RANGE[1]:g}")
    axes[1].set(ylabel="max std_closed / std_MC", title="largest std ratio")
    axes[2].axhline(STD_RATIO_RANGE[0], color="grey", lw=0.8, ls="--", label=f"check (joint): {STD_RATIO_RANGE[0]:g}")
    axes[2].set(ylabel="min std_closed / std_MC", title="smallest std ratio")
    for ax in axes:
        ax.axvline(CHECK_SCALE_MAX, color="grey", lw=0.6, ls=":")
        ax.set(xscale="log", xlabel="prior scale")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def network_section(
    *,
    quick: bool,
    seed: int,
    out_dir: Path,
    progress: bool = True,
    command: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tabulate the whole-network closed-form moments against Monte Carlo; write json/md/png.

    Args:
        quick: use :data:`QUICK` (two cases, ReLU and GELU, block covariance, 2000 draws) instead of :data:`FULL`
            (every case, block and diag, 4000 draws).
        seed: base seed (case ``i`` is built from ``seed + i``).
        out_dir: folder for ``network_moments.json``, ``network_moments.md`` and ``network_moments.png``.
        progress: show a tqdm progress bar on stderr.
        command: the command line recorded in the markdown (default: from ``sys.argv``).
        settings: override entries of the chosen settings (``cases``, ``scales``, ``n_updates``, ``w_kinds``,
            ``n_draws``), e.g. fewer in tests.

    Returns:
        The dict written to ``network_moments.json``: ``rows`` (every case), ``summary`` (worst over the cases
        per prior scale, updates, covariance, mode), ``config`` and ``checks``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    cfg = {**(QUICK if quick else FULL), **(settings or {})}
    t0 = time.perf_counter()
    total = len(cfg["cases"]) * len(cfg["scales"]) * len(cfg["w_kinds"]) * len(cfg["n_updates"])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # make_case builds its networks in the default dtype
    try:
        with tqdm(total=total, desc="network moments vs MC", disable=not progress, file=sys.stderr) as bar:

            def step(msg: str) -> None:
                bar.set_postfix_str(msg)
                bar.update(1)

            rows = network_moments_rows(cfg["cases"], scales=tuple(cfg["scales"]), n_updates=tuple(cfg["n_updates"]),
                                        modes=MODES, w_kinds=tuple(cfg["w_kinds"]), n_draws=cfg["n_draws"], seed=seed,
                                        progress=step)  # fmt: skip
    finally:
        torch.set_default_dtype(old)
    summary = _summary(rows)
    result: dict[str, Any] = {
        "rows": rows,
        "summary": summary,
        "config": {
            "cases": [c.label for c in cfg["cases"]],
            "scales": list(cfg["scales"]),
            "n_updates": list(cfg["n_updates"]),
            "w_kinds": list(cfg["w_kinds"]),
            "modes": list(MODES),
            "n_draws": cfg["n_draws"],
            "std_ratio_mc_se": (2 * (cfg["n_draws"] - 1)) ** -0.5,
            "obs_noise": 0.05,
            "n_inputs": 4,
            "seed": seed,
            "quick": quick,
            "dtype": "float64",
        },  # fmt: skip
        "checks": _checks(rows),
    }
    _plot(summary, out_dir / "network_moments.png")
    result["figure"] = "network_moments.png"
    result["config"]["elapsed_s"] = round(time.perf_counter() - t0, 3)
    (out_dir / "network_moments.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "network_moments.md").write_text(_markdown(result, command))
    return result
