"""Closed-form Gaussian moment propagation through every transformer operation.

Each op returns the output mean and covariance **and** the input-output cross-covariances
the Kalman backward pass needs. Sequences are ``(..., T, d)`` with a covariance in one of
the layouts of :class:`CovKind` (``"diag"``, ``"token"``, ``"joint"``). Exact ops: linear
maps with random weights, ReLU, GELU, scores ``q·k/√d``, attention × values (given A ⊥ V),
residual sums. Approximate ops (named, documented and measured in ``docs/moments``):
softmax (Taylor), LayerNorm (linearised or frozen statistics), sigmoid/tanh (probit), the
off-diagonal activation covariance (truncated Wright series).
"""

from ._checks import is_validating, set_validation, validation
from .activations import (
    ACTIVATIONS,
    ActivationMoments,
    activation_moments,
    gelu_moments,
    relu_moments,
    sigmoid_moments,
    tanh_moments,
)
from .attention import (
    AttentionValueMoments,
    ScoreMoments,
    attention_mask,
    attention_value_moments,
    score_mean,
    score_moments,
    softmax_joint_moments,
    softmax_moments,
)
from .kinds import CovKind, from_joint, marginal_var, to_joint, token_blocks
from .layernorm import LayerNormMoments, layernorm_moments
from .linear import LinearMoments, augment, linear_moments
from .residual import ResidualMoments, residual_moments

__all__ = [
    "ACTIVATIONS",
    "ActivationMoments",
    "AttentionValueMoments",
    "CovKind",
    "LayerNormMoments",
    "LinearMoments",
    "ResidualMoments",
    "ScoreMoments",
    "activation_moments",
    "attention_mask",
    "attention_value_moments",
    "augment",
    "from_joint",
    "gelu_moments",
    "is_validating",
    "layernorm_moments",
    "linear_moments",
    "marginal_var",
    "relu_moments",
    "residual_moments",
    "score_mean",
    "score_moments",
    "set_validation",
    "sigmoid_moments",
    "softmax_joint_moments",
    "softmax_moments",
    "tanh_moments",
    "to_joint",
    "token_blocks",
    "validation",
]
