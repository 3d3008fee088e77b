"""The compiled chain update (``KalmanGuide(..., compile=...)``) and the update's bookkeeping.

The compiled step is traced with torch.compile's ``"eager"`` backend here (seconds, no C++ compiler): it runs the
traced graph op by op, so its results must equal the plain update bit for bit, guard and outlier counts included.
The inductor backend (``compile=True``) fuses kernels and agrees up to round-off; it is measured by ``ppl-kbnn
bench`` (docs/bench.md), not here (it compiles for tens of seconds).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ppl_kbnn import BayesianModel, KalmanGuide
from ppl_kbnn import nn as pk_nn
from ppl_kbnn.hyper import OutlierWarning


def _model(width: int = 6, act: type[nn.Module] = nn.ReLU, d_out: int = 1) -> BayesianModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, width), act(), nn.Linear(width, width), act(), nn.Linear(width, d_out))
    return BayesianModel(net.double(), prior_scale=0.5, obs_noise=0.1)


def _data(n: int, d_out: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True)).expand(n, d_out) + 0.1 * torch.randn(n, d_out, generator=g,
                                                                                 dtype=torch.float64)  # fmt: skip
    y[3] += 50.0  # an outlier: counted, gated or down-weighted
    return x, y


def _same_state(a: KalmanGuide, b: KalmanGuide) -> None:
    for (k, u), (_, v) in zip(a.belief.state_dict().items(), b.belief.state_dict().items(), strict=True):
        assert torch.equal(u, v), k
    assert a.guard_counts == b.guard_counts
    assert a.n_updates == b.n_updates
    assert a._last_d2 == b._last_d2 and a._last_logpdf == b._last_logpdf


@pytest.mark.parametrize(
    "covariance, act, options",
    [
        ("block", nn.ReLU, {}),
        ("diag", nn.Tanh, {"outliers": "gate"}),
        ("block", nn.GELU, {"outliers": "wolf", "var_floor": 1.0, "gain_clip": 0.5}),
        ("diag", nn.Sigmoid, {"var_floor": 0.5, "process_noise": 1e-4, "jitter": 1e-9}),
    ],
)
def test_compiled_step_equals_the_plain_update(covariance, act, options):
    model = _model(act=act)
    x, y = _data(12)
    plain = KalmanGuide(model, covariance=covariance, **options)
    comp = KalmanGuide(model, covariance=covariance, compile="eager", **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutlierWarning)
        for i in range(0, 12, 3):  # several samples per call, several calls
            plain.update(x[i : i + 3], y[i : i + 3])
            comp.update(x[i : i + 3], y[i : i + 3])
            _same_state(plain, comp)
    assert comp.guard_counts.get("outlier", 0) >= 1
    if "var_floor" in options:
        assert set(comp.guard_counts) >= {"var_floor"}  # the floor fired and was counted alike
    p, c = plain.predict(x), comp.predict(x)
    assert torch.equal(p[0], c[0]) and torch.equal(p[1], c[1])


def test_compiled_step_with_several_outputs():
    model = _model(d_out=2)
    x, y = _data(6, d_out=2)
    plain, comp = KalmanGuide(model), KalmanGuide(model, compile="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutlierWarning)
        plain.update(x, y)
        comp.update(x, y)
    _same_state(plain, comp)


@pytest.mark.parametrize("exc", [FloatingPointError, KeyboardInterrupt])
def test_compiled_update_is_atomic(monkeypatch, exc):
    """A non-finite update (after some samples were absorbed) or an interruption between two layers' swaps leaves
    the belief, the counters and the guard counts exactly as they were."""
    model = _model()
    x, y = _data(6)
    guide = KalmanGuide(model, compile="eager", var_floor=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutlierWarning)
        guide.update(x[:2], y[:2])
    assert guide.guard_counts["var_floor"] > 0  # so rolling back the counts is tested
    before = ({k: v.clone() for k, v in guide.belief.state_dict().items()}, guide.guard_counts, guide.n_updates)
    X = x[2:6].clone()
    if exc is FloatingPointError:
        X[2] = 1e200  # finite input, non-finite update after two samples were absorbed
    else:
        calls = []
        swap = type(guide.belief)._swap

        def interrupted(self, *args):
            calls.append(1)
            if len(calls) == 5:  # the second layer of the third sample
                raise KeyboardInterrupt
            swap(self, *args)

        monkeypatch.setattr(type(guide.belief), "_swap", interrupted)
    with pytest.raises(exc), warnings.catch_warnings():
        warnings.simplefilter("ignore", OutlierWarning)
        guide.update(X, y[2:6])
    for k, v in guide.belief.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    assert (guide.guard_counts, guide.n_updates) == before[1:]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hidden": "full"},
        {"update": "ekf", "covariance": "diag"},
        {"obs_noise": "auto"},
        {"prior_scale": "auto"},
    ],
)
def test_compile_rejects_what_it_does_not_cover(kwargs):
    with pytest.raises(ValueError, match="compile applies to"):
        KalmanGuide(_model(), compile="eager", **kwargs)


def test_compile_argument_is_checked():
    with pytest.raises(ValueError, match="compile must be"):
        KalmanGuide(_model(), compile=1)
    with pytest.raises(ValueError, match="not a torch.compile backend"):
        KalmanGuide(_model(), compile="no-such-backend")


def test_an_update_leaves_tensors_read_before_it_untouched():
    """Updates swap new tensors in (nothing is written in place): a tensor read from the belief keeps its values."""
    model = _model()
    x, y = _data(6)
    guide = KalmanGuide(model)
    mean, cov = guide.layer("0")
    m0, c0 = mean.clone(), cov.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutlierWarning)
        guide.update(x, y)
    assert torch.equal(mean, m0) and torch.equal(cov, c0)
    assert not torch.equal(guide.layer("0")[0], m0)


def _dt() -> tuple[BayesianModel, dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    net = pk_nn.DecisionTransformer(pk_nn.DTConfig(state_dim=3, act_dim=1, d_model=8, n_layer=1, n_head=2,
                                                   max_ep_len=20, context=3)).double()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    n = 4
    x = {"returns_to_go": torch.randn(n, 3, 1, generator=g, dtype=torch.float64),
         "states": torch.randn(n, 3, 3, generator=g, dtype=torch.float64),
         "actions": torch.randn(n, 3, 1, generator=g, dtype=torch.float64).tanh(),
         "timesteps": torch.randint(0, 20, (n, 3), generator=g)}  # fmt: skip
    with torch.no_grad():
        y = net(**x)[:, -1] + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return BayesianModel(net, prior_scale=0.1, obs_noise=0.1, bayesian="all"), x, y


@pytest.mark.parametrize("covariance, hidden", [("block", "token")])
def test_compiled_transformer_update_equals_the_plain_update(covariance, hidden):
    model, x, y = _dt()
    plain = KalmanGuide(model, covariance=covariance, hidden=hidden)
    comp = KalmanGuide(model, covariance=covariance, hidden=hidden, compile="eager")
    for i in range(0, 4, 2):
        plain.update({k: v[i : i + 2] for k, v in x.items()}, y[i : i + 2])
        comp.update({k: v[i : i + 2] for k, v in x.items()}, y[i : i + 2])
        _same_state(plain, comp)
    one = {k: v[:1] for k, v in x.items()}
    for a, b in zip(plain.engine.linearise(one), comp.engine.linearise(one), strict=True):  # the compiled engine
        if isinstance(a, dict):
            assert all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert torch.equal(a, b)


def test_compiled_transformer_with_every_output_observed():
    """``observe="all"``: one backward pass per output through the compiled graph instead of one batched pass."""
    torch.manual_seed(0)
    net = pk_nn.Transformer(pk_nn.TransformerConfig(d_in=2, d_out=1, d_model=8, n_layer=1, n_head=2,
                                                    max_len=6)).double()  # fmt: skip
    model = BayesianModel(net, prior_scale=0.1, obs_noise=0.2, observe="all")
    x = torch.randn(1, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plain, comp = KalmanGuide(model), KalmanGuide(model, compile="eager")
    (mp, Sp, jp), (mc, Sc, jc) = plain.engine.linearise(x), comp.engine.linearise(x)
    assert mp.shape == (4,) and torch.equal(mp, mc) and torch.equal(Sp, Sc)
    for k in jp:
        torch.testing.assert_close(jc[k], jp[k], rtol=1e-12, atol=1e-15)


def test_bench_times_the_compiled_mlp_updates():
    import dataclasses

    from ppl_kbnn.bench import BenchSettings, _Log, _mlp, _mlp_markdown

    s = dataclasses.replace(BenchSettings.tiny(), mlp_compile="eager")
    m = _mlp(s, 0, _Log(False))
    rows = {r["method"]: r for r in m["rows"]}
    assert set(rows) == {"kbnn-block", "kbnn-diag", "kbnn-block-compiled", "kbnn-diag-compiled", "adamw"}
    assert rows["kbnn-block-compiled"]["compile_s"] > 0 and rows["kbnn-block-compiled"]["n"] == s.mlp_repeats
    assert m["target"]["compiled"]["median_ms"] == rows["kbnn-block-compiled"]["median_ms"]
    assert m["config"]["compile_errors"] == {}
    text = "\n".join(_mlp_markdown(m))
    assert "KBNN block update, compiled" in text and "Compiled (`compile='eager'`)" in text
    bad = _mlp(dataclasses.replace(s, mlp_compile="no-such-backend"), 0, _Log(False))  # recorded, not raised
    assert set(bad["config"]["compile_errors"]) == {"kbnn-block-compiled", "kbnn-diag-compiled"}
    assert "Not compiled" in "\n".join(_mlp_markdown(bad))


# ------------------------------------------------------------------------------------------ the lean update path


def _state(guide: KalmanGuide) -> tuple:
    return ({k: v.clone() for k, v in guide.belief.state_dict().items()}, guide.guard_counts, guide.n_updates,
            guide._last_d2)  # fmt: skip


def _unchanged(guide: KalmanGuide, before: tuple) -> None:
    for k, v in guide.belief.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    assert (guide.guard_counts, guide.n_updates) == before[1:3]
    assert guide._last_d2 == before[3] or (guide._last_d2 != guide._last_d2 and before[3] != before[3])  # NaN


@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lean_update_checks_values_inside_the_step(where, bad):
    """The compiled update checks the sample values inside the compiled step: a NaN or inf in the third sample
    gives the usual ValueError naming the tensor, and the two samples absorbed before it are taken back."""
    model = _model()
    x, y = _data(6)
    guide = KalmanGuide(model, compile="eager", outliers="gate")
    guide.update(x[:2], y[:2])
    before = _state(guide)
    X, Y = x[2:6].clone(), y[2:6].clone()
    (X if where == "x" else Y)[2, 0] = bad
    assert guide.engine.lean_update(X, Y) == 0  # the lean path declines, nothing changed
    _unchanged(guide, before)
    with pytest.raises(ValueError, match=f"{where}: contains {'NaN' if bad != bad else 'inf'} entries"):
        guide.update(X, Y)
    _unchanged(guide, before)


def test_lean_update_takes_the_common_case_and_declines_the_rest():
    model = _model()
    x, y = _data(6)
    guide = KalmanGuide(model, compile="eager", outliers="gate")
    assert guide.engine.lean_update(x[:2], y[:2, 0]) == 2  # (N,) targets of a one-output network
    assert guide.engine.lean_update(x[2], y[2]) == 1  # one sample without its batch dim
    assert guide.n_updates == 3 and guide.update_seconds > 0
    before = _state(guide)
    for args in [(x[:2].float(), y[:2]), (x[:2], y[:3]), (x[:2, :1], y[:2]), (x[:0], y[:0]), (x[:2].tolist(), y[:2]),
                 (x[0, 0], y[0]), (x[None, :2], y[:2])]:  # fmt: skip
        assert guide.engine.lean_update(*args) == 0
        _unchanged(guide, before)
    with pytest.raises(ValueError, match="y: expected shape"):
        guide.update(x[:2], y[:3])
    for kwargs in [{"process_noise": 1e-4}, {"jitter": 1e-9}, {"psd_repair": True}]:  # applied by the full path
        assert KalmanGuide(model, compile="eager", **kwargs).engine.lean_update(x[:2], y[:2]) == 0


def test_lean_update_warns_once_from_the_callers_line():
    model = _model()
    x, y = _data(6)
    guide = KalmanGuide(model, compile="eager")
    with pytest.warns(OutlierWarning) as record:
        guide.update(x, y)  # sample 3 is an outlier
    assert len(record) == 1 and record[0].filename == __file__
    assert guide.guard_counts["outlier"] == 1


def test_scalar_innovation_equals_the_cholesky_one():
    """``_chain_diag_step(scalar=True)`` (one output: a square root instead of LAPACK's Cholesky factor, used by the
    ahead-of-time compiled step) agrees with the Cholesky path up to round-off."""
    from ppl_kbnn.engines import _chain_diag_step
    from ppl_kbnn.moments import validation

    guide = KalmanGuide(_model(), covariance="block", var_floor=0.1)
    x, y = _data(4)
    rows = tuple(t for s in guide.belief.layout.slots for t in guide.belief.rows(s.index))
    nodes = tuple((n.index, None) if hasattr(n, "weight_site") else (None, n.activation) for n in guide.nodes)
    kw = dict(nodes=nodes, kind="diag", w_kind="block", noise_var=0.01, var_floor=0.1, gain_clip=None, outliers="wolf",
              threshold=guide._outlier_threshold(1))  # fmt: skip
    for xi, yi in zip(x.split(1), y.split(1), strict=True):
        new_a, stats_a = _chain_diag_step(xi, yi, rows, **kw)
        new_b, stats_b = _chain_diag_step(xi, yi, rows, scalar=True, **kw)
        for a, b in zip((*new_a, stats_a), (*new_b, stats_b), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15)
        assert stats_b[4] == 0
        with validation(False):  # a negative noise variance: S is not positive, reported like cholesky_ex's info
            assert _chain_diag_step(xi, yi, rows, scalar=True, **(kw | {"noise_var": -1e6}))[1][4] == 1


# ------------------------------------------------------------------------------------------ compile=True (AOTInductor)


@pytest.fixture(scope="module")
def aot_guides():
    """One AOTInductor-compiled guide for the module (compiling takes seconds), beside a plain one, both after the
    same first call."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no C++ compiler for inductor: {exc}")
    model = _model(act=nn.GELU)
    x, y = _data(12)
    plain, comp = KalmanGuide(model, var_floor=0.5), KalmanGuide(model, var_floor=0.5, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutlierWarning)
        plain.update(x[:6], y[:6])
        comp.update(x[:6], y[:6])
    return plain, comp, x, y


