"""The inference baselines (``ppl_kbnn.inference``) on a Bayesian linear regression with a known posterior.

Model: ``BayesianModel(Linear(2, 1), prior_scale=1, obs_noise=0.3)``, 30 samples. With features
``φ = [x, 1]`` and prior ``N(θ̂, I)`` the posterior is exact:

    Λ = I + ΦᵀΦ / σ²,   Σ = Λ⁻¹,   μ = Σ (θ̂ + Φᵀ y / σ²)

and the predictive of ``y`` at ``φ*`` is ``N(φ*ᵀ μ, φ*ᵀ Σ φ* + σ²)``. NUTS is checked against it in
Monte-Carlo standard errors computed from arviz ESS; SVI within a measured tolerance of its
optimisation noise (documented at the test); retraining against least squares.
"""

import pyro
import pyro.poutine
import pytest
import torch
from pyro.nn import PyroModule
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

import ppl_kbnn as pk
from ppl_kbnn import inference as inf
from ppl_kbnn.inference.retrain import _cat, _length, _take
from ppl_kbnn.toy import pretrained_mlp

NOISE = 0.3
N = 30
CHAINS, DRAWS = 2, 500
Z = 4.0  # Monte-Carlo tolerance in standard errors


@pytest.fixture(autouse=True, scope="module")
def one_thread_float64():
    """Module-scoped fixtures run before conftest's per-test float64 fixture: set it for the module."""
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old_dtype)
    torch.set_num_threads(old_threads)


def _blr():
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Linear(2, 1).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, 0.0]]))
        net.bias.fill_(0.0)
    model = pk.BayesianModel(net, prior_scale=1.0, obs_noise=NOISE)
    X = torch.randn(N, 2, generator=gen)  # (N, 2)
    Y = X @ torch.tensor([[1.0], [-0.5]]) + 0.2 + NOISE * torch.randn(N, 1, generator=gen)  # (N, 1)
    Phi = torch.cat([X, torch.ones(N, 1)], 1)  # (N, 3): [w1, w2, b]
    prior_mean = torch.tensor([0.5, 0.0, 0.0])
    precision = torch.eye(3) + Phi.T @ Phi / NOISE**2
    cov = torch.linalg.inv(precision)
    mean = cov @ (prior_mean + Phi.T @ Y[:, 0] / NOISE**2)
    return model, X, Y, mean, cov, precision


@pytest.fixture(scope="module")
def blr(one_thread_float64):
    return _blr()


def _flat(samples):
    """``{net.weight: (S, 1, 2), net.bias: (S, 1)}`` -> ``(S, 3)`` in the order [w1, w2, b]."""
    return torch.cat([samples["net.weight"].reshape(-1, 2), samples["net.bias"].reshape(-1, 1)], 1)


@pytest.fixture(scope="module")
def nuts_run(blr):
    model, X, Y, *_ = blr
    return inf.nuts(model, X, Y, num_samples=DRAWS, warmup_steps=300, num_chains=CHAINS, seed=0)


def test_nuts_chains_in_processes_give_the_same_draws(blr, capsys):
    """Chains in spawned worker processes are seeded like sequential ones: identical draws, bit for bit
    (also with the dense mass matrix). The parallel run shows its progress: stderr is not a terminal under pytest,
    so one line per chain and stage (the workers' reports come back through a queue), no bars."""
    model, X, Y, *_ = blr
    kw = {"num_samples": 20, "warmup_steps": 20, "num_chains": 2, "seed": 3, "full_mass": True}
    seq, par = inf.nuts(model, X, Y, **kw), inf.nuts(model, X, Y, processes=2, progress=True, **kw)
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err  # no bar
    lines = [line for line in err.splitlines() if line.startswith("nuts: ")]
    assert lines[0] == "nuts: 2 chain(s) × (20 warm-up + 20 draws), 2 processes side by side"
    for c in (1, 2):
        assert sum(f"chain {c}/2: warm-up done (20 steps," in line for line in lines) == 1
        assert sum(f"chain {c}/2: sampling done (20 draws," in line for line in lines) == 1
    assert len(lines) == 5
    assert par.diagnostics["processes"] == 2 and seq.diagnostics["processes"] == 1
    assert par.diagnostics["full_mass"] is True
    for k in seq.samples:
        assert torch.equal(seq.samples[k], par.samples[k]), k
    assert par.diagnostics["max_rhat"] == seq.diagnostics["max_rhat"]


