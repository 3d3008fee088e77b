"""ArviZ ``InferenceData`` of every inference method on one small problem, and ``az.summary`` / ``az.loo`` /
``az.compare`` on them.

Problem: ``pretrained_mlp(4)`` (13 weights, all Bayesian, prior scale 0.1, obs noise 0.1), 20 training samples of
``sin x + 0.3 x``, 30 held-out samples. NUTS 2 chains × (50 warm-up + 50 draws) with a dense mass matrix (short:
the tests check structure and bookkeeping, not convergence), SVI (mean field), the Kalman guide (block) and the
Laplace baseline (full, kron).
"""

import warnings

import numpy as np
import pytest
import torch

import ppl_kbnn as pk
from ppl_kbnn import inference as inf
from ppl_kbnn.inference._arviz import quiet
from ppl_kbnn.inference.laplace import _import_laplace
from ppl_kbnn.toy import pretrained_mlp, regression_stream

C, D = 2, 50
N, NT = 20, 30
S = 400  # draws of the sampled approximations (Kalman, Laplace)
NOISE = 0.1
Z = 4.5  # Monte-Carlo tolerance in standard errors


@pytest.fixture(autouse=True, scope="module")
def one_thread_float64():
    """Module-scoped fixtures run before conftest's per-test float64 fixture: set it for the module."""
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old_dtype)
    torch.set_num_threads(old_threads)


@pytest.fixture(scope="module")
def az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


@pytest.fixture(scope="module")
def runs(one_thread_float64):
    model = pk.BayesianModel(pretrained_mlp(4, steps=500), prior_scale=0.1, obs_noise=NOISE)
    X, Y = regression_stream(N)
    Xt, Yt = regression_stream(NT, seed=7)
    guide = pk.KalmanGuide(model, covariance="block").update(X, Y)
    results = [
        inf.nuts(model, X, Y, num_samples=D, warmup_steps=50, num_chains=C, seed=0, full_mass=True),
        inf.svi(model, X, Y, guide="normal", num_steps=300, lr=0.02, num_predict=S, seed=0),
        inf.from_guide(guide, model=model, data=(X, Y)),
    ]
    if HAVE_LAPLACE:
        results += [inf.laplace(model, X, Y, "full"), inf.laplace(model, X, Y, "kron")]
    idatas = {r.method: r.to_inference_data(num_draws=S if r.sampler else None, seed=1) for r in results}
    return {"model": model, "X": X, "Y": Y, "Xt": Xt, "Yt": Yt, "guide": guide,
            "results": {r.method: r for r in results}, "idatas": idatas}  # fmt: skip


def _t(values) -> torch.Tensor:
    """An xarray / numpy array as a (writable) torch tensor."""
    return torch.tensor(np.array(getattr(values, "values", values)))


try:  # laplace-torch is optional (the "laplace" extra); without it the Laplace rows are left out
    _import_laplace()
    HAVE_LAPLACE = True
except ImportError:
    HAVE_LAPLACE = False
METHODS = ["nuts", "svi-normal", "kbt-block"] + (["laplace-full", "laplace-kron"] if HAVE_LAPLACE else [])


def test_inference_data_groups_dims_and_shapes(runs):
    model, Y = runs["model"], runs["Y"]
    assert list(runs["idatas"]) == METHODS
    for method, idata in runs["idatas"].items():
        groups = set(idata.groups())
        assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data"} <= groups, method
        chains, draws = (C, D) if method == "nuts" else (1, S)
        for site, (loc, _) in model.priors.items():
            assert idata.posterior[site].dims[:2] == ("chain", "draw")
            assert idata.posterior[site].shape == (chains, draws, *loc.shape), (method, site)
        assert idata.log_likelihood["obs"].dims == ("chain", "draw", "obs_id")
        assert idata.log_likelihood["obs"].shape == (chains, draws, N)
        assert idata.posterior_predictive["obs"].shape == (chains, draws, N, 1)
        torch.testing.assert_close(_t(idata.observed_data["obs"].values), Y, rtol=0, atol=0)
        assert idata.posterior.attrs["method"] == method
    assert "sample_stats" in runs["idatas"]["nuts"].groups()


