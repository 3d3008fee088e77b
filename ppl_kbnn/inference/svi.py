r"""Stochastic variational inference on the Pyro model: the variational baselines.

Maximise the ELBO over a Gaussian family ``q_φ(θ_B)``:

.. math::
    \mathcal L(\phi) = \mathbb E_{q_\phi}\big[\log p(y \mid x, \theta) + \log p(\theta_B) - \log q_\phi(\theta_B)\big]
    \le \log p(y \mid x)

* ``guide="normal"``: ``pyro.infer.autoguide.AutoNormal``, mean field
  ``q = Π_j N(μ_j, s_j²)`` (``2·D`` parameters);
* ``guide="lowrank"``: ``AutoLowRankMultivariateNormal``, ``q = N(μ, diag(s²) + W Wᵀ)`` with
  ``W`` of shape ``(D, rank)`` (``rank=None``: Pyro's default ``≈ √D``).

Both start at the prior means (the pre-trained weights, a copy of ``init_to_mean``) with a small
``init_scale``, and are fitted with ``Trace_ELBO`` (``num_particles`` draws per step) and
``ClippedAdam`` with a geometrically decaying learning rate ``lr · lr_decay^{t/T}``. The param store
is cleared first (Pyro's global state; a previous fit would otherwise leak in). The guide's locs are
copies of the prior means: ``init_to_mean`` returns the prior's own ``loc`` tensor and AutoNormal
does not copy it, so without the copy the optimiser would move the model's prior in place.

Predictive: ``num_predict`` draws ``θ_s ~ q`` are taken once, at the end of the fit (so ``predict``
is deterministic and consistent across inputs); ``mean = mean_s f(x; θ_s)``,
``std² = var_s f(x; θ_s) + σ_obs²`` (:func:`~ppl_kbnn.inference.result.draws_predictive`).
"""

from __future__ import annotations

import time
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_mean
from pyro.optim import ClippedAdam

from .result import InferenceResult, draws_predictive, tensor_bytes

__all__ = ["svi", "GUIDES"]

GUIDES = ("normal", "lowrank")


def _init_to_prior_mean(site: dict) -> torch.Tensor:
    """``init_to_mean``, copied: AutoNormal wraps the init value in an ``nn.Parameter`` without copying, and
    ``init_to_mean`` returns the prior's own ``loc``, so the optimiser would move the model's prior in place."""
    return init_to_mean(site).detach().clone()


def svi(
    model: Any,
    x: Any,
    y: torch.Tensor,
    guide: str = "normal",
    num_steps: int = 2000,
    lr: float = 0.01,
    *,
    num_particles: int = 1,
    rank: int | None = None,
    seed: int = 0,
    progress: bool = False,
    init_scale: float = 0.01,
    clip_norm: float = 10.0,
    lr_decay: float = 0.1,
    num_predict: int = 500,
) -> InferenceResult:
    """Fit an autoguide to the posterior of ``model`` given ``(x, y)`` by maximising the ELBO.

    Args:
        model: a :class:`~ppl_kbnn.model.BayesianModel` (any Pyro model ``model(x, y)`` with an
            ``obs_noise`` attribute works).
        x, y: the data (full batch every step); ``x`` is passed to the model as is.
        guide: ``"normal"`` (AutoNormal, mean field) or ``"lowrank"`` (AutoLowRankMultivariateNormal).
        num_steps: optimiser steps; lr: initial ClippedAdam learning rate; clip_norm: its gradient-norm clip.
        lr_decay: the learning rate decays geometrically to ``lr · lr_decay`` at the last step (``1``: constant);
            a decaying rate lets the last iterate settle instead of jittering with the ELBO noise.
        num_particles: ELBO Monte-Carlo draws per step.
        rank: rank of the low-rank factor (``"lowrank"`` only; ``None``: Pyro's default ``≈ √D``).
        seed: Pyro RNG seed (ELBO draws and the predictive draws).
        progress: show a tqdm progress bar with the running loss.
        init_scale: initial std of the guide (in the unconstrained space; the loc starts at the prior mean).
        num_predict: guide draws kept for ``predict`` (and returned as ``samples``).

    Returns:
        :class:`InferenceResult` with ``trace`` = the loss (negative ELBO estimate) of every step,
        ``samples`` = ``num_predict`` guide draws ``{site: (num_predict, ...)}``, ``fitted`` = the
        AutoGuide, ``memory_bytes`` = bytes of the variational parameters, and diagnostics
        ``final_loss`` (mean of the last 10% of steps), ``num_params`` (variational scalars),
        ``optimizer_bytes`` (the Adam moments, not part of ``memory_bytes``: not needed to predict).
        ``to_inference_data()`` gives one chain of the ``num_predict`` draws.
    """
    if guide not in GUIDES:
        raise ValueError(f"unknown svi guide {guide!r}; expected one of {GUIDES}")
    for name, value in (("num_steps", num_steps), ("num_particles", num_particles), ("num_predict", num_predict)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if num_predict < 2:
        raise ValueError(f"num_predict must be >= 2 for a predictive std, got {num_predict}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    if rank is not None and (guide != "lowrank" or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r}: only for guide='lowrank', and an integer >= 1")

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if guide == "normal":
        q = AutoNormal(model, init_loc_fn=_init_to_prior_mean, init_scale=init_scale)
    else:
        q = AutoLowRankMultivariateNormal(model, init_loc_fn=_init_to_prior_mean, init_scale=init_scale, rank=rank)
    optim = ClippedAdam({"lr": lr, "clip_norm": clip_norm, "lrd": lr_decay ** (1.0 / num_steps)})
    engine = SVI(model, q, optim, Trace_ELBO(num_particles=num_particles))

    steps: Any = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"svi-{guide}")
    losses: list[float] = []
    t0 = time.perf_counter()
    for i in steps:
        losses.append(float(engine.step(x, y)))
        if progress and (i % 50 == 0 or i == num_steps - 1):
            steps.set_postfix(loss=f"{losses[-1]:.4g}")
    with torch.no_grad():
        draws = [q(x, y) for _ in range(num_predict)]
    samples = {k: torch.stack([d[k] for d in draws]).detach() for k in draws[0]}  # {site: (S, ...)}
    wall = time.perf_counter() - t0

    params = {name: p.detach() for name, p in q.named_parameters()}
    tail = losses[-max(1, num_steps // 10) :]

    def predict(x_new: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return draws_predictive(model, samples, x_new)

    return InferenceResult(
        method=f"svi-{guide}",
        predict=predict,
        wall_seconds=wall,
        memory_bytes=tensor_bytes(params),
        diagnostics={
            "guide": guide,
            "final_loss": sum(tail) / len(tail),
            "num_steps": num_steps,
            "num_particles": num_particles,
            "num_params": sum(p.numel() for p in params.values()),
            "rank": int(q.rank) if guide == "lowrank" else None,
            "optimizer_bytes": tensor_bytes(optim.get_state()),
            "num_predict": num_predict,
        },
        samples=samples,
        trace=losses,
        fitted=q,
        model=model,
        data=(x, y),
    )
