r"""Scalar Gaussian special functions used by the closed forms.

* ``phi``/``Phi``: standard normal pdf and cdf.
* ``hermite(u, K)``: probabilists' Hermite polynomials ``He_0..He_K``.
* ``owens_t(h, a)``: Owen's T function
  :math:`T(h, a) = \frac{1}{2\pi}\int_0^a \frac{e^{-h^2(1+x^2)/2}}{1+x^2}\,dx`, by 48-point
  Gauss–Legendre quadrature (the integrand is analytic on the finite interval; for ``a <= 1``
  and any ``h`` the error is below 1e-15, checked against SciPy in the tests).
* ``bvn_equal(h, rho)``: :math:`\Phi_2(h, h; \rho) = \Phi(h) - 2T(h, \sqrt{(1-\rho)/(1+\rho)})`,
  the bivariate normal cdf at equal arguments, ``0 <= rho <= 1``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

SQRT_2PI = math.sqrt(2.0 * math.pi)


def phi(u: torch.Tensor) -> torch.Tensor:
    """Standard normal density."""
    return torch.exp(-0.5 * u * u) / SQRT_2PI


def Phi(u: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the math symbol)
    """Standard normal cdf."""
    return torch.special.ndtr(u)


def hermite(u: torch.Tensor, K: int) -> torch.Tensor:
    """``He_0(u) .. He_K(u)`` stacked on a new last dim: ``(..., K + 1)``."""
    hs = [torch.ones_like(u), u]
    for k in range(1, K):
        hs.append(u * hs[k] - k * hs[k - 1])
    return torch.stack(hs[: K + 1], dim=-1)


@torch.compiler.disable  # numpy and a cache: run as Python under torch.compile (a graph break, GELU only)
@functools.lru_cache(maxsize=8)
def _legendre(n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(n)
    # map [-1, 1] -> [0, 1]
    return (
        torch.as_tensor((x + 1.0) / 2.0, dtype=dtype, device=device),
        torch.as_tensor(w / 2.0, dtype=dtype, device=device),
    )


def owens_t(h: torch.Tensor, a: torch.Tensor, nodes: int = 48) -> torch.Tensor:
    """Owen's T function ``T(h, a)`` for ``0 <= a <= 1`` (elementwise, broadcasting)."""
    h, a = torch.broadcast_tensors(h, a)
    y, w = _legendre(nodes, h.dtype, str(h.device))
    x = a[..., None] * y  # (..., nodes)
    one_x2 = 1.0 + x * x
    f = torch.exp(-0.5 * (h * h)[..., None] * one_x2) / one_x2
    return a * (f * w).sum(-1) / (2.0 * math.pi)


def bvn_equal(h: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``P(X <= h, Y <= h)`` for standard bivariate normal (X, Y) with correlation ``0 <= rho <= 1``."""
    a = torch.sqrt(((1.0 - rho) / (1.0 + rho)).clamp_min(0.0))
    return Phi(h) - 2.0 * owens_t(h, a)
