"""Reliability: bad input is a named ``ValueError``, rejected operations leave the belief bit-identical,
updates are atomic even under Ctrl-C, checkpoints load completely or not at all, and beliefs stay
symmetric, PSD and finite over long and adversarial streams.

Every rejected operation is checked with :func:`untouched`: every tensor of ``state_dict()`` is
``torch.equal`` to before, and ``n_updates``, ``guard_counts`` and the settings are unchanged.
"""

from __future__ import annotations

import copy
import io
import math
import signal

import pytest
import torch
from torch.overrides import TorchFunctionMode

import ppl_kbnn as pk
from ppl_kbnn import moments as mo
from ppl_kbnn.kalman import Guards
from ppl_kbnn.nn import DecisionTransformer, DTConfig, Transformer, TransformerConfig
from ppl_kbnn.validation.long_stream import belief_health, long_stream_run, long_stream_section

NAN, INF = math.nan, math.inf

# --------------------------------------------------------------------------------------------- helpers


def mlp(widths=(2, 4, 1), act=torch.nn.ReLU, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [torch.nn.Linear(a, b), act()]
    return torch.nn.Sequential(*layers[:-1])


def tiny_tf(seed=0, max_len=6):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(d_in=2, d_out=1, d_model=8, n_layer=1, n_head=2, max_len=max_len))


def tiny_dt(seed=0):
    torch.manual_seed(seed)
    return DecisionTransformer(DTConfig(state_dim=3, act_dim=1, d_model=8, n_layer=1, n_head=2, max_ep_len=20))


def stream(n, d_in=2, d_out=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g)
    return X, torch.sin(X.sum(1, keepdim=True)).expand(n, d_out) + 0.3 * torch.randn(n, d_out, generator=g)


def snapshot(guide) -> dict:
    """Everything a rejected operation must leave unchanged."""
    return {
        "tensors": {k: v.clone() for k, v in guide.state_dict().items() if isinstance(v, torch.Tensor)},
        "n_updates": guide.n_updates,
        "guard_counts": dict(guide.guard_counts),
        "process_noise": guide.process_noise,
        "guards": guide.guards.settings(),
    }


def untouched(guide, before: dict) -> None:
    now = guide.state_dict()
    tensors = {k: v for k, v in now.items() if isinstance(v, torch.Tensor)}
    assert tensors.keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), f"{k} changed"
    assert guide.n_updates == before["n_updates"]
    assert guide.guard_counts == before["guard_counts"]
    assert guide.process_noise == before["process_noise"]
    assert guide.guards.settings() == before["guards"]


def model_tensors(model) -> dict:
    out = {k: v.clone() for k, v in model.state_dict().items()}
    out.update({f"prior:{k}:{i}": t.clone() for k, pair in model.priors.items() for i, t in enumerate(pair)})
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize("bad", ["0.1", None, True, INF, NAN, -1.0, 0.0, [0.1]])
def test_obs_noise_must_be_a_finite_positive_number(bad):
    net = mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="obs_noise"):
        pk.BayesianModel(net, 0.5, bad)
    assert same_tensors(before, net.state_dict())


@pytest.mark.parametrize("bad", ["0.5", None, INF, NAN, -1.0, {"0": NAN, "2": 1.0}, {"0": "x", "2": 1.0},
                                 {"0": INF, "2": 1.0}])  # fmt: skip
def test_prior_scale_must_be_finite_positive_numbers(bad):
    with pytest.raises(ValueError, match="prior_scale"):
        pk.BayesianModel(mlp(), bad, 0.1)


@pytest.mark.parametrize(
    ("rel", "floor", "name"),
    [
        (NAN, 0.1, "rel"),
        (INF, 0.1, "rel"),
        (0.1, INF, "floor"),
        (0.1, NAN, "floor"),
        ("0.1", 0.1, "rel"),
        (0.1, 0.0, "floor"),
    ],
)
def test_relative_scale_must_be_finite(rel, floor, name):
    with pytest.raises(ValueError, match=f"RelativeScale.{name}"):
        pk.RelativeScale(rel, floor)


@pytest.mark.parametrize("rnn", [torch.nn.LSTM, torch.nn.GRU])
def test_a_recurrent_layer_cannot_be_made_bayesian_and_says_so(rnn):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=rf"module '0' \({rnn.__name__}\) cannot be made random"):
        pk.BayesianModel(torch.nn.Sequential(rnn(2, 3)), 0.5, 0.1)


