"""Attention: exact score moments (Isserlis), Taylor softmax, attention x values, masks."""

import pytest
import torch
from conftest import random_psd

from ppl_kbnn.mc import mc_cov, mc_mean, sample_gaussian
from ppl_kbnn.moments import (
    attention_mask,
    attention_value_moments,
    score_moments,
    softmax_joint_moments,
    softmax_moments,
    to_joint,
)

N = 200_000
T, D = 3, 4


def qk_token_moments(gen, scale=0.3, correlated=True):
    """Per-token joint covariance of (q_t, k_t), split into P^q, P^k and X = Cov(q_t, k_t)."""
    mq, mk = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
    Z = random_psd(2 * D, gen, scale, batch=(T,))  # (T, 2D, 2D)
    Pq, Pk, X = Z[:, :D, :D], Z[:, D:, D:], Z[:, :D, D:]
    if not correlated:
        X = torch.zeros_like(X)
        Z = torch.cat([torch.cat([Pq, X], -1), torch.cat([X.mT, Pk], -1)], -2)
    return mq, mk, Pq, Pk, X, Z


def sample_qk_token(mq, mk, Z, gen):
    z = sample_gaussian(torch.cat([mq, mk], -1), Z, N, gen)  # (N, T, 2D)
    return z[..., :D], z[..., D:]


@pytest.mark.parametrize("correlated", [False, True])
def test_scores_token_kind_match_monte_carlo(correlated, gen):
    mq, mk, Pq, Pk, X, Z = qk_token_moments(gen, correlated=correlated)
    out = score_moments(mq, Pq, mk, Pk, qk_cov=X if correlated else None, kind="token")
    q, k = sample_qk_token(mq, mk, Z, gen)
    S = q @ k.mT / D**0.5  # (N, T, T)
    assert mc_mean(S, out.mean).max_z < 4
    assert mc_cov(S, S, out.cov).max_z < 4  # within-row covariance (shared query) kept
    assert mc_cov(q[:, :, None, :].expand(N, T, T, D), S[..., None], out.q_cross[..., None]).max_z < 4
    assert mc_cov(k[:, None, :, :].expand(N, T, T, D), S[..., None], out.k_cross[..., None]).max_z < 4


def test_scores_joint_kind_match_monte_carlo(gen):
    mq, mk = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
    Z = random_psd(2 * T * D, gen, 0.2)  # joint over (q_1..q_T, k_1..k_T)
    Pq = Z[: T * D, : T * D].reshape(T, D, T, D)
    Pk = Z[T * D :, T * D :].reshape(T, D, T, D)
    X = Z[: T * D, T * D :].reshape(T, D, T, D)
    out = score_moments(mq, Pq, mk, Pk, qk_cov=X, kind="joint")
    z = sample_gaussian(torch.cat([mq.reshape(-1), mk.reshape(-1)]), Z, N, gen)
    q, k = z[:, : T * D].reshape(N, T, D), z[:, T * D :].reshape(N, T, D)
    S = (q @ k.mT / D**0.5).reshape(N, T * T)
    assert mc_mean(S, out.mean.reshape(-1)).max_z < 4
    assert mc_cov(S, S, out.cov.reshape(T * T, T * T)).max_z < 4
    assert mc_cov(q.reshape(N, -1), S, out.q_cross.reshape(T * D, T * T)).max_z < 4
    assert mc_cov(k.reshape(N, -1), S, out.k_cross.reshape(T * D, T * T)).max_z < 4


@pytest.mark.parametrize("kind", ["diag", "token"])
def test_scores_row_kinds_are_projections_of_joint(kind, gen):
    mq, mk, Pq, Pk, X, _ = qk_token_moments(gen)
    if kind == "diag":
        Pq, Pk, X = (torch.diagonal(a, dim1=-2, dim2=-1) for a in (Pq, Pk, X))
        Xj = to_joint(X, "diag")
    else:
        Xj = to_joint(X, "token")
    small = score_moments(mq, Pq, mk, Pk, qk_cov=X, kind=kind)
    joint = score_moments(mq, to_joint(Pq, kind), mk, to_joint(Pk, kind), qk_cov=Xj, kind="joint")
    torch.testing.assert_close(small.mean, joint.mean, rtol=1e-13, atol=1e-13)
    rows = torch.diagonal(joint.cov, dim1=-4, dim2=-2).movedim(-1, -3)  # (T, S, S)
    torch.testing.assert_close(small.cov, rows, rtol=1e-12, atol=1e-12)


