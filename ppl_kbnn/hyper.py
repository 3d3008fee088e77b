r"""Hyperparameters online: outlier handling and the observation-noise belief.

Every update rule reduces one sample to a linear-Gaussian observation of the network output: predicted mean
``ŷ`` ``(m,)``, output covariance from the weights ``P_y`` ``(m, m)`` (no noise), residual ``r = y - ŷ`` and
observation noise ``R = diag(ρ)`` ``(m,)``. Before the Kalman step the guide passes these through
:func:`observation` (see :meth:`~ppl_kbnn.guide.KalmanGuide.update`), which returns the ``ρ`` to use, or
``None`` to skip the sample.

**Outliers.** The innovation's squared Mahalanobis distance is

.. math:: d^2 = r^\top (P_y + R)^{-1} r ,

``χ²_m``-distributed when the belief and the noise are right. Beyond ``outlier_threshold`` (default
:func:`default_threshold`: the ``χ²_m`` quantile at ``1 - 10⁻⁶``, e.g. 23.93 for one output, so a false alarm
once per million well-modelled samples) the sample counts in ``guard_counts["outlier"]`` and

* ``outliers="warn"`` (default): the update happens as usual; one :class:`OutlierWarning` per ``update`` call;
* ``outliers="gate"``: the sample is skipped (weights and noise belief unchanged);
* ``outliers="wolf"``: every sample (flagged or not) is absorbed with the inverse-multiquadric weighted
  likelihood of WoLF (Duran-Martin et al., ICML 2024) on the Mahalanobis distance,

  .. math:: w = (1 + d^2 / c^2)^{-1/2}, \qquad R_w = R / w^2 = R\,(1 + d^2/c^2), \qquad c^2 = \text{outlier\_threshold},

  i.e. the likelihood raised to the power ``w²``. The mean shift of one sample is bounded in ``r`` (it falls
  like ``1/|r|`` for large residuals); an ordinary sample (``d² ≈ m``) is absorbed with ``R`` inflated by
  ``m / c²`` (4% for one output).

**Observation noise**: the noise variance of each network output ``k`` has an inverse-Gamma belief
``σ_k² ~ IG(α_k, β_k)``, prior ``α₀ = 1``, ``β₀ = σ₀²`` with ``σ₀`` the model's ``obs_noise`` (the prior guess).
Per sample, with ``n_k`` the number of observed entries of output ``k`` (``observe="all"``: one per token),
``ρ = β/α`` the current plug-in noise variance (``ρ_i`` that of entry ``i``'s output) and
``S = P_y + diag(ρ / w²)`` (``w² = 1`` unless ``outliers="wolf"``):

.. math::
    \text{weights: the Kalman step with } R = \mathrm{diag}(\rho / w^2); \qquad
    \alpha_k^+ = \alpha_k + n_k / 2, \qquad
    \beta_k^+ = \beta_k + \tfrac12 \max\!\big(0, \textstyle\sum_{i \in k} \rho_i\, r_i\, (S^{-1} r)_i\big),

so the standardised innovations ``r² / S`` are driven to average one. The estimate moved by
``f = ∏_k (ρ_k^+ / ρ_k)^{1/d_out}`` (the geometric mean over outputs: several outputs share one weight belief, an
approximation), and the three rules differ in what they then do to the weight belief:

* ``obs_noise="auto"`` (reweigh): the data absorbed so far were weighed by ``1/ρ``; they are reweighed by
  ``1/ρ⁺``, keeping the prior ``N(μ₀, Λ₀⁻¹)`` in absolute units (:meth:`~ppl_kbnn.beliefs.Belief.reweigh_data`
  with ``c = 1/f``):

  .. math:: Λ^+ = Λ_0 + c\,(Λ - Λ_0), \qquad Λ^+ μ^+ = Λ_0 μ_0 + c\,(Λ μ - Λ_0 μ_0).

  On a linear network the belief after every sample is then the exact Gaussian posterior of all samples so far
  under the current plug-in noise (tested) — the weights' step of variational Bayes with an inverse-Gamma noise
  belief (Särkkä and Nummenmaa 2009) with the past data re-weighed exactly instead of left at the noise they were
  absorbed with. A guess far too small therefore does not leave the weights overconfident: the early samples lose
  their excess weight as the estimate grows. On a network, ``Λ - Λ₀`` is the linearised data information each
  structure holds (KBNN's hidden-neuron blocks included), reweighed as if it were exact. Cost per sample: one
  batched ``p × p`` solve per linear map (``block``), a ``D × D`` solve (``full``), elementwise (``diag``,
  ``lowrank``).
* ``obs_noise="auto-conjugate"``: the weight belief is held *conditional on the noise*, as in the conjugate
  normal-inverse-Gamma model, ``θ | σ² ~ N(μ, (σ²/ρ) P)``: ``P⁺ ← f P⁺``. For one output this is exactly the
  conjugate update (``ρ r² / S = r² / S̃`` with ``S̃ = J V Jᵀ + 1`` in noise units): on a linear network the belief
  mean is the exact posterior mean, ``P = (β/α) V`` the scale matrix of the exact Student-t marginal and ``(α, β)``
  the exact noise posterior (tested). Its prior scales with the noise, ``θ | σ² ~ N(μ₀, (σ²/σ₀²) P₀)``: noise ``k``
  times the guess widens the weight prior ``k`` times, which overstates the epistemic part (and understates the
  noise) when ``prior_scale`` is an absolute statement, e.g. how far fine-tuning may move pre-trained weights.
* ``obs_noise="auto-independent"``: the weight belief is left as it is (a Kalman filter with the plug-in noise).
  Samples absorbed while ``ρ`` is still far too small leave the weights overconfident, and their later residuals
  are read as noise (estimate biased high after a guess far too small). Kept as the ablation of the reweighing.

``guide.obs_noise`` reports ``sqrt(β/α)``; :meth:`NoiseBelief.distribution` the whole inverse-Gamma belief.
Measured against each other in docs/hyper.md.
"""

