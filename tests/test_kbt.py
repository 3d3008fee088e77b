"""The Kalman Bayesian Transformer: moments through every component, the statistical-Jacobian backward
pass, updates, Bayesian subsets, input errors (issue 4)."""

import copy

import pyro
import pytest
import torch
from pyro.infer import Predictive

import ppl_kbnn as pk
from ppl_kbnn.mc import network_samples
from ppl_kbnn.propagate import MODES
from ppl_kbnn.validation.network import CASES, make_case, network_moments_rows

torch.set_num_threads(1)


def dt_inputs(n, K=3, state_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "returns_to_go": torch.randn(n, K, 1, generator=g),
        "states": torch.randn(n, K, state_dim, generator=g),
        "actions": torch.randn(n, K, 1, generator=g).tanh(),
        "timesteps": torch.randint(0, 20, (n, K), generator=g),
    }


def tiny_tf(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_in=2, d_out=1, d_model=8, n_layer=1, n_head=2, max_len=6) | kw
    return pk.nn.Transformer(pk.nn.TransformerConfig(**cfg))


def tiny_dt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(state_dim=3, act_dim=1, d_model=8, n_layer=1, n_head=2, max_ep_len=20, context=3) | kw
    return pk.nn.DecisionTransformer(pk.nn.DTConfig(**cfg))


# ------------------------------------------------------------------------------------------ degenerate


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("covariance", ["block", "diag"])
@pytest.mark.parametrize("observe", ["last", "all"])
def test_zero_weight_variance_is_the_network(mode, covariance, observe, gen):
    for net, x in ((tiny_tf(n_layer=2, activation="gelu", out_tanh=True), torch.randn(3, 5, 2, generator=gen)),
                   (tiny_dt(), dt_inputs(3))):  # fmt: skip
        model = pk.BayesianModel(net, prior_scale=0.1, obs_noise=0.2, observe=observe)
        guide = pk.KalmanGuide(model, covariance=covariance, hidden=mode)
        for _, cov in guide.beliefs().values():
            cov.zero_()
        mean, var = guide.predict(x)
        out = net(**x) if isinstance(x, dict) else net(x)
        out = out[:, -1] if observe == "last" else out
        torch.testing.assert_close(mean, out, rtol=0, atol=1e-12)
        torch.testing.assert_close(var, torch.full_like(var, 0.04), rtol=0, atol=1e-15)


def test_prior_predictive_before_updates_matches_predictive_through_the_guide():
    """Monte Carlo ``Predictive(model, guide)`` (obs noise included) vs the closed form, within the
    envelope of the joint mode (the moments test below) plus Monte-Carlo error."""
    net = tiny_tf()
    model = pk.BayesianModel(net, prior_scale=0.05, obs_noise=0.1)
    guide = pk.KalmanGuide(model, hidden="joint")
    x = torch.randn(4, 5, 2, generator=torch.Generator().manual_seed(3))
    pyro.set_rng_seed(0)
    obs = Predictive(model, guide=guide, num_samples=3000, return_sites=["obs"])(x)["obs"]  # (S, 4, 1)
    mean, var = guide.predict(x)
    n = obs.shape[0]
    assert ((obs.mean(0) - mean).abs() / obs.std(0)).max() < 0.2 + 4 / n**0.5
    ratio = var.sqrt() / obs.std(0)
    assert ratio.min() > 0.9 and ratio.max() < 1.1  # std ratio within 10% (MC se ~1.3%)


# ------------------------------------------------------------------------------------------ moments vs MC


@pytest.fixture(scope="module")
def moment_rows():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return network_moments_rows(CASES, scales=(0.01, 0.05), n_updates=(0, 50), n_draws=2000)
    finally:
        torch.set_default_dtype(old)


def test_joint_mode_moments_match_monte_carlo(moment_rows):
    """Most faithful mode: mean error ≤ 0.2 MC std and std ratio in [0.8, 1.25] for every output, on
    random small transformers and a decision transformer, prior scale 0.01 and 0.05, block and diag
    beliefs, before and after 50 updates (2000 weight draws each)."""
    rows = [r for r in moment_rows if r["mode"] == "joint"]
    assert len(rows) == len(CASES) * 2 * 2 * 2
    for r in rows:
        assert r["mean_err"] <= 0.2, r
        assert 0.8 <= r["std_ratio_min"] and r["std_ratio_max"] <= 1.25, r


