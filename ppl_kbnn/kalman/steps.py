r"""The Kalman backward pass of KBNN (Wagner, Wu, Huber 2023), one node at a time.

Hidden states are diagonal Gaussians (KBNN); a sequence ``(..., T, d)`` is handled token-wise and
the updates of all tokens that share a weight are summed (exact for ``T = 1``).

Output (filtering), observation ``y = z + v``, ``v ~ N(0, R)``:

.. math:: k = \frac{\sigma_z^2}{\sigma_z^2 + R},\quad \mu_z^+ = \mu_z + k(y - \mu_z),\quad
          \sigma_z^{2+} = (1 - k)\,\sigma_z^2 .

Smoothing I (elementwise activation ``z = g(a)``; scalar gain per unit):

.. math:: k = \frac{\mathrm{Cov}(a, z)}{\sigma_z^2},\quad \Delta\mu_a = k\,\Delta\mu_z,\quad
          \Delta\sigma_a^2 = k^2\,\Delta\sigma_z^2 .

Smoothing II (linear ``a_n = w_n^\top \bar u``; joint update of the weight row and the input):

.. math::
    \mu_{w,n}^+ &= \mu_{w,n} + c_{w,n}\,\Delta\mu_{a,n}/\sigma_{a,n}^2, \qquad
    C_n^+ = C_n + c_{w,n} c_{w,n}^\top\,\Delta\sigma_{a,n}^2/\sigma_{a,n}^4, \\
    \mu_u^+ &= \mu_u + \textstyle\sum_n c_{u,n}\,\Delta\mu_{a,n}/\sigma_{a,n}^2, \qquad
    \sigma_u^{2+} = \sigma_u^2 + \textstyle\sum_n c_{u,n}^2\,\Delta\sigma_{a,n}^2/\sigma_{a,n}^4,

with ``c_{w,n} = C_n ū`` and ``c_{u,n} = P_u μ_n`` computed before the update. Dropped (KBNN):
the weight–input cross-covariance the joint update creates, the covariance between neurons when
their input updates are summed, and all off-diagonal hidden-state covariances.
"""

from __future__ import annotations

import torch

from .guards import Guards


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 (a node with no variance carries no update)."""
    pos = den > 0  # no gradient flows through these steps: the masked quotients (x/0) need no safe denominator
    return torch.where(pos, num / den, 0.0)


def _weight_update(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``Δμ_n = Σ_t c_tn a_tn`` and ``ΔC_n = Σ_t c_tn c_tnᵀ b_tn`` (diagonal of it for ``"diag"``).

    ``c`` ``(..., T, n, p)``; ``a``, ``b`` ``(..., T, n)``; leading batch dims and tokens are summed.
    """
    if a.dim() == 2 and a.shape[0] == 1:  # one token, no batch (a chain's sample): nothing is summed, single products
        c0, a0, b0 = c[0], a[0, :, None], b[0, :, None]  # (n, p), (n, 1), (n, 1)
        if w_kind == "block":
            return c0 * a0, c0[:, :, None] * (c0 * b0)[:, None, :]
        return c0 * a0, (c0 * c0) * b0
    batch = "".join(chr(ord("A") + i) for i in range(a.dim() - 2))
    d_mean = torch.einsum(f"{batch}tnp,{batch}tn->np", c, a)
    if w_kind == "block":  # two operands: no contraction-path search per call (the path opt_einsum picks)
        return d_mean, torch.einsum(f"{batch}tnp,{batch}tnq->npq", c, c * b[..., None])
    return d_mean, torch.einsum(f"{batch}tnp,{batch}tn->np", c * c, b)


