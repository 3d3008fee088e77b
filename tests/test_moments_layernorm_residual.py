"""LayerNorm (linearised / frozen statistics) and residual sums."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import random_psd

from ppl_kbnn.mc import mc_cov, mc_mean, sample_sequence
from ppl_kbnn.moments import from_joint, layernorm_moments, residual_moments, to_joint
from ppl_kbnn.validation.ops import residual_problem

N = 200_000
T, D = 3, 6


def ln_case(gen, scale):
    mean = 2.0 * torch.randn(T, D, generator=gen)
    cov = random_psd(D, gen, scale, batch=(T,))
    gamma, beta = 1.0 + 0.3 * torch.randn(D, generator=gen), 0.1 * torch.randn(D, generator=gen)
    return mean, cov, gamma, beta


def test_linearised_jacobian_is_the_autograd_jacobian(gen):
    mean, cov, gamma, beta = ln_case(gen, 0.1)
    out = layernorm_moments(mean, cov, gamma, beta, kind="token")
    for t in range(T):
        J = torch.func.jacrev(lambda x: F.layer_norm(x, (D,), gamma, beta, 1e-5))(mean[t])
        torch.testing.assert_close(out.jac[t], J, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.cov[t], J @ cov[t] @ J.T, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(out.cross[t], cov[t] @ J.T, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["linearised", "frozen"])
@pytest.mark.parametrize("kind", ["diag", "token", "joint"])
def test_kinds_are_projections_of_joint(method, kind, gen):
    mean, cov, gamma, beta = ln_case(gen, 0.1)
    cov_k = from_joint(to_joint(cov, "token"), kind)
    small = layernorm_moments(mean, cov_k, gamma, beta, kind=kind, method=method)
    joint = layernorm_moments(mean, to_joint(cov_k, kind), gamma, beta, kind="joint", method=method)
    torch.testing.assert_close(small.mean, joint.mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(small.cov, from_joint(joint.cov, kind), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["linearised", "frozen"])
def test_zero_variance_is_the_deterministic_layernorm(method, gen):
    mean, cov, gamma, beta = ln_case(gen, 0.1)
    out = layernorm_moments(mean, torch.zeros_like(cov), gamma, beta, kind="token", method=method)
    ref = torch.nn.functional.layer_norm(mean, (D,), gamma, beta, 1e-5)
    if method == "linearised":
        assert torch.equal(out.mean, ref)
    else:
        torch.testing.assert_close(out.mean, ref, rtol=1e-14, atol=1e-14)
    assert torch.count_nonzero(out.cov) == 0


@pytest.mark.parametrize(("scale", "cov_tol"), [(0.01, 0.05), (0.1, 0.15)])
def test_layernorm_approximations_within_envelope(scale, cov_tol, gen):
    """Measured against Monte Carlo (table in docs/moments/layernorm.md). Envelope at input covariance
    scale ≤ 0.1 (token spread ~2): linearised order-2 mean error ≤ 0.02 output std (≥ 5x better than order 1),
    covariance relative Frobenius error ≤ 0.05 at scale 0.01, ≤ 0.15 at 0.1; the frozen-statistics
    covariance is worse than the linearisation (it keeps the variance along x̂ that the normaliser removes)."""
    mean, cov, gamma, beta = ln_case(gen, scale)
    u = sample_sequence(mean, cov, "token", N, gen)
    y = F.layer_norm(u, (D,), gamma, beta, 1e-5)
    C = mc_cov(y, y, torch.zeros(T, D, D)).estimate
    sd = torch.diagonal(C, dim1=-2, dim2=-1).sqrt()

    def errors(**kw):
        out = layernorm_moments(mean, cov, gamma, beta, kind="token", **kw)
        rel = torch.linalg.norm(out.cov - C, dim=(-2, -1)) / torch.linalg.norm(C, dim=(-2, -1))
        return ((out.mean - y.mean(0)).abs() / sd).max(), rel.max()

    mean2, cov_err = errors(order=2)
    mean1, _ = errors(order=1)
    _, cov_frozen = errors(method="frozen")
    assert mean2 < 0.02 and mean2 < mean1 / 5
    assert cov_err < cov_tol
    assert cov_frozen > cov_err


def test_layernorm_bad_inputs(gen):
    mean, cov, gamma, beta = ln_case(gen, 0.1)
    with pytest.raises(ValueError, match="weight: expected shape"):
        layernorm_moments(mean, cov, gamma[:3], beta, kind="token")
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        layernorm_moments(mean, cov, kind="token", order=3)
    with pytest.raises(ValueError, match="unknown LayerNorm method"):
        layernorm_moments(mean, cov, kind="token", method="rms")
    with pytest.raises(ValueError, match="positive semi-definite"):
        layernorm_moments(mean, -cov, kind="token")


@pytest.mark.parametrize("kind", ["diag", "token", "joint"])
def test_residual_sum_matches_monte_carlo(kind, gen):
    x, g, mx, mg, Px, Pg, Pxg = residual_problem(kind, N, gen, T, D)
    out = residual_moments(mx, Px, mg, Pg, Pxg, kind=kind)
    s = x + g
    assert mc_mean(s, out.mean).max_z < 4
    if kind == "diag":  # elementwise layout
        s, x, g = s[..., None], x[..., None], g[..., None]
        closed = [c[..., None, None] for c in (out.cov, out.cross_x, out.cross_g)]
    elif kind == "token":
        closed = [out.cov, out.cross_x, out.cross_g]
    else:
        s, x, g = s.reshape(N, -1), x.reshape(N, -1), g.reshape(N, -1)
        closed = [c.reshape(T * D, T * D) for c in (out.cov, out.cross_x, out.cross_g)]
    assert mc_cov(s, s, closed[0]).max_z < 4
    assert mc_cov(x, s, closed[1]).max_z < 4
    assert mc_cov(g, s, closed[2]).max_z < 4


def test_residual_zero_variance_and_errors(gen):
    x, g = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
    z = torch.zeros(T, D, D)
    out = residual_moments(x, z, g, z, None, kind="token")
    assert torch.equal(out.mean, x + g) and torch.count_nonzero(out.cov) == 0
    with pytest.raises(ValueError, match="mean_g: expected shape"):
        residual_moments(x, z, g[:, :2], z, None, kind="token")
    with pytest.raises(ValueError, match="cross_xg: expected shape"):
        residual_moments(x, z, g, z, torch.zeros(T, D), kind="token")
