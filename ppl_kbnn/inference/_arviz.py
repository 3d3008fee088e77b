r"""The one adapter to arviz: convergence diagnostics of per-chain posterior draws.

Input everywhere: ``{site: (chains, draws, *site_shape)}`` (torch tensors or numpy arrays). Output:
plain python floats / numpy arrays / a pandas table, so no arviz object leaks out. Written against
the arviz 0.x ``InferenceData`` API (``az.from_dict``, ``az.rhat``, ``az.ess``, ``az.summary``);
arviz 1.x changed that API, and this module is the only place to adapt.

* R-hat (default ``method="rank"``): the rank-normalised, folded split-R-hat of Vehtari et al. (2021),
  ``R̂ = max(R̂_bulk, R̂_folded)``, with ``R̂ = sqrt(var⁺ / W)``, ``var⁺ = (n-1)/n W + B/n`` computed
  on split chains; ``method="split"`` is the classic split-R-hat (= ``pyro.ops.stats.split_gelman_rubin``).
* ESS: ``n·m / τ``, ``τ = 1 + 2 Σ_k ρ_k`` with Geyer's initial monotone sequence; ``"bulk"`` on
  rank-normalised split chains, ``"tail"`` the min of the ESS of the 5% and 95% quantile indicators,
  ``"identity"`` on the raw (unsplit) chains (= ``pyro.ops.stats.effective_sample_size``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["convergence", "ess", "rhat", "summary"]

Draws = Mapping[str, "torch.Tensor | np.ndarray"]


def _az() -> Any:
    """Import arviz lazily (it is slow to import) and without its import-time FutureWarning banner."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _idata(samples: Draws) -> Any:
    if not samples:
        raise ValueError("samples: no sites")
    posterior = {}
    for name, value in samples.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.ndim < 2:
            raise ValueError(f"samples[{name!r}]: expected shape (chains, draws, ...), got {arr.shape}")
        if arr.shape[1] < 4:
            raise ValueError(f"samples[{name!r}]: need at least 4 draws per chain, got {arr.shape[1]}")
        posterior[name] = arr
    return _az().from_dict(posterior=posterior)


def _num_chains(samples: Draws) -> int:
    return int(next(iter(samples.values())).shape[0])


def rhat(samples: Draws, method: str = "rank") -> dict[str, np.ndarray]:
    """R-hat per site, each shaped like the site (``az.rhat(..., method=method)``); needs >= 2 chains."""
    idata = _idata(samples)
    if _num_chains(samples) < 2:
        raise ValueError("rhat needs at least 2 chains (arviz refuses one chain)")
    ds = _az().rhat(idata, method=method)
    return {name: np.asarray(ds[name].values) for name in samples}


def ess(samples: Draws, method: str = "bulk") -> dict[str, np.ndarray]:
    """Effective sample size per site, each shaped like the site (``az.ess(..., method=method)``)."""
    ds = _az().ess(_idata(samples), method=method)
    return {name: np.asarray(ds[name].values) for name in samples}


def _extreme(per_site: dict[str, np.ndarray], fn: Any) -> float:
    return float(fn([fn(v) for v in per_site.values()]))


def convergence(samples: Draws) -> dict[str, float]:
    """``{"max_rhat", "min_ess_bulk", "min_ess_tail"}`` over every scalar of every site (plain floats; a
    ``nan`` anywhere, e.g. from a parameter that never moved, propagates rather than being skipped).

    ``max_rhat`` is the rank-normalised split-R-hat; it is ``nan`` for a single chain (arviz needs >= 2).
    """
    idata = _idata(samples)
    az = _az()
    out = {"max_rhat": float("nan")}
    stats = [
        ("min_ess_bulk", az.ess(idata, method="bulk"), np.min),
        ("min_ess_tail", az.ess(idata, method="tail"), np.min),
    ]
    if _num_chains(samples) >= 2:
        stats.insert(0, ("max_rhat", az.rhat(idata), np.max))
    for key, ds, fn in stats:
        out[key] = _extreme({name: np.asarray(ds[name].values) for name in samples}, fn)
    return out


def summary(samples: Draws, hdi_prob: float = 0.9) -> Any:
    """An ``az.summary`` table (a pandas DataFrame), one row per scalar parameter.

    Columns: ``mean, sd, hdi_<lo>%, hdi_<hi>%, mcse_mean, mcse_sd, ess_bulk, ess_tail, r_hat``; row
    labels like ``"net.0.weight[0, 1]"``.
    """
    if not 0 < hdi_prob < 1:
        raise ValueError(f"hdi_prob must be in (0, 1), got {hdi_prob}")
    return _az().summary(_idata(samples), hdi_prob=hdi_prob)