class _Terminal:
    """A text stream that says it is a terminal (tqdm draws bars on it)."""

    def __init__(self):
        self.text = []

    def write(self, s):
        self.text.append(s)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_nuts_progress_one_bar_per_chain_position_on_a_terminal_lines_otherwise():
    import io

    from tqdm import tqdm

    from ppl_kbnn.inference.nuts import _Progress, _progress_mode, _Reporter

    term, log = _Terminal(), io.StringIO()
    assert _progress_mode(True, term) == "bars" and _progress_mode(True, log) == "lines"
    assert _progress_mode(False, term) is None and _progress_mode(True, object()) == "lines"
    # bars: chain c on the c-th free line below the bars already open (here a caller's own bar on line 0)
    with tqdm(total=1, desc="caller", file=term) as outer:
        shown = _Progress("bars", 3, warmup=4, draws=6, workers=2, file=term)
        assert [abs(b.pos) for b in shown.bars] == [abs(outer.pos) + 1 + c for c in range(3)]
        shown((1, "warmup", 3, 0.5, 0.1))  # chain 2 finished its warm-up
        shown((2, "sample", 1, 0.9, 0.2))  # chain 3, second draw
        assert [b.n for b in shown.bars] == [0, 4, 4 + 2] and all(b.total == 10 for b in shown.bars)
        assert "sampling" in shown.bars[2].desc and "warm-up" in shown.bars[1].desc
        shown.close()
    alone = _Progress("bars", 2, warmup=4, draws=6, workers=1, file=term)
    assert [abs(b.pos) for b in alone.bars] == [0, 1]
    alone.close()
    # lines: one per chain and phase end, nothing per iteration
    shown = _Progress("lines", 2, warmup=4, draws=6, workers=1, file=log)
    shown((0, "warmup", 3, 0.5, 0.125))
    shown((0, "sample", 5, 1.25, 0.125))
    assert log.getvalue().splitlines() == [
        "nuts: 2 chain(s) × (4 warm-up + 6 draws), one after another",
        "nuts: chain 1/2: warm-up done (4 steps, 0.5 s, step size 0.125)",
        "nuts: chain 1/2: sampling done (6 draws, 1.2 s)",
    ]
    # the chain side reports every iteration for bars, only each phase's last one for lines

    class Kernel:
        step_size = 0.25

    for every, expected in ((True, [("warmup", i) for i in range(4)] + [("sample", i) for i in range(6)]),
                            (False, [("warmup", 3), ("sample", 5)])):  # fmt: skip
        got = []
        report = _Reporter(1, warmup=4, draws=6, sink=got.append, every=every)
        for stage, n in (("Warmup", 4), ("Sample", 6)):
            for i in range(n):
                report(Kernel(), stage, i)
        assert [(e[1], e[2]) for e in got] == expected and {(e[0], e[4]) for e in got} == {(1, 0.25)}


@pytest.fixture(scope="module", params=["normal", "lowrank"])
def svi_run(request, blr):
    model, X, Y, *_ = blr
    before = {k: v[0].clone() for k, v in model.priors.items()}
    res = inf.svi(model, X, Y, guide=request.param, num_steps=1500, lr=0.02, seed=0)
    return request.param, res, before


# ------------------------------------------------------------------ NUTS


def test_nuts_matches_conjugate_posterior(blr, nuts_run):
    _, _, _, mean, cov, _ = blr
    res = nuts_run
    d = res.diagnostics
    assert d["max_rhat"] <= 1.01
    assert d["divergences"] == 0
    assert d["num_chains"] == CHAINS and len(d["chain_seconds"]) == CHAINS
    theta = _flat(res.samples)  # (C·D, 3)
    assert theta.shape == (CHAINS * DRAWS, 3)
    grouped = theta.reshape(CHAINS, DRAWS, 3)
    sd = cov.diagonal().sqrt()
    # mean: standard error sd / sqrt(ESS_bulk)
    ess_mean = torch.as_tensor(inf.ess({"t": grouped}, method="bulk")["t"])
    z_mean = (theta.mean(0) - mean).abs() / (sd / ess_mean.sqrt())
    assert z_mean.max() <= Z, z_mean
    # std: standard error of s² from the ESS of the squared deviations, then se(s) = se(s²) / (2 s)
    sq = (grouped - mean) ** 2
    ess_sq = torch.as_tensor(inf.ess({"sq": sq}, method="mean")["sq"])
    se_var = sq.reshape(-1, 3).std(0) / ess_sq.sqrt()
    z_std = (theta.std(0) - sd).abs() / (se_var / (2 * sd))
    assert z_std.max() <= Z, z_std


