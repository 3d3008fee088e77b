r"""Warm-started, memory-constrained retraining: the paper's non-Bayesian baseline.

A point estimate ``θ`` of the Bayesian subset starts at the pre-trained weights ``θ̂_B`` (the prior
means; the frozen rest ``θ_F`` stays fixed, exactly as in the Bayesian model, so every method adapts
the same parameters). Samples arrive one at a time, in order; a FIFO buffer keeps the last ``M``
(``memory=None``: all of them). After each arrival, ``E`` epochs of AdamW on the buffer minimise

.. math::
    L(\theta) = \frac{1}{|B|\,d} \sum_{i \in B} \lVert f(x_i; \theta) - y_i \rVert^2

(mean squared error; equal to the Gaussian negative log-likelihood with noise ``σ_obs`` up to the
factor ``2σ_obs²`` and a constant). One optimiser is kept across arrivals (warm start: weights and
Adam moments carry over). ``weight_decay`` is AdamW's decoupled decay, which pulls towards **zero**,
not towards ``θ̂``.

The deterministic network is a copy of the model whose network is turned back into plain torch
modules (:func:`point_network`): Bayesian sites become ``nn.Parameter`` s at the prior means, frozen
parameters stay buffers, and it is evaluated through the model's own ``output`` (or ``forward``), so
the input handling (tensor, tuple or dict ``x``; which outputs are observed) is the model's. No Pyro
machinery runs inside the training loop, so its timings are those of plain PyTorch training.

Predictive: ``mean = f(x; θ)``, ``std = σ_obs`` everywhere — a point estimate carries no weight
uncertainty, so its predictive std is the observation noise alone.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

import torch
from pyro.nn.module import PyroModule
from torch import nn

from .result import InferenceResult, model_output, tensor_bytes

__all__ = ["Retrainer", "point_network", "retrain"]


# ---------------------------------------------------------------------------------------------
# opaque inputs: a tensor (N, ...), a tuple / list of tensors, or a dict of tensors (dim 0 = samples)


def _take(x: Any, idx: Any) -> Any:
    """Rows ``idx`` (an index, slice or index tensor along dim 0) of a tensor / tuple / list / dict of tensors.

    Non-tensor leaves (e.g. ``None`` masks) are passed through unchanged.
    """
    if isinstance(x, torch.Tensor):
        return x[idx]
    if isinstance(x, Mapping):
        return {k: _take(v, idx) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_take(v, idx) for v in x)
    return x


def _cat(xs: list[Any]) -> Any:
    """Concatenate along dim 0 a list of inputs that share one structure (see :func:`_take`)."""
    first = xs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(xs)
    if isinstance(first, Mapping):
        return {k: _cat([x[k] for x in xs]) for k in first}
    if isinstance(first, tuple | list):
        return type(first)(_cat([x[i] for x in xs]) for i in range(len(first)))
    return first


def _length(x: Any) -> int:
    """Number of samples (size of dim 0) of an input; all its tensors must agree."""
    sizes: set[int] = set()

    def visit(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            if v.dim() == 0:
                raise ValueError("x: every tensor needs a sample dimension (dim 0)")
            sizes.add(v.shape[0])
        elif isinstance(v, Mapping):
            for w in v.values():
                visit(w)
        elif isinstance(v, tuple | list):
            for w in v:
                visit(w)

    visit(x)
    if len(sizes) != 1:
        raise ValueError(f"x: expected tensors with one common number of samples in dim 0, got sizes {sorted(sizes)}")
    return sizes.pop()


# ---------------------------------------------------------------------------------------------
# the deterministic network


def point_network(model: Any) -> nn.Module:
    """A deterministic copy of a :class:`~ppl_kbnn.model.BayesianModel` at its prior means (the pre-trained weights).

    The model is deep-copied and every module of its network turned back into its plain torch class;
    each Bayesian site ``net.<path>.<name>`` becomes an ``nn.Parameter`` initialised at its prior
    mean, frozen parameters stay buffers. Evaluate it with
    :func:`~ppl_kbnn.inference.result.model_output` (``point.output(x)``); its ``parameters()`` are
    exactly the Bayesian subset.
    """
    priors = getattr(model, "priors", None)
    if not isinstance(priors, Mapping) or not hasattr(model, "net"):
        raise ValueError(f"model must be a ppl_kbnn.BayesianModel (with .net and .priors), got {type(model).__name__}")
    point = copy.deepcopy(model)
    for module in point.net.modules():
        if isinstance(module, PyroModule):
            module.__class__ = next(c for c in type(module).__mro__ if not issubclass(c, PyroModule))
            for attr in ("_pyro_samples", "_pyro_params", "_pyro_context", "_pyro_name"):
                module.__dict__.pop(attr, None)
    for site, (loc, _) in priors.items():
        if not site.startswith("net."):
            raise ValueError(f"site {site!r} is not a parameter of model.net")
        path, _, name = site[len("net.") :].rpartition(".")
        module = point.net.get_submodule(path) if path else point.net
        module.register_parameter(name, nn.Parameter(loc.detach().clone()))
    for p in point.parameters():
        p.requires_grad_(True)
    return point


# ---------------------------------------------------------------------------------------------
# streaming retrainer


def _check_settings(memory: int | None, epochs: int, lr: float, weight_decay: float, batch_size: int | None) -> None:
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory < 1):
        raise ValueError(f"memory must be None (keep all samples) or an integer >= 1, got {memory!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None (full buffer) or an integer >= 1, got {batch_size!r}")


class Retrainer:
    """Streaming warm-started retraining with a FIFO memory of the last ``memory`` samples.

    Args:
        model: the :class:`~ppl_kbnn.model.BayesianModel` (its prior means are the starting weights,
            its Bayesian subset the trained parameters, its ``obs_noise`` the predictive std).
        memory: buffer size ``M`` (the last ``M`` samples are kept); ``None`` keeps every sample.
        epochs: passes over the buffer after each arrival.
        lr, weight_decay: AdamW settings (one optimiser for the whole stream).
        batch_size: mini-batch size (``None``: the whole buffer, one step per epoch); mini-batches
            are drawn by a seeded permutation each epoch.
        seed: seed of the mini-batch permutations.

    Attributes:
        point: the deterministic model being trained (:func:`point_network`).
        update_seconds: total time spent in :meth:`update`.
        n_updates: samples seen so far.
        buffer_losses: buffer loss (MSE) after the training that followed each arrival.
    """

    def __init__(
        self,
        model: Any,
        memory: int | None = None,
        epochs: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        _check_settings(memory, epochs, lr, weight_decay, batch_size)
        self.memory = memory
        self.epochs = epochs
        self.batch_size = batch_size
        self.obs_noise = float(model.obs_noise)
        self.point = point_network(model)
        self.optimizer = torch.optim.AdamW(self.point.parameters(), lr=lr, weight_decay=weight_decay)
        self._gen = torch.Generator().manual_seed(seed)
        self._bx: Any = None  # buffer inputs, structure of x, (B, ...)
        self._by: torch.Tensor | None = None  # buffer targets (B, ...)
        self.n_updates = 0
        self.n_steps = 0
        self.update_seconds = 0.0
        self.buffer_losses: list[float] = []

    # ------------------------------------------------------------------ buffer

    @property
    def buffer_size(self) -> int:
        """Samples currently in the buffer (``min(n_updates, memory)``)."""
        return 0 if self._by is None else self._by.shape[0]

    @property
    def buffer(self) -> tuple[Any, torch.Tensor | None]:
        """The buffer ``(x, y)``, oldest sample first (``(None, None)`` before the first update)."""
        return self._bx, self._by

    def _push(self, x1: Any, y1: torch.Tensor) -> None:
        if self._by is None:
            self._bx, self._by = x1, y1
            return
        drop = 1 if self.memory is not None and self._by.shape[0] >= self.memory else 0  # FIFO
        self._bx = _cat([_take(self._bx, slice(drop, None)), x1])
        self._by = torch.cat([self._by[drop:], y1])

    @property
    def memory_bytes(self) -> int:
        """Bytes held beyond the pre-trained weights: the buffer plus the AdamW state (moments, step counts).

        The trained weights themselves replace the pre-trained ones and are not counted (as for the
        other methods, whose counts exclude the pre-trained weights).
        """
        return tensor_bytes([self._bx, self._by]) + tensor_bytes(self.optimizer.state_dict()["state"])

    # ------------------------------------------------------------------ training

    def _loss(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        return ((model_output(self.point, x) - y) ** 2).mean()

    def buffer_loss(self) -> float:
        """The MSE of the current weights on the current buffer."""
        if self._by is None:
            raise ValueError("the buffer is empty: call update first")
        with torch.no_grad():
            return float(self._loss(self._bx, self._by))

    def _train(self) -> None:
        n = self._by.shape[0]
        bs = n if self.batch_size is None else min(self.batch_size, n)
        self.point.train()
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=self._gen) if bs < n else None
            for start in range(0, n, bs):
                if order is None:
                    bx, by = self._bx, self._by
                else:
                    idx = order[start : start + bs]
                    bx, by = _take(self._bx, idx), self._by[idx]
                self.optimizer.zero_grad()
                loss = self._loss(bx, by)
                loss.backward()
                self.optimizer.step()
                self.n_steps += 1
        self.point.eval()

    def update(self, x: Any, y: torch.Tensor) -> Retrainer:
        """Stream the samples of ``(x, y)`` in order: each is pushed into the buffer, then ``epochs`` epochs run."""
        n = _length(x)
        if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != n:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected a tensor with {n} samples in dim 0 (as x), got {got}")
        for i in range(n):
            t0 = time.perf_counter()
            self._push(_take(x, slice(i, i + 1)), y[i : i + 1].detach())
            self._train()
            self.update_seconds += time.perf_counter() - t0  # the diagnostic below is not timed
            self.n_updates += 1
            self.buffer_losses.append(self.buffer_loss())
        return self

    @torch.no_grad()
    def predict(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of ``y`` at ``x``: ``mean = f(x; θ)``, ``std = obs_noise`` (no weight uncertainty)."""
        self.point.eval()
        mean = model_output(self.point, x)
        return mean, torch.full_like(mean, self.obs_noise)


