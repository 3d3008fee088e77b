r"""Gaussian weight beliefs: one class per covariance structure, behind one interface.

A belief is a Gaussian ``N(μ, P)`` over the vector ``θ`` of all Bayesian weights of a
:class:`~ppl_kbnn.model.BayesianModel` (its sites concatenated in model order, each flattened
row-major: the *flat layout*, ``D`` numbers). The structures differ in what they keep of ``P``:

=============  =========================================================  ==================
``key``        ``P``                                                      numbers held
=============  =========================================================  ==================
``"diag"``     diagonal                                                   ``2 D``
``"block"``    one full block per output neuron over ``[W_n, b_n]``       ``Σ_l n_l p_l (p_l + 1)``
               (KBNN); neurons and layers independent
``"full"``     dense ``D × D`` (the reference for small networks)         ``D (D + 1)``
``"lowrank"``  **precision** ``Λ = P⁻¹ = diag(υ) + W Wᵀ``, ``W`` ``(D, r)``  ``D (r + 2)``
               (LoFi form)
=============  =========================================================  ==================

Every update rule talks to a belief through the same linear-Gaussian step. With ``J`` ``(m, D)`` the
(statistical) Jacobian of ``m`` observed outputs, ``c = P Jᵀ = Cov(θ, y)`` ``(D, m)`` (:meth:`Belief.cov_jac`)
and ``S`` the innovation covariance, :meth:`Belief.condition` applies

.. math:: K = c S^{-1}, \qquad \mu^+ = \mu + K r, \qquad P^+ = P - K c^\top ,

keeping what the structure holds of ``P^+`` (its diagonal, its blocks, all of it). The low-rank belief
updates its precision instead (information form, exact before truncation):

.. math:: \Lambda^+ = \Lambda + J^\top R^{-1} J = \mathrm{diag}(\upsilon) + \tilde W \tilde W^\top, \qquad
          \tilde W = [\,W,\ J^\top L_R^{-\top}\,],\ R = L_R L_R^\top ,

then truncates ``W̃`` ``(D, r + m)`` back to rank ``r``: with the eigen-decomposition ``W̃ᵀW̃ = V diag(λ) Vᵀ``,
``W⁺ = W̃ V_{:r}`` (the ``r`` leading directions) and the discarded part's diagonal is kept,
``υ⁺ = υ + rowsum((W̃ V_{r:})²)``, so the precision's diagonal stays exact (LoFi, Chang et al. 2023). The
mean uses the untruncated posterior (Kalman form with the predicted ``P``). Covariance products use
Woodbury: ``P = Υ⁻¹ - Υ⁻¹ W (I_r + Wᵀ Υ⁻¹ W)⁻¹ Wᵀ Υ⁻¹``.

Structures are registered by ``key`` in :data:`BELIEFS`; nothing outside this module branches on the key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import nn

from .kalman import Guards, cross_update
from .moments._checks import check_psd, check_tensor, check_variance

__all__ = ["BELIEFS", "Belief", "BlockBelief", "DiagBelief", "FullBelief", "Layout", "LowRankBelief"]


@dataclass(frozen=True)
class LinearSlot:
    """A linear map of the network: its rows ``[W_n, b_n]`` ``(d_out, p)`` and where its Bayesian entries sit
    in the flat layout."""

    module: str  # module name inside model.net
    index: int  # layer number among the Bayesian linear maps
    d_in: int
    d_out: int
    bias: bool
    weight_site: str | None
    bias_site: str | None


class Layout:
    """The flat layout of the Bayesian weights and its map onto the linear maps' ``(d_out, p)`` rows.

    Attributes:
        sites: ``[(name, shape)]`` in model order; ``offsets[name]`` their start in ``θ``; ``dim`` = ``D``.
        slots: the linear maps (:class:`LinearSlot`); ``index[l]`` ``(d_out, p)`` the flat position of every
            row entry of map ``l`` (``-1`` for a fixed entry), ``mask[l] = index[l] >= 0``. The index is structure,
            kept on the CPU; :meth:`index_on` gives (and caches) its copy on a belief's device.
    """

    def __init__(self, priors: dict[str, tuple[torch.Tensor, torch.Tensor]], slots: Sequence[LinearSlot]) -> None:
        self.sites = [(name, tuple(loc.shape)) for name, (loc, _) in priors.items()]
        self.offsets: dict[str, int] = {}
        off = 0
        for name, shape in self.sites:
            self.offsets[name] = off
            off += int(torch.Size(shape).numel())
        self.dim = off
        self.slots = list(slots)
        self.index: list[torch.Tensor] = []
        for s in self.slots:
            idx = torch.full((s.d_out, s.d_in + int(s.bias)), -1, dtype=torch.long, device="cpu")  # structure: CPU
            if s.weight_site is not None:
                o = self.offsets[s.weight_site]
                idx[:, : s.d_in] = torch.arange(o, o + s.d_out * s.d_in, device="cpu").reshape(s.d_out, s.d_in)
            if s.bias_site is not None:
                o = self.offsets[s.bias_site]
                idx[:, s.d_in] = torch.arange(o, o + s.d_out, device="cpu")
            self.index.append(idx)
        self._placed: dict[tuple[int, torch.device], torch.Tensor] = {}  # index[l] copied to a device, on first use
        covered = sum(int((i >= 0).sum()) for i in self.index)
        self.covers_all = covered == self.dim  # every Bayesian weight sits in a linear map

    def index_on(self, layer: int, device: torch.device) -> torch.Tensor:
        """``index[layer]`` on ``device`` (copied once per device, then cached)."""
        key = (layer, device)
        idx = self._placed.get(key)
        if idx is None:
            idx = self._placed[key] = self.index[layer].to(device)
        return idx

    def split(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """``θ`` ``(..., D)`` -> ``{site: (..., *shape)}``."""
        out, lead = {}, theta.shape[:-1]
        for name, shape in self.sites:
            o = self.offsets[name]
            n = int(torch.Size(shape).numel())
            out[name] = theta[..., o : o + n].reshape(*lead, *shape)
        return out

    def gather(self, flat: torch.Tensor, layer: int) -> torch.Tensor:
        """Rows of map ``layer`` from a flat ``(D, ...)`` tensor: ``(d_out, p, ...)``, zero at fixed entries."""
        idx = self.index_on(layer, flat.device)
        out = flat[idx.clamp_min(0)]
        mask = (idx >= 0).reshape(*idx.shape, *([1] * (flat.dim() - 1)))
        return out * mask.to(out.dtype)

    def scatter(self, rows: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """A flat ``(D, ...)`` tensor from every map's ``(d_out, p, ...)`` rows (fixed entries dropped)."""
        out = torch.zeros(self.dim, *rows[0].shape[2:], dtype=like.dtype, device=like.device)
        for layer, r in enumerate(rows):
            idx = self.index_on(layer, like.device)
            m = idx >= 0
            out[idx[m]] = r[m.to(r.device)]
        return out