def test_nuts_predictive_is_closed_form_noise_plus_draw_variance(blr, nuts_run):
    _, _, _, mean, cov, _ = blr
    res = nuts_run
    Xt = torch.tensor([[-2.0, 1.0], [0.0, 0.0], [1.5, -1.5]])
    Phit = torch.cat([Xt, torch.ones(3, 1)], 1)
    f_var = (Phit @ cov * Phit).sum(-1)  # (3,) posterior variance of f
    exact_mean, exact_std = Phit @ mean, (f_var + NOISE**2).sqrt()
    pm, ps = res.predict(Xt)
    assert pm.shape == ps.shape == (3, 1)
    ess = min(res.diagnostics["min_ess_bulk"], res.diagnostics["min_ess_tail"])
    z_mean = (pm[:, 0] - exact_mean).abs() / (f_var.sqrt() / ess**0.5)
    se_std = f_var * (2 / ess) ** 0.5 / (2 * exact_std)  # se(var_f) = var_f sqrt(2/ESS); d std = d var / (2 std)
    z_std = (ps[:, 0] - exact_std).abs() / se_std
    assert z_mean.max() <= Z and z_std.max() <= Z, (z_mean, z_std)
    # the same draws by hand: mean and unbiased variance of f over draws, plus noise
    f = _flat(res.samples) @ Phit.T  # (S, 3)
    torch.testing.assert_close(pm[:, 0], f.mean(0))
    torch.testing.assert_close(ps[:, 0], (f.var(0) + NOISE**2).sqrt())


def test_arviz_adapter_agrees_with_pyro_stats(nuts_run):
    grouped = {k: v.reshape(CHAINS, DRAWS, *v.shape[1:]) for k, v in nuts_run.samples.items()}
    rh = inf.rhat(grouped, method="split")
    es = inf.ess(grouped, method="identity")
    for k, v in grouped.items():
        torch.testing.assert_close(torch.as_tensor(rh[k]), split_gelman_rubin(v), rtol=1e-6, atol=0)
        # arviz and pyro implement the same Geyer estimator with slightly different truncation details
        torch.testing.assert_close(torch.as_tensor(es[k]), effective_sample_size(v), rtol=0.02, atol=0)
    conv = inf.convergence(grouped)
    assert set(conv) == {"max_rhat", "min_ess_bulk", "min_ess_tail"}
    assert all(isinstance(v, float) for v in conv.values())
    assert conv["max_rhat"] == pytest.approx(nuts_run.diagnostics["max_rhat"])
    one = inf.convergence({k: v[:1] for k, v in grouped.items()})  # a single chain: no R-hat, ESS still
    assert one["max_rhat"] != one["max_rhat"] and one["min_ess_bulk"] > 100
    with pytest.raises(ValueError, match="2 chains"):
        inf.rhat({k: v[:1] for k, v in grouped.items()})
    table = inf.summary(grouped)
    assert len(table) == 3 and {"mean", "sd", "ess_bulk", "ess_tail", "r_hat"} <= set(table.columns)
    means = _flat(nuts_run.samples).mean(0)
    for label, expected in zip(["net.weight[0, 0]", "net.weight[0, 1]", "net.bias[0]"], means, strict=True):
        assert table.loc[label, "mean"] == pytest.approx(float(expected), abs=1e-3)
    assert table["r_hat"].max() == pytest.approx(conv["max_rhat"], abs=0.01)  # the table rounds to 2 digits


# ------------------------------------------------------------------ SVI


def test_svi_close_to_exact_posterior(blr, svi_run):
    """Tolerance: the last iterate of single-particle SVI carries optimisation noise; with 1500 steps at
    lr 0.02 decaying to 0.002 the variational mean was measured within 0.15 posterior std of μ (0.1–0.4
    across step/lr settings); we allow 0.4. The std is checked against the family's optimum: the
    mean-field optimum for a Gaussian target has std 1/sqrt(Λ_jj), the low-rank family (rank 2 + diagonal
    in 3 dims) can hold Σ; 500 draws give ~3% Monte-Carlo error on a std; we allow 25%."""
    model, _, _, mean, cov, precision = blr
    name, res, before = svi_run
    q = res.fitted
    loc = _flat({k: v[None] for k, v in q.median().items()})[0]
    sd = cov.diagonal().sqrt()
    assert ((loc - mean).abs() / sd).max() <= 0.4
    target_sd = precision.diagonal().rsqrt() if name == "normal" else sd
    ratio = _flat(res.samples).std(0) / target_sd
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio
    # the negative ELBO decreases
    k = len(res.trace) // 10
    assert sum(res.trace[-k:]) / k < sum(res.trace[:k]) / k
    assert res.diagnostics["final_loss"] == pytest.approx(sum(res.trace[-k:]) / k)
    # the fit must not move the model's prior (AutoNormal does not copy its init values)
    for site, loc0 in before.items():
        torch.testing.assert_close(model.priors[site][0], loc0, rtol=0, atol=0)
    # memory: the variational parameters, counted independently from the family's size
    D = 3
    n_params = 2 * D if name == "normal" else 2 * D + D * res.diagnostics["rank"]
    assert res.memory_bytes == n_params * 8 == sum(p.numel() * 8 for p in q.parameters())
    assert res.method == f"svi-{name}"
    pm, ps = res.predict(torch.zeros(4, 2))
    assert pm.shape == ps.shape == (4, 1) and (ps > NOISE).all()


