r"""NUTS on the Pyro model: the sampled ground truth for the posterior ``p(θ_B | x, y)``.

.. math::
    p(\theta_B \mid x, y) \propto \mathcal N(\theta_B; \hat\theta_B, \mathrm{diag}(\sigma_0^2))
    \prod_i \mathcal N(y_i; f(x_i; \theta), \sigma_{obs}^2 I)

``num_chains`` chains of ``pyro.infer.MCMC(NUTS(model))`` are run **one after another** in this
process (or, with ``processes > 1``, side by side in spawned worker processes), chain ``c`` seeded with
``seed + c``, and stacked to ``(chains, draws, ...)`` for the diagnostics. Chains start from a draw of the
prior (``init_to_sample``): the prior is wider than the posterior, so starts are over-dispersed as
R-hat assumes, and still in the region where the pre-trained network is sensible.

Progress (``progress=True``): the chains report every iteration to the calling process, which alone draws, so
chains in worker processes do not overwrite each other: on a terminal one tqdm bar per chain, chain ``c`` on the
``c``-th free line below any bars already open (e.g. a caller's own bar), warm-up then sampling; when stderr is
not a terminal (a log file, CI) no bars but one line per stage (each chain's end of warm-up and end of sampling,
with its time and step size). Pyro's own per-chain bar is never used (each worker's would sit on the same line).

Predictive: for the ``S = chains · draws`` draws, ``mean = mean_s f(x; θ_s)`` and
``std² = var_s f(x; θ_s) + σ_obs²`` (unbiased variance over draws; the noise in closed form,
:func:`~ppl_kbnn.inference.result.draws_predictive`).
"""

from __future__ import annotations

import multiprocessing
import queue as queue_mod
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, TextIO

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_sample
from tqdm import tqdm

from . import _arviz
from .result import InferenceResult, draws_predictive, tensor_bytes

__all__ = ["nuts"]


Event = tuple[int, str, int, float, float]
"""A chain's progress report: ``(chain, phase, i, seconds, step_size)``; ``phase`` is ``"warmup"`` or ``"sample"``,
``i`` the 0-based iteration within the phase, ``seconds`` since the chain started."""


def _progress_mode(progress: bool, stream: TextIO) -> str | None:
    """``"bars"`` (``progress`` and ``stream`` is a terminal), ``"lines"`` (``progress``, not a terminal) or
    ``None`` (no ``progress``)."""
    if not progress:
        return None
    isatty = getattr(stream, "isatty", None)
    return "bars" if callable(isatty) and isatty() else "lines"


class _Reporter:
    """Chain-side progress: turns Pyro's hook calls into :data:`Event` s for ``sink`` (a callable, or a queue in a
    worker process), every iteration (``every=True``, for bars) or only at the end of each phase (for lines)."""

    def __init__(self, chain: int, warmup: int, draws: int, sink: Any, every: bool) -> None:
        self.chain, self.ends, self.every = chain, {"warmup": warmup - 1, "sample": draws - 1}, every
        self.sink = sink.put if hasattr(sink, "put") else sink
        self.t0 = time.perf_counter()

    def __call__(self, kernel: Any, stage: str, i: int) -> None:
        phase = "warmup" if stage.startswith("Warmup") else "sample"
        if self.every or i == self.ends[phase]:
            self.sink((self.chain, phase, i, time.perf_counter() - self.t0, float(kernel.step_size)))


