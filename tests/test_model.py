"""BayesianModel: the Pyro model of a pre-trained network."""

import pyro
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import ppl_kbnn as pk


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))


def test_sites_priors_and_fixed_rest():
    net = mlp()
    model = pk.BayesianModel(net, prior_scale=0.1, obs_noise=0.2, bayesian=["2"])
    assert model.site_names == ["net.2.weight", "net.2.bias"]
    loc, scale = model.priors["net.2.weight"]
    assert torch.equal(loc, net[2].weight.detach()) and torch.all(scale == 0.1)
    # fixed parameters are buffers equal to the pre-trained values, and nothing is a learnable parameter
    assert torch.equal(model.net[0].weight, net[0].weight.detach())
    assert list(model.parameters()) == []
    tr = pyro.poutine.trace(model).get_trace(torch.randn(4, 2), torch.randn(4, 1))
    sites = [n for n, s in tr.nodes.items() if s["type"] == "sample"]
    assert sites == ["net.2.weight", "net.2.bias", "data", "obs"]
    assert torch.all(tr.nodes["obs"]["fn"].base_dist.scale == 0.2)
    # the original network is untouched
    assert isinstance(net[0].weight, torch.nn.Parameter)


def test_prior_scale_forms():
    net = mlp()
    rel = pk.BayesianModel(net, prior_scale=pk.RelativeScale(0.5, floor=0.01), obs_noise=0.1)
    loc, scale = rel.priors["net.0.weight"]
    torch.testing.assert_close(scale, (0.5 * loc.abs()).clamp_min(0.01))
    per = pk.BayesianModel(net, prior_scale={"0": 0.3, "2": 0.05}, obs_noise=0.1)
    assert torch.all(per.priors["net.0.bias"][1] == 0.3) and torch.all(per.priors["net.2.weight"][1] == 0.05)
    pred = pk.BayesianModel(net, prior_scale=0.1, obs_noise=0.1, bayesian=lambda n: n.endswith("bias"))
    assert pred.site_names == ["net.0.bias", "net.2.bias"]


def test_bad_arguments():
    net = mlp()
    with pytest.raises(ValueError, match="obs_noise"):
        pk.BayesianModel(net, 0.1, 0.0)
    with pytest.raises(ValueError, match="unknown module name"):
        pk.BayesianModel(net, 0.1, 0.1, bayesian=["7"])
    with pytest.raises(ValueError, match="selects no parameter"):
        pk.BayesianModel(net, 0.1, 0.1, bayesian=lambda n: False)
    with pytest.raises(ValueError, match="no entry for Bayesian module"):
        pk.BayesianModel(net, {"0": 0.1}, 0.1)
    with pytest.raises(ValueError, match="prior_scale must be > 0"):
        pk.BayesianModel(net, -1.0, 0.1)
    with pytest.raises(ValueError, match="expected 'all'"):
        pk.BayesianModel(net, 0.1, 0.1, bayesian="some")
    model = pk.BayesianModel(net, 0.1, 0.1)
    with pytest.raises(ValueError, match="y: expected shape"):
        model(torch.randn(4, 2), torch.randn(4))


def test_predictive_svi_and_nuts_run_unchanged():
    net = mlp()
    model = pk.BayesianModel(net, prior_scale=0.1, obs_noise=0.1)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    prior = Predictive(model, num_samples=7)(x)
    assert prior["obs"].shape == (7, 8, 1) and prior["net.0.weight"].squeeze(1).shape == (7, 5, 2)
    pyro.clear_param_store()
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert all(torch.isfinite(torch.tensor(svi.step(x, y))) for _ in range(3))
    mcmc = pyro.infer.MCMC(pyro.infer.NUTS(model), num_samples=5, warmup_steps=5, disable_progbar=True)
    mcmc.run(x, y)
    assert mcmc.get_samples()["net.2.bias"].shape == (5, 1)