def test_nuts_keeps_its_chains_and_sampler_statistics(runs):
    res, idata = runs["results"]["nuts"], runs["idatas"]["nuts"]
    for site, flat in res.samples.items():  # the flattened samples are the chains, chain-major
        torch.testing.assert_close(_t(idata.posterior[site].values),
                                   flat.reshape(C, D, *flat.shape[1:]), rtol=0, atol=0)  # fmt: skip
    stats = idata.sample_stats
    assert stats["diverging"].shape == stats["step_size"].shape == stats["acceptance_rate"].shape == (C, D)
    assert int(stats["diverging"].values.sum()) == res.diagnostics["divergences"]
    for c in range(C):  # the step size is frozen after warm-up: every draw has the final one
        assert (stats["step_size"].values[c] == res.diagnostics["step_size"][c]).all()
    acc = stats["acceptance_rate"].values
    assert ((acc >= -1e-9) & (acc <= 1 + 1e-9)).all() and 0.5 < acc.mean() <= 1


def test_log_likelihood_and_predictive_are_those_of_the_draws(runs):
    """The pointwise log-likelihood is the Normal density of each observation under f(x; θ_s) (the network for
    NUTS / SVI / Kalman; the linearised network for Laplace), and y_rep - f is N(0, σ²) noise."""
    model, X, Y = runs["model"], runs["X"], runs["Y"]
    for method in ("nuts", "kbt-block"):
        idata = runs["idatas"][method]
        c, d = idata.posterior.sizes["chain"] - 1, 3
        theta = {k: _t(idata.posterior[k].values[c, d]) for k in model.priors}
        f = inf.draw_outputs(model, {k: v[None] for k, v in theta.items()}, X)[0]  # (N, 1)
        expected = torch.distributions.Normal(f, NOISE).log_prob(Y).sum(-1)  # (N,)
        torch.testing.assert_close(_t(idata.log_likelihood["obs"].values[c, d]), expected)
        eps = (_t(idata.posterior_predictive["obs"].values[c, d]) - f) / NOISE  # (N, 1)
        assert eps.mean().abs() < Z / N**0.5 and (eps.std() - 1).abs() < Z / (2 * N) ** 0.5
    if not HAVE_LAPLACE:
        return
    # Laplace: the draws go through the linearised network, so they reproduce its GLM predictive (mean and std)
    lap = runs["results"]["laplace-full"]
    mean, std = lap.predict(X)
    pp = _t(runs["idatas"]["laplace-full"].posterior_predictive["obs"].values[0])  # (S, N, 1)
    z = (pp.mean(0) - mean) / (std / S**0.5)
    assert z.abs().max() < Z, z.abs().max()
    z_std = (pp.std(0) / std - 1) / (0.5 / S) ** 0.5  # se of a sample std of S Gaussian draws: std / sqrt(2S)
    assert z_std.abs().max() < Z, z_std.abs().max()


def test_sampled_draws_follow_the_fitted_gaussian(runs):
    """Kalman guide draws have the belief's means (marginals from ``guide.posterior()``); Laplace-full draws the
    posterior covariance laplace-torch holds; both within Monte-Carlo error."""
    post = runs["guide"].posterior()
    idata = runs["idatas"]["kbt-block"]
    for site, d in post.items():
        draws = _t(idata.posterior[site].values[0])  # (S, ...)
        z = (draws.mean(0) - d.mean) / (d.variance.sqrt() / S**0.5)
        assert z.abs().max() < Z, (site, z.abs().max())
        ratio = draws.var(0) / d.variance
        assert ((ratio - 1).abs() < Z * (2 / S) ** 0.5).all(), (site, ratio)
    if not HAVE_LAPLACE:
        return
    lap = runs["results"]["laplace-full"]
    idata = runs["idatas"]["laplace-full"]
    theta = torch.cat([_t(idata.posterior[s].values[0]).reshape(S, -1)
                       for s in lap.diagnostics["laplace_sites"]], 1)  # (S, 13)  # fmt: skip
    var = lap.fitted.posterior_covariance.diagonal()
    assert ((theta.var(0) / var - 1).abs() < Z * (2 / S) ** 0.5).all()
    assert ((theta.mean(0) - lap.fitted.mean).abs() / (var / S).sqrt()).max() < Z


def test_summary_loo_and_compare(runs, az):
    idatas = runs["idatas"]
    for method, idata in idatas.items():
        table = az.summary(idata)
        assert len(table) == 13 and {"mean", "sd", "r_hat", "ess_bulk"} <= set(table.columns), method
        with quiet():  # large Pareto k on 20 points is expected
            loo = az.loo(idata, pointwise=True)
        assert loo.n_data_points == N and loo.n_samples == (C * D if method == "nuts" else S)
        assert torch.isfinite(torch.tensor(loo.elpd_loo)) and loo.loo_i.shape == (N,)
    assert torch.isfinite(_t(az.summary(idatas["nuts"])["r_hat"].values)).all()
    with quiet():  # arviz's own pandas deprecation warnings
        table = az.compare(idatas)
    assert sorted(table.index) == sorted(METHODS) and sorted(table["rank"]) == list(range(len(METHODS)))
    assert (table["elpd_loo"].diff().dropna() <= 0).all()  # best first
    # the adapter gives the same table
    ours = inf.compare(idatas)
    assert list(ours.index) == list(table.index)