class _Progress:
    """Caller-side progress of ``num_chains`` chains, fed with :data:`Event` s (directly, or drained from the
    workers' queue): ``mode="bars"``: one tqdm bar per chain, created in chain order on the first free lines of
    ``file`` (below bars already open in this process); ``mode="lines"``: one line per chain and phase end."""

    def __init__(self, mode: str, num_chains: int, warmup: int, draws: int, workers: int, file: TextIO) -> None:
        self.mode, self.num_chains, self.warmup, self.draws, self.file = mode, num_chains, warmup, draws, file
        self.bars: list[tqdm] = []
        if mode == "bars":
            self.bars = [tqdm(total=warmup + draws, desc=self._desc(c, "warmup"), file=file, leave=False,
                              dynamic_ncols=True) for c in range(num_chains)]  # fmt: skip
        else:
            where = f"{workers} processes side by side" if workers > 1 else "one after another"
            self._line(f"{num_chains} chain(s) × ({warmup} warm-up + {draws} draws), {where}")

    def _desc(self, chain: int, phase: str) -> str:
        return f"NUTS chain {chain + 1}/{self.num_chains} {'warm-up' if phase == 'warmup' else 'sampling'}"

    def _line(self, text: str) -> None:
        print(f"nuts: {text}", file=self.file, flush=True)

    def __call__(self, event: Event) -> None:
        chain, phase, i, seconds, step_size = event
        if self.mode == "bars":
            bar = self.bars[chain]
            done = i + 1 + (self.warmup if phase == "sample" else 0)
            if phase == "sample" and bar.n <= self.warmup:
                bar.set_description(self._desc(chain, phase), refresh=False)
            bar.set_postfix_str(f"step size {step_size:.3g}", refresh=False)
            bar.update(done - bar.n)
        elif phase == "warmup":
            self._line(f"chain {chain + 1}/{self.num_chains}: warm-up done ({i + 1} steps, {seconds:.1f} s, step size "
                       f"{step_size:.3g})")  # fmt: skip
        else:
            self._line(f"chain {chain + 1}/{self.num_chains}: sampling done ({i + 1} draws, {seconds:.1f} s)")

    def close(self) -> None:
        """Close the bars (they leave no trace)."""
        for bar in self.bars:
            bar.close()


class _Stats:
    """MCMC ``hook_fn`` recording per-draw statistics after warm-up: the step size and the mean Metropolis
    acceptance probability of the draw's tree (recovered from Pyro's running mean over the kept draws); it also
    passes every iteration to ``report`` (progress), if given."""

    def __init__(self, report: _Reporter | None = None) -> None:
        self.step_size: list[float] = []
        self.acceptance_rate: list[float] = []
        self._running = 0.0
        self.report = report

    def __call__(self, kernel: Any, params: Any, stage: str, i: int) -> None:
        if self.report is not None:
            self.report(kernel, stage, i)
        if not stage.startswith("Sample"):
            return
        running = float(getattr(kernel, "_mean_accept_prob", float("nan")))  # mean over draws 1..i+1
        self.acceptance_rate.append((i + 1) * running - i * self._running)
        self._running = running
        self.step_size.append(float(kernel.step_size))


def _chain(model: Any, x: Any, y: torch.Tensor, seed: int, settings: dict[str, Any], dtype: torch.dtype,
           chain: int = 0, sink: Any = None) -> dict:  # fmt: skip
    """One NUTS chain seeded with ``seed``: its draws ``{site: (1, D, ...)}``, per-draw statistics
    ``{stat: (1, D)}`` and per-chain diagnostics.
    Runs in this process or in a spawned worker (then with one torch thread and the parent's dtype). Progress, if
    ``sink`` is given: :data:`Event` s of chain number ``chain`` to ``sink`` (a callable or a queue)."""
    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)
        torch.set_default_dtype(dtype)
    pyro.set_rng_seed(seed)
    kernel = NUTS(model, jit_compile=settings["jit_compile"], ignore_jit_warnings=True,
                  target_accept_prob=settings["target_accept_prob"], max_tree_depth=settings["max_tree_depth"],
                  init_strategy=settings["init_strategy"], full_mass=settings["full_mass"])  # fmt: skip
    every = settings["progress"] == "bars"  # bars move every iteration; lines need the end of each phase only
    report = None if sink is None else _Reporter(chain, settings["warmup_steps"], settings["num_samples"], sink, every)
    stats = _Stats(report)
    mcmc = MCMC(kernel, num_samples=settings["num_samples"], warmup_steps=settings["warmup_steps"], num_chains=1,
                disable_progbar=True, hook_fn=stats)  # fmt: skip
    tc = time.perf_counter()
    mcmc.run(x, y)
    seconds = time.perf_counter() - tc
    diag = mcmc.diagnostics()
    divergent = diag.get("divergences", {}).get("chain 0", [])  # indices of divergent kept draws
    diverging = torch.zeros(1, settings["num_samples"], dtype=torch.bool)
    diverging[0, list(divergent)] = True
    return {
        "samples": {k: v.detach() for k, v in mcmc.get_samples(group_by_chain=True).items()},  # (1, D, ...)
        "sample_stats": {"diverging": diverging, "step_size": torch.tensor([stats.step_size]),
                         "acceptance_rate": torch.tensor([stats.acceptance_rate])},  # (1, D) each  # fmt: skip
        "divergences": len(divergent),
        "acceptance_rate": float(diag.get("acceptance rate", {}).get("chain 0", float("nan"))),
        "step_size": float(kernel.step_size),
        "seconds": seconds,
    }