# ------------------------------------------------------------------ retraining


def test_point_network_is_plain_torch_at_the_prior_mean():
    torch.manual_seed(0)
    model = pk.BayesianModel(pretrained_mlp(8, steps=50), prior_scale=0.1, obs_noise=0.1, bayesian=["2"])
    point = inf.point_network(model)
    assert not any(isinstance(m, PyroModule) for m in point.net.modules())
    names = {f"net.{n}" for n, _ in point.net.named_parameters()}
    assert names == set(model.priors)  # trainable = the Bayesian subset; frozen layers stay buffers
    x = torch.linspace(-3, 3, 11)[:, None]
    with pyro.poutine.condition(data={k: loc for k, (loc, _) in model.priors.items()}):
        expected = model(x)
    torch.testing.assert_close(inf.model_output(point, x), expected)
    assert all(p.requires_grad for p in point.parameters())
    assert all(not p.requires_grad for p in model.parameters())


def test_retrain_fifo_keeps_the_last_m_samples_and_fits_them(blr):
    model, X, Y, *_ = blr
    r = inf.Retrainer(model, memory=5, epochs=20, lr=0.02)
    r.update(X[:12], Y[:12])
    bx, by = r.buffer
    assert r.buffer_size == 5 and r.n_updates == 12 and len(r.buffer_losses) == 12
    torch.testing.assert_close(bx, X[7:12], rtol=0, atol=0)
    torch.testing.assert_close(by, Y[7:12], rtol=0, atol=0)
    # the loss on the buffer went down from the pre-trained weights'
    pre = inf.point_network(model)
    with torch.no_grad():
        pre_loss = float(((inf.model_output(pre, bx) - by) ** 2).mean())
    assert r.buffer_loss() < 0.5 * pre_loss
    # and training on one more arrival lowers the loss on the (new) buffer
    r2 = inf.Retrainer(model, memory=5, epochs=1, lr=0.02).update(X[:5], Y[:5])
    r2._push(_take(X, slice(5, 6)), Y[5:6])
    before = r2.buffer_loss()
    r2._train()
    assert r2.buffer_loss() < before


def test_retrain_memory_bytes_are_measured(blr):
    model, X, Y, *_ = blr
    m5 = inf.retrain(model, X[:12], Y[:12], memory=5, epochs=2, lr=0.01)
    m10 = inf.retrain(model, X[:12], Y[:12], memory=10, epochs=2, lr=0.01)
    row = (2 + 1) * 8  # one (x, y) sample in float64
    assert m10.memory_bytes - m5.memory_bytes == 5 * row
    adam = 2 * 3 * 8  # exp_avg and exp_avg_sq of the 3 trained scalars (plus step counters)
    assert m5.memory_bytes >= 5 * row + adam
    assert m5.method == "retrain-M5" and m5.diagnostics["buffer_size"] == 5 and len(m5.trace) == 12
    assert m5.diagnostics["n_steps"] == 12 * 2


def test_retrain_on_all_data_reaches_least_squares(blr):
    model, X, Y, *_ = blr
    res = inf.retrain(model, X, Y, memory=None, epochs=50, lr=0.05)
    r = res.fitted
    Phi = torch.cat([X, torch.ones(N, 1)], 1)
    ls = torch.linalg.lstsq(Phi, Y).solution[:, 0]  # (3,)
    theta = torch.cat([r.point.net.weight.detach()[0], r.point.net.bias.detach()])
    torch.testing.assert_close(theta, ls, rtol=0, atol=1e-3)
    assert r.buffer_size == N and res.method == "retrain-all"
    assert res.diagnostics["final_loss"] < res.diagnostics["initial_loss"]
    Xt = torch.randn(5, 2)
    mean, std = res.predict(Xt)
    torch.testing.assert_close(mean[:, 0], torch.cat([Xt, torch.ones(5, 1)], 1) @ ls, rtol=0, atol=5e-3)
    assert mean.shape == std.shape == (5, 1) and (std == NOISE).all()  # a point estimate: obs noise only


