r"""Lockstep evaluation of a decision transformer on many episodes, and the KBT posterior-mean network.

:func:`evaluate_dt` runs ``N`` episodes of one task side by side: at step ``t`` every episode still
running contributes its context (the last ``K`` normalised ``(R̂, s, a, t)`` steps, left-padded with a
mask, the current action slot a zero placeholder) to **one** batched network call. All episodes start
at ``t = 0`` together, so they share the padding pattern. This is step for step what
:class:`~ppl_kbnn.envs.DTPolicy` inside :func:`~ppl_kbnn.envs.rollout` does for one episode (same
normalisation, returns-to-go bookkeeping, clipping to ±3, ``float32`` action to MuJoCo, success =
``max_steps`` steps without termination); a test checks the episode lengths agree.

:func:`posterior_mean_net` copies a network and writes the KBT belief means into its linear maps, the
fast way to act with the posterior mean (one deterministic forward pass per step).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..envs import ACTION_BOUND, Normalizer, Task, make_env, wilson_interval

__all__ = ["evaluate_dt", "posterior_mean_net"]


@torch.no_grad()
def posterior_mean_net(guide: Any, net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose Bayesian linear maps hold the belief means of ``guide`` (a
    :class:`~ppl_kbnn.KalmanGuide` of a model built from ``net``).

    ``guide.beliefs()[name]`` is ``(mean (rows, in+1), cov)`` with the bias last (``(rows, in)`` for a
    map without bias); the copy's ``weight`` / ``bias`` get those columns. Other parameters are ``net``'s.
    """
    out = copy.deepcopy(net)
    for name, (mean, _) in guide.beliefs().items():
        mod = out.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"posterior_mean_net: {name!r} is not a Linear map of the network")
        d_in = mod.in_features
        expected = (mod.out_features, d_in + (mod.bias is not None))
        if tuple(mean.shape) != expected:
            raise ValueError(
                f"posterior_mean_net: belief of {name!r} has shape {tuple(mean.shape)}, expected {expected}"
            )
        mod.weight.copy_(mean[:, :d_in].to(mod.weight.dtype))
        if mod.bias is not None:
            mod.bias.copy_(mean[:, d_in].to(mod.bias.dtype))
    return out.eval()


@torch.no_grad()
def evaluate_dt(
    net: nn.Module,
    normalizer: Normalizer,
    task: Task | str,
    seeds: Sequence[int],
    *,
    max_steps: int = 1000,
    target_return: float = 1000.0,
    action_noise: float = 0.0,
    reset_noise: float | None = None,
) -> dict[str, Any]:
    """Run one episode per seed (``env.reset(seed=s)``) of ``task`` with the decision transformer, in lockstep.

    ``action_noise`` adds ``action_noise · ξ`` (``ξ ~ N(0, 1)`` from ``np.random.default_rng([s, 1])`` for
    the episode of seed ``s``) to every action before clipping to ±3, and the context records the applied
    action; with ``reset_noise`` (the env's ``reset_noise_scale``, default 0.01) the start states spread
    more. Both make the episodes of a deterministic network differ from each other.

    Returns:
        ``{"successes", "n", "interval" (Wilson 95 %), "lengths" (list), "mean_length", "success" (list of
        bool)}``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("evaluate_dt: need at least one episode seed")
    if max_steps < 1:
        raise ValueError(f"evaluate_dt: max_steps must be >= 1, got {max_steps}")
    cfg = net.config
    K, max_t = cfg.context, cfg.max_ep_len - 1
    p = next(net.parameters())
    dtype, device = p.dtype, p.device
    if not (np.isfinite(action_noise) and action_noise >= 0):
        raise ValueError(f"evaluate_dt: action_noise must be finite and >= 0, got {action_noise!r}")
    N = len(seeds)
    rngs = [np.random.default_rng([s, 1]) for s in seeds]
    envs = [make_env(task, max_episode_steps=max(1000, max_steps), reset_noise_scale=reset_noise) for _ in seeds]
    try:
        obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds, strict=True)])  # (N, 4)
        S = np.zeros((N, K, cfg.state_dim))  # rolling windows of normalised inputs, newest last
        A = np.zeros((N, K, cfg.act_dim))
        R = np.zeros((N, K, 1))
        rtg_raw = np.full(N, float(target_return))
        alive = np.ones(N, dtype=bool)
        terminated = np.zeros(N, dtype=bool)
        lengths = np.zeros(N, dtype=np.int64)
        was_training = net.training
        net.eval()
        for t in range(max_steps):
            idx = np.flatnonzero(alive)
            if idx.size == 0:
                break
            # shift the windows left by one step and append the current step (action slot: placeholder 0)
            S[idx] = np.roll(S[idx], -1, axis=1)
            A[idx] = np.roll(A[idx], -1, axis=1)
            R[idx] = np.roll(R[idx], -1, axis=1)
            S[idx, -1] = normalizer.norm_states(obs[idx])
            A[idx, -1] = 0.0
            R[idx, -1, 0] = normalizer.norm_returns(rtg_raw[idx])
            L = min(t + 1, K)  # real steps in the window (the rest is left padding)
            mask = np.zeros((idx.size, K), dtype=bool)
            mask[:, K - L :] = True
            steps = np.minimum(np.arange(t - K + 1, t + 1), max_t)  # (K,) timesteps of the window
            ts = np.where(mask, np.maximum(steps, 0)[None, :], 0)  # padding: 0, as in get_action

            def tt(x: np.ndarray, dt: torch.dtype = dtype) -> torch.Tensor:
                return torch.as_tensor(x, dtype=dt, device=device)

            s_in = np.where(mask[..., None], S[idx], 0.0)
            a_in = np.where(mask[..., None], A[idx], 0.0)
            r_in = np.where(mask[..., None], R[idx], 0.0)
            y = net(tt(r_in), tt(s_in), tt(a_in), tt(ts, torch.long), attention_mask=tt(mask, torch.bool))[:, -1]
            act = np.clip(normalizer.denorm_actions(y.detach().cpu().double().numpy()), -ACTION_BOUND, ACTION_BOUND)
            for j, i in enumerate(idx):
                a = act[j]  # (1,)
                if action_noise > 0:
                    a = np.clip(a + action_noise * rngs[i].standard_normal(a.shape), -ACTION_BOUND, ACTION_BOUND)
                obs_i, r, term, trunc, _ = envs[i].step(a.astype(np.float32))
                obs[i] = obs_i
                A[i, -1] = normalizer.norm_actions(a)
                rtg_raw[i] -= float(r)
                lengths[i] += 1
                if term or trunc:
                    alive[i] = False
                    terminated[i] = bool(term)
        if was_training:
            net.train()
    finally:
        for env in envs:
            env.close()
    success = (lengths == max_steps) & ~terminated
    k = int(success.sum())
    return {
        "successes": k,
        "n": N,
        "interval": list(wilson_interval(k, N)),
        "mean_length": float(lengths.mean()),
        "lengths": [int(v) for v in lengths],
        "success": [bool(v) for v in success],
    }
