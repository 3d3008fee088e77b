r"""The one adapter to arviz: convergence diagnostics of per-chain posterior draws, and ``InferenceData``.

Input everywhere: ``{site: (chains, draws, *site_shape)}`` (torch tensors or numpy arrays). Output of the
diagnostics: plain python floats / numpy arrays / a pandas table. Written against the arviz 0.x
``InferenceData`` API (``az.from_dict``, ``az.rhat``, ``az.ess``, ``az.summary``, ``az.compare``); arviz 1.x
changed that API, and this module is the only place to adapt.

* R-hat (default ``method="rank"``): the rank-normalised, folded split-R-hat of Vehtari et al. (2021),
  ``R̂ = max(R̂_bulk, R̂_folded)``, with ``R̂ = sqrt(var⁺ / W)``, ``var⁺ = (n-1)/n W + B/n`` computed
  on split chains; ``method="split"`` is the classic split-R-hat (= ``pyro.ops.stats.split_gelman_rubin``).
* ESS: ``n·m / τ``, ``τ = 1 + 2 Σ_k ρ_k`` with Geyer's initial monotone sequence; ``"bulk"`` on
  rank-normalised split chains, ``"tail"`` the min of the ESS of the 5% and 95% quantile indicators,
  ``"identity"`` on the raw (unsplit) chains (= ``pyro.ops.stats.effective_sample_size``).
* :func:`inference_data` assembles an ``az.InferenceData`` from arrays computed elsewhere
  (:meth:`~ppl_kbnn.inference.InferenceResult.to_inference_data`); :func:`compare` is ``az.compare`` of
  several of them on the expected log pointwise predictive density.
* :func:`trace_weights` picks a handful of scalar weights worth looking at (largest R-hat, smallest bulk and
  tail ESS) and :func:`trace_figure` draws their ``az.plot_trace`` (density and trace per chain) and
  ``az.plot_rank`` (rank histograms per chain: flat when the chains mix) into one PNG.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["compare", "convergence", "elpd", "ess", "inference_data", "rhat", "summary", "trace_figure",
           "trace_weights"]

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


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def inference_data(
    posterior: Draws,
    *,
    log_likelihood: torch.Tensor,
    posterior_predictive: torch.Tensor,
    observed: torch.Tensor,
    sample_stats: Draws | None = None,
    attrs: dict[str, Any] | None = None,
) -> Any:
    """An ``az.InferenceData`` (``az.from_dict``) with one observed variable ``"obs"``.

    Args:
        posterior: ``{site: (chains, draws, *site_shape)}``.
        log_likelihood: ``(chains, draws, N)``, one log-density per observation (dim ``obs_id``).
        posterior_predictive: ``(chains, draws, N, ...)`` replicated observations.
        observed: ``(N, ...)`` the observed ``y``.
        sample_stats: ``{stat: (chains, draws)}`` or ``None``.
        attrs: attributes of every group (e.g. ``{"method": "nuts"}``).
    """
    ll = _numpy(log_likelihood)
    if ll.ndim != 3:
        raise ValueError(f"log_likelihood: expected shape (chains, draws, N), got {ll.shape}")
    idata = _az().from_dict(
        posterior={k: _numpy(v) for k, v in posterior.items()},
        log_likelihood={"obs": ll},
        posterior_predictive={"obs": _numpy(posterior_predictive)},
        observed_data={"obs": _numpy(observed)},
        sample_stats=None if sample_stats is None else {k: _numpy(v) for k, v in sample_stats.items()},
        dims={"obs": ["obs_id"]},
    )
    for group in idata.groups():
        idata[group].attrs.update(attrs or {})
    return idata


def _lpd_pointwise(idata: Any) -> np.ndarray:
    """``log (1/S Σ_s p(y_i | θ_s))`` per observation, ``(N,)``, from the ``obs`` log-likelihood ``(C, D, N)``."""
    ll = np.asarray(idata.log_likelihood["obs"].values)
    ll = ll.reshape(-1, ll.shape[-1])  # (S, N)
    m = ll.max(0)
    return m + np.log(np.exp(ll - m).mean(0))  # log-mean-exp over draws


def elpd(idata: Any) -> tuple[float, float]:
    """Log pointwise predictive density ``Σ_i log (1/S Σ_s p(y_i | θ_s))`` of ``idata``'s observations and its
    standard error ``√N · sd_i`` (as arviz's ``se``); on held-out observations, the held-out elpd estimate."""
    lpd = _lpd_pointwise(idata)
    return float(lpd.sum()), float(np.sqrt(lpd.size) * lpd.std())  # arviz's se: ddof 0


def _heldout_elpd_data(idata: Any) -> Any:
    """An arviz ``ELPDData`` (kind ``loo``) whose pointwise values are the held-out ``lpd_i`` (no PSIS: the
    observations were not used to fit), so that ``az.compare`` ranks and differences held-out densities."""
    from arviz.stats.stats_utils import ELPDData

    lpd = _lpd_pointwise(idata)
    n = lpd.size
    S = int(np.prod(idata.log_likelihood["obs"].shape[:2]))
    obs = idata.log_likelihood["obs"]
    loo_i = obs.isel(chain=0, draw=0, drop=True).copy(data=lpd).rename("loo_i")
    pareto_k = loo_i.copy(data=np.zeros(n)).rename("pareto_k")
    return ELPDData(
        data=[float(lpd.sum()), float(np.sqrt(n) * lpd.std(ddof=0)), 0.0, S, n, False, loo_i, pareto_k, "log", 0.7],
        index=["elpd_loo", "se", "p_loo", "n_samples", "n_data_points", "warning", "loo_i", "pareto_k", "scale",
               "good_k"],
    )  # fmt: skip


def compare(idatas: Mapping[str, Any], *, heldout: bool = False) -> Any:
    """``az.compare`` of several ``InferenceData`` on the same observations: a pandas DataFrame, best first
    (columns ``rank, elpd_loo, p_loo, elpd_diff, weight, se, dse, warning, scale``).

    ``heldout=False``: PSIS-LOO on the data each method was fitted on (arviz's own ``az.loo``).
    ``heldout=True``: the observations are held out (not used to fit), so no leave-one-out correction applies:
    the column ``elpd_loo`` holds the held-out log predictive density ``Σ_i log (1/S Σ_s p(y_i | θ_s))``,
    ``se`` its standard error, ``dse`` the standard error of the paired difference to the best method,
    ``p_loo`` is 0 and ``weight`` the stacking weights of the held-out densities.
    """
    if len(idatas) < 2:
        raise ValueError(f"compare needs at least 2 results, got {len(idatas)}")
    data = {k: _heldout_elpd_data(v) for k, v in idatas.items()} if heldout else dict(idatas)
    with quiet():
        return _az().compare(data, ic="loo")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what arviz 0.23 emits on its own account in ``loo`` / ``compare`` / ``plot_trace``: large-Pareto-k
    ``UserWarning`` s (expected on a few dozen observations) and deprecation warnings from pandas and matplotlib
    about arviz's own calls."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _posterior(data: Any) -> Any:
    """An ``InferenceData`` from an ``InferenceData`` (returned as is) or draws ``{site: (chains, draws, ...)}``."""
    return data if hasattr(data, "posterior") else _idata(data)


def trace_weights(data: Any, n: int = 4) -> list[dict[str, Any]]:
    """A handful of scalar weights that show how well the chains mixed: the ``n`` distinct ones first met in
    the order largest R-hat, smallest bulk ESS, smallest tail ESS, second largest R-hat, ... (the worst-mixed
    directions of the posterior; a reader checks the sampler on them, not on all weights).

    Args:
        data: an ``InferenceData`` with >= 2 chains or draws ``{site: (chains, draws, ...)}``.
        n: how many weights (at most the number of scalars).

    Returns:
        One dict per weight, in that order: ``weight`` (the ``az.summary`` label, e.g. ``"net.2.weight[0, 3]"``),
        ``site``, ``index`` (tuple into the site), ``why`` (``"max R-hat"``, ``"min bulk ESS"`` or
        ``"min tail ESS"``, with ``" #k"`` for the k-th in that order), ``mean``, ``sd``, ``r_hat``, ``ess_bulk``,
        ``ess_tail``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    idata = _posterior(data)
    if idata.posterior.sizes["chain"] < 2:
        raise ValueError("trace_weights needs at least 2 chains (R-hat)")
    az = _az()
    table = az.summary(idata, kind="all", round_to="none")  # one row per scalar, labelled "site[i, j]"
    rows = []
    for site, da in idata.posterior.data_vars.items():
        shape = da.shape[2:]
        for index in np.ndindex(*shape):
            label = site if not shape else f"{site}[{', '.join(str(i) for i in index)}]"
            rows.append((label, site, index))
    if len(rows) != len(table):
        raise ValueError(f"az.summary gave {len(table)} rows for {len(rows)} scalars")  # labels must line up
    by_label = {r[0]: r for r in rows}
    orders = [
        ("max R-hat", table["r_hat"].sort_values(ascending=False, kind="stable").index),
        ("min bulk ESS", table["ess_bulk"].sort_values(kind="stable").index),
        ("min tail ESS", table["ess_tail"].sort_values(kind="stable").index),
    ]
    picked: dict[str, str] = {}
    depth = 0
    while len(picked) < min(n, len(rows)):
        for why, order in orders:
            if len(picked) < n and order[depth] not in picked:
                picked[order[depth]] = why if depth == 0 else f"{why} #{depth + 1}"
        depth += 1
    out = []
    for label, why in picked.items():
        row = table.loc[label]
        _, site, index = by_label[label]
        out.append({"weight": label, "site": site, "index": tuple(int(i) for i in index), "why": why,
                    **{k: float(row[k]) for k in ("mean", "sd", "r_hat", "ess_bulk", "ess_tail")}})  # fmt: skip
    return out


def trace_figure(data: Any, weights: list[dict[str, Any]], path: Any, title: str | None = None) -> None:
    """Write one PNG: a row per weight of ``weights`` (from :func:`trace_weights`) with ``az.plot_trace``'s
    per-chain density and trace and ``az.plot_rank``'s per-chain rank histogram (uniform when the chains sample
    the same distribution), the weight's R-hat and ESS in the row title.

    Args:
        data: the ``InferenceData`` (or draws ``{site: (chains, draws, ...)}``) the weights came from.
        weights: rows of :func:`trace_weights` (``site``, ``index``, ``weight``, ``r_hat``, ``ess_bulk``,
            ``ess_tail``).
        path: the PNG file to write.
        title: the figure's title.
    """
    if not weights:
        raise ValueError("weights: nothing to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    idata = _posterior(data)
    az = _az()
    # one scalar variable per weight: (chains, draws)
    chosen = {w["weight"]: np.asarray(idata.posterior[w["site"]].values)[(slice(None), slice(None), *w["index"])]
              for w in weights}  # fmt: skip
    small = az.from_dict(posterior=chosen)
    fig = Figure(figsize=(13, 2.3 * len(weights) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(weights), 3, squeeze=False)  # density | trace | rank
    with quiet():
        az.plot_trace(small, var_names=list(chosen), axes=axes[:, :2], compact=False, legend=False)
        az.plot_rank(small, var_names=list(chosen), ax=axes[:, 2], kind="bars")
    for row, w in zip(axes, weights, strict=True):
        stats = f"R-hat {w['r_hat']:.3f}, ESS bulk {w['ess_bulk']:.0f}, tail {w['ess_tail']:.0f}"
        row[0].set_title(f"{w['weight']}: {stats}", fontsize=9)  # replaces arviz's title (the label alone)
        row[1].set_title(f"trace per chain ({w['why']})", fontsize=9)
        row[1].set_xlabel("draw (after warm-up)", fontsize=8)
        row[2].set_title("rank histogram per chain (flat when mixed)", fontsize=9)
        row[2].set_xlabel("rank over all chains", fontsize=8)
        row[2].set_ylabel("chain", fontsize=8)
        for ax in row:
            ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
