r"""Validation section ``ops``: every moment op of :mod:`ppl_kbnn.moments` against Monte Carlo.

Everything is float64 with fixed seeds derived from ``seed``. Two tables.

**(a) Exact ops.** Each op with each covariance kind it supports, on small random problems
(``T = 3`` tokens, ``d = 4`` features): linear maps with random weights (``w_kind`` block/diag ×
kind diag/token/joint), the ReLU/GELU marginals (mean, variance, ``Cov(x, g(x))`` on the grid
``m ∈ {-2, -0.5, 0, 0.5, 2}``, ``v ∈ {0.01, 0.3, 1.69}``), the scores ``q·k/√d`` (token kind with
and without ``q``–``k`` correlation, joint kind), attention × values (diag/token/joint, ``A ⊥ V``
as the formula assumes), residual sums (diag/token/joint) and the activation cross-covariance
``Cov(x, g(x))`` of ReLU/GELU in the token kind. For every compared quantity (mean, covariance,
each cross-covariance) the table gives ``max |z|``, the largest distance between closed form and
Monte Carlo in Monte-Carlo standard errors (:mod:`ppl_kbnn.mc`), and the number of entries
compared. A row passes when every ``max |z| < 4.5`` (:data:`Z_MAX`). Activation rows use
``atol = 1/N`` in the z-scores: events rarer than one sample in ``N`` cannot be resolved.

**(b) Approximate ops**, errors against Monte Carlo over input variance scales
:data:`SCALES`, each next to the Monte-Carlo standard error where that is meaningful:

* sigmoid and tanh (probit): over :data:`PROBIT_M` at ``v = scale``: max abs mean error, min/max
  variance ratio closed/MC, max relative error of ``Cov(x, g(x))``; for the record also the
  variance ratio range of KBNN's rule ``E(1 - E)(1 - 1/t)`` for the sigmoid. These 1-d expectations
  use importance sampling from the wider ``N(m, 4v)`` with stratified draws
  (:func:`_stratified_normal`) in :data:`PROBIT_REPLICATES` independent replicates (standard errors
  from their spread), self-normalised: under plain sampling the variance of a saturated tanh
  (``m = 3``) is carried by rare tail draws (5% relative noise at 5e4 samples), which would make
  the ``[0.7, 1.5]`` check a coin toss near the measured ratio 1.44;
* the off-diagonal activation covariance by the truncated Wright series (ReLU, GELU, tanh,
  ``series_order`` ∈ :data:`SERIES_ORDERS`) on a 6-dim Gaussian, mean ``N(0, I)``, covariance
  ``scale·(AAᵀ/6 + 0.05 I)``: max abs error of the off-diagonal entries over the largest
  variance. The Monte-Carlo covariance uses the first two Hermite terms as control variates (below);
* LayerNorm (linearised order 1 and 2, frozen statistics), ``T = 3`` tokens of ``d = 8``, mean
  ``2·N(0, I)``, ``γ = 1 + 0.3·N``, ``β = 0.1·N``, covariance ``scale·(AAᵀ/d + 0.05 I)``: max mean
  error in units of the MC output std, relative Frobenius error of the covariance (max over tokens);
* the first-order softmax cross-covariance ``Cov(S, a)``, ``n = 6``, ``S ~ N(μ, scale·AAᵀ/n)``:
  relative Frobenius error;
* scores → softmax (``T = 5`` tokens, ``d = 8``, independent per-token ``q``, ``k`` with mean
  ``N(0, I)`` and covariance ``scale·(0.8 I + 0.2 AAᵀ/d)``): the Taylor softmax fed with the
  within-row score covariance of :func:`~ppl_kbnn.moments.score_moments` vs with its diagonal only
  (what dropping the shared-query covariance costs): softmax covariance relative error both ways.

Control variates (unbiased; they only remove noise): the Wright-series comparison estimates
``Cov(g_i, g_j)`` from the products ``ĝ_i ĝ_j − (L_i L_j − E[L_i L_j])`` with the first two Hermite
terms ``L_i = a_i1 He_1(u_i) + a_i2 He_2(u_i)/2`` of ``g`` (``u_i = (x_i − μ_i)/σ_i``). By Hermite
orthogonality ``E[L_i L_j] = a_i1 a_j1 ρ_ij + a_i2 a_j2 ρ_ij²/2`` exactly, whatever the coefficients, so
the estimator is unbiased; with the true coefficients (``a_1 = σE[g']``, ``a_2 = σ²E[g'']``) it cancels
the linear and quadratic parts of ``g`` and leaves the noise of the rest. The LayerNorm mean uses
``y − J(u − m)`` with the linearisation's Jacobian ``J``.

Checks (the documented envelopes, also asserted by the unit tests): (1) every exact row has
``max |z| < 4.5``; (2) sigmoid max abs mean error ≤ 0.015 and (3) tanh ≤ 0.03 for ``v ≤ 1``;
(4) sigmoid/tanh variance ratio in ``[0.7, 1.5]``; (5) LayerNorm linearised order 2 at scales ≤ 0.03:
mean error ≤ 0.02 output std and covariance relative error ≤ 0.1; (6) Wright series order 10:
off-diagonal error ≤ 2e-3 of the largest variance for ReLU and GELU at every scale, counting the
error beyond 4 MC standard errors (as the unit test does; the raw error and the standard error
are both tabulated).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from tqdm import tqdm

from ..mc import MCCheck, mc_cov, mc_mean, mc_var, sample_gaussian, sample_sequence
from ..moments import (
    ACTIVATIONS,
    activation_moments,
    attention_value_moments,
    augment,
    gelu_moments,
    layernorm_moments,
    linear_moments,
    relu_moments,
    residual_moments,
    score_moments,
    sigmoid_moments,
    softmax_moments,
    tanh_moments,
)
from ..moments.activations import LAMBDA2
from ..moments.kinds import flatten_joint
from ._md import checks_md

FULL_SAMPLES = 400_000
QUICK_SAMPLES = 100_000
DTYPE = torch.float64

# (a) exact ops
Z_MAX = 4.5  # pass: max |z| < Z_MAX for every compared quantity
T_EX, D_EX, D_OUT = 3, 4, 3  # tokens, features, linear output features
GRID_M: tuple[float, ...] = (-2.0, -0.5, 0.0, 0.5, 2.0)
GRID_V: tuple[float, ...] = (0.01, 0.3, 1.69)

# (b) approximate ops
SCALES: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
PROBIT_M: tuple[float, ...] = (-3.0, -1.5, -0.5, 0.0, 0.7, 2.0, 3.0)
PROBIT_REPLICATES = 10  # independent stratified replicates (standard errors from their spread)
PROBIT_IS_WIDTH = 2.0  # importance sampling from N(m, c²v), c = this
SERIES_ORDERS: tuple[int, ...] = (1, 4, 10)
SERIES_ACTS: tuple[str, ...] = ("relu", "gelu", "tanh")
SERIES_DIM = 6
LN_T, LN_D = 3, 8
LN_METHODS: tuple[tuple[str, str, int], ...] = (
    ("linearised order 1", "linearised", 1),
    ("linearised order 2", "linearised", 2),
    ("frozen", "frozen", 2),
)
SOFTMAX_N = 6
SS_T, SS_D = 5, 8  # scores -> softmax: tokens, features

# checks
PROBIT_V_MAX = 1.0  # checks (2), (3) apply at v <= this
SIGMOID_MEAN_TOL = 0.015
TANH_MEAN_TOL = 0.03
VAR_RATIO_RANGE = (0.7, 1.5)
LN_SCALE_MAX = 0.03  # the envelope depends on input variance relative to the token spread (min 1.19 here)
LN_MEAN_TOL = 0.02
LN_COV_TOL = 0.1
SERIES_TOL = 2e-3
SERIES_Z = 4.0  # the series error counted in check (6) is the error beyond this many MC stderrs
SERIES_CHECK_ORDER = 10

BLOCK_ELEMS = 12_000_000  # memory bound of one block of Monte-Carlo products (float64 elements)

ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


# ---------------------------------------------------------------------------------------------
# helpers


def _generator(seed: int, *key: str | int | float) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a key (strings by CRC32, floats in millionths)."""
    ints = [int(seed)]
    for k in key:
        if isinstance(k, str):
            ints.append(zlib.crc32(k.encode()))
        elif isinstance(k, float):
            ints.append(round(k * 1_000_000))
        else:
            ints.append(int(k))
    state = int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state)


