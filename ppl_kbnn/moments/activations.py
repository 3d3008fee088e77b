r"""Elementwise activations of Gaussian inputs: ReLU, GELU (exact), sigmoid and tanh (probit).

For ``x ~ N(m, v)``, ``σ = √v``, each activation ``g`` gives

* the mean ``E[g(x)]`` and variance ``Var[g(x)]``;
* the input–output cross-covariance. For jointly Gaussian inputs Stein's lemma gives, exactly,
  ``Cov(x_i, g(x_j)) = Cov(x_i, x_j) E[g'(x_j)]``, so one number per element, ``E[g']``, carries
  every cross-covariance the backward pass needs (the "Theorem 1" of Wright et al. 2024);
* the off-diagonal output covariance by Wright et al.'s series (AISTATS 2024, Thm. 1)

  .. math:: \mathrm{Cov}(g(x_i), g(x_j)) = \sum_{k\ge 1} \frac{\rho_{ij}^k}{k!}\, a_{ik} a_{jk},
            \qquad a_k = \sigma^k\,\partial^k_m E[g(x)],

  truncated at ``series_order`` terms (an approximation, measured against Monte Carlo in
  the tests); the diagonal is always the exact variance.

Closed forms (``α = m/σ``; ``φ``, ``Φ`` standard normal pdf/cdf; ``He_k`` Hermite):

ReLU (exact):
    ``E = σ(αΦ(α) + φ(α))``, ``Var = v[(α²+1)Φ(α) + αφ(α) - (αΦ(α)+φ(α))²]``,
    ``E[g'] = Φ(α)``, ``a_k = σ(-1)^k He_{k-2}(α) φ(α)`` for ``k ≥ 2``.

GELU ``g(x) = xΦ(x)`` (exact), with ``c = √(1+v)``, ``u = m/c``:
    ``E = mΦ(u) + (v/c)φ(u)``, ``E[g'] = Φ(u) + uφ(u)/c²``,
    ``a_k = (σ/c)^{k-1} σ (-1)^k [He_{k-2}(u) - He_k(u)/c²] φ(u)``,
    ``E[g²]`` in closed form through the bivariate normal cdf (derivation in ``docs/moments/activations.md``).

Sigmoid (probit approximation, the one approximation here). With ``t = √(1 + λ²v)``, ``λ² = π/8``:
    ``E ≈ sig(m/t)`` (MacKay: ``sig ≈ Φ(λ·)``), ``E[g'] = ∂_m E ≈ sig'(m/t)/t``,
    ``a_k ≈ (σ/t)^k sig^{(k)}(m/t)`` (derivatives of that mean), ``Var ≈ Σ_{k≤4} a_k²/k!``.
    The variance is Wright's series of the probit mean, truncated at ``SIGMOID_SERIES_ORDER = 4``:
    exact as ``v → 0`` and consistent with the cross-covariance; KBNN's ``E(1-E)(1-1/t)`` (which is
    ``E(1-E) - ∂_m E`` for the same mean) is off by 20% at small ``v`` and by 10x in the tails (docs).

Tanh: ``tanh(x) = 2 sig(2x) - 1``, so every moment follows from the sigmoid's at ``(2m, 4v)``.

A zero input variance returns the deterministic activation exactly. For ``v < SERIES_VAR``
the GELU/sigmoid variance is taken from the series (no cancellation in ``E[g²] - E[g]²``;
at that size its truncation error is below round-off).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812

from ._checks import check_batch, check_same_dtype, check_tensor, check_variance, is_validating
from ._gauss import Phi, bvn_equal, hermite, phi
from .kinds import CovKind, as_kind, check_cov, cov_event_dims, flatten_joint, marginal_var, unflatten_joint

LAMBDA2 = math.pi / 8.0
"""Probit constant ``λ²`` of the approximation ``sig(x) ≈ Φ(λx)``."""
SERIES_VAR = 1e-3
"""Below this input variance the GELU/sigmoid/tanh variance uses the (then exact-to-round-off) series."""
SERIES_ORDER_VAR = 8
"""Terms of the series used for small-variance marginal variances."""
RHO_ZERO = 1e-20
"""Correlations below this magnitude are treated as 0 in Wright's series (their terms are below
double rounding); keeps powers ``ρ^k`` out of the slow subnormal range."""
SIGMOID_SERIES_ORDER = 4
"""Terms of the series of the probit sigmoid mean (variance and covariances); the series of an
analytic function with poles at ``±iπ`` is asymptotic, and 4 terms measured best (docs)."""


class _Elementwise(NamedTuple):
    mean: torch.Tensor  # E[g(x)]
    var: torch.Tensor  # Var[g(x)]
    dmean: torch.Tensor  # E[g'(x)] = d E[g] / d m
    coeffs: torch.Tensor  # (..., K): a_k = σ^k ∂^k E / ∂m^k, k = 1..K (K = 0: none, not computed)


def _no_coeffs(m: torch.Tensor) -> torch.Tensor:
    """The empty ``(..., 0)`` coefficients of ``K = 0``: callers that need no series skip computing it."""
    return m.new_empty(*m.shape, 0)


def _tensor_cache(make: Callable[..., Any]) -> Callable[..., Any]:
    """Cache the constant tensors ``make(*args)`` per ``args`` (made outside inference mode, so plain tensors); while
    ``torch.compile`` traces, build them in the graph instead (the cache and the mode switch are not traceable)."""
    cached = functools.lru_cache(maxsize=64)(lambda *args: _outside_inference_mode(make, *args))

    @functools.wraps(make)
    def get(*args: Any) -> Any:
        return make(*args) if torch.compiler.is_compiling() else cached(*args)

    return get


def _outside_inference_mode(make: Callable[..., Any], *args: Any) -> Any:
    with torch.inference_mode(False):  # plain tensors even if first made under inference mode
        return make(*args)


@_tensor_cache
def _series_constants(
    K: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k = 1..K``, ``k!`` (as ``exp(lgamma(k + 1))``) and ``1/√k!`` (as ``exp(-lgamma(k + 1)/2)``), made once
    per ``(K, dtype, device)``: the same values the series used to rebuild on every call."""
    k = torch.arange(1, K + 1, dtype=dtype, device=device)
    lg = torch.lgamma(k + 1)
    return k, torch.exp(lg), torch.exp(-0.5 * lg)


