r"""The pendulum study's uncertainty part: KBT's predicted std against its actual error under label noise.

:func:`uncertainty_study` adds Gaussian label noise ``σ`` (normalised action units) to the streamed and the
held-out labels, updates a fresh KBT guide with the first ``n_uncertainty`` noisy streamed samples and compares
its closed-form predictive std (observation noise included) with its actual error on the noisy held-out labels.
The observation noise follows one of three policies:

* ``"matched"``: ``obs_noise = sqrt(obs_noise² + σ²)``: the model is told the injected noise;
* ``"fixed"``: ``obs_noise`` whatever ``σ``: the model is not told;
* ``"auto"``: ``KalmanGuide(obs_noise="auto")``: the noise variance is learnt online from the stream
  (inverse-Gamma belief, prior centred on ``obs_noise``), the weight prior kept at ``prior_scale`` and the
  samples absorbed so far reweighed by every new estimate (:mod:`ppl_kbnn.hyper`);
* ``"auto-conjugate"``: ``KalmanGuide(obs_noise="auto-conjugate")``: the same noise belief, the conjugate
  normal-inverse-Gamma rule (the weight prior scales with the noise estimate);
* ``"auto-independent"``: ``KalmanGuide(obs_noise="auto-independent")``: the same noise belief, the weight
  belief left as absorbed (an ablation of the reweighing).

Learnt-noise rows report the final estimate ``sqrt(β/α)`` and a 90 % credible interval of it.

The residual the model sees is label noise *plus* the pre-trained network's misfit on the shifted task, so the
noise the auto policy should find is about ``sqrt(misfit² + σ²)``, not ``σ``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..guide import KalmanGuide
from ..hyper import OutlierWarning
from ..model import BayesianModel

__all__ = ["POLICIES", "uncertainty_study"]

POLICIES = ("matched", "fixed", "auto", "auto-conjugate", "auto-independent")
"""Observation-noise policies of :func:`uncertainty_study` (module docstring)."""

Z90 = 1.6448536269514722  # the standard normal 0.95 quantile: a central 90 % interval is mean ± Z90 · std


def _take(x: Mapping[str, torch.Tensor], idx: Any) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in x.items()}


def _predict(guide: KalmanGuide, x: Mapping[str, torch.Tensor], chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``guide.predict`` in chunks of ``chunk`` samples (its cost grows faster than linearly with the batch size)."""
    n = next(iter(x.values())).shape[0]
    parts = [guide.predict(_take(x, slice(i, i + chunk))) for i in range(0, n, chunk)]
    return torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])


class _Quiet:
    """The progress interface of the study (``bar``, ``log``) doing nothing."""

    def bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=True)

    def log(self, msg: str) -> None:
        pass


def _noise_estimate(guide: KalmanGuide) -> dict[str, Any]:
    """The auto policy's final noise belief: estimate ``sqrt(β/α)``, the std of the noise variance and a 90 %
    credible interval of the noise std (inverse-Gamma quantiles, square-rooted)."""
    from scipy.stats import invgamma

    a, b = float(guide.noise.alpha[0]), float(guide.noise.beta[0])
    lo, hi = invgamma.ppf([0.05, 0.95], a, scale=b)
    return {
        "obs_noise": math.sqrt(b / a),
        "obs_noise_var_std": float(guide.noise.std()[0]),
        "obs_noise_interval_90": [math.sqrt(lo), math.sqrt(hi)],
        "noise_alpha": a,
        "noise_beta": b,
    }


