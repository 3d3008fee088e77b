"""Monte-Carlo ground truth for the closed forms, with standard errors.

Every comparison of a closed form against Monte Carlo in the tests and in
``ppl-kbnn validate`` goes through these helpers, so tolerances are always stated in
Monte-Carlo standard errors (z-scores), never as magic numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .moments.kinds import CovKind, as_kind, flatten_joint, to_joint


def sample_sequence(
    mean: torch.Tensor, cov: torch.Tensor, kind: str | CovKind, n: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw ``n`` samples ``(n, ..., T, d)`` of a Gaussian sequence given in any covariance kind."""
    kind = as_kind(kind)
    T, d = mean.shape[-2:]
    if kind is CovKind.DIAG:
        eps = torch.randn((n, *mean.shape), generator=generator, dtype=mean.dtype)
        return mean + cov.sqrt() * eps
    joint = flatten_joint(to_joint(cov, kind))  # (..., Td, Td)
    return sample_gaussian(mean.reshape(*mean.shape[:-2], T * d), joint, n, generator).reshape(n, *mean.shape)


def sample_gaussian(mean: torch.Tensor, cov: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws ``(n, ..., k)`` from ``N(mean, cov)``; PSD ``cov`` may be singular (eigen square root)."""
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs * evals.clamp_min(0.0).sqrt()[..., None, :]  # cov = root rootᵀ
    eps = torch.randn((n, *mean.shape), generator=generator, dtype=mean.dtype)
    return mean + torch.einsum("...ij,n...j->n...i", root, eps)


class MCCheck(NamedTuple):
    """Closed form vs Monte Carlo: estimate, its standard error and the z-score per entry."""

    estimate: torch.Tensor
    stderr: torch.Tensor
    z: torch.Tensor

    @property
    def max_z(self) -> float:
        """Largest |z| over every checked entry (0 when nothing was checked)."""
        return float(self.z.max()) if self.z.numel() else 0.0


def _check(products: torch.Tensor, closed: torch.Tensor, atol: float) -> MCCheck:
    n = products.shape[0]
    est = products.mean(0)
    se = products.std(0) / n**0.5
    z = (est - closed).abs() / (se + atol)
    return MCCheck(est, se, z)


def mc_mean(samples: torch.Tensor, closed: torch.Tensor, atol: float = 1e-12) -> MCCheck:
    """Check ``E[x]`` (``closed``) against samples ``(n, ...)``."""
    return _check(samples, closed, atol)


def mc_cov(x: torch.Tensor, y: torch.Tensor, closed: torch.Tensor, atol: float = 1e-12) -> MCCheck:
    """Check ``Cov(x_i, y_j)`` (``closed``, ``(..., a, b)``) against samples
    ``x`` ``(n, ..., a)`` and ``y`` ``(n, ..., b)``.

    The standard error is that of the mean of the centred products ``(x_i - x̄_i)(y_j - ȳ_j)``.
    """
    xc = x - x.mean(0)
    yc = y - y.mean(0)
    prods = xc[..., :, None] * yc[..., None, :]
    n = x.shape[0]
    return _check(prods * (n / (n - 1)), closed, atol)


def mc_var(x: torch.Tensor, closed: torch.Tensor, atol: float = 1e-12) -> MCCheck:
    """Check ``Var(x)`` elementwise against samples ``(n, ...)``."""
    xc = x - x.mean(0)
    n = x.shape[0]
    return _check(xc * xc * (n / (n - 1)), closed, atol)


def sample_weight_rows(mean: torch.Tensor, cov: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws ``(n, rows, p)`` of independent weight rows: ``cov`` ``(rows, p, p)`` (block) or
    ``(rows, p)`` (diagonal); singular blocks (fixed entries) are fine."""
    if cov.dim() == 2:
        eps = torch.randn((n, *mean.shape), generator=generator, dtype=mean.dtype)
        return mean + cov.clamp_min(0.0).sqrt() * eps
    return sample_gaussian(mean, cov, n, generator)


def network_samples(
    net: torch.nn.Module,
    beliefs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    x,
    n: int,
    generator: torch.Generator,
    *,
    observe: str = "last",
    chunk: int = 500,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Push ``n`` weight draws from a Gaussian belief through the deterministic network.

    Args:
        net: the deterministic network (plain ``torch.nn.Module``; its own parameters are the fixed weights).
        beliefs: ``{linear_module_name: (mean (rows, p), cov)}``, ``p = d_in + 1`` (bias last) or ``d_in``.
        x: the network input: a tensor, or a dict of keyword arguments (decision transformer).
        observe: ``"last"`` keeps the last token's output, ``"all"`` the whole output.

    Returns:
        ``(outputs (n, ...), draws {name: (n, rows, p)})``; evaluated with ``torch.func.vmap`` in chunks.
    """
    from torch.func import functional_call, vmap

    draws = {name: sample_weight_rows(m, c, n, generator) for name, (m, c) in beliefs.items()}
    kwargs = dict(x) if isinstance(x, dict) else None

    def run(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(net, params, args=(), kwargs=kwargs) if kwargs is not None else functional_call(
            net, params, (x,)
        )
        return out[:, -1] if observe == "last" else out

    outs = []
    for start in range(0, n, chunk):
        params = {}
        for name, w in draws.items():
            w = w[start : start + chunk]
            d_in = net.get_submodule(name).in_features
            params[f"{name}.weight"] = w[..., :d_in]
            if w.shape[-1] == d_in + 1:
                params[f"{name}.bias"] = w[..., d_in]
        with torch.no_grad():
            outs.append(vmap(run)(params))
    return torch.cat(outs), draws
