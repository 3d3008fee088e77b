r"""Attention: scores ``S = q kᵀ/√d``, the Taylor softmax, and attention weights × values.

Notation: queries ``q_t`` (``t < T``), keys ``k_s`` and values ``v_s`` (``s < S``), each a
Gaussian vector of ``d`` features; ``X = Cov(q, k)`` (queries and keys come from one input, so
they are correlated); ``α = scale = 1/√d`` unless given.

**Scores (exact for jointly Gaussian q, k; Isserlis' theorem).**

.. math::
    E[S_{ts}] &= \alpha\,(m_{q_t}^\top m_{k_s} + \mathrm{tr}\,X_{ts}) \\
    \mathrm{Cov}(S_{ts}, S_{t's'})/\alpha^2 &=
        m_{q_t}^\top P^{k}_{ss'} m_{q_{t'}} + m_{q_t}^\top X_{t's}^\top m_{k_{s'}}
      + m_{k_s}^\top X_{ts'} m_{q_{t'}} + m_{k_s}^\top P^{q}_{tt'} m_{k_{s'}} \\
      &\quad + \textstyle\sum_{ij} P^q_{ti,t'j} P^k_{si,s'j} + \sum_{ij} X_{ti,s'j} X_{t'j,si}

With tokens independent (``diag``/``token`` kinds) the scores of one row ``t`` are still
correlated through the shared query — the term ``m_{k_s}ᵀ P^q_t m_{k_{s'}}`` — and that
within-row covariance is kept (``(..., T, S, S)``); covariances between rows are dropped.
The ``joint`` kind keeps everything (``(..., T, S, T, S)``).

**Softmax (Taylor expansion at the mean logits, restricted to the unmasked entries).**
With ``p = softmax(m_S)`` over the valid entries and ``J = diag(p) - ppᵀ``:

.. math::
    E[a] &\approx p \quad\text{(order 1)}, \qquad
    E[a_i] \approx p_i + \tfrac12 p_i\big[P_{ii} - 2(Pp)_i + 2p^\top P p - \textstyle\sum_j p_j P_{jj}\big]
        \quad\text{(order 2)} \\
    \mathrm{Cov}(a) &\approx J P J^\top, \qquad \mathrm{Cov}(S, a) \approx P J^\top \quad\text{(first order)}

Masked entries have weight exactly 0 (mean and covariance); the order-2 correction sums to
zero, so every row with at least one valid entry still sums to 1. A row with no valid entry
has no output (mean 0, covariance 0).

**Attention × values**, ``o_t = Σ_s a_ts v_s``, with ``A`` and ``V`` treated as independent
(a named approximation: both depend on the same input). Exact under that assumption:

.. math::
    E[o_t] = \sum_s \bar a_{ts} m_{v_s}, \quad
    \mathrm{Cov}(o_t, o_{t'}) = \sum_{s,s'} \big(\bar a_{ts}\bar a_{t's'} + A_{ts,t's'}\big) P^v_{ss'}
        + A_{ts,t's'}\, m_{v_s} m_{v_{s'}}^\top
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import check_batch, check_psd, check_same_dtype, check_shape, check_tensor, is_validating
from .kinds import CovKind, as_kind, check_cov, cov_event_dims

# ---------------------------------------------------------------------------------------------
# masks


def attention_mask(
    T: int,
    S: int | None = None,
    *,
    causal: bool = True,
    key_padding: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask of *valid* (query, key) pairs, ``(T, S)`` or ``(..., T, S)`` with padding.

    Args:
        T, S: numbers of queries and keys (``S = T`` by default).
        causal: query ``t`` sees keys ``s <= t + (S - T)`` (the usual right-aligned causal mask).
        key_padding: optional ``(..., S)`` bool, ``True`` for real (non-padded) keys.
    """
    S = T if S is None else S
    for name, n in (("T", T), ("S", S)):
        if torch.jit.is_tracing():  # under torch.jit.trace (NUTS with jit_compile) sizes are 0-dim tensors
            break
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {n!r}")
    mask = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        mask = torch.tril(mask, diagonal=S - T)
    if key_padding is not None:
        if (
            not isinstance(key_padding, torch.Tensor)
            or key_padding.dtype != torch.bool
            or key_padding.dim() < 1
            or key_padding.shape[-1] != S
        ):
            got = (f"{key_padding.dtype} {tuple(key_padding.shape)}" if isinstance(key_padding, torch.Tensor)
                   else type(key_padding).__name__)  # fmt: skip
            raise ValueError(f"key_padding: expected a bool tensor (..., {S}), got {got}")
        mask = mask & key_padding[..., None, :]
    return mask