def uncertainty_study(
    net: nn.Module,
    s: Any,
    seed: int,
    x_stream: Mapping[str, torch.Tensor],
    y_stream: torch.Tensor,
    x_held: Mapping[str, torch.Tensor],
    y_held: torch.Tensor,
    P: Any = None,
) -> dict[str, Any]:
    """Label noise σ on the streamed and held-out actions; KBT's predicted std vs its actual error, per policy.

    Args:
        net: the pre-trained network (not modified; every guide works on its own Bayesian model of it).
        s: the study's :class:`~ppl_kbnn.pendulum.StudySettings` (uses ``noise_levels``, ``obs_noise_policies``,
            ``n_uncertainty``, ``n_heldout_uncertainty``, ``prior_scale``, ``obs_noise``,
            ``uncertainty_covariance``, ``hidden``).
        seed: seeds the noise draws (``seed + 7``).
        x_stream, y_stream: streamed contexts (dict of ``(N, ...)`` tensors) and clean labels ``(N, 1)`` in
            streaming order; the first ``n_uncertainty`` are used.
        x_held, y_held: held-out contexts and clean labels; the first ``n_heldout_uncertainty`` are used.
        P: progress (the study's, with ``bar(total, desc)`` and ``log(msg)``); ``None``: silent.

    Returns:
        ``{"units", "covariance", "hidden", "n_updates", "n_heldout", "noise", "obs_noise_policies", "rows"}``;
        one row per (σ, policy): ``sigma``, ``obs_noise_policy``, ``obs_noise`` (the std used; for a learnt noise the
        final estimate), ``n_updates``, ``mean_pred_std``, ``rms_pred_std``, ``mean_epistemic_std``,
        ``rmse_noisy_labels``, ``rmse_clean_labels``, ``coverage_90``, ``nll``, ``seconds_per_sample``,
        ``outliers`` (``guard_counts["outlier"]``); learnt-noise rows also ``obs_noise_var_std``,
        ``obs_noise_interval_90``, ``noise_alpha``, ``noise_beta``.

    Raises:
        ValueError: an unknown policy, or fewer streamed / held-out samples than the settings ask for.
    """
    P = _Quiet() if P is None else P
    bad = [p for p in s.obs_noise_policies if p not in POLICIES]
    if bad:
        raise ValueError(f"obs_noise_policies: unknown policy {bad}; choose from {POLICIES}")
    n = s.n_uncertainty
    if y_stream.shape[0] < n:
        raise ValueError(f"uncertainty_study needs {n} streamed samples (n_uncertainty), got {y_stream.shape[0]}")
    dtype = y_stream.dtype
    gen = torch.Generator().manual_seed(seed + 7)
    eps_stream = torch.randn(n, 1, generator=gen, dtype=dtype)  # one draw, scaled by every σ (common numbers)
    x_held, y_held = _take(x_held, slice(0, s.n_heldout_uncertainty)), y_held[: s.n_heldout_uncertainty]
    eps_held = torch.randn(y_held.shape, generator=gen, dtype=dtype)
    xs, ys = _take(x_stream, slice(0, n)), y_stream[:n]
    rows = []
    bar = P.bar(len(s.noise_levels) * len(s.obs_noise_policies) * n, "uncertainty")
    for sigma in s.noise_levels:
        y_noisy, y_held_noisy = ys + sigma * eps_stream, y_held + sigma * eps_held
        for policy in s.obs_noise_policies:
            r = math.sqrt(s.obs_noise**2 + sigma**2) if policy == "matched" else s.obs_noise
            model = BayesianModel(net, prior_scale=s.prior_scale, obs_noise=r, bayesian="all")
            auto = {"obs_noise": policy} if policy.startswith("auto") else {}
            guide = KalmanGuide(model, covariance=s.uncertainty_covariance, hidden=s.hidden, **auto)
            with warnings.catch_warnings():  # a too-small fixed noise is surprised by design; counted in the rows
                warnings.simplefilter("ignore", OutlierWarning)
                for i in range(n):
                    guide.update(_take(xs, slice(i, i + 1)), y_noisy[i : i + 1])
                    bar.update(1)
            mean, var = _predict(guide, x_held)  # (N, 1) each; var includes the noise variance
            est = _noise_estimate(guide) if auto else {"obs_noise": r}
            std = var.sqrt()
            err = mean - y_held_noisy
            epi = (var - est["obs_noise"] ** 2).clamp_min(0.0)
            rows.append({
                "sigma": sigma,
                "obs_noise_policy": policy,
                **est,
                "n_updates": guide.n_updates,
                "mean_pred_std": float(std.mean()),
                "rms_pred_std": float(var.mean().sqrt()),
                "mean_epistemic_std": float(epi.sqrt().mean()),
                "rmse_noisy_labels": float((err**2).mean().sqrt()),
                "rmse_clean_labels": float(((mean - y_held) ** 2).mean().sqrt()),
                "coverage_90": float((err.abs() <= Z90 * std).double().mean()),
                "nll": float((0.5 * (math.log(2 * math.pi) + var.log() + err**2 / var)).mean()),
                "seconds_per_sample": guide.update_seconds / n,
                "outliers": int(guide.guard_counts.get("outlier", 0)),
            })  # fmt: skip
    bar.close()
    for row in rows:
        P.log(f"sigma {row['sigma']:.2f} ({row['obs_noise_policy']}, obs_noise {row['obs_noise']:.3f}): "
              f"predicted std {row['mean_pred_std']:.3f}, RMSE {row['rmse_noisy_labels']:.3f}, "
              f"90% coverage {row['coverage_90']:.2f}")  # fmt: skip
    described = {
        "matched": f"obs_noise = sqrt({s.obs_noise:g}^2 + sigma^2): the model knows the injected noise",
        "fixed": f"obs_noise = {s.obs_noise:g} whatever sigma: the model does not know it",
        "auto": f"obs_noise='auto': the noise learnt online (prior guess {s.obs_noise:g}), the weight prior fixed at "
        f"prior_scale {s.prior_scale:g}, the samples absorbed so far reweighed by every new estimate; obs_noise is "
        "the final estimate",
        "auto-conjugate": f"obs_noise='auto-conjugate': the noise learnt online (prior guess {s.obs_noise:g}; "
        "conjugate rule, the weight prior scales with the noise); obs_noise is the final estimate",
        "auto-independent": f"obs_noise='auto-independent': the noise learnt online (prior guess {s.obs_noise:g}), "
        f"the weight belief left as absorbed (prior_scale {s.prior_scale:g}); obs_noise is the final estimate",
    }
    return {
        "units": "normalised actions (action / 3, the tanh head's scale); sigma = injected label-noise std",
        "covariance": s.uncertainty_covariance,
        "hidden": s.hidden,
        "n_updates": n,
        "n_heldout": int(y_held.shape[0]),
        "noise": "the same standard-normal draws scaled by every sigma (streamed and held-out labels independently)",
        "obs_noise_policies": {p: described[p] for p in s.obs_noise_policies},
        "rows": rows,
    }
