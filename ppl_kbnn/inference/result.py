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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyro.poutine as poutine
import torch

if TYPE_CHECKING:
    from ..guide import KalmanGuide

__all__ = ["InferenceResult", "draws_predictive", "from_guide", "model_output", "tensor_bytes"]

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
            KalmanGuide); ``None`` for NUTS.
    """

    method: str
    predict: Predict
    wall_seconds: float
    memory_bytes: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] | None = None
    trace: list[float] | None = None
    fitted: Any = None


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
    outs = []
    for s in range(S):
        with poutine.condition(data={k: v[s] for k, v in samples.items()}):
            outs.append(model_output(model, x))
    f = torch.stack(outs)  # (S, *y_shape)
    var = f.var(0) + model.obs_noise**2  # unbiased variance over draws + closed-form noise
    return f.mean(0), var.sqrt()


def from_guide(guide: KalmanGuide, method: str | None = None) -> InferenceResult:
    """Wrap a fitted :class:`~ppl_kbnn.guide.KalmanGuide` as an :class:`InferenceResult`.

    ``predict`` is the closed-form predictive ``(mean, var.sqrt())`` (var includes the obs noise),
    ``wall_seconds`` is ``guide.update_seconds`` (time spent in ``update``), ``memory_bytes`` is
    ``guide.belief_bytes`` (means and covariances). ``method`` defaults to ``"kbt-<covariance>"``.
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
    )
