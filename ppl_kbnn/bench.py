r"""``ppl-kbnn bench``: per-sample update time and memory of the Kalman guide against its baselines.

What is measured (``run_bench`` writes ``bench.json``, ``bench.md`` and PNGs; docs/bench.md shows a run):

1. **Headline** — at the default decision-transformer size (``DTConfig(state_dim=4, act_dim=1)``:
   ``d_model`` 16, 1 layer, 1 head, context 5, the size of the pendulum study), float64, one thread:
   one ``KalmanGuide.update`` on one sample for ``covariance`` ``"diag"`` (KBT-diag) and ``"block"``
   (KBT-block), each with ``hidden`` ``"diag"`` (the guide's default) and ``"token"`` (the pendulum
   study's), against **one AdamW step of the same network on the same sample** (forward, MSE,
   backward, step, on the same Bayesian subset: every linear map). All are timed side by side in one
   loop: every repeat calls each method once on the same fresh sample, in a rotating order, so load
   changes hit all methods alike. Reported: medians (and quartiles) of wall-clock
   (``time.perf_counter``) and of the thread's CPU time (``time.thread_time``, which a busy machine
   inflates less), the ratios of the medians, and the belief bytes against the AdamW state bytes.
2. **Where the time goes** — the update split into the forward moment pass alone (``predict``), the
   forward pass plus the statistical Jacobian (``linearise``) and the whole update, and a cProfile
   table of the update.
3. **Warm-started retraining** with a FIFO memory of ``M`` samples (``Retrainer``, ``epochs`` passes
   of full-batch AdamW after each arrival), per arriving sample, steady state (buffer full), for a
   few ``M`` and the ``M`` whose buffer takes as many bytes as each belief.
4. **SVI and NUTS** — batch methods: a new sample costs a refit on all ``n`` samples; reported are the
   refit time and the refit time per sample (``/ n``), at stated (small) settings.
5. **Scaling** — ``d_model`` ∈ {16, 32, 64, 128}, layers ∈ {1, 2, 3}, context ∈ {5, 10, 20}, each
   swept from the default with the others at default, plus 2-layer networks of ``d_model`` 64 and 128,
   in float64 and float32: median update time of KBT-diag, KBT-block (``hidden="diag"``) and the AdamW
   step, belief bytes, and the growth exponent ``b`` of ``time ∝ x^b`` (least squares on log-log) per
   swept factor.
6. **Overhead** — ATen operations per update (:func:`count_ops`, ``torch.profiler``) of every headline
   method, and a small network where the per-operation overhead is all there is: a 1-50-1 ReLU MLP
   (``Linear(1, 50) → ReLU → Linear(50, 1)``, float64, one thread), its KBNN block and diag updates
   against one AdamW step of the same network, side by side (interleaved repeats, medians); also compiled
   (``KalmanGuide(..., compile=True)``: the chain's sample step compiled ahead of time with AOTInductor and
   ``update`` on its lean path, :meth:`~ppl_kbnn.engines.KBNNChain.lean_update`).

6. **Belief structures** (:mod:`ppl_kbnn.bench_beliefs`) — every belief structure and update rule of the guide
   (``block``/``diag`` + ``kbnn``, ``diag``/``lowrank``/``full`` + ``ekf``, ``lowrank`` + ``slr``) against the AdamW
   step at ``d_model`` up to 64: update time, ratios to AdamW and to KBT-block, belief bytes, growth exponents.

Timing is a plain repeated loop (warm-up calls first, then ``repeats`` timed calls per method, medians)
— the equivalent of ``torch.utils.benchmark.Timer`` with interleaving, which that Timer cannot do.
"""

from __future__ import annotations

import cProfile
import io
import json
import math
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._io import write_text_atomic
from .bench_beliefs import belief_family
from .bench_beliefs import markdown as belief_markdown
from .guide import KalmanGuide
from .inference.result import model_output, tensor_bytes
from .inference.retrain import Retrainer, point_network
from .model import BayesianModel
from .nn import DecisionTransformer, DTConfig

__all__ = [
    "FIGURES",
    "TARGETS",
    "MLP_TARGET_MS",
    "BenchSettings",
    "count_ops",
    "fit_exponent",
    "run_bench",
    "time_interleaved",
    "write_figures",
    "write_markdown",
]

FIGURES = {"times": "bench_times.png", "scaling": "bench_scaling.png", "memory": "bench_memory.png"}
"""The figures ``run_bench`` writes, by key."""

TARGETS = {"kbt-diag": 2.0, "kbt-block": 3.0}
"""Acceptance limits of (KBT update time) / (AdamW step time) at the default size, ``hidden="diag"``."""