def test_every_mode_within_its_measured_envelope(moment_rows):
    """The other modes drop covariances. Measured (docs/kbt.md): ``token`` stays within [0.92, 1.06] of
    Monte Carlo at these scales, ``diag`` and ``feature`` overstate the std by up to 1.46x after 50
    updates (they drop the within-token covariances that the updates make negative). Envelope: mean
    error ≤ 0.2 std for every mode; std ratio in [0.85, 1.15] for ``token``, [0.75, 1.6] for the others;
    and no mode is closer to Monte Carlo than ``joint`` by more than the Monte-Carlo error."""
    worst = {}
    for r in moment_rows:
        assert r["mean_err"] <= 0.2, r
        lo, hi = (0.85, 1.15) if r["mode"] == "token" else (0.75, 1.6)
        assert lo <= r["std_ratio_min"] and r["std_ratio_max"] <= hi, r
        dev = max(abs(r["std_ratio_min"] - 1), abs(r["std_ratio_max"] - 1))
        worst[r["mode"]] = max(worst.get(r["mode"], 0.0), dev)
    se = moment_rows[0]["std_ratio_mc_se"]
    assert all(worst["joint"] <= w + 3 * se for w in worst.values()), worst


# ------------------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("covariance", ["block", "diag"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=lambda c: c.label)
def test_weight_output_cross_covariance_matches_monte_carlo(case, covariance):
    """The backward pass is ``Cov(w_n, y) = C_n ∂E[y]/∂μ_{w_n}`` (statistical Jacobian). Against 20000
    weight draws, every entry of every Bayesian layer agrees within Monte-Carlo error: the share of
    |z| > 3 is that of a standard normal (0.27%, allowed 1%), the largest |z| ≤ 5, and the head's
    cross-covariance (high signal-to-noise) has relative error ≤ 0.1."""
    net, x, _, _ = make_case(case, seed=7, n_inputs=1)
    model = pk.BayesianModel(net, prior_scale=0.05, obs_noise=0.05)
    guide = pk.KalmanGuide(model, covariance=covariance, hidden="joint")
    _, S, jacs = guide.linearise(x)
    ys, draws = network_samples(net, guide.beliefs(), x, 20000, torch.Generator().manual_seed(1))
    yc = ys.reshape(ys.shape[0], -1)
    yc = yc - yc.mean(0)
    zs = []
    for name, (_, cov) in guide.beliefs().items():
        closed = (torch.einsum("npq,knq->npk", cov, jacs[name]) if covariance == "block"
                  else cov[..., None] * jacs[name].permute(1, 2, 0))  # fmt: skip
        w = draws[name] - draws[name].mean(0)
        prods = torch.einsum("snp,sk->snpk", w, yc)
        emp, se = prods.mean(0), prods.std(0) / prods.shape[0] ** 0.5
        keep = se > 0  # fixed entries (none here) have no spread
        zs.append(((closed - emp).abs() / se)[keep])
        if name in ("head", "predict_action"):
            assert (closed - emp).norm() / emp.norm() < 0.1
    z = torch.cat(zs)
    assert (z > 3).float().mean() < 0.01
    assert z.max() < 5