# ---------------------------------------------------------------------------------------------
# scores


class ScoreMoments(NamedTuple):
    """Output of :func:`score_moments`.

    Attributes:
        mean: ``(..., T, S)``.
        cov: ``diag``/``token``: within-row covariance ``(..., T, S, S)``;
            ``joint``: ``(..., T, S, T, S)``.
        q_cross: ``diag``/``token``: ``Cov(q_t, S_ts)`` as ``(..., T, S, d)``;
            ``joint``: ``Cov(q_u, S_ts)`` for every query token ``u``, ``(..., T, d, T, S)``.
        k_cross: ``diag``/``token``: ``Cov(k_s, S_ts)`` as ``(..., T, S, d)``;
            ``joint``: ``Cov(k_z, S_ts)`` for every key token ``z``, ``(..., S, d, T, S)``.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    q_cross: torch.Tensor
    k_cross: torch.Tensor


def score_moments(
    q_mean: torch.Tensor,
    q_cov: torch.Tensor,
    k_mean: torch.Tensor,
    k_cov: torch.Tensor,
    *,
    qk_cov: torch.Tensor | None = None,
    kind: str | CovKind = "token",
    scale: float | None = None,
) -> ScoreMoments:
    """Moments of the attention scores ``S_ts = scale · q_t·k_s`` for Gaussian queries and keys.

    Args:
        q_mean: ``(..., T, d)``; ``k_mean``: ``(..., S, d)``.
        q_cov, k_cov: covariances in ``kind``'s layout.
        qk_cov: ``Cov(q, k)``: ``diag``: ``(..., T, d)`` elementwise ``Cov(q_ti, k_ti)``; ``token``:
            ``(..., T, d, d)`` with entries ``Cov(q_ti, k_tj)``; ``joint``: ``(..., T, d, S, d)``.
            Same-token forms need ``S == T``. ``None``: independent.
        kind: ``"diag"``, ``"token"`` or ``"joint"``.
        scale: defaults to ``1/√d``.
    """
    kind = as_kind(kind)
    if is_validating():
        check_tensor("q_mean", q_mean, min_dim=2)
        check_tensor("k_mean", k_mean, min_dim=2)
    T, d = q_mean.shape[-2:]
    S = k_mean.shape[-2]
    alpha = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if is_validating():
        check_shape("k_mean", k_mean, (S, d))
        check_cov("q_cov", q_cov, kind, T, d)
        check_cov("k_cov", k_cov, kind, S, d)
        check_same_dtype(q_mean=q_mean, q_cov=q_cov, k_mean=k_mean, k_cov=k_cov, qk_cov=qk_cov)
        if qk_cov is not None:
            check_tensor("qk_cov", qk_cov)
            if kind is not CovKind.JOINT and S != T:
                raise ValueError(f"qk_cov: same-token q-k covariance needs S == T, got T={T}, S={S}")
            want = {CovKind.DIAG: (T, d), CovKind.TOKEN: (T, d, d), CovKind.JOINT: (T, d, S, d)}[kind]
            check_shape("qk_cov", qk_cov, want)
        c = cov_event_dims(kind)
        check_batch(q_mean=(q_mean, 2), q_cov=(q_cov, c), k_mean=(k_mean, 2), k_cov=(k_cov, c),
                    qk_cov=(qk_cov, {CovKind.DIAG: 2, CovKind.TOKEN: 3, CovKind.JOINT: 4}[kind]))  # fmt: skip
        if qk_cov is not None:
            _check_joint_psd(q_cov, k_cov, qk_cov, kind)
    if kind is CovKind.JOINT:
        return _scores_joint(q_mean, q_cov, k_mean, k_cov, qk_cov, alpha)
    if kind is CovKind.DIAG:
        q_cov, k_cov = torch.diag_embed(q_cov), torch.diag_embed(k_cov)
        qk_cov = torch.diag_embed(qk_cov) if qk_cov is not None else None
    return _scores_token(q_mean, q_cov, k_mean, k_cov, qk_cov, alpha)


def score_mean(
    q_mean: torch.Tensor,
    k_mean: torch.Tensor,
    qk_cov: torch.Tensor | None = None,
    *,
    kind: str | CovKind = "token",
    scale: float | None = None,
) -> torch.Tensor:
    """The mean ``E[S_ts] = scale · (m_{q_t}·m_{k_s} + tr Cov(q_t, k_s))`` of :func:`score_moments` alone
    (same arguments; only types and shapes are validated), ``(..., T, S)``. Cheap, and differentiable in the
    means and ``qk_cov``."""
    kind = as_kind(kind)
    if is_validating():
        for name, t in (("q_mean", q_mean), ("k_mean", k_mean)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a floating-point tensor (..., T, d), got {got}")
        check_shape("k_mean", k_mean, (None, q_mean.shape[-1]))
        check_batch(q_mean=(q_mean, 2), k_mean=(k_mean, 2))
    alpha = 1.0 / math.sqrt(q_mean.shape[-1]) if scale is None else float(scale)
    mean = q_mean @ k_mean.mT  # (..., T, S)
    if qk_cov is not None:
        if kind is CovKind.JOINT:
            mean = mean + torch.einsum("...tisi->...ts", qk_cov)
        elif kind is CovKind.DIAG:
            mean = mean + qk_cov.sum(-1).diag_embed()  # + δ_st Σ_i Cov(q_ti, k_ti)
        else:
            mean = mean + torch.diagonal(qk_cov, dim1=-2, dim2=-1).sum(-1).diag_embed()  # + δ_st tr(X_t)
    return alpha * mean


def _check_joint_psd(q_cov, k_cov, qk_cov, kind) -> None:
    """The stacked covariance of (q, k) must be PSD (a valid cross-covariance)."""
    if kind is CovKind.JOINT:
        T, d, S = q_cov.shape[-4], q_cov.shape[-3], k_cov.shape[-4]
        Pq, Pk, X = (
            q_cov.reshape(*q_cov.shape[:-4], T * d, T * d),
            k_cov.reshape(*k_cov.shape[:-4], S * d, S * d),
            qk_cov.reshape(*qk_cov.shape[:-4], T * d, S * d),
        )
    elif kind is CovKind.TOKEN:
        Pq, Pk, X = q_cov, k_cov, qk_cov
    else:
        Pq, Pk, X = torch.diag_embed(q_cov), torch.diag_embed(k_cov), torch.diag_embed(qk_cov)
    top = torch.cat([Pq, X], dim=-1)
    bottom = torch.cat([X.mT, Pk], dim=-1)
    check_psd("joint covariance of (q, k)", torch.cat([top, bottom], dim=-2))


def _scores_token(mq, Pq, mk, Pk, X, alpha) -> ScoreMoments:
    """Tokens independent; Pq (..., T, d, d), Pk (..., S, d, d), X (..., T, d, d) or None."""
    T = mq.shape[-2]
    mean = score_mean(mq, mk, X, kind=CovKind.TOKEN, scale=alpha)
    Pq_mk = torch.einsum("...tij,...sj->...tsi", Pq, mk)  # P^q_t m_ks: (..., T, S, d)
    Pk_mq = torch.einsum("...sij,...tj->...tsi", Pk, mq)  # P^k_s m_qt: (..., T, S, d)
    # m_ks' ᵀ P^q_t m_ks  (shared query): (..., T, S, S)
    cov = torch.einsum("...tsi,...zi->...tsz", Pq_mk, mk)
    # δ_ss' (m_qtᵀ P^k_s m_qt + tr(P^q_t P^k_s))
    own = (Pk_mq * mq[..., :, None, :]).sum(-1) + torch.einsum("...tij,...sij->...ts", Pq, Pk)
    cov = cov + torch.diag_embed(own)
    q_cross, k_cross = Pq_mk, Pk_mq
    if X is not None:
        Xmq = X @ mq[..., None]  # X_t m_qt: (..., T, d, 1)
        u = (mk[..., None, :, :] @ Xmq)[..., 0]  # u_ts = m_ksᵀ X_t m_qt: (..., T, S)
        eye = torch.eye(T, dtype=mq.dtype, device=mq.device)
        # δ_st u_{t s'} + δ_{s' t} u_{t s} + δ_st δ_{s't} tr(X_t X_t)
        cov = cov + eye[:, :, None] * u[..., :, None, :] + eye[:, None, :] * u[..., :, :, None]
        trXX = torch.einsum("...tij,...tji->...t", X, X)
        cov = cov + trXX[..., :, None, None] * (eye[:, :, None] * eye[:, None, :])  # δ_st δ_zt tr(X_t X_t)
        q_cross = q_cross + eye[..., None] * Xmq[..., None, :, 0]  # + δ_st X_t m_qt
        XTmk = (X.mT @ mk[..., None])[..., 0]  # X_tᵀ m_kt: (..., T, d)
        k_cross = k_cross + eye[..., None] * XTmk[..., :, None, :]
    return ScoreMoments(mean, alpha**2 * cov, alpha * q_cross, alpha * k_cross)


def _scores_joint(mq, Pq, mk, Pk, X, alpha) -> ScoreMoments:
    """Joint kind: Pq (..., T, d, T, d), Pk (..., S, d, S, d), X (..., T, d, S, d) or None."""
    mean = score_mean(mq, mk, X, kind=CovKind.JOINT, scale=alpha)
    cov = torch.einsum("...ti,...sizj,...uj->...tsuz", mq, Pk, mq)
    cov = cov + torch.einsum("...si,...tiuj,...zj->...tsuz", mk, Pq, mk)
    cov = cov + torch.einsum("...tiuj,...sizj->...tsuz", Pq, Pk)
    q_cross = torch.einsum("...aitj,...sj->...aits", Pq, mk)  # Cov(q_a, S_ts): (..., T, d, T, S)
    k_cross = torch.einsum("...bisj,...tj->...bits", Pk, mq)  # Cov(k_b, S_ts): (..., S, d, T, S)
    if X is not None:
        cov = cov + torch.einsum("...ti,...ujsi,...zj->...tsuz", mq, X, mk)
        cov = cov + torch.einsum("...si,...tizj,...uj->...tsuz", mk, X, mq)
        cov = cov + torch.einsum("...tizj,...ujsi->...tsuz", X, X)
        q_cross = q_cross + torch.einsum("...aisj,...tj->...aits", X, mq)
        k_cross = k_cross + torch.einsum("...tjbi,...sj->...bits", X, mk)
    return ScoreMoments(mean, alpha**2 * cov, alpha * q_cross, alpha * k_cross)


# ---------------------------------------------------------------------------------------------
# softmax


def _softmax_probs(mean: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``p = softmax(mean)`` over valid entries (0 elsewhere and on empty rows)."""
    if mask is None:
        return torch.softmax(mean, dim=-1)
    logits = mean.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.where(mask.any(-1, keepdim=True), p, torch.zeros_like(p))  # empty rows: no output


