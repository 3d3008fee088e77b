r"""``InferenceResult``: one result type for every inference method, so they compare side by side.

Every method (NUTS, SVI, retraining, the Kalman guide) returns

* ``predict(x) -> (mean, std)``: the predictive distribution of ``y`` at inputs ``x``, **including**
  the observation noise, ``mean`` and ``std`` shaped like ``y`` (the model's observed output);
* ``wall_seconds``: total fitting time (everything the method needs before it can predict);
* ``memory_bytes``: the state the method holds *beyond* the pre-trained weights (posterior draws,
  variational parameters, a replay buffer and optimiser state, a Gaussian belief), counted from the
  tensors actually held (:func:`tensor_bytes`), never a constant;
* ``diagnostics``: method-specific numbers (R-hat, ESS, divergences, final loss, ...).

Sample-based predictive (NUTS, SVI): for weight draws ``θ_s``, ``s = 1..S``, the predictive of
``y = f(x; θ) + ε``, ``ε ~ N(0, σ_obs² I)`` has

.. math::
    \mathbb E[y] \approx \frac1S \sum_s f(x; \theta_s), \qquad
    \mathrm{Var}[y] \approx \widehat{\mathrm{Var}}_s[f(x; \theta_s)] + \sigma_{obs}^2 ,

the noise part in closed form (no Monte-Carlo noise from sampling ``ε``); ``\widehat{\mathrm{Var}}``
is the unbiased sample variance over draws (:func:`draws_predictive`).

ArviZ: :meth:`InferenceResult.to_inference_data` turns any result into an ``arviz.InferenceData`` built from
weight draws ``θ_{c,s}`` (chain ``c``, draw ``s``): ``posterior`` (the draws, dims ``chain, draw``),
``log_likelihood`` (per observation ``i``: ``log N(y_i; f(x_i; θ_{c,s}), σ_obs² I)``, summed over the
output dimensions of that observation), ``posterior_predictive`` (``y_rep = f(x; θ_{c,s}) + σ_obs ε``),
``observed_data`` (``y``) and, for NUTS, ``sample_stats``. The arviz calls live in ``_arviz.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyro.poutine as poutine
import torch
from pyro.infer import Predictive

from . import _arviz

if TYPE_CHECKING:
    from ..guide import KalmanGuide

__all__ = ["InferenceResult", "draw_outputs", "draws_predictive", "from_guide", "model_output", "tensor_bytes"]

Predict = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class InferenceResult:
    """What every inference method returns.

    Attributes:
        method: short name (``"nuts"``, ``"svi-normal"``, ``"svi-lowrank"``, ``"retrain-M20"``, ``"kbt-block"``...).
        predict: ``x -> (mean, std)`` of ``y`` including the observation noise, each shaped like ``y``.
        wall_seconds: total fitting time in seconds (perf_counter).
        memory_bytes: bytes of the state held beyond the pre-trained weights (see the module docstring
            and docs/inference.md for what each method counts).
        diagnostics: method-specific diagnostics (plain python numbers, lists and strings).
        samples: posterior draws ``{site: (S, *site_shape)}`` where the method has them (NUTS: all
            chains concatenated, chain-major; SVI: draws from the fitted guide), else ``None``.
        trace: a per-step or per-arrival loss trace (SVI: the negative ELBO per step; retraining: the
            buffer loss after each arrival), else ``None``.
        fitted: the fitted object for further use (the AutoGuide, the :class:`Retrainer`, the
            KalmanGuide, the laplace-torch object); ``None`` for NUTS.
        num_chains: how many chains ``samples`` holds (chain-major, equal lengths); 1 except for NUTS.
        sample_stats: per-draw sampler statistics ``{name: (chains, draws)}`` (NUTS: ``diverging``,
            ``step_size``, ``acceptance_rate``), else ``None``.
        model: the Pyro model the result belongs to (needed by :meth:`to_inference_data`).
        data: the ``(x, y)`` the method was fitted on (the default data of :meth:`to_inference_data`).
        sampler: ``(num_draws, seed) -> {site: (num_draws, *site_shape)}``: fresh draws from the fitted
            approximate posterior, for methods that hold a distribution rather than draws (the Kalman
            guide, Laplace); ``None`` otherwise.
        outputs: ``(draws, x) -> f`` of shape ``(S, *y_shape)``, the network output for every draw, where a
            method defines it differently (Laplace: the linearised network of its GLM predictive); ``None``:
            the network itself (:func:`draw_outputs`).
    """

    method: str
    predict: Predict
    wall_seconds: float
    memory_bytes: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] | None = None
    trace: list[float] | None = None
    fitted: Any = None
    num_chains: int = 1
    sample_stats: dict[str, torch.Tensor] | None = None
    model: Any = None
    data: tuple[Any, torch.Tensor] | None = None
    sampler: Callable[[int, int], dict[str, torch.Tensor]] | None = None
    outputs: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor] | None = None

    def to_inference_data(
        self, x: Any = None, y: torch.Tensor | None = None, *, num_draws: int | None = None, seed: int = 0
    ) -> Any:
        """An ``arviz.InferenceData`` of this result's posterior on data ``(x, y)`` (default: the fit data).

        Groups: ``posterior`` (every Bayesian site, dims ``(chain, draw, *site_shape)``), ``log_likelihood``
        (``obs``: ``(chain, draw, obs_id)``, the Normal log-density of each observation with
        ``model.obs_noise``, summed over its output dimensions), ``posterior_predictive`` (``obs``:
        ``(chain, draw, *y_shape)``, ``f(x; θ) + σ_obs ε`` with ``ε`` from a generator seeded ``seed``),
        ``observed_data`` (``obs``: ``y``) and, where the sampler records them, ``sample_stats``.

        Draws: NUTS keeps its chains (``num_chains × num_samples``); SVI one chain of its stored guide draws;
        the Kalman guide and Laplace one chain of ``num_draws`` fresh draws from the fitted Gaussian
        (default 500, seeded ``seed``). ``num_draws`` given for a stored-draw method keeps the first
        ``num_draws`` of every chain. Pass held-out ``(x, y)`` to get held-out pointwise log predictive
        densities (then compare them with :func:`~ppl_kbnn.inference.compare` ``(..., heldout=True)`` or
        :func:`~ppl_kbnn.inference.elpd`, not PSIS-LOO, which assumes the observations were fitted).

        Raises:
            ValueError: the result has no draws and no sampler (retraining: a point estimate), no model,
                no data and none given, or ``num_draws < 2``.
        """
        if self.samples is None and self.sampler is None:
            raise ValueError(f"{self.method}: a point estimate has no posterior draws")
        if x is None and y is None:
            if self.data is None:
                raise ValueError(f"{self.method}: no fit data stored; pass x and y")
            x, y = self.data
        elif x is None or y is None:
            raise ValueError("pass both x and y (or neither, for the fit data)")
        if num_draws is not None and (not isinstance(num_draws, int) or num_draws < 2):
            raise ValueError(f"num_draws must be an integer >= 2, got {num_draws!r}")
        if self.samples is not None:
            C = self.num_chains
            chains = {k: v.reshape(C, -1, *v.shape[1:])[:, :num_draws] for k, v in self.samples.items()}
            stats = None if self.sample_stats is None else {k: v[:, :num_draws] for k, v in self.sample_stats.items()}
        else:
            draws = self.sampler(500 if num_draws is None else num_draws, seed)
            chains, stats = {k: v[None] for k, v in draws.items()}, None  # one chain
        if self.model is None:
            raise ValueError(f"{self.method}: no model attached")
        C, D = next(iter(chains.values())).shape[:2]
        flat = {k: v.reshape(C * D, *v.shape[2:]) for k, v in chains.items()}  # (C·D, ...), chain-major
        with torch.no_grad():
            f = (self.outputs or (lambda th, xx: draw_outputs(self.model, th, xx)))(flat, x)  # (C·D, *y_shape)
            f = f.reshape(C, D, *f.shape[1:])
            if f.shape[2:] != y.shape:
                raise ValueError(f"y: expected shape {tuple(f.shape[2:])} (the network's output), got {tuple(y.shape)}")
            noise = self.model.obs_noise
            ll = torch.distributions.Normal(f, noise).log_prob(y)  # (C, D, N, ...)
            ll = ll.reshape(C, D, y.shape[0], -1).sum(-1)  # (C, D, N): one term per observation
            gen = torch.Generator(device=f.device).manual_seed(seed)
            y_rep = f + noise * torch.randn(f.shape, generator=gen, dtype=f.dtype, device=f.device)
        return _arviz.inference_data(chains, log_likelihood=ll, posterior_predictive=y_rep, observed=y,
                                     sample_stats=stats, attrs={"method": self.method})  # fmt: skip


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (a tensor, or dicts / lists / tuples of them, nested; other leaves count 0).

    Tensors sharing storage are not de-duplicated: callers pass the tensors a method actually holds.
    """
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def model_output(model: Any, x: Any) -> torch.Tensor:
    """The network output ``f(x; θ)`` that the model observes (shaped like ``y``), at the model's current weights.

    Uses ``model.output(x)`` where the model has it (it handles tensor / tuple / dict inputs and which
    outputs are observed), else ``model(x)`` (which samples ``"obs"`` and returns the network output).
    """
    output = getattr(model, "output", None)
    return output(x) if callable(output) else model(x)