from __future__ import annotations

import math
from functools import lru_cache

import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["NOISE_MODES", "NOISE_RULES", "OUTLIERS", "PRIOR_GRID", "NoiseBelief", "OutlierWarning", "default_threshold",
           "observation"]

OUTLIERS = ("warn", "gate", "wolf")
"""``outliers=`` modes (module docstring)."""

NOISE_MODES = ("auto", "auto-conjugate", "auto-independent")
"""``obs_noise=`` modes that learn the noise (module docstring): the data reweighed by each new estimate (the
default), the conjugate normal-inverse-Gamma rule, or the weight belief left alone."""

NOISE_RULES = {"auto": "reweigh", "auto-conjugate": "conjugate", "auto-independent": "independent"}
"""The :class:`NoiseBelief` rule of each ``obs_noise=`` mode."""

PRIOR_GRID = (0.05, 0.1, 0.2, 0.5, 1.0)
"""Candidate prior scales of ``prior_scale="auto"``."""

PRIOR_DISCOUNT = 0.99
"""Discount of the candidates' accumulated log predictive densities per sample (memory about 100 samples)."""

FALSE_ALARM = 1e-6
"""Tail probability of the default outlier threshold on well-modelled (Gaussian) data."""


class OutlierWarning(UserWarning):
    """An update absorbed a sample whose innovation lies beyond the outlier threshold (``outliers="warn"``)."""


@lru_cache(maxsize=64)
def default_threshold(m: int) -> float:
    """The ``χ²_m`` quantile at ``1 - 10⁻⁶``: the default ``d²`` threshold for ``m`` observed outputs."""
    from scipy.stats import chi2

    return float(chi2.isf(FALSE_ALARM, m))