def test_update_is_kalman_on_a_linear_readout():
    """Only the head Bayesian: y is linear in the head weights given fixed features, so the update is
    exact conjugate Bayesian linear regression on the LayerNorm features."""
    net = tiny_tf(seed=2, d_out=1)
    model = pk.BayesianModel(net, prior_scale=0.3, obs_noise=0.1, bayesian="head")
    guide = pk.KalmanGuide(model, covariance="block")
    x = torch.randn(30, 5, 2, generator=torch.Generator().manual_seed(0))
    y = torch.randn(30, 1, generator=torch.Generator().manual_seed(1))
    guide.update(x, y)
    with torch.no_grad():
        feats = net.ln_f(_hidden(net, x))[:, -1]  # (N, d)
    Phi = torch.cat([feats, torch.ones(30, 1)], -1)  # (N, p)
    prior_mean = torch.cat([net.head.weight[0], net.head.bias]).detach()
    P0 = 0.3**2 * torch.eye(Phi.shape[1])
    prec = torch.linalg.inv(P0) + Phi.T @ Phi / 0.01
    post_cov = torch.linalg.inv(prec)
    post_mean = post_cov @ (torch.linalg.solve(P0, prior_mean) + Phi.T @ y[:, 0] / 0.01)
    mean, cov = guide.beliefs()["head"]
    torch.testing.assert_close(mean[0], post_mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(cov[0], post_cov, rtol=0, atol=1e-10)


def _hidden(net, x):
    T = x.shape[1]
    h = net.embed(x) + net.pos_emb(torch.arange(T))
    mask = pk.moments.attention_mask(T)
    for blk in net.blocks:
        h = blk(h, mask)
    return h


# ------------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("covariance", ["block", "diag"])
def test_student_moves_toward_teacher(covariance):
    """200 sequential updates on teacher data: held-out NLPD below the prior's and the posterior mean
    closer to the teacher's weights than the pre-trained student's.

    The teacher is a draw from the prior (every parameter shifted by ``0.1·N(0, 1)``, prior_scale 0.1).
    200 scalar observations cannot pin down 873 weights: the inner maps (Q/K/V, MLP) are weakly
    identified, so the whole-vector distance falls by about 1% (measured: 9.42 → 9.33 block, → 9.36
    diag). That fall is still a signal: a step of the same length in a random direction would *raise*
    the squared distance by ``|Δ|²`` in expectation (0.07 here), so the test asks for a fall overall,
    and for a large one on the best-identified map, the head (measured: 0.088 → 0.015 block,
    → 0.063 diag)."""
    torch.manual_seed(0)
    student = tiny_tf(seed=0, n_head=1, max_len=6)
    teacher = copy.deepcopy(student)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    X = torch.randn(260, 6, 2, generator=g)
    with torch.no_grad():
        Y = teacher(X)[:, -1] + 0.05 * torch.randn(260, 1, generator=g)
    model = pk.BayesianModel(student, prior_scale=0.1, obs_noise=0.05)
    guide = pk.KalmanGuide(model, covariance=covariance, hidden="token")

    def nlpd():
        m, v = guide.predict(X[200:])
        return (0.5 * torch.log(2 * torch.pi * v) + 0.5 * (Y[200:] - m) ** 2 / v).mean()

    def dist_to_teacher() -> dict[str, float]:
        dist = {}
        for name, (mean, _) in guide.beliefs().items():
            mod = teacher.get_submodule(name)
            dist[name] = float(((mean - torch.cat([mod.weight, mod.bias[:, None]], -1)) ** 2).sum().detach())
        return dist

    nlpd0, d0 = nlpd(), dist_to_teacher()
    guide.update(X[:200], Y[:200])
    d1 = dist_to_teacher()
    assert nlpd() < nlpd0 - 1.0
    assert sum(d1.values()) < sum(d0.values())
    assert d1["head"] < 0.75 * d0["head"]
    assert guide.n_updates == 200 and guide.update_seconds > 0


def test_decision_transformer_updates_and_observe_all():
    net = tiny_dt()
    x = dt_inputs(20)
    for observe in ("last", "all"):
        model = pk.BayesianModel(net, prior_scale=0.05, obs_noise=0.1, observe=observe)
        guide = pk.KalmanGuide(model, hidden="token")
        m0, v0 = guide.predict(x)
        shape = (20, 1) if observe == "last" else (20, 3, 1)
        assert m0.shape == shape and v0.shape == shape
        y = m0 + 0.3  # a shifted target
        guide.update(x, y)
        m1, _ = guide.predict(x)
        assert (m1 - y).abs().mean() < 0.5 * (m0 - y).abs().mean()


def test_padded_context_matches_unpadded():
    """Left padding with an attention mask gives the same moments as the unpadded shorter context."""
    net = tiny_dt()
    model = pk.BayesianModel(net, prior_scale=0.05, obs_noise=0.1)
    guide = pk.KalmanGuide(model, hidden="joint")
    x = dt_inputs(1)
    short = {k: v[:, 1:] for k, v in x.items()}
    padded = {k: torch.cat([torch.zeros_like(v[:, :1]), v[:, 1:]], 1) for k, v in x.items()}
    padded["attention_mask"] = torch.tensor([[False, True, True]])
    m1, v1 = guide.predict(short)
    m2, v2 = guide.predict(padded)
    torch.testing.assert_close(m1, m2, rtol=0, atol=1e-12)
    torch.testing.assert_close(v1, v2, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ subsets, API


def test_bayesian_subsets():
    net = tiny_tf(n_layer=2)
    sites = lambda b: set(pk.BayesianModel(net, 0.1, 0.1, bayesian=b).priors)  # noqa: E731
    assert sites("head") == {"net.head.weight", "net.head.bias"}
    last = sites("last_block")
    assert last == sites("blocks:1") and "net.head.weight" in last
    assert any(s.startswith("net.blocks.1.") for s in last) and not any(s.startswith("net.blocks.0.") for s in last)
    assert not any("ln" in s for s in last)  # LayerNorms stay fixed
    both = sites("blocks:2")
    assert any(s.startswith("net.blocks.0.") for s in both) and "net.embed.weight" not in both
    everything = sites("all")
    assert "net.embed.weight" in everything and not any("ln" in s or "pos_emb" in s for s in everything)
    with pytest.raises(ValueError, match="only 2 block"):
        sites("blocks:3")
    with pytest.raises(ValueError, match="expected 'all', 'head'"):
        sites("heads")
    for b in ("head", "last_block"):  # the guide runs on every subset
        guide = pk.KalmanGuide(pk.BayesianModel(net, 0.1, 0.1, bayesian=b))
        guide.update(torch.randn(2, 4, 2), torch.randn(2, 1))
    ln_random = pk.BayesianModel(net, 0.1, 0.1, bayesian=lambda n: "ln" in n or n.startswith("head"))
    with pytest.raises(ValueError, match="unsupported Bayesian parameter"):
        pk.KalmanGuide(ln_random)


def test_bad_input_raises_and_leaves_belief_unchanged():
    net = tiny_tf()
    guide = pk.KalmanGuide(pk.BayesianModel(net, 0.1, 0.1))
    before = {k: v.clone() for k, v in guide.state_dict().items() if isinstance(v, torch.Tensor)}
    x, y = torch.randn(3, 5, 2), torch.randn(3, 1)
    bad = [
        (torch.randn(3, 5, 3), y, "expected shape"),
        (x.float(), y, "dtype"),
        (x, y[:2], "y: expected shape"),
        (x.index_put((torch.tensor(1), torch.tensor(2), torch.tensor(0)), torch.tensor(float("nan"))), y, "NaN"),
        (x, torch.full((3, 1), float("inf")), "inf"),
    ]
    for xb, yb, msg in bad:
        with pytest.raises(ValueError, match=msg):
            guide.update(xb, yb)
    with pytest.raises(ValueError, match="hidden must be one of"):
        pk.KalmanGuide(pk.BayesianModel(net, 0.1, 0.1), hidden="full")
    after = {k: v for k, v in guide.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_round_trip_and_size():
    net = tiny_dt()
    model = pk.BayesianModel(net, 0.05, 0.1)
    guide = pk.KalmanGuide(model, hidden="token")
    x = dt_inputs(5)
    guide.update(x, torch.randn(5, 1))
    other = pk.KalmanGuide(pk.BayesianModel(net, 0.05, 0.1), hidden="token")
    other.load_state_dict(guide.state_dict())
    for a, b in zip(guide.predict(x), other.predict(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = sum(m.numel() * m.element_size() + c.numel() * c.element_size() for m, c in guide.beliefs().values())
    assert guide.belief_bytes == expected
    with pytest.raises(ValueError, match="different model"):
        pk.KalmanGuide(pk.BayesianModel(net, 0.05, 0.1, bayesian="head"), hidden="token").load_state_dict(
            guide.state_dict()
        )