def _random_psd(n: int, gen: torch.Generator, scale: float = 1.0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """``scale · (A Aᵀ / n + 0.05 I)`` ``(*batch, n, n)``, ``A`` standard normal."""
    A = torch.randn(*batch, n, n, generator=gen, dtype=DTYPE)
    return scale * (A @ A.mT / n + 0.05 * torch.eye(n, dtype=DTYPE))


def _cov_check(x: torch.Tensor, y: torch.Tensor, closed: torch.Tensor, atol: float = 1e-12) -> MCCheck:
    """:func:`ppl_kbnn.mc.mc_cov` over blocks of ``y``'s last dim (same numbers, bounded memory).

    ``x`` ``(N, ..., a)``, ``y`` ``(N, ..., b)``, ``closed`` ``(..., a, b)``. ``mc_cov`` centres each
    column by its own sample mean, so splitting the columns of ``y`` changes nothing.
    """
    per_col = x[0].numel() * x.shape[0]
    step = max(1, BLOCK_ELEMS // max(per_col, 1))
    b = y.shape[-1]
    if step >= b:
        return mc_cov(x, y, closed, atol)
    parts = [mc_cov(x, y[..., j : j + step], closed[..., j : j + step], atol) for j in range(0, b, step)]
    return MCCheck(*(torch.cat([getattr(p, f) for p in parts], dim=-1) for f in MCCheck._fields))


def _sample_cov(x: torch.Tensor, y: torch.Tensor | None = None) -> MCCheck:
    """Sample ``Cov(x, y)`` ``(..., a, b)`` with its standard errors (``z`` against 0)."""
    y = x if y is None else y
    return _cov_check(x, y, torch.zeros(*x.shape[1:], y.shape[-1], dtype=x.dtype))


def _fro(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm over the last two dims."""
    return torch.linalg.matrix_norm(x)


def _metric(name: str, chk: MCCheck) -> dict[str, Any]:
    return {"name": name, "max_z": chk.max_z, "n": int(chk.z.numel())}


# ---------------------------------------------------------------------------------------------
# (a) exact ops: each case returns the list of {name, max_z, n}


def _case_linear(kind: str, w_kind: str, N: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """``y_t = W ū_t`` with Gaussian rows of ``W`` (bias last) and a Gaussian input sequence."""
    T, d, n = T_EX, D_EX, D_OUT
    p = d + 1
    mean = torch.randn(T, d, generator=gen, dtype=DTYPE)  # (T, d)
    if kind == "diag":
        cov = 0.3 * torch.rand(T, d, generator=gen, dtype=DTYPE)  # (T, d)
    elif kind == "token":
        cov = _random_psd(d, gen, 0.3, batch=(T,))  # (T, d, d)
    else:
        cov = _random_psd(T * d, gen, 0.3).reshape(T, d, T, d)
    w_mean = torch.randn(n, p, generator=gen, dtype=DTYPE)  # (n, p)
    if w_kind == "block":
        w_cov = _random_psd(p, gen, 0.2, batch=(n,))  # (n, p, p)
    else:
        w_cov = 0.2 * torch.rand(n, p, generator=gen, dtype=DTYPE)  # (n, p)
    out = linear_moments(mean, cov, w_mean, w_cov, kind=kind, w_kind=w_kind)

    u = sample_sequence(mean, cov, kind, N, gen)  # (N, T, d)
    if w_kind == "block":
        W = sample_gaussian(w_mean, w_cov, N, gen)  # (N, n, p)
    else:
        W = w_mean + w_cov.sqrt() * torch.randn(N, n, p, generator=gen, dtype=DTYPE)
    y = torch.einsum("Ntp,Nnp->Ntn", augment(u), W)  # (N, T, n)

    res = [_metric("mean", mc_mean(y, out.mean))]
    if kind == "diag":
        res.append(_metric("cov", mc_var(y, out.cov)))
        res.append(_metric("Cov(u,y)", _cov_check(u, y, out.cross)))  # per token (T, d, n)
    elif kind == "token":
        res.append(_metric("cov", _cov_check(y, y, out.cov)))
        res.append(_metric("Cov(u,y)", _cov_check(u, y, out.cross)))
    else:
        yf, uf = y.reshape(N, T * n), u.reshape(N, T * d)
        res.append(_metric("cov", _cov_check(yf, yf, flatten_joint(out.cov))))
        res.append(_metric("Cov(u,y)", _cov_check(uf, yf, out.cross.reshape(T * d, T * n))))
    assert out.w_cross is not None
    Wx = W[:, None].expand(N, T, n, p)  # (N, T, n, p): Cov(w_n, y_tn) per (t, n)
    res.append(_metric("Cov(w,y)", _cov_check(Wx, y[..., None], out.w_cross[..., None])))
    return res


def _case_marginal(act: str, N: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """ReLU/GELU mean, variance and ``Cov(x, g(x))`` on the ``GRID_M × GRID_V`` grid."""
    m, v = torch.meshgrid(torch.tensor(GRID_M, dtype=DTYPE), torch.tensor(GRID_V, dtype=DTYPE), indexing="ij")
    m, v = m.reshape(-1), v.reshape(-1)  # (G,)
    mean, var, cross = (relu_moments if act == "relu" else gelu_moments)(m, v)
    x = m + v.sqrt() * torch.randn(N, m.numel(), generator=gen, dtype=DTYPE)  # (N, G)
    z = ACT_FNS[act](x)
    atol = 1.0 / N
    return [
        _metric("mean", mc_mean(z, mean, atol=atol)),
        _metric("var", mc_var(z, var, atol=atol)),
        _metric("Cov(x,g)", mc_cov(x[..., None], z[..., None], cross[..., None, None], atol=atol)),
    ]


def _case_activation_token(act: str, N: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """Token kind: exact mean, variance (the diagonal of the covariance) and full ``Cov(x_i, g(x_j))``."""
    mean = torch.randn(T_EX, D_EX, generator=gen, dtype=DTYPE)
    cov = _random_psd(D_EX, gen, 1.0, batch=(T_EX,))  # (T, d, d)
    out = activation_moments(mean, cov, activation=act, kind="token")
    x = sample_sequence(mean, cov, "token", N, gen)  # (N, T, d)
    z = ACT_FNS[act](x)
    atol = 1.0 / N
    return [
        _metric("mean", mc_mean(z, out.mean, atol=atol)),
        _metric("var", mc_var(z, torch.diagonal(out.cov, dim1=-2, dim2=-1), atol=atol)),
        _metric("Cov(x,g)", _cov_check(x, z, out.cross, atol=atol)),
    ]


def _case_scores(variant: str, N: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """``S = q kᵀ/√d``: token kind (``q``–``k`` correlated within a token or not) or joint kind."""
    T, d = T_EX, D_EX
    mq, mk = torch.randn(T, d, generator=gen, dtype=DTYPE), torch.randn(T, d, generator=gen, dtype=DTYPE)
    if variant == "joint":
        Z = _random_psd(2 * T * d, gen, 0.2)  # joint over (q_1..q_T, k_1..k_T)
        Pq = Z[: T * d, : T * d].reshape(T, d, T, d)
        Pk = Z[T * d :, T * d :].reshape(T, d, T, d)
        X = Z[: T * d, T * d :].reshape(T, d, T, d)
        out = score_moments(mq, Pq, mk, Pk, qk_cov=X, kind="joint")
        z = sample_gaussian(torch.cat([mq.reshape(-1), mk.reshape(-1)]), Z, N, gen)  # (N, 2Td)
        q, k = z[:, : T * d].reshape(N, T, d), z[:, T * d :].reshape(N, T, d)
        S = (q @ k.mT / d**0.5).reshape(N, T * T)
        return [
            _metric("mean", mc_mean(S, out.mean.reshape(-1))),
            _metric("cov", _cov_check(S, S, out.cov.reshape(T * T, T * T))),
            _metric("Cov(q,S)", _cov_check(q.reshape(N, -1), S, out.q_cross.reshape(T * d, T * T))),
            _metric("Cov(k,S)", _cov_check(k.reshape(N, -1), S, out.k_cross.reshape(T * d, T * T))),
        ]
    correlated = variant == "q-k correlated"
    Z = _random_psd(2 * d, gen, 0.3, batch=(T,))  # per token (q_t, k_t): (T, 2d, 2d)
    Pq, Pk, X = Z[:, :d, :d], Z[:, d:, d:], Z[:, :d, d:]
    if not correlated:
        X = torch.zeros_like(X)
        Z = torch.cat([torch.cat([Pq, X], -1), torch.cat([X.mT, Pk], -1)], -2)
    out = score_moments(mq, Pq, mk, Pk, qk_cov=X if correlated else None, kind="token")
    z = sample_gaussian(torch.cat([mq, mk], -1), Z, N, gen)  # (N, T, 2d)
    q, k = z[..., :d], z[..., d:]
    S = q @ k.mT / d**0.5  # (N, T, T)
    return [
        _metric("mean", mc_mean(S, out.mean)),
        _metric("cov (within row)", _cov_check(S, S, out.cov)),
        _metric("Cov(q,S)", _cov_check(q[:, :, None, :].expand(N, T, T, d), S[..., None], out.q_cross[..., None])),
        _metric("Cov(k,S)", _cov_check(k[:, None, :, :].expand(N, T, T, d), S[..., None], out.k_cross[..., None])),
    ]


def _case_attention_values(kind: str, N: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """``o_t = Σ_s a_ts v_s`` with Gaussian ``A`` (rows independent unless joint) independent of ``V``."""
    T = T_EX
    S, dv = (3, 2) if kind == "joint" else (4, 3)
    a_mean = torch.softmax(torch.randn(T, S, generator=gen, dtype=DTYPE), -1)  # (T, S)
    v_mean = torch.randn(S, dv, generator=gen, dtype=DTYPE)  # (S, dv)
    if kind == "joint":
        a_cov = _random_psd(T * S, gen, 0.01).reshape(T, S, T, S)
        v_cov = _random_psd(S * dv, gen, 0.3).reshape(S, dv, S, dv)
        out = attention_value_moments(a_mean, a_cov, v_mean, v_cov, kind="joint")
        A = sample_gaussian(a_mean.reshape(-1), a_cov.reshape(T * S, T * S), N, gen).reshape(N, T, S)
        V = sample_gaussian(v_mean.reshape(-1), v_cov.reshape(S * dv, S * dv), N, gen).reshape(N, S, dv)
        o = (A @ V).reshape(N, T * dv)
        return [
            _metric("mean", mc_mean(o, out.mean.reshape(-1))),
            _metric("cov", _cov_check(o, o, out.cov.reshape(T * dv, T * dv))),
            _metric("Cov(a,o)", _cov_check(A.reshape(N, -1), o, out.a_cross.reshape(T * S, T * dv))),
            _metric("Cov(v,o)", _cov_check(V.reshape(N, -1), o, out.v_cross.reshape(S * dv, T * dv))),
        ]
    a_cov = _random_psd(S, gen, 0.01, batch=(T,))  # (T, S, S) within-row
    v_cov = _random_psd(dv, gen, 0.3, batch=(S,))  # (S, dv, dv)
    if kind == "diag":
        v_cov = torch.diagonal(v_cov, dim1=-2, dim2=-1)  # (S, dv)
    out = attention_value_moments(a_mean, a_cov, v_mean, v_cov, kind=kind)
    A = sample_gaussian(a_mean, a_cov, N, gen)  # (N, T, S)
    if kind == "diag":
        V = v_mean + torch.randn(N, S, dv, generator=gen, dtype=DTYPE) * v_cov.sqrt()
    else:
        V = v_mean + sample_gaussian(torch.zeros(S, dv, dtype=DTYPE), v_cov, N, gen)
    o = A @ V  # (N, T, dv)
    a_chk = _cov_check(A[..., None], o[:, :, None, :], out.a_cross[..., None, :])  # Cov(a_ts, o_t): (T, S, 1, dv)
    if kind == "token":
        cov_chk = _cov_check(o, o, out.cov)
        Vx, ox = V[:, None].expand(N, T, S, dv), o[:, :, None].expand(N, T, S, dv)
        v_chk = _cov_check(Vx, ox, out.v_cross)  # (T, S, dv, dv)
    else:
        cov_chk = mc_var(o, out.cov)
        v_chk = _cov_check(V[:, None, :, :, None], o[:, :, None, :, None], out.v_cross[..., None, None])
    return [
        _metric("mean", mc_mean(o, out.mean)),
        _metric("cov", cov_chk),
        _metric("Cov(a,o)", a_chk),
        _metric("Cov(v,o)", v_chk),
    ]


def residual_problem(kind: str, N: int, gen: torch.Generator, T: int = T_EX, d: int = D_EX) -> tuple[torch.Tensor, ...]:
    """``N`` draws of ``(x, g)`` ``(N, T, d)``, jointly Gaussian with the cross-covariance ``kind`` keeps,
    and their moments ``(m_x, m_g, P_x, P_g, P_xg)`` in that kind's layout (shared with the unit tests)."""
    mx, mg = torch.randn(T, d, generator=gen, dtype=DTYPE), torch.randn(T, d, generator=gen, dtype=DTYPE)
    if kind == "joint":
        Z = _random_psd(2 * T * d, gen, 0.5)
        z = sample_gaussian(torch.cat([mx.reshape(-1), mg.reshape(-1)]), Z, N, gen)
        x, g = z[:, : T * d].reshape(N, T, d), z[:, T * d :].reshape(N, T, d)
        B = Z.reshape(2, T, d, 2, T, d)
        Px, Pg, Pxg = B[0, :, :, 0], B[1, :, :, 1], B[0, :, :, 1]
    elif kind == "token":
        Z = _random_psd(2 * d, gen, 0.5, batch=(T,))  # per token (x_t, g_t)
        z = sample_gaussian(torch.cat([mx, mg], -1), Z, N, gen)
        x, g = z[..., :d], z[..., d:]
        Px, Pg, Pxg = Z[:, :d, :d], Z[:, d:, d:], Z[:, :d, d:]
    else:
        vx = 0.5 * torch.rand(T, d, generator=gen, dtype=DTYPE) + 0.1
        vg = 0.5 * torch.rand(T, d, generator=gen, dtype=DTYPE) + 0.1
        rho = 1.8 * torch.rand(T, d, generator=gen, dtype=DTYPE) - 0.9
        e1 = torch.randn(N, T, d, generator=gen, dtype=DTYPE)
        e2 = torch.randn(N, T, d, generator=gen, dtype=DTYPE)
        x = mx + vx.sqrt() * e1
        g = mg + vg.sqrt() * (rho * e1 + (1 - rho**2).sqrt() * e2)
        Px, Pg, Pxg = vx, vg, rho * (vx * vg).sqrt()
    return x, g, mx, mg, Px, Pg, Pxg


def _case_residual(kind: str, N: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """``x + g`` for ``(x, g)`` jointly Gaussian with the cross-covariance the kind keeps."""
    x, g, mx, mg, Px, Pg, Pxg = residual_problem(kind, N, gen)
    T, d = T_EX, D_EX
    out = residual_moments(mx, Px, mg, Pg, Pxg, kind=kind)
    s = x + g  # (N, T, d)
    res = [_metric("mean", mc_mean(s, out.mean))]
    if kind == "diag":  # elementwise layout
        s, x, g = s[..., None], x[..., None], g[..., None]
        closed = [c[..., None, None] for c in (out.cov, out.cross_x, out.cross_g)]
    elif kind == "token":
        closed = [out.cov, out.cross_x, out.cross_g]
    else:
        s, x, g = s.reshape(N, -1), x.reshape(N, -1), g.reshape(N, -1)
        closed = [c.reshape(T * d, T * d) for c in (out.cov, out.cross_x, out.cross_g)]
    res.append(_metric("cov", _cov_check(s, s, closed[0])))
    res.append(_metric("Cov(x,x+g)", _cov_check(x, s, closed[1])))
    res.append(_metric("Cov(g,x+g)", _cov_check(g, s, closed[2])))
    return res


ExactCase = tuple[str, str, str, Callable[[int, torch.Generator], list[dict[str, Any]]]]


def _exact_cases() -> list[ExactCase]:
    """``(op, kind, variant, run(N, gen))`` for every exact op and kind."""
    cases: list[ExactCase] = []
    for w_kind in ("block", "diag"):
        for kind in ("diag", "token", "joint"):
            cases.append(("linear", kind, f"w_kind={w_kind}", lambda N, g, k=kind, w=w_kind: _case_linear(k, w, N, g)))
    for act in ("relu", "gelu"):
        cases.append((act, "marginal", "m×v grid", lambda N, g, a=act: _case_marginal(a, N, g)))
    for act in ("relu", "gelu"):
        cases.append((act, "token", "Cov(x, g(x))", lambda N, g, a=act: _case_activation_token(a, N, g)))
    for variant, kind in (("q, k independent", "token"), ("q-k correlated", "token"), ("q-k correlated", "joint")):
        cases.append(
            (
                "scores",
                kind,
                variant,
                lambda N, g, v=variant, k=kind: _case_scores("joint" if k == "joint" else v, N, g),
            )
        )
    for kind in ("diag", "token", "joint"):
        cases.append(("attention × values", kind, "A ⊥ V", lambda N, g, k=kind: _case_attention_values(k, N, g)))
    for kind in ("diag", "token", "joint"):
        cases.append(("residual", kind, "correlated x, g", lambda N, g, k=kind: _case_residual(k, N, g)))
    return cases


# ---------------------------------------------------------------------------------------------
# (b) approximate ops


def _stratified_normal(R: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``R`` independent stratified samples of ``n`` standard normals per column: ``(R, n, k)``.

    Draw ``i`` of a replicate is ``Φ⁻¹((i + U_i)/n)``, ``U_i`` uniform: one draw per equal-probability
    stratum. Each replicate's average of ``f(ε)`` is unbiased for ``E[f(ε)]``, with far less noise than
    plain sampling for the smooth 1-d integrands of the probit table; the spread of the ``R``
    replicate estimates gives the standard error.
    """
    U = torch.rand(R, n, k, generator=gen, dtype=DTYPE).clamp_min(1e-300)
    u = (torch.arange(n, dtype=DTYPE)[None, :, None] + U) / n
    return torch.special.ndtri(u.clamp(max=1.0 - 1e-16))


def _replicates(est: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over the leading replicate dim."""
    return est.mean(0), est.std(0) / est.shape[0] ** 0.5


def _probit_rows(act: str, v: float, N: int, gen: torch.Generator) -> dict[str, Any]:
    """Sigmoid/tanh probit moments over ``PROBIT_M`` at input variance ``v`` (stratified Monte Carlo)."""
    m = torch.tensor(PROBIT_M, dtype=DTYPE)  # (M,)
    vv = torch.full_like(m, v)
    mean, var, cross = (sigmoid_moments if act == "sigmoid" else tanh_moments)(m, vv)
    R, c = PROBIT_REPLICATES, PROBIT_IS_WIDTH
    n = max(N // R, 2)
    eta = _stratified_normal(R, n, m.numel(), gen)  # (R, n, M)
    w = c * torch.exp(-0.5 * (c * c - 1.0) * eta * eta)  # N(m, v) / N(m, c²v) density ratio
    xt = c * math.sqrt(v) * eta  # x - m, drawn from N(0, c²v)
    z = ACT_FNS[act](m + xt)
    W = w.mean(1)  # (R, M), self-normalisation
    zbar = (w * z).mean(1) / W  # (R, M)
    zc = z - zbar[:, None, :]
    mc_m, se_m = _replicates(zbar)  # (M,)
    mc_v, se_v = _replicates((w * zc * zc).mean(1) / W)
    mc_c, se_c = _replicates((w * xt * zc).mean(1) / W)  # Cov(x, g) with the known E[x] = m
    ratio = var / mc_v
    row: dict[str, Any] = {
        "activation": act,
        "v": v,
        "mean_max_abs_err": float((mean - mc_m).abs().max()),
        "mean_mc_stderr": float(se_m.max()),
        "var_ratio_min": float(ratio.min()),
        "var_ratio_max": float(ratio.max()),
        "var_mc_rel_stderr": float((se_v / mc_v).max()),
        "cross_max_rel_err": float(((cross - mc_c).abs() / mc_c.abs()).max()),
        "cross_mc_rel_stderr": float((se_c / mc_c.abs()).max()),
    }
    if act == "sigmoid":
        t = torch.sqrt(1.0 + LAMBDA2 * vv)
        E = torch.sigmoid(m / t)
        kbnn = E * (1.0 - E) * (1.0 - 1.0 / t) / mc_v
        row["kbnn_var_ratio_min"] = float(kbnn.min())
        row["kbnn_var_ratio_max"] = float(kbnn.max())
    return row


def _series_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``N(0, I)`` ``(k,)`` and unscaled covariance ``AAᵀ/k + 0.05 I`` ``(k, k)``, shared by all scales."""
    gen = _generator(seed, "series", "problem")
    mean = torch.randn(SERIES_DIM, generator=gen, dtype=DTYPE)
    return mean, _random_psd(SERIES_DIM, gen, 1.0)


def _series_rows(seed: int, scale: float, N: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """Off-diagonal activation covariance by the truncated series vs (control-variate) Monte Carlo."""
    mean, base = _series_problem(seed)
    cov = scale * base  # (k, k)
    k = SERIES_DIM
    x = sample_gaussian(mean, cov, N, gen)  # (N, k)
    sd = cov.diagonal().sqrt()  # (k,)
    rho = cov / torch.outer(sd, sd)  # (k, k)
    u = (x - mean) / sd  # (N, k) standardised with the true moments
    He = torch.stack([u, u * u - 1.0], dim=-1)  # He_1, He_2: (N, k, 2)
    off = ~torch.eye(k, dtype=torch.bool)
    rows = []
    for act in SERIES_ACTS:
        z = ACT_FNS[act](x)  # (N, k)
        zc = z - z.mean(0)
        outs = {
            K: activation_moments(mean[None], cov[None], activation=act, kind="token", series_order=K)
            for K in SERIES_ORDERS
        }
        # control variate L_i = a_i1 He_1(u_i) + a_i2/2 He_2(u_i), E[L_i L_j] = a_i1 a_j1 ρ + a_i2 a_j2 ρ²/2
        a = ACTIVATIONS[act](mean, cov.diagonal(), 2).coeffs  # (k, 2)
        L = He[..., 0] * a[:, 0] + 0.5 * He[..., 1] * a[:, 1]  # (N, k)
        EL = torch.outer(a[:, 0], a[:, 0]) * rho + 0.5 * torch.outer(a[:, 1], a[:, 1]) * rho * rho  # (k, k)
        prods = zc[:, :, None] * zc[:, None, :] * (N / (N - 1)) - (L[:, :, None] * L[:, None, :] - EL)  # (N, k, k)
        est = prods.mean(0)
        se = prods.std(0) / N**0.5
        plain_se = (zc[:, :, None] * zc[:, None, :]).std(0) / N**0.5
        vmax = float(torch.diagonal(est).max())
        for K in SERIES_ORDERS:
            closed = outs[K].cov[0]  # (k, k)
            err = (closed - est).abs()[off]
            rows.append(
                {
                    "activation": act,
                    "scale": scale,
                    "order": K,
                    "offdiag_max_rel_err": float(err.max()) / vmax,
                    "offdiag_excess_rel_err": float((err - SERIES_Z * se[off]).clamp_min(0.0).max()) / vmax,
                    "mc_rel_stderr": float(se[off].max()) / vmax,
                    "mc_rel_stderr_plain": float(plain_se[off].max()) / vmax,
                    "max_abs_corr": float((cov / torch.outer(cov.diag(), cov.diag()).sqrt())[off].abs().max()),
                }
            )
    return rows


def _ln_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ``2·N(0, I)`` ``(T, d)``, unscaled per-token covariance ``(T, d, d)``, ``γ``, ``β`` ``(d,)``."""
    gen = _generator(seed, "layernorm", "problem")
    mean = 2.0 * torch.randn(LN_T, LN_D, generator=gen, dtype=DTYPE)
    base = _random_psd(LN_D, gen, 1.0, batch=(LN_T,))
    gamma = 1.0 + 0.3 * torch.randn(LN_D, generator=gen, dtype=DTYPE)
    beta = 0.1 * torch.randn(LN_D, generator=gen, dtype=DTYPE)
    return mean, base, gamma, beta


def _layernorm_rows(seed: int, scale: float, N: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """LayerNorm approximations vs Monte Carlo at one covariance scale."""
    mean, base, gamma, beta = _ln_problem(seed)
    cov = scale * base  # (T, d, d)
    u = sample_sequence(mean, cov, "token", N, gen)  # (N, T, d)
    y = F.layer_norm(u, (LN_D,), gamma, beta, 1e-5)  # (N, T, d)
    C = _sample_cov(y)  # (T, d, d)
    sd = torch.diagonal(C.estimate, dim1=-2, dim2=-1).sqrt()  # (T, d)
    c_norm = _fro(C.estimate)  # (T,)
    jac = layernorm_moments(mean, cov, gamma, beta, kind="token").jac  # (T, d, d)
    ycv = y - torch.einsum("tij,Ntj->Nti", jac, u - mean)  # control variate: same mean as y
    spread = mean.std(-1, unbiased=False)  # (T,) token spread std(m_t)
    rows = []
    for label, method, order in LN_METHODS:
        out = layernorm_moments(mean, cov, gamma, beta, kind="token", method=method, order=order)
        cm = mc_mean(ycv, out.mean)
        err = (out.mean - cm.estimate).abs() / sd  # (T, d)
        rel = _fro(out.cov - C.estimate) / c_norm  # (T,)
        rows.append(
            {
                "method": label,
                "scale": scale,
                "mean_max_err_std": float(err.max()),
                "mean_worst_token_spread": float(spread[err.amax(-1).argmax()]),
                "mean_mc_stderr_std": float((cm.stderr / sd).max()),
                "mean_mc_stderr_std_plain": float(N**-0.5),
                "cov_rel_fro_err": float(rel.max()),
                "cov_worst_token_spread": float(spread[rel.argmax()]),
                "cov_mc_rel_stderr": float((_fro(C.stderr) / c_norm).max()),
            }
        )
    return rows


def _softmax_cross_row(seed: int, scale: float, N: int, gen: torch.Generator) -> dict[str, Any]:
    """First-order ``Cov(S, a) ≈ P J`` of the softmax vs Monte Carlo."""
    pg = _generator(seed, "softmax_cross", "problem")
    mu = torch.randn(SOFTMAX_N, generator=pg, dtype=DTYPE)
    A = torch.randn(SOFTMAX_N, SOFTMAX_N, generator=pg, dtype=DTYPE)
    cov = scale * A @ A.mT / SOFTMAX_N  # (n, n)
    _, _, cross = softmax_moments(mu, cov, return_cross=True)
    S = sample_gaussian(mu, cov, N, gen)  # (N, n)
    chk = mc_cov(S, torch.softmax(S, -1), cross)
    norm = float(_fro(chk.estimate))
    return {
        "scale": scale,
        "cross_rel_fro_err": float(_fro(cross - chk.estimate)) / norm,
        "mc_rel_stderr": float(_fro(chk.stderr)) / norm,
    }


def _scores_softmax_row(seed: int, scale: float, N: int, gen: torch.Generator) -> dict[str, Any]:
    """Taylor softmax of Gaussian-moment scores: within-row score covariance vs its diagonal only."""
    T, d = SS_T, SS_D
    pg = _generator(seed, "scores_softmax", "problem")
    mq = torch.randn(T, d, generator=pg, dtype=DTYPE)
    mk = torch.randn(T, d, generator=pg, dtype=DTYPE)
    eye = torch.eye(d, dtype=DTYPE)
    Aq, Ak = (torch.randn(T, d, d, generator=pg, dtype=DTYPE) for _ in range(2))
    Pq = scale * (0.8 * eye + 0.2 * Aq @ Aq.mT / d)  # (T, d, d)
    Pk = scale * (0.8 * eye + 0.2 * Ak @ Ak.mT / d)
    sc = score_moments(mq, Pq, mk, Pk, kind="token")  # mean (T, S), within-row cov (T, S, S)
    diag_cov = torch.diag_embed(torch.diagonal(sc.cov, dim1=-2, dim2=-1))
    a_full, c_full = softmax_moments(sc.mean, sc.cov, order=2)
    a_diag, c_diag = softmax_moments(sc.mean, diag_cov, order=2)

    q = sample_sequence(mq, Pq, "token", N, gen)  # (N, T, d)
    k = sample_sequence(mk, Pk, "token", N, gen)
    a = torch.softmax(q @ k.mT / d**0.5, -1)  # (N, T, S)
    cm = mc_mean(a, a_full)
    C = _sample_cov(a)  # (T, S, S)
    norm = _fro(C.estimate)  # (T,)
    off = sc.cov - diag_cov
    return {
        "scale": scale,
        "score_offdiag_share": float((_fro(off) / _fro(sc.cov)).max()),
        "cov_rel_err_within_row": float((_fro(c_full - C.estimate) / norm).max()),
        "cov_rel_err_diag_only": float((_fro(c_diag - C.estimate) / norm).max()),
        "cov_mc_rel_stderr": float((_fro(C.stderr) / norm).max()),
        "mean_max_abs_err_within_row": float((a_full - cm.estimate).abs().max()),
        "mean_max_abs_err_diag_only": float((a_diag - cm.estimate).abs().max()),
        "mean_mc_stderr": float(cm.stderr.max()),
    }


# ---------------------------------------------------------------------------------------------
# checks, markdown, figure


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks (1)-(6) of the module docstring."""
    checks = []
    rows = result["exact"]["rows"]
    worst = max(rows, key=lambda r: r["max_z"])
    failed = [f"{r['op']}/{r['kind']}/{r['variant']}" for r in rows if not r["passed"]]
    checks.append(
        _check(
            "exact_ops_max_z",
            not failed,
            f"max |z| over {len(rows)} exact rows ({sum(m['n'] for r in rows for m in r['metrics'])} entries) = "
            f"{worst['max_z']:.2f} (at {worst['op']}/{worst['kind']}/{worst['variant']}; need < {Z_MAX:g})"
            + (f"; failing rows: {', '.join(failed)}" if failed else ""),
        )
    )
    for act, tol in (("sigmoid", SIGMOID_MEAN_TOL), ("tanh", TANH_MEAN_TOL)):
        pr = [r for r in result["probit"] if r["activation"] == act and r["v"] <= PROBIT_V_MAX]
        w = max(pr, key=lambda r: r["mean_max_abs_err"])
        checks.append(
            _check(
                f"{act}_mean_err",
                all(r["mean_max_abs_err"] <= tol for r in pr),
                f"max |E_closed − E_mc| over m ∈ {list(PROBIT_M)}, v ≤ {PROBIT_V_MAX:g} = {w['mean_max_abs_err']:.3g} "
                f"(at v={w['v']:g}; MC stderr {w['mean_mc_stderr']:.1e}; need ≤ {tol:g})",
            )
        )
    pr = result["probit"]
    lo, hi = min(r["var_ratio_min"] for r in pr), max(r["var_ratio_max"] for r in pr)
    checks.append(
        _check(
            "probit_var_ratio",
            VAR_RATIO_RANGE[0] <= lo and hi <= VAR_RATIO_RANGE[1],
            f"sigmoid/tanh Var_closed/Var_mc over the grid in [{lo:.3f}, {hi:.3f}] "
            f"(need within [{VAR_RATIO_RANGE[0]:g}, {VAR_RATIO_RANGE[1]:g}])",
        )
    )
    ln = [r for r in result["layernorm"] if r["method"] == "linearised order 2" and r["scale"] <= LN_SCALE_MAX]
    wm = max(ln, key=lambda r: r["mean_max_err_std"])
    wc = max(ln, key=lambda r: r["cov_rel_fro_err"])
    checks.append(
        _check(
            "layernorm_order2_envelope",
            all(r["mean_max_err_std"] <= LN_MEAN_TOL and r["cov_rel_fro_err"] <= LN_COV_TOL for r in ln),
            f"linearised order 2 at scale ≤ {LN_SCALE_MAX:g}: max mean error {wm['mean_max_err_std']:.3g} output std "
            f"(at scale {wm['scale']:g}; need ≤ {LN_MEAN_TOL:g}), max cov relative Frobenius error "
            f"{wc['cov_rel_fro_err']:.3g} (at scale {wc['scale']:g}; need ≤ {LN_COV_TOL:g})",
        )
    )
    sr = [r for r in result["series"] if r["order"] == SERIES_CHECK_ORDER and r["activation"] in ("relu", "gelu")]
    ws = max(sr, key=lambda r: r["offdiag_excess_rel_err"])
    wr = max(sr, key=lambda r: r["offdiag_max_rel_err"])
    checks.append(
        _check(
            "series_order10_offdiag",
            all(r["offdiag_excess_rel_err"] <= SERIES_TOL for r in sr),
            f"ReLU/GELU, series order {SERIES_CHECK_ORDER}, every scale: max off-diagonal error beyond "
            f"{SERIES_Z:g} MC stderr = {ws['offdiag_excess_rel_err']:.2e} of the largest variance "
            f"(at {ws['activation']}, scale {ws['scale']:g}; need ≤ {SERIES_TOL:g}); raw max error "
            f"{wr['offdiag_max_rel_err']:.2e} (at {wr['activation']}, scale {wr['scale']:g}, MC stderr "
            f"{wr['mc_rel_stderr']:.1e})",
        )
    )
    return checks


def _f(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def _markdown(result: dict[str, Any], command: str) -> str:
    """Both tables, the checks and the figure as markdown."""
    cfg = result["config"]
    N = cfg["samples"]
    lines = [
        "## Moment ops vs Monte Carlo",
        "",
        f"Command: `{command}`",
        "",
        f"{N:,} Monte-Carlo samples per case, seed {cfg['seed']}, {cfg['dtype']}.",
        "",
        "### (a) Exact ops",
        "",
        f"max \\|z\\| = largest |closed − MC| in MC standard errors over the compared entries (n); pass when every "
        f"max \\|z\\| < {Z_MAX:g}. Shapes: T = {T_EX} tokens, d = {D_EX} features. Activation rows use atol = 1/N "
        "(events rarer than 1/N are not resolvable). ReLU/GELU marginals on m ∈ "
        f"{list(GRID_M)} × v ∈ {list(GRID_V)}.",
        "",
        "| op | kind | variant | mean \\|z\\| (n) | cov \\|z\\| (n) | cross-covariances \\|z\\| (n) "
        "| max \\|z\\| | pass |",
        "|---|---|---|---:|---:|---|---:|:---:|",
    ]
    for r in result["exact"]["rows"]:
        ms = {m["name"]: m for m in r["metrics"]}
        mean = ms["mean"]
        cov = next(m for m in r["metrics"] if m["name"] in ("cov", "var", "cov (within row)"))
        crosses = [m for m in r["metrics"] if m["name"].startswith("Cov(")]
        cross_txt = "; ".join(f"{m['name']} {m['max_z']:.2f} ({m['n']})" for m in crosses)
        cov_label = "" if cov["name"] == "cov" else f"{cov['name']}: "
        lines.append(
            f"| {r['op']} | {r['kind']} | {r['variant']} | {mean['max_z']:.2f} ({mean['n']}) "
            f"| {cov_label}{cov['max_z']:.2f} ({cov['n']}) | {cross_txt} | {r['max_z']:.2f} "
            f"| {'yes' if r['passed'] else '**no**'} |"
        )
    lines += [
        "",
        "### (b) Approximate ops",
        "",
        f"#### Sigmoid and tanh (probit), m ∈ {list(PROBIT_M)}, input variance v",
        "",
        "Mean error = max_m |E_closed − E_mc|; variance ratio = Var_closed / Var_mc (min, max over m); cross error = "
        "max_m |Cov_closed(x, g) − Cov_mc| / |Cov_mc|; KBNN = the ratio range of `E(1 − E)(1 − 1/t)` (not used). "
        f"Monte Carlo by importance sampling from N(m, {PROBIT_IS_WIDTH**2:g}v), stratified (one draw per "
        f"equal-probability stratum), self-normalised, in {PROBIT_REPLICATES} independent replicates of "
        f"N/{PROBIT_REPLICATES} draws; ± = standard error from the replicates (relative for ratios).",
        "",
        "| activation | v | mean abs err | ± | var ratio min | var ratio max | ± (rel) | Cov(x,g) rel err | ± (rel) "
        "| KBNN var ratio min | KBNN var ratio max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["probit"]:
        lines.append(
            f"| {r['activation']} | {r['v']:g} | {r['mean_max_abs_err']:.2e} | {r['mean_mc_stderr']:.1e} "
            f"| {r['var_ratio_min']:.3f} | {r['var_ratio_max']:.3f} | {r['var_mc_rel_stderr']:.1e} "
            f"| {r['cross_max_rel_err']:.3f} | {r['cross_mc_rel_stderr']:.1e} "
            f"| {_f(r.get('kbnn_var_ratio_min'), '.3f')} | {_f(r.get('kbnn_var_ratio_max'), '.3f')} |"
        )
    lines += [
        "",
        "#### Off-diagonal activation covariance: truncated Wright series",
        "",
        f"x ~ N(μ, scale·(AAᵀ/{SERIES_DIM} + 0.05 I)), μ ~ N(0, I), {SERIES_DIM} dims (one μ, A for all scales). "
        "Error = max off-diagonal |Cov_closed − Cov_mc| / max variance; beyond 4σ = the same after subtracting 4 MC "
        "standard errors per entry (check (6)); ± = MC standard error with the Hermite control variate "
        "(plain MC in brackets). For tanh the series of the probit sigmoid is used (4 terms at most, so orders "
        "4 and 10 coincide) and the error includes the probit approximation.",
        "",
        "| activation | scale | max \\|ρ\\| | order | off-diag rel err | beyond 4σ | ± (plain) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["series"]:
        lines.append(
            f"| {r['activation']} | {r['scale']:g} | {r['max_abs_corr']:.2f} | {r['order']} "
            f"| {r['offdiag_max_rel_err']:.2e} | {r['offdiag_excess_rel_err']:.2e} "
            f"| {r['mc_rel_stderr']:.1e} ({r['mc_rel_stderr_plain']:.1e}) |"
        )
    lines += [
        "",
        "#### LayerNorm",
        "",
        f"T = {LN_T} tokens of d = {LN_D}, mean 2·N(0, I), γ = 1 + 0.3·N, β = 0.1·N, covariance "
        "scale·(AAᵀ/d + 0.05 I) (one problem for all scales; token spreads std(m_t) = "
        f"{', '.join(f'{x:.2f}' for x in cfg['layernorm_token_spread'])}). "
        "Mean error = max |E_closed − E_mc| / sd_mc (MC mean with the linearisation as control variate; "
        "± in the same units, plain MC in brackets); worst token spread = std(m_t) of the token with the largest "
        "error; covariance error = max over tokens of ‖Cov_closed − Cov_mc‖_F / ‖Cov_mc‖_F "
        "(± = ‖stderr‖_F / ‖Cov_mc‖_F).",
        "",
        "| method | scale | mean err (output std) | ± (plain) | worst token spread | cov rel Fro err | ± "
        "| worst token spread |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["layernorm"]:
        lines.append(
            f"| {r['method']} | {r['scale']:g} | {r['mean_max_err_std']:.2e} "
            f"| {r['mean_mc_stderr_std']:.1e} ({r['mean_mc_stderr_std_plain']:.1e}) "
            f"| {r['mean_worst_token_spread']:.2f} | {r['cov_rel_fro_err']:.3e} | {r['cov_mc_rel_stderr']:.1e} "
            f"| {r['cov_worst_token_spread']:.2f} |"
        )
    lines += [
        "",
        "#### Softmax cross-covariance Cov(S, a) (first order, P J)",
        "",
        f"S ~ N(μ, scale·AAᵀ/n), n = {SOFTMAX_N}, μ ~ N(0, I). Error = ‖Cov_closed − Cov_mc‖_F / ‖Cov_mc‖_F.",
        "",
        "| scale | rel Fro err | ± |",
        "|---:|---:|---:|",
    ]
    for r in result["softmax_cross"]:
        lines.append(f"| {r['scale']:g} | {r['cross_rel_fro_err']:.3e} | {r['mc_rel_stderr']:.1e} |")
    lines += [
        "",
        "#### Scores → softmax: within-row score covariance vs its diagonal only",
        "",
        f"T = {SS_T} tokens, d = {SS_D}; q, k independent per-token Gaussians, means N(0, I), covariances "
        "scale·(0.8 I + 0.2 AAᵀ/d); scores from `score_moments` (token kind), then the order-2 Taylor softmax "
        "with the within-row score covariance or with its diagonal only. Off-diag share = max over rows of "
        "‖offdiag(P_S)‖_F / ‖P_S‖_F (what the diagonal shortcut drops). Errors: max over rows of the softmax "
        "covariance relative Frobenius error; max abs error of the mean.",
        "",
        "| scale | off-diag share | cov err within-row | cov err diag only | ± | mean err within-row "
        "| mean err diag only | ± |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["scores_softmax"]:
        lines.append(
            f"| {r['scale']:g} | {r['score_offdiag_share']:.3f} | {r['cov_rel_err_within_row']:.3e} "
            f"| {r['cov_rel_err_diag_only']:.3e} | {r['cov_mc_rel_stderr']:.1e} "
            f"| {r['mean_max_abs_err_within_row']:.2e} | {r['mean_max_abs_err_diag_only']:.2e} "
            f"| {r['mean_mc_stderr']:.1e} |"
        )
    lines += ["", "Checks:", ""]
    lines += checks_md(result["checks"])
    lines.append("")
    if result.get("figure"):
        lines += [f"![ops]({result['figure']})", ""]
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    """Three log-log panels: probit errors vs v; LayerNorm/softmax errors vs scale; series error vs scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.8))
    FigureCanvasAgg(fig)
    ax0, ax1, ax2 = fig.subplots(1, 3)
    tiny = 1e-300

    for i, act in enumerate(("sigmoid", "tanh")):
        rows = [r for r in result["probit"] if r["activation"] == act]
        v = [r["v"] for r in rows]
        c = f"C{i}"
        ax0.plot(v, [max(r["mean_max_abs_err"], tiny) for r in rows], "-o", color=c, label=f"{act}: mean abs err")
        ax0.plot(v, [r["mean_mc_stderr"] for r in rows], ":", color=c, label=f"{act}: MC stderr (mean)")
        dev = [max(abs(r["var_ratio_min"] - 1), abs(r["var_ratio_max"] - 1)) for r in rows]
        ax0.plot(v, dev, "--s", color=c, label=f"{act}: max |var ratio − 1|")
        ax0.plot(v, [r["cross_max_rel_err"] for r in rows], "-.^", color=c, label=f"{act}: Cov(x,g) rel err")
        if act == "sigmoid":
            kb = [max(abs(r["kbnn_var_ratio_min"] - 1), abs(r["kbnn_var_ratio_max"] - 1)) for r in rows]
            ax0.plot(v, kb, "--x", color="C3", label="sigmoid: KBNN max |var ratio − 1|")
    ax0.set(xscale="log", yscale="log", xlabel="input variance v", ylabel="error")
    ax0.set_title("sigmoid / tanh (probit)")
    ax0.legend(fontsize=6.5)

    scales = list(SCALES)
    for i, (label, _, _) in enumerate(LN_METHODS):
        rows = [r for r in result["layernorm"] if r["method"] == label]
        ax1.plot(
            scales,
            [max(r["mean_max_err_std"], tiny) for r in rows],
            "-o",
            color=f"C{i}",
            label=f"LN {label}: mean (std)",
        )
        ax1.plot(scales, [r["cov_rel_fro_err"] for r in rows], "--s", color=f"C{i}", label=f"LN {label}: cov")
    sc = result["softmax_cross"]
    ax1.plot(scales, [r["cross_rel_fro_err"] for r in sc], "-^", color="C3", label="softmax Cov(S, a)")
    ss = result["scores_softmax"]
    ax1.plot(
        scales, [r["cov_rel_err_within_row"] for r in ss], "-D", color="C4", label="scores→softmax cov, within-row"
    )
    ax1.plot(scales, [r["cov_rel_err_diag_only"] for r in ss], "--D", color="C5", label="scores→softmax cov, diag only")
    ln2 = [r for r in result["layernorm"] if r["method"] == "linearised order 2"]
    ax1.plot(scales, [r["mean_mc_stderr_std"] for r in ln2], ":", color="grey", label="LN MC stderr (mean, std)")
    ax1.set(xscale="log", yscale="log", xlabel="input covariance scale", ylabel="relative error")
    ax1.set_title("LayerNorm, softmax")
    ax1.legend(fontsize=6.5)

    styles = {1: "-o", 4: "--s", 10: "-.^"}
    for i, act in enumerate(SERIES_ACTS):
        for K in SERIES_ORDERS:
            rows = [r for r in result["series"] if r["activation"] == act and r["order"] == K]
            ax2.plot(
                scales,
                [max(r["offdiag_max_rel_err"], tiny) for r in rows],
                styles[K],
                color=f"C{i}",
                label=f"{act}, K={K}",
            )
        rows = [r for r in result["series"] if r["activation"] == act and r["order"] == SERIES_ORDERS[-1]]
        ax2.plot(scales, [r["mc_rel_stderr"] for r in rows], ":", color=f"C{i}", label=f"{act}: MC stderr")
    ax2.axhline(SERIES_TOL, color="grey", lw=0.8, ls="--", label=f"check: {SERIES_TOL:g}")
    ax2.set(xscale="log", yscale="log", xlabel="input covariance scale", ylabel="max off-diag error / max variance")
    ax2.set_title("Wright series truncation (order K)")
    ax2.legend(fontsize=6.5, ncol=2)
    for ax in (ax0, ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------
# section


def ops_section(
    *,
    quick: bool,
    seed: int,
    out_dir: Path,
    progress: bool = True,
    command: str | None = None,
    samples: int | None = None,
) -> dict[str, Any]:
    """Compare every moment op with Monte Carlo; write ``ops.json``, ``ops.md``, ``ops.png``.

    Args:
        quick: :data:`QUICK_SAMPLES` (1e5) Monte-Carlo samples per case instead of :data:`FULL_SAMPLES` (4e5).
        seed: base seed; every case's problem and draws are seeded from ``(seed, case name[, scale])``.
        out_dir: output folder (created if missing).
        progress: tqdm progress bar on stderr.
        command: command line recorded in ``ops.md`` (default: from ``sys.argv``).
        samples: override the number of Monte-Carlo samples.

    Returns:
        The dict written to ``ops.json``: ``exact`` (threshold and rows), ``probit``, ``series``,
        ``layernorm``, ``softmax_cross``, ``scores_softmax`` (rows of table (b)), ``config``,
        ``checks`` (list of ``{name, passed, detail}``) and ``figure``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    N = int(samples if samples is not None else (QUICK_SAMPLES if quick else FULL_SAMPLES))
    if N < 2:
        raise ValueError(f"samples must be >= 2, got {N}")
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])

    t0 = time.perf_counter()
    exact_rows: list[dict[str, Any]] = []
    probit: list[dict[str, Any]] = []
    series: list[dict[str, Any]] = []
    layernorm: list[dict[str, Any]] = []
    softmax_cross: list[dict[str, Any]] = []
    scores_softmax: list[dict[str, Any]] = []

    tasks: list[tuple[str, Callable[[], None]]] = []
    for op, kind, variant, run in _exact_cases():

        def exact(op: str = op, kind: str = kind, variant: str = variant, run: Callable = run) -> None:
            metrics = run(N, _generator(seed, "exact", op, kind, variant))
            max_z = max(m["max_z"] for m in metrics)
            exact_rows.append(
                {
                    "op": op,
                    "kind": kind,
                    "variant": variant,
                    "metrics": metrics,
                    "max_z": max_z,
                    "atol": 1.0 / N if op in ("relu", "gelu") else 1e-12,
                    "passed": bool(max_z < Z_MAX),
                }
            )

        tasks.append((f"{op}/{kind}", exact))
    for act in ("sigmoid", "tanh"):
        for v in SCALES:
            tasks.append(
                (
                    f"{act} v={v:g}",
                    lambda a=act, v=v: probit.append(_probit_rows(a, v, N, _generator(seed, "probit", a, v))),
                )
            )
    for s in SCALES:
        tasks.append(
            (f"series {s:g}", lambda s=s: series.extend(_series_rows(seed, s, N, _generator(seed, "series", s))))
        )
        tasks.append(
            (f"LN {s:g}", lambda s=s: layernorm.extend(_layernorm_rows(seed, s, N, _generator(seed, "layernorm", s))))
        )
        tasks.append(
            (
                f"softmax cross {s:g}",
                lambda s=s: softmax_cross.append(_softmax_cross_row(seed, s, N, _generator(seed, "softmax_cross", s))),
            )
        )
        tasks.append(
            (
                f"scores→softmax {s:g}",
                lambda s=s: scores_softmax.append(
                    _scores_softmax_row(seed, s, N, _generator(seed, "scores_softmax", s))
                ),
            )
        )
    for _, task in tqdm(tasks, desc="ops vs MC", disable=not progress, file=sys.stderr):
        task()
    series.sort(key=lambda r: (SERIES_ACTS.index(r["activation"]), r["scale"], r["order"]))
    layernorm.sort(key=lambda r: ([m[0] for m in LN_METHODS].index(r["method"]), r["scale"]))

    result: dict[str, Any] = {
        "exact": {"threshold": Z_MAX, "rows": exact_rows},
        "probit": probit,
        "series": series,
        "layernorm": layernorm,
        "softmax_cross": softmax_cross,
        "scores_softmax": scores_softmax,
        "config": {
            "samples": N,
            "seed": seed,
            "quick": quick,
            "dtype": "float64",
            "scales": list(SCALES),
            "z_max": Z_MAX,
            "probit_replicates": PROBIT_REPLICATES,
            "layernorm_token_spread": [float(x) for x in _ln_problem(seed)[0].std(-1, unbiased=False)],
        },
    }
    result["checks"] = _checks(result)
    _plot(result, out_dir / "ops.png")
    result["figure"] = "ops.png"
    result["config"]["elapsed_s"] = round(time.perf_counter() - t0, 3)
    (out_dir / "ops.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "ops.md").write_text(_markdown(result, command))
    return result
