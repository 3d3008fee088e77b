"""Tables (``results.md``) and figures (PNGs) of the pendulum study, from the results dict alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["FIGURES", "SMOKE_TEST", "write_figures", "write_markdown"]

SMOKE_TEST = "SMOKE TEST (--quick): not a result"
"""The banner of every ``--quick`` output (console, ``results.md``, figures): a quick run only shows the pipeline
runs end to end; its few episodes and samples say nothing about the methods."""

FIGURES = {
    "pretrain_loss": "pretrain_loss.png",
    "success_vs_samples": "success_vs_samples.png",
    "success_vs_memory": "success_vs_memory.png",
    "time_per_sample": "time_per_sample.png",
    "uncertainty": "uncertainty.png",
}

_LABELS = {
    "none": "no adaptation",
    "kbt_block": "KBT block",
    "kbt_diag": "KBT diag",
    "retrain_all": "retrain, all data",
}


def label(name: str) -> str:
    """Display name of a method key (``retrain_M23`` -> ``retrain, M=23``)."""
    if name in _LABELS:
        return _LABELS[name]
    if name.startswith("retrain_M"):
        return f"retrain, M={name[len('retrain_M') :]}"
    return name


def _rate(c: dict[str, Any]) -> str:
    lo, hi = c["interval"]
    return f"{c['successes']}/{c['n']} [{lo:.2f}, {hi:.2f}]"


def _bytes(b: int | None) -> str:
    if b is None:
        return "—"
    if b < 1024:
        return f"{b} B"
    if b < 1024**2:
        return f"{b / 1024:.1f} KiB"
    return f"{b / 1024**2:.2f} MiB"


def _save(fig: Any, path: Path, results: dict[str, Any]) -> None:
    """``tight_layout`` and save; a quick run's figure gets the :data:`SMOKE_TEST` banner across the top."""
    if results.get("quick"):
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        fig.text(0.5, 0.985, SMOKE_TEST, ha="center", va="top", color="firebrick", fontsize=11, fontweight="bold")
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)


def _style(name: str, i: int) -> dict[str, Any]:
    if name == "none":
        return {"color": "0.4", "ls": ":", "marker": "x"}
    if name.startswith("kbt"):
        return {"color": "C3" if name == "kbt_block" else "C1", "ls": "-", "marker": "o", "lw": 2}
    if name == "retrain_all":
        return {"color": "k", "ls": "--", "marker": "s"}
    return {"color": ("C0", "C2", "C4", "C9", "C6", "C8")[i % 6], "ls": "--", "marker": "^"}


