r"""Linear map with random weights applied token-wise: ``y_t = W u_t + b``.

Row ``n`` of the augmented weight matrix ``w_n = [W_n, b_n]`` (shape ``p = d_in + 1``, the
bias last, as in KBNN) is Gaussian, ``w_n ~ N(mu_n, C_n)``, independent across rows and
independent of the input. The input ``u`` (deterministic or random) is augmented with a
constant 1: ``ū_t = [u_t; 1]`` with mean ``m̄_t`` and covariance ``P̄_ts`` (zero on the
bias entry). All moments below are **exact** (no approximation):

.. math::

    E[y_{tn}] &= \mu_n^\top \bar m_t \\
    \mathrm{Cov}(y_{tn}, y_{sk}) &= \mu_n^\top \bar P_{ts}\,\mu_k
        + \delta_{nk}\,\big(\bar m_t^\top C_n \bar m_s + \mathrm{tr}(C_n \bar P_{ts})\big) \\
    \mathrm{Cov}(u_t, y_{sn}) &= \bar P_{ts}\,\mu_n \qquad
    \mathrm{Cov}(w_n, y_{tn}) = C_n \bar m_t

The three terms of the covariance are KBNN's "A" (input uncertainty through the mean
weights), "B" (weight uncertainty) and "C" (interaction). Because every token uses the
same weights, ``B`` and ``C`` correlate *different* tokens (``t != s``) even when the
input tokens are independent: only the ``joint`` kind keeps those terms; ``diag`` and
``token`` drop them (see :mod:`ppl_kbnn.moments.kinds`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812

from ._checks import (
    check_batch,
    check_psd,
    check_same_dtype,
    check_shape,
    check_tensor,
    check_variance,
    is_validating,
)
from .kinds import CovKind, as_kind, check_cov, cov_event_dims


class LinearMoments(NamedTuple):
    """Output of :func:`linear_moments`.

    Attributes:
        mean: ``(..., T, d_out)``.
        cov: output covariance in the input's kind.
        cross: ``Cov(u, y)`` — ``(..., T, d_in, d_out)`` per token for ``diag``/``token``
            (tokens of a non-joint input are independent, so ``Cov(u_t, y_s) = 0`` for ``t != s``),
            ``(..., T, d_in, T, d_out)`` for ``joint``; ``None`` for a deterministic input (and for
            ``diag`` with ``need_cross=False``).
        w_cross: ``Cov(w_n, y_tn) = C_n m̄_t`` as ``(..., T, d_out, p)``; ``None`` for fixed weights (and
            for ``diag`` weights with ``need_cross=False``, kinds ``diag``/``token``).
            (``Cov(w_n, y_tk) = 0`` for ``k != n``: rows are independent.)
    """

    mean: torch.Tensor
    cov: torch.Tensor
    cross: torch.Tensor | None
    w_cross: torch.Tensor | None


def augment(u: torch.Tensor) -> torch.Tensor:
    """``[u; 1]`` along the last dim: ``(..., d) -> (..., d + 1)``."""
    if is_validating():
        check_tensor("u", u, min_dim=1)
    return F.pad(u, (0, 1), value=1.0)  # one op (was cat + new_ones), the same values


def _check_weights(w_mean: torch.Tensor, w_cov: torch.Tensor | None, w_kind: str, d_in: int) -> None:
    check_tensor("w_mean", w_mean, min_dim=2)
    if w_mean.dim() != 2:
        raise ValueError(f"w_mean: expected shape (d_out, p), got {tuple(w_mean.shape)}")
    n, p = w_mean.shape
    if p not in (d_in, d_in + 1):
        raise ValueError(f"w_mean: last dim must be d_in={d_in} (no bias) or d_in+1={d_in + 1} (bias last), got {p}")
    if w_cov is None:
        return
    if w_kind == "block":
        check_shape("w_cov", w_cov, (n, p, p))
        check_psd("w_cov", w_cov)
    elif w_kind == "diag":
        check_shape("w_cov", w_cov, (n, p))
        check_variance("w_cov", w_cov)
    else:
        raise ValueError(f"unknown w_kind {w_kind!r}; expected 'block' or 'diag'")
    if w_cov.dim() != (3 if w_kind == "block" else 2):
        raise ValueError(f"w_cov: unexpected leading dims for w_kind={w_kind!r}: {tuple(w_cov.shape)}")


def linear_moments(
    mean: torch.Tensor,
    cov: torch.Tensor | None,
    w_mean: torch.Tensor,
    w_cov: torch.Tensor | None = None,
    *,
    kind: str | CovKind = "diag",
    w_kind: str = "block",
    need_cross: bool = True,
) -> LinearMoments:
    """Moments of ``y_t = W u_t + b`` for Gaussian weight rows and a (random) input sequence.

    Args:
        mean: input mean ``(..., T, d_in)``.
        cov: input covariance in ``kind``'s layout, or ``None`` for a deterministic input.
        w_mean: augmented weight mean ``(d_out, p)``; ``p = d_in + 1`` means the last column is the bias.
        w_cov: per-row weight covariance, ``(d_out, p, p)`` for ``w_kind="block"`` (KBNN) or
            ``(d_out, p)`` for ``w_kind="diag"``; ``None`` for fixed weights.
        kind: covariance layout of input and output (``"diag"``, ``"token"``, ``"joint"``).
        w_kind: ``"block"`` or ``"diag"``.
        need_cross: ``False`` lets the ``diag`` kind skip ``Cov(u, y)``, and ``diag`` weights (kinds ``diag``,
            ``token``) skip ``Cov(w, y)``, when the caller does not use them (returned as ``None``);
            where the covariance needs them they are always returned.

    Returns:
        :class:`LinearMoments` (exact; see the module docstring for the equations).
    """
    kind = as_kind(kind)
    if w_kind not in ("block", "diag"):
        raise ValueError(f"unknown w_kind {w_kind!r}; expected 'block' or 'diag'")
    if is_validating():
        check_tensor("mean", mean, min_dim=2)
        _check_weights(w_mean, w_cov, w_kind, mean.shape[-1])
        if cov is not None:
            check_cov("cov", cov, kind, *mean.shape[-2:])
        check_same_dtype(mean=mean, cov=cov, w_mean=w_mean, w_cov=w_cov)
        check_batch(mean=(mean, 2), cov=(cov, cov_event_dims(kind)))
    T, d_in = mean.shape[-2:]
    n, p = w_mean.shape
    m_aug = augment(mean) if p == d_in + 1 else mean  # (..., T, p)
    W = w_mean[:, :d_in]  # (n, d_in): the part that multiplies the random input

    y_mean = F.linear(mean, W, w_mean[:, d_in] if p == d_in + 1 else None)  # (..., T, n), as nn.Linear

    # A: input uncertainty through the mean weights; cross = Cov(u, y)
    cross = None
    if cov is None:
        A = None
    elif kind is CovKind.DIAG:
        A = cov @ (W * W).T  # (..., T, n)
        if need_cross:
            cross = cov[..., :, :, None] * W.T  # (..., T, d_in, n)
    elif kind is CovKind.TOKEN:
        cross = cov @ W.T  # (..., T, d_in, n)
        A = W @ cross  # (..., T, n, n)
    else:
        cross = torch.einsum("...tisj,nj->...tisn", cov, W)  # (..., T, d_in, T, n)
        A = torch.einsum("ni,...tisk->...tnsk", W, cross)  # (..., T, n, T, n)

    # B (weight uncertainty) and C (interaction), both diagonal in the output neuron
    w_cross = None
    BC = None  # (..., T, n) for diag/token, (..., T, T, n) for joint
    if w_cov is not None:
        if w_kind == "diag" and kind is not CovKind.JOINT and not need_cross:
            BC = (m_aug * m_aug) @ w_cov.T  # Σ_i C_ni m̄_ti² without Cov(w, y): (..., T, n)
        else:
            if w_kind == "block":
                w_cross = torch.einsum("nij,...tj->...tni", w_cov, m_aug)  # C_n m̄_t: (..., T, n, p)
            else:
                w_cross = w_cov * m_aug[..., :, None, :]  # (..., T, n, p)
            if kind is CovKind.JOINT:
                BC = torch.einsum("...tni,...si->...tsn", w_cross, m_aug)  # (..., T, T, n)
            else:
                BC = (w_cross * m_aug[..., :, None, :]).sum(-1)  # (..., T, n)
        if cov is not None:
            Cww = w_cov[:, :d_in, :d_in] if w_kind == "block" else w_cov[:, :d_in]
            Cdiag = torch.diagonal(Cww, dim1=-2, dim2=-1) if w_kind == "block" else Cww  # (n, d_in)
            if kind is CovKind.DIAG:
                BC = BC + cov @ Cdiag.T
            elif kind is CovKind.TOKEN:
                if w_kind == "block":
                    BC = BC + torch.einsum("...tij,nij->...tn", cov, Cww)
                else:
                    BC = BC + torch.diagonal(cov, dim1=-2, dim2=-1) @ Cdiag.T
            else:
                if w_kind == "block":
                    BC = BC + torch.einsum("...tisj,nij->...tsn", cov, Cww)
                else:
                    BC = BC + torch.einsum("...tisi,ni->...tsn", cov, Cdiag)

    batch = y_mean.shape[:-2]
    zeros = {
        CovKind.DIAG: (T, n),
        CovKind.TOKEN: (T, n, n),
        CovKind.JOINT: (T, n, T, n),
    }[kind]
    if A is None and BC is not None:  # deterministic input: the covariance is BC alone (no zeros + BC)
        if kind is CovKind.DIAG:
            return LinearMoments(y_mean, BC, cross, w_cross)
        if kind is CovKind.TOKEN:
            return LinearMoments(y_mean, torch.diag_embed(BC), cross, w_cross)
    y_cov = A if A is not None else y_mean.new_zeros(*batch, *zeros)
    if BC is not None:
        if kind is CovKind.DIAG:
            y_cov = y_cov + BC
        elif kind is CovKind.TOKEN:
            y_cov = y_cov + torch.diag_embed(BC)
        else:
            eye = torch.eye(n, dtype=BC.dtype, device=BC.device)
            y_cov = y_cov + torch.einsum("...tsn,nk->...tnsk", BC, eye)
    return LinearMoments(y_mean, y_cov, cross, w_cross)