MLP_TARGET_MS = 0.15
"""Acceptance limit of one block update of the 1-50-1 ReLU MLP at one thread, in milliseconds."""

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class BenchSettings:
    """Sizes, repeats and baseline settings of one benchmark run (:meth:`full`, :meth:`quick`, :meth:`tiny`).

    Attributes:
        state_dim, act_dim, d_model, n_layer, n_head, context: the default decision transformer
            (``DTConfig`` defaults; the pendulum study's size).
        prior_scale, obs_noise: the ``BayesianModel`` (``bayesian="all"``: every linear map).
        repeats, warmup: timed and untimed calls per method in the headline and breakdown loops.
        hidden_modes: ``hidden`` modes of the headline guides.
        adamw_lr: learning rate of the AdamW step (its cost does not depend on it).
        retrain_memories: fixed buffer sizes ``M``; the byte-matched ``M`` of each belief are added.
        retrain_epochs, retrain_repeats: epochs after each arrival; timed arrivals per ``M``.
        svi_n, svi_steps: data size and optimiser steps of the SVI fit (AutoNormal).
        nuts_n, nuts_samples, nuts_warmup, nuts_tree_depth, nuts_jit: the NUTS fit (one chain).
        scaling_d, scaling_layers, scaling_context, scaling_dtypes: the sweeps.
        scaling_extra: further ``(d_model, layers)`` configurations (context at default), outside the sweeps.
        scaling_repeats: timed calls per method and configuration; scaling_budget_s caps the time
            spent on one method at one configuration (fewer repeats for the slowest, at least 3).
        block_max_bytes: KBT-block is skipped where its belief would exceed this many bytes.
        profile_updates: updates run under cProfile.
        threads: ``torch.set_num_threads`` for the whole run (restored afterwards).
        mlp_hidden, mlp_prior_scale, mlp_obs_noise: the small MLP ``Linear(1, h) → ReLU → Linear(h, 1)``.
        mlp_repeats: timed calls per method of the MLP loop (after ``warmup`` untimed rounds).
        device: where the networks, beliefs and samples live (``"cpu"``, ``"cuda"``); the samples are drawn on the
            CPU and moved, so every device sees the same numbers. On CUDA every timed call ends with a synchronise.
        headline_compile: also time the headline's ``hidden="diag"`` updates with ``compile=headline_compile`` (off by
            default: compiling a decision transformer's propagation takes minutes); the first update is timed on its
            own (``compile_s``).
        mlp_compile: also time the MLP updates with ``KalmanGuide(..., compile=mlp_compile)`` (``True``: the sample
            step compiled ahead of time with AOTInductor, which needs a C++ compiler; a ``torch.compile`` backend
            name, e.g. ``"inductor"``; ``False``: not timed). The first, compiling update is timed on its own
            (``compile_s``); a failure to compile is recorded, not raised.
    """

    state_dim: int = 4
    act_dim: int = 1
    d_model: int = 16
    n_layer: int = 1
    n_head: int = 1
    context: int = 5
    prior_scale: float = 0.05
    obs_noise: float = 0.1
    repeats: int = 200
    warmup: int = 10
    hidden_modes: tuple[str, ...] = ("diag", "token")
    adamw_lr: float = 1e-3
    retrain_memories: tuple[int, ...] = (1, 10, 100)
    retrain_epochs: int = 5
    retrain_repeats: int = 20
    svi_n: int = 20
    svi_steps: int = 500
    nuts_n: int = 20
    nuts_samples: int = 50
    nuts_warmup: int = 50
    nuts_tree_depth: int = 6
    nuts_jit: bool = True
    scaling_d: tuple[int, ...] = (16, 32, 64, 128)
    scaling_layers: tuple[int, ...] = (1, 2, 3)
    scaling_context: tuple[int, ...] = (5, 10, 20)
    scaling_dtypes: tuple[str, ...] = ("float64", "float32")
    scaling_extra: tuple[tuple[int, int], ...] = ((64, 2), (128, 2))
    scaling_repeats: int = 50
    scaling_budget_s: float = 10.0
    block_max_bytes: int = 2 * 1024**3
    profile_updates: int = 50
    threads: int = 1
    mlp_hidden: int = 50
    mlp_prior_scale: float = 0.1
    mlp_obs_noise: float = 0.1
    mlp_repeats: int = 2000
    device: str = "cpu"
    mlp_compile: bool | str = True
    headline_compile: bool | str = False

    @classmethod
    def full(cls) -> BenchSettings:
        """The default run (measured run times: docs/bench.md)."""
        return cls()

    @classmethod
    def quick(cls) -> BenchSettings:
        """``--quick``: fewer repeats, smaller baselines, ``d_model`` up to 64 (a smoke test)."""
        return cls(repeats=40, retrain_repeats=8, svi_steps=100, nuts_samples=10, nuts_warmup=10, nuts_tree_depth=5,
                   scaling_d=(16, 32, 64), scaling_extra=((64, 2),), scaling_repeats=5, scaling_budget_s=1.0,
                   profile_updates=10, mlp_repeats=500)  # fmt: skip

    @classmethod
    def tiny(cls) -> BenchSettings:
        """A seconds-long run with every section, for tests (numbers meaningless)."""
        return cls(d_model=8, context=2, repeats=3, warmup=1, retrain_memories=(2,), retrain_epochs=1,
                   retrain_repeats=2, svi_n=4, svi_steps=3, nuts_n=4, nuts_samples=4, nuts_warmup=2,
                   nuts_tree_depth=2, nuts_jit=False, scaling_d=(8, 16), scaling_layers=(1, 2), scaling_context=(2, 3),
                   scaling_extra=((16, 2),), scaling_repeats=2, scaling_budget_s=0.2, profile_updates=2, mlp_hidden=8,
                   mlp_repeats=3, mlp_compile=False)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# problems


@dataclass
class _Problem:
    """A decision transformer made Bayesian, a pool of random samples, and the methods' update calls."""

    net: torch.nn.Module
    model: BayesianModel
    x: dict[str, torch.Tensor] | torch.Tensor  # a dict for a decision transformer, a tensor for an MLP
    y: torch.Tensor

    def sample(self, i: int) -> tuple[dict[str, torch.Tensor] | torch.Tensor, torch.Tensor]:
        i = i % self.y.shape[0]
        if isinstance(self.x, torch.Tensor):
            return self.x[i : i + 1], self.y[i : i + 1]
        return {k: v[i : i + 1] for k, v in self.x.items()}, self.y[i : i + 1]

    def batch(self, n: int) -> tuple[dict[str, torch.Tensor] | torch.Tensor, torch.Tensor]:
        if isinstance(self.x, torch.Tensor):
            return self.x[:n], self.y[:n]
        return {k: v[:n] for k, v in self.x.items()}, self.y[:n]

    @property
    def n_params(self) -> int:
        return sum(loc.numel() for loc, _ in self.model.priors.values())

    @property
    def sample_bytes(self) -> int:
        x, y = self.sample(0)
        return tensor_bytes(x) + tensor_bytes(y)