class Belief(nn.Module):
    """A Gaussian belief over the flat Bayesian weights (module docstring). Subclasses set ``key`` and implement
    the structure-specific steps; buffers hold the state, so ``state_dict`` and ``.to()`` work."""

    key: ClassVar[str]
    joint: ClassVar[bool] = False  # whether the belief correlates different layers / neurons

    def __init__(self, layout: Layout, loc: torch.Tensor, var: torch.Tensor, guards: Guards) -> None:
        super().__init__()
        self.layout, self.guards = layout, guards

    # -- views -----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the state (follows ``.to()``; read from the first buffer, a state tensor)."""
        return next(iter(self._buffers.values())).dtype

    @property
    def device(self) -> torch.device:
        """The device of the state (follows ``.to()``; read from the first buffer)."""
        return next(iter(self._buffers.values())).device

    @property
    def mean(self) -> torch.Tensor:
        """``μ`` ``(D,)``."""
        raise NotImplementedError

    def marginal_var(self) -> torch.Tensor:
        """``diag(P)`` ``(D,)``."""
        raise NotImplementedError

    def dense_cov(self) -> torch.Tensor:
        """``P`` ``(D, D)`` (dense; for small networks and checks)."""
        raise NotImplementedError

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``index``'s rows: mean ``(d_out, p)`` and the per-row covariance blocks ``(d_out, p, p)`` (the
        marginal blocks of ``P``; diagonal structures give ``(d_out, p)``)."""
        P = self.dense_cov()
        idx = self.layout.index_on(index, P.device)
        mask = idx >= 0
        c = idx.clamp_min(0)
        block = P[c[:, :, None], c[:, None, :]] * (mask[:, :, None] & mask[:, None, :]).to(P.dtype)
        return self.layout.gather(self.mean, index), block

    # -- the linear-Gaussian step -----------------------------------------------------------------
    def cov_jac(self, J: torch.Tensor) -> torch.Tensor:
        """``P Jᵀ`` ``(D, m)`` for ``J`` ``(m, D)``."""
        raise NotImplementedError

    def condition(
        self, c: torch.Tensor, S: torch.Tensor, resid: torch.Tensor, *, R: torch.Tensor, J: torch.Tensor | None = None
    ) -> None:
        """Kalman step with ``c = Cov(θ, y)`` ``(D, m)``, innovation covariance ``S`` ``(m, m)``, residual ``r``
        ``(m,)`` and observation noise ``R`` ``(m, m)``. ``J`` (the Jacobian of a linearised observation; ``None``
        when ``c`` comes from draws) is used by information-form beliefs; covariance-form beliefs need only ``c``
        and ``S``."""
        raise NotImplementedError

    def add_process_noise(self, q: float) -> None:
        """Random-walk drift: ``P ← P + q I`` on the Bayesian entries."""
        raise NotImplementedError

    def reweigh_data(self, c: float, prior_loc: torch.Tensor, prior_var: torch.Tensor) -> None:
        r"""Weigh the data already absorbed by ``c``, keeping the prior ``N(μ₀, Λ₀⁻¹)``, ``Λ₀ = diag(1/prior_var)``:

        .. math::
            Λ' = Λ_0 + c\,(Λ - Λ_0), \qquad Λ'μ' = Λ_0 μ_0 + c\,(Λ μ - Λ_0 μ_0),

        i.e. ``P' = (c I + (1 - c) P Λ₀)⁻¹ P`` and ``μ' = μ + (1 - c) P' Λ₀ (μ₀ - μ)``. With ``c = ρ/ρ'`` this is
        the belief the same (linearised) observations give under the noise variance ``ρ'`` instead of ``ρ``
        (``obs_noise="auto"``, :mod:`ppl_kbnn.hyper`). ``prior_loc``, ``prior_var``: ``(D,)``. ``P'`` is positive
        definite when ``c + (1 - c) a > 0`` for every eigenvalue ``a`` of ``Λ₀^{1/2} P Λ₀^{1/2}``: always for
        ``c <= 1``, and for ``c > 1`` whenever ``a <= 1`` (``P ≤ Λ₀⁻¹``: data never widens a belief)."""
        raise NotImplementedError

    def scale_cov(self, f: float) -> None:
        """``P ← f P`` (a belief conditional on the noise variance, rescaled when its estimate moves)."""
        for name, buf in self.named_buffers():
            if name.startswith("cov"):
                buf.mul_(f)

    def sample(self, n: int, generator: torch.Generator | None = None, *, antithetic: bool = False) -> torch.Tensor:
        """``n`` draws ``(n, D)``: ``μ + root(P) z``.

        ``antithetic=True`` (``n`` even): the standard normals come in pairs ``±z``, so the draws' mean is exactly
        ``μ``; when ``n/2`` exceeds the number of normals, they are also whitened (their sample covariance is
        exactly ``I``), so the draws' sample covariance is exactly ``P`` — statistical linear regression is then
        exact on a linear network.
        """
        return self._draw(self._normals(n, generator, antithetic))

    def draws_and_normals(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Antithetic draws ``(n, D)`` (as :meth:`sample`) and the standard normals ``z`` ``(n, k)`` behind them:
        ``θ_s = μ + G z_s`` with ``G Gᵀ = P``."""
        z = self._normals(n, generator, True)
        return self._draw(z), z

    def _n_normals(self) -> int:
        return self.layout.dim

    def _draw(self, z: torch.Tensor) -> torch.Tensor:
        """``μ + root(P) z`` for standard normals ``z`` ``(n, k)``."""
        raise NotImplementedError

    def _normals(self, n: int, generator: torch.Generator | None, antithetic: bool) -> torch.Tensor:
        k, like = self._n_normals(), self.mean
        # drawn (and whitened) in float64 and rounded to the belief's dtype: a float32 belief sees the float64 draws
        work = like.dtype if like.device.type == "mps" else torch.float64  # (MPS has no float64)
        if not antithetic:
            return torch.randn(n, k, generator=generator, dtype=work, device=like.device).to(like.dtype)
        half = torch.randn(n // 2, k, generator=generator, dtype=work, device=like.device)
        if n // 2 > k:  # whiten: [h; -h]ᵀ[h; -h] = (n - 1) I
            L = torch.linalg.cholesky(2 * half.mT @ half / (n - 1))
            half = torch.linalg.solve_triangular(L, half.mT, upper=False).mT
        half = half.to(like.dtype)
        return torch.cat([half, -half])

    # -- distributions, size, identity ------------------------------------------------------------
    def joint_posterior(self) -> dist.Distribution:
        """The belief over the flat weights as one torch distribution (event ``(D,)``)."""
        return dist.MultivariateNormal(self.mean, self.dense_cov())

    @property
    def nbytes(self) -> int:
        """Bytes of the state (means, covariances / precision factors), not counting masks."""
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers() if not name.startswith("mask"))

    def signature(self) -> dict:
        """Settings that a checkpoint must share with the belief it is loaded into."""
        return {"covariance": self.key}

    def snapshot(self) -> dict:
        """A copy of the whole state (buffers and counters), for :meth:`restore`."""
        state = {k: v.clone() for k, v in self.named_buffers() if not k.startswith("mask_")}  # masks never change
        return {"buffers": state, "attrs": dict(self._counters())}

    def restore(self, snap: dict) -> None:
        """Put back a :meth:`snapshot` in place (nothing else changes)."""
        bufs = dict(self.named_buffers())
        for k, v in snap["buffers"].items():
            bufs[k].copy_(v)
        for k, v in snap["attrs"].items():
            setattr(self, k, v)

    def _counters(self) -> dict:
        return {}

    def check_state(self, state: dict, prefix: str = "") -> None:
        """Validate a checkpoint of this belief before any of it is loaded: ``state`` maps this belief's
        ``state_dict`` keys to the checkpoint's values (keys, dtypes and shapes already checked by the guide).
        Raises ``ValueError`` naming the first bad entry (``prefix`` + key): non-finite, not a covariance (not
        symmetric, not PSD, negative variance), or a fixed entry that is not this network's."""
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                check_tensor(prefix + k, v)

    def _check_finite(self, what: str, *tensors: torch.Tensor) -> None:
        if not all(torch.isfinite(t).all() for t in tensors):
            raise FloatingPointError(f"the update of {what} produced a non-finite belief")