def test_zero_variance_scores_attention_softmax_are_deterministic(gen):
    q, k, v = (torch.randn(T, D, generator=gen) for _ in range(3))
    zero = torch.zeros(T, D, D)
    sc = score_moments(q, zero, k, zero, kind="token")
    assert torch.equal(sc.mean, (q @ k.mT) * (1.0 / D**0.5)) and torch.count_nonzero(sc.cov) == 0
    mask = attention_mask(T)
    for order in (1, 2):
        a, ca = softmax_moments(sc.mean, sc.cov, order=order, mask=mask)
        ref = torch.softmax(sc.mean.masked_fill(~mask, float("-inf")), -1)
        assert torch.equal(a, ref) and torch.count_nonzero(ca) == 0
    av = attention_value_moments(ref, torch.zeros(T, T, T), v, zero, kind="token")
    assert torch.equal(av.mean, ref @ v) and torch.count_nonzero(av.cov) == 0


# --------------------------------------------------------------------------------------------- softmax


def softmax_case(n, scale, gen):
    mean = torch.randn(n, generator=gen)
    A = torch.randn(n, n, generator=gen)
    return mean, scale * A @ A.T / n


@pytest.mark.parametrize("n", [4, 10])
@pytest.mark.parametrize("scale", [0.01, 0.03])
def test_softmax_taylor_accuracy_at_small_scale(n, scale, gen):
    """Order 2 is ≥ 5x closer than order 1 in the mean; the covariance is within 15% (Frobenius)."""
    mean, cov = softmax_case(n, scale, gen)
    x = sample_gaussian(mean, cov, 1_000_000, gen)
    a = torch.softmax(x, -1)
    mc_m, se = a.mean(0), a.std(0) / 1000.0
    m1, c1 = softmax_moments(mean, cov, order=1)
    m2, c2 = softmax_moments(mean, cov, order=2)
    err1, err2 = (m1 - mc_m).abs().max(), (m2 - mc_m).abs().max()
    assert err1 > 5 * max(err2, 2 * se.max())  # order 2 resolved to MC noise or 5x better
    assert mc_mean(a, m2).max_z < 4  # at these scales the order-2 mean agrees with MC
    C = torch.cov(a.T)
    assert torch.linalg.norm(c1 - C) / torch.linalg.norm(C) < 0.15
    torch.testing.assert_close(c1, c2, rtol=0, atol=0)  # the covariance is first order for both


def test_softmax_cross_covariance(gen):
    mean, cov = softmax_case(6, 0.03, gen)
    _, _, cross = softmax_moments(mean, cov, return_cross=True)
    x = sample_gaussian(mean, cov, N, gen)
    C = mc_cov(x, torch.softmax(x, -1), cross)
    rel = torch.linalg.norm(C.estimate - cross) / torch.linalg.norm(C.estimate)
    assert rel < 0.05


