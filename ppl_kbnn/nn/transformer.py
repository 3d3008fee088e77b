r"""Small pre-LayerNorm causal transformers: a generic sequence model and a Decision Transformer.

Written in the style of nanoGPT's ``model.py``: config dataclasses, one module per operation, and a
``forward`` that is a plain sequence of ops, so that a moment-propagation pass can follow it line by
line. Every linear map is an explicit :class:`torch.nn.Linear`; there is no dropout.

One block (pre-LayerNorm, as in GPT-2), for a sequence ``x`` of ``T`` tokens of width ``d``:

.. math::
    h &= x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad y = h + \mathrm{MLP}(\mathrm{LN}_2(h)) \\
    \mathrm{Attn}(z) &= W_o\,\mathrm{concat}_h\big(\mathrm{softmax}_M(q_h k_h^\top/\sqrt{d_h})\, v_h\big) + b_o,
        \quad q = W_q z + b_q,\ k = W_k z + b_k,\ v = W_v z + b_v \\
    \mathrm{MLP}(z) &= W_2\,\phi(W_1 z + b_1) + b_2, \qquad \phi \in \{\mathrm{ReLU}, \mathrm{GELU}\}

``softmax_M`` is the softmax over the *valid* keys of each query only (``M[t, s]`` true): masked
scores get weight exactly 0, and a query with no valid key at all (a padded position under a key
padding mask) gets attention output 0. This matches
:func:`ppl_kbnn.moments.attention.attention_mask` and the attention moments, and that helper builds
the masks here (imported as ``valid_pairs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..moments.attention import attention_mask as valid_pairs

__all__ = [
    "MLP",
    "Block",
    "CausalSelfAttention",
    "DTConfig",
    "DecisionTransformer",
    "Transformer",
    "TransformerConfig",
]

_ACTIVATIONS = ("relu", "gelu")


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation={name!r}: expected one of {_ACTIVATIONS}")


def _check_ints(**values: object) -> None:
    """Each value is an ``int`` (not a ``bool``, a float or a string), or a ``ValueError`` naming it."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {type(v).__name__} {v!r}")


def _check_width(d_model: int, n_head: int, n_layer: int, activation: str) -> None:
    _check_ints(d_model=d_model, n_head=n_head, n_layer=n_layer)
    if d_model < 1 or n_head < 1 or n_layer < 0:
        raise ValueError(f"need d_model >= 1, n_head >= 1, n_layer >= 0; got {d_model}, {n_head}, {n_layer}")
    if d_model % n_head != 0:
        raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {_ACTIVATIONS}")


# ---------------------------------------------------------------------------------------------
# shared building blocks