def _series_var(coeffs: torch.Tensor) -> torch.Tensor:
    _, fact, _ = _series_constants(coeffs.shape[-1], coeffs.dtype, coeffs.device)
    return (coeffs * coeffs / fact).sum(-1)


def _relu(m: torch.Tensor, v: torch.Tensor, K: int) -> _Elementwise:
    pos = v > 0
    vs = torch.where(pos, v, torch.ones_like(v))
    s = vs.sqrt()
    a = m / s
    Pa, Pna, pa = Phi(a), Phi(-a), phi(a)
    mean = s * (a * Pa + pa)
    # Var/v = (α²+1)Φ + αφ - (αΦ+φ)², written with Φ(-α) to avoid cancellation for large α
    h = a * a * Pa * Pna + Pa + a * pa * (Pna - Pa) - pa * pa
    var = vs * h.clamp_min(0.0)  # clamp: round-off only (reachable for α < -30)
    if K > 0:
        He = hermite(a, max(K - 2, 0))  # He_0 .. He_{K-2}
        ks = torch.arange(2, K + 1, device=m.device)
        sign = (1 - 2 * (ks % 2)).to(m.dtype)  # (-1)^k, made in the input dtype
        higher = (s * pa)[..., None] * sign * He[..., : K - 1]
        coeffs = torch.cat([(s * Pa)[..., None], higher], dim=-1)[..., :K]
        coeffs = torch.where(pos[..., None], coeffs, torch.zeros_like(coeffs))
    else:
        coeffs = _no_coeffs(m)
    z = torch.zeros_like(m)
    return _Elementwise(
        torch.where(pos, mean, F.relu(m)),
        torch.where(pos, var, z),
        torch.where(pos, Pa, (m > 0).to(m.dtype)),
        coeffs,
    )


