"""The Kalman backward pass: output filter step, KBNN smoothing I/II, numerical guards."""

from .guards import Guards
from .steps import (
    cross_update,
    filter_step,
    filter_step_full,
    smooth_activation,
    smooth_activation_full,
    smooth_linear,
    smooth_linear_full,
    weight_update,
)

__all__ = [
    "Guards",
    "cross_update",
    "filter_step",
    "filter_step_full",
    "smooth_activation",
    "smooth_activation_full",
    "smooth_linear",
    "smooth_linear_full",
    "weight_update",
]
