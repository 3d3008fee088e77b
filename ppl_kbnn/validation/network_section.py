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

**float32** (:func:`float32_rows`): the same comparison with the model, the guide and the inputs moved to float32
(``model.float()``; the updates and the ``"joint"`` predictive run in float32) for the cases and prior scales of
``float32_cases`` / ``float32_scales`` (block covariance), against the same Monte-Carlo draws as the float64 row.
Checks: (3) the float32 rows pass (1) and (2); (4) the float32 predictive mean and std are within ``1e-5``
relative of the float64 ones.
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..guide import KalmanGuide
from ..mc import network_samples
from ..model import BayesianModel
from ..propagate import MODES
from ._md import checks_md
from .network import CASES, NetCase, make_case, network_moments_rows

FULL = {"cases": CASES, "scales": (0.01, 0.05, 0.1), "n_updates": (0, 50), "w_kinds": ("block", "diag"),
        "n_draws": 4000, "float32_cases": tuple(range(len(CASES))), "float32_scales": (0.01, 0.05)}  # fmt: skip
QUICK = {"cases": (CASES[0], CASES[3]), "scales": (0.01, 0.05, 0.1), "n_updates": (0, 50), "w_kinds": ("block",),
         "n_draws": 2000, "float32_cases": (0,), "float32_scales": (0.05,)}  # fmt: skip
"""``float32_cases``: indices into ``cases`` (each case keeps its seed ``seed + index``, as in the float64 rows)."""

CHECK_MODE = "joint"
CHECK_SCALE_MAX = 0.05
MEAN_ERR_MAX = 0.2
STD_RATIO_RANGE = (0.8, 1.25)
FLOAT32_TOL = 1e-5
"""Largest relative difference of the float32 closed-form predictive (mean, std) from the float64 one."""


def _f32(x):
    """A float64 input (tensor or dict of tensors) in float32."""
    if isinstance(x, dict):
        return {k: v.float() if v.is_floating_point() else v for k, v in x.items()}
    return x.float()


def float32_rows(
    cases: tuple[NetCase, ...],
    indices: tuple[int, ...],
    scales: tuple[float, ...],
    n_updates: tuple[int, ...] = (0, 50),
    n_draws: int = 2000,
    seed: int = 0,
    progress=None,
) -> list[dict[str, Any]]:
    """The whole-network comparison of :func:`~ppl_kbnn.validation.network.network_moments_rows` in float32.

    For case ``cases[i]`` (``i`` in ``indices``; built from ``seed + i`` in float64, as there) and each prior scale:
    a float64 model and a float32 copy (``model.float()``), block-covariance guides (hidden ``"token"``) updated on
    the same stream (the float32 one in float32), then the ``"joint"`` predictive of the test inputs (float32
    inputs for the float32 guide). Monte-Carlo reference: ``n_draws`` draws of the float64 belief with the float64
    rows' generator seed (the same draws as there). One row per (case, scale, updates), with the keys of the float64
    rows, ``dtype = "float32"``, and ``rel_mean_diff`` / ``rel_std_diff``: the largest relative difference of the
    float32 predictive mean (relative to the largest ``|mean|``) and std from the float64 ones.
    """
    rows = []
    for ci in indices:
        case = cases[ci]
        net, x_test, x_stream, y_stream = make_case(case, seed + ci)  # float64 (the caller's default dtype)
        x_test32, x_stream32, y_stream32 = _f32(x_test), _f32(x_stream), y_stream.float()
        for scale in scales:
            model = BayesianModel(net, prior_scale=scale, obs_noise=0.05)
            model32 = copy.deepcopy(model).float()
            guides = {"64": KalmanGuide(model, covariance="block", hidden="token"),
                      "32": KalmanGuide(model32, covariance="block", hidden="token")}  # fmt: skip
            done = 0
            for n in sorted(n_updates):
                if n > done:
                    for key, xs, ys in (("64", x_stream, y_stream), ("32", x_stream32, y_stream32)):
                        xs = {k: v[done:n] for k, v in xs.items()} if case.dt else xs[done:n]
                        guides[key].update(xs, ys[done:n])
                    done = n
                gen = torch.Generator().manual_seed(seed + 1000 * ci + n)
                ys_mc, _ = network_samples(net, guides["64"].beliefs(), x_test, n_draws, gen)
                mc_mean, mc_std = ys_mc.mean(0), ys_mc.std(0)
                mean64, var64 = KalmanGuide(model, covariance="block", hidden=CHECK_MODE).load_beliefs(
                    guides["64"]).predict(x_test)  # fmt: skip
                g = KalmanGuide(model32, covariance="block", hidden=CHECK_MODE).load_beliefs(guides["32"])
                t0 = time.perf_counter()
                mean, var = g.predict(x_test32)
                seconds = time.perf_counter() - t0
                std = (var.double() - model.obs_noise**2).clamp_min(0).sqrt()
                std64 = (var64 - model.obs_noise**2).clamp_min(0).sqrt()
                ratio = std / mc_std
                rows.append({
                    "case": case.label, "prior_scale": scale, "updates": n, "covariance": "block",
                    "mode": CHECK_MODE, "dtype": "float32",
                    "mean_err": float(((mean.double() - mc_mean).abs() / mc_std).max()),
                    "std_ratio_min": float(ratio.min()), "std_ratio_max": float(ratio.max()),
                    "std_ratio_mc_se": (2 * (n_draws - 1)) ** -0.5, "n_draws": n_draws, "seconds": seconds,
                    "rel_mean_diff": float((mean.double() - mean64).abs().max() / mean64.abs().max()),
                    "rel_std_diff": float(((std - std64).abs() / std64).max()),
                })  # fmt: skip
                if progress is not None:
                    progress(f"float32 {case.label} scale {scale} n={n}")
    return rows