@pytest.mark.parametrize(
    ("setting", "bad"),
    [(s, v) for s in ("var_floor", "jitter") for v in (NAN, INF, -1.0, "0.1", None)]
    + [("gain_clip", v) for v in (NAN, INF, -1.0, 0.0, "0.1")]
    + [("psd_repair", v) for v in ("yes", 1, None)],
)
def test_guard_settings_are_checked_by_name(setting, bad):
    with pytest.raises(ValueError, match=setting):
        Guards(**{setting: bad})
    model = pk.BayesianModel(mlp(), 0.5, 0.1)
    before = model_tensors(model)
    with pytest.raises(ValueError, match=setting):
        pk.KalmanGuide(model, **{setting: bad})
    assert same_tensors(before, model_tensors(model))


@pytest.mark.parametrize("bad", [NAN, INF, -1.0, "1e-5", None, True])
def test_process_noise_must_be_a_finite_non_negative_number(bad):
    model = pk.BayesianModel(mlp(), 0.5, 0.1)
    before = model_tensors(model)
    with pytest.raises(ValueError, match="process_noise"):
        pk.KalmanGuide(model, process_noise=bad)
    assert same_tensors(before, model_tensors(model))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"covariance": 1}, "covariance"),
        ({"covariance": ["block"]}, "covariance"),
        ({"covariance": "full"}, "covariance"),
        ({"update": None}, "update"),
        ({"hidden": ["diag"]}, "hidden"),
        ({"hidden": "token"}, "hidden"),
        ({"seed": "1"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"covariance": "lowrank", "update": "ekf", "rank": 0}, "rank"),
        ({"covariance": "lowrank", "update": "ekf", "rank": 2.0}, "rank"),
        ({"covariance": "lowrank", "update": "ekf", "truncation": "none"}, "truncation"),
        ({"covariance": "lowrank", "update": "ekf", "truncation": ["diag"]}, "truncation"),
        ({"update": "slr", "draws": 3}, "draws"),
        ({"update": "slr", "draws": "100"}, "draws"),
    ],
)
def test_guide_choices_are_checked_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        pk.KalmanGuide(pk.BayesianModel(mlp(), 0.5, 0.1), **kwargs)


@pytest.mark.parametrize("bad", [5, None, 1.0])
def test_the_bayesian_subset_must_be_a_name_list_or_predicate(bad):
    with pytest.raises(ValueError, match="bayesian=.*expected 'all'"):
        pk.BayesianModel(mlp(), 0.5, 0.1, bayesian=bad)


@pytest.mark.parametrize(
    ("config", "kwargs", "name"),
    [
        (TransformerConfig, {"d_in": "2", "d_out": 1}, "d_in"),
        (TransformerConfig, {"d_in": 2, "d_out": 1.0}, "d_out"),
        (TransformerConfig, {"d_in": 2, "d_out": 1, "n_head": True}, "n_head"),
        (TransformerConfig, {"d_in": 2, "d_out": 1, "max_len": 4.5}, "max_len"),
        (DTConfig, {"state_dim": "3", "act_dim": 1}, "state_dim"),
        (DTConfig, {"state_dim": 3, "act_dim": 1, "context": 2.0}, "context"),
    ],
)
def test_network_sizes_must_be_ints(config, kwargs, name):
    with pytest.raises(ValueError, match=f"{name} must be an int"):
        config(**kwargs)


def test_a_sequential_whose_linear_sizes_do_not_chain_is_rejected_at_construction():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    model = pk.BayesianModel(net, 0.5, 0.1)
    with pytest.raises(ValueError, match=r"'net.2' .*3 input features.*'net.0' .*4"):
        pk.KalmanGuide(model)


# --------------------------------------------------------------------------------------------- bad updates


def test_bad_chain_updates_leave_the_guide_untouched():
    guide = pk.KalmanGuide(pk.BayesianModel(mlp(), 0.5, 0.1), var_floor=1e-3).update(*stream(5))
    before = snapshot(guide)
    X, Y = stream(6, seed=1)
    for x, y, msg in [
        (X.tolist(), Y, "x: expected a torch.Tensor"),
        (X, Y.tolist(), "y: expected a torch.Tensor"),
        (X.long(), Y, "x: expected a floating-point tensor"),
        (X, Y[:, 0].long(), "y: expected a floating-point tensor"),
        (X[:, :1], Y, "x: expected shape"),
        (X, Y.clone().fill_(NAN), "y: contains NaN"),
        (X.float(), Y.float(), "dtype"),
    ]:
        with pytest.raises(ValueError, match=msg):
            guide.update(x, y)
        untouched(guide, before)