def _gelu(m: torch.Tensor, v: torch.Tensor, K: int) -> _Elementwise:
    pos = v > 0
    vs = torch.where(pos, v, torch.ones_like(v))
    c2 = 1.0 + vs
    c = c2.sqrt()
    u = m / c
    Pu, pu = Phi(u), phi(u)
    mean = m * Pu + vs / c * pu
    dmean = Pu + u * pu / c2
    coeffs = _gelu_coeffs(m, vs, K) if K > 0 else None
    # E[x²Φ(x)²] in closed form (docs/moments/activations.md):
    rho = vs / c2
    Fq = bvn_equal(u, rho)  # P(Y1<=0, Y2<=0)
    p0 = pu / c  # density of Y1 at 0
    sq = torch.sqrt(1.0 + 2.0 * vs)
    r = m / (c * sq)
    P2 = Phi(r)  # P(Y2<=0 | Y1=0)
    q2 = phi(r) * c / sq  # density of Y2 | Y1=0 at 0
    Exh = m * Fq + 2.0 * vs * p0 * P2
    Ex2h = m * Exh + vs * Fq + 2.0 * vs * p0 * (m / c2 * P2 + vs / c2 * q2)
    var_closed = Ex2h - mean * mean
    small = _series_var(_gelu_coeffs(m, vs, SERIES_ORDER_VAR))
    var = torch.where(vs < SERIES_VAR, small, var_closed).clamp_min(0.0)
    z = torch.zeros_like(m)
    return _Elementwise(
        torch.where(pos, mean, F.gelu(m)),
        torch.where(pos, var, z),
        torch.where(pos, dmean, Phi(m) + m * phi(m)),
        _no_coeffs(m) if coeffs is None else torch.where(pos[..., None], coeffs, torch.zeros_like(coeffs)),
    )


def _gelu_coeffs(m: torch.Tensor, v: torch.Tensor, K: int) -> torch.Tensor:
    """``a_1 = σE[g']``; ``a_k = (σ/c)^{k-1} σ (-1)^k [He_{k-2}(u) - He_k(u)/c²] φ(u)`` for ``k >= 2``."""
    s = v.sqrt()
    c2 = 1.0 + v
    c = c2.sqrt()
    u = m / c
    pu = phi(u)
    He = hermite(u, K)
    ks = torch.arange(2, K + 1, device=m.device, dtype=m.dtype)
    sign = torch.where(ks.long() % 2 == 0, 1.0, -1.0).to(m.dtype)
    higher = (s / c)[..., None] ** (ks - 1) * s[..., None] * sign
    higher = higher * (He[..., : K - 1] - He[..., 2 : K + 1] / c2[..., None]) * pu[..., None]
    first = s * (Phi(u) + u * pu / c2)
    return torch.cat([first[..., None], higher], dim=-1)[..., :K]


def _sigmoid_polynomials(K: int) -> tuple[tuple[float, ...], ...]:
    """Coefficients (in powers of ``s``, degree ``k + 1``) of ``P_k``, ``sig^{(k)} = P_k(sig)``, ``k = 1..K`` (cached
    as tensors by :func:`_sigmoid_tables`)."""
    coeffs = [0.0, 1.0, -1.0]  # P_1(s) = s - s²
    out = []
    for _ in range(K):
        out.append(tuple(coeffs) + (0.0,) * (K + 2 - len(coeffs)))
        dc = [i * c for i, c in enumerate(coeffs)][1:]  # P'
        nxt = [0.0] * (len(dc) + 2)
        for i, c in enumerate(dc):  # P' (s - s²)
            nxt[i + 1] += c
            nxt[i + 2] -= c
        coeffs = nxt
    return tuple(out)