def test_retrain_with_minibatches_is_seeded(blr):
    model, X, Y, *_ = blr
    a = inf.retrain(model, X, Y, memory=10, epochs=2, batch_size=3, lr=0.01, seed=3)
    b = inf.retrain(model, X, Y, memory=10, epochs=2, batch_size=3, lr=0.01, seed=3)
    assert a.trace == b.trace
    assert a.diagnostics["n_steps"] == sum(2 * -(-min(i + 1, 10) // 3) for i in range(N))


def test_opaque_inputs_take_and_cat():
    x = torch.arange(12.0).reshape(6, 2)
    structured = {"a": x, "b": (x[:, :1], x * 2), "mask": None}
    part = _take(structured, torch.tensor([4, 1]))
    torch.testing.assert_close(part["a"], x[[4, 1]])
    torch.testing.assert_close(part["b"][1], 2 * x[[4, 1]])
    assert part["mask"] is None and isinstance(part["b"], tuple)
    back = _cat([_take(structured, slice(0, 2)), _take(structured, slice(2, 6))])
    torch.testing.assert_close(back["b"][0], x[:, :1])
    assert _length(structured) == 6 and _length([x, x]) == 6
    with pytest.raises(ValueError, match="common number of samples"):
        _length({"a": x, "b": x[:3]})


# ------------------------------------------------------------------ arguments and the uniform result


def test_bad_arguments_raise_value_errors(blr):
    model, X, Y, *_ = blr
    with pytest.raises(ValueError, match="unknown svi guide 'full'"):
        inf.svi(model, X, Y, guide="full")
    with pytest.raises(ValueError, match="rank"):
        inf.svi(model, X, Y, guide="normal", rank=2)
    with pytest.raises(ValueError, match="num_steps"):
        inf.svi(model, X, Y, num_steps=0)
    with pytest.raises(ValueError, match="memory"):
        inf.Retrainer(model, memory=0)
    with pytest.raises(ValueError, match="memory"):
        inf.retrain(model, X, Y, memory=0)
    with pytest.raises(ValueError, match="epochs"):
        inf.Retrainer(model, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        inf.Retrainer(model, lr=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        inf.Retrainer(model, batch_size=0)
    with pytest.raises(ValueError, match="y: expected a tensor with 30 samples"):
        inf.retrain(model, X, Y[:3])
    with pytest.raises(ValueError, match="num_chains"):
        inf.nuts(model, X, Y, num_chains=0)
    with pytest.raises(ValueError, match="processes"):
        inf.nuts(model, X, Y, processes=0)
    with pytest.raises(ValueError, match="BayesianModel"):
        inf.point_network(torch.nn.Linear(2, 1))


def test_every_result_has_measured_time_and_memory(blr, nuts_run, svi_run):
    model, X, Y, *_ = blr
    guide = pk.KalmanGuide(model, covariance="block").update(X, Y)
    kbt = inf.from_guide(guide)
    retrained = inf.retrain(model, X, Y, memory=8, epochs=2, lr=0.01)
    results = [nuts_run, svi_run[1], retrained, kbt]
    for res in results:
        assert isinstance(res, inf.InferenceResult)
        assert res.wall_seconds > 0 and res.memory_bytes > 0, res.method
        mean, std = res.predict(X[:4])
        assert mean.shape == std.shape == (4, 1) and (std >= NOISE - 1e-12).all(), res.method
    assert nuts_run.memory_bytes == CHAINS * DRAWS * 3 * 8  # every draw of the 3 weights, float64
    assert kbt.method == "kbt-block" and kbt.memory_bytes == guide.belief_bytes
    assert kbt.wall_seconds == guide.update_seconds and kbt.fitted is guide
    mean, var = guide.predict(X[:4])
    torch.testing.assert_close(kbt.predict(X[:4])[1], var.sqrt())
    # the Kalman guide is exact on this linear model: it agrees with the NUTS predictive
    nm, ns = nuts_run.predict(X[:4])
    assert ((mean - nm).abs() / ns).max() < 0.05
