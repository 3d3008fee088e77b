"""Linear map with random weights: exact moments vs Monte Carlo (4 standard errors)."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import random_psd

from ppl_kbnn.mc import mc_cov, mc_mean, mc_var, sample_gaussian, sample_sequence
from ppl_kbnn.moments import augment, from_joint, linear_moments, to_joint
from ppl_kbnn.moments.kinds import flatten_joint

N = 200_000
T, D_IN, D_OUT = 3, 4, 3


def make_input(kind, gen, scale=0.3):
    mean = torch.randn(T, D_IN, generator=gen)
    if kind == "diag":
        cov = scale * torch.rand(T, D_IN, generator=gen)
    elif kind == "token":
        cov = random_psd(D_IN, gen, scale, batch=(T,))
    else:
        cov = random_psd(T * D_IN, gen, scale).reshape(T, D_IN, T, D_IN)
    return mean, cov


def make_weights(w_kind, gen, scale=0.2, bias=True):
    p = D_IN + int(bias)
    w_mean = torch.randn(D_OUT, p, generator=gen)
    if w_kind == "block":
        w_cov = random_psd(p, gen, scale, batch=(D_OUT,))
    else:
        w_cov = scale * torch.rand(D_OUT, p, generator=gen)
    return w_mean, w_cov


def sample_weights(w_mean, w_cov, w_kind, gen):
    if w_kind == "block":
        return sample_gaussian(w_mean, w_cov, N, gen)  # (N, n, p)
    return w_mean + w_cov.sqrt() * torch.randn(N, *w_mean.shape, generator=gen)


@pytest.mark.parametrize("kind", ["diag", "token", "joint"])
@pytest.mark.parametrize("w_kind", ["block", "diag"])
def test_linear_matches_monte_carlo(kind, w_kind, gen):
    mean, cov = make_input(kind, gen)
    w_mean, w_cov = make_weights(w_kind, gen)
    out = linear_moments(mean, cov, w_mean, w_cov, kind=kind, w_kind=w_kind)

    u = sample_sequence(mean, cov, kind, N, gen)  # (N, T, d_in)
    W = sample_weights(w_mean, w_cov, w_kind, gen)  # (N, n, p)
    y = torch.einsum("Ntp,Nnp->Ntn", augment(u), W)  # (N, T, n)

    assert mc_mean(y, out.mean).max_z < 4
    if kind == "diag":
        assert mc_var(y, out.cov).max_z < 4
        cross = mc_cov(u, y, out.cross)  # per token (T, d_in, n)
    elif kind == "token":
        assert mc_cov(y, y, out.cov).max_z < 4
        cross = mc_cov(u, y, out.cross)
    else:
        assert mc_cov(y.reshape(N, -1), y.reshape(N, -1), flatten_joint(out.cov)).max_z < 4
        cross = mc_cov(u.reshape(N, -1), y.reshape(N, -1), out.cross.reshape(T * D_IN, T * D_OUT))
    assert cross.max_z < 4
    # Cov(w_n, y_tn) = C_n m̄_t
    wc = mc_cov(W[:, None].expand(N, T, D_OUT, -1), y[..., None], out.w_cross[..., None])
    assert wc.max_z < 4


@pytest.mark.parametrize("kind", ["diag", "token"])
def test_joint_path_projects_onto_cheaper_kinds(kind, gen):
    """The diag/token outputs are exactly the projections of the joint computation."""
    mean, cov = make_input(kind, gen)
    w_mean, w_cov = make_weights("block", gen)
    small = linear_moments(mean, cov, w_mean, w_cov, kind=kind)
    joint = linear_moments(mean, to_joint(cov, kind), w_mean, w_cov, kind="joint")
    torch.testing.assert_close(small.cov, from_joint(joint.cov, kind), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(small.mean, joint.mean, rtol=0, atol=0)
    per_token = torch.diagonal(joint.cross, dim1=-4, dim2=-2).movedim(-1, -3)  # (T, d_in, n)
    torch.testing.assert_close(small.cross, per_token, rtol=1e-12, atol=1e-12)


def test_diag_weights_equal_block_with_diagonal_covariance(gen):
    mean, cov = make_input("token", gen)
    w_mean, w_var = make_weights("diag", gen)
    a = linear_moments(mean, cov, w_mean, w_var, kind="token", w_kind="diag")
    b = linear_moments(mean, cov, w_mean, torch.diag_embed(w_var), kind="token", w_kind="block")
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", ["diag", "token", "joint"])
@pytest.mark.parametrize("bias", [True, False])
def test_zero_variance_is_the_deterministic_layer(kind, bias, gen):
    mean, cov = make_input(kind, gen)
    w_mean, w_cov = make_weights("block", gen, bias=bias)
    out = linear_moments(mean, torch.zeros_like(cov), w_mean, torch.zeros_like(w_cov), kind=kind)
    layer = torch.nn.Linear(D_IN, D_OUT, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w_mean[:, :D_IN])
        if bias:
            layer.bias.copy_(w_mean[:, D_IN])
    assert torch.equal(out.mean, layer(mean).detach())
    assert torch.count_nonzero(out.cov) == 0
    # deterministic input: no input cross-covariance, fixed weights: none for the weights
    det = linear_moments(mean, None, w_mean, None, kind=kind)
    assert det.cross is None and det.w_cross is None
    assert torch.equal(det.mean, F.linear(mean, w_mean[:, :D_IN], w_mean[:, D_IN] if bias else None))


def test_bad_inputs_raise_clear_errors(gen):
    mean, cov = make_input("token", gen)
    w_mean, w_cov = make_weights("block", gen)
    with pytest.raises(ValueError, match="w_mean: last dim"):
        linear_moments(mean, cov, w_mean[:, :2], None, kind="token")
    with pytest.raises(ValueError, match="cov: expected shape"):
        linear_moments(mean, cov[:, :2, :2], w_mean, w_cov, kind="token")
    with pytest.raises(ValueError, match="not symmetric"):
        bad = cov.clone()
        bad[0, 0, 1] += 1.0
        linear_moments(mean, bad, w_mean, w_cov, kind="token")
    with pytest.raises(ValueError, match="positive semi-definite"):
        linear_moments(mean, cov, w_mean, w_cov - 5 * torch.eye(D_IN + 1), kind="token")
    with pytest.raises(ValueError, match="negative variance"):
        linear_moments(mean, -torch.ones(T, D_IN), w_mean, w_cov, kind="diag")
    with pytest.raises(ValueError, match="NaN"):
        linear_moments(mean.clone().fill_(float("nan")), cov, w_mean, w_cov, kind="token")
    with pytest.raises(ValueError, match="inf"):
        linear_moments(mean, cov, w_mean.clone().fill_(float("inf")), w_cov, kind="token")
    with pytest.raises(ValueError, match="dtype mismatch"):
        linear_moments(mean.float(), cov, w_mean, w_cov, kind="token")
    with pytest.raises(ValueError, match="unknown covariance kind"):
        linear_moments(mean, cov, w_mean, w_cov, kind="full")
    with pytest.raises(ValueError, match="unknown w_kind"):
        linear_moments(mean, cov, w_mean, w_cov, kind="token", w_kind="kron")
