r"""Residual sum ``x⁺ = x + g`` of two correlated Gaussian sequences (exact).

.. math::
    m_{x^+} = m_x + m_g, \qquad
    P_{x^+} = P_x + P_g + P_{xg} + P_{xg}^\top, \\
    \mathrm{Cov}(x, x^+) = P_x + P_{xg}, \qquad \mathrm{Cov}(g, x^+) = P_g + P_{xg}^\top .

``P_{xg} = Cov(x, g)`` comes from chaining the cross-covariances stored along the branch ``g(x)``
(each op returns the factor that carries it: ``Wᵀ`` for linear maps, ``diag(E[g'])`` for
activations, ``Jᵀ`` for LayerNorm and softmax). Dropping it (``cross=None``) is the usual
shortcut and biases the variance; it is allowed but must be asked for explicitly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_batch, check_same_dtype, check_shape, check_tensor, is_validating
from .kinds import CovKind, as_kind, check_cov, cov_event_dims


class ResidualMoments(NamedTuple):
    """Output of :func:`residual_moments`: ``mean``, ``cov`` (the kind's layout) and the
    cross-covariances ``cross_x = Cov(x, x⁺)``, ``cross_g = Cov(g, x⁺)`` in the same layout
    (``Cov(a_i, b_j)`` at index ``[..., i, j]``; elementwise for ``diag``)."""

    mean: torch.Tensor
    cov: torch.Tensor
    cross_x: torch.Tensor
    cross_g: torch.Tensor


def _transpose(c: torch.Tensor, kind: CovKind) -> torch.Tensor:
    if kind is CovKind.DIAG:
        return c
    if kind is CovKind.TOKEN:
        return c.mT
    return c.permute(*range(c.dim() - 4), -2, -1, -4, -3)


def residual_moments(
    mean_x: torch.Tensor,
    cov_x: torch.Tensor,
    mean_g: torch.Tensor,
    cov_g: torch.Tensor,
    cross_xg: torch.Tensor | None,
    *,
    kind: str | CovKind = "diag",
) -> ResidualMoments:
    """Moments of ``x + g`` given ``Cov(x, g)`` (``cross_xg``, same layout as the covariances;
    ``diag``: elementwise ``Cov(x_ti, g_ti)``). ``cross_xg=None`` means independent."""
    kind = as_kind(kind)
    if is_validating():
        check_tensor("mean_x", mean_x, min_dim=2)
        check_tensor("mean_g", mean_g, min_dim=2)
    T, d = mean_x.shape[-2:]
    if is_validating():
        check_shape("mean_g", mean_g, (T, d))
        check_cov("cov_x", cov_x, kind, T, d)
        check_cov("cov_g", cov_g, kind, T, d)
        if cross_xg is not None:
            check_tensor("cross_xg", cross_xg)
            check_shape("cross_xg", cross_xg, tuple(cov_x.shape[-(cov_x.dim() - mean_x.dim() + 2) :]))
        check_same_dtype(mean_x=mean_x, cov_x=cov_x, mean_g=mean_g, cov_g=cov_g, cross_xg=cross_xg)
        c = cov_event_dims(kind)
        check_batch(mean_x=(mean_x, 2), cov_x=(cov_x, c), mean_g=(mean_g, 2), cov_g=(cov_g, c), cross_xg=(cross_xg, c))
    if cross_xg is None:
        cross_xg = torch.zeros_like(cov_x)
    cross_gx = _transpose(cross_xg, kind)
    cov = cov_x + cov_g + cross_xg + cross_gx
    return ResidualMoments(mean_x + mean_g, cov, cov_x + cross_xg, cov_g + cross_gx)