def _parallel(model: Any, x: Any, y: torch.Tensor, seed: int, num_chains: int, workers: int,
              settings: dict[str, Any], shown: _Progress | None) -> list[dict]:  # fmt: skip
    """The chains in ``workers`` spawned processes; their progress events come back through a queue and are shown
    here (the only process that draws)."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked JIT or thread-pool state
    manager = ctx.Manager() if shown is not None else None
    try:
        events = manager.Queue() if manager is not None else None
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_chain, model, x, y, seed + c, settings, torch.get_default_dtype(), c, events)
                       for c in range(num_chains)]  # fmt: skip
            pending = set(futures)
            while pending:
                if events is None:
                    _, pending = wait(pending, return_when=FIRST_COMPLETED)
                    continue
                _, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                _drain(events, shown)
            if events is not None:
                _drain(events, shown)
            return [f.result() for f in futures]
    finally:
        if manager is not None:
            manager.shutdown()


def _drain(events: Any, shown: _Progress) -> None:
    """Pass every event waiting in the queue ``events`` to ``shown``."""
    while True:
        try:
            shown(events.get_nowait())
        except queue_mod.Empty:
            return


def nuts(
    model: Any,
    x: Any,
    y: torch.Tensor,
    num_samples: int = 300,
    warmup_steps: int = 200,
    num_chains: int = 2,
    *,
    seed: int = 0,
    jit_compile: bool = True,
    progress: bool = False,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    init_strategy: Callable = init_to_sample,
    full_mass: bool = False,
    processes: int = 1,
) -> InferenceResult:
    """Sample the posterior of ``model`` given ``(x, y)`` with NUTS.

    Args:
        model: a :class:`~ppl_kbnn.model.BayesianModel` (any Pyro model ``model(x, y)`` with an
            ``obs_noise`` attribute works).
        x, y: the data; ``x`` is passed to the model as is (tensor, tuple or dict), ``y`` shaped like
            the model's observed output.
        num_samples, warmup_steps: kept draws and warm-up (adaptation) steps per chain.
        num_chains: chains, run sequentially with seeds ``seed, seed+1, ...``.
        jit_compile: trace the potential energy with the PyTorch JIT (about halves the time on small
            nets; each chain compiles once).
        progress: show progress on stderr (module docstring): on a terminal one bar per chain, each on its own
            line (also with ``processes > 1``), otherwise one line per chain and stage.
        target_accept_prob, max_tree_depth: NUTS settings.
        init_strategy: Pyro init strategy of every chain (default: a draw from the prior).
        full_mass: adapt a dense mass matrix during warm-up (Pyro's ``full_mass=True``) instead of a
            diagonal one. A network posterior is strongly correlated (the data pin down combinations of
            weights), and a diagonal mass matrix leaves those directions badly conditioned: long trajectories
            and slow mixing. A dense one costs ``O(D²)`` per leapfrog step and needs warm-up draws to estimate;
            worth it for a few dozen weights; on the 873-weight tiny transformer the dense estimate from a
            few hundred warm-up draws is poor and sampling got slower (``docs/inference.md``).
        processes: run up to this many chains at once, each in a fresh (spawned) process with one torch
            thread; ``model``, ``x`` and ``y`` must pickle. Chain ``c`` is seeded ``seed + c`` either way,
            so the draws do not depend on ``processes`` (checked bit for bit in the tests). ``1`` (default): one
            after another in this process.

    Returns:
        :class:`InferenceResult` with ``samples`` ``{site: (chains·draws, ...)}`` (chain-major:
        ``samples[k].reshape(num_chains, num_samples, ...)`` gives the chains back),
        ``memory_bytes`` = bytes of the draws, and diagnostics ``max_rhat`` (rank-normalised split
        R-hat), ``min_ess_bulk``, ``min_ess_tail`` (arviz), ``divergences`` (total after warm-up),
        ``divergences_per_chain``, ``acceptance_rate`` and ``step_size`` per chain, ``chain_seconds``,
        ``num_chains``, ``num_samples``, ``warmup_steps``; ``num_chains`` and ``sample_stats`` (per draw,
        ``(chains, draws)``: ``diverging``, ``step_size``, ``acceptance_rate`` = the mean Metropolis acceptance
        probability over the draw's tree; Pyro's NUTS does not expose the tree depth or the number of leapfrog
        steps) for :meth:`~ppl_kbnn.inference.InferenceResult.to_inference_data`, which keeps the chains apart.
    """
    for name, value, low in (("num_samples", num_samples, 4), ("warmup_steps", warmup_steps, 0),
                             ("num_chains", num_chains, 1), ("max_tree_depth", max_tree_depth, 1),
                             ("processes", processes, 1)):  # fmt: skip
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 < target_accept_prob < 1:
        raise ValueError(f"target_accept_prob must be in (0, 1), got {target_accept_prob}")
    mode = _progress_mode(progress, sys.stderr)
    settings = {"num_samples": num_samples, "warmup_steps": warmup_steps, "jit_compile": jit_compile,
                "progress": mode, "target_accept_prob": target_accept_prob, "max_tree_depth": max_tree_depth,
                "init_strategy": init_strategy, "full_mass": full_mass}  # fmt: skip
    t0 = time.perf_counter()
    workers = min(num_chains, processes)
    shown = None if mode is None else _Progress(mode, num_chains, warmup_steps, num_samples, workers, sys.stderr)
    try:
        if workers > 1:
            runs = _parallel(model, x, y, seed, num_chains, workers, settings, shown)
        else:
            runs = [_chain(model, x, y, seed + c, settings, torch.get_default_dtype(), c, shown)
                    for c in range(num_chains)]  # fmt: skip
    finally:
        if shown is not None:
            shown.close()
    chains = [r["samples"] for r in runs]
    divergences = [r["divergences"] for r in runs]
    acceptance = [r["acceptance_rate"] for r in runs]
    step_sizes = [r["step_size"] for r in runs]
    seconds = [r["seconds"] for r in runs]
    wall = time.perf_counter() - t0
    grouped = {k: torch.cat([ch[k] for ch in chains]) for k in chains[0]}  # (C, D, ...)
    sample_stats = {k: torch.cat([r["sample_stats"][k] for r in runs]) for k in runs[0]["sample_stats"]}  # (C, D)
    samples = {k: v.reshape(-1, *v.shape[2:]) for k, v in grouped.items()}  # (C·D, ...), chain-major
    diagnostics: dict[str, Any] = dict(_arviz.convergence(grouped))
    diagnostics.update(
        divergences=sum(divergences),
        divergences_per_chain=divergences,
        acceptance_rate=acceptance,
        step_size=step_sizes,
        chain_seconds=seconds,
        num_chains=num_chains,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        jit_compile=jit_compile,
        full_mass=full_mass,
        processes=workers,
    )

    def predict(x_new: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return draws_predictive(model, samples, x_new)

    return InferenceResult(
        method="nuts",
        predict=predict,
        wall_seconds=wall,
        memory_bytes=tensor_bytes(samples),
        diagnostics=diagnostics,
        samples=samples,
        num_chains=num_chains,
        sample_stats=sample_stats,
        model=model,
        data=(x, y),
    )
