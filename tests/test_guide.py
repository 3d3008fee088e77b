"""KalmanGuide: exact cases, identities, Pyro integration, guards, state, robustness."""

import io

import pyro
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO

import ppl_kbnn as pk
from ppl_kbnn.mc import mc_cov, mc_mean


def linear_net(d_in=3, d_out=2, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(d_in, d_out)


def mlp(widths=(1, 8, 1), act=torch.nn.ReLU, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [torch.nn.Linear(a, b), act()]
    return torch.nn.Sequential(*layers[:-1])


def stream(n, d_in, d_out, gen, noise=0.3):
    X = torch.randn(n, d_in, generator=gen)
    W = torch.randn(d_out, d_in, generator=gen)
    return X, X @ W.T + 0.5 + noise * torch.randn(n, d_out, generator=gen)


# --------------------------------------------------------------------------------------------- exact cases


@pytest.mark.parametrize("hidden", ["diag", "full"])
def test_linear_model_is_conjugate_bayesian_linear_regression_at_every_step(hidden, gen):
    d_in, d_out, s0, r = 3, 2, 0.7, 0.3
    net = linear_net(d_in, d_out)
    guide = pk.KalmanGuide(pk.BayesianModel(net, prior_scale=s0, obs_noise=r), hidden=hidden)
    X, Y = stream(100, d_in, d_out, gen)
    Xb = torch.cat([X, torch.ones(100, 1)], 1)
    mu0 = torch.cat([net.weight.detach(), net.bias.detach()[:, None]], 1)  # (d_out, p)
    prec0 = torch.eye(d_in + 1) / s0**2
    worst = 0.0
    for t in range(100):
        guide.update(X[t], Y[t])
        prec = prec0 + Xb[: t + 1].T @ Xb[: t + 1] / r**2  # rows share the precision
        cov = torch.linalg.inv(prec)
        mean = (cov @ (prec0 @ mu0.T + Xb[: t + 1].T @ Y[: t + 1] / r**2)).T
        g_mean, g_cov = guide.layer("")
        worst = max(worst, (g_mean - mean).abs().max().item(), (g_cov - cov).abs().max().item())
    assert worst <= 1e-10, worst


def test_linear_model_with_process_noise_is_the_kalman_filter(gen):
    d_in, s0, r, q = 2, 0.5, 0.2, 0.01
    net = linear_net(d_in, 1)
    guide = pk.KalmanGuide(pk.BayesianModel(net, prior_scale=s0, obs_noise=r), process_noise=q)
    X, Y = stream(100, d_in, 1, gen)
    m = torch.cat([net.weight.detach()[0], net.bias.detach()])
    P = s0**2 * torch.eye(d_in + 1)
    worst = 0.0
    for t in range(100):
        guide.update(X[t], Y[t])
        # information-form Kalman filter: predict, then add the observation's information
        P = P + q * torch.eye(d_in + 1)
        h = torch.cat([X[t], torch.ones(1)])
        info = torch.linalg.inv(P) + torch.outer(h, h) / r**2
        m_new = torch.linalg.solve(info, torch.linalg.solve(P, m) + h * Y[t, 0] / r**2)
        P, m = torch.linalg.inv(info), m_new
        g_mean, g_cov = guide.layer("")
        worst = max(worst, (g_mean[0] - m).abs().max().item(), (g_cov[0] - P).abs().max().item())
    assert worst <= 1e-10, worst


def test_no_data_predictive_is_the_prior_predictive(gen):
    net = linear_net(3, 1)
    s0, r = 0.4, 0.1
    model = pk.BayesianModel(net, prior_scale=s0, obs_noise=r)
    guide = pk.KalmanGuide(model)
    X = torch.randn(6, 3, generator=gen)
    mean, var = guide.predict(X)
    torch.testing.assert_close(mean, net(X).detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(var, s0**2 * (X.pow(2).sum(1, keepdim=True) + 1) + r**2, rtol=1e-14, atol=0)


@pytest.mark.parametrize("covariance", ["block", "diag"])
def test_monte_carlo_predictive_through_the_guide_matches_predict(covariance, gen):
    """Linear model and a 1-hidden-layer MLP with a deterministic input: the closed-form predictive is exact
    for the belief (independent rows, exact ReLU moments), so Monte Carlo through the guide agrees within
    4 standard errors, before and after updates."""
    pyro.set_rng_seed(0)
    for net in (linear_net(3, 1), mlp((3, 6, 1))):
        model = pk.BayesianModel(net, prior_scale=0.3, obs_noise=0.1)
        guide = pk.KalmanGuide(model, covariance=covariance)
        X, Y = stream(20, 3, 1, gen)
        for n_updates in (0, 20):
            guide.update(X[:n_updates], Y[:n_updates]) if n_updates else None
            mean, var = guide.predict(X[:5])
            draws = Predictive(model, guide=guide, num_samples=2000, return_sites=["obs"])(X[:5])["obs"]
            assert mc_mean(draws, mean).max_z < 4
            assert mc_cov(draws, draws, torch.diag_embed(var)).max_z < 4


def test_deeper_mlp_predictive_within_documented_envelope(gen):
    """Two hidden layers: hidden states are no longer independent (diag drops their covariance). Measured
    envelope: mean within 0.1 MC std, std ratio within [0.8, 1.25] at prior_scale 0.2."""
    pyro.set_rng_seed(0)
    model = pk.BayesianModel(mlp((2, 8, 8, 1)), prior_scale=0.2, obs_noise=0.05)
    X = torch.randn(10, 2, generator=gen)
    for hidden in ("diag", "full"):
        guide = pk.KalmanGuide(model, hidden=hidden)
        mean, var = guide.predict(X)
        draws = Predictive(model, guide=guide, num_samples=2000, return_sites=["obs"])(X)["obs"]
        sd = draws.std(0)
        assert ((mean - draws.mean(0)).abs() / sd).max() < 0.1
        ratio = var.sqrt() / sd
        assert 0.8 < ratio.min() and ratio.max() < 1.25, (hidden, ratio)


# --------------------------------------------------------------------------------------------- identities


def test_repeated_sample_shrinks_variance_monotonically_and_fixed_entries_never_move(gen):
    net = mlp((2, 4, 1))
    model = pk.BayesianModel(net, prior_scale=0.3, obs_noise=0.1, bayesian=lambda n: not n.startswith("0.bias"))
    guide = pk.KalmanGuide(model)
    x, y = torch.randn(2, generator=gen), torch.tensor([1.0])
    fixed_bias = guide.layer("0")[0][:, 2].clone()
    last = guide.predict(x)[1]
    for _ in range(10):
        guide.update(x, y)
        v = guide.predict(x)[1]
        assert v < last
        last = v
    mean0, cov0 = guide.layer("0")
    assert torch.equal(mean0[:, 2], fixed_bias) and torch.count_nonzero(cov0[:, 2, :]) == 0
    assert "net.0.bias" not in guide.posterior()


def test_hidden_full_equals_diag_when_hidden_states_are_independent(gen):
    """One hidden layer, deterministic input: pre-activations are independent, so the full RTS reduces to KBNN."""
    model = pk.BayesianModel(mlp((2, 5, 1)), prior_scale=0.2, obs_noise=0.1)
    X, Y = stream(30, 2, 1, gen)
    a = pk.KalmanGuide(model, hidden="diag").update(X, Y)
    b = pk.KalmanGuide(model, hidden="full").update(X, Y)
    for (ma, ca), (mb, cb) in zip(a.beliefs().values(), b.beliefs().values(), strict=True):
        torch.testing.assert_close(ma, mb, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ca, cb, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------- Pyro integration


@pytest.mark.parametrize("covariance", ["block", "diag"])
def test_guide_samples_the_belief_jointly(covariance, gen):
    model = pk.BayesianModel(mlp((2, 3, 1)), prior_scale=0.3, obs_noise=0.1)
    guide = pk.KalmanGuide(model, covariance=covariance)
    guide.update(*stream(15, 2, 1, gen))
    pyro.set_rng_seed(1)
    draws = Predictive(model, guide=guide, num_samples=6000, return_sites=["net.0.weight", "net.0.bias"])(
        torch.zeros(1, 2)
    )
    rows = torch.cat([draws["net.0.weight"].reshape(6000, 3, 2), draws["net.0.bias"].reshape(6000, 3, 1)], -1)
    mean0, cov0 = guide.layer("0")
    assert mc_mean(rows, mean0).max_z < 4
    cov = cov0 if covariance == "block" else torch.diag_embed(cov0)
    assert mc_cov(rows, rows, cov).max_z < 4
    post = guide.posterior()
    assert post["net.0.weight"].event_shape == (3, 2) and post["net.0.bias"].event_shape == (3,)
    loss = Trace_ELBO().loss(model, guide, torch.randn(4, 2), torch.randn(4, 1))
    assert torch.isfinite(torch.tensor(loss))


# --------------------------------------------------------------------------------------------- robustness


def test_covariances_stay_symmetric_psd_over_10000_noisy_updates(gen):
    model = pk.BayesianModel(mlp((2, 6, 1)), prior_scale=0.3, obs_noise=0.1)
    guide = pk.KalmanGuide(model)
    X = torch.randn(10_000, 2, generator=gen)
    Y = torch.sin(X.sum(1, keepdim=True)) + 0.5 * torch.randn(10_000, 1, generator=gen)
    guide.update(X, Y)
    for _, C in guide.beliefs().values():
        assert torch.equal(C, C.mT)
        assert torch.linalg.eigvalsh(C).min() >= -1e-12 * C.abs().max()
    assert guide.n_updates == 10_000


def test_bad_data_raises_and_leaves_the_belief_unchanged(gen):
    model = pk.BayesianModel(mlp((2, 4, 1)), prior_scale=0.3, obs_noise=0.1)
    guide = pk.KalmanGuide(model)
    guide.update(*stream(5, 2, 1, gen))
    before = {k: v.clone() for k, v in guide.state_dict().items() if isinstance(v, torch.Tensor)}
    X, Y = stream(6, 2, 1, gen)
    bad_y = Y.clone()
    bad_y[3] = float("nan")
    with pytest.raises(ValueError, match="y: contains NaN"):
        guide.update(X, bad_y)
    with pytest.raises(ValueError, match="x: contains inf"):
        guide.update(X.clone().fill_(float("inf")), Y)
    with pytest.raises(ValueError, match="x: expected shape"):
        guide.update(torch.randn(6, 3), Y)
    with pytest.raises(ValueError, match="y: expected shape"):
        guide.update(X, Y[:4])
    with pytest.raises(ValueError, match="dtype"):
        guide.update(X.float(), Y.float())
    huge = X.clone()
    huge[4] = 1e200  # finite input, non-finite update: raised after 4 samples were already applied
    with pytest.raises(FloatingPointError, match="non-finite belief"):
        guide.update(huge, Y)
    after = guide.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert guide.n_updates == 5


def test_unsupported_modules_are_rejected_by_name():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Dropout(0.1), torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"unsupported module 'net.1' \(Dropout\)"):
        pk.KalmanGuide(pk.BayesianModel(net, 0.1, 0.1))
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="approximate='tanh'"):
        pk.KalmanGuide(pk.BayesianModel(net, 0.1, 0.1))
    with pytest.raises(ValueError, match="covariance must be"):
        pk.KalmanGuide(pk.BayesianModel(mlp(), 0.1, 0.1), covariance="dense")
    with pytest.raises(ValueError, match=r"does not support covariance='full'; supported: \['block', 'diag'\]"):
        pk.KalmanGuide(pk.BayesianModel(mlp(), 0.1, 0.1), covariance="full")


def test_guards_are_counted_when_they_fire(gen):
    model = pk.BayesianModel(mlp((2, 4, 4, 1)), prior_scale=0.5, obs_noise=0.05)
    X, Y = stream(20, 2, 1, gen)
    plain = pk.KalmanGuide(model).update(X, Y)
    assert set(plain.guard_counts) <= {"var_floor"}
    guarded = pk.KalmanGuide(model, var_floor=10.0, jitter=1e-9, gain_clip=0.01, psd_repair=True).update(X, Y)
    counts = guarded.guard_counts
    assert counts["var_floor"] > 0 and counts["gain_clip"] > 0 and counts["jitter"] == 20 * 3
    with pytest.raises(ValueError, match="gain_clip is only available"):
        pk.KalmanGuide(model, hidden="full", gain_clip=1.0)


# --------------------------------------------------------------------------------------------- state


def test_state_dict_round_trip_and_structure_check(gen):
    model = pk.BayesianModel(mlp((2, 4, 1)), prior_scale=0.3, obs_noise=0.1)
    guide = pk.KalmanGuide(model).update(*stream(10, 2, 1, gen))
    buf = io.BytesIO()
    torch.save(guide.state_dict(), buf)
    buf.seek(0)
    fresh = pk.KalmanGuide(model)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    X = torch.randn(5, 2, generator=gen)
    for a, b in zip(guide.predict(X), fresh.predict(X), strict=True):
        assert torch.equal(a, b)
    assert fresh.n_updates == 10
    other = pk.KalmanGuide(pk.BayesianModel(mlp((2, 5, 1)), prior_scale=0.3, obs_noise=0.1))
    with pytest.raises(ValueError, match="different model/guide"):
        other.load_state_dict(guide.state_dict())
    with pytest.raises(ValueError, match="covariance"):
        pk.KalmanGuide(model, covariance="diag").load_state_dict(guide.state_dict())
    with pytest.raises(ValueError, match="not a KalmanGuide state dict"):
        fresh.load_state_dict({"belief.mean_0": guide.layer("0")[0]})
