"""Devices and dtypes: ``.to()`` moves the model and the guide together; float32 agrees with float64; the update
path creates every tensor on the belief's device."""

import copy
import traceback
import warnings

import pytest
import torch
from pyro.infer import Predictive
from torch.utils._python_dispatch import TorchDispatchMode

import ppl_kbnn as pk
from ppl_kbnn.hyper import OutlierWarning
from ppl_kbnn.nn import DecisionTransformer, DTConfig, Transformer, TransformerConfig


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def tiny_tf(seed=0):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(d_in=2, d_out=1, d_model=8, n_layer=1, n_head=2, max_len=6))


def tiny_dt(seed=0):
    torch.manual_seed(seed)
    return DecisionTransformer(DTConfig(state_dim=3, act_dim=1, d_model=8, n_layer=1, n_head=2, max_ep_len=20))


def data(kind, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(n, 2, generator=g)
        return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    if kind == "tf":
        x = torch.randn(n, 4, 2, generator=g)
        return x, torch.sin(x[:, -1].sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    K = 3
    x = {"returns_to_go": torch.randn(n, K, 1, generator=g), "states": torch.randn(n, K, 3, generator=g),
         "actions": torch.randn(n, K, 1, generator=g), "timesteps": torch.arange(K).expand(n, K)}  # fmt: skip
    return x, torch.tanh(x["states"][:, -1, :1])


def cast(x, dtype):
    if isinstance(x, dict):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    return x.to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference ``max|a - b| / max|b|`` (float64)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


NETS = {"mlp": mlp, "tf": tiny_tf}

# (covariance, update, hidden) where float32 holds to 1e-5 over a stream of updates
DETERMINISTIC = [
    ("block", "kbnn", "diag"),
    ("diag", "kbnn", "diag"),
    ("full", "ekf", "diag"),
    ("lowrank", "ekf", "diag"),
    ("diag", "ekf", "diag"),
    ("block", "ekf", "diag"),
]


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("covariance,update,hidden", DETERMINISTIC)
def test_a_float32_copy_updates_and_predicts_within_1e5_of_float64(net, covariance, update, hidden):
    model = pk.BayesianModel(NETS[net](), 0.3, 0.1)
    g64 = pk.KalmanGuide(model, covariance, update=update, hidden=hidden)
    g32 = copy.deepcopy(g64).to(torch.float32)
    assert g32.dtype == torch.float32 and g32._model.dtype == torch.float32 and g64.dtype == torch.float64
    assert all(b.dtype == torch.float32 for b in g32._model.net.buffers() if b.is_floating_point())
    x, y = data(net, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutlierWarning)
        g64.update(x, y)
        g32.update(cast(x, torch.float32), cast(y, torch.float32))
    assert rel(g32.belief.mean, g64.belief.mean) < 1e-5
    assert rel(g32.belief.marginal_var(), g64.belief.marginal_var()) < 1e-5
    xt, _ = data(net, 5, seed=2)
    for method in ("moments", "linearised"):
        m64, v64 = g64.predict(xt, method)
        m32, v32 = g32.predict(cast(xt, torch.float32), method)
        assert m32.dtype == torch.float32
        assert rel(m32, m64) < 1e-5 and rel(v32, v64) < 1e-5, method


@pytest.mark.parametrize("covariance", ["block", "full"])
def test_slr_agrees_in_float32_on_its_first_update(covariance):
    """The draws are the float64 ones rounded; after the first update the belief's eigen-root (of a covariance with
    repeated eigenvalues) rotates differently in float32, so later updates are another Monte Carlo realisation."""
    model = pk.BayesianModel(mlp(), 0.3, 0.1)
    g64 = pk.KalmanGuide(model, covariance, update="slr", draws=200)
    g32 = copy.deepcopy(g64).to(torch.float32)
    x, y = data("mlp", 1)
    m64, v64 = g64.predict(x, "sampled", draws=100)  # the prior's sampled predictive: the same draws
    m32, v32 = g32.predict(x.float(), "sampled", draws=100)
    assert rel(m32, m64) < 1e-5 and rel(v32, v64) < 1e-5
    g64.update(x, y)
    g32.update(x.float(), y.float())
    assert rel(g32.belief.mean, g64.belief.mean) < 1e-5
    assert rel(g32.belief.marginal_var(), g64.belief.marginal_var()) < 1e-5


def test_noise_and_prior_candidates_move_with_the_guide():
    model = pk.BayesianModel(mlp(), 0.3, 0.1)
    g64 = pk.KalmanGuide(model, "block", obs_noise="auto", prior_scale="auto")
    g32 = copy.deepcopy(g64).float()
    assert {t.dtype for t in g32.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()} == {
        torch.float32
    }
    x, y = data("mlp", 12)
    g64.update(x, y)
    g32.update(x.float(), y.float())
    assert g32.prior_scale == g64.prior_scale
    assert rel(g32.obs_noise, g64.obs_noise) < 1e-5
    assert rel(g32.predict(x.float())[1], g64.predict(x)[1]) < 1e-5
    back = g32.double()  # and back: float64 again, model included
    assert back.dtype == torch.float64 and back._model.dtype == torch.float64


def test_model_float_runs_the_pyro_model_and_predictive():
    model = pk.BayesianModel(mlp(), 0.3, 0.1).float()
    assert model.dtype == torch.float32
    assert all(loc.dtype == scale.dtype == torch.float32 for loc, scale in model.priors.values())
    x = torch.randn(4, 2, dtype=torch.float32)
    assert model(x).dtype == torch.float32
    guide = pk.KalmanGuide(model, "block")  # a guide built on a float32 model is float32
    assert guide.dtype == torch.float32
    draws = Predictive(model, guide=guide, num_samples=3)(x)
    assert draws["obs"].dtype == torch.float32 and draws["net.0.weight"].dtype == torch.float32


def test_wrong_dtype_device_or_placement_is_a_named_value_error():
    model = pk.BayesianModel(mlp(), 0.3, 0.1)
    g32 = pk.KalmanGuide(model, "block").to(torch.float32)
    x, y = data("mlp", 2)
    with pytest.raises(ValueError, match="x: dtype torch.float64 does not match the belief's torch.float32"):
        g32.update(x, y.float())
    with pytest.raises(ValueError, match="y: dtype torch.float64 does not match the belief's torch.float32"):
        g32.update(x.float(), y)
    with pytest.raises(ValueError, match="x: device meta does not match the belief's cpu"):
        g32.predict(x.float().to("meta"))
    model.double()  # the model moved alone: the guide says so instead of failing inside torch
    with pytest.raises(ValueError, match="move them together"):
        g32.predict(x.float())


def test_state_dict_round_trips_after_to():
    model = pk.BayesianModel(mlp(), 0.3, 0.1)
    g32 = pk.KalmanGuide(model, "full", update="ekf").to(torch.float32)
    x, y = data("mlp", 6)
    g32.update(x.float(), y.float())
    sd = g32.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    fresh = pk.KalmanGuide(pk.BayesianModel(mlp(), 0.3, 0.1), "full", update="ekf")
    with pytest.raises(ValueError, match="dtype torch.float32 .checkpoint. differs"):
        fresh.load_state_dict(sd)
    fresh.float().load_state_dict(sd)
    xt = torch.randn(3, 2, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(fresh.predict(xt), g32.predict(xt), strict=True))
    model_sd = g32._model.state_dict()  # the model's priors are buffers: they round-trip with it
    assert {f"prior_loc_{k}" for k in range(4)} <= set(model_sd)
    other = pk.BayesianModel(mlp(seed=3), 0.3, 0.1).float()
    other.load_state_dict(model_sd)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(other.priors.values(), g32._model.priors.values(), strict=True))


# --------------------------------------------------------------------------------------------- no stray tensors


class _StrayTensors(TorchDispatchMode):
    """Records where a tensor lands on the default device ``meta``: only a factory call without ``device=`` does
    that while the model, belief and data are on the CPU (a GPU run would get a CPU tensor there)."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "meta" and len(self.hits) < 3:
                self.hits.append(f"{func}:\n" + "".join(traceback.format_stack(limit=8)[:-1]))
        return out


CASES = [
    ("mlp", dict(covariance="block")),
    ("mlp", dict(covariance="diag", hidden="full")),
    ("mlp", dict(covariance="block", hidden="full", process_noise=1e-4)),
    ("mlp", dict(covariance="full", update="ekf", outliers="wolf")),
    ("mlp", dict(covariance="lowrank", update="ekf")),
    ("mlp", dict(covariance="lowrank", update="slr", draws=8)),
    ("mlp", dict(covariance="block", update="slr", draws=8)),
    ("mlp", dict(covariance="block", obs_noise="auto", prior_scale="auto")),
    ("tf", dict(covariance="block")),
    ("tf", dict(covariance="diag", hidden="joint", obs_noise="auto")),
    ("tf", dict(covariance="full", update="ekf")),
    ("dt", dict(covariance="block", hidden="token")),
    ("dt", dict(covariance="lowrank", update="slr", draws=8)),
]


@pytest.mark.parametrize("net,kw", CASES, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in CASES])
def test_construction_update_and_predict_create_no_tensor_off_the_belief_device(net, kw):
    """With the default device set to ``meta``, every tensor made without ``device=`` would land there."""
    nets = {"mlp": mlp, "tf": tiny_tf, "dt": tiny_dt}
    model = pk.BayesianModel(nets[net](), 0.3, 0.1)
    x, y = data(net, 2)
    mode = _StrayTensors()
    with warnings.catch_warnings(), torch.device("meta"), mode:
        warnings.simplefilter("ignore", OutlierWarning)
        guide = pk.KalmanGuide(model, **kw)
        guide.update(x, y)
        for method in ("moments", "linearised", "sampled"):
            if method != "moments" or guide.update_rule == "kbnn":
                guide.predict(x, method, draws=8)
        guide()  # the Pyro guide's draws
        guide.posterior()
    assert not mode.hits, "tensors created without device=:\n" + "\n".join(mode.hits)
    assert guide.belief.device.type == "cpu"


# --------------------------------------------------------------------------------------------- validate and bench


def test_the_validate_float32_rows_sit_within_the_tolerance_of_float64():
    from ppl_kbnn.validation.network import CASES
    from ppl_kbnn.validation.network_section import FLOAT32_TOL, float32_rows

    rows = float32_rows(CASES, (0,), (0.05,), n_updates=(0, 3), n_draws=200, seed=0)
    assert [(r["updates"], r["dtype"], r["mode"]) for r in rows] == [(0, "float32", "joint"), (3, "float32", "joint")]
    for r in rows:
        assert 0 < r["rel_mean_diff"] <= FLOAT32_TOL and 0 < r["rel_std_diff"] <= FLOAT32_TOL  # rounded, not equal
        assert r["mean_err"] < 1.0 and 0.5 < r["std_ratio_min"] <= r["std_ratio_max"] < 2.0  # 200 draws: loose


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_device_cuda_is_skipped_with_a_message_without_cuda(tmp_path, capsys):
    from ppl_kbnn.bench import check_device, run_bench
    from ppl_kbnn.cli import main

    assert main(["bench", "--device", "cuda", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "CUDA is not available" in err and not (tmp_path / "b").exists()
    assert main(["bench", "--device", "tpu", "--out", str(tmp_path / "b")]) == 2
    assert "--device: device must be 'cpu' or 'cuda'" in capsys.readouterr().err
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        run_bench(out_dir=tmp_path / "c", device="cuda")


class _Float64Tensors(TorchDispatchMode):
    """Records the ops that produce a float64 tensor (a float32 guide's update should produce none)."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and len(self.hits) < 3:
                self.hits.append(f"{func}:\n" + "".join(traceback.format_stack(limit=8)[:-1]))
        return out


@pytest.mark.parametrize("net,kw", [c for c in CASES if c[1].get("update") != "slr"],
                         ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in CASES if k.get("update") != "slr"])
def test_a_float32_guide_computes_in_float32(net, kw):
    """No float64 intermediate in a float32 update or prediction (``slr`` draws its normals in float64 on purpose)."""
    nets = {"mlp": mlp, "tf": tiny_tf, "dt": tiny_dt}
    guide = pk.KalmanGuide(pk.BayesianModel(nets[net](), 0.3, 0.1), **kw).float()
    x, y = data(net, 2)
    x, y = cast(x, torch.float32), y.float()
    mode = _Float64Tensors()
    with warnings.catch_warnings(), mode:
        warnings.simplefilter("ignore", OutlierWarning)
        guide.update(x, y)
        for method in ("moments", "linearised"):
            if method != "moments" or guide.update_rule == "kbnn":
                guide.predict(x, method)
    assert not mode.hits, "float64 tensors in a float32 guide:\n" + "\n".join(mode.hits)
