r"""Moment propagation through whole transformers, and the statistical gradients of the backward pass.

:class:`Propagator` follows :class:`~ppl_kbnn.nn.Transformer` and
:class:`~ppl_kbnn.nn.DecisionTransformer` line by line, replacing each op by its moment op from
:mod:`ppl_kbnn.moments`. Every Bayesian linear map reads its weight belief (mean, per-row covariance)
from ``beliefs``; every other parameter is used at its pre-trained value.

**Hidden-state covariance modes** (``mode``), the structure kept for every hidden state ``h`` ``(T, d)``:

* ``"diag"`` — variances only (KBNN);
* ``"token"`` — full covariance within each token, tokens independent;
* ``"feature"`` — covariance of each feature across tokens, ``Cov(h_ti, h_si)``, features independent.
  The random weights are shared by all tokens, so this is the part of the cross-token covariance that
  they create. (Computed with the joint kernels and projected after every op: it measures the
  approximation, it does not save compute.)
* ``"joint"`` — full covariance over tokens and features (small models).

Attention scores and weights keep, in the ``diag``/``token`` modes, their within-row covariance
(the shared query), and everything in ``feature``/``joint``. Heads are handled by scattering: head
``h``'s queries, keys and values become ``d``-vectors that are zero outside head ``h``'s features and
rows ``(h, t)``; the score mask only lets a row see keys of its own head, so one attention call does
all heads and the ``joint`` mode keeps the covariance between heads.

**Residual cross-covariances.** ``x + g(x)`` needs ``Cov(x, g(x))``. It is carried along the branch
with the statistical Jacobian of every node (``Cov(x, f(u)) = Cov(x, u) J_fᵀ``): ``E[W]`` for linear
maps, ``diag E[φ'(u)]`` for activations (Stein's lemma, exact), the LayerNorm Jacobian at the mean, the
softmax Jacobian ``diag(p) - ppᵀ`` at the mean logits, and for the bilinear nodes
``Cov(x, S_ts) = α(Cov(x, q_t) m_{k_s} + Cov(x, k_s) m_{q_t})`` and
``Cov(x, o_t) = Σ_s Cov(x, a_ts) m_{v_s} + ā_ts Cov(x, v_s)``. Crosses are held as ``(B, X, T, n)``:
``X = d`` (the same token's features: ``diag``/``token`` modes) or ``X = T·d`` (every token's features:
``feature``/``joint``).

**Statistical gradients (the backward pass).** Covariances are detached from the autograd graph, so
differentiating the propagated output *mean* with respect to the weight means gives, node by node,
``∂E[f(u)]/∂m_u`` at fixed covariance — by Stein's lemma ``E[∇f(u)] = Cov(f(u), u) Σ_u⁻¹``, the
statistical-linearisation (RTS) gain of that node. Reverse-mode accumulation of these gains is the
KBNN smoothing chain (docs/kbt.md): ``Cov(W_n, y) = C_n ∂E[y]/∂μ_{W_n}``.

Only the means are on the autograd graph: every covariance and carried cross-covariance is computed
from detached means (nothing to record or traverse), and an activation's mean enters the graph as
``E[φ(u)] + E[φ'(u)] (m - sg(m))`` (``sg``: stop-gradient) — the same value, and the exact derivative
of the closed-form mean at fixed covariance. The result equals differentiating the whole pass with
the covariances detached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .moments import (
    activation_moments,
    attention_value_moments,
    layernorm_moments,
    linear_moments,
    residual_moments,
    score_mean,
    score_moments,
    softmax_joint_moments,
    softmax_moments,
)
from .moments.attention import _softmax_point
from .moments.attention import attention_mask as valid_pairs
from .moments.kinds import CovKind

__all__ = ["MODES", "Gauss", "Propagator"]

MODES = ("diag", "token", "feature", "joint")
_KIND = {"diag": CovKind.DIAG, "token": CovKind.TOKEN, "feature": CovKind.JOINT, "joint": CovKind.JOINT}


@dataclass
class Gauss:
    """A Gaussian sequence: ``mean`` ``(B, T, d)``; ``cov`` in the mode's layout, ``None`` if deterministic."""

    mean: torch.Tensor
    cov: torch.Tensor | None


