"""The Laplace baseline (``inference.laplace``, on laplace-torch) against closed forms.

On a Bayesian linear regression (``nn.Linear(2, 1)``, prior ``N(θ̂, I)``, obs noise 0.3, 30 samples) the GGN is the
exact Hessian, so full Laplace with the model's prior precision IS the conjugate posterior:

    Λ = I + ΦᵀΦ / σ²,   Σ = Λ⁻¹,   μ = Σ (θ̂ + Φᵀ y / σ²),   log p(y) = log N(y; Φ θ̂, σ² I + Φ Φᵀ)

and the predictive at ``φ*`` is ``N(φ*ᵀ μ, φ*ᵀ Σ φ* + σ²)``. Checked in float64 to round-off (the MAP comes from
L-BFGS; its gradient norm is ~1e-8, giving ~1e-10 on the mean).
"""

import math

import pytest
import torch

import ppl_kbnn as pk
from ppl_kbnn import inference as inf
from ppl_kbnn.inference.laplace import _import_laplace
from ppl_kbnn.toy import pretrained_mlp, regression_stream

try:  # laplace-torch is optional (the "laplace" extra); it also fails to import with a mismatched torchvision
    _import_laplace()
except ImportError as err:
    pytest.skip(str(err), allow_module_level=True)

NOISE = 0.3
N = 30


def _blr():
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Linear(2, 1).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, 0.0]]))
        net.bias.fill_(0.0)
    model = pk.BayesianModel(net, prior_scale=1.0, obs_noise=NOISE)
    X = torch.randn(N, 2, generator=gen)  # (N, 2)
    Y = X @ torch.tensor([[1.0], [-0.5]]) + 0.2 + NOISE * torch.randn(N, 1, generator=gen)  # (N, 1)
    Phi = torch.cat([X, torch.ones(N, 1)], 1)  # (N, 3): [w1, w2, b], the order of the parameter vector
    prior_mean = torch.tensor([0.5, 0.0, 0.0])
    precision = torch.eye(3) + Phi.T @ Phi / NOISE**2
    cov = torch.linalg.inv(precision)
    mean = cov @ (prior_mean + Phi.T @ Y[:, 0] / NOISE**2)
    return model, X, Y, Phi, prior_mean, mean, cov, precision