def filter_step(
    mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor, noise_var: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kalman filter step at the output (diagonal): returns the filtered ``(mean, var)``."""
    k = var / (var + noise_var)
    return mean + k * (y - mean), (1.0 - k) * var


def smooth_activation(
    d_mean_out: torch.Tensor,
    d_var_out: torch.Tensor,
    var_out: torch.Tensor,
    cross: torch.Tensor,
    guards: Guards,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothing I: ``(Δμ_a, Δσ²_a)`` from the change of the activation output (all ``(..., T, d)``)."""
    k = guards.clip(_safe_div(cross, var_out))
    return k * d_mean_out, k * k * d_var_out


def smooth_linear(
    d_mean_out: torch.Tensor,
    d_var_out: torch.Tensor,
    var_out: torch.Tensor,
    w_cross: torch.Tensor,
    in_cross: torch.Tensor | None,
    guards: Guards,
    *,
    w_kind: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Smoothing II for a token-wise linear layer.

    Args:
        d_mean_out, d_var_out, var_out: ``(..., T, n)`` change of the output moments and the
            predicted output variance ``σ_a²``.
        w_cross: ``Cov(w_n, a_tn) = C_n m̄_t`` ``(..., T, n, p)``.
        in_cross: ``Cov(u_t, a_tn)`` ``(..., T, d_in, n)``, or ``None`` for a deterministic input.
        w_kind: ``"block"`` or ``"diag"`` weight belief.

    Returns:
        ``(Δμ_w (n, p), ΔC (n, p, p) or (n, p), Δμ_u, Δσ²_u)`` — the input changes are ``None``
        for a deterministic input. Leading batch dims are summed into the weight update.
    """
    Kw = guards.clip(_safe_div(w_cross, var_out[..., None]))  # RTS gain of the weights, c_w/σ_a²: (..., T, n, p)
    d_mean_w, d_cov_w = _weight_update(Kw, d_mean_out, d_var_out, w_kind)
    if in_cross is None:
        return d_mean_w, d_cov_w, None, None
    Ku = guards.clip(_safe_div(in_cross, var_out[..., None, :]))  # c_u/σ_a²: (..., T, d_in, n)
    d_mean_u = torch.einsum("...tin,...tn->...ti", Ku, d_mean_out)
    d_var_u = torch.einsum("...tin,...tn->...ti", Ku * Ku, d_var_out)
    return d_mean_w, d_cov_w, d_mean_u, d_var_u


# --------------------------------------------------------------------------------------------- full covariance
#
# The same steps with full hidden-state covariances within a token (``hidden="full"``): the
# generic Gaussian RTS step ``G = C_uz P_z⁺``, ``Δm_u = G Δm_z``, ``ΔP_u = G ΔP_z Gᵀ`` instead of
# KBNN's per-unit scalar gains and its sum over neurons. ``P_z⁺`` is the pseudo-inverse: directions
# with zero predicted variance carry no update (as ``_safe_div`` does in the diagonal case).


def _pinv(P: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(P, hermitian=True)


def filter_step_full(
    mean: torch.Tensor, cov: torch.Tensor, y: torch.Tensor, noise_var: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kalman filter step at the output with full covariance ``(..., d, d)`` and noise ``noise_var · I``."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    S = cov + noise_var * eye
    K = torch.linalg.solve(S, cov).mT  # P S⁻¹ (S, P symmetric)
    new_cov = cov - K @ cov
    return mean + (K @ (y - mean)[..., None])[..., 0], 0.5 * (new_cov + new_cov.mT)


def smooth_activation_full(
    d_mean_out: torch.Tensor, d_cov_out: torch.Tensor, cov_out: torch.Tensor, cross: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RTS step through ``z = g(a)`` with ``C_az = P_a diag(E[g'])`` (exact, Stein): ``(Δm_a, ΔP_a)``."""
    G = cross @ _pinv(cov_out)  # (..., T, d, d)
    d_cov = G @ d_cov_out @ G.mT
    return (G @ d_mean_out[..., None])[..., 0], 0.5 * (d_cov + d_cov.mT)


def smooth_linear_full(
    d_mean_out: torch.Tensor,
    d_cov_out: torch.Tensor,
    cov_out: torch.Tensor,
    w_cross: torch.Tensor,
    in_cross: torch.Tensor | None,
    *,
    w_kind: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    r"""Joint RTS update of the weight rows and the input of ``a = W ū`` with full ``P_a`` ``(..., T, n, n)``.

    ``Cov(w_n, a) = c_n e_nᵀ`` with ``c_n = C_n m̄`` gives the weight gain ``G_{w_n} = c_n (P_a⁻¹)_{n,:}``:

    .. math:: \Delta\mu_{w,n} = c_n\,(P_a^{-1}\Delta m_a)_n, \qquad
              \Delta C_n = c_n c_n^\top\,(P_a^{-1}\,\Delta P_a\,P_a^{-1})_{nn}

    and the input gain ``G_u = C_{ua} P_a⁻¹``. The covariances between different weight rows, and
    between the weights and the input, that the joint update creates are dropped (block belief).
    """
    Pinv = _pinv(cov_out)
    v = (Pinv @ d_mean_out[..., None])[..., 0]  # (P_a⁻¹ Δm_a)_n: (..., T, n)
    s = torch.diagonal(Pinv @ d_cov_out @ Pinv, dim1=-2, dim2=-1)  # (P_a⁻¹ ΔP_a P_a⁻¹)_nn: (..., T, n)
    d_mean_w, d_cov_w = _weight_update(w_cross, v, s, w_kind)
    if in_cross is None:
        return d_mean_w, d_cov_w, None, None
    G = in_cross @ Pinv  # (..., T, d_in, n)
    d_cov_u = G @ d_cov_out @ G.mT
    return d_mean_w, d_cov_w, (G @ d_mean_out[..., None])[..., 0], 0.5 * (d_cov_u + d_cov_u.mT)


def weight_update(
    mean: torch.Tensor,
    cov: torch.Tensor,
    jac: torch.Tensor,
    S: torch.Tensor,
    resid: torch.Tensor,
    w_kind: str,
    *,
    S_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Kalman update of one layer's weight rows from the statistical Jacobian of the observation.

    With ``g_n = ∂E[y]/∂μ_{w_n}`` (``(p, m)`` for row ``n``; the statistical Jacobian, see
    :mod:`ppl_kbnn.propagate`), ``S`` the predictive covariance of ``y`` including the noise and
    ``r = y - E[y]``:

    .. math::
        c_n = C_n g_n = \mathrm{Cov}(w_n, y), \qquad K_n = c_n S^{-1}, \qquad
        \mu_n^+ = \mu_n + K_n r, \qquad C_n^+ = C_n - K_n c_n^\top .

    Rows stay independent (block-diagonal belief); ``"diag"`` keeps the diagonal of ``C_n^+``. On a
    chain this equals KBNN's filter step followed by smoothing I/II (docs/kbt.md).

    Args:
        mean: ``(n, p)``; cov: ``(n, p, p)`` (``"block"``) or ``(n, p)`` (``"diag"``);
        jac: ``(m, n, p)``; S: ``(m, m)``; resid: ``(m,)``.
        S_inv: optionally ``S⁻¹`` ``(m, m)``, computed once for all layers of a sample (``S`` is then
            not used); without it every call solves with ``S``.
    """
    if w_kind == "block":
        c = torch.einsum("npq,knq->npk", cov, jac) if jac.shape[0] > 1 else cov @ jac[0, :, :, None]  # (n, p, m)
    else:
        c = cov[..., None] * jac.permute(1, 2, 0)  # (n, p, m)
    return cross_update(mean, cov, c, S, resid, w_kind, S_inv=S_inv)


def cross_update(
    mean: torch.Tensor,
    cov: torch.Tensor,
    c: torch.Tensor,
    S: torch.Tensor,
    resid: torch.Tensor,
    w_kind: str,
    *,
    S_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Kalman update of one layer's weight rows from their cross-covariance with the observation.

    .. math:: K_n = c_n S^{-1}, \qquad \mu_n^+ = \mu_n + K_n r, \qquad C_n^+ = C_n - K_n c_n^\top

    with ``c_n = Cov(w_n, y)`` ``(n, p, m)`` (from a Jacobian, :func:`weight_update`, or from draws: statistical
    linear regression). Rows stay independent; ``"diag"`` keeps the diagonal of ``C_n^+``.
    """
    if S_inv is not None and c.shape[-1] == 1:  # one output: every product below is a single product (no sums)
        K = c * S_inv  # (n, p, 1)
        new_mean = mean + K[..., 0] * resid
        if w_kind == "block":
            return new_mean, cov - K * c.mT
        return new_mean, cov - (K * c)[..., 0]
    K = c @ S_inv if S_inv is not None else torch.linalg.solve(S, c.mT).mT  # c S⁻¹ (S symmetric): (n, p, m)
    new_mean = mean + K @ resid
    if w_kind == "block":
        return new_mean, cov - K @ c.mT
    return new_mean, cov - (K * c).sum(-1)