def _problem(s: BenchSettings, *, d_model: int, n_layer: int, context: int, dtype: torch.dtype, n: int, seed: int
             ) -> _Problem:  # fmt: skip
    cfg = DTConfig(state_dim=s.state_dim, act_dim=s.act_dim, d_model=d_model, n_layer=n_layer, n_head=s.n_head,
                   context=context)  # fmt: skip
    torch.manual_seed(seed)
    net = DecisionTransformer(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = {
        "returns_to_go": torch.randn(n, context, 1, generator=g, dtype=dtype),
        "states": torch.randn(n, context, s.state_dim, generator=g, dtype=dtype),
        "actions": torch.randn(n, context, s.act_dim, generator=g, dtype=dtype).tanh(),
        "timesteps": torch.randint(0, cfg.max_ep_len, (n, context), generator=g),
    }
    with torch.no_grad():
        y = net(**x)[:, -1] + 0.1 * torch.randn(n, s.act_dim, generator=g, dtype=dtype)
    net, x, y = net.to(s.device), {k: v.to(s.device) for k, v in x.items()}, y.to(s.device)
    model = BayesianModel(net, prior_scale=s.prior_scale, obs_noise=s.obs_noise, bayesian="all")
    return _Problem(net, model, x, y)


def _synced(fn: Callable[[int], None], device: torch.device) -> Callable[[int], None]:
    """``fn`` followed by a CUDA synchronise on a CUDA device (so a timed call includes its kernels)."""
    if device.type != "cuda":
        return fn

    def call(i: int) -> None:
        fn(i)
        torch.cuda.synchronize(device)

    return call


def _adamw_step(p: _Problem, lr: float) -> tuple[Callable[[int], None], Callable[[], int]]:
    """One AdamW step of the network on sample ``i`` (forward, MSE, backward, step) and its state bytes."""
    point = point_network(p.model)
    opt = torch.optim.AdamW(point.parameters(), lr=lr)

    def step(i: int) -> None:
        x, y = p.sample(i)
        opt.zero_grad(set_to_none=True)
        loss = ((model_output(point, x) - y) ** 2).mean()
        loss.backward()
        opt.step()

    return _synced(step, p.y.device), lambda: tensor_bytes(opt.state_dict()["state"])


def _kbt_update(p: _Problem, covariance: str, hidden: str, compile: bool | str = False  # noqa: A002
                ) -> tuple[Callable[[int], None], KalmanGuide]:  # fmt: skip
    guide = KalmanGuide(p.model, covariance=covariance, hidden=hidden, compile=compile)

    def update(i: int) -> None:
        guide.update(*p.sample(i))

    return _synced(update, p.y.device), guide


def _block_bytes(p: _Problem) -> int:
    """Bytes a ``"block"`` belief of ``p`` would take (without building it)."""
    total = 0
    for name, mod in p.net.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"net.{name}.weight" in p.model.priors:
            q = mod.in_features + 1
            total += mod.out_features * (q + q * q) * mod.weight.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# timing


def _summary(wall: Sequence[float], cpu: Sequence[float]) -> dict[str, Any]:
    def q(v: Sequence[float], f: float) -> float:
        v = sorted(v)
        return v[min(len(v) - 1, max(0, round(f * (len(v) - 1))))]

    return {
        "n": len(wall),
        "median_ms": 1e3 * statistics.median(wall),
        "q25_ms": 1e3 * q(wall, 0.25),
        "q75_ms": 1e3 * q(wall, 0.75),
        "min_ms": 1e3 * min(wall),
        "cpu_median_ms": 1e3 * statistics.median(cpu),
        "cpu_min_ms": 1e3 * min(cpu),
    }


def time_interleaved(
    fns: dict[str, Callable[[int], Any]], repeats: int, warmup: int = 0, budget_s: float | None = None
) -> dict[str, dict[str, Any]]:
    """Time several calls side by side: repeat ``r`` calls every ``fn(r)`` once, in an order rotated by ``r``.

    Returns ``{name: summary}`` with the median, quartiles and minimum of the wall-clock time
    (``time.perf_counter``) and the median and minimum of the thread CPU time (``time.thread_time``), in
    milliseconds. ``warmup`` untimed rounds come first. With ``budget_s``, a method stops being timed
    once its timed calls add up to the budget (at least 3 calls each).
    """
    names = list(fns)
    for w in range(warmup):
        for name in names:
            fns[name](-1 - w)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if budget_s is not None and len(wall[name]) >= 3 and sum(wall[name]) > budget_s:
                continue
            t0, c0 = time.perf_counter(), time.thread_time()
            fns[name](r)
            c1, t1 = time.thread_time(), time.perf_counter()
            wall[name].append(t1 - t0)
            cpu[name].append(c1 - c0)
    return {n: _summary(wall[n], cpu[n]) for n in names}


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope ``b`` of ``log y = a + b log x`` (``None`` with fewer than two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def count_ops(fn: Callable[[], Any]) -> dict[str, int]:
    """ATen operations that one call of ``fn`` runs, counted with ``torch.profiler`` (CPU activity).

    Returns ``{"aten": every aten:: event, nested ones included (what the dispatcher runs: the count the
    overhead discussion uses), "top": the outermost aten:: events (the calls made from Python or autograd)}``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    return {"aten": len(events), "top": top}


# ---------------------------------------------------------------------------------------------
# sections


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled, self.t0 = enabled, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[bench {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _headline(s: BenchSettings, seed: int, log: _Log) -> dict[str, Any]:
    """KBT-diag / KBT-block updates vs one AdamW step, same net, same samples, one loop."""
    n = s.repeats + s.warmup + 1
    p = _problem(s, d_model=s.d_model, n_layer=s.n_layer, context=s.context, dtype=torch.float64, n=n, seed=seed)
    adamw, adamw_bytes = _adamw_step(p, s.adamw_lr)
    fns: dict[str, Callable[[int], None]] = {"adamw": adamw}
    guides: dict[str, KalmanGuide] = {}
    for cov in ("diag", "block"):
        for hidden in s.hidden_modes:
            fns[f"kbt-{cov}/{hidden}"], guides[f"kbt-{cov}/{hidden}"] = _kbt_update(p, cov, hidden)
    compile_s: dict[str, float] = {}
    if s.headline_compile is not False:
        for cov in ("diag", "block"):
            key = f"kbt-{cov}-compiled/diag"
            log(f"headline: compiling the kbt-{cov} update (compile={s.headline_compile!r})")
            fns[key], guides[key] = _kbt_update(p, cov, "diag", compile=s.headline_compile)
            t0 = time.perf_counter()
            fns[key](-1)  # the first update compiles
            compile_s[key] = time.perf_counter() - t0
    log(f"headline: {len(fns)} methods x {s.repeats} repeats")
    times = time_interleaved(fns, s.repeats, s.warmup)
    ops = {name: count_ops(lambda fn=fn: fn(0)) for name, fn in fns.items()}  # after the warm-up: steady state
    base = times["adamw"]
    rows = [{"method": "adamw", "hidden": None, **base, "ratio": 1.0, "cpu_ratio": 1.0,
             "state_bytes": adamw_bytes(), "memory_ratio": 1.0, "ops": ops["adamw"]}]  # fmt: skip
    for key, guide in guides.items():
        t = times[key]
        rows.append({
            "method": key.split("/")[0], "hidden": guide.hidden, **t,
            "ratio": t["median_ms"] / base["median_ms"], "cpu_ratio": t["cpu_median_ms"] / base["cpu_median_ms"],
            "state_bytes": guide.belief_bytes, "memory_ratio": guide.belief_bytes / adamw_bytes(), "ops": ops[key],
            **({"compile_s": compile_s[key]} if key in compile_s else {}),
        })  # fmt: skip
    targets = {}
    for method, limit in TARGETS.items():
        row = next(r for r in rows if r["method"] == method and r["hidden"] == "diag")
        targets[method] = {"hidden": "diag", "limit": limit, "ratio": row["ratio"], "cpu_ratio": row["cpu_ratio"],
                           "met": row["ratio"] <= limit, "cpu_met": row["cpu_ratio"] <= limit}  # fmt: skip
        comp = next((r for r in rows if r["method"] == f"{method}-compiled"), None)
        if comp is not None:
            targets[method]["compiled"] = {"ratio": comp["ratio"], "cpu_ratio": comp["cpu_ratio"],
                                           "met": comp["ratio"] <= limit,
                                           "cpu_met": comp["cpu_ratio"] <= limit}  # fmt: skip
    config = {"state_dim": s.state_dim, "act_dim": s.act_dim, "d_model": s.d_model, "n_layer": s.n_layer,
              "n_head": s.n_head, "context": s.context, "tokens": 3 * s.context, "dtype": "float64",
              "n_params": p.n_params, "prior_scale": s.prior_scale, "obs_noise": s.obs_noise,
              "bayesian": "all", "observe": p.model.observe}  # fmt: skip
    return {"config": config, "rows": rows, "targets": targets}


def _mlp(s: BenchSettings, seed: int, log: _Log) -> dict[str, Any]:
    """KBNN block and diag updates of a ``1-h-1`` ReLU MLP against one AdamW step of it, side by side."""
    n = s.mlp_repeats + s.warmup + 1
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(1, s.mlp_hidden), torch.nn.ReLU(), torch.nn.Linear(s.mlp_hidden, 1))
    net = net.to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    x = 2.0 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = torch.sin(x) + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    net, x, y = net.to(s.device), x.to(s.device), y.to(s.device)
    model = BayesianModel(net, prior_scale=s.mlp_prior_scale, obs_noise=s.mlp_obs_noise)
    p = _Problem(net, model, x, y)
    adamw, adamw_bytes = _adamw_step(p, s.adamw_lr)
    fns: dict[str, Callable[[int], None]] = {"adamw": adamw}
    guides: dict[str, KalmanGuide] = {}
    for cov in ("block", "diag"):
        fns[f"kbnn-{cov}"], guides[f"kbnn-{cov}"] = _kbt_update(p, cov, "diag")
    compiled: dict[str, Any] = {}
    if s.mlp_compile is not False:
        for cov in ("block", "diag"):
            name = f"kbnn-{cov}-compiled"
            log(f"mlp: compiling the {cov} update (compile={s.mlp_compile!r})")
            try:
                fn, guide = _kbt_update(p, cov, "diag", compile=s.mlp_compile)
                t0 = time.perf_counter()
                fn(-1)  # the first update compiles
                compiled[name] = {"compile_s": time.perf_counter() - t0}
                fns[name], guides[name] = fn, guide
            except Exception as exc:  # noqa: BLE001  (no C++ compiler, an unsupported backend: recorded)
                compiled[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    log(f"mlp 1-{s.mlp_hidden}-1: {len(fns)} methods x {s.mlp_repeats} repeats")
    times = time_interleaved(fns, s.mlp_repeats, s.warmup)
    ops = {name: count_ops(lambda fn=fn: fn(0)) for name, fn in fns.items()}
    base = times["adamw"]
    rows = []
    for name in [n for n in ("kbnn-block", "kbnn-diag", "kbnn-block-compiled", "kbnn-diag-compiled") if n in fns] + [
            "adamw"]:  # fmt: skip
        t = times[name]
        state = adamw_bytes() if name == "adamw" else guides[name].belief_bytes
        rows.append({"method": name, **t, "ratio": t["median_ms"] / base["median_ms"],
                     "cpu_ratio": t["cpu_median_ms"] / base["cpu_median_ms"], "ops": ops[name],
                     "state_bytes": state, **compiled.get(name, {})})  # fmt: skip

    def target_of(row: dict[str, Any]) -> dict[str, Any]:
        return {"limit_ms": MLP_TARGET_MS, "median_ms": row["median_ms"], "cpu_median_ms": row["cpu_median_ms"],
                "met": row["median_ms"] <= MLP_TARGET_MS, "cpu_met": row["cpu_median_ms"] <= MLP_TARGET_MS}  # fmt: skip

    by = {r["method"]: r for r in rows}
    target = target_of(by["kbnn-block"])
    if "kbnn-block-compiled" in by:
        target["compiled"] = target_of(by["kbnn-block-compiled"])
    config = {"width": s.mlp_hidden, "n_params": p.n_params, "prior_scale": s.mlp_prior_scale,
              "obs_noise": s.mlp_obs_noise, "dtype": "float64", "hidden": "diag", "compile": s.mlp_compile,
              "compile_errors": {k: v["error"] for k, v in compiled.items() if "error" in v}}  # fmt: skip
    return {"config": config, "rows": rows, "target": target}


def _breakdown(s: BenchSettings, seed: int, log: _Log) -> dict[str, Any]:
    """The KBT-diag update (``hidden="diag"``) split into forward, forward + Jacobian, and the whole update."""
    n = s.repeats + s.warmup + 1
    p = _problem(s, d_model=s.d_model, n_layer=s.n_layer, context=s.context, dtype=torch.float64, n=n, seed=seed)
    out: dict[str, Any] = {}
    for cov in ("diag", "block"):
        guide = KalmanGuide(p.model, covariance=cov, hidden="diag")
        fns = {
            "forward (predict)": lambda i, g=guide: g.predict(p.sample(i)[0]),
            "forward + Jacobian (linearise)": lambda i, g=guide: g.linearise(p.sample(i)[0]),
            "update": lambda i, g=guide: g.update(*p.sample(i)),
        }
        log(f"breakdown kbt-{cov}")
        out[f"kbt-{cov}"] = time_interleaved(fns, max(3, s.repeats // 2), s.warmup)
    # cProfile of KBT-diag updates
    guide = KalmanGuide(p.model, covariance="diag", hidden="diag")
    guide.update(*p.sample(0))
    prof = cProfile.Profile()
    prof.enable()
    for i in range(s.profile_updates):
        guide.update(*p.sample(i))
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = fn if file == "~" else f"{_short(file)}:{line}({fn})"
        rows.append({"function": where, "ncalls": nc / s.profile_updates, "tottime_ms": 1e3 * tt / s.profile_updates,
                     "cumtime_ms": 1e3 * ct / s.profile_updates})  # fmt: skip
    rows.sort(key=lambda r: -r["tottime_ms"])
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    out["profile"] = {"updates": s.profile_updates, "covariance": "diag", "hidden": "diag", "top": rows[:20],
                      "text": text.getvalue()}  # fmt: skip
    return out


def _short(file: str) -> str:
    for marker in ("site-packages/", "ppl_kbnn/"):
        if marker in file:
            return ("ppl_kbnn/" if marker == "ppl_kbnn/" else "") + file.split(marker, 1)[1]
    return os.path.basename(file)


def _retrain(s: BenchSettings, seed: int, log: _Log, belief_bytes: dict[str, int]) -> dict[str, Any]:
    """Warm-started retraining per arriving sample (buffer full), side by side with KBT-diag and AdamW."""
    probe = _problem(s, d_model=s.d_model, n_layer=s.n_layer, context=s.context, dtype=torch.float64, n=1,
                     seed=seed)  # fmt: skip
    per_sample = probe.sample_bytes
    memories: dict[int, list[str]] = {m: ["fixed"] for m in s.retrain_memories}
    for name, b in belief_bytes.items():
        memories.setdefault(max(1, b // per_sample), []).append(f"bytes of the {name} belief")
    n_extra = s.retrain_repeats + 2
    pool = max(memories) + n_extra
    p = _problem(s, d_model=s.d_model, n_layer=s.n_layer, context=s.context, dtype=torch.float64, n=pool, seed=seed)
    rows = []
    for M in sorted(memories):
        r = Retrainer(p.model, memory=M, epochs=s.retrain_epochs, lr=s.adamw_lr, seed=seed)
        r._bx, r._by = p.batch(M)  # a full buffer: the steady state of the stream
        kbt, guide = _kbt_update(p, "diag", "diag")
        adamw, _ = _adamw_step(p, s.adamw_lr)
        fns = {"retrain": lambda i, r=r, M=M: r.update(*p.sample(M + 1 + i % n_extra)), "kbt-diag": kbt, "adamw": adamw}
        log(f"retrain M={M} ({', '.join(memories[M])})")
        t = time_interleaved(fns, s.retrain_repeats, 1)
        rows.append({"memory": M, "reason": ", ".join(memories[M]), "epochs": s.retrain_epochs,
                     **t["retrain"], "state_bytes": r.memory_bytes,
                     "ratio_to_kbt_diag": t["retrain"]["median_ms"] / t["kbt-diag"]["median_ms"],
                     "ratio_to_adamw": t["retrain"]["median_ms"] / t["adamw"]["median_ms"],
                     "kbt_diag_median_ms": t["kbt-diag"]["median_ms"]})  # fmt: skip
    return {"sample_bytes": per_sample, "rows": rows}


def _svi_nuts(s: BenchSettings, seed: int, log: _Log, kbt_ms: dict[str, float]) -> dict[str, Any]:
    """One SVI fit and one NUTS fit on ``n`` samples: what a batch method pays when a sample arrives."""
    import pyro

    from .inference import nuts, svi

    rows = []
    n = max(s.svi_n, s.nuts_n)
    p = _problem(s, d_model=s.d_model, n_layer=s.n_layer, context=s.context, dtype=torch.float64, n=n, seed=seed)
    x, y = p.batch(s.svi_n)
    log(f"svi: {s.svi_steps} steps on {s.svi_n} samples")
    res = svi(p.model, x, y, guide="normal", num_steps=s.svi_steps, seed=seed, num_predict=2)
    rows.append({"method": "svi-normal", "n": s.svi_n, "settings": f"AutoNormal, {s.svi_steps} steps, 1 particle",
                 "refit_s": res.wall_seconds, "state_bytes": res.memory_bytes})  # fmt: skip
    x, y = p.batch(s.nuts_n)
    log(f"nuts: {s.nuts_warmup}+{s.nuts_samples} iterations, depth <= {s.nuts_tree_depth}, on {s.nuts_n} samples")
    res = nuts(p.model, x, y, num_samples=s.nuts_samples, warmup_steps=s.nuts_warmup, num_chains=1, seed=seed,
               max_tree_depth=s.nuts_tree_depth, jit_compile=s.nuts_jit)  # fmt: skip
    pyro.clear_param_store()
    rows.append({"method": "nuts", "n": s.nuts_n,
                 "settings": f"1 chain, {s.nuts_warmup} warm-up + {s.nuts_samples} draws, tree depth <= "
                             f"{s.nuts_tree_depth}{', JIT' if s.nuts_jit else ''}",
                 "refit_s": res.wall_seconds, "state_bytes": res.memory_bytes,
                 "acceptance_rate": res.diagnostics["acceptance_rate"][0],
                 "step_size": res.diagnostics["step_size"][0]})  # fmt: skip
    for row in rows:
        row["per_sample_ms"] = 1e3 * row["refit_s"] / row["n"]
        row["refit_ratio_to_kbt_diag"] = 1e3 * row["refit_s"] / kbt_ms["kbt-diag"]
        row["refit_ratio_to_kbt_block"] = 1e3 * row["refit_s"] / kbt_ms["kbt-block"]
    return {"rows": rows}


def _scaling(s: BenchSettings, seed: int, log: _Log) -> dict[str, Any]:
    """One-factor sweeps of d_model, layers and context around the default, float64 and float32."""
    base = {"d_model": s.d_model, "n_layer": s.n_layer, "context": s.context}
    sweeps = {"d_model": s.scaling_d, "n_layer": s.scaling_layers, "context": s.scaling_context}
    configs: list[dict[str, int]] = []
    for factor, values in sweeps.items():
        for v in values:
            c = {**base, factor: v}
            if c not in configs:
                configs.append(c)
    for d_model, n_layer in s.scaling_extra:  # outside the one-factor sweeps (not in the exponents)
        c = {**base, "d_model": d_model, "n_layer": n_layer}
        if c not in configs:
            configs.append(c)
    rows = []
    n = s.scaling_repeats + 2
    for dtype_name in s.scaling_dtypes:
        for c in configs:
            p = _problem(s, **c, dtype=_DTYPES[dtype_name], n=n, seed=seed)
            adamw, adamw_bytes = _adamw_step(p, s.adamw_lr)
            fns: dict[str, Callable[[int], None]] = {"adamw": adamw}
            guides = {}
            for cov in ("diag", "block"):
                if cov == "block" and _block_bytes(p) > s.block_max_bytes:
                    continue
                fns[f"kbt-{cov}"], guides[f"kbt-{cov}"] = _kbt_update(p, cov, "diag")
            log(f"scaling {dtype_name} d_model={c['d_model']} layers={c['n_layer']} context={c['context']}")
            try:
                t = time_interleaved(fns, s.scaling_repeats, 1, budget_s=s.scaling_budget_s)
            except (ValueError, FloatingPointError) as exc:  # e.g. a float32 belief going non-finite
                rows.append({**c, "dtype": dtype_name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            for name in fns:
                state = adamw_bytes() if name == "adamw" else guides[name].belief_bytes
                rows.append({**c, "dtype": dtype_name, "method": name, "n_params": p.n_params, **t[name],
                             "state_bytes": state,
                             "ratio": t[name]["median_ms"] / t["adamw"]["median_ms"]})  # fmt: skip
            del p, guides, fns
    exponents = _exponents(s, rows, base, sweeps)
    return {"base": base, "sweeps": {k: list(v) for k, v in sweeps.items()}, "rows": rows, "exponents": exponents,
            "hidden": "diag"}  # fmt: skip


def _exponents(s: BenchSettings, rows: list[dict[str, Any]], base: dict[str, int],
               sweeps: dict[str, Sequence[int]]) -> list[dict[str, Any]]:  # fmt: skip
    """Growth exponents per swept factor (the others at default), and in ``d_model`` at each layer count of
    ``scaling_extra`` (over the rows with that many layers: the layer sweep's default-width row and the extras)."""
    groups: list[tuple[str, str, Callable[[dict[str, Any]], bool]]] = []
    for factor, values in sweeps.items():
        groups.append((factor, factor, lambda r, f=factor, v=tuple(values): all(r[k] == base[k] for k in base
                                                                                if k != f) and r[f] in v))  # fmt: skip
    for n_layer in sorted({n for _, n in s.scaling_extra}):
        groups.append((f"d_model ({n_layer} layers)", "d_model",
                       lambda r, n=n_layer: r["n_layer"] == n and r["context"] == base["context"]))  # fmt: skip
    exponents = []
    for name, factor, keep in groups:
        for dtype_name in s.scaling_dtypes:
            for method in ("adamw", "kbt-diag", "kbt-block"):
                sel = [r for r in rows if "error" not in r and r["dtype"] == dtype_name and r["method"] == method
                       and keep(r)]  # fmt: skip
                sel.sort(key=lambda r: r[factor])
                xs = [r[factor] for r in sel]  # (an exponent in the context is the same in tokens, 3·context)
                exponents.append({
                    "factor": name, "dtype": dtype_name,
                    "method": method, "values": xs,
                    "time_exponent": fit_exponent(xs, [r["median_ms"] for r in sel]),
                    "cpu_time_exponent": fit_exponent(xs, [r["cpu_median_ms"] for r in sel]),
                    "memory_exponent": fit_exponent(xs, [r["state_bytes"] for r in sel]),
                })  # fmt: skip
    return exponents


# ---------------------------------------------------------------------------------------------
# report


def _bytes(b: float | None) -> str:
    if b is None:
        return "—"
    if b < 1024:
        return f"{int(b)} B"
    if b < 1024**2:
        return f"{b / 1024:.1f} KiB"
    if b < 1024**3:
        return f"{b / 1024**2:.1f} MiB"
    return f"{b / 1024**3:.2f} GiB"


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def _label(row: dict[str, Any]) -> str:
    if row["method"] == "adamw":
        return "AdamW step"
    return f"KBT-{row['method'].removeprefix('kbt-')} (hidden={row['hidden']})"


def _ops(row: dict[str, Any]) -> str:
    return f"{row['ops']['aten']} / {row['ops']['top']}" if "ops" in row else "—"


def _mlp_markdown(m: dict[str, Any]) -> list[str]:
    c, t = m["config"], m["target"]
    lines = [f"## Overhead: a 1-{c['width']}-1 ReLU MLP, update vs one AdamW step", "",
             f"`Linear(1, {c['width']}) → ReLU → Linear({c['width']}, 1)`, {c['n_params']} Bayesian weights, "
             f"prior scale {c['prior_scale']:g}, noise {c['obs_noise']:g}, float64, one thread; `KalmanGuide(model, "
             f"covariance=...)` (hidden=diag: KBNN) `.update(x_i, y_i)` and one AdamW step of the same network on the "
             f"same sample, side by side ({m['rows'][0]['n']} interleaved repeats, medians). ATen ops: every `aten::` "
             "event of one call in `torch.profiler` (nested ones included) / the outermost ones.", "",
             "| method | wall median (ms) | wall IQR (ms) | ratio to AdamW | CPU median (ms) | CPU ratio "
             "| ATen ops (all / top-level) | state |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    names = {"kbnn-block": "KBNN block update", "kbnn-diag": "KBNN diag update", "adamw": "AdamW step",
             "kbnn-block-compiled": "KBNN block update, compiled", "kbnn-diag-compiled": "KBNN diag update, compiled"}
    for r in m["rows"]:
        lines.append(f"| {names.get(r['method'], r['method'])} | {r['median_ms']:.3f} | {r['q25_ms']:.3f}–"
                     f"{r['q75_ms']:.3f} | {r['ratio']:.2f} | {r['cpu_median_ms']:.3f} | {r['cpu_ratio']:.2f} | "
                     f"{_ops(r)} | {_bytes(r['state_bytes'])} |")  # fmt: skip

    def verdict(t: dict[str, Any]) -> str:
        out = "met" if t["met"] else "NOT met"
        if t["met"] != t["cpu_met"]:
            out += f" on wall time, {'met' if t['cpu_met'] else 'not met'} on CPU time"
        return out

    adamw = next(r for r in m["rows"] if r["method"] == "adamw")
    lines += ["", f"Target: block update ≤ {t['limit_ms']:g} ms — {t['median_ms']:.3f} ms "
                  f"(CPU {t['cpu_median_ms']:.3f} ms): {verdict(t)}."]  # fmt: skip
    if "compiled" in t:
        tc = t["compiled"]
        secs = ", ".join(f"{names[r['method']]} {r['compile_s']:.1f} s" for r in m["rows"] if "compile_s" in r)
        how = (": the sample step compiled ahead of time with AOTInductor, called without `torch.compile`'s guards"
               if c.get("compile") is True else "")
        lines += [f"Compiled (`compile={c.get('compile')!r}`{how}) — {tc['median_ms']:.3f} ms (CPU "
                  f"{tc['cpu_median_ms']:.3f} ms), {tc['median_ms'] / adamw['median_ms']:.2f} AdamW steps: "
                  f"{verdict(tc)}. The first, compiling update took: {secs}. ATen ops of a compiled update count only "
                  "the calls outside the generated kernels."]  # fmt: skip
    for name, err in c.get("compile_errors", {}).items():
        lines.append(f"Not compiled ({names.get(name, name)}): {err}")
    lines.append("")
    return lines


def write_markdown(report: dict[str, Any], path: Path) -> str:
    """``bench.md`` from a ``bench.json`` dict (also returned as a string)."""
    h = report["headline"]
    c = h["config"]
    env = report["environment"]
    lines = ["# ppl-kbnn benchmarks", ""]
    if report.get("quick"):
        lines += ["> **SMOKE TEST (--quick): not a result.** Few repeats, tiny baselines; run without `--quick`.", ""]
    lines += [
        f"Command: `{report['command']}` — ppl-kbnn {report['version']}, seed {report['seed']}, "
        f"{'quick' if report['quick'] else 'full'} run, {report['elapsed_s']:.0f} s; torch {env['torch']}, "
        f"{env['torch_threads']} thread(s), {env['cpu_count']} CPU(s), load average "
        f"{env['load_average_start']} at the start and {env['load_average_end']} at the end.",
        "",
        "## Per-sample update vs one AdamW step (default decision-transformer size)",
        "",
        f"`DecisionTransformer(DTConfig(state_dim={c['state_dim']}, act_dim={c['act_dim']}))`: d_model {c['d_model']}, "
        f"{c['n_layer']} layer, {c['n_head']} head, context {c['context']} ({c['tokens']} tokens), {c['n_params']} "
        f"Bayesian weights (every linear map), float64. Every repeat times each method once on the same new "
        f"sample (rotating order); {h['rows'][0]['n']} repeats; medians. Wall: `perf_counter`; CPU: `thread_time`.",
        "",
        "| method | wall median (ms) | wall IQR (ms) | ratio to AdamW | CPU median (ms) | CPU ratio | state "
        "| state / AdamW state | ATen ops (all / top-level) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in h["rows"]:
        lines.append(f"| {_label(r)} | {r['median_ms']:.2f} | {r['q25_ms']:.2f}–{r['q75_ms']:.2f} | "
                     f"{r['ratio']:.2f} | {r['cpu_median_ms']:.2f} | {r['cpu_ratio']:.2f} | "
                     f"{_bytes(r['state_bytes'])} | {r['memory_ratio']:.1f} | {_ops(r)} |")  # fmt: skip
    lines += ["", "Targets (hidden=diag): " + "; ".join(
        f"{m}: ratio {t['ratio']:.2f} (CPU {t['cpu_ratio']:.2f}) ≤ {t['limit']:g} — "
        f"{'met' if t['met'] else 'NOT met'}{'' if t['met'] == t['cpu_met'] else ' on wall time, ' + ('met' if t['cpu_met'] else 'not met') + ' on CPU time'}"  # noqa: E501
        for m, t in h["targets"].items()) + "."]  # fmt: skip
    compiled = {m: t["compiled"] for m, t in h["targets"].items() if "compiled" in t}
    if compiled:
        secs = ", ".join(f"{_label(r)} {r['compile_s']:.0f} s" for r in h["rows"] if "compile_s" in r)
        lines.append("Compiled (`compile=True`): " + "; ".join(
            f"{m}: ratio {t['ratio']:.2f} (CPU {t['cpu_ratio']:.2f}) ≤ {h['targets'][m]['limit']:g} — "
            f"{'met' if t['met'] else 'NOT met'}" for m, t in compiled.items()) + f". First, compiling update: {secs}.")
    lines.append("")
    lines += _mlp_markdown(report["mlp"])
    b = report["breakdown"]
    lines += ["## Where the update time goes (hidden=diag)", "",
              "| | " + " | ".join(b_name for b_name in b if b_name != "profile") + " |",
              "|---|" + "---|" * (len(b) - 1)]  # fmt: skip
    parts = list(next(v for k, v in b.items() if k != "profile"))
    for part in parts:
        lines.append(f"| {part} | " + " | ".join(f"{v[part]['median_ms']:.2f} ms" for k, v in b.items()
                                               if k != "profile") + " |")  # fmt: skip
    prof = b["profile"]
    lines += ["", f"cProfile of {prof['updates']} KBT-diag updates (per update; top functions by own time):", "",
              "| function | calls | own (ms) | cumulative (ms) |", "|---|---|---|---|"]  # fmt: skip
    for r in prof["top"][:15]:
        lines.append(f"| `{r['function']}` | {r['ncalls']:.0f} | {r['tottime_ms']:.3f} | {r['cumtime_ms']:.3f} |")
    rt = report["retrain"]
    lines += ["", "## Warm-started retraining with memory M (per arriving sample, buffer full)", "",
              f"Each arrival: push into the FIFO buffer, then {rt['rows'][0]['epochs'] if rt['rows'] else '?'} "
              f"epochs of full-batch AdamW on it. One sample takes {rt['sample_bytes']} B.", "",
              "| M | why | median (ms) | ratio to KBT-diag | ratio to AdamW step | state (buffer + AdamW) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rt["rows"]:
        lines.append(f"| {r['memory']} | {r['reason']} | {r['median_ms']:.2f} | {r['ratio_to_kbt_diag']:.2f} | "
                     f"{r['ratio_to_adamw']:.2f} | {_bytes(r['state_bytes'])} |")  # fmt: skip
    sn = report["svi_nuts"]
    lines += ["", "## SVI and NUTS (batch methods: a new sample costs a refit)", "",
              "| method | settings | n | refit (s) | refit / n (ms) | refit / KBT-diag update "
              "| refit / KBT-block update | state |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sn["rows"]:
        lines.append(f"| {r['method']} | {r['settings']} | {r['n']} | {r['refit_s']:.2f} | {r['per_sample_ms']:.1f} | "
                     f"{r['refit_ratio_to_kbt_diag']:.0f} | {r['refit_ratio_to_kbt_block']:.0f} | "
                     f"{_bytes(r['state_bytes'])} |")  # fmt: skip
    sc = report["scaling"]
    lines += ["", "## Scaling (hidden=diag; one factor swept, the others at default)", "",
              "| dtype | d_model | layers | context | method | median (ms) | CPU median (ms) | ratio to AdamW "
              "| state |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sc["rows"]:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['d_model']} | {r['n_layer']} | {r['context']} | — | {r['error']} |"
                         " | | |")  # fmt: skip
            continue
        lines.append(f"| {r['dtype']} | {r['d_model']} | {r['n_layer']} | {r['context']} | {r['method']} | "
                     f"{r['median_ms']:.2f} | {r['cpu_median_ms']:.2f} | {r['ratio']:.1f} | "
                     f"{_bytes(r['state_bytes'])} |")  # fmt: skip
    lines += [
        "",
        "Growth exponents `b` of `time ∝ x^b` and `bytes ∝ x^b` (least squares on log-log over the sweep):",
        "",
        "| factor | dtype | method | values | time | CPU time | memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in sc["exponents"]:
        lines.append(
            f"| {e['factor']} | {e['dtype']} | {e['method']} | {', '.join(map(str, e['values']))} | "
            f"{_f(e['time_exponent'])} | {_f(e['cpu_time_exponent'])} | {_f(e['memory_exponent'])} |"
        )
    if "beliefs" in report:
        lines += belief_markdown(report["beliefs"])
    lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in FIGURES.values()), ""]
    text = "\n".join(lines)
    write_text_atomic(path, text)
    return text


def write_figures(report: dict[str, Any], out_dir: Path) -> list[str]:
    """The PNGs of :data:`FIGURES` from a ``bench.json`` dict; returns the file names written."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # per-sample cost of every method at the default size
    names, ms = [], []
    for r in report["headline"]["rows"]:
        names.append(_label(r))
        ms.append(r["median_ms"])
    for r in report["retrain"]["rows"]:
        names.append(f"retrain M={r['memory']} ({r['epochs']} epochs)")
        ms.append(r["median_ms"])
    for r in report["svi_nuts"]["rows"]:
        names.append(f"{r['method']} refit (n={r['n']})")
        ms.append(1e3 * r["refit_s"])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2))
    colors = ["0.5" if n.startswith("AdamW") else "C3" if "block" in n else "C1" if n.startswith("KBT")
              else "C0" if n.startswith("retrain") else "C2" for n in names]  # fmt: skip
    ax.barh(range(len(names)), ms, color=colors)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time to take in one sample (ms, median)")
    ax.set_title("per-sample cost at the default DT size (float64, 1 thread)")
    fig.tight_layout()
    fig.savefig(out_dir / FIGURES["times"], dpi=120)
    plt.close(fig)
    written.append(FIGURES["times"])

    sc = report["scaling"]
    for key, field, ylabel in (("scaling", "median_ms", "update time (ms, median)"),
                               ("memory", "state_bytes", "state bytes")):  # fmt: skip
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax, factor in zip(axes, ("d_model", "n_layer", "context"), strict=True):
            for dtype_name in sorted({r["dtype"] for r in sc["rows"]}):
                for method, color in (("adamw", "0.4"), ("kbt-diag", "C1"), ("kbt-block", "C3")):
                    sel = [r for r in sc["rows"] if "error" not in r and r["dtype"] == dtype_name
                           and r["method"] == method and r[factor] in sc["sweeps"][factor]
                           and all(r[k] == v for k, v in sc["base"].items() if k != factor)]  # fmt: skip
                    sel.sort(key=lambda r: r[factor])
                    if sel:
                        ls = "-" if dtype_name == "float64" else "--"
                        ax.plot([r[factor] for r in sel], [r[field] for r in sel], marker="o", color=color, ls=ls,
                                label=f"{method} {dtype_name}")  # fmt: skip
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(sc["sweeps"][factor], [str(v) for v in sc["sweeps"][factor]])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel(factor)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / FIGURES[key], dpi=120)
        plt.close(fig)
        written.append(FIGURES[key])
    return written


def _environment(threads: int) -> dict[str, Any]:
    from .cli import environment

    env = environment()
    env.pop("dtype", None)
    env["torch_threads"] = threads
    return env


def check_device(device: str) -> torch.device:
    """The benchmark's device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``; ``ValueError`` naming the problem when it is
    not one of those or CUDA is not available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch.cuda.is_available() is "
                         "False)")  # fmt: skip
    return dev


def _load() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def run_bench(
    *,
    out_dir: Path,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    command: str = "ppl-kbnn bench",
    settings: BenchSettings | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run every section, write ``bench.json``, ``bench.md`` and the PNGs into ``out_dir``; return the report.

    Args:
        out_dir: output folder (created).
        quick: :meth:`BenchSettings.quick` instead of :meth:`BenchSettings.full`.
        seed: seed of the networks and the random samples.
        progress: log each step to stderr.
        command: the command line recorded in the report.
        settings: explicit settings (override ``quick``).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``): overrides ``settings.device``. ``ValueError`` when CUDA is
            asked for and not available (:func:`check_device`).
    """
    s = settings if settings is not None else (BenchSettings.quick() if quick else BenchSettings.full())
    if device is not None:
        s = replace(s, device=device)
    check_device(s.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _Log(progress)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    load_start = _load()
    t0 = time.perf_counter()
    try:
        headline = _headline(s, seed, log)
        mlp = _mlp(s, seed, log)
        breakdown = _breakdown(s, seed, log)
        kbt = {r["method"]: r for r in headline["rows"] if r["hidden"] == "diag"}
        retrain = _retrain(s, seed, log, {m: kbt[m]["state_bytes"] for m in ("kbt-diag", "kbt-block")})
        svi_nuts = _svi_nuts(s, seed, log, {m: kbt[m]["median_ms"] for m in ("kbt-diag", "kbt-block")})
        scaling = _scaling(s, seed, log)
        beliefs = belief_family(s, seed, log, d_models=tuple(d for d in s.scaling_d if d <= 64))
    finally:
        torch.set_num_threads(old_threads)
    env = _environment(s.threads)
    env["device"] = s.device if s.device == "cpu" else f"{s.device} ({torch.cuda.get_device_name(s.device)})"
    env["load_average_start"], env["load_average_end"] = load_start, _load()
    report = {
        "version": __version__,
        "command": command,
        "seed": seed,
        "quick": quick,
        "settings": asdict(s),
        "environment": env,
        "headline": headline,
        "mlp": mlp,
        "breakdown": breakdown,
        "retrain": retrain,
        "svi_nuts": svi_nuts,
        "scaling": scaling,
        "beliefs": beliefs,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    report["figures"] = write_figures(report, out_dir)
    write_text_atomic(out_dir / "bench.json", json.dumps(report, indent=2) + "\n")
    write_markdown(report, out_dir / "bench.md")
    log(f"done: {out_dir / 'bench.md'}")
    return report