@_tensor_cache
def _sigmoid_tables(K: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The polynomial coefficients ``(K, K + 2)`` of :func:`_sigmoid_polynomials` and the powers ``0..K+1``,
    as tensors made once per ``(K, dtype, device)``."""
    return (torch.tensor(_sigmoid_polynomials(K), dtype=dtype, device=device),
            torch.arange(K + 2, dtype=dtype, device=device))  # fmt: skip


def _sigmoid_derivatives(s: torch.Tensor, K: int) -> torch.Tensor:
    """``sig^{(k)}`` for ``k = 1..K`` as polynomials in ``s = sig(x)``: ``P_{k+1}(s) = P_k'(s) s(1 - s)``."""
    C, pw = _sigmoid_tables(K, s.dtype, s.device)  # (K, K + 2), (K + 2,)
    powers = s[..., None] ** pw  # (..., K + 2)
    return powers @ C.mT


def _sigmoid(m: torch.Tensor, v: torch.Tensor, K: int) -> _Elementwise:
    t = torch.sqrt(1.0 + LAMBDA2 * v)
    mean = torch.sigmoid(m / t)  # MacKay's probit approximation of E[sig(x)]
    ks = _series_constants(SIGMOID_SERIES_ORDER, m.dtype, m.device)[0]  # 1..4
    # a_k = σ^k ∂^k_m sig(m/t) = (σ/t)^k sig^{(k)}(m/t), k = 1..4
    a = (v.sqrt() / t)[..., None] ** ks * _sigmoid_derivatives(mean, SIGMOID_SERIES_ORDER)
    coeffs = a[..., :K] if K <= SIGMOID_SERIES_ORDER else torch.cat([a, a.new_zeros(*a.shape[:-1], K - len(ks))], -1)
    return _Elementwise(mean, _series_var(a), mean * torch.sigmoid(-m / t) / t, coeffs)


def _tanh(m: torch.Tensor, v: torch.Tensor, K: int) -> _Elementwise:
    sg = _sigmoid(2.0 * m, 4.0 * v, K)
    pos = v > 0
    return _Elementwise(
        torch.where(pos, 2.0 * sg.mean - 1.0, torch.tanh(m)),
        4.0 * sg.var,
        torch.where(pos, 4.0 * sg.dmean, 1.0 - torch.tanh(m) ** 2),
        2.0 * sg.coeffs,
    )


def _identity(m: torch.Tensor, v: torch.Tensor, K: int) -> _Elementwise:
    coeffs = torch.zeros(*m.shape, K, dtype=m.dtype, device=m.device)
    if K > 0:
        coeffs[..., 0] = v.sqrt()
    return _Elementwise(m, v, torch.ones_like(m), coeffs)


ACTIVATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], _Elementwise]] = {
    "relu": _relu,
    "gelu": _gelu,
    "sigmoid": _sigmoid,
    "tanh": _tanh,
    "identity": _identity,
}
"""Supported activations by name: ``fn(m, v, K)`` gives the elementwise mean, variance, ``E[g']`` and the
first ``K`` series coefficients (``K = 0``: none, for callers that need the marginals only)."""


