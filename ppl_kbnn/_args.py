"""Checks of scalar constructor arguments: type and finiteness, with a ``ValueError`` that names the argument."""

from __future__ import annotations

import math
import numbers

import torch


def real_arg(name: str, value: object, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a ``float``, checked to be a finite real number ``>= minimum`` (``> minimum`` if ``strict``).

    A Python/NumPy real or a 0-dim real tensor is accepted; a ``bool``, a string, ``None``, NaN or ±inf raise
    a ``ValueError`` that names ``name`` and says what was expected.
    """
    is_tensor = isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or is_tensor):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if is_tensor and value.is_complex():
        raise ValueError(f"{name} must be a real number, got a complex tensor")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if strict and not v > minimum:
        raise ValueError(f"{name} must be > {minimum:g}, got {v}")
    if not strict and not v >= minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {v}")
    return v


def bool_arg(name: str, value: object) -> bool:
    """``value`` checked to be a ``bool`` (a string such as ``"no"`` would otherwise read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def choice_arg(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` checked to be one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
