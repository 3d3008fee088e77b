"""Covariance structures of a random sequence ``x`` of shape ``(..., T, d)``.

A sequence of ``T`` tokens with ``d`` features each is carried as a mean ``(..., T, d)``
and a covariance in one of three layouts (the *kind*):

==========  ======================  ===============================================
kind        covariance shape        what is kept
==========  ======================  ===============================================
``diag``    ``(..., T, d)``         variances only (KBNN's hidden-state structure)
``token``   ``(..., T, d, d)``      full covariance within each token; tokens independent
``joint``   ``(..., T, d, T, d)``   everything: across features and across tokens
==========  ======================  ===============================================

``joint`` is exact bookkeeping (the weights shared by all tokens correlate them); the
other kinds drop terms, and those drops are measured against Monte Carlo in the tests
and the validation report. Every op in :mod:`ppl_kbnn.moments` takes ``kind=`` and
returns its output covariance in the same kind.
"""

from __future__ import annotations

from enum import Enum

import torch

from ._checks import check_psd, check_shape, check_tensor, check_variance, is_validating


class CovKind(str, Enum):
    """Layout of a sequence covariance (see the module docstring)."""

    DIAG = "diag"
    """Variances only, ``(..., T, d)``."""
    TOKEN = "token"
    """Full within-token covariance, tokens independent, ``(..., T, d, d)``."""
    JOINT = "joint"
    """Full covariance over tokens and features, ``(..., T, d, T, d)``."""


def as_kind(kind: str | CovKind) -> CovKind:
    """Parse a kind string, with an error that lists the valid ones."""
    if isinstance(kind, CovKind):
        return kind
    try:
        return CovKind(kind)
    except ValueError:
        valid = ", ".join(repr(k.value) for k in CovKind)
        raise ValueError(f"unknown covariance kind {kind!r}; expected one of {valid}") from None


_COV_DIMS = {CovKind.DIAG: 2, CovKind.TOKEN: 3, CovKind.JOINT: 4}
"""Event dims of a sequence covariance of each kind (the rest are batch dims)."""


def cov_event_dims(kind: str | CovKind) -> int:
    """Number of trailing (non-batch) dims of a sequence covariance of ``kind``: 2, 3 or 4."""
    return _COV_DIMS[as_kind(kind)]


def check_cov(name: str, cov: torch.Tensor, kind: str | CovKind, T: int, d: int) -> None:
    """Validate shape, finiteness, symmetry and PSD-ness of a covariance of the given kind."""
    if not is_validating():
        return
    kind = as_kind(kind)
    check_tensor(name, cov)
    if kind is CovKind.DIAG:
        check_shape(name, cov, (T, d))
        check_variance(name, cov)
    elif kind is CovKind.TOKEN:
        check_shape(name, cov, (T, d, d))
        check_psd(name, cov)
    else:
        check_shape(name, cov, (T, d, T, d))
        check_psd(name, cov.reshape(*cov.shape[:-4], T * d, T * d))


def token_blocks(cov: torch.Tensor, kind: str | CovKind) -> torch.Tensor:
    """Per-token covariance blocks ``P_tt`` as ``(..., T, d, d)`` from any kind."""
    kind = as_kind(kind)
    if kind is CovKind.DIAG:
        return torch.diag_embed(cov)
    if kind is CovKind.TOKEN:
        return cov
    # joint (..., T, d, T, d): diagonal over the two token axes -> (..., d, d, T)
    return torch.diagonal(cov, dim1=-4, dim2=-2).movedim(-1, -3)


def marginal_var(cov: torch.Tensor, kind: str | CovKind) -> torch.Tensor:
    """Marginal variances ``(..., T, d)`` from any kind."""
    kind = as_kind(kind)
    if kind is CovKind.DIAG:
        return cov
    return torch.diagonal(token_blocks(cov, kind), dim1=-2, dim2=-1)


def to_joint(cov: torch.Tensor, kind: str | CovKind) -> torch.Tensor:
    """Embed a covariance of any kind in the joint layout ``(..., T, d, T, d)`` (zeros elsewhere)."""
    kind = as_kind(kind)
    if kind is CovKind.JOINT:
        return cov
    blocks = token_blocks(cov, kind)  # (..., T, d, d)
    T = blocks.shape[-3]
    eye = torch.eye(T, dtype=blocks.dtype, device=blocks.device)
    return torch.einsum("...tij,ts->...tisj", blocks, eye)


def from_joint(cov: torch.Tensor, kind: str | CovKind) -> torch.Tensor:
    """Project a joint covariance onto ``kind`` (drops what the kind does not keep)."""
    kind = as_kind(kind)
    if kind is CovKind.JOINT:
        return cov
    if kind is CovKind.TOKEN:
        return token_blocks(cov, CovKind.JOINT)
    return marginal_var(cov, CovKind.JOINT)


def flatten_joint(cov: torch.Tensor) -> torch.Tensor:
    """``(..., T, d, T, d)`` -> ``(..., T*d, T*d)``."""
    T, d = cov.shape[-4], cov.shape[-3]
    return cov.reshape(*cov.shape[:-4], T * d, T * d)


def unflatten_joint(cov: torch.Tensor, T: int, d: int) -> torch.Tensor:
    """``(..., T*d, T*d)`` -> ``(..., T, d, T, d)``."""
    return cov.reshape(*cov.shape[:-2], T, d, T, d)
