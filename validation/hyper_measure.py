"""Measurements behind docs/hyper.md: outlier modes, the noise estimate, coverage on an adversarial stream, and the
automatic prior scale. Run: ``OMP_NUM_THREADS=1 python validation/hyper_measure.py [outliers] [noise] [prior_scale]``
(float64, a few minutes; default: all three parts)."""

from __future__ import annotations

import math
import warnings

import torch

import ppl_kbnn as pk
from ppl_kbnn.hyper import NOISE_MODES, PRIOR_GRID, OutlierWarning

FUNCS = {
    "sine": lambda x: torch.sin(x) + 0.3 * x,
    "step": lambda x: torch.tanh(3 * x),
    "quad": lambda x: 0.3 * x**2 - 1,
}


def stream(kind: str, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``n`` samples ``f(x) + 0.1 ε`` on ``x ~ U(-3, 3)`` and 101 noisy held-out points on a grid."""
    gen = torch.Generator().manual_seed(seed)
    X = 6 * torch.rand(n, 1, generator=gen) - 3
    Xt = torch.linspace(-3, 3, 101)[:, None]
    f = FUNCS[kind]
    Yt = f(Xt) + 0.1 * torch.randn(101, 1, generator=torch.Generator().manual_seed(99))
    return X, f(X) + 0.1 * torch.randn(n, 1, generator=gen), Xt, Yt


def mlp_guide(cov: str, upd: str, seed: int, scale: float = 0.1, **kw) -> pk.KalmanGuide:
    """A from-scratch 1-16-1 ReLU MLP's guide (initialisation seeded by ``seed``)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    extra = {"draws": 200} if upd == "slr" else {}
    return pk.KalmanGuide(pk.BayesianModel(net, scale, 0.1), cov, update=upd, **extra, **kw)


def score(g: pk.KalmanGuide, Xt: torch.Tensor, Yt: torch.Tensor) -> tuple[float, float]:
    """Held-out RMSE of the predictive mean and mean Gaussian NLL."""
    m, v = g.predict(Xt)
    return float(((m - Yt) ** 2).mean().sqrt()), float(
        (0.5 * torch.log(2 * math.pi * v) + 0.5 * (Yt - m) ** 2 / v).mean()
    )


def outliers() -> None:
    print("## one label 1e6 at sample 100 of 200: held-out RMSE (outlier count)")
    X, Y, Xt, Yt = stream("sine", 200, 1)
    Yt = FUNCS["sine"](Xt)
    Yo = Y.clone()
    Yo[100] = 1e6
    for cov, upd, s in [("block", "kbnn", 0.1), ("diag", "kbnn", 0.1), ("full", "ekf", 0.1), ("full", "ekf", 0.5),
                        ("diag", "slr", 0.5)]:  # fmt: skip
        row = []
        for mode, y in [("warn", Y), ("warn", Yo), ("gate", Yo), ("wolf", Yo), ("wolf", Y)]:
            g = mlp_guide(cov, upd, 0, s, outliers=mode).update(X, y)
            row.append(f"{score(g, Xt, Yt)[0]:.3g} ({g.guard_counts.get('outlier', 0)})")
        print(f"| {cov} {upd} s={s} | " + " | ".join(row) + " |")
    print("columns: clean, default with outlier, gate, wolf, wolf clean")


def noise() -> None:
    for mode in NOISE_MODES:
        print(f"## noise estimate / truth after 500 samples, linear net, guess g (block, kbnn), obs_noise={mode!r}")
        for guess in (0.03, 0.1, 0.3, 1.0, 3.0):
            row = []
            for sigma in (0.05, 0.3, 1.0):
                gen = torch.Generator().manual_seed(2)
                X = torch.randn(500, 3, generator=gen)
                Y = X @ torch.tensor([[1.0, -0.5, 0.2]]).T + 0.4 + sigma * torch.randn(500, 1, generator=gen)
                torch.manual_seed(0)
                g = pk.KalmanGuide(pk.BayesianModel(torch.nn.Linear(3, 1), 1.0, guess), "block", obs_noise=mode)
                g.update(X, Y)
                row.append(f"{float(g.obs_noise) / sigma:.3f}")
            print(f"| g={guess} | " + " | ".join(row) + " |")
    print("## alternating +100/-100 at one input, 100 samples: 90% interval coverage (noise estimate)")
    print("| structure | fixed 0.1 | " + " | ".join(NOISE_MODES) + " |")
    x = torch.tensor([[0.5]])
    for cov, upd in [("block", "kbnn"), ("diag", "kbnn"), ("full", "ekf"), ("diag", "ekf")]:
        cover = {}
        for mode in (None, *NOISE_MODES):
            g = mlp_guide(cov, upd, 0, obs_noise=mode)
            hits = []
            for t in range(100):
                y = torch.tensor([[100.0 if t % 2 == 0 else -100.0]])
                m, v = g.predict(x)
                hits.append(bool((y - m).abs() <= 1.6449 * v.sqrt()))
                g.update(x, y)
            cover[mode] = (sum(hits) / 100, float(g.obs_noise if mode is None else g.obs_noise[0]))
        print(f"| {cov} {upd} | {cover[None][0]:.2f} | "
              + " | ".join(f"{cover[m][0]:.2f} ({cover[m][1]:.1f})" for m in NOISE_MODES) + " |")


def prior_scale() -> None:
    print("## prior_scale='auto' vs the best fixed scale in hindsight (600 samples)")
    for cov, upd in [("block", "kbnn"), ("diag", "kbnn"), ("full", "ekf")]:
        worst_r, worst_n = 0.0, -math.inf
        for kind in FUNCS:
            for seed in range(3):
                X, Y, Xt, Yt = stream(kind, 600, seed)
                fixed = {s: score(mlp_guide(cov, upd, seed, s).update(X, Y), Xt, Yt) for s in PRIOR_GRID}
                a = mlp_guide(cov, upd, seed, prior_scale="auto").update(X, Y)
                (ra, na), br, bn = (
                    score(a, Xt, Yt),
                    min(r for r, _ in fixed.values()),
                    min(n for _, n in fixed.values()),
                )
                worst_r, worst_n = max(worst_r, ra / br), max(worst_n, (na - bn) / abs(bn))
                print(
                    f"| {cov} {upd} | {kind} {seed} | {a.prior_scale} | {ra:.4f} / {br:.4f} | {na:.3f} / {bn:.3f} | "
                    f"{max(r for r, _ in fixed.values()) / br:.2f} |"
                )
        print(f"worst {cov}: RMSE ratio {worst_r:.3f}, NLL excess {100 * worst_n:.1f}% of |best|")


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", OutlierWarning)
    import sys

    parts = sys.argv[1:] or ["outliers", "noise", "prior_scale"]  # e.g. `python validation/hyper_measure.py noise`
    for part in parts:
        {"outliers": outliers, "noise": noise, "prior_scale": prior_scale}[part]()