def test_full_laplace_on_a_linear_model_is_conjugate_regression():
    model, X, Y, Phi, m0, mean, cov, _ = _blr()
    res = inf.laplace(model, X, Y, "full", prior_precision="model")
    la = res.fitted
    assert res.diagnostics["map_grad_norm"] < 1e-6
    torch.testing.assert_close(la.mean, mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(la.posterior_covariance, cov, rtol=1e-12, atol=1e-15)
    # the Laplace evidence is exact for a linear-Gaussian model
    evidence = torch.distributions.MultivariateNormal(Phi @ m0, NOISE**2 * torch.eye(N) + Phi @ Phi.T).log_prob(Y[:, 0])
    assert res.diagnostics["log_marglik"] == pytest.approx(float(evidence), abs=1e-9)
    Xt = torch.tensor([[-2.0, 1.0], [0.0, 0.0], [1.5, -1.5]])
    Phit = torch.cat([Xt, torch.ones(3, 1)], 1)
    pm, ps = res.predict(Xt)
    assert pm.shape == ps.shape == (3, 1)
    torch.testing.assert_close(pm[:, 0], Phit @ mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(ps[:, 0], ((Phit @ cov * Phit).sum(-1) + NOISE**2).sqrt(), rtol=1e-12, atol=0)
    assert res.memory_bytes == (3 + 3 * 3) * 8  # the MAP and the 3x3 curvature, float64
    # the only layer is the last layer: the same posterior
    ll = inf.laplace(model, X, Y, "full", "last_layer", prior_precision="model")
    assert ll.method == "laplace-full-ll" and ll.diagnostics["fixed_at_map"] == []
    torch.testing.assert_close(ll.fitted.posterior_covariance, cov, rtol=1e-12, atol=1e-15)


def test_diag_and_kron_drop_exactly_the_expected_correlations():
    """diag: Λ_jj on the diagonal; kron (K-FAC per parameter tensor): the [w1, w2] block exact (one output, so
    the Kronecker factors are exact), no weight-bias cross terms."""
    model, X, Y, _, _, mean, _, precision = _blr()
    diag = inf.laplace(model, X, Y, "diag", prior_precision="model")
    torch.testing.assert_close(diag.fitted.posterior_precision, precision.diagonal(), rtol=1e-12, atol=0)
    assert diag.memory_bytes == 2 * 3 * 8
    kron = inf.laplace(model, X, Y, "kron", prior_precision="model")
    expected = precision.clone()
    expected[2, :2] = expected[:2, 2] = 0
    torch.testing.assert_close(kron.fitted.posterior_precision.to_matrix(), expected, rtol=1e-10, atol=1e-10)
    for res in (diag, kron):  # the MAP does not depend on the curvature structure
        torch.testing.assert_close(res.fitted.mean, mean, rtol=0, atol=1e-9)


def test_marglik_prior_precision_maximises_the_laplace_evidence():
    """``prior_precision="marglik"``: a scalar λ maximising laplace-torch's evidence at the fixed MAP θ*,
    ``log p(y | θ*) − λ/2 ||θ* − θ̂||² + D/2 log λ − 1/2 log det(ΦᵀΦ/σ² + λI)`` (closed form here; its maximiser
    found by a bounded scalar search)."""
    from scipy.optimize import minimize_scalar

    model, X, Y, Phi, m0, *_ = _blr()
    res = inf.laplace(model, X, Y, "full")
    theta = res.fitted.mean
    G = Phi.T @ Phi / NOISE**2
    log_lik = torch.distributions.Normal(Phi @ theta, NOISE).log_prob(Y[:, 0]).sum()

    def evidence(lam: float) -> float:
        return float(log_lik - lam / 2 * ((theta - m0) ** 2).sum() + 1.5 * math.log(lam)
                     - 0.5 * torch.logdet(G + lam * torch.eye(3)))  # fmt: skip

    best = minimize_scalar(lambda t: -evidence(math.exp(t)), bounds=(-10, 10), method="bounded",
                           options={"xatol": 1e-12})  # fmt: skip
    lam = res.diagnostics["prior_precision"]
    assert len(lam) == 1 and lam[0] == pytest.approx(math.exp(best.x), rel=1e-5)
    assert res.diagnostics["log_marglik"] == pytest.approx(evidence(lam[0]), abs=1e-9)
    assert res.diagnostics["prior_precision_source"] == "marglik"


def test_last_layer_laplace_on_an_mlp():
    torch.manual_seed(0)
    model = pk.BayesianModel(pretrained_mlp(4, steps=300), prior_scale=0.1, obs_noise=0.1)
    X, Y = regression_stream(20)
    res = inf.laplace(model, X, Y, "kron", "last_layer")
    d = res.diagnostics
    assert d["laplace_sites"] == ["net.2.weight", "net.2.bias"] and d["fixed_at_map"] == ["net.0.bias", "net.0.weight"]
    assert d["n_params"] == 5 and d["map_loss"] < d["map_start_loss"]
    mean, std = res.predict(X[:5])
    assert mean.shape == std.shape == (5, 1) and (std > 0.1).all()
    idata = res.to_inference_data(num_draws=50)
    assert set(idata.posterior.data_vars) == {"net.2.weight", "net.2.bias"}
    assert idata.log_likelihood["obs"].shape == (1, 50, 20)
    full = inf.laplace(model, X, Y, "full", map_steps=0)  # MAP = the pre-trained weights
    assert full.diagnostics["map_loss"] == full.diagnostics["map_start_loss"] and full.diagnostics["n_params"] == 13


def test_bad_arguments_raise_value_errors():
    model, X, Y, *_ = _blr()
    with pytest.raises(ValueError, match="structure must be one of"):
        inf.laplace(model, X, Y, "lowrank")
    with pytest.raises(ValueError, match="subset must be one of"):
        inf.laplace(model, X, Y, "full", "subnetwork")
    with pytest.raises(ValueError, match="prior_precision"):
        inf.laplace(model, X, Y, prior_precision=-1.0)
    with pytest.raises(ValueError, match="map_steps"):
        inf.laplace(model, X, Y, map_steps=-1)
    with pytest.raises(ValueError, match="x must be a tensor"):
        inf.laplace(model, {"x": X}, Y)
    with pytest.raises(ValueError, match="y: expected shape"):
        inf.laplace(model, X, Y[:, 0])
    rel = pk.BayesianModel(torch.nn.Linear(2, 1), prior_scale=pk.RelativeScale(0.5, 0.01), obs_noise=NOISE)
    with pytest.raises(ValueError, match="one prior scale per tensor"):
        inf.laplace(rel, X, Y, "kron", prior_precision="model")