def _beside_float64(f32: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each float32 row with the float64 row of the same (case, scale, updates, covariance, mode) beside it."""
    key = ("case", "prior_scale", "updates", "covariance", "mode")
    by = {tuple(r[k] for k in key): r for r in rows}
    return [{**r, **{f"{m}_float64": by[tuple(r[k] for k in key)][m]
                     for m in ("mean_err", "std_ratio_min", "std_ratio_max")}} for r in f32]  # fmt: skip


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


def _checks(rows: list[dict[str, Any]], f32: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    sel = [r for r in rows if r["mode"] == CHECK_MODE and r["prior_scale"] <= CHECK_SCALE_MAX]
    where = f"mode {CHECK_MODE!r}, prior scale <= {CHECK_SCALE_MAX:g}, {len(sel)} (case, scale, covariance, updates)"
    worst_mean = max(sel, key=lambda r: r["mean_err"])
    lo = min(sel, key=lambda r: r["std_ratio_min"])
    hi = max(sel, key=lambda r: r["std_ratio_max"])

    def at(r: dict[str, Any]) -> str:
        return f"{r['case']}, scale {r['prior_scale']:g}, {r['covariance']}, {r['updates']} updates"

    checks = [
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
    if f32:
        err = max(f32, key=lambda r: r["mean_err"])
        lo, hi = min(r["std_ratio_min"] for r in f32), max(r["std_ratio_max"] for r in f32)
        diff = max(f32, key=lambda r: max(r["rel_mean_diff"], r["rel_std_diff"]))
        worst = max(diff["rel_mean_diff"], diff["rel_std_diff"])
        checks += [
            {
                "name": "float32_vs_mc",
                "passed": bool(err["mean_err"] <= MEAN_ERR_MAX and STD_RATIO_RANGE[0] <= lo
                               and hi <= STD_RATIO_RANGE[1]),  # fmt: skip
                "detail": f"float32, mode {CHECK_MODE!r}, {len(f32)} (case, scale, updates): max mean error = "
                f"{err['mean_err']:.3g} MC std (float64: {err['mean_err_float64']:.3g}; need <= {MEAN_ERR_MAX:g}), "
                f"std ratio in [{lo:.3f}, {hi:.3f}] (need within [{STD_RATIO_RANGE[0]:g}, {STD_RATIO_RANGE[1]:g}])",
            },
            {
                "name": "float32_vs_float64",
                "passed": bool(worst <= FLOAT32_TOL),
                "detail": f"largest relative difference of the float32 predictive mean / std from float64's = "
                f"{worst:.2g} (at {at(diff)}; need <= {FLOAT32_TOL:g})",
            },
        ]
    return checks


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
    lines += ["", "</details>", ""]
    f32 = result.get("float32", {}).get("rows", [])
    if f32:
        lines += [
            "**float32.** The same comparison with the model, guide and inputs in float32 (`model.float()`; updates "
            "and the joint predictive in float32), block covariance, against the same Monte-Carlo draws; the "
            "float64 row's values beside, and the relative difference of the float32 predictive from float64's:",
            "",
            "| case | prior scale | updates | mean err f32 | mean err f64 | std ratio f32 | std ratio f64 "
            "| rel. diff mean | rel. diff std | predict s |",
            "|---|---:|---:|---:|---:|---|---|---:|---:|---:|",
        ]
        for r in f32:
            lines.append(
                f"| {r['case']} | {r['prior_scale']:g} | {r['updates']} | {r['mean_err']:.4f} "
                f"| {r['mean_err_float64']:.4f} | [{r['std_ratio_min']:.4f}, {r['std_ratio_max']:.4f}] "
                f"| [{r['std_ratio_min_float64']:.4f}, {r['std_ratio_max_float64']:.4f}] | {r['rel_mean_diff']:.1e} "
                f"| {r['rel_std_diff']:.1e} | {r['seconds']:.3f} |"
            )
        lines.append("")
    lines += ["Checks:", ""]
    lines += checks_md(result["checks"])
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
        quick: use :data:`QUICK` (two cases, ReLU and GELU, block covariance, 2000 draws; float32 on the first
            case at prior scale 0.05) instead of :data:`FULL` (every case, block and diag, 4000 draws; float32 on
            every case at prior scales 0.01 and 0.05).
        seed: base seed (case ``i`` is built from ``seed + i``).
        out_dir: folder for ``network_moments.json``, ``network_moments.md`` and ``network_moments.png``.
        progress: show a tqdm progress bar on stderr.
        command: the command line recorded in the markdown (default: from ``sys.argv``).
        settings: override entries of the chosen settings (``cases``, ``scales``, ``n_updates``, ``w_kinds``,
            ``n_draws``, ``float32_cases``, ``float32_scales``), e.g. fewer in tests.

    Returns:
        The dict written to ``network_moments.json``: ``rows`` (every case), ``summary`` (worst over the cases
        per prior scale, updates, covariance, mode), ``float32`` (``rows``: :func:`float32_rows` with the float64
        values beside, ``tolerance``), ``config`` and ``checks``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    cfg = {**(QUICK if quick else FULL), **(settings or {})}
    t0 = time.perf_counter()
    total = len(cfg["cases"]) * len(cfg["scales"]) * len(cfg["w_kinds"]) * len(cfg["n_updates"])
    total += len(cfg["float32_cases"]) * len(cfg["float32_scales"]) * len(cfg["n_updates"])
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
            f32 = float32_rows(cfg["cases"], tuple(cfg["float32_cases"]), tuple(cfg["float32_scales"]),
                               tuple(cfg["n_updates"]), cfg["n_draws"], seed, progress=step)  # fmt: skip
    finally:
        torch.set_default_dtype(old)
    summary = _summary(rows)
    f32 = _beside_float64(f32, rows)
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
            "float32_cases": [cfg["cases"][i].label for i in cfg["float32_cases"]],
            "float32_scales": list(cfg["float32_scales"]),
        },  # fmt: skip
        "float32": {"rows": f32, "tolerance": FLOAT32_TOL},
        "checks": _checks(rows, f32),
    }
    _plot(summary, out_dir / "network_moments.png")
    result["figure"] = "network_moments.png"
    result["config"]["elapsed_s"] = round(time.perf_counter() - t0, 3)
    (out_dir / "network_moments.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "network_moments.md").write_text(_markdown(result, command))
    return result