def test_softmax_rows_sum_to_one_and_masks(gen):
    S = 5
    mean = torch.randn(2, S, S, generator=gen)
    cov = random_psd(S, gen, 0.5, batch=(2, S))
    pad = torch.tensor([[True] * S, [True, True, True, False, False]])
    mask = attention_mask(S, key_padding=pad)  # (2, S, S)
    a, ca, cross = softmax_moments(mean, cov, order=2, mask=mask, return_cross=True)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, S), rtol=0, atol=1e-14)
    assert torch.count_nonzero(a[~mask]) == 0
    assert torch.count_nonzero(ca * ~(mask[..., :, None] & mask[..., None, :])) == 0
    # a masked row equals the unmasked computation on the valid entries only
    b, cb = softmax_moments(mean[1, 4, :3], cov[1, 4, :3, :3], order=2)
    torch.testing.assert_close(a[1, 4, :3], b, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(ca[1, 4, :3, :3], cb, rtol=1e-14, atol=1e-15)
    # a row with no valid key has no output
    empty = torch.zeros(S, dtype=torch.bool)
    a0, c0 = softmax_moments(mean[0, 0], cov[0, 0], mask=empty)
    assert torch.count_nonzero(a0) == 0 and torch.count_nonzero(c0) == 0


def test_softmax_joint_matches_rowwise_on_diagonal_blocks(gen):
    mean = torch.randn(T, T, generator=gen)
    cov = random_psd(T * T, gen, 0.1).reshape(T, T, T, T)
    mask = attention_mask(T)
    m, c, _ = softmax_joint_moments(mean, cov, mask=mask)
    rows = torch.diagonal(cov, dim1=-4, dim2=-2).movedim(-1, -3)
    mr, cr = softmax_moments(mean, rows, mask=mask)
    torch.testing.assert_close(m, mr, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(torch.diagonal(c, dim1=-4, dim2=-2).movedim(-1, -3), cr, rtol=1e-13, atol=1e-15)
    # the cross-row blocks are the first-order ones: J_t P_tu J_u, checked against MC
    x = sample_gaussian(mean.reshape(-1), cov.reshape(T * T, T * T), N, gen).reshape(N, T, T)
    a = torch.softmax(x.masked_fill(~mask, float("-inf")), -1).reshape(N, -1)
    C = torch.cov(a.T)
    assert torch.linalg.norm(c.reshape(T * T, T * T) - C) / torch.linalg.norm(C) < 0.15


# --------------------------------------------------------------------------------------------- A x V


@pytest.mark.parametrize("kind", ["diag", "token"])
def test_attention_values_match_monte_carlo(kind, gen):
    S, dv = 4, 3
    a_mean = torch.softmax(torch.randn(T, S, generator=gen), -1)
    a_cov = random_psd(S, gen, 0.01, batch=(T,))
    v_mean = torch.randn(S, dv, generator=gen)
    v_cov = random_psd(dv, gen, 0.3, batch=(S,))
    if kind == "diag":
        v_cov = torch.diagonal(v_cov, dim1=-2, dim2=-1)
    out = attention_value_moments(a_mean, a_cov, v_mean, v_cov, kind=kind)
    A = sample_gaussian(a_mean, a_cov, N, gen)  # (N, T, S), rows independent
    V = v_mean + (
        torch.randn(N, S, dv, generator=gen) * v_cov.sqrt()
        if kind == "diag"
        else sample_gaussian(torch.zeros(S, dv), v_cov, N, gen)
    )
    o = A @ V  # (N, T, dv)
    assert mc_mean(o, out.mean).max_z < 4
    if kind == "token":
        assert mc_cov(o, o, out.cov).max_z < 4
        assert mc_cov(V[:, None].expand(N, T, S, dv), o[:, :, None].expand(N, T, S, dv), out.v_cross).max_z < 4
    else:
        chk = mc_cov(o[..., None], o[..., None], out.cov[..., None, None])
        assert chk.max_z < 4
        vc = mc_cov(V[:, None, :, :, None], o[:, :, None, :, None], out.v_cross[..., None, None])
        assert vc.max_z < 4
    assert mc_cov(A[..., None], o[:, :, None, :], out.a_cross[..., None, :]).max_z < 4


def test_attention_values_joint_match_monte_carlo(gen):
    S, dv = 3, 2
    a_mean = torch.softmax(torch.randn(T, S, generator=gen), -1)
    a_cov = random_psd(T * S, gen, 0.01).reshape(T, S, T, S)
    v_mean = torch.randn(S, dv, generator=gen)
    v_cov = random_psd(S * dv, gen, 0.3).reshape(S, dv, S, dv)
    out = attention_value_moments(a_mean, a_cov, v_mean, v_cov, kind="joint")
    A = sample_gaussian(a_mean.reshape(-1), a_cov.reshape(T * S, T * S), N, gen).reshape(N, T, S)
    V = sample_gaussian(v_mean.reshape(-1), v_cov.reshape(S * dv, S * dv), N, gen).reshape(N, S, dv)
    o = (A @ V).reshape(N, -1)
    assert mc_mean(o, out.mean.reshape(-1)).max_z < 4
    assert mc_cov(o, o, out.cov.reshape(T * dv, T * dv)).max_z < 4
    assert mc_cov(A.reshape(N, -1), o, out.a_cross.reshape(T * S, T * dv)).max_z < 4
    assert mc_cov(V.reshape(N, -1), o, out.v_cross.reshape(S * dv, T * dv)).max_z < 4


# --------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(gen):
    mq, mk, Pq, Pk, X, _ = qk_token_moments(gen)
    with pytest.raises(ValueError, match="k_mean: expected shape"):
        score_moments(mq, Pq, mk[:, :2], Pk, kind="token")
    with pytest.raises(ValueError, match="joint covariance of \\(q, k\\)"):
        score_moments(mq, Pq, mk, Pk, qk_cov=X * 100, kind="token")
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        softmax_moments(mk[0], Pk[0], order=3)
    with pytest.raises(ValueError, match="not symmetric"):
        softmax_moments(mk[0], Pk[0] + torch.triu(torch.ones(D, D), 1))
    with pytest.raises(ValueError, match="positive semi-definite"):
        softmax_moments(mk[0], -Pk[0])
    with pytest.raises(ValueError, match="NaN"):
        softmax_moments(mk[0] * float("nan"), Pk[0])
    with pytest.raises(ValueError, match="mask: expected a bool"):
        softmax_moments(mk[0], Pk[0], mask=torch.ones(D))
    with pytest.raises(ValueError, match="key_padding"):
        attention_mask(3, key_padding=torch.ones(3))
    with pytest.raises(ValueError, match="v_mean: expected shape"):
        attention_value_moments(torch.ones(T, 2) / 2, torch.zeros(T, 2, 2), torch.ones(3, D), Pq, kind="token")