class NoiseBelief(nn.Module):
    """Inverse-Gamma belief ``IG(α_k, β_k)`` over each output's noise variance (module docstring); buffers
    ``alpha``, ``beta`` ``(d_out,)``, so it is part of the guide's ``state_dict``. ``rule``: what the guide does
    to the weight belief when the estimate moves (:data:`NOISE_RULES`)."""

    RULES = tuple(NOISE_RULES.values())

    def __init__(self, d_out: int, prior_std: float, dtype: torch.dtype, alpha0: float = 1.0, rule: str = "reweigh",
                 *, device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        if rule not in self.RULES:
            raise ValueError(f"NoiseBelief: rule must be one of {self.RULES}, got {rule!r}")
        self.alpha0, self.rule = float(alpha0), rule
        self.register_buffer("alpha", torch.full((d_out,), self.alpha0, dtype=dtype, device=device))
        self.register_buffer("beta", torch.full((d_out,), self.alpha0 * prior_std**2, dtype=dtype, device=device))

    @property
    def var(self) -> torch.Tensor:
        """The plug-in noise variances ``β/α`` ``(d_out,)`` (``1/E[σ⁻²]``)."""
        return self.beta / self.alpha

    def distribution(self) -> dist.Distribution:
        """The belief over the noise variances: ``InverseGamma(α, β)``, batch ``(d_out,)``."""
        return dist.InverseGamma(self.alpha, self.beta)

    def std(self) -> torch.Tensor:
        """Posterior standard deviation of each noise variance (``inf`` while ``α <= 2``)."""
        a, b = self.alpha, self.beta
        return torch.where(a > 2, b / (a - 1) / (a - 2).clamp_min(1e-300).sqrt(), torch.full_like(a, math.inf))

    def check_state(self, state: dict, prefix: str = "") -> None:
        """Validate a checkpoint's ``alpha``/``beta``: finite and positive (``ValueError`` names the entry)."""
        for k in ("alpha", "beta"):
            v = state[k]
            if not torch.isfinite(v).all() or (v <= 0).any():
                raise ValueError(f"{prefix}{k}: the noise belief's parameters must be finite and > 0")

    def step(self, P_y: torch.Tensor, resid: torch.Tensor, w2: float) -> tuple[torch.Tensor, float]:
        """One sample's step (module docstring): updates ``alpha``/``beta`` in place; returns ``ρ / w²`` ``(m,)``
        (the noise variances of the weights' Kalman step) and the ratio ``f = ρ⁺/ρ`` of the new to the old plug-in
        variance (geometric mean over outputs), by which the guide rescales the weight belief."""
        m, d = resid.shape[0], self.alpha.shape[0]
        idx = torch.arange(m, device=resid.device) % d  # output of each observed entry (row-major (T, d_out))
        n_k = torch.bincount(idx, minlength=d).to(self.alpha.dtype)
        rho_k = self.var
        rho = rho_k[idx] / w2  # (m,)
        S = P_y + torch.diag(rho)
        q = rho * w2 * resid * torch.linalg.solve(S, resid)  # (m,): ρ_i r_i (S⁻¹ r)_i
        self.alpha.add_(0.5 * n_k)
        self.beta.add_(0.5 * torch.zeros_like(self.beta).index_add_(0, idx, q).clamp_min(0))
        if self.rule == "independent":  # obs_noise="auto-independent": the weight belief is left as it is
            return rho, 1.0
        return rho, float(torch.exp(torch.log(self.var / rho_k).mean()))


def observation(guide, P_y: torch.Tensor, resid: torch.Tensor) -> torch.Tensor | None:
    """The observation-noise variances ``ρ`` ``(m,)`` for this sample's Kalman step, or ``None`` to skip it.

    ``P_y`` ``(m, m)``: the output covariance from the weights (no noise); ``resid`` ``(m,)``. Applies the outlier
    test and mode and the noise belief of ``guide`` (module docstring); records ``d²`` and the log predictive
    density ``log N(r; 0, P_y + R)`` on the guide (``_last_d2``, ``_last_logpdf``).
    """
    m = resid.shape[0]
    noise = guide.noise
    if noise is None:
        R = torch.full((m,), guide.obs_noise**2, dtype=resid.dtype, device=resid.device)
    else:
        d = noise.alpha.shape[0]
        R = noise.var[torch.arange(m, device=resid.device) % d]
    S = P_y + torch.diag(R)
    L, info = torch.linalg.cholesky_ex(S)
    if info != 0:  # not positive definite (a degenerate belief): fall back to the symmetric solve
        d2 = float(resid @ torch.linalg.solve(S, resid))
        logdet = float(torch.linalg.slogdet(S)[1])
    else:
        z = torch.linalg.solve_triangular(L, resid[:, None], upper=False)[:, 0]
        d2 = float(z @ z)
        logdet = 2.0 * float(torch.log(torch.diagonal(L)).sum())
    guide._last_d2 = d2
    guide._last_logpdf = -0.5 * (d2 + logdet + m * math.log(2 * math.pi))
    thr = guide._outlier_threshold(m)
    if d2 > thr:
        guide.guards.counts["outlier"] += 1
        guide._outliers_in_call += 1
        if guide.outliers == "gate":
            return None
    w2 = 1.0 / (1.0 + d2 / thr) if guide.outliers == "wolf" else 1.0
    if noise is not None:
        rho, guide._noise_ratio = noise.step(P_y, resid, w2)
        return rho
    return R / w2