def _legend(ax: Any, **kwargs: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


# ---------------------------------------------------------------------------------------------
# figures


def write_figures(out: Path, results: dict[str, Any]) -> dict[str, str]:
    """Write the PNGs the results support (all five after a complete run); returns ``{key: file name}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}

    curve_file = out / "pretrained.json"
    if curve_file.exists():
        losses = json.loads(curve_file.read_text())["loss_curve"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(losses) + 1), losses, lw=0.7)
        ax.set(xlabel="AdamW step", ylabel="MSE (normalised actions)", yscale="log",
               title="pre-training on nominal expert data")  # fmt: skip
        _save(fig, out / FIGURES["pretrain_loss"], results)
        plt.close(fig)
        written["pretrain_loss"] = FIGURES["pretrain_loss"]

    methods = results.get("methods")
    if methods:
        task = results["stream"]["task"]
        checkpoints = results["stream"]["checkpoints"]
        pos = {n: j for j, n in enumerate(checkpoints)}  # evenly spaced checkpoints (they grow geometrically)
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        k = len(methods)
        for i, (name, m) in enumerate(methods.items()):
            cps = m["checkpoints"]
            if not cps:
                continue
            x = [pos[c["n_samples"]] + 0.12 * (i - (k - 1) / 2) / max(1, k - 1) for c in cps]  # small dodge
            p = [c["successes"] / c["n"] for c in cps]
            st = _style(name, i)
            ax.plot(x, p, label=label(name), **st)
            ax.fill_between(x, [c["interval"][0] for c in cps], [c["interval"][1] for c in cps],
                            color=st["color"], alpha=0.05)  # fmt: skip
            ax2.plot(x, [c["mean_length"] for c in cps], label=label(name), **st)
        for a in (ax, ax2):
            a.set_xticks(range(len(checkpoints)), [str(n) for n in checkpoints])
            a.set_xlabel("streamed shifted-task samples n")
        n_eval = results["settings"]["n_eval"]
        ax.set(ylabel=f"success rate over {n_eval} episodes (Wilson 95 % band)", ylim=(-0.03, 1.03),
               title=f"adaptation to {task}")  # fmt: skip
        steps = results["settings"]["episode_steps"]
        ax2.set(ylabel="mean episode length (steps)", yscale="log", ylim=(None, steps * 1.3),
                title=f"episode length (success = {steps} steps)")  # fmt: skip
        ax2.axhline(steps, color="0.7", lw=0.8)
        _legend(ax, fontsize=8, loc="upper left")
        _save(fig, out / FIGURES["success_vs_samples"], results)
        plt.close(fig)
        written["success_vs_samples"] = FIGURES["success_vs_samples"]

        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        n_last = results["stream"]["checkpoints"][-1]
        for i, (name, m) in enumerate(methods.items()):
            cps = [c for c in m["checkpoints"] if c["n_samples"] == n_last]
            if not cps:
                continue
            c = cps[0]
            p = c["successes"] / c["n"]
            st = _style(name, i)
            if name == "none":
                ax.axhline(p, color=st["color"], ls=":", label=f"{label(name)} (0 B)")
                continue
            yerr = [[p - c["interval"][0]], [c["interval"][1] - p]]
            ax.errorbar([c["state_bytes"]], [p], yerr=yerr, color=st["color"], marker=st["marker"], ms=8, capsize=3,
                        ls="none", label=label(name))  # fmt: skip
        mem = results["memory"]
        for key, txt in (("kbt_diag_belief_bytes", "KBT diag"), ("kbt_block_belief_bytes", "KBT block")):
            ax.axvline(mem[key], color="0.7", lw=0.8)
            ax.text(mem[key], 1.04, txt, fontsize=7, ha="center", va="bottom", color="0.4")
        ax.set(xscale="log", xlabel=f"state beyond the pre-trained weights after n={n_last} (bytes)",
               ylabel="success rate (Wilson 95 %)", ylim=(-0.03, 1.1), title="success vs memory")  # fmt: skip
        _legend(ax, fontsize=8, loc="center left")
        _save(fig, out / FIGURES["success_vs_memory"], results)
        plt.close(fig)
        written["success_vs_memory"] = FIGURES["success_vs_memory"]

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        names = [k for k, m in methods.items() if m["kind"] != "none" and m["seconds_per_sample"]]
        ms = [1e3 * methods[k]["seconds_per_sample"] for k in names]
        order = {k: i for i, k in enumerate(methods)}  # the same colour for a method in every figure
        ax1.bar(range(len(names)), ms, color=[_style(k, order[k])["color"] for k in names])
        ax1.set_xticks(range(len(names)), [label(k) for k in names], rotation=35, ha="right", fontsize=8)
        ax1.set(ylabel="ms per streamed sample (mean)", title=f"update time, n = 1..{n_last}")
        for name in names:
            cps = methods[name]["checkpoints"]
            mids, per = [], []
            for a, b in zip(cps, cps[1:], strict=False):
                mids.append(b["n_samples"])
                per.append(1e3 * (b["update_seconds"] - a["update_seconds"]) / (b["n_samples"] - a["n_samples"]))
            st = _style(name, order[name])
            ax2.plot(mids, per, label=label(name), color=st["color"], marker=st["marker"], ls=st["ls"])
        ax2.set(xscale="log", xlabel="n (end of the interval)", ylabel="ms per sample within the interval",
                title="update time as the stream grows")  # fmt: skip
        ax2.set_xticks(checkpoints[1:], [str(n) for n in checkpoints[1:]])
        ax2.minorticks_off()
        _legend(ax2, fontsize=7)
        _save(fig, out / FIGURES["time_per_sample"], results)
        plt.close(fig)
        written["time_per_sample"] = FIGURES["time_per_sample"]

    unc = results.get("uncertainty")
    if unc and unc["rows"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for j, policy in enumerate(dict.fromkeys(r["obs_noise_policy"] for r in unc["rows"])):
            rows = [r for r in unc["rows"] if r["obs_noise_policy"] == policy]
            sig = [r["sigma"] for r in rows]
            col = "C0" if j == 0 else "C2"
            ax.plot(sig, [r["mean_pred_std"] for r in rows], color=col, marker="o",
                    label=f"KBT predicted std ({policy} obs noise)")  # fmt: skip
            ax.plot(sig, [r["rmse_noisy_labels"] for r in rows], color=col, marker="s", ls="--",
                    label=f"actual RMSE ({policy} obs noise)")  # fmt: skip
        ax.plot([r["sigma"] for r in unc["rows"]], [r["sigma"] for r in unc["rows"]], color="0.6", lw=0.8, ls=":",
                label="injected σ")  # fmt: skip
        ax.set(xlabel="injected label-noise std σ (normalised action units)",
               ylabel="std / RMSE on held-out labels (normalised)",
               title=f"KBT-{unc['covariance']} after {unc['n_updates']} noisy samples")  # fmt: skip
        _legend(ax, fontsize=8)
        _save(fig, out / FIGURES["uncertainty"], results)
        plt.close(fig)
        written["uncertainty"] = FIGURES["uncertainty"]
    return written


# ---------------------------------------------------------------------------------------------
# markdown


def write_markdown(results: dict[str, Any]) -> str:
    """``results.md``: every table of the study."""
    s = results["settings"]
    pre = results["pretrained"]
    cfg = pre["config"]
    lines = [
        f"# Pendulum study ({'SMOKE TEST, --quick' if results['quick'] else 'full'} run, seed {results['seed']})",
        "",
    ]
    if results["quick"]:
        lines += [
            f"> **{SMOKE_TEST}.** A `--quick` run checks that the study runs end to end; its few episodes and",
            "> samples say nothing about the methods. Run without `--quick` for results.",
            "",
        ]
    lines += [
        f"Command: `{results['command']}`",
        "",
        f"ppl-kbnn {results['version']}; {results['timings']['total_s']:.0f} s in all; float64 throughout; "
        f"{results['environment']['torch_threads']} torch thread(s); torch {results['environment']['torch']}, "
        f"mujoco {results['environment']['mujoco']}, gymnasium {results['environment']['gymnasium']}.",
        "",
        "## Pre-trained decision transformer",
        "",
        f"DT d_model {cfg['d_model']}, {cfg['n_layer']} layer(s), {cfg['n_head']} head(s), "
        f"context K = {cfg['context']}, {cfg['activation']}, tanh action head; {pre['n_parameters']} parameters. "
        "Trained with AdamW "
        f"({s['pretrain_steps']} steps, batch {s['pretrain_batch']}, lr {s['pretrain_lr']:g}) on "
        f"{pre['n_train_samples']} contexts from {pre['nominal_episodes']['n']} nominal expert episodes "
        f"(action noise {s['nominal_noise']:g}); final MSE {pre['final_loss']:.4f} (normalised actions, noisy labels), "
        f"RMSE against the clean expert on nominal data {pre['nominal_rmse_clean']:.3f}.",
        "",
        f"Nominal task: **{_rate(pre['nominal_success'])}** successes (episodes of {s['episode_steps']} steps, "
        f"mean length {pre['nominal_success']['mean_length']:.0f}).",
        "",
        "## Shift",
        "",
        f"Rule: {results['shift']['rule']}; candidates tried in order: {', '.join(results['shift']['candidates'])}.",
        "",
        "| shift | recomputed expert | pre-trained DT | (DT mean length) | qualifies |",
        "|---|---|---|---|---|",
    ]
    for c in results["shift"]["checked"]:
        lines.append(
            f"| {c['shift']} | {_rate(c['expert'])} | {_rate(c['pretrained'])} | "
            f"{c['pretrained']['mean_length']:.0f} | {'yes' if c['qualifies'] else 'no'} |"
        )
    lines.append("")
    if results["stopped"]:
        lines += [f"**Stopped:** {results['stopped']}", ""]
        return "\n".join(lines) + _timings(results)

    st, mem, methods = results["stream"], results["memory"], results["methods"]
    lines += [
        f"Chosen: **{st['task']}**.",
        "",
        "## Stream",
        "",
        f"Pool: {st['pool_samples']} contexts from {st['pool_episodes']['n']} expert episodes on {st['task']} "
        f"(action noise {st['action_noise']:g}, {st['pool_episodes']['successes']}/{st['pool_episodes']['n']} "
        f"episodes survived); labels: {st['label']}. Order: {st['order']}. Held-out: {st['heldout_samples']} "
        f"contexts from {st['heldout_episodes']['n']} other episodes. Evaluation: {s['n_eval']} episodes with fixed "
        f"seeds {results['seeds']['evaluation'][0]}…{results['seeds']['evaluation'][1]}, the same for every method "
        "and checkpoint; KBT acts with its posterior-mean network.",
        "",
        f"KBT: prior scale {s['prior_scale']:g} on every linear map, obs noise {s['obs_noise']:g}, hidden "
        f"'{s['hidden']}'. Retraining: AdamW lr {s['retrain_lr']:g}, {s['retrain_epochs']} epoch(s) over the buffer "
        f"after each arrival (batch: {'whole buffer' if s['retrain_batch'] is None else s['retrain_batch']}).",
        "",
        f"Memory sizes: KBT-diag belief {_bytes(mem['kbt_diag_belief_bytes'])} ({mem['kbt_diag_belief_bytes']} B), "
        f"KBT-block {_bytes(mem['kbt_block_belief_bytes'])} ({mem['kbt_block_belief_bytes']} B); one buffered "
        f"sample {mem['bytes_per_buffered_sample']} B; {mem['rule']}: "
        + "; ".join(
            f"M = {M} ({', '.join(v['targets'])}){'' if v['run'] else ': ' + v['note']}" for M, v in mem["M"].items()
        )  # fmt: skip
        + f". Note: {mem['note']}.",
        "",
        "### Success rate after n streamed samples (successes/episodes [Wilson 95 %])",
        "",
        "| method | " + " | ".join(f"n = {n}" for n in st["checkpoints"]) + " |",
        "|---|" + "---|" * len(st["checkpoints"]),
    ]
    for name, m in methods.items():
        by_n = {c["n_samples"]: c for c in m["checkpoints"]}
        cells = [_rate(by_n[n]) if n in by_n else "—" for n in st["checkpoints"]]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Mean episode length (steps)",
        "",
        "| method | " + " | ".join(f"n = {n}" for n in st["checkpoints"]) + " |",
        "|---|" + "---|" * len(st["checkpoints"]),
    ]
    for name, m in methods.items():
        by_n = {c["n_samples"]: c for c in m["checkpoints"]}
        cells = [f"{by_n[n]['mean_length']:.0f}" if n in by_n else "—" for n in st["checkpoints"]]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Held-out action RMSE (normalised units, clean expert labels)",
        "",
        "| method | " + " | ".join(f"n = {n}" for n in st["checkpoints"]) + " |",
        "|---|" + "---|" * len(st["checkpoints"]),
    ]
    for name, m in methods.items():
        by_n = {c["n_samples"]: c for c in m["checkpoints"]}
        cells = [f"{by_n[n]['heldout_rmse']:.3f}" if n in by_n else "—" for n in st["checkpoints"]]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    n_last = st["checkpoints"][-1]
    lines += [
        "",
        f"### Memory and time (after n = {n_last})",
        "",
        "| method | state beyond the pre-trained weights | bytes | ms per streamed sample | error |",
        "|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        sec = m["seconds_per_sample"]
        lines.append(
            f"| {label(name)} | {_bytes(m['state_bytes_final'])} | {m['state_bytes_final']} | "
            f"{'—' if sec is None else f'{1e3 * sec:.1f}'} | {m['error'] or ''} |"
        )
    unc = results.get("uncertainty")
    if unc:
        lines += [
            "",
            "## Predicted uncertainty vs injected label noise",
            "",
            f"KBT-{unc['covariance']} (hidden '{unc['hidden']}') updated with {unc['n_updates']} streamed samples "
            f"whose labels carry Gaussian noise σ; evaluated on {unc['n_heldout']} held-out contexts whose labels "
            f"carry independent noise of the same σ. Units: {unc['units']}. Obs-noise policies: "
            + "; ".join(f"{k}: {v}" for k, v in unc["obs_noise_policies"].items())
            + ". Predicted std = sqrt of the predictive variance (includes obs_noise²); "
            "epistemic = the part without it.",
            "",
            "| σ | obs noise | obs_noise | mean predicted std | RMS predicted std | mean epistemic std "
            "| RMSE (noisy labels) | RMSE (clean labels) | 90 % coverage | NLL | ms / sample |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in unc["rows"]:
            lines.append(
                f"| {r['sigma']:g} | {r['obs_noise_policy']} | {r['obs_noise']:.3f} | {r['mean_pred_std']:.3f} | "
                f"{r['rms_pred_std']:.3f} | {r['mean_epistemic_std']:.3f} | {r['rmse_noisy_labels']:.3f} | "
                f"{r['rmse_clean_labels']:.3f} | {r['coverage_90']:.2f} | {r['nll']:.2f} | "
                f"{1e3 * r['seconds_per_sample']:.1f} |"
            )
    figs = results.get("figures", {})
    if figs:
        lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in figs.items()]
    return "\n".join(lines) + _timings(results)


def _timings(results: dict[str, Any]) -> str:
    t = results["timings"]
    return "\n\n## Timings (s)\n\n" + "\n".join(f"- {k}: {v:.1f}" for k, v in t.items()) + "\n"
