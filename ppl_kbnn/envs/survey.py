"""Survey of the named pendulum shifts: ``python -m ppl_kbnn.envs.survey [--episodes 20] [--steps 1000]``.

For each task in :data:`~ppl_kbnn.envs.pendulum.SHIFTS`: successes of the nominal LQR expert and of
the LQR recomputed for the task (episodes with seeds ``seed, seed+1, …``; Wilson 95 % intervals), the
mean episode length of the nominal expert, the recomputed expert's success with Gaussian exploration
noise on its actions (as used for data collection; also with the noise divided by ``max(1, |gear|)``
so that a stronger actuator gets no more force noise than the nominal one), and the wall time of
one expert episode. A last line times :class:`~ppl_kbnn.envs.dataset.DTPolicy` per step with a
small decision transformer. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import numpy as np
import torch

from .dataset import DTPolicy, Normalizer
from .pendulum import SHIFTS, ExpertPolicy, Task, collect_episodes, make_env, success_rate
from .stats import wilson_interval

__all__ = ["dt_step_time", "survey"]


def _describe(t: Task) -> str:
    factors = ("pole_mass", "cart_mass", "gear", "gravity")
    parts = [f"{name} ×{getattr(t, name):g}" for name in factors if getattr(t, name) != 1]
    if t.angle_bias:
        parts.append(f"angle bias {t.angle_bias:+g} rad")
    return ", ".join(parts) or "—"


def survey(n_episodes: int = 20, max_steps: int = 1000, seed: int = 0, noise: float = 0.5) -> list[dict[str, Any]]:
    """One row per named shift (see the module docstring)."""
    nominal = ExpertPolicy("nominal")
    rows = []
    for name, task in SHIFTS.items():
        expert = ExpertPolicy(task)
        eps = collect_episodes(task, n_episodes, policy=nominal, seed=seed, max_steps=max_steps)
        k_nom = sum(e["success"] for e in eps)
        t0 = time.perf_counter()
        rec = success_rate(task, expert, n_episodes, seed, max_steps=max_steps)
        t_ep = (time.perf_counter() - t0) / n_episodes  # all episodes of the recomputed expert run to max_steps
        noisy = success_rate(task, expert, n_episodes, seed, max_steps=max_steps, action_noise=noise)
        scaled = noise / max(1.0, abs(task.gear))  # no more force noise than on the nominal task
        noisy_scaled = success_rate(task, expert, n_episodes, seed, max_steps=max_steps, action_noise=scaled)
        rows.append(
            {
                "shift": name,
                "change": _describe(task),
                "nominal": (k_nom, n_episodes, wilson_interval(k_nom, n_episodes)),
                "nominal_mean_len": float(np.mean([e["length"] for e in eps])),
                "recomputed": tuple(rec),
                "recomputed_noisy": tuple(noisy),
                "recomputed_noisy_scaled": tuple(noisy_scaled),
                "seconds_per_episode": t_ep,
                "K": np.array2string(expert.K[0], precision=3),
            }
        )
    return rows


def dt_step_time(n_steps: int = 500, d_model: int = 16, K: int = 5) -> float:
    """Seconds per :meth:`DTPolicy.act` + ``update`` with a 1-layer decision transformer (float32)."""
    from ..nn.transformer import DecisionTransformer, DTConfig

    net = DecisionTransformer(DTConfig(4, 1, d_model=d_model, n_layer=1, n_head=1, max_ep_len=1000, context=K))
    net = net.to(torch.float32).eval()
    policy = DTPolicy(net, Normalizer((0.0,) * 4, (1.0,) * 4, 1000.0), target_return=1000.0)
    rng = np.random.default_rng(0)
    obs = 0.01 * rng.standard_normal((n_steps, 4))
    t0 = time.perf_counter()
    for o in obs:
        policy.update(policy.act(o), 1.0)
    return (time.perf_counter() - t0) / n_steps


def _fmt(res: tuple) -> str:
    k, n, (lo, hi) = res
    return f"{k}/{n} [{lo:.2f}, {hi:.2f}]"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: print the survey table of the module docstring (Markdown) for every named shift."""
    ap = argparse.ArgumentParser(prog="python -m ppl_kbnn.envs.survey", description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.5, help="exploration noise std for the last success column")
    args = ap.parse_args(argv)
    env = make_env("nominal")
    print(
        f"InvertedPendulum-v5, {args.episodes} episodes x {args.steps} steps, seeds {args.seed}..."
        f"{args.seed + args.episodes - 1}; gymnasium env dt = {env.unwrapped.dt} s; {platform.processor() or ''}"
        f" torch threads {torch.get_num_threads()}\n"
    )
    rows = survey(args.episodes, args.steps, args.seed, args.noise)
    print(
        "| shift | change | nominal expert | (mean length) | recomputed expert | "
        f"recomputed, noise {args.noise:g} | recomputed, noise {args.noise:g}/max(1, abs(gear)) | s / episode | "
        "recomputed gain K |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shift']} | {r['change']} | {_fmt(r['nominal'])} | {r['nominal_mean_len']:.0f} | "
            f"{_fmt(r['recomputed'])} | {_fmt(r['recomputed_noisy'])} | {_fmt(r['recomputed_noisy_scaled'])} | "
            f"{r['seconds_per_episode']:.3f} | {r['K']} |"
        )
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        dt = dt_step_time()
        print(
            f"\nDTPolicy (d_model 16, 1 layer, K 5, float32, {n} torch thread(s)): "
            f"{1e3 * dt:.2f} ms per step, {1000 * dt:.2f} s per 1000-step episode"
        )
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