@pytest.mark.parametrize("what", ["update", "predict"])
def test_bad_transformer_inputs_are_named_value_errors(what):
    guide = pk.KalmanGuide(pk.BayesianModel(tiny_tf(max_len=4), 0.1, 0.1, bayesian="head"))
    guide.update(torch.randn(2, 3, 2), torch.randn(2, 1))
    before = snapshot(guide)
    cases = [
        (torch.ones(1, 3, 2, dtype=torch.long), "x: expected a floating-point tensor"),
        (torch.randn(1, 6, 2), r"sequence length T=6.*max_len=4"),
        (torch.randn(1, 0, 2), r"sequence length T=0"),
    ]
    for x, msg in cases:
        with pytest.raises(ValueError, match=msg):
            guide.update(x, torch.zeros(1, 1)) if what == "update" else guide.predict(x)
        untouched(guide, before)


def test_bad_decision_transformer_inputs_are_named_value_errors():
    guide = pk.KalmanGuide(pk.BayesianModel(tiny_dt(), 0.1, 0.1, bayesian="head"), hidden="token")
    K = 3
    x = {"returns_to_go": torch.randn(1, K, 1), "states": torch.randn(1, K, 3), "actions": torch.randn(1, K, 1),
         "timesteps": torch.arange(K)[None]}  # fmt: skip
    guide.update(x, torch.randn(1, 1))
    before = snapshot(guide)
    for key, value, msg in [
        ("states", torch.ones(1, K, 3, dtype=torch.long), "states: expected a floating-point tensor"),
        ("timesteps", torch.full((1, K), 25), r"timesteps must lie in \[0, max_ep_len=20\)"),
        ("timesteps", torch.arange(K, dtype=torch.float64)[None], "timesteps: expected dtype torch.long"),
    ]:
        with pytest.raises(ValueError, match=msg):
            guide.update({**x, key: value}, torch.randn(1, 1))
        untouched(guide, before)


def test_non_finite_update_rolls_back_counts_and_belief():
    guide = pk.KalmanGuide(pk.BayesianModel(mlp(), 0.5, 0.1), var_floor=1.0).update(*stream(5))
    assert guide.guard_counts["var_floor"] > 0  # the floor fires, so rolling back the counts is tested
    before = snapshot(guide)
    X, Y = stream(6, seed=1)
    X[4] = 1e200  # finite input, non-finite update after 4 samples were absorbed
    with pytest.raises(FloatingPointError):
        guide.update(X, Y)
    untouched(guide, before)


# --------------------------------------------------------------------------------------------- interrupts


class _RaiseAtCall(TorchFunctionMode):
    """Counts torch calls; raises ``exc`` at call number ``at`` (once)."""

    def __init__(self, at: float = math.inf, exc: type[BaseException] = KeyboardInterrupt) -> None:
        super().__init__()
        self.calls, self.at, self.exc, self.fired = 0, at, exc, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if self.calls == self.at and not self.fired:
            self.fired = True
            raise self.exc("interrupted by the test")
        return func(*args, **(kwargs or {}))


def _calls(make, x, y) -> int:
    guide = make()
    with _RaiseAtCall() as mode:
        guide.update(x, y)
    return mode.calls


def _chain_guide(covariance):
    model = pk.BayesianModel(mlp((2, 6, 1)), 0.5, 0.1)
    return lambda: pk.KalmanGuide(model, covariance, var_floor=1.0, process_noise=1e-4).update(*stream(3))


def _transformer_guide(covariance):
    model = pk.BayesianModel(tiny_tf(), 0.1, 0.1, bayesian="last_block")
    g = torch.Generator().manual_seed(0)
    x0, y0 = torch.randn(2, 3, 2, generator=g), torch.randn(2, 1, generator=g)
    return lambda: pk.KalmanGuide(model, covariance, hidden="token", process_noise=1e-5).update(x0, y0)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("covariance", ["block", "diag"])
