r"""``pretrain``: plain AdamW + MSE training of a deterministic network (the point estimate ``θ̂``).

Two ways to give the data:

* tensors ``(inputs, target)``: ``inputs`` is one tensor or a tuple of tensors, all with the
  dataset size ``N`` as first dimension; the loss of a mini-batch ``I`` is
  ``mean((model(*inputs[I]) - target[I])²)``;
* a callable ``loss_fn(model, idx) -> loss`` together with ``n_data=N``, for anything else
  (masks, custom weighting): ``idx`` is a long tensor of mini-batch indices into ``[0, N)``.

Each step draws ``batch_size`` distinct indices (all of them when ``N <= batch_size``) from a
generator seeded with ``seed``, so a run is reproducible given the model's initial weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = ["pretrain"]

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _tensor_loss(inputs: Inputs, target: torch.Tensor) -> tuple[LossFn, int]:
    xs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    n = target.shape[0]
    for i, x in enumerate(xs):
        if x.shape[0] != n:
            raise ValueError(f"inputs[{i}] has {x.shape[0]} rows but target has {n}")

    def loss_fn(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(*(x[idx] for x in xs)), target[idx])

    return loss_fn, n


def pretrain(
    model: nn.Module,
    data: tuple[Inputs, torch.Tensor] | LossFn,
    steps: int,
    *,
    n_data: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train ``model`` in place with AdamW for ``steps`` mini-batch steps; returns the loss per step.

    Args:
        model: any module; it is put in train mode during training and in eval mode afterwards.
        data: ``(inputs, target)`` tensors (MSE loss), or ``loss_fn(model, idx) -> scalar loss``.
        steps: number of optimiser steps.
        n_data: dataset size; required with a ``loss_fn``, must be omitted (or match) with tensors.
        lr, weight_decay: AdamW settings.
        batch_size: mini-batch size (capped at the dataset size).
        seed: seed of the mini-batch sampler.
        progress: show a tqdm progress bar.

    Returns:
        The mini-batch training loss before each step, ``steps`` floats.
    """
    if callable(data):
        if n_data is None:
            raise ValueError("pretrain: a loss_fn needs n_data (the dataset size)")
        loss_fn, n = data, n_data
    else:
        inputs, target = data
        loss_fn, n = _tensor_loss(inputs, target)
        if n_data is not None and n_data != n:
            raise ValueError(f"pretrain: n_data={n_data} but the tensors have {n} rows")
    if n < 1 or steps < 0 or batch_size < 1:
        raise ValueError(f"pretrain: need n_data >= 1, steps >= 0, batch_size >= 1; got {n}, {steps}, {batch_size}")

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    b = min(batch_size, n)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="pretrain")
    losses: list[float] = []
    model.train()
    for _ in it:
        idx = torch.randperm(n, generator=gen)[:b]  # (b,) distinct indices
        loss = loss_fn(model, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress:
            it.set_postfix(loss=f"{losses[-1]:.4g}")
    model.eval()
    return losses