def _marginal(name: str, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if is_validating():
        check_tensor("mean", mean)
        check_variance("var", var)
        check_same_dtype(mean=mean, var=var)
        if mean.shape != var.shape:
            raise ValueError(f"mean and var must have the same shape, got {tuple(mean.shape)} and {tuple(var.shape)}")
    e = ACTIVATIONS[name](mean, var, 0)  # marginals only: no series coefficients
    return e.mean, e.var, var * e.dmean


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact ``(E[z], Var[z], Cov(x, z))`` of ``z = ReLU(x)``, ``x ~ N(mean, var)``, elementwise."""
    return _marginal("relu", mean, var)


def gelu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact ``(E[z], Var[z], Cov(x, z))`` of ``z = GELU(x) = xΦ(x)``, elementwise."""
    return _marginal("gelu", mean, var)


def sigmoid_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(E[z], Var[z], Cov(x, z))`` of ``z = sigmoid(x)`` under the probit approximation ``Φ(λx)``."""
    return _marginal("sigmoid", mean, var)


def tanh_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(E[z], Var[z], Cov(x, z))`` of ``z = tanh(x) = 2 sigmoid(2x) - 1`` (probit approximation)."""
    return _marginal("tanh", mean, var)


class ActivationMoments(NamedTuple):
    """Output of :func:`activation_moments`.

    Attributes:
        mean: ``(..., T, d)``.
        cov: output covariance in the input's kind.
        cross: ``Cov(x, g(x))`` in the input's kind layout (not symmetric for token/joint):
            ``Cov(x_i, g(x_j)) = P_ij E[g'(x_j)]``; ``None`` for token/joint with ``need_cross=False``.
        dmean: ``E[g'(x)]`` ``(..., T, d)``: the factor that carries any cross-covariance
            through the activation, ``Cov(y, g(x)) = Cov(y, x) diag(E[g'])`` for ``y`` jointly Gaussian with ``x``.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    cross: torch.Tensor | None
    dmean: torch.Tensor


def activation_moments(
    mean: torch.Tensor,
    cov: torch.Tensor,
    *,
    activation: str,
    kind: str | CovKind = "diag",
    series_order: int = 10,
    need_cross: bool = True,
) -> ActivationMoments:
    """Moments of an elementwise activation applied to a Gaussian sequence ``(..., T, d)``.

    The marginal moments are exact (sigmoid/tanh: exact for the probit surrogate); the
    off-diagonal output covariance (``token``/``joint`` kinds) is Wright's series truncated at
    ``series_order`` terms; the cross-covariance is exact (Stein's lemma). ``need_cross=False`` skips
    ``cross`` for the ``token``/``joint`` kinds (returned as ``None``; ``dmean`` carries it).
    """
    kind = as_kind(kind)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    if series_order < 1:
        raise ValueError(f"series_order must be >= 1, got {series_order}")
    if is_validating():
        check_tensor("mean", mean, min_dim=2)
        check_cov("cov", cov, kind, *mean.shape[-2:])
        check_same_dtype(mean=mean, cov=cov)
        check_batch(mean=(mean, 2), cov=(cov, cov_event_dims(kind)))
    v = marginal_var(cov, kind)
    # the diag kind needs no series coefficients (no off-diagonal covariance): none are computed
    e = ACTIVATIONS[activation](mean, v, 0 if kind is CovKind.DIAG else series_order)
    if kind is CovKind.DIAG:
        return ActivationMoments(e.mean, e.var, v * e.dmean, e.dmean)
    T, d = mean.shape[-2:]
    if kind is CovKind.TOKEN:
        P, a, sd, var, dm = cov, e.coeffs, v.sqrt(), e.var, e.dmean  # per token: (..., T, d, d)
    else:
        P = flatten_joint(cov)  # (..., Td, Td)
        flat = mean.shape[:-2] + (T * d,)
        a, sd = e.coeffs.reshape(*flat, -1), v.sqrt().reshape(flat)
        var, dm = e.var.reshape(flat), e.dmean.reshape(flat)
    denom = sd[..., :, None] * sd[..., None, :]
    pos = denom > 0
    rho = torch.where(pos, P / torch.where(pos, denom, torch.ones_like(denom)), torch.zeros_like(P))
    # |ρ| < RHO_ZERO contributes below double rounding to every term; zeroing it keeps the products
    # with ρ out of the subnormal range, where CPU arithmetic is ~100x slower.
    rho = torch.where(rho.abs() < RHO_ZERO, torch.zeros_like(rho), rho)
    # Σ_k ρ^k a_ik a_jk / k! by Horner's rule in ρ, with a_k / √k! scaled once on the small (..., n, K) tensor
    a = a * _series_constants(series_order, a.dtype, a.device)[2]  # a_k / √k!
    out = a[..., :, None, -1] * a[..., None, :, -1]
    for j in range(series_order - 2, -1, -1):  # a loop over series terms, not over neurons or tokens
        out = torch.addcmul(a[..., :, None, j] * a[..., None, :, j], rho, out)
    out = out * rho
    out.diagonal(dim1=-2, dim2=-1).copy_(var)  # the exact variances on the diagonal
    cross = P * dm[..., None, :] if need_cross else None
    if kind is CovKind.JOINT:
        out = unflatten_joint(out, T, d)
        cross = None if cross is None else unflatten_joint(cross, T, d)
    return ActivationMoments(e.mean, out, cross, e.dmean)
