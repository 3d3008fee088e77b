"""The belief-family part of ``ppl-kbnn bench``: update time and memory of every belief structure and rule.

At each ``d_model`` of the sweep (decision transformer, the bench's default size otherwise, float64, one thread),
every ``(covariance, update)`` pair in :data:`COMBOS` and one AdamW step of the same network are timed side by
side (interleaved repeats, medians; :func:`ppl_kbnn.bench.time_interleaved`). Reported per row: median update
time, its ratio to the AdamW step and to KBT-block (``"block"`` + ``"kbnn"``) in the same loop, belief bytes, and
for ``"lowrank"`` the bytes against ``D (r + 1)`` numbers. Structures whose belief would exceed ``max_bytes``
(``"full"`` at large ``d_model``: ``D²`` numbers) are skipped and say so. Growth exponents of time and bytes in
``d_model`` come from a least-squares fit on log-log axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .guide import KalmanGuide

COMBOS: tuple[tuple[str, str], ...] = (
    ("block", "kbnn"), ("diag", "kbnn"), ("diag", "ekf"), ("lowrank", "ekf"), ("full", "ekf"), ("lowrank", "slr"),
)  # fmt: skip
"""``(covariance, update)`` pairs timed (``"slr"`` with ``SLR_DRAWS`` draws)."""
SLR_DRAWS = 100
RANK = 10


def _belief_bytes_estimate(covariance: str, n_params: int, itemsize: int) -> int:
    """Bytes a belief would take, without building it (for the size cut-off)."""
    if covariance == "full":
        return n_params * (n_params + 1) * itemsize
    if covariance == "lowrank":
        return n_params * (RANK + 2) * itemsize
    return 0  # diag and block: the bench's own guard covers block


def belief_family(s: Any, seed: int, log: Callable[[str], None], *, d_models: tuple[int, ...] = (16, 32, 64),
                  max_bytes: int = 512 * 1024**2) -> dict[str, Any]:  # fmt: skip
    """Time every pair of :data:`COMBOS` against AdamW at each ``d_model`` (``s``: the bench's settings)."""
    from .bench import _adamw_step, _problem, fit_exponent, time_interleaved

    rows: list[dict[str, Any]] = []
    for d in d_models:
        n = s.scaling_repeats + 3
        p = _problem(s, d_model=d, n_layer=s.n_layer, context=s.context, dtype=torch.float64, n=n, seed=seed)
        adamw, _ = _adamw_step(p, s.adamw_lr)
        fns: dict[str, Callable[[int], None]] = {"adamw": adamw}
        guides: dict[str, KalmanGuide] = {}
        for cov, rule in COMBOS:
            name = f"{cov}-{rule}"
            if _belief_bytes_estimate(cov, p.n_params, 8) > max_bytes:
                rows.append({"d_model": d, "method": name, "n_params": p.n_params,
                             "skipped": f"belief over {max_bytes / 1024**2:.0f} MiB"})  # fmt: skip
                continue
            kw: dict[str, Any] = {"draws": SLR_DRAWS} if rule == "slr" else {}
            if cov == "lowrank":
                kw["rank"] = RANK
            guide = KalmanGuide(p.model, covariance=cov, update=rule, **kw)
            guides[name] = guide
            fns[name] = lambda i, g=guide, prob=p: g.update(*prob.sample(i))
        log(f"beliefs: d_model={d} ({p.n_params} weights), {len(fns)} methods")
        t = time_interleaved(fns, s.scaling_repeats, 1, budget_s=s.scaling_budget_s)
        for name, guide in guides.items():
            row = {"d_model": d, "method": name, "n_params": p.n_params, **t[name],
                   "ratio_to_adamw": t[name]["median_ms"] / t["adamw"]["median_ms"],
                   "ratio_to_kbt_block": t[name]["median_ms"] / t["block-kbnn"]["median_ms"],
                   "state_bytes": guide.belief_bytes}  # fmt: skip
            if guide.covariance == "lowrank":
                row["lowrank_numbers_ratio"] = guide.belief_bytes / 8 / (p.n_params * (RANK + 1))
            rows.append(row)
        rows.append({"d_model": d, "method": "adamw", "n_params": p.n_params, **t["adamw"], "ratio_to_adamw": 1.0})
        del p, guides, fns
    exponents = []
    for name in ["adamw", *(f"{c}-{u}" for c, u in COMBOS)]:
        sel = sorted((r for r in rows if r["method"] == name and "skipped" not in r), key=lambda r: r["d_model"])
        xs = [r["d_model"] for r in sel]
        exponents.append({"method": name, "d_model": xs,
                          "time_exponent": fit_exponent(xs, [r["median_ms"] for r in sel]),
                          "memory_exponent": fit_exponent(xs, [r.get("state_bytes") for r in sel])
                          if name != "adamw" else None})  # fmt: skip
    return {"rank": RANK, "slr_draws": SLR_DRAWS, "d_models": list(d_models), "rows": rows, "exponents": exponents}


def markdown(section: dict[str, Any]) -> list[str]:
    """Markdown lines of the section."""
    lines = ["", "## Belief structures and update rules (float64, one thread)", "",
             f"`lowrank`: rank {section['rank']}; `slr`: {section['slr_draws']} draws per update. Ratios are of "
             "medians timed side by side in one loop.", "",
             "| d_model | weights | method | median (ms) | ratio to AdamW | ratio to KBT-block | belief | "
             "lowrank bytes / D(r+1) numbers |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in section["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['d_model']} | {r['n_params']} | {r['method']} | skipped: {r['skipped']} | | | | |")
            continue
        kb, lr, sb = r.get("ratio_to_kbt_block"), r.get("lowrank_numbers_ratio"), r.get("state_bytes")
        cells = [str(r["d_model"]), str(r["n_params"]), r["method"], f"{r['median_ms']:.2f}",
                 f"{r['ratio_to_adamw']:.2f}", "" if kb is None else f"{kb:.2f}",
                 "" if sb is None else f"{sb / 1024:.1f} KiB", "" if lr is None else f"{lr:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| method | time exponent in d_model | memory exponent |", "|---|---|---|"]
    for e in section["exponents"]:
        te, me = e["time_exponent"], e["memory_exponent"]
        lines.append(f"| {e['method']} | {'' if te is None else f'{te:.2f}'} | {'' if me is None else f'{me:.2f}'} |")
    return lines
