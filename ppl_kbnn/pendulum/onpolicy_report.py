"""Tables (``results.md``), figures (PNGs) and the conclusion of the on-policy pendulum study, from its results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["FIGURES", "conclusion", "write_figures", "write_markdown"]

SMOKE_TEST = "SMOKE TEST (--quick): not a result"

FIGURES = {
    "success_vs_samples": "success_vs_samples.png",
    "success_vs_bytes": "success_vs_bytes.png",
    "time_per_sample": "time_per_sample.png",
    "rmse_vs_samples": "rmse_vs_samples.png",
    "offset_tolerance": "offset_tolerance.png",
    "uncertainty": "uncertainty.png",
}

LABELS = {
    "none": "no adaptation",
    "exact_fix": "exact fix (reference)",
    "kbt_all": "KBT, all weights",
    "kbt_embed": "KBT, 16 embedding biases",
    "kbt_all_lowrank": "KBT, all weights, low-rank (r = 10) + EKF",
    "kbt_all_auto_noise": "KBT, all weights, obs_noise='auto'",
}


def label(name: str) -> str:
    """Display name of a method key (``retrain_embed_M12`` -> ``retrain embedding biases, M=12``)."""
    if name in LABELS:
        return LABELS[name]
    for short, long in (("retrain_all_", "retrain all weights, "), ("retrain_embed_", "retrain embedding biases, ")):
        if name.startswith(short):
            rest = name[len(short) :]
            return long + ("all data" if rest == "all_data" else f"M={rest[1:]}")
    return name


def _ci(x: dict[str, Any] | None, fmt: str = "{:.2f}", lo: float = 0.0, hi: float = float("inf")) -> str:
    """``mean [lo, hi]`` with the interval clipped to the quantity's range (``[lo, hi]``: rates ``[0, 1]``, counts,
    bytes and RMSEs ``[0, ∞)``)."""
    if not x or x.get("mean") is None:
        return "—"
    if x.get("lo") is None:
        return fmt.format(x["mean"])
    a, b = max(lo, x["lo"]), min(hi, x["hi"])
    return f"{fmt.format(x['mean'])} [{fmt.format(a)}, {fmt.format(b)}]"


def _rate_ci(x: dict[str, Any] | None) -> str:
    return _ci(x, "{:.2f}", 0.0, 1.0)


def _n90(m: dict[str, Any]) -> str:
    """Samples until success stays >= 90 %: the streams that got there, and the mean with never = lower bound."""
    k, n = m["n90_reached"], len(m["n90_per_stream"])
    if k == 0:
        return f"not reached (0/{n})"
    reached = sorted(v for v in m["n90_per_stream"] if v is not None)
    note = "" if k == n else " (unreached streams counted as last checkpoint + block)"
    return f"{_ci(m['n90'], '{:.0f}')}{note}; reached on {k}/{n}: {reached}"


def _bytes(b: float | None) -> str:
    if b is None:
        return "—"
    if b < 1024:
        return f"{b:.0f} B"
    if b < 1024**2:
        return f"{b / 1024:.1f} KiB"
    return f"{b / 1024**2:.2f} MiB"


def _verdict(d: dict[str, Any], better_if: str, what: str, a: str, b: str, fmt: str = "{:+.2f}") -> str:
    """One clause: the paired difference ``a − b`` with its interval and what it supports."""
    if d.get("mean") is None:
        return f"{what}: not measured"
    ci = f"{fmt.format(d['mean'])}" + (
        f" [{fmt.format(d['lo'])}, {fmt.format(d['hi'])}]" if d.get("lo") is not None else " (one stream, no interval)"
    )
    if d["verdict"] == "no difference shown":
        res = "the 95 % interval does not support a difference"
    else:
        a_wins = (d["verdict"] == "a > b") == (better_if == "higher")
        res = f"{label(a) if a_wins else label(b)} is better at the 95 % level"
    return f"{what} {ci}: {res}"


def conclusion(results: dict[str, Any]) -> list[str]:
    """The conclusion paragraph, one line per shift and comparison, generated from the paired intervals."""
    lines = []
    if results.get("quick"):
        lines.append(f"{SMOKE_TEST}: the numbers below say nothing about the methods.")
    for shift, sm in results.get("summary", {}).items():
        n_units = len(sm["units"])
        for c in sm["comparisons"]:
            a, b = c["a"], c["b"]
            parts = []
            for n in (100, 200):
                if f"success_at_{n}" in c:
                    parts.append(_verdict(c[f"success_at_{n}"], "higher", f"success at n={n} (a − b)", a, b))
            meths = results["summary"][shift]["methods"]
            if meths[a]["n90_reached"] == 0 and meths[b]["n90_reached"] == 0:
                parts.append("neither reaches success >= 90 % to stay on any stream")
            else:
                what = "samples until success stays >= 90 % (a − b)"
                parts.append(_verdict(c["n90"], "lower", what, a, b, "{:+.0f}"))
            t = c["time_ratio_b_over_a"]
            if t.get("mean") is not None:
                faster = t.get("lo") is not None and t["lo"] > 1
                slower = t.get("hi") is not None and t["hi"] < 1
                ci = f"{t['mean']:.2f}x" + (f" [{t['lo']:.2f}, {t['hi']:.2f}]" if t.get("lo") is not None else "")
                parts.append(f"retraining's time per sample / KBT's {ci}: " + (
                    f"{label(a)} is faster per sample at the 95 % level" if faster
                    else f"{label(b)} is faster per sample at the 95 % level" if slower
                    else "no difference in time per sample shown"))  # fmt: skip
            ba, bb = c["bytes"][a], c["bytes"][b]
            if ba is not None and bb is not None:
                parts.append(f"state {_bytes(ba)} vs {_bytes(bb)}")
            lines.append(f"{shift}, {label(a)} (a) vs {label(b)} (b), {n_units} streams: " + "; ".join(parts) + ".")
    return lines


def _save(fig: Any, path: Path, results: dict[str, Any]) -> None:
    if results.get("quick"):
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        fig.text(0.5, 0.985, SMOKE_TEST, ha="center", va="top", color="firebrick", fontsize=11, fontweight="bold")
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_figures(out: Path, results: dict[str, Any]) -> dict[str, str]:
    """Write the PNGs of :data:`FIGURES` that the results support; returns ``{key: file name}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    summary = results.get("summary", {})
    shifts = list(summary)
    if shifts:
        # success vs n with bands across streams
        fig, axes = plt.subplots(1, len(shifts), figsize=(5.2 * len(shifts), 4.2), squeeze=False)
        for ax, shift in zip(axes[0], shifts, strict=True):
            for i, (name, m) in enumerate(summary[shift]["methods"].items()):
                xs = [c["n"] for c in m["checkpoints"] if c["success"]["mean"] is not None]
                ys = [c["success"]["mean"] for c in m["checkpoints"] if c["success"]["mean"] is not None]
                if not xs:
                    continue
                line = ax.plot(xs, ys, marker="o", ms=3, label=label(name), ls="--" if m["spec"].get("kind") in
                               ("none", "exact") else "-", color=f"C{i}")  # fmt: skip
                lo = [c["success"]["lo"] for c in m["checkpoints"] if c["success"]["mean"] is not None]
                hi = [c["success"]["hi"] for c in m["checkpoints"] if c["success"]["mean"] is not None]
                if all(v is not None for v in lo):
                    ax.fill_between(xs, [max(0, v) for v in lo], [min(1, v) for v in hi], alpha=0.12,
                                    color=line[0].get_color())  # fmt: skip
            ax.set(title=shift, xlabel="samples (labels)", ylabel="success rate", ylim=(-0.05, 1.05))
        axes[0][0].legend(fontsize=7, loc="best")
        _save(fig, out / FIGURES["success_vs_samples"], results)
        plt.close(fig)
        written["success_vs_samples"] = FIGURES["success_vs_samples"]

        # success at n = 100 / 200 vs state bytes
        ns = [n for n in (100, 200) if n in results["settings"]["checkpoints"]]
        if ns:
            fig, axes = plt.subplots(len(ns), len(shifts), figsize=(5.2 * len(shifts), 3.8 * len(ns)), squeeze=False)
            for r, n in enumerate(ns):
                for ax, shift in zip(axes[r], shifts, strict=True):
                    for i, (name, m) in enumerate(summary[shift]["methods"].items()):
                        if m["spec"].get("kind") not in ("kbt", "retrain"):
                            continue
                        c = next(c for c in m["checkpoints"] if c["n"] == n)
                        if c["success"]["mean"] is None or not c["state_bytes"]["mean"]:
                            continue
                        lo, hi = c["success"]["lo"], c["success"]["hi"]
                        err = None if lo is None else [[c["success"]["mean"] - lo], [hi - c["success"]["mean"]]]
                        ax.errorbar([c["state_bytes"]["mean"]], [c["success"]["mean"]], yerr=err, fmt="o",
                                    color=f"C{i}", label=label(name), capsize=3)  # fmt: skip
                    ax.set(xscale="log", title=f"{shift}, n = {n}", xlabel="state bytes", ylabel="success rate",
                           ylim=(-0.05, 1.05))  # fmt: skip
            axes[0][0].legend(fontsize=7)
            _save(fig, out / FIGURES["success_vs_bytes"], results)
            plt.close(fig)
            written["success_vs_bytes"] = FIGURES["success_vs_bytes"]

        # time per sample
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [n for n, m in summary[shifts[0]]["methods"].items() if m["spec"].get("kind") in ("kbt", "retrain")]
        for j, shift in enumerate(shifts):
            for i, name in enumerate(names):
                t = summary[shift]["methods"][name]["seconds_per_sample"]
                if t["mean"] is None:
                    continue
                x = i + 0.8 * (j - (len(shifts) - 1) / 2) / max(1, len(shifts))
                err = None if t["lo"] is None else [[1e3 * (t["mean"] - t["lo"])], [1e3 * (t["hi"] - t["mean"])]]
                ax.bar(x, 1e3 * t["mean"], width=0.8 / len(shifts), color=f"C{j}", yerr=err, capsize=2,
                       label=shift if i == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(names)), [label(n) for n in names], rotation=25, ha="right", fontsize=7)
        ax.set(ylabel="ms per sample (one thread, updates only)")
        ax.legend(fontsize=7)
        _save(fig, out / FIGURES["time_per_sample"], results)
        plt.close(fig)
        written["time_per_sample"] = FIGURES["time_per_sample"]

        # RMSE vs n: expert (held-out) and on-policy states
        fig, axes = plt.subplots(2, len(shifts), figsize=(5.2 * len(shifts), 7), squeeze=False)
        for col, shift in enumerate(shifts):
            for row, (key, title) in enumerate((("heldout_rmse", "held-out expert states"),
                                                ("onpolicy_rmse", "own next on-policy block"))):  # fmt: skip
                ax = axes[row][col]
                for i, (name, m) in enumerate(summary[shift]["methods"].items()):
                    pts = [(c["n"], c[key]["mean"]) for c in m["checkpoints"] if c[key]["mean"] is not None]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label(name), color=f"C{i}")
                ax.set(title=f"{shift}: {title}", xlabel="samples", ylabel="action RMSE (normalised)", yscale="log")
        axes[0][0].legend(fontsize=7)
        _save(fig, out / FIGURES["rmse_vs_samples"], results)
        plt.close(fig)
        written["rmse_vs_samples"] = FIGURES["rmse_vs_samples"]

    if results.get("tolerance"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in results["tolerance"]:
            xs = [r["fraction"] for r in t["rows"]]
            ax.plot(xs, [r["successes"] / r["n"] for r in t["rows"]], marker="o", label=f"network {t['network']}")
        ax.set(xlabel="fraction of the exact fix of the sensor bias applied", ylabel="success rate",
               title="pre-trained DT, sensor_bias_0.1: offset tolerance", ylim=(-0.05, 1.05))  # fmt: skip
        ax.legend(fontsize=8)
        _save(fig, out / FIGURES["offset_tolerance"], results)
        plt.close(fig)
        written["offset_tolerance"] = FIGURES["offset_tolerance"]

    unc = results.get("uncertainty")
    if unc:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, pol in enumerate(sorted({r["obs_noise_policy"] for r in unc["rows"]})):
            rows = [r for r in unc["rows"] if r["obs_noise_policy"] == pol]
            sig = [r["sigma"] for r in rows]
            ax.plot(sig, [r["mean_pred_std"] for r in rows], marker="o", color=f"C{i}", label=f"predicted std ({pol})")
            ax.plot(sig, [r["rmse_noisy_labels"] for r in rows], marker="x", ls="--", color=f"C{i}",
                    label=f"actual RMSE ({pol})")  # fmt: skip
        ax.set(xlabel="injected label noise σ", ylabel="normalised action units", title="KBT: predicted std vs error")
        ax.legend(fontsize=7)
        _save(fig, out / FIGURES["uncertainty"], results)
        plt.close(fig)
        written["uncertainty"] = FIGURES["uncertainty"]
    return written


def write_markdown(results: dict[str, Any]) -> str:
    """``results.md``: settings, checks, learning rates, per-shift tables with intervals, conclusion, timings."""
    s = results["settings"]
    L: list[str] = ["# Pendulum study (on-policy streams)", ""]
    if results.get("quick"):
        L += [f"**{SMOKE_TEST}**", ""]
    L += [
        f"Command: `{results['command']}` (preset `{results['preset']}`, {results['workers']} worker(s)). "
        f"Networks {list(s['networks'])}, {s['n_streams']} on-policy test stream(s) per network and shift, "
        f"checkpoints {list(s['checkpoints'])}, {s['n_eval']} evaluation episodes per checkpoint with action noise "
        f"{s['eval_action_noise']} and reset noise {s['eval_reset_noise']}; one on-policy episode per {s['block']} "
        "samples. Intervals: Student-t 95 % across streams (all (network, stream) units of a shift together), "
        "not across episodes.",
        "",
        "## Conclusion",
        "",
        *[f"- {line}" for line in results.get("conclusion", [])],
        "",
        "## Checks (successes / episodes, under the evaluation noise)",
        "",
        "| network | task | recomputed expert | pre-trained DT | pre-trained DT, no noise | exact fix |",
        "|---|---|---|---|---|---|",
    ]
    for c in results.get("checks", []):
        for shift, r in c["shifts"].items():
            fix = "—" if r["exact_fix"] is None else f"{r['exact_fix']}/{r['n']}"
            L.append(f"| {c['network']} | {shift} | {r['expert']}/{r['n']} | {r['pretrained']}/{r['n']} | "
                     f"{r['pretrained_noiseless']}/{r['n']} | {fix} |")  # fmt: skip
    mem = results.get("memory", {})
    L += ["", "## Memory matching", "", f"Rule: {mem.get('rule', '')}.", "",
          "| subset | parameters | KBT state | AdamW state | one buffered sample | matched M |",
          "|---|---|---|---|---|---|"]  # fmt: skip
    for subset in ("all", "embed_bias"):
        if subset in mem:
            m = mem[subset]
            L.append(f"| {subset} | {m['n_parameters']} | {_bytes(m['kbt_bytes'])} | {_bytes(m['adamw_bytes'])} | "
                     f"{m['sample_bytes']} B | {m['M']} |")  # fmt: skip
    lr = results.get("learning_rates")
    if lr:
        L += ["", "## Retraining's learning rate (development streams only)", "", f"Rule: {lr['rule']}.", "",
              "| shift | subset | chosen lr | mean dev success per lr |", "|---|---|---|---|"]  # fmt: skip
        for shift, d in lr["chosen"].items():
            for subset, v in d.items():
                sc = ", ".join(f"{k}: {x['mean_success']:.2f}" for k, x in v["scores"].items())
                L.append(f"| {shift} | {subset} | {v['lr']:g} | {sc} |")
    for shift, sm in results.get("summary", {}).items():
        cps = list(s["checkpoints"])
        L += ["", f"## {shift}", "", f"Success rate (mean over {len(sm['units'])} streams [95 % interval]):", "",
              "| method | " + " | ".join(f"n={n}" for n in cps) + " | samples until success stays >= 90 % |",
              "|---|" + "---|" * (len(cps) + 1)]  # fmt: skip
        for name, m in sm["methods"].items():
            n90 = _n90(m)
            rates = " | ".join(_rate_ci(c["success"]) for c in m["checkpoints"])
            L.append(f"| {label(name)} | {rates} | {n90} |")
        nets = [str(n) for n in s["networks"]]
        L += ["", f"Across pre-trained networks (seeds): success at n={cps[-1]}, mean over each network's streams:",
              "", "| method | " + " | ".join(f"network {n}" for n in nets) + " |",
              "|---|" + "---|" * len(nets)]  # fmt: skip
        for name, m in sm["methods"].items():
            per = m["checkpoints"][-1]["success_per_network"]
            L.append(f"| {label(name)} | " + " | ".join(_rate_ci(per.get(n)) for n in nets) + " |")
        pred = [(name, c) for name, m in sm["methods"].items() for c in m["checkpoints"]
                if c["predictive_success"]["mean"] is not None]  # fmt: skip
        if pred:
            L += ["", "Acting with KBT's predictive mean instead of the posterior-mean network (secondary row):", ""]
            L += [f"- {label(name)}, n={c['n']}: {_rate_ci(c['predictive_success'])} (posterior-mean network "
                  f"{_rate_ci(c['success'])}; the predictive row runs on the first stream(s) only)"
                  for name, c in pred]  # fmt: skip
        L += ["", "| method | parameters | lr | state bytes at the end | ms per sample | env steps at the end | "
              "held-out RMSE at the end | on-policy RMSE at the end | expert-stream RMSE at the end |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, m in sm["methods"].items():
            c = m["checkpoints"][-1]
            t = m["seconds_per_sample"]
            ms = "—" if t["mean"] is None else _ci({k: (None if v is None else 1e3 * v) for k, v in t.items()
                                                    if k in ("mean", "lo", "hi")}, "{:.1f}")  # fmt: skip
            exr = m.get("expert_stream_rmse")
            exs = _ci(exr[-1]["heldout_rmse"], "{:.3f}") if exr else "—"
            lr_s = m["spec"].get("lr", "—")
            L.append(f"| {label(name)} | {m['n_parameters']} | {lr_s} | {_bytes(m['state_bytes_final'])} | {ms} | "
                     f"{_ci(c['env_steps'], '{:.0f}')} | {_ci(c['heldout_rmse'], '{:.3f}')} | "
                     f"{_ci(c['onpolicy_rmse'], '{:.3f}')} | {exs} |")  # fmt: skip
            if m["errors"]:
                L.append(f"|  ↳ errors: {'; '.join(m['errors'])} |||||||||")
    if results.get("tolerance"):
        L += ["", "## Offset tolerance of the pre-trained DT (sensor_bias_0.1)", "",
              "| network | " + " | ".join(f"{r['fraction']:g}" for r in results["tolerance"][0]["rows"]) + " |",
              "|---|" + "---|" * len(results["tolerance"][0]["rows"])]  # fmt: skip
        for t in results["tolerance"]:
            L.append(f"| {t['network']} | " + " | ".join(f"{r['successes']}/{r['n']}" for r in t["rows"]) + " |")
    unc = results.get("uncertainty")
    if unc:
        L += ["", "## Uncertainty (KBT all weights, i.i.d. expert stream of sensor_bias_0.1)", "",
              "| σ | obs noise policy | predicted std | RMSE (noisy labels) | 90 % coverage |",
              "|---|---|---|---|---|"]  # fmt: skip
        for r in unc["rows"]:
            L.append(f"| {r['sigma']:g} | {r['obs_noise_policy']} | {r['mean_pred_std']:.3f} | "
                     f"{r['rmse_noisy_labels']:.3f} | {r['coverage_90']:.2f} |")  # fmt: skip
    t = results.get("timings", {})
    L += ["", "## Timings", "", ", ".join(f"{k} {v:.0f} s" for k, v in t.items()), ""]
    figs = results.get("figures", {})
    if figs:
        L += ["## Figures", "", *[f"![{k}]({v})" for k, v in figs.items()], ""]
    return "\n".join(L)
