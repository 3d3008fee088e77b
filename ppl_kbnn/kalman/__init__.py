"""The Kalman backward pass: output filter step, KBNN smoothing I/II, numerical guards."""

from .guards import Guards
from .steps import filter_step, smooth_activation, smooth_linear

__all__ = ["Guards", "filter_step", "smooth_activation", "smooth_linear"]
