r"""LayerNorm of a Gaussian sequence, per token: ``y = γ ⊙ (u - ū1)/√(v_u + ε) + β``.

LayerNorm has no closed-form Gaussian moments. Two named approximations:

``method="linearised"`` (default; first-order Taylor expansion at the mean ``m``):

.. math::
    E[y_i] \approx \mathrm{LN}(m)_i + \tfrac12\mathrm{tr}(H_i P)\ \text{(order 2; order 1 drops it)}, \\
    \mathrm{Cov}(y) \approx J P J^\top, \quad \mathrm{Cov}(u, y) \approx P J^\top, \\
    J = \frac{\mathrm{diag}(\gamma)}{\hat\sigma}\Big(I - \tfrac{1}{d}\mathbf{1}\mathbf{1}^\top
        - \tfrac{1}{d}\hat x \hat x^\top\Big), \quad
    \hat\sigma = \sqrt{\mathrm{var}(m) + \varepsilon}, \quad \hat x = (m - \bar m)/\hat\sigma .

``method="frozen"`` (frozen statistics): the normaliser is replaced by its expectation, so
LayerNorm becomes affine, ``J = diag(γ)(I - 11ᵀ/d)/σ̂`` with
``σ̂² = E[v_u] + ε = var(m) + tr(P)/d - 1ᵀP1/d² + ε``, and ``E[y] = γ ⊙ (m - m̄)/σ̂ + β``.

Both are exact when the input is deterministic. Their error against Monte Carlo is measured
in the tests and tabulated in ``docs/moments/layernorm.md``; the linearisation is the more
accurate of the two at the input variances a pre-LN transformer sees, the frozen form keeps
the variance shrinkage that the random normaliser induces at large variance.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812

from ._checks import check_batch, check_same_dtype, check_shape, check_tensor, is_validating
from .kinds import CovKind, as_kind, check_cov, cov_event_dims, token_blocks


class LayerNormMoments(NamedTuple):
    """Output of :func:`layernorm_moments`.

    Attributes:
        mean: ``(..., T, d)``.
        cov: output covariance in the input's kind.
        cross: ``Cov(u, y)``: ``(..., T, d, d)`` per token for ``diag``/``token``,
            ``(..., T, d, T, d)`` for ``joint``; ``None`` for ``diag`` with ``need_cross=False``.
        jac: the per-token Jacobian ``J`` ``(..., T, d, d)`` (carries cross-covariances: ``Cov(z, y) = Cov(z, u) Jᵀ``).
    """

    mean: torch.Tensor
    cov: torch.Tensor
    cross: torch.Tensor | None
    jac: torch.Tensor


def layernorm_moments(
    mean: torch.Tensor,
    cov: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    kind: str | CovKind = "diag",
    method: str = "linearised",
    order: int = 2,
    need_cross: bool = True,
) -> LayerNormMoments:
    """Approximate moments of LayerNorm over the last dim of a Gaussian sequence ``(..., T, d)``.

    Args:
        mean, cov: input moments (``cov`` in ``kind``'s layout).
        weight, bias: ``γ``, ``β`` of shape ``(d,)`` (deterministic); ``None`` means 1 and 0.
        eps: LayerNorm's ``ε``.
        kind: covariance layout of input and output.
        method: ``"linearised"`` (first-order Taylor at the mean) or ``"frozen"`` (expected statistics).
        order: ``"linearised"`` only: ``1`` gives ``E[y] ≈ LN(m)``; ``2`` (default) adds the
            second-order mean correction ``½ tr(H_i P)``. The covariance is first order either way.
        need_cross: ``False`` lets the ``diag`` kind skip ``Cov(u, y)`` (returned as ``None``; ``jac``
            carries it); the other kinds need it for the covariance and always return it.
    """
    kind = as_kind(kind)
    if method not in ("linearised", "frozen"):
        raise ValueError(f"unknown LayerNorm method {method!r}; expected 'linearised' or 'frozen'")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if is_validating():
        check_tensor("mean", mean, min_dim=2)
    T, d = mean.shape[-2:]
    if is_validating():
        check_cov("cov", cov, kind, T, d)
        check_batch(mean=(mean, 2), cov=(cov, cov_event_dims(kind)))
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None:
                check_tensor(name, p)
                check_shape(name, p, (d,))
                if p.dim() != 1:
                    raise ValueError(f"{name}: expected shape ({d},), got {tuple(p.shape)}")
        check_same_dtype(mean=mean, cov=cov, weight=weight, bias=bias)
    gamma = weight if weight is not None else mean.new_ones(d)
    beta = bias if bias is not None else mean.new_zeros(d)

    centred = mean - mean.mean(-1, keepdim=True)  # (..., T, d)
    var_m = (centred * centred).mean(-1, keepdim=True)  # (..., T, 1)
    eye = torch.eye(d, dtype=mean.dtype, device=mean.device)
    centring = eye - 1.0 / d  # I - 11ᵀ/d
    if method == "linearised":
        sigma = torch.sqrt(var_m + eps)
        xhat = centred / sigma
        jac = gamma[:, None] / sigma[..., None] * (centring - xhat[..., :, None] * xhat[..., None, :] / d)
    else:
        P = token_blocks(cov, kind)  # (..., T, d, d)
        trace = torch.diagonal(P, dim1=-2, dim2=-1).sum(-1, keepdim=True)
        total = P.sum((-2, -1))[..., None]
        sigma = torch.sqrt(var_m + trace / d - total / d**2 + eps)
        xhat = centred / sigma
        jac = gamma[:, None] / sigma[..., None] * centring  # (..., T, d, d)
    if method == "linearised":
        y_mean = F.layer_norm(mean, (d,), gamma, beta, eps)  # LN(m), as nn.LayerNorm
        if order == 2:
            diag = kind is CovKind.DIAG
            P = cov if diag else token_blocks(cov, kind)
            y_mean = y_mean + gamma * _second_order_correction(P, xhat, sigma, diag)
    else:
        y_mean = gamma * xhat + beta  # (..., T, d)

    if kind is CovKind.DIAG:
        y_cov = (jac * jac) @ cov[..., None]  # diag(J diag(v) Jᵀ): (..., T, d, 1)
        y_cov = y_cov[..., 0]
        cross = cov[..., :, None] * jac.mT if need_cross else None  # Cov(u_i, y_a) = v_i J_ai: (..., T, d, d)
    elif kind is CovKind.TOKEN:
        cross = cov @ jac.mT  # (..., T, d, d)
        y_cov = jac @ cross
    else:
        cross = torch.einsum("...tisj,...saj->...tisa", cov, jac)  # (..., T, d, T, d)
        y_cov = torch.einsum("...tbi,...tisa->...tbsa", jac, cross)
    return LayerNormMoments(y_mean, y_cov, cross, jac)


def _second_order_correction(P: torch.Tensor, xhat: torch.Tensor, sigma: torch.Tensor, diag: bool) -> torch.Tensor:
    r"""``½ tr(H_i P) / γ_i`` for the normalised ``x̂_i = c_i/σ̂`` (``c = (I - 11ᵀ/d) u``).

    With ``C = I - 11ᵀ/d`` and ``P̃ = C P C`` the covariance of ``c``:

    .. math:: \frac12 \mathrm{tr}(H_i P) = \frac{1}{\hat\sigma^2}\Big[-\frac{(\tilde P\hat x)_i}{d}
              - \frac{\hat x_i\,\mathrm{tr}\tilde P}{2d} + \frac{3\hat x_i\,\hat x^\top\tilde P\hat x}{2d^2}\Big]

    computed without forming ``P̃``: with ``z = C x̂``, ``P̃ x̂ = C (P z)``, ``x̂ᵀ P̃ x̂ = zᵀ P z`` and
    ``tr P̃ = tr P - 1ᵀ P 1 / d``. ``P``: per-token blocks ``(..., T, d, d)``, or the variances
    ``(..., T, d)`` when ``diag``.
    """
    d = xhat.shape[-1]
    z = xhat - xhat.mean(-1, keepdim=True)  # C x̂ (x̂ is centred up to round-off)
    if diag:
        Pz = P * z
        tr = P.sum(-1, keepdim=True) * (1.0 - 1.0 / d)
    else:
        Pz = (P @ z[..., None])[..., 0]
        tr = torch.diagonal(P, dim1=-2, dim2=-1).sum(-1, keepdim=True) - P.sum((-2, -1))[..., None] / d
    Px = Pz - Pz.mean(-1, keepdim=True)  # P̃ x̂ = C P z
    quad = (z * Pz).sum(-1, keepdim=True)  # x̂ᵀ P̃ x̂
    return (-Px / d - xhat * tr / (2 * d) + 1.5 * xhat * quad / d**2) / sigma**2
