"""Plain (non-Bayesian) networks to pre-train and then make Bayesian: transformers and their training loop."""

from __future__ import annotations

from .train import pretrain
from .transformer import (
    MLP,
    Block,
    CausalSelfAttention,
    DecisionTransformer,
    DTConfig,
    Transformer,
    TransformerConfig,
)

__all__ = [
    "MLP",
    "Block",
    "CausalSelfAttention",
    "DTConfig",
    "DecisionTransformer",
    "Transformer",
    "TransformerConfig",
    "pretrain",
]