@torch.no_grad()
def draw_outputs(model: Any, samples: Mapping[str, torch.Tensor], x: Any) -> torch.Tensor:
    """``f(x; θ_s)`` for every draw of ``samples`` ``{site: (S, *site_shape)}``: shape ``(S, *y_shape)``.

    Each draw is plugged into the model with ``poutine.condition`` and the network evaluated once per draw.
    """
    names = list(samples)
    if not names:
        raise ValueError("samples: no posterior draws")
    S = samples[names[0]].shape[0]
    outs = []
    for s in range(S):
        with poutine.condition(data={k: v[s] for k, v in samples.items()}):
            outs.append(model_output(model, x))
    return torch.stack(outs)


@torch.no_grad()
def draws_predictive(model: Any, samples: Mapping[str, torch.Tensor], x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictive ``(mean, std)`` of ``y`` at ``x`` from weight draws ``{site: (S, *site_shape)}`` (see module math).

    Each draw is plugged into the model with ``poutine.condition`` and the network is evaluated once
    per draw (exact for any architecture and input type); the observation-noise variance
    ``model.obs_noise²`` is added in closed form.
    """
    names = list(samples)
    if not names:
        raise ValueError("samples: no posterior draws")
    S = samples[names[0]].shape[0]
    if S < 2:
        raise ValueError(f"samples: need at least 2 draws for a predictive std, got {S}")
    f = draw_outputs(model, samples, x)  # (S, *y_shape)
    var = f.var(0) + model.obs_noise**2  # unbiased variance over draws + closed-form noise
    return f.mean(0), var.sqrt()


def from_guide(
    guide: KalmanGuide,
    method: str | None = None,
    *,
    model: Any = None,
    data: tuple[Any, torch.Tensor] | None = None,
) -> InferenceResult:
    """Wrap a fitted :class:`~ppl_kbnn.guide.KalmanGuide` as an :class:`InferenceResult`.

    ``predict`` is the closed-form predictive ``(mean, var.sqrt())`` (var includes the obs noise),
    ``wall_seconds`` is ``guide.update_seconds`` (time spent in ``update``), ``memory_bytes`` is
    ``guide.belief_bytes`` (means and covariances). ``method`` defaults to ``"kbt-<covariance>"``.

    ``model`` (the guide's :class:`~ppl_kbnn.model.BayesianModel`) and ``data`` (the ``(x, y)`` it was
    updated on) are needed only for :meth:`InferenceResult.to_inference_data`, whose draws are the guide's
    own samples (the guide run as a Pyro guide in ``pyro.infer.Predictive``: the joint Gaussian belief).
    """

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = guide.predict(x)
        return mean, var.sqrt()

    return InferenceResult(
        method=method if method is not None else f"kbt-{guide.covariance}",
        predict=predict,
        wall_seconds=float(guide.update_seconds),
        memory_bytes=int(guide.belief_bytes),
        diagnostics={
            "n_updates": int(guide.n_updates),
            "covariance": guide.covariance,
            "hidden": guide.hidden,
            "guard_counts": guide.guard_counts,
        },
        fitted=guide,
        model=model,
        data=data,
        sampler=_guide_sampler(model, guide),
    )


def _guide_sampler(model: Any, guide: Any) -> Callable[[int, int], dict[str, torch.Tensor]]:
    """``(num_draws, seed) -> {site: (num_draws, ...)}``: draws of the Bayesian sites from a Pyro guide."""

    def sample(num_draws: int, seed: int) -> dict[str, torch.Tensor]:
        if model is None:
            raise ValueError("InferenceData of a Kalman guide needs its model: from_guide(guide, model=...)")
        with torch.random.fork_rng():  # seeded draws without moving the caller's torch RNG
            torch.manual_seed(seed)
            # the guide alone is run (its sample sites are the model's Bayesian sites; no x needed)
            draws = Predictive(guide, num_samples=num_draws, return_sites=list(model.priors))()
        return {k: v.detach() for k, v in draws.items()}

    return sample