def retrain(
    model: Any,
    x: Any,
    y: torch.Tensor,
    memory: int | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> InferenceResult:
    """Stream ``(x, y)`` through a :class:`Retrainer` (see there for the arguments); returns its result.

    ``method`` is ``"retrain-all"`` (``memory=None``) or ``"retrain-M<memory>"``; ``trace`` is the
    buffer loss after each arrival; ``memory_bytes`` the buffer plus AdamW state at the end;
    diagnostics ``memory``, ``epochs``, ``buffer_size``, ``n_steps`` (optimiser steps), ``final_buffer_loss``,
    ``initial_loss`` (MSE of the pre-trained weights on all of ``(x, y)``), ``final_loss`` (on all of ``(x, y)``).
    """
    r = Retrainer(model, memory=memory, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                  seed=seed)  # fmt: skip
    n = _length(x)
    if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != n:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y: expected a tensor with {n} samples in dim 0 (as x), got {got}")
    with torch.no_grad():
        initial = float(r._loss(x, y))
    items: Any = range(n)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"retrain M={memory if memory is not None else 'all'}")
    for i in items:
        r.update(_take(x, slice(i, i + 1)), y[i : i + 1])
    with torch.no_grad():
        final = float(r._loss(x, y))
    return InferenceResult(
        method="retrain-all" if memory is None else f"retrain-M{memory}",
        predict=r.predict,
        wall_seconds=r.update_seconds,
        memory_bytes=r.memory_bytes,
        diagnostics={
            "memory": memory,
            "epochs": epochs,
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "buffer_size": r.buffer_size,
            "n_steps": r.n_steps,
            "final_buffer_loss": r.buffer_losses[-1] if r.buffer_losses else float("nan"),
            "initial_loss": initial,
            "final_loss": final,
        },
        trace=list(r.buffer_losses),
        fitted=r,
    )