def test_heldout_compare_ranks_the_heldout_log_predictive_density(runs):
    held = {m: r.to_inference_data(runs["Xt"], runs["Yt"], num_draws=S if r.sampler else None, seed=2)
            for m, r in runs["results"].items()}  # fmt: skip
    table = inf.compare(held, heldout=True)
    assert sorted(table.index) == sorted(METHODS)
    for m, idata in held.items():
        lpd, se = inf.elpd(idata)
        ll = _t(idata.log_likelihood["obs"].values).reshape(-1, NT)  # (S, NT)
        by_hand = (torch.logsumexp(ll, 0) - torch.log(torch.tensor(float(ll.shape[0])))).sum()
        assert lpd == pytest.approx(float(by_hand), rel=1e-12)
        assert table.loc[m, "elpd_loo"] == pytest.approx(lpd) and table.loc[m, "se"] == pytest.approx(se)
        assert table.loc[m, "p_loo"] == 0
    assert (table["elpd_loo"].diff().dropna() <= 0).all() and table["dse"].iloc[0] == 0


def test_plot_trace_runs(runs, az):
    import matplotlib

    matplotlib.use("Agg")
    with quiet():  # arviz's own matplotlib deprecation warnings
        axes = az.plot_trace(runs["idatas"]["nuts"], var_names=["net.2.bias"])
    assert axes.shape == (1, 2)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_trace_weights_are_the_least_mixed_and_the_figure_is_written(runs, az, tmp_path):
    """``trace_weights`` picks the scalars with the largest R-hat and the smallest bulk / tail ESS of ``az.summary``
    (the validate report's trace / rank figure shows them); ``trace_figure`` writes the PNG."""
    from ppl_kbnn.inference import trace_figure, trace_weights

    idata = runs["idatas"]["nuts"]
    table = az.summary(idata, kind="all", round_to="none")
    picked = trace_weights(idata, 4)
    assert len(picked) == 4 and len({w["weight"] for w in picked}) == 4
    by = {w["why"]: w for w in picked}
    assert by["max R-hat"]["weight"] == table["r_hat"].idxmax()
    assert table["ess_bulk"].idxmin() in {w["weight"] for w in picked}
    assert table["ess_tail"].idxmin() in {w["weight"] for w in picked}
    for w in picked:  # the row's statistics and its (site, index) point at the same scalar
        assert w["r_hat"] == table.loc[w["weight"], "r_hat"] and w["ess_bulk"] == table.loc[w["weight"], "ess_bulk"]
        draws = idata.posterior[w["site"]].values[(slice(None), slice(None), *w["index"])]  # (C, D)
        assert draws.shape == (C, D) and w["mean"] == pytest.approx(float(draws.mean()), rel=1e-12)
    # the same from plain draws {site: (chains, draws, ...)}
    chains = {k: v.reshape(C, D, *v.shape[1:]) for k, v in runs["results"]["nuts"].samples.items()}
    assert [w["weight"] for w in trace_weights(chains, 4)] == [w["weight"] for w in picked]
    assert len(trace_weights(idata, 100)) == 13  # at most every scalar
    png = tmp_path / "trace.png"
    trace_figure(idata, picked, png, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    with pytest.raises(ValueError, match="n must be"):
        trace_weights(idata, 0)
    with pytest.raises(ValueError, match="2 chains"):
        trace_weights({k: v[:1] for k, v in chains.items()})
    with pytest.raises(ValueError, match="nothing to plot"):
        trace_figure(idata, [], png)


def test_to_inference_data_errors(runs):
    model, X, Y = runs["model"], runs["X"], runs["Y"]
    point = inf.retrain(model, X, Y, memory=4, epochs=1, lr=0.01)
    with pytest.raises(ValueError, match="point estimate"):
        point.to_inference_data()
    with pytest.raises(ValueError, match="model="):
        inf.from_guide(runs["guide"]).to_inference_data(X, Y)
    res = runs["results"]["svi-normal"]
    with pytest.raises(ValueError, match="both x and y"):
        res.to_inference_data(X)
    with pytest.raises(ValueError, match="num_draws"):
        res.to_inference_data(num_draws=1)
    with pytest.raises(ValueError, match="y: expected shape"):
        res.to_inference_data(X, Y[:, 0])
    with pytest.raises(ValueError, match="at least 2"):
        inf.compare({"a": runs["idatas"]["nuts"]})
