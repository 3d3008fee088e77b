"""Elementwise activations: exact ReLU/GELU moments, probit sigmoid/tanh envelopes, series covariance."""

import math

import pytest
import scipy.special as sp
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import random_psd

from ppl_kbnn.mc import mc_cov, mc_mean, mc_var, sample_sequence
from ppl_kbnn.moments import (
    activation_moments,
    gelu_moments,
    relu_moments,
    sigmoid_moments,
    tanh_moments,
)
from ppl_kbnn.moments._gauss import bvn_equal, owens_t

N = 400_000
GRID_M = [-3.0, -1.0, -0.2, 0.0, 0.4, 1.5, 3.0]
GRID_V = [1e-4, 0.01, 0.3, 1.69, 4.0]
RESOLUTION = 1.0 / N  # events rarer than one sample in N are invisible to Monte Carlo
FUNCS = {
    "relu": (relu_moments, F.relu),
    "gelu": (gelu_moments, F.gelu),
    "sigmoid": (sigmoid_moments, torch.sigmoid),
    "tanh": (tanh_moments, torch.tanh),
}


def grid():
    m, v = torch.meshgrid(torch.tensor(GRID_M), torch.tensor(GRID_V), indexing="ij")
    return m.reshape(-1), v.reshape(-1)


def test_owens_t_and_bivariate_cdf_match_scipy():
    h, a = torch.meshgrid(torch.linspace(-9, 9, 37), torch.linspace(0, 1, 21), indexing="ij")
    ref = torch.as_tensor(sp.owens_t(h.numpy(), a.numpy()))
    torch.testing.assert_close(owens_t(h, a), ref, rtol=0, atol=1e-15)
    # Φ₂(h, h; 0) = Φ(h)², Φ₂(h, h; 1) = Φ(h)
    x = torch.linspace(-4, 4, 17)
    Phi = torch.special.ndtr(x)
    torch.testing.assert_close(bvn_equal(x, torch.zeros_like(x)), Phi**2, rtol=0, atol=1e-15)
    torch.testing.assert_close(bvn_equal(x, torch.ones_like(x)), Phi, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_exact_activation_moments_match_monte_carlo(name, gen):
    closed, fn = FUNCS[name]
    m, v = grid()
    mean, var, cross = closed(m, v)
    x = m + v.sqrt() * torch.randn(N, m.numel(), generator=gen)
    z = fn(x)
    assert mc_mean(z, mean, atol=RESOLUTION).max_z < 4
    assert mc_var(z, var, atol=RESOLUTION).max_z < 4
    assert mc_cov(x[..., None], z[..., None], cross[..., None, None], atol=RESOLUTION).max_z < 4


def test_relu_and_gelu_reference_values():
    """Values checked independently in kbt_math §5 (μ = 0.4, σ = 1.3)."""
    m, v = torch.tensor(0.4), torch.tensor(1.69)
    assert abs(gelu_moments(m, v)[0].item() - 0.6376) < 1e-4
    # ReLU closed forms, written out
    s = 1.3
    a = 0.4 / s
    Phi, phi = 0.5 * (1 + math.erf(a / math.sqrt(2))), math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mean, var, cross = relu_moments(m, v)
    assert abs(mean.item() - (0.4 * Phi + s * phi)) < 1e-15
    assert abs(cross.item() - 1.69 * Phi) < 1e-15
    assert abs(var.item() - ((0.16 + 1.69) * Phi + 0.4 * s * phi - (0.4 * Phi + s * phi) ** 2)) < 1e-14


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_probit_activations_within_documented_envelope(name, gen):
    """Probit approximations: mean abs error ≤ 0.015 (tanh: ≤ 0.03), variance ratio in [0.7, 1.5] over
    the grid (|m| ≤ 3, v ≤ 4), exact as v -> 0 (within 4 MC standard errors at v = 1e-4), cross-covariance
    within 35%. The measured table is in docs/moments/activations.md."""
    closed, fn = FUNCS[name]
    m, v = grid()
    mean, var, cross = closed(m, v)
    x = m + v.sqrt() * torch.randn(N, m.numel(), generator=gen)
    z = fn(x)
    scale = 2.0 if name == "tanh" else 1.0
    assert (mean - z.mean(0)).abs().max() < 0.015 * scale
    ratio = var / z.var(0)
    assert ratio.min() > 0.7 and ratio.max() < 1.5, ratio
    small = v <= 1e-4
    assert mc_var(z[:, small], var[small]).max_z < 4
    cov_mc = ((x - m) * (z - z.mean(0))).mean(0)
    assert ((cross - cov_mc).abs() / cov_mc.abs().clamp_min(1e-12)).max() < 0.35


@pytest.mark.parametrize("name", list(FUNCS))
def test_zero_variance_is_the_deterministic_activation(name):
    closed, fn = FUNCS[name]
    m = torch.linspace(-4, 4, 41)
    mean, var, cross = closed(m, torch.zeros_like(m))
    assert torch.equal(mean, fn(m))
    assert torch.count_nonzero(var) == 0 and torch.count_nonzero(cross) == 0
    out = activation_moments(m.reshape(1, -1), torch.zeros(1, 41, 41), activation=name, kind="token")
    assert torch.equal(out.mean, fn(m).reshape(1, -1)) and torch.count_nonzero(out.cov) == 0


@pytest.mark.parametrize("name", ["relu", "gelu"])
@pytest.mark.parametrize("kind", ["token", "joint"])
def test_full_output_covariance_by_wright_series(name, kind, gen):
    """Off-diagonal covariance: truncated series (order 10) vs MC. The diagonal and the
    cross-covariance (Stein) are exact; the off-diagonal truncation error must stay below 2e-3
    of the largest variance (measured ~5e-4 at correlations up to 0.9)."""
    T, d = 2, 4
    mean = torch.randn(T, d, generator=gen)
    cov = random_psd(T * d, gen, 1.0).reshape(T, d, T, d)
    cov_in = cov if kind == "joint" else torch.diagonal(cov, dim1=-4, dim2=-2).movedim(-1, -3)
    out = activation_moments(mean, cov_in, activation=name, kind=kind, series_order=10)
    x = sample_sequence(mean, cov_in, kind, N, gen)
    z = FUNCS[name][1](x)
    if kind == "joint":
        x, z = x.reshape(N, -1), z.reshape(N, -1)
        cov_out, cross = out.cov.reshape(T * d, T * d), out.cross.reshape(T * d, T * d)
    else:
        cov_out, cross = out.cov, out.cross
    chk = mc_cov(z, z, cov_out)
    diag = torch.diagonal(chk.z, dim1=-2, dim2=-1)
    assert diag.max() < 4  # exact
    assert mc_cov(x, z, cross).max_z < 4  # exact (Stein)
    err = (chk.estimate - cov_out).abs() - 4 * chk.stderr
    assert err.max() < 2e-3 * torch.diagonal(cov_out, dim1=-2, dim2=-1).max()


def test_diag_kind_matches_marginal_functions(gen):
    m = torch.randn(3, 5, generator=gen)
    v = torch.rand(3, 5, generator=gen)
    for name, (closed, _) in FUNCS.items():
        out = activation_moments(m, v, activation=name, kind="diag")
        mean, var, cross = closed(m, v)
        assert torch.equal(out.mean, mean) and torch.equal(out.cov, var) and torch.equal(out.cross, cross)


def test_bad_inputs_raise_clear_errors():
    m = torch.zeros(3)
    with pytest.raises(ValueError, match="negative variance"):
        relu_moments(m, -torch.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        gelu_moments(m, torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        tanh_moments(torch.full((3,), float("nan")), torch.ones(3))
    with pytest.raises(ValueError, match="dtype mismatch"):
        sigmoid_moments(m.float(), torch.ones(3))
    with pytest.raises(ValueError, match="unsupported activation"):
        activation_moments(m.reshape(1, 3), torch.ones(1, 3), activation="swish")
    with pytest.raises(ValueError, match="positive semi-definite"):
        activation_moments(m.reshape(1, 3), -torch.eye(3)[None], activation="relu", kind="token")