def test_aot_compiled_update_agrees_with_the_plain_one(aot_guides):
    plain, comp, x, y = aot_guides
    assert comp.guard_counts == plain.guard_counts and comp.guard_counts["outlier"] == 1
    X = x[6:12].T.contiguous().T  # a non-contiguous input (the package was compiled for contiguous ones)
    assert not X.is_contiguous()
    mean, cov = comp.layer("0")
    m0, c0 = mean.clone(), cov.clone()
    comp.update(X, y[6:12])
    plain.update(x[6:12], y[6:12])
    assert torch.equal(mean, m0) and torch.equal(cov, c0)  # fresh output tensors: nothing read before is overwritten
    for (k, u), (_, v) in zip(plain.belief.state_dict().items(), comp.belief.state_dict().items(), strict=True):
        torch.testing.assert_close(v, u, rtol=1e-10, atol=1e-13, msg=k)
    assert comp.guard_counts == plain.guard_counts and comp.n_updates == plain.n_updates == 12
    assert comp._last_logpdf == pytest.approx(plain._last_logpdf, rel=1e-12)


def test_aot_compiled_update_rejects_bad_values_atomically(aot_guides):
    _, comp, x, y = aot_guides
    before = _state(comp)
    X = x[:3].clone()
    X[1, 0] = float("nan")
    with pytest.raises(ValueError, match="x: contains NaN entries"):
        comp.update(X, y[:3])
    _unchanged(comp, before)


def test_compiled_step_is_rebuilt_when_the_guide_moves():
    """``guide.float()`` after compiled updates: the step is rebuilt for float32 (the ahead-of-time package of
    ``compile=True`` is compiled for one dtype and device) and agrees with the plain float32 update bit for bit."""
    model = _model()
    x, y = _data(6)
    plain, comp = KalmanGuide(model, outliers="gate"), KalmanGuide(model, outliers="gate", compile="eager")
    plain.update(x[:3], y[:3])
    comp.update(x[:3], y[:3])
    first = comp.engine._compiled
    plain.float()
    comp.float()
    plain.update(x[3:].float(), y[3:].float())
    comp.update(x[3:].float(), y[3:].float())
    assert comp.engine._compiled is not first and comp.engine._placement == (torch.float32, torch.device("cpu"))
    _same_state(plain, comp)
