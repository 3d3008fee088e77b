"""Input validation shared by every moment op.

Every public op validates its inputs (unless validation is switched off with
:func:`set_validation`, which the guide does on its hot path after checking the
sample once) and raises a ``ValueError`` that names the argument and the problem:
shape, dtype, NaN/inf, negative variance, non-symmetric or non-PSD covariance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_VALIDATE = True


def set_validation(enabled: bool) -> None:
    """Switch argument validation of the moment ops on or off (default on)."""
    global _VALIDATE
    _VALIDATE = bool(enabled)


def is_validating() -> bool:
    """Whether the moment ops currently validate their arguments."""
    return _VALIDATE


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager: ``with validation(False): ...`` skips the checks inside."""
    old = _VALIDATE
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(old)


def _tol(x: torch.Tensor, n: int) -> float:
    """Relative tolerance for symmetry / PSD tests: 100 n eps(dtype)."""
    return 100.0 * max(n, 1) * torch.finfo(x.dtype).eps


def check_tensor(name: str, x: torch.Tensor, min_dim: int = 0) -> None:
    """``x`` is a floating tensor with at least ``min_dim`` dims and only finite entries."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(x.shape)}")
    if not (x - x).eq(0).all():  # x - x is 0 exactly for finite x, NaN for ±inf and NaN (3 ops; isfinite takes 5)
        bad = "NaN" if torch.isnan(x).any() else "inf"
        raise ValueError(f"{name}: contains {bad} entries")


def check_shape(name: str, x: torch.Tensor, shape: tuple[int | None, ...]) -> None:
    """The trailing dims of ``x`` equal ``shape`` (``None`` matches any size)."""
    tail = tuple(x.shape[x.dim() - len(shape) :]) if x.dim() >= len(shape) else None
    ok = tail is not None and all(s is None or s == t for s, t in zip(shape, tail, strict=True))
    if not ok:
        want = "(..., " + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    """All given tensors share one dtype (mixing float32/float64 is refused, not cast)."""
    dtypes = {k: v.dtype for k, v in tensors.items() if v is not None}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{k}={v}" for k, v in dtypes.items())
        raise ValueError(f"dtype mismatch: {desc}; cast the inputs to one dtype")


def check_variance(name: str, v: torch.Tensor) -> None:
    """Variances are finite and non-negative."""
    check_tensor(name, v)
    if (v < 0).any():
        raise ValueError(f"{name}: negative variance (min {v.min().item():.3g})")


def check_psd(name: str, c: torch.Tensor) -> None:
    """``c`` (..., n, n) is symmetric and positive semi-definite up to round-off."""
    check_tensor(name, c, min_dim=2)
    n = c.shape[-1]
    if c.shape[-2] != n:
        raise ValueError(f"{name}: covariance must be square in its last two dims, got {tuple(c.shape)}")
    if c.numel() == 0:
        return
    scale = c.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(c.dtype).tiny)
    tol = _tol(c, n)
    if ((c - c.mT).abs() > tol * scale).any():
        raise ValueError(f"{name}: covariance is not symmetric")
    eig_min = torch.linalg.eigvalsh(c).amin(-1)
    if (eig_min < -tol * scale[..., 0, 0]).any():
        raise ValueError(
            f"{name}: covariance is not positive semi-definite (min eigenvalue {eig_min.min().item():.3g})"
        )


def check_batch(**items: tuple[torch.Tensor | None, int]) -> None:
    """The batch dims of the given tensors broadcast together.

    Each keyword is ``name=(tensor, event_dims)``: the tensor's batch dims are all but its last ``event_dims``
    dims (e.g. 2 for a mean ``(..., T, d)``, 3 for a ``token`` covariance ``(..., T, d, d)``). ``None``
    tensors are skipped.
    """
    shapes = {name: tuple(t.shape[: max(t.dim() - k, 0)]) for name, (t, k) in items.items() if t is not None}
    try:
        torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        desc = ", ".join(f"{name} {s}" for name, s in shapes.items())
        raise ValueError(
            f"batch dimensions do not match: {desc}; expected equal (or broadcastable) leading dims"
        ) from None