Cross = torch.Tensor | None  # (B, X, T, n): Cov(residual input, node), see the module docstring


class Propagator:
    """Closed-form moments of a transformer's outputs under a Gaussian weight belief.

    Args:
        net: a :class:`~ppl_kbnn.nn.Transformer` or :class:`~ppl_kbnn.nn.DecisionTransformer` (its own
            parameters or buffers hold the fixed weights).
        beliefs: ``{module_name: (mean (n, p), cov)}`` for the Bayesian linear maps; ``p = d_in + 1``
            with the bias last; ``cov`` ``(n, p, p)`` (``w_kind="block"``) or ``(n, p)`` (``"diag"``).
        mode: hidden-state covariance structure, one of :data:`MODES`.
        w_kind: ``"block"`` or ``"diag"``.
        observe: ``"last"`` (the last token / last state token) or ``"all"``.
    """

    def __init__(
        self,
        net: nn.Module,
        beliefs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        *,
        mode: str = "diag",
        w_kind: str = "block",
        observe: str = "last",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"hidden mode {mode!r}: expected one of {MODES}")
        self.net, self.beliefs, self.mode, self.w_kind, self.observe = net, beliefs, mode, w_kind, observe
        self.kind = _KIND[mode]
        self.joint = self.kind is CovKind.JOINT

    # ------------------------------------------------------------------ small helpers

    def _g(self, mean: torch.Tensor, cov: torch.Tensor | None) -> Gauss:
        """A hidden state: covariance detached (statistical gradients, module docstring) and, in
        ``feature`` mode, projected onto ``Cov(h_ti, h_si)``."""
        if cov is None:
            return Gauss(mean, None)
        cov = cov.detach()
        if self.mode == "feature":
            d = mean.shape[-1]
            eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
            cov = cov * eye[:, None, :]  # keep [t, i, s, j] with i == j
        return Gauss(mean, cov)

    def _zeros(self, mean: torch.Tensor) -> torch.Tensor:
        B, T, d = mean.shape
        shape = {CovKind.DIAG: (B, T, d), CovKind.TOKEN: (B, T, d, d), CovKind.JOINT: (B, T, d, T, d)}[self.kind]
        return mean.new_zeros(shape)

    def _weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augmented weight mean ``(n, p)`` and covariance (``None``: fixed) of linear map ``name``."""
        if name in self.beliefs:
            return self.beliefs[name]
        mod = self.net.get_submodule(name)
        w = mod.weight.detach()
        if mod.bias is None:
            return w, None
        return torch.cat([w, mod.bias.detach()[:, None]], -1), None

    # ------------------------------------------------------------------ per-token nodes

    def linear(self, g: Gauss, name: str, cross: Cross = None) -> tuple[Gauss, Cross]:
        """``y_t = W u_t + b`` with the belief of ``name`` (exact); crosses ``Cov(x, y) = Cov(x, u) E[W]ᵀ``.

        The mean (``E[W] m + E[b]``, as in :func:`~ppl_kbnn.moments.linear_moments`) is the only part
        on the autograd graph; the covariance and the crosses are computed from detached means."""
        w_mean, w_cov = self._weights(name)
        d_in = g.mean.shape[-1]
        W = w_mean[:, :d_in]  # (n, d_in)
        b = w_mean[:, d_in] if w_mean.shape[1] == d_in + 1 else None
        mean = F.linear(g.mean, W, b)
        if cross is not None:  # contiguous: one (B·X·T, d_in) × (d_in, n) product instead of B·X small ones
            cross = cross.contiguous() @ W.detach().mT
        if g.cov is None and w_cov is None:
            return Gauss(mean, None), cross
        out = linear_moments(g.mean.detach(), g.cov, w_mean.detach(), w_cov, kind=self.kind, w_kind=self.w_kind,
                             need_cross=False)  # fmt: skip
        return self._g(mean, out.cov), cross

    def activation(self, g: Gauss, name: str, cross: Cross = None) -> tuple[Gauss, Cross]:
        """Elementwise ``φ`` (exact marginals for ReLU/GELU); crosses ``Cov(x, φ(u)) = Cov(x, u) diag E[φ']``."""
        if g.cov is None:
            fn = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[name]
            return Gauss(fn(g.mean), None), None
        out = activation_moments(g.mean.detach(), g.cov, activation=name, kind=self.kind, need_cross=False)
        mean = out.mean
        if g.mean.requires_grad:  # value E[φ(u)]; derivative ∂E[φ(u)]/∂m = E[φ'(u)] at fixed covariance (exact)
            mean = mean + out.dmean * (g.mean - g.mean.detach())
        if cross is not None:
            cross = cross * out.dmean[:, None]  # (B, X, T, n) * (B, 1, T, n)
        return self._g(mean, out.cov), cross

    def layernorm(self, g: Gauss, mod: nn.LayerNorm, cross: Cross = None) -> tuple[Gauss, Cross]:
        """LayerNorm, linearised at the mean with the second-order mean (named approximation);
        crosses ``Cov(x, y_t) = Cov(x, u_t) J_tᵀ``."""
        weight = None if mod.weight is None else mod.weight.detach()
        bias = None if mod.bias is None else mod.bias.detach()
        if g.cov is None:
            return Gauss(F.layer_norm(g.mean, mod.normalized_shape, weight, bias, mod.eps), None), None
        out = layernorm_moments(g.mean, g.cov, weight, bias, eps=mod.eps, kind=self.kind, need_cross=False)
        if cross is not None:
            cross = torch.einsum("bxtn,btmn->bxtm", cross, out.jac.detach())
        return self._g(out.mean, out.cov), cross

    # ------------------------------------------------------------------ residual stream

    def start_cross(self, x: Gauss) -> Cross:
        """``Cov(x, x)`` as a cross ``(B, X, T, d)``: the start of a residual branch."""
        if x.cov is None:
            return None
        B, T, d = x.mean.shape
        if self.kind is CovKind.JOINT:
            return x.cov.reshape(B, T * d, T, d)
        blocks = torch.diag_embed(x.cov) if self.kind is CovKind.DIAG else x.cov  # (B, T, d, d)
        return blocks.permute(0, 2, 1, 3)  # (B, d, T, d)

    def residual(self, x: Gauss, g: Gauss, cross: Cross) -> Gauss:
        """``x + g`` with ``Cov(x, g)`` from the branch's carried cross (``None``: independent)."""
        if x.cov is None and g.cov is None:
            return Gauss(x.mean + g.mean, None)
        B, T, d = x.mean.shape
        if cross is None:
            cxg = None
        elif self.kind is CovKind.JOINT:
            cxg = cross.reshape(B, T, d, T, d)
        elif self.kind is CovKind.TOKEN:
            cxg = cross.permute(0, 2, 1, 3)  # (B, T, d, d)
        else:
            cxg = torch.diagonal(cross, dim1=1, dim2=3)  # (B, T, d)
        cx = self._zeros(x.mean) if x.cov is None else x.cov
        cg = self._zeros(g.mean) if g.cov is None else g.cov
        out = residual_moments(x.mean, cx, g.mean, cg, cxg, kind=self.kind)
        return self._g(out.mean, out.cov)

    # ------------------------------------------------------------------ attention

    def _heads(self, n_head: int, d: int, like: torch.Tensor) -> torch.Tensor:
        """Head indicator ``E[h, f] = 1`` if feature ``f`` belongs to head ``h``: ``(H, d)``."""
        feature_head = torch.arange(d, device=like.device) // (d // n_head)  # (d,)
        return (feature_head[None, :] == torch.arange(n_head, device=like.device)[:, None]).to(like.dtype)

    def _scatter_mean(self, m: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        """``(B, T, d) -> (B, H·T, d)``: row ``(h, t)`` holds token ``t``'s head-``h`` features, zeros elsewhere."""
        B, T, d = m.shape
        return (m[:, None] * E[None, :, None, :]).reshape(B, -1, d)

    def _scatter_cov(self, c: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        """Covariance (or same-layout cross-covariance) of scattered rows, in the mode's layout."""
        H, d = E.shape
        if self.kind is CovKind.DIAG:  # (B, T, d)
            B, T, _ = c.shape
            return (c[:, None] * E[None, :, None, :]).reshape(B, H * T, d)
        if self.kind is CovKind.TOKEN:  # (B, T, d, d)
            B, T = c.shape[:2]
            EE = E[:, :, None] * E[:, None, :]  # (H, d, d)
            return (c[:, None] * EE[None, :, None]).reshape(B, H * T, d, d)
        B, T = c.shape[:2]  # joint (B, T, d, S, d)
        S = c.shape[3]
        out = c[:, None, :, :, None] * E[None, :, None, :, None, None, None] * E[None, None, None, None, :, None, :]
        return out.reshape(B, H * T, d, H * S, d)  # (B, H, T, d, H, S, d) -> rows (h, t)

    def _gather_heads(self, g: Gauss, H: int) -> Gauss:
        """``o_t = Σ_h O_(h,t)`` (each ``O_(h,t)`` lives on head ``h``'s features): concatenation of heads."""
        B, HT, d = g.mean.shape
        T = HT // H
        mean = g.mean.reshape(B, H, T, d).sum(1)
        if g.cov is None:
            return Gauss(mean, None)
        if self.kind is CovKind.DIAG:
            cov = g.cov.reshape(B, H, T, d).sum(1)
        elif self.kind is CovKind.TOKEN:
            cov = g.cov.reshape(B, H, T, d, d).sum(1)  # covariance between heads dropped
        else:
            cov = g.cov.reshape(B, H, T, d, H, T, d).sum((1, 4))
        return self._g(mean, cov)

    def _qk_cov(self, u: Gauss, Wq: torch.Tensor, Wk: torch.Tensor) -> torch.Tensor | None:
        """``Cov(q, k) = E[W_q] Cov(u) E[W_k]ᵀ`` (independent weights), in the layout ``score_moments`` takes."""
        if u.cov is None:
            return None
        if self.kind is CovKind.DIAG:
            return u.cov @ (Wq * Wk).mT  # Σ_a Wq_ia P_ta Wk_ia: (B, T, d)
        if self.kind is CovKind.TOKEN:
            return Wq @ u.cov @ Wk.mT  # (B, T, d, d)
        qk = torch.einsum("ia,btasj->btisj", Wq, torch.einsum("btasc,jc->btasj", u.cov, Wk))
        return self._g(qk, qk).cov if self.mode == "feature" else qk  # same-feature entries only

    def attention(
        self, u: Gauss, mod: nn.Module, name: str, mask: torch.Tensor, cross: Cross = None
    ) -> tuple[Gauss, Cross]:
        r"""Multi-head causal self-attention of :class:`~ppl_kbnn.nn.CausalSelfAttention`.

        ``q, k, v`` are linear maps of ``u`` (exact moments; ``Cov(q, k)`` kept), scores exact
        (Isserlis), softmax by the second-order Taylor mean and first-order covariance over the valid
        keys, ``A·V`` with ``A`` and ``V`` independent (named approximation), then ``out_proj``.
        """
        B, T, d = u.mean.shape
        H = mod.n_head
        alpha = 1.0 / math.sqrt(mod.d_head)
        q, cq = self.linear(u, f"{name}.q_proj", cross)
        k, ck = self.linear(u, f"{name}.k_proj", cross)
        v, cv = self.linear(u, f"{name}.v_proj", cross)
        if q.cov is None and k.cov is None and v.cov is None:
            return self.linear(Gauss(self._attend_point(q.mean, k.mean, v.mean, H, mask), None), f"{name}.out_proj")
        E = self._heads(H, d, u.mean)  # (H, d)
        qs, ks, vs = (self._scatter_mean(t.mean, E) for t in (q, k, v))  # (B, HT, d)
        covs = [self._scatter_cov(t.cov if t.cov is not None else self._zeros(t.mean), E) for t in (q, k, v)]
        Wq, Wk = self._weights(f"{name}.q_proj")[0][:, :d], self._weights(f"{name}.k_proj")[0][:, :d]
        qk = self._qk_cov(u, Wq, Wk)
        qk = None if qk is None else self._scatter_cov(qk, E)
        smask = self._scatter_mask(mask, H, T)  # (B or 1, HT, HT)
        # covariances from detached means; the means (scores, softmax, A·V) on the autograd graph
        sc = score_moments(qs.detach(), covs[0], ks.detach(), covs[1], qk_cov=None if qk is None else qk.detach(),
                           kind=self.kind, scale=alpha)  # fmt: skip
        s_mean = score_mean(qs, ks, qk, kind=self.kind, scale=alpha)
        if self.joint:
            a_mean, a_cov, _ = softmax_joint_moments(s_mean, sc.cov, order=2, mask=smask.expand_as(sc.mean))
        else:
            a_mean, a_cov = softmax_moments(s_mean, sc.cov, order=2, mask=smask.expand_as(sc.mean))
        o = attention_value_moments(a_mean.detach(), a_cov.detach(), vs.detach(), covs[2], kind=self.kind,
                                    need_cross=False)  # fmt: skip
        out = self._gather_heads(self._g(a_mean @ vs, o.cov), H)
        if cross is not None:
            cross = self._attention_cross(cq, ck, cv, qs.detach(), ks.detach(), vs, sc.mean, a_mean, smask, E, alpha)
        return self.linear(out, f"{name}.out_proj", cross)

    @staticmethod
    def _scatter_mask(mask: torch.Tensor, H: int, T: int) -> torch.Tensor:
        """Valid (row, key) pairs of the scattered attention: same head and ``mask``: ``(B|1, HT, HT)``."""
        if mask.dim() == 2:
            mask = mask[None]
        same = torch.eye(H, dtype=torch.bool, device=mask.device)
        return (same[None, :, None, :, None] & mask[:, None, :, None, :]).reshape(mask.shape[0], H * T, H * T)

    @staticmethod
    def _attend_point(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, mask: torch.Tensor) -> torch.Tensor:
        """Deterministic attention (as :class:`~ppl_kbnn.nn.CausalSelfAttention`), before ``out_proj``."""
        B, T, d = q.shape
        dh = d // H
        q, k, v = (t.view(B, T, H, dh).transpose(1, 2) for t in (q, k, v))  # (B, H, T, dh)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)
        m = mask.unsqueeze(-3)
        att = F.softmax(scores.masked_fill(~m, torch.finfo(scores.dtype).min), dim=-1)
        att = torch.where(m, att, torch.zeros((), dtype=att.dtype, device=att.device))
        return (att @ v).transpose(1, 2).reshape(B, T, d)

    def _attention_cross(self, cq, ck, cv, qs, ks, vs, s_mean, a_mean, smask, E, alpha) -> torch.Tensor:
        """``Cov(x, o)`` through scores, softmax and ``A·V`` (module docstring), ``(B, X, T, d)``."""
        H = E.shape[0]

        def scatter(c: torch.Tensor) -> torch.Tensor:  # (B, X, T, n) -> (B, X, HT, n)
            B, X, T, n = c.shape
            return (c[:, :, None] * E[None, None, :, None, :]).reshape(B, X, H * T, n)

        cq, ck, cv = scatter(cq), scatter(ck), scatter(cv)
        cs = torch.einsum("bxrf,bcf->bxrc", cq, ks)  # Cov(x, q_r)·m_{k_c}
        if self.joint:
            cs = cs + torch.einsum("bxcf,brf->bxrc", ck, qs)  # + Cov(x, k_c)·m_{q_r}
        else:  # x is row r's own token: Cov(x_t, k_c) = 0 unless c is that token (c == r within the head)
            cs = cs + torch.diag_embed(torch.einsum("bxrf,brf->bxr", ck, qs))
        cs = alpha * cs * smask[:, None].to(cs.dtype)
        _, J = _softmax_point(s_mean.detach(), smask.expand_as(s_mean))  # (B, HT, HT, HT)
        ca = torch.einsum("bxrc,brcd->bxrd", cs, J)  # Cov(x, a_r) = Cov(x, S_r) J_r
        co = torch.einsum("bxrc,bcf->bxrf", ca, vs.detach())  # Σ_c Cov(x, a_rc) m_{v_c}
        if self.joint:
            co = co + torch.einsum("brc,bxcf->bxrf", a_mean.detach(), cv)  # + Σ_c ā_rc Cov(x, v_c)
        else:
            co = co + torch.diagonal(a_mean.detach(), dim1=-2, dim2=-1)[:, None, :, None] * cv
        B, X, HT, d = co.shape
        return co.reshape(B, X, H, HT // H, d).sum(2)  # heads concatenated: (B, X, T, d)

    # ------------------------------------------------------------------ blocks and networks

    def block(self, x: Gauss, name: str, mask: torch.Tensor) -> Gauss:
        """Pre-LN block: ``h = x + attn(ln1(x))``, ``y = h + mlp(ln2(h))``, residual crosses carried."""
        blk = self.net.get_submodule(name)
        c = self.start_cross(x)
        u, c = self.layernorm(x, blk.ln1, c)
        a, c = self.attention(u, blk.attn, f"{name}.attn", mask, c)
        h = self.residual(x, a, c)
        c = self.start_cross(h)
        u, c = self.layernorm(h, blk.ln2, c)
        z, c = self.linear(u, f"{name}.mlp.fc", c)
        act = "relu" if isinstance(blk.mlp.act, nn.ReLU) else "gelu"
        z, c = self.activation(z, act, c)
        z, c = self.linear(z, f"{name}.mlp.proj", c)
        return self.residual(h, z, c)

    def select(self, g: Gauss, idx: torch.Tensor) -> Gauss:
        """Tokens ``idx`` of a sequence (mean and the matching covariance entries)."""
        mean = g.mean[:, idx]
        if g.cov is None:
            return Gauss(mean, None)
        cov = g.cov[:, idx]
        if self.kind is CovKind.JOINT:
            cov = cov[:, :, :, idx]
        return Gauss(mean, cov)

    def _head(self, h: Gauss, ln: nn.LayerNorm, head: str, squash: bool) -> Gauss:
        h, _ = self.layernorm(h, ln)
        y, _ = self.linear(h, head)
        if squash:
            y, _ = self.activation(y, "tanh")
        return y

    def forward(self, x) -> Gauss:
        """Moments of the observed outputs: ``mean`` ``(B, n_tok, d_out)`` (``n_tok = 1`` for ``"last"``)."""
        from .nn import DecisionTransformer, Transformer

        if isinstance(self.net, Transformer):
            return self._transformer(x)
        if isinstance(self.net, DecisionTransformer):
            if not isinstance(x, Mapping):
                raise ValueError("a DecisionTransformer input is a dict: returns_to_go, states, actions, timesteps")
            return self._decision_transformer(**x)
        raise ValueError(f"Propagator supports Transformer and DecisionTransformer, got {type(self.net).__name__}")

    def _transformer(self, x: torch.Tensor) -> Gauss:
        net = self.net
        B, T, _ = x.shape
        h, _ = self.linear(Gauss(x, None), "embed")
        h = Gauss(h.mean + net.pos_emb.weight[:T].detach(), h.cov)  # (B, T, d)
        mask = valid_pairs(T, device=x.device)  # (T, T)
        for i in range(len(net.blocks)):
            h = self.block(h, f"blocks.{i}", mask)
        idx = torch.arange(T - 1 if self.observe == "last" else 0, T, device=x.device)
        return self._head(self.select(h, idx), net.ln_f, "head", net.out_act is not None)

    def _decision_transformer(
        self,
        returns_to_go: torch.Tensor,
        states: torch.Tensor,
        actions: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> Gauss:
        net = self.net
        pad = attention_mask
        net._check(returns_to_go, states, actions, timesteps)
        B, K, _ = states.shape
        time_emb = net.embed_timestep.weight.detach()[timesteps]  # (B, K, d)
        toks = []
        for name, inp in (("embed_return", returns_to_go), ("embed_state", states), ("embed_action", actions)):
            g, _ = self.linear(Gauss(inp, None), name)
            toks.append(Gauss(g.mean + time_emb, g.cov))
        h = self._interleave(toks)  # (B, 3K, d)
        h, _ = self.layernorm(h, net.embed_ln)
        key_padding = None if pad is None else pad.bool().repeat_interleave(3, dim=1)
        mask = valid_pairs(3 * K, key_padding=key_padding, device=states.device)
        for i in range(len(net.blocks)):
            h = self.block(h, f"blocks.{i}", mask)
        state_tokens = torch.arange(1, 3 * K, 3, device=states.device)
        idx = state_tokens[-1:] if self.observe == "last" else state_tokens
        return self._head(self.select(h, idx), net.ln_f, "predict_action", net.action_act is not None)

    def _interleave(self, toks: list[Gauss]) -> Gauss:
        """``(r_1, s_1, a_1, r_2, …)``; token types come from independent weights and inputs, so the
        covariance between types is zero."""
        B, K, d = toks[0].mean.shape
        mean = torch.stack([t.mean for t in toks], 2).reshape(B, 3 * K, d)
        if all(t.cov is None for t in toks):
            return Gauss(mean, None)
        covs = [self._zeros(t.mean) if t.cov is None else t.cov for t in toks]
        if self.kind is not CovKind.JOINT:
            cov = torch.stack(covs, 2).reshape(B, 3 * K, *covs[0].shape[2:])
            return self._g(mean, cov)
        cov = mean.new_zeros(B, K, 3, d, K, 3, d)
        for j, c in enumerate(covs):  # three token types
            cov[:, :, j, :, :, j, :] = c
        return self._g(mean, cov.reshape(B, 3 * K, d, 3 * K, d))


def full_cov(g: Gauss, kind: CovKind) -> torch.Tensor:
    """The covariance of the flattened outputs ``(B, m, m)``, ``m = n_tok · d_out``, from any layout."""
    B, T, d = g.mean.shape
    if g.cov is None:
        return g.mean.new_zeros(B, T * d, T * d)
    if kind is CovKind.DIAG:
        return torch.diag_embed(g.cov.reshape(B, T * d))
    if kind is CovKind.TOKEN:
        out = g.mean.new_zeros(B, T, d, T, d)
        idx = torch.arange(T, device=g.mean.device)
        out[:, idx, :, idx, :] = g.cov.permute(1, 0, 2, 3)  # token blocks on the diagonal
        return out.reshape(B, T * d, T * d)
    return g.cov.reshape(B, T * d, T * d)