@pytest.mark.parametrize("net", ["chain", "transformer"])
def test_update_interrupted_mid_batch_leaves_the_guide_untouched(net, covariance, exc):
    """An exception that is not an ``Exception`` (Ctrl-C, ``sys.exit``) raised while the 4th sample of a batch
    is being absorbed: the first 3 samples' work is undone."""
    make = _chain_guide(covariance) if net == "chain" else _transformer_guide(covariance)
    g = torch.Generator().manual_seed(1)
    if net == "chain":
        X, Y = stream(6, seed=1)
    else:
        X, Y = torch.randn(6, 3, 2, generator=g), torch.randn(6, 1, generator=g)
    c3, c4 = _calls(make, X[:3], Y[:3]), _calls(make, X[:4], Y[:4])
    assert c4 > c3
    guide = make()
    before = snapshot(guide)
    with pytest.raises(exc), _RaiseAtCall(at=(c3 + c4) // 2, exc=exc) as mode:
        guide.update(X, Y)
    assert mode.fired
    untouched(guide, before)
    guide.update(X, Y)  # and the guide still works: the same result as an uninterrupted guide
    ref = make().update(X, Y)
    for a, b in zip(guide.state_dict().values(), ref.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_a_real_ctrl_c_signal_during_a_long_update_leaves_the_guide_untouched():
    guide = pk.KalmanGuide(pk.BayesianModel(mlp((2, 6, 1)), 0.5, 0.1)).update(*stream(3))
    before = snapshot(guide)
    X, Y = stream(50_000, seed=2)  # minutes of work: the signal arrives while samples are being absorbed

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            guide.update(X, Y)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    untouched(guide, before)


# --------------------------------------------------------------------------------------------- checkpoints


def _trained(covariance="block", **kw):
    model = pk.BayesianModel(mlp(), 0.5, 0.1)
    return model, pk.KalmanGuide(model, covariance, **kw).update(*stream(20))


def _target(model, covariance="block", **kw):
    """A guide with its own, different belief and counts, to see that nothing of it is overwritten."""
    return pk.KalmanGuide(model, covariance, **kw).update(*stream(3, seed=5))


def test_checkpoint_round_trip_continues_bit_identically():
    model, src = _trained(process_noise=1e-5, var_floor=1e-3, jitter=1e-9)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = _target(model, process_noise=1e-5, var_floor=1e-3, jitter=1e-9)
    dst.load_state_dict(torch.load(buf, weights_only=False))
    assert dst.n_updates == src.n_updates and dst.guard_counts == src.guard_counts
    X, Y = stream(10, seed=7)
    src.update(X, Y)
    dst.update(X, Y)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k


def _neg(sd, k="belief.cov_0"):
    sd[k] = -sd[k]


def _nan(sd, k="belief.cov_0"):
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = NAN


def _inf_mean(sd):
    sd["belief.mean_1"] = sd["belief.mean_1"].clone()
    sd["belief.mean_1"].view(-1)[0] = INF


def _asym(sd):
    c = sd["belief.cov_0"].clone()
    c[0, 0, 1] += 1e-3
    sd["belief.cov_0"] = c


def _extra(sd, **kw):
    sd["_extra_state"] = {**sd["_extra_state"], **kw}


CORRUPT = {
    "wrong shape": (lambda sd: sd.__setitem__("belief.mean_1", torch.zeros(2, 5)), r"mean_1.*shape"),
    "missing key": (lambda sd: sd.pop("belief.cov_1"), r"missing.*cov_1"),
    "extra key": (lambda sd: sd.__setitem__("zzz", torch.zeros(1)), r"unexpected.*zzz"),
    "not a tensor": (lambda sd: sd.__setitem__("belief.cov_1", sd["belief.cov_1"].tolist()), r"cov_1.*tensor"),
    "NaN covariance": (_nan, r"cov_0.*NaN"),
    "inf mean": (_inf_mean, r"mean_1.*inf"),
    "negated covariance": (_neg, r"cov_0.*positive semi-definite"),
    "asymmetric covariance": (_asym, r"cov_0.*symmetric"),
    "changed mask": (
        lambda sd: sd.__setitem__("belief.mask_0", torch.zeros_like(sd["belief.mask_0"])),
        r"belief.mask_0",
    ),
    "corrupt n_updates": (lambda sd: _extra(sd, n_updates="abc"), r"n_updates"),
    "negative n_updates": (lambda sd: _extra(sd, n_updates=-3), r"n_updates"),
    "corrupt guard_counts": (lambda sd: _extra(sd, guard_counts="x"), r"guard_counts"),
    "corrupt extra state": (lambda sd: sd.__setitem__("_extra_state", "x"), r"not a KalmanGuide state dict"),
}


@pytest.mark.parametrize("covariance", ["block", "diag"])
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_checkpoint_is_rejected_and_the_target_stays_bit_identical(case, covariance):
    if covariance == "diag" and case == "asymmetric covariance":
        pytest.skip("a diagonal belief has no off-diagonal entries")
    model, src = _trained(covariance)
    mutate, msg = CORRUPT[case]
    sd = copy.deepcopy(src.state_dict())
    if covariance == "diag" and case == "negated covariance":
        msg = r"cov_0.*negative variance"
    mutate(sd)
    dst = _target(model, covariance)
    before = snapshot(dst)
    with pytest.raises(ValueError, match=msg):
        dst.load_state_dict(sd)
    untouched(dst, before)


def test_a_checkpoint_of_another_dtype_is_rejected_both_ways():
    model64, src64 = _trained()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model32 = pk.BayesianModel(mlp(), 0.5, 0.1)
        g32 = pk.KalmanGuide(model32)
        g32.update(*(t.float() for t in stream(3, seed=5)))
    finally:
        torch.set_default_dtype(old)
    before = snapshot(g32)
    with pytest.raises(ValueError, match=r"dtype.*float64.*float32"):
        g32.load_state_dict(src64.state_dict())
    untouched(g32, before)
    dst = _target(model64)
    before = snapshot(dst)
    with pytest.raises(ValueError, match=r"dtype.*float32.*float64"):
        dst.load_state_dict(g32.state_dict())
    untouched(dst, before)


SETTINGS = {
    "process_noise": ({"process_noise": 1e-5}, {}),
    "var_floor": ({"var_floor": 1e-3}, {}),
    "jitter": ({"jitter": 1e-9}, {}),
    "gain_clip": ({"gain_clip": 5.0}, {}),
    "psd_repair": ({"psd_repair": True}, {}),
    "hidden": ({"hidden": "full"}, {}),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_a_checkpoint_saved_with_other_update_settings_is_rejected(setting):
    saved, here = SETTINGS[setting]
    model, src = _trained(**saved)
    dst = _target(model, **here)
    before = snapshot(dst)
    with pytest.raises(ValueError, match=setting):
        dst.load_state_dict(src.state_dict())
    untouched(dst, before)
    # and the other way round
    _, src2 = _trained(**here)
    dst2 = _target(model, **saved)
    before = snapshot(dst2)
    with pytest.raises(ValueError, match=setting):
        dst2.load_state_dict(src2.state_dict())
    untouched(dst2, before)


def test_a_checkpoint_of_another_covariance_or_observation_noise_is_rejected():
    model, src = _trained()
    for dst, name in [
        (_target(model, "diag"), "covariance"),
        (_target(pk.BayesianModel(mlp(), 0.5, 0.2)), "obs_noise"),
        (_target(pk.BayesianModel(mlp((2, 5, 1)), 0.5, 0.1)), "nodes"),
    ]:
        before = snapshot(dst)
        with pytest.raises(ValueError, match=rf"different model/guide.*{name}"):
            dst.load_state_dict(src.state_dict())
        untouched(dst, before)


def test_a_chain_belief_does_not_load_into_a_network_with_other_fixed_weights():
    """Only the last layer is Bayesian; the first layer's fixed weights differ between the two networks."""
    src_model = pk.BayesianModel(mlp(seed=0), 0.5, 0.1, bayesian=["2"])
    src = pk.KalmanGuide(src_model).update(*stream(10))
    other = mlp(seed=1)
    other[2].load_state_dict(mlp(seed=0)[2].state_dict())  # same Bayesian layer, other fixed first layer
    dst = _target(pk.BayesianModel(other, 0.5, 0.1, bayesian=["2"]))
    before = snapshot(dst)
    with pytest.raises(ValueError, match="fixed"):
        dst.load_state_dict(src.state_dict())
    untouched(dst, before)


def test_a_transformer_head_belief_does_not_load_into_a_network_with_another_frozen_body():
    src = pk.KalmanGuide(pk.BayesianModel(tiny_tf(seed=0), 0.1, 0.1, bayesian="head"))
    src.update(torch.randn(3, 4, 2), torch.randn(3, 1))
    body = tiny_tf(seed=1)
    body.head.load_state_dict(tiny_tf(seed=0).head.state_dict())  # same head, other body
    dst = pk.KalmanGuide(pk.BayesianModel(body, 0.1, 0.1, bayesian="head"))
    before = snapshot(dst)
    with pytest.raises(ValueError, match="fixed"):
        dst.load_state_dict(src.state_dict())
    untouched(dst, before)
    same = pk.KalmanGuide(pk.BayesianModel(tiny_tf(seed=0), 0.1, 0.1, bayesian="head"))
    same.load_state_dict(src.state_dict())  # the same network: loads
    x = torch.randn(2, 4, 2)
    for a, b in zip(src.predict(x), same.predict(x), strict=True):
        assert torch.equal(a, b)


def test_load_beliefs_refuses_a_guide_of_another_network_or_dtype():
    src = pk.KalmanGuide(pk.BayesianModel(mlp(seed=0), 0.5, 0.1, bayesian=["2"])).update(*stream(10))
    other = mlp(seed=1)
    other[2].load_state_dict(mlp(seed=0)[2].state_dict())  # same Bayesian layer, other fixed first layer
    dst = _target(pk.BayesianModel(other, 0.5, 0.1, bayesian=["2"]))
    before = snapshot(dst)
    with pytest.raises(ValueError, match="fixed"):
        dst.load_beliefs(src)
    untouched(dst, before)


def test_partial_loads_are_refused():
    model, src = _trained()
    dst = _target(model)
    before = snapshot(dst)
    for kw in ({"strict": False}, {"assign": True}):
        with pytest.raises(ValueError, match="strict=False and assign=True are not supported"):
            dst.load_state_dict(src.state_dict(), **kw)
        untouched(dst, before)
    with pytest.raises(ValueError, match="expected a dict"):
        dst.load_state_dict([("belief.mean_0", src.belief.mean_0)])
    untouched(dst, before)


def test_a_load_interrupted_while_copying_leaves_the_target_bit_identical():
    model, src = _trained()
    sd = src.state_dict()
    counted = _target(model)
    with _RaiseAtCall() as mode:
        counted.load_state_dict(sd)
    dst = _target(model)
    before = snapshot(dst)
    with pytest.raises(KeyboardInterrupt), _RaiseAtCall(at=mode.calls - 1) as interrupt:  # at the last copies
        dst.load_state_dict(sd)
    assert interrupt.fired
    untouched(dst, before)


JOINT_CORRUPT = {
    "full NaN": ("full", lambda sd: sd["belief.cov"].view(-1).__setitem__(3, NAN), r"belief.cov.*NaN"),
    "full not PSD": ("full", lambda sd: sd.__setitem__("belief.cov", -sd["belief.cov"]),
                     r"belief.cov.*positive semi-definite"),
    "full inf mean": ("full", lambda sd: sd["belief.loc"].view(-1).__setitem__(0, INF), r"belief.loc.*inf"),
    "lowrank precision <= 0": ("lowrank", lambda sd: sd["belief.prec_diag"].view(-1).__setitem__(0, -1.0),
                               r"belief.prec_diag.*> 0"),
    "lowrank NaN factor": ("lowrank", lambda sd: sd["belief.prec_factor"].view(-1).__setitem__(0, NAN),
                           r"belief.prec_factor.*NaN"),
    "lowrank counter": ("lowrank", lambda sd: sd.__setitem__("belief._extra_state", {"n_truncations": -1}),
                        r"belief._extra_state.*n_truncations"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(JOINT_CORRUPT))
def test_a_corrupt_joint_belief_checkpoint_is_rejected(case):
    covariance, mutate, msg = JOINT_CORRUPT[case]
    model = pk.BayesianModel(mlp(), 0.5, 0.1)
    src = pk.KalmanGuide(model, covariance, update="ekf").update(*stream(10))
    sd = copy.deepcopy(src.state_dict())
    mutate(sd)
    dst = pk.KalmanGuide(model, covariance, update="ekf").update(*stream(3, seed=5))
    before = snapshot(dst)
    with pytest.raises(ValueError, match=msg):
        dst.load_state_dict(sd)
    untouched(dst, before)
    dst.load_state_dict(src.state_dict())  # the intact checkpoint loads
    assert torch.equal(dst.belief.mean, src.belief.mean)


@pytest.mark.parametrize(
    ("saved", "here", "name"),
    [
        ({"covariance": "lowrank", "update": "ekf", "rank": 3}, {"covariance": "lowrank", "update": "ekf"}, "rank"),
        (
            {"covariance": "lowrank", "update": "ekf", "truncation": "diag"},
            {"covariance": "lowrank", "update": "ekf"},
            "truncation",
        ),
        ({"covariance": "diag", "update": "slr", "draws": 10}, {"covariance": "diag", "update": "slr"}, "draws"),
        ({"covariance": "diag", "update": "slr", "seed": 1}, {"covariance": "diag", "update": "slr"}, "seed"),
        ({"covariance": "full", "update": "slr"}, {"covariance": "full", "update": "ekf"}, "update"),
    ],
)
def test_a_checkpoint_of_another_update_rule_or_its_options_is_rejected(saved, here, name):
    model = pk.BayesianModel(mlp(), 0.5, 0.1)
    src = pk.KalmanGuide(model, **saved)
    dst = pk.KalmanGuide(model, **here)
    before = snapshot(dst)
    with pytest.raises(ValueError, match=rf"different model/guide \(differs in {name}"):
        dst.load_state_dict(src.state_dict())
    untouched(dst, before)


def test_a_checkpoint_of_another_observed_output_is_rejected():
    src = pk.KalmanGuide(pk.BayesianModel(tiny_tf(), 0.1, 0.1, bayesian="head", observe="all"))
    dst = pk.KalmanGuide(pk.BayesianModel(tiny_tf(), 0.1, 0.1, bayesian="head", observe="last"))
    before = snapshot(dst)
    with pytest.raises(ValueError, match=r"differs in observe"):
        dst.load_state_dict(src.state_dict())
    untouched(dst, before)


# --------------------------------------------------------------------------------------------- moments

T, D = 3, 2


def _moment_cases():
    m, a = torch.zeros(T, D), torch.full((T, T), 1.0 / T)
    covs = {"diag": torch.ones(T, D), "token": torch.eye(D).expand(T, D, D).clone(),
            "joint": torch.eye(T * D).reshape(T, D, T, D)}  # fmt: skip
    a_covs = {"diag": torch.zeros(T, T, T), "token": torch.zeros(T, T, T), "joint": torch.zeros(T, T, T, T)}
    W, Wc = torch.randn(3, D + 1), torch.eye(D + 1).expand(3, D + 1, D + 1).clone()

    def b(x, n):
        return x.expand(n, *x.shape).clone()

    L, zero = m.tolist(), torch.tensor(0.0)
    cases = {
        "softmax list": (lambda: mo.softmax_moments([0.0, 1.0, 2.0], torch.eye(3)), "mean: expected a torch.Tensor"),
        "softmax 0-dim": (lambda: mo.softmax_moments(zero, torch.eye(1)), r"mean: expected at least 1 dims"),
        "softmax batch": (lambda: mo.softmax_moments(torch.zeros(2, 3), b(torch.eye(3), 4)), "batch dimensions"),
        "softmax mask batch": (lambda: mo.softmax_moments(torch.zeros(2, 3), torch.eye(3),
                                                         mask=torch.ones(4, 3, dtype=torch.bool)), "batch dimensions"),
        "softmax_joint list": (lambda: mo.softmax_joint_moments(a.tolist(), torch.eye(T * T).reshape(T, T, T, T)),
                               "mean: expected a torch.Tensor"),
        "softmax_joint batch": (lambda: mo.softmax_joint_moments(b(a, 2), b(torch.eye(T * T).reshape(T, T, T, T), 4)),
                                "batch dimensions"),
        "score_mean list": (lambda: mo.score_mean(L, m), "q_mean: expected a floating-point tensor"),
        "attention_mask list": (lambda: mo.attention_mask(3, key_padding=[True, True, False]), "key_padding"),
        "attention_mask T": (lambda: mo.attention_mask("3"), "T: expected a non-negative int"),
        "augment list": (lambda: mo.augment([1.0]), "u: expected a torch.Tensor"),
    }  # fmt: skip
    for kind, c in covs.items():
        cases |= {
            f"activation {kind} batch": (lambda c=c, k=kind: mo.activation_moments(b(m, 2), b(c, 4), activation="relu",
                                                                                 kind=k), "batch dimensions"),
            f"linear {kind} batch": (lambda c=c, k=kind: mo.linear_moments(b(m, 2), b(c, 4), W, Wc, kind=k),
                                     "batch dimensions"),
            f"layernorm {kind} list": (lambda c=c, k=kind: mo.layernorm_moments(L, c, kind=k),
                                       "mean: expected a torch.Tensor"),
            f"layernorm {kind} 0-dim": (lambda c=c, k=kind: mo.layernorm_moments(zero, c, kind=k),
                                        "mean: expected at least 2 dims"),
            f"layernorm {kind} batch": (lambda c=c, k=kind: mo.layernorm_moments(b(m, 2), b(c, 4), kind=k),
                                        "batch dimensions"),
            f"residual {kind} list": (lambda c=c, k=kind: mo.residual_moments(L, c, m, c, None, kind=k),
                                      "mean_x: expected a torch.Tensor"),
            f"residual {kind} 0-dim": (lambda c=c, k=kind: mo.residual_moments(zero, c, m, c, None, kind=k),
                                       "mean_x: expected at least 2 dims"),
            f"residual {kind} batch": (lambda c=c, k=kind: mo.residual_moments(b(m, 2), b(c, 2), b(m, 4), b(c, 4), None,
                                                                              kind=k), "batch dimensions"),
            f"score {kind} list": (lambda c=c, k=kind: mo.score_moments(L, c, m, c, kind=k),
                                   "q_mean: expected a torch.Tensor"),
            f"score {kind} 0-dim": (lambda c=c, k=kind: mo.score_moments(zero, c, m, c, kind=k),
                                    "q_mean: expected at least 2 dims"),
            f"score {kind} batch": (lambda c=c, k=kind: mo.score_moments(b(m, 2), b(c, 2), b(m, 4), b(c, 4), kind=k),
                                    "batch dimensions"),
            f"score_mean {kind} batch": (lambda k=kind: mo.score_mean(b(m, 2), b(m, 4), kind=k), "batch dimensions"),
            f"attention_value {kind} list": (lambda c=c, k=kind: mo.attention_value_moments(a.tolist(), a_covs[k], m, c,
                                                                                           kind=k),
                                             "a_mean: expected a torch.Tensor"),
            f"attention_value {kind} 0-dim": (lambda c=c, k=kind: mo.attention_value_moments(zero, a_covs[k], m, c,
                                                                                            kind=k),
                                              "a_mean: expected at least 2 dims"),
            f"attention_value {kind} batch": (lambda c=c, k=kind: mo.attention_value_moments(b(a, 2), b(a_covs[k], 2),
                                                                                            b(m, 4), b(c, 4), kind=k),
                                              "batch dimensions"),
        }  # fmt: skip
    return cases


@pytest.mark.parametrize("case", sorted(_moment_cases()))
def test_moment_ops_name_bad_inputs(case):
    call, msg = _moment_cases()[case]  # built here, in the test's float64 default dtype
    with pytest.raises(ValueError, match=msg):
        call()


def test_moment_ops_still_broadcast_a_shared_covariance():
    """Broadcastable batch dims stay allowed: one covariance for a batch of means."""
    mean, cov = mo.softmax_moments(torch.zeros(2, 3), torch.eye(3))
    assert mean.shape == (2, 3) and cov.shape == (2, 3, 3)


# --------------------------------------------------------------------------------------------- long streams


@pytest.mark.parametrize("covariance", ["block", "diag"])
def test_belief_stays_symmetric_psd_finite_over_a_stream_with_process_noise(covariance):
    """The 100,000-update version is the ``long_stream`` validation check; this is its 1,000-update sample."""
    run = long_stream_run(covariance, n_updates=1000, check_every=100, process_noise=1e-6, seed=0)
    assert run["checks_done"] == 10 and run["n_updates"] == 1000
    assert run["finite"] and run["symmetric"] and run["psd"], run
    # no numerical guard fired; the stream's noise (0.5) is 5x the model's obs_noise (0.1), so the outlier count is not
    # zero (that is the outlier test doing its job, docs/hyper.md)
    assert run["first_failure"] is None and {k: v for k, v in run["guard_counts"].items() if k != "outlier"} == {}


def test_belief_health_detects_each_failure():
    guide = pk.KalmanGuide(pk.BayesianModel(mlp(), 0.5, 0.1)).update(*stream(5))
    assert belief_health(guide) | {"min_eig": 0, "min_eig_rel": 0} == {"finite": True, "symmetric": True, "psd": True,
                                                                         "min_eig": 0, "min_eig_rel": 0}  # fmt: skip
    for mutate, failed in [
        (lambda c: c.view(-1).__setitem__(1, c.view(-1)[1] + 1e-9), "symmetric"),
        (lambda c: c.neg_(), "psd"),
        (lambda c: c.view(-1).__setitem__(0, NAN), "finite"),
    ]:
        bad = copy.deepcopy(guide)
        mutate(bad.belief.cov_0)
        assert not belief_health(bad)[failed]


def test_long_stream_section_writes_its_report(tmp_path):
    result = long_stream_section(quick=True, seed=0, out_dir=tmp_path, progress=False, command="test",
                                 settings={"n_updates": 200, "kinds": ("diag",)})  # fmt: skip
    assert [c["name"] for c in result["checks"]] == ["diag_finite", "diag_symmetric", "diag_psd"]
    assert all(c["passed"] for c in result["checks"])
    assert (tmp_path / "long_stream.json").exists() and "PASS" in (tmp_path / "long_stream.md").read_text()


def _adversarial_stream():
    """A repeated point, huge inputs, outliers, zeros and an alternating target, in that order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, generator=g)
    parts = [
        (x.repeat(300, 1), torch.ones(300, 1)),
        (1e3 * torch.randn(100, 2, generator=g), torch.randn(100, 1, generator=g)),
        (torch.randn(100, 2, generator=g), 1e4 * torch.randn(100, 1, generator=g)),
        (torch.zeros(100, 2), torch.zeros(100, 1)),
        (torch.randn(200, 2, generator=g), torch.where(torch.arange(200)[:, None] % 2 == 0, 5.0, -5.0)),
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@pytest.mark.parametrize("hidden", ["diag", "full"])
@pytest.mark.parametrize("covariance", ["block", "diag"])
def test_adversarial_stream_keeps_the_belief_a_covariance_or_is_rejected_whole(covariance, hidden):
    """Every batch of 20 either updates to a finite, symmetric, PSD belief or raises and changes nothing."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.ReLU(),
                              torch.nn.Linear(6, 1))  # fmt: skip
    guide = pk.KalmanGuide(pk.BayesianModel(net, 0.5, 1e-3), covariance, hidden=hidden, process_noise=1e-6)
    X, Y = _adversarial_stream()
    accepted = 0
    for i in range(0, len(X), 20):
        before = snapshot(guide)
        try:
            guide.update(X[i : i + 20], Y[i : i + 20])
            accepted += 20
        except FloatingPointError:
            untouched(guide, before)
        health = belief_health(guide)
        assert health["finite"] and health["symmetric"] and health["psd"], (i, health)
    assert guide.n_updates == accepted >= 400