def _softmax_jac(p: torch.Tensor) -> torch.Tensor:
    """The softmax Jacobian ``J = diag(p) - ppᵀ`` at probabilities ``p``."""
    return torch.diag_embed(p) - p[..., :, None] * p[..., None, :]


def _softmax_point(mean: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``p = softmax(mean)`` over valid entries (0 elsewhere and on empty rows), and ``J = diag(p) - ppᵀ``."""
    p = _softmax_probs(mean, mask)
    return p, _softmax_jac(p)


def _second_order_mean(p: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``p_i + ½ p_i [P_ii - 2(Pp)_i + 2pᵀPp - Σ_j p_j P_jj]`` (``½ tr(H_i P)``, H_i the Hessian of softmax_i)."""
    Pp = (P @ p[..., None])[..., 0]
    diagP = torch.diagonal(P, dim1=-2, dim2=-1)
    pPp = (p * Pp).sum(-1, keepdim=True)
    pdiag = (p * diagP).sum(-1, keepdim=True)
    return p + 0.5 * p * (diagP - 2.0 * Pp + 2.0 * pPp - pdiag)


def _masked_cov(cov: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return cov
    return cov * (mask[..., :, None] & mask[..., None, :]).to(cov.dtype)


def softmax_moments(
    mean: torch.Tensor,
    cov: torch.Tensor,
    order: int = 2,
    *,
    mask: torch.Tensor | None = None,
    return_cross: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Taylor moments of ``a = softmax(S)`` for Gaussian logits ``S ~ N(mean, cov)`` over the last dim.

    Args:
        mean: ``(..., n)``; cov: ``(..., n, n)``.
        order: ``1`` (mean ``softmax(m)``) or ``2`` (plus the second-order correction); the
            covariance is first order in both cases.
        mask: optional ``(..., n)`` bool, ``True`` for valid entries (e.g. a row of
            :func:`attention_mask`); masked entries get weight 0 exactly.
        return_cross: also return ``Cov(S, a) ≈ P Jᵀ`` ``(..., n, n)``.

    Returns:
        ``(mean, cov)`` or ``(mean, cov, cross)``.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if is_validating():
        check_tensor("mean", mean, min_dim=1)
        check_tensor("cov", cov, min_dim=2)
    n = mean.shape[-1]
    if is_validating():
        check_shape("cov", cov, (n, n))
        check_psd("cov", cov)
        check_same_dtype(mean=mean, cov=cov)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 1 or mask.shape[-1] != n:
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask: expected a bool tensor (..., {n}), got {got}")
        check_batch(mean=(mean, 1), cov=(cov, 2), mask=(mask, 1))
    P = _masked_cov(cov, mask)
    p, J = _softmax_point(mean, mask)
    a_mean = _second_order_mean(p, P) if order == 2 else p
    cross = P @ J  # Cov(S, a) = P Jᵀ (J symmetric)
    a_cov = J @ cross
    return (a_mean, a_cov, cross) if return_cross else (a_mean, a_cov)


def softmax_joint_moments(
    mean: torch.Tensor,
    cov: torch.Tensor,
    order: int = 2,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise softmax of a Gaussian ``(..., T, n)`` with joint covariance ``(..., T, n, T, n)``.

    Same Taylor expansion as :func:`softmax_moments`, applied to every row, keeping the
    covariance between rows: ``Cov(a_t, a_u) ≈ J_t P_tu J_u``. Returns ``(mean, cov, cross)``
    with ``cross = Cov(S, a)`` ``(..., T, n, T, n)``.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if is_validating():
        check_tensor("mean", mean, min_dim=2)
    T, n = mean.shape[-2:]
    if is_validating():
        check_cov("cov", cov, "joint", T, n)
        check_same_dtype(mean=mean, cov=cov)
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 2
                                 or mask.shape[-2:] != (T, n)):  # fmt: skip
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected a bool tensor (..., {T}, {n}), got {got}")
        check_batch(mean=(mean, 2), cov=(cov, 4), mask=(mask, 2))
    if mask is not None:
        valid = mask.reshape(*mask.shape[:-2], T * n)
        cov = cov.reshape(*cov.shape[:-4], T * n, T * n) * (valid[..., :, None] & valid[..., None, :])
        cov = cov.reshape(*cov.shape[:-2], T, n, T, n)
    p, J = _softmax_point(mean, mask)  # (..., T, n), (..., T, n, n)
    if order == 2:
        rows = torch.diagonal(cov, dim1=-4, dim2=-2).movedim(-1, -3)  # P_tt: (..., T, n, n)
        a_mean = _second_order_mean(p, rows)
    else:
        a_mean = p
    cross = torch.einsum("...tiuj,...ujk->...tiuk", cov, J)  # Cov(S_t, a_u) = P_tu J_u
    a_cov = torch.einsum("...tki,...tiuj->...tkuj", J, cross)
    return a_mean, a_cov, cross


# ---------------------------------------------------------------------------------------------
# attention weights x values


class AttentionValueMoments(NamedTuple):
    """Output of :func:`attention_value_moments` (``a_cross`` and ``v_cross`` are ``None`` when the call
    passed ``need_cross=False``).

    Attributes:
        mean: ``(..., T, dv)``.
        cov: in the values' kind (``token``: ``(..., T, dv, dv)``; ``diag``: ``(..., T, dv)``;
            ``joint``: ``(..., T, dv, T, dv)``).
        a_cross: ``Cov(a_ts, o_t)`` ``(..., T, S, dv)``; ``joint``: ``Cov(a_us, o_t)`` ``(..., T, S, T, dv)``.
        v_cross: ``Cov(v_s, o_t)``: ``token`` ``(..., T, S, dv, dv)``; ``diag`` ``(..., T, S, dv)``
            (elementwise); ``joint`` ``(..., S, dv, T, dv)``.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    a_cross: torch.Tensor | None
    v_cross: torch.Tensor | None


def attention_value_moments(
    a_mean: torch.Tensor,
    a_cov: torch.Tensor,
    v_mean: torch.Tensor,
    v_cov: torch.Tensor,
    *,
    kind: str | CovKind = "token",
    need_cross: bool = True,
) -> AttentionValueMoments:
    """Moments of ``o_t = Σ_s a_ts v_s`` with attention weights independent of the values.

    Args:
        a_mean: ``(..., T, S)``; a_cov: within-row ``(..., T, S, S)`` (``diag``/``token``) or
            joint ``(..., T, S, T, S)``.
        v_mean: ``(..., S, dv)``; v_cov: in ``kind``'s layout.
        need_cross: ``False`` skips the cross-covariances the covariance does not need
            (``v_cross``, and ``a_cross`` for ``joint``), returned as ``None``.
    """
    kind = as_kind(kind)
    if is_validating():
        check_tensor("a_mean", a_mean, min_dim=2)
        check_tensor("v_mean", v_mean, min_dim=2)
    T, S = a_mean.shape[-2:]
    dv = v_mean.shape[-1]
    if is_validating():
        check_shape("v_mean", v_mean, (S, dv))
        check_cov("v_cov", v_cov, kind, S, dv)
        if kind is CovKind.JOINT:
            check_cov("a_cov", a_cov, "joint", T, S)
        else:
            check_shape("a_cov", a_cov, (T, S, S))
            check_psd("a_cov", a_cov)
        check_same_dtype(a_mean=a_mean, a_cov=a_cov, v_mean=v_mean, v_cov=v_cov)
        check_batch(a_mean=(a_mean, 2), a_cov=(a_cov, 4 if kind is CovKind.JOINT else 3), v_mean=(v_mean, 2),
                    v_cov=(v_cov, cov_event_dims(kind)))  # fmt: skip
    mean = a_mean @ v_mean  # (..., T, dv)
    if kind is CovKind.JOINT:
        Ea = torch.einsum("...ts,...uz->...tsuz", a_mean, a_mean) + a_cov  # E[a_ts a_uz]
        cov = torch.einsum("...tsuz,...sizj->...tiuj", Ea, v_cov)
        cov = cov + torch.einsum("...tsuz,...si,...zj->...tiuj", a_cov, v_mean, v_mean)
        if not need_cross:
            return AttentionValueMoments(mean, cov, None, None)
        a_cross = torch.einsum("...uzts,...si->...uzti", a_cov, v_mean)
        v_cross = torch.einsum("...ts,...zjsi->...zjti", a_mean, v_cov)
        return AttentionValueMoments(mean, cov, a_cross, v_cross)
    a2 = a_mean * a_mean + torch.diagonal(a_cov, dim1=-2, dim2=-1)  # E[a_ts²]
    a_cross = a_cov @ v_mean[..., None, :, :]  # Σ_s' A_t,ss' m_vs': (..., T, S, dv)
    if kind is CovKind.TOKEN:
        cov = torch.einsum("...ts,...sij->...tij", a2, v_cov)
        cov = cov + v_mean.mT[..., None, :, :] @ a_cross  # m_vᵀ A_t m_v
        if need_cross:
            v_cross = a_mean[..., :, :, None, None] * v_cov[..., None, :, :, :]
    else:
        cov = a2 @ v_cov + (v_mean[..., None, :, :] * a_cross).sum(-2)
        if need_cross:
            v_cross = a_mean[..., :, :, None] * v_cov[..., None, :, :]
    if not need_cross:
        return AttentionValueMoments(mean, cov, None, None)
    return AttentionValueMoments(mean, cov, a_cross, v_cross)