class CausalSelfAttention(nn.Module):
    r"""Multi-head self-attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``.

    ``scores = q kᵀ/√d_head`` per head, masked by a boolean mask of *valid* (query, key) pairs, then
    softmax over the valid keys, ``× v``, heads concatenated, ``out_proj``.
    """

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.d_head = d_model // n_head
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, d); ``mask`` bool, broadcastable to (B, T, T), ``True`` where query t may see key s."""
        B, T, d = x.shape
        H, dh = self.n_head, self.d_head
        q = self.q_proj(x).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        k = self.k_proj(x).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        v = self.v_proj(x).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)  # (B, H, T, T)
        mask = mask.unsqueeze(-3)  # (B, 1, T, T) or (1, T, T): same mask for every head
        # A finite "minus infinity" keeps fully masked rows free of NaN; torch.where then zeroes them.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        att = F.softmax(scores, dim=-1)  # (B, H, T, T)
        att = torch.where(mask, att, torch.zeros((), dtype=att.dtype, device=att.device))  # masked -> exactly 0
        y = att @ v  # (B, H, T, dh)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d): heads concatenated
        return self.out_proj(y)  # (B, T, d)


class MLP(nn.Module):
    """``proj(act(fc(x)))`` with hidden width ``4·d_model``."""

    def __init__(self, d_model: int, activation: str = "relu") -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.act = _activation(activation)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)  # (B, T, 4d)
        x = self.act(x)  # (B, T, 4d)
        return self.proj(x)  # (B, T, d)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_head: int, activation: str = "relu") -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)  # (B, T, d)
        x = x + self.mlp(self.ln2(x))  # (B, T, d)
        return x


# ---------------------------------------------------------------------------------------------
# generic causal sequence model


@dataclass
class TransformerConfig:
    """Configuration of :class:`Transformer`.

    Attributes:
        d_in, d_out: input and output feature sizes per token.
        d_model: residual stream width; n_layer: number of blocks; n_head: attention heads.
        max_len: longest sequence (size of the learned positional embedding).
        activation: ``"relu"`` or ``"gelu"`` in the MLPs.
        out_tanh: squash the outputs with ``tanh``.
    """

    d_in: int
    d_out: int
    d_model: int = 16
    n_layer: int = 1
    n_head: int = 1
    max_len: int = 16
    activation: str = "relu"
    out_tanh: bool = False

    def __post_init__(self) -> None:
        _check_ints(d_in=self.d_in, d_out=self.d_out, max_len=self.max_len)
        _check_width(self.d_model, self.n_head, self.n_layer, self.activation)
        if self.d_in < 1 or self.d_out < 1 or self.max_len < 1:
            raise ValueError(f"need d_in, d_out, max_len >= 1; got {self.d_in}, {self.d_out}, {self.max_len}")


class Transformer(nn.Module):
    r"""Causal sequence-to-sequence transformer ``(B, T, d_in) -> (B, T, d_out)``.

    .. math::
        h_0 = W_e x_t + b_e + p_t, \quad h_\ell = \mathrm{Block}_\ell(h_{\ell-1}), \quad
        y_t = [\tanh]\big(W_h\,\mathrm{LN}_f(h_L)_t + b_h\big)

    ``p_t`` is a learned positional embedding (``pos_emb.weight[t]``, an additive constant per
    position); output ``t`` depends on inputs ``1..t`` only.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Linear(c.d_in, c.d_model)
        self.pos_emb = nn.Embedding(c.max_len, c.d_model)
        self.blocks = nn.ModuleList([Block(c.d_model, c.n_head, c.activation) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.d_out)
        self.out_act = nn.Tanh() if c.out_tanh else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, d_in) with ``1 <= T <= max_len`` -> (B, T, d_out)."""
        c = self.config
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a floating-point tensor (B, T, d_in={c.d_in}), got {got}")
        if x.ndim != 3 or x.shape[-1] != c.d_in:
            raise ValueError(f"x: expected shape (B, T, d_in={c.d_in}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        if not torch.jit.is_tracing() and not 1 <= T <= c.max_len:  # (traced sizes are tensors: checked eagerly)
            raise ValueError(f"sequence length T={T} must be between 1 and max_len={c.max_len}")
        mask = valid_pairs(T, device=x.device)  # (T, T) causal: query t sees keys s <= t
        pos = torch.arange(T, device=x.device)  # (T,)
        h = self.embed(x) + self.pos_emb(pos)  # (B, T, d)
        for block in self.blocks:
            h = block(h, mask)  # (B, T, d)
        h = self.ln_f(h)  # (B, T, d)
        y = self.head(h)  # (B, T, d_out)
        if self.out_act is not None:
            y = self.out_act(y)
        return y


# ---------------------------------------------------------------------------------------------
# Decision Transformer


@dataclass
class DTConfig:
    """Configuration of :class:`DecisionTransformer`.

    Attributes:
        state_dim, act_dim: sizes of states and actions.
        d_model, n_layer, n_head, activation: as in :class:`TransformerConfig`.
        max_ep_len: number of timestep embeddings (timesteps must lie in ``[0, max_ep_len)``).
        context: number of steps ``K`` kept by :meth:`DecisionTransformer.get_action`.
        action_tanh: squash predicted actions with ``tanh``.
    """

    state_dim: int
    act_dim: int
    d_model: int = 16
    n_layer: int = 1
    n_head: int = 1
    max_ep_len: int = 1000
    context: int = 5
    activation: str = "relu"
    action_tanh: bool = True

    def __post_init__(self) -> None:
        _check_ints(state_dim=self.state_dim, act_dim=self.act_dim, max_ep_len=self.max_ep_len, context=self.context)
        _check_width(self.d_model, self.n_head, self.n_layer, self.activation)
        if min(self.state_dim, self.act_dim, self.max_ep_len, self.context) < 1:
            raise ValueError(
                "need state_dim, act_dim, max_ep_len, context >= 1; got "
                f"{self.state_dim}, {self.act_dim}, {self.max_ep_len}, {self.context}"
            )


class DecisionTransformer(nn.Module):
    r"""Decision Transformer (Chen et al. 2021; kzl/decision-transformer, HF ``DecisionTransformerModel``).

    Each step ``t`` gives three tokens that share the timestep embedding ``e(τ_t)``:

    .. math::
        r_t = W_R \hat R_t + b_R + e(\tau_t), \quad s_t = W_s \mathbf s_t + b_s + e(\tau_t), \quad
        a_t = W_a \mathbf a_t + b_a + e(\tau_t)

    interleaved as ``(r_1, s_1, a_1, …, r_K, s_K, a_K)``, LayerNorm'ed (``embed_ln``), passed
    through causal blocks over the ``3K`` tokens (no other positional embedding), ``ln_f``, and the
    action for step ``t`` is read at the *state* token ``s_t`` (token ``3t+1``, 0-based), so it
    depends on ``R̂_{≤t}``, ``s_{≤t}`` and ``a_{<t}`` only.
    """

    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed_return = nn.Linear(1, c.d_model)
        self.embed_state = nn.Linear(c.state_dim, c.d_model)
        self.embed_action = nn.Linear(c.act_dim, c.d_model)
        self.embed_timestep = nn.Embedding(c.max_ep_len, c.d_model)
        self.embed_ln = nn.LayerNorm(c.d_model)
        self.blocks = nn.ModuleList([Block(c.d_model, c.n_head, c.activation) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.d_model)
        self.predict_action = nn.Linear(c.d_model, c.act_dim)
        self.action_act = nn.Tanh() if c.action_tanh else None

    def _check(
        self, returns_to_go: torch.Tensor, states: torch.Tensor, actions: torch.Tensor, timesteps: torch.Tensor
    ) -> None:
        c = self.config
        for name, t in (("returns_to_go", returns_to_go), ("states", states), ("actions", actions)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a floating-point tensor, got {got}")
        if not isinstance(timesteps, torch.Tensor):
            raise ValueError(f"timesteps: expected a torch.long tensor, got {type(timesteps).__name__}")
        if states.ndim != 3 or states.shape[-1] != c.state_dim:
            raise ValueError(f"states: expected shape (B, K, state_dim={c.state_dim}), got {tuple(states.shape)}")
        B, K, _ = states.shape
        expected = {
            "returns_to_go": (returns_to_go, (B, K, 1)),
            "actions": (actions, (B, K, c.act_dim)),
            "timesteps": (timesteps, (B, K)),
        }
        for name, (t, shape) in expected.items():
            if tuple(t.shape) != shape:
                got = tuple(t.shape)
                raise ValueError(f"{name}: expected shape {shape} (from states {tuple(states.shape)}), got {got}")
        if K < 1:
            raise ValueError("need at least one step (K >= 1)")
        if timesteps.dtype != torch.long:
            raise ValueError(f"timesteps: expected dtype torch.long, got {timesteps.dtype}")
        if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() >= c.max_ep_len):
            raise ValueError(f"timesteps must lie in [0, max_ep_len={c.max_ep_len})")

    def forward(
        self,
        returns_to_go: torch.Tensor,
        states: torch.Tensor,
        actions: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Action predictions ``(B, K, act_dim)``; prediction ``t`` is read at the state token of step ``t``.

        Args:
            returns_to_go: (B, K, 1); states: (B, K, state_dim); actions: (B, K, act_dim);
            timesteps: (B, K) long, in ``[0, max_ep_len)``.
            attention_mask: optional (B, K) bool, ``True`` for real steps, ``False`` for padding.
                Padded steps are never attended to; their own outputs are meaningless.
        """
        self._check(returns_to_go, states, actions, timesteps)
        B, K, _ = states.shape
        d = self.config.d_model
        time_emb = self.embed_timestep(timesteps)  # (B, K, d)
        r = self.embed_return(returns_to_go) + time_emb  # (B, K, d)
        s = self.embed_state(states) + time_emb  # (B, K, d)
        a = self.embed_action(actions) + time_emb  # (B, K, d)
        h = torch.stack((r, s, a), dim=2).reshape(B, 3 * K, d)  # (B, 3K, d): r_1, s_1, a_1, r_2, ...
        h = self.embed_ln(h)  # (B, 3K, d)

        key_padding = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, K):
                raise ValueError(f"attention_mask: expected shape {(B, K)}, got {tuple(attention_mask.shape)}")
            key_padding = attention_mask.bool().repeat_interleave(3, dim=1)  # (B, 3K): same for r, s, a
        mask = valid_pairs(3 * K, key_padding=key_padding, device=h.device)  # (3K, 3K) or (B, 3K, 3K)

        for block in self.blocks:
            h = block(h, mask)  # (B, 3K, d)
        h = self.ln_f(h)  # (B, 3K, d)
        h_state = h.reshape(B, K, 3, d)[:, :, 1]  # (B, K, d): outputs at the state tokens
        y = self.predict_action(h_state)  # (B, K, act_dim)
        if self.action_act is not None:
            y = self.action_act(y)
        return y

    @torch.no_grad()
    def get_action(
        self,
        returns_to_go: torch.Tensor,
        states: torch.Tensor,
        actions: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """The action for the last state of one unbatched history, ``(act_dim,)``.

        Args:
            returns_to_go: (L, 1) or (L,); states: (L, state_dim); actions: (L, act_dim) (the last
                row is a placeholder for the action being chosen and does not affect the result);
            timesteps: (L,) long. Any ``L >= 1``.

        The last ``context`` steps are kept; shorter histories are left-padded with zeros to
        ``context`` steps and the padding is masked out, so the result equals
        ``forward`` on the unpadded history.
        """
        c = self.config
        if returns_to_go.ndim == 1:
            returns_to_go = returns_to_go[:, None]  # (L, 1)
        if states.ndim != 2 or states.shape[0] < 1:
            raise ValueError(f"states: expected an unbatched history (L >= 1, state_dim), got {tuple(states.shape)}")
        K = c.context
        rtg, s, a, ts = returns_to_go[-K:], states[-K:], actions[-K:], timesteps[-K:]
        L = s.shape[0]
        n_pad = K - L
        valid = torch.cat([torch.zeros(n_pad, dtype=torch.bool), torch.ones(L, dtype=torch.bool)]).to(s.device)  # (K,)

        def pad(x: torch.Tensor) -> torch.Tensor:  # (L, ...) -> (1, K, ...), zeros in front
            zeros = torch.zeros((n_pad, *x.shape[1:]), dtype=x.dtype, device=x.device)
            return torch.cat([zeros, x], dim=0)[None]

        y = self.forward(pad(rtg), pad(s), pad(a), pad(ts), attention_mask=valid[None])  # (1, K, act_dim)
        return y[0, -1]  # (act_dim,)