def _reweighed(mean: torch.Tensor, cov: torch.Tensor, m0: torch.Tensor, lam0: torch.Tensor, c: float
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:meth:`Belief.reweigh_data` for dense covariances, batched: ``P' = (cI + (1-c) P Λ₀)⁻¹ P`` (symmetrised),
    ``μ' = μ + (1-c) P' Λ₀ (μ₀ - μ)``. ``mean``, ``m0``, ``lam0`` (the prior precision's diagonal) ``(..., p)``;
    ``cov`` ``(..., p, p)``."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    P = torch.linalg.solve(c * eye + (1 - c) * cov * lam0[..., None, :], cov)  # (..., p, p)
    P = 0.5 * (P + P.mT)
    return mean + (1 - c) * (P @ (lam0 * (m0 - mean))[..., None])[..., 0], P


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one read-back: the largest magnitude of each tensor
    (``inf``-norm, one fused call; ``NaN`` and ``±inf`` propagate into it, and it cannot overflow) checked at once."""
    if not tensors:
        return True
    return bool(torch.stack(torch._foreach_norm(list(tensors), math.inf)).isfinite().all())


# ------------------------------------------------------------------------------------------------- per-row beliefs


class _RowBelief(Belief):
    """Beliefs stored per linear map, ``mean_l`` ``(d_out, p)`` and ``cov_l`` (``"block"``: ``(d_out, p, p)``,
    ``"diag"``: ``(d_out, p)``), fixed entries at zero variance (``mask_l``). The KBNN engines read these
    directly."""

    w_kind: ClassVar[str]

    def __init__(self, layout: Layout, loc: torch.Tensor, var: torch.Tensor, guards: Guards, *,
                 fixed: Sequence[torch.Tensor] = (), **_) -> None:  # fmt: skip
        super().__init__(layout, loc, var, guards)
        if not layout.covers_all:
            raise ValueError(f"covariance={self.key!r} holds Linear weights only; use 'full' or 'lowrank' for other "
                             "Bayesian parameters")  # fmt: skip
        for slot, f in zip(layout.slots, fixed, strict=True):
            idx = layout.index_on(slot.index, loc.device)
            mask = idx >= 0
            mean = torch.where(mask, loc[idx.clamp_min(0)], f)
            v = torch.where(mask, var[idx.clamp_min(0)], torch.zeros_like(f))
            self.register_buffer(f"mean_{slot.index}", mean.clone())
            self.register_buffer(f"cov_{slot.index}", (torch.diag_embed(v) if self.w_kind == "block" else v).clone())
            self.register_buffer(f"mask_{slot.index}", mask)

    def rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._buffers[f"mean_{index}"], self._buffers[f"cov_{index}"]

    # An update never writes into the row buffers: it computes the new rows into fresh tensors and swaps them in
    # (:meth:`_swap`). So a snapshot is a set of references (no copies) and a restore swaps them back.
    def snapshot(self) -> dict:  # noqa: D102
        state = {k: v for k, v in self._buffers.items() if not k.startswith("mask_")}
        return {"buffers": state, "attrs": dict(self._counters())}

    def restore(self, snap: dict) -> None:  # noqa: D102
        self._buffers.update(snap["buffers"])
        for k, v in snap["attrs"].items():
            setattr(self, k, v)

    def _swap(self, index: int, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """Make ``(mean, cov)`` map ``index``'s rows (the tensors themselves, no copy; nothing is written in place)."""
        self._buffers[f"mean_{index}"], self._buffers[f"cov_{index}"] = mean, cov

    def scale_cov(self, f: float) -> None:  # noqa: D102
        for s in self.layout.slots:
            mean, cov = self.rows(s.index)
            self._swap(s.index, mean, cov * f)

    def reweigh_data(self, c, prior_loc, prior_var) -> None:  # noqa: D102
        lam0_flat, new = 1.0 / prior_var, {}
        for s in self.layout.slots:
            mean, cov = self.rows(s.index)  # (n, p), (n, p, p) | (n, p)
            m0 = self.layout.gather(prior_loc, s.index)  # (n, p)
            lam0 = self.layout.gather(lam0_flat, s.index)  # (n, p), 0 at fixed entries
            if self.w_kind == "block":
                mu, P = _reweighed(mean, cov, m0, lam0, c)
            else:
                P = cov / (c + (1 - c) * lam0 * cov)
                mu = mean + (1 - c) * P * lam0 * (m0 - mean)
            new[s.index] = (mu, P)
        if not _all_finite([t for pair in new.values() for t in pair]):
            raise FloatingPointError(f"reweighing the data by {c:.6g} (obs_noise='auto') produced a non-finite belief")
        for index, (mean, cov) in new.items():
            self._swap(index, mean, cov)

    def check_state(self, state: dict, prefix: str = "") -> None:  # noqa: D102
        for s in self.layout.slots:
            i = s.index
            mask, mean, cov = state[f"mask_{i}"], state[f"mean_{i}"], state[f"cov_{i}"]
            if not torch.equal(mask, getattr(self, f"mask_{i}")):
                raise ValueError(f"{prefix}mask_{i}: the Bayesian entries of linear map {s.module!r} differ from this "
                                 "model's (the checkpoint was saved with another Bayesian subset)")  # fmt: skip
            check_tensor(f"{prefix}mean_{i}", mean)
            fixed, where = ~mask, f"linear map {s.module!r}"
            if not torch.equal(mean[fixed], getattr(self, f"mean_{i}")[fixed]):
                raise ValueError(f"{prefix}mean_{i}: the fixed (non-Bayesian) weights of {where} differ from this "
                                 "network's")  # fmt: skip
            if self.w_kind == "block":
                check_psd(f"{prefix}cov_{i}", cov)
                off = fixed[:, :, None] | fixed[:, None, :]  # rows and columns of fixed entries
                # psd_repair's eigen-reconstruction leaves round-off there
                tol = 100.0 * cov.shape[-1] * torch.finfo(cov.dtype).eps * float(cov.abs().max())
                zero = bool((cov[off].abs() <= tol).all())
            else:
                check_variance(f"{prefix}cov_{i}", cov)
                zero = bool((cov[fixed] == 0).all())
            if not zero:
                raise ValueError(f"{prefix}cov_{i}: a fixed (non-Bayesian) entry of {where} has non-zero variance")

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows(index)

    def set_layer(self, index: int, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """Replace map ``index``'s rows (validated: shapes, finite, symmetric PSD blocks); fixed entries must
        keep their values and zero variance."""
        m0, c0 = self.rows(index)
        if mean.shape != m0.shape or cov.shape != c0.shape:
            raise ValueError(f"set_layer({index}): expected mean {tuple(m0.shape)} and cov {tuple(c0.shape)}, got "
                             f"{tuple(mean.shape)} and {tuple(cov.shape)}")  # fmt: skip
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError(f"set_layer({index}): non-finite values")
        var = torch.diagonal(cov, dim1=-2, dim2=-1) if self.w_kind == "block" else cov
        if (var < 0).any() or (self.w_kind == "block" and not torch.allclose(cov, cov.mT)):
            raise ValueError(f"set_layer({index}): covariance is not symmetric positive semi-definite")
        self._commit(index, mean.to(m0), cov.to(c0))

    @property
    def mean(self) -> torch.Tensor:
        return self.layout.scatter([self.rows(s.index)[0] for s in self.layout.slots], self.mean_0)

    def marginal_var(self) -> torch.Tensor:
        vs = [self._row_var(self.rows(s.index)[1]) for s in self.layout.slots]
        return self.layout.scatter(vs, self.mean_0)

    def _row_var(self, cov: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _row_cov_jac(self, cov: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
        """``C_n g_n`` ``(n, p, m)`` for ``jac`` ``(m, n, p)``."""
        raise NotImplementedError

    def cov_jac(self, J: torch.Tensor) -> torch.Tensor:
        rows = []
        for s in self.layout.slots:
            jac = self.layout.gather(J.mT, s.index).permute(2, 0, 1)  # (m, n, p)
            rows.append(self._row_cov_jac(self.rows(s.index)[1], jac))
        return self.layout.scatter(rows, J)

    def condition(self, c, S, resid, *, R, J=None) -> None:  # noqa: D102
        S_inv = torch.linalg.inv(S)  # once for every layer
        new = {}
        for s in self.layout.slots:
            mean, cov = self.rows(s.index)
            new[s.index] = cross_update(mean, cov, self.layout.gather(c, s.index), S, resid, self.w_kind, S_inv=S_inv)
        self.update_rows(new)

    def update_rows(self, new: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Commit new ``{layer: (mean, cov)}`` rows computed by an engine: guards applied to every layer, one
        finiteness check of all of them, then all swapped in (no layer is committed if any is non-finite)."""
        done = {index: self._guarded(index, mean, cov) for index, (mean, cov) in new.items()}
        if not _all_finite([t for pair in done.values() for t in pair]):
            for index, (mean, cov) in done.items():  # name the first non-finite layer
                self._check_finite(f"linear layer {index}", mean, cov)
        for index, (mean, cov) in done.items():
            self._swap(index, mean, cov)

    def add_process_noise(self, q: float) -> None:
        for s in self.layout.slots:
            mean, cov = self.rows(s.index)
            v = q * getattr(self, f"mask_{s.index}").to(cov.dtype)
            self._swap(s.index, mean, cov + (torch.diag_embed(v) if self.w_kind == "block" else v))

    def _guarded(self, index: int, mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows to commit for map ``index``: symmetrised (block), jitter and PSD repair applied (counted)."""
        raise NotImplementedError

    def _commit(self, index: int, mean: torch.Tensor, cov: torch.Tensor) -> None:
        mean, cov = self._guarded(index, mean, cov)
        self._check_finite(f"linear layer {index}", mean, cov)
        self._swap(index, mean, cov)


class BlockBelief(_RowBelief):
    """Per-neuron full covariance over ``[W_n, b_n]`` (KBNN's belief); rows and layers independent."""

    key = "block"
    w_kind = "block"

    def _row_var(self, cov):
        return torch.diagonal(cov, dim1=-2, dim2=-1)

    def _row_cov_jac(self, cov, jac):
        return torch.einsum("npq,knq->npk", cov, jac)

    def dense_cov(self) -> torch.Tensor:
        P = torch.zeros(self.layout.dim, self.layout.dim, dtype=self.mean_0.dtype, device=self.mean_0.device)
        for s, idx in zip(self.layout.slots, self.layout.index, strict=True):
            cov = self.rows(s.index)[1]  # (n, p, p): rows are independent blocks
            pairs = (idx[:, :, None] >= 0) & (idx[:, None, :] >= 0)  # (n, p, p): both entries Bayesian
            rows, cols = idx[:, :, None].expand_as(pairs), idx[:, None, :].expand_as(pairs)
            P[rows[pairs].to(P.device), cols[pairs].to(P.device)] = cov[pairs.to(cov.device)]
        return P

    def _guarded(self, index, mean, cov):
        cov = 0.5 * (cov + cov.mT)
        g = self.guards
        if g.jitter > 0:
            g.counts["jitter"] += 1
            cov = cov + torch.diag_embed(g.jitter * getattr(self, f"mask_{index}").to(cov.dtype))
        if g.psd_repair:
            evals, evecs = torch.linalg.eigh(cov)
            bad = (evals < 0).any(-1)
            if bad.any():
                g.counts["psd_repair"] += int(bad.sum())
                fixed = (evecs * evals.clamp_min(0)[..., None, :]) @ evecs.mT
                cov = torch.where(bad[:, None, None], fixed, cov)
        return mean, cov

    def _n_normals(self):
        return sum(self.rows(s.index)[0].numel() for s in self.layout.slots)

    def _draw(self, z):
        rows, start = [], 0
        for s in self.layout.slots:
            mean, cov = self.rows(s.index)
            evals, evecs = torch.linalg.eigh(cov)  # fixed entries: zero variance, eigen root handles them
            root = evecs * evals.clamp_min(0).sqrt()[..., None, :]
            zl = z[:, start : start + mean.numel()].reshape(-1, *mean.shape)  # (S, d_out, p)
            start += mean.numel()
            rows.append((mean + torch.einsum("npq,snq->snp", root, zl)).permute(1, 2, 0))  # (d_out, p, S)
        return self.layout.scatter(rows, self.mean_0).T


class DiagBelief(_RowBelief):
    """Independent weights: a variance per entry."""

    key = "diag"
    w_kind = "diag"

    def _row_var(self, cov):
        return cov

    def _row_cov_jac(self, cov, jac):
        return cov[..., None] * jac.permute(1, 2, 0)

    def dense_cov(self) -> torch.Tensor:
        return torch.diag(self.marginal_var())

    def cov_jac(self, J):
        return self.marginal_var()[:, None] * J.mT

    def _guarded(self, index, mean, cov):
        g = self.guards
        if g.jitter > 0:
            g.counts["jitter"] += 1
            cov = cov + g.jitter * getattr(self, f"mask_{index}").to(cov.dtype)
        if g.psd_repair and (cov < 0).any():
            g.counts["psd_repair"] += int((cov < 0).sum())
            cov = cov.clamp_min(0)
        return mean, cov

    def _draw(self, z):
        return self.mean + self.marginal_var().clamp_min(0).sqrt() * z


# ------------------------------------------------------------------------------------------------- joint beliefs


class FullBelief(Belief):
    """One dense covariance over every Bayesian weight: cross-layer and cross-neuron correlations kept."""

    key = "full"
    joint = True

    def __init__(self, layout, loc, var, guards, **_) -> None:
        super().__init__(layout, loc, var, guards)
        self.register_buffer("loc", loc.clone())
        self.register_buffer("cov", torch.diag(var))

    @property
    def mean(self):
        return self.loc

    def marginal_var(self):
        return torch.diagonal(self.cov).clone()

    def dense_cov(self):
        return self.cov

    def cov_jac(self, J):
        return self.cov @ J.mT

    def condition(self, c, S, resid, *, R, J=None) -> None:  # noqa: D102
        K = torch.linalg.solve(S, c.mT).mT  # c S⁻¹: (D, m)
        mean, cov = self.loc + K @ resid, self.cov - K @ c.mT
        cov = 0.5 * (cov + cov.mT)
        g = self.guards
        if g.jitter > 0:
            g.counts["jitter"] += 1
            cov = cov + g.jitter * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        if g.psd_repair:
            evals, evecs = torch.linalg.eigh(cov)
            if (evals < 0).any():
                g.counts["psd_repair"] += 1
                cov = (evecs * evals.clamp_min(0)) @ evecs.mT
        self._check_finite("the full covariance", mean, cov)
        self.loc.copy_(mean)
        self.cov.copy_(cov)

    def add_process_noise(self, q):
        self.cov.diagonal().add_(q)

    def reweigh_data(self, c, prior_loc, prior_var) -> None:  # noqa: D102
        mu, P = _reweighed(self.loc, self.cov, prior_loc, 1.0 / prior_var, c)
        self._check_finite(f"the full covariance (reweighing the data by {c:.6g}, obs_noise='auto')", mu, P)
        self.loc.copy_(mu)
        self.cov.copy_(P)

    def check_state(self, state: dict, prefix: str = "") -> None:  # noqa: D102
        check_tensor(prefix + "loc", state["loc"])
        check_psd(prefix + "cov", state["cov"])

    def _draw(self, z):
        evals, evecs = torch.linalg.eigh(self.cov)
        root = evecs * evals.clamp_min(0).sqrt()
        return self.loc + z @ root.mT


class LowRankBelief(Belief):
    """Diagonal-plus-rank-``r`` **precision** ``Λ = diag(υ) + W Wᵀ`` (LoFi form; module docstring).

    A low-rank *covariance* (diag + PCA factors) cannot shrink the variance along the many directions the data
    pin down; a low-rank *precision* can: each observation adds its information ``Jᵀ R⁻¹ J`` as new columns of
    ``W``, and truncation keeps the ``r`` strongest directions and moves the rest onto the diagonal.
    """

    key = "lowrank"
    joint = True
    DEFAULT_RANK: ClassVar[int] = 10

    TRUNCATIONS: ClassVar[tuple[str, ...]] = ("drop", "diag")

    def __init__(self, layout, loc, var, guards, *, rank: int | None = None, truncation: str = "drop", **_) -> None:
        super().__init__(layout, loc, var, guards)
        rank = self.DEFAULT_RANK if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if truncation not in self.TRUNCATIONS:
            raise ValueError(f"truncation must be one of {self.TRUNCATIONS}, got {truncation!r}")
        self.truncation = truncation
        if guards.jitter > 0 or guards.psd_repair:
            raise ValueError("covariance='lowrank' is PSD by construction: jitter and psd_repair do not apply")
        self.rank = rank
        self.register_buffer("loc", loc.clone())
        self.register_buffer("prec_diag", 1.0 / var)  # υ (D,)
        self.register_buffer("prec_factor", torch.zeros(loc.shape[0], rank, dtype=loc.dtype, device=loc.device))
        self.n_truncations = 0  # updates that discarded a non-zero part of W̃

    @property
    def mean(self):
        return self.loc

    def _woodbury(self, W: torch.Tensor, ups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Υ⁻¹ W L⁻ᵀ, Υ⁻¹)`` with ``L Lᵀ = I + Wᵀ Υ⁻¹ W``, so that ``P = Υ⁻¹ - B Bᵀ``."""
        inv = 1.0 / ups  # (D,)
        UW = inv[:, None] * W  # Υ⁻¹ W: (D, k)
        M = torch.eye(W.shape[1], dtype=W.dtype, device=W.device) + W.mT @ UW  # (k, k)
        L = torch.linalg.cholesky(M)
        B = torch.linalg.solve_triangular(L, UW.mT, upper=False).mT  # (D, k)
        return B, inv

    def _cov_times(self, V: torch.Tensor, W: torch.Tensor | None = None, ups: torch.Tensor | None = None):
        """``P V`` for ``V`` ``(D, k)``."""
        B, inv = self._woodbury(self.prec_factor if W is None else W, self.prec_diag if ups is None else ups)
        return inv[:, None] * V - B @ (B.mT @ V)

    def marginal_var(self):
        B, inv = self._woodbury(self.prec_factor, self.prec_diag)
        return inv - (B * B).sum(-1)

    def dense_cov(self):
        B, inv = self._woodbury(self.prec_factor, self.prec_diag)
        return torch.diag(inv) - B @ B.mT

    def precision(self) -> torch.Tensor:
        """``Λ`` ``(D, D)`` (dense)."""
        return torch.diag(self.prec_diag) + self.prec_factor @ self.prec_factor.mT

    def cov_jac(self, J):
        return self._cov_times(J.mT)

    def condition(self, c, S, resid, *, R, J=None) -> None:  # noqa: D102
        if J is None:  # statistical linear regression: A = cᵀ Λ, noise R + Ω with Ω = Cov_f(y) - A c = S - R - A c
            J = (self.prec_diag[:, None] * c + self.prec_factor @ (self.prec_factor.mT @ c)).mT  # (m, D)
            omega = S - R - J @ c
            evals, evecs = torch.linalg.eigh(0.5 * (omega + omega.mT))
            R = R + (evecs * evals.clamp_min(0)) @ evecs.mT  # the regression's residual variance, PSD part
        mean = self.loc + c @ torch.linalg.solve(S, resid)  # untruncated posterior mean (Kalman form)
        L = torch.linalg.cholesky(R)
        Jt = torch.linalg.solve_triangular(L, J, upper=False)  # L⁻¹ J: (m, D)
        Wt = torch.cat([self.prec_factor, Jt.mT], dim=1)  # W̃ (D, r + m)
        lam, V = torch.linalg.eigh(Wt.mT @ Wt)  # ascending
        V = V.flip(-1)
        keep = Wt @ V[:, : self.rank]
        drop = Wt @ V[:, self.rank :]
        ups = self.prec_diag + (drop * drop).sum(-1) if self.truncation == "diag" else self.prec_diag
        if keep.shape[1] < self.rank:  # D < r: pad
            keep = torch.cat([keep, keep.new_zeros(keep.shape[0], self.rank - keep.shape[1])], 1)
        if lam.shape[0] > self.rank and lam[: lam.shape[0] - self.rank].abs().max() > 1e-12 * lam.abs().max():
            self.n_truncations += 1
        self._check_finite("the low-rank belief", mean, keep, ups)
        self.loc.copy_(mean)
        self.prec_factor.copy_(keep)
        self.prec_diag.copy_(ups)

    def scale_cov(self, f):  # noqa: D102
        self.prec_diag.div_(f)
        self.prec_factor.div_(f**0.5)

    def reweigh_data(self, c, prior_loc, prior_var) -> None:  # noqa: D102
        lam0 = 1.0 / prior_var  # (D,)
        ups, W = c * self.prec_diag + (1 - c) * lam0, c**0.5 * self.prec_factor  # Λ' = cΛ + (1-c)Λ₀
        mu = self.loc + (1 - c) * self._cov_times((lam0 * (prior_loc - self.loc))[:, None], W, ups)[:, 0]
        self._check_finite(f"the low-rank belief (reweighing the data by {c:.6g}, obs_noise='auto')", mu, ups, W)
        if not (ups > 0).all():
            raise FloatingPointError("reweighing the data (obs_noise='auto') made the diagonal precision non-positive")
        self.loc.copy_(mu)
        self.prec_diag.copy_(ups)
        self.prec_factor.copy_(W)

    def add_process_noise(self, q):
        raise ValueError("process_noise > 0 is not supported with covariance='lowrank'; supported: 'diag', 'block', "
                         "'full'")  # fmt: skip

    def _n_normals(self):
        return self.layout.dim + self.rank

    def _draw(self, z):
        D = self.loc.shape[0]
        u = z[:, :D] * self.prec_diag.sqrt() + z[:, D:] @ self.prec_factor.mT  # ~ N(0, Λ)
        return self.loc + self._cov_times(u.mT).mT  # P u ~ N(0, P Λ P) = N(0, P)

    def joint_posterior(self):
        return dist.MultivariateNormal(self.loc, precision_matrix=self.precision())

    def signature(self):
        return {"covariance": self.key, "rank": self.rank, "truncation": self.truncation}

    def _counters(self) -> dict:
        return {"n_truncations": self.n_truncations}

    def check_state(self, state: dict, prefix: str = "") -> None:  # noqa: D102
        super().check_state(state, prefix)
        if not (state["prec_diag"] > 0).all():
            raise ValueError(f"{prefix}prec_diag: the precision's diagonal must be > 0 "
                             f"(min {state['prec_diag'].min().item():.3g})")  # fmt: skip
        extra = state.get("_extra_state")
        n = extra.get("n_truncations") if isinstance(extra, dict) else None
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{prefix}_extra_state: expected {{'n_truncations': int >= 0}}, got {extra!r}")

    def get_extra_state(self) -> dict:
        return self._counters()

    def set_extra_state(self, state: dict) -> None:
        self.n_truncations = int(state.get("n_truncations", 0))


BELIEFS: dict[str, type[Belief]] = {c.key: c for c in (DiagBelief, BlockBelief, FullBelief, LowRankBelief)}
"""Registry of belief structures by ``covariance=`` key."""
