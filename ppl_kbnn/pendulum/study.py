"""The pendulum study: ``run_study`` and its settings. See the package docstring for the protocol."""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..envs import (
    DTDataset,
    ExpertPolicy,
    Normalizer,
    collect_episodes,
    get_task,
    make_contexts,
    success_rate,
)
from ..guide import KalmanGuide
from ..inference.result import tensor_bytes
from ..inference.retrain import Retrainer
from ..model import BayesianModel
from ..nn.train import pretrain
from ..nn.transformer import DecisionTransformer, DTConfig
from .evaluate import evaluate_dt, posterior_mean_net
from .uncertainty import POLICIES, uncertainty_study

__all__ = ["FULL", "QUICK", "StudySettings", "run_study"]

DTYPE = torch.float64  # everything (pre-training, KBT, retraining, rollouts) runs in float64
CONTEXT_KEYS = ("returns_to_go", "states", "actions", "timesteps", "attention_mask")
MEMORY_REFERENCES = ("diag", "block")


@dataclass(frozen=True)
class StudySettings:
    """Every knob of the study (defaults: the full run; :data:`QUICK` for ``--quick``).

    Data and pre-training:
        n_nominal_episodes, nominal_noise: nominal expert episodes (Gaussian action noise std) for pre-training.
        episode_steps: length of every episode (data and evaluation); success = surviving this many steps.
        d_model, n_layer, n_head, context, activation: the decision transformer (tanh action head).
        pretrain_steps, pretrain_batch, pretrain_lr, pretrain_weight_decay: AdamW pre-training.
    Shift selection:
        candidates: shift names tried in order; the first where the recomputed expert succeeds on at least
            ``expert_min_rate`` of the evaluation episodes and the pre-trained DT on at most
            ``pretrained_max_rate`` is chosen.
    Stream and evaluation:
        n_stream_episodes, stream_noise: shifted-task expert episodes forming the pool of streamed samples
            (action noise ``stream_noise / max(1, |gear|)``); labels are the expert's own (clean) actions.
        checkpoints: numbers of streamed samples after which every method is evaluated (increasing, from 0).
        n_eval: evaluation episodes per checkpoint (fixed seeds, shared by all methods).
        n_heldout_episodes, n_heldout: held-out shifted-task episodes and the number of contexts drawn from them
            for the held-out RMSE; the first ``n_heldout_uncertainty`` of those for the uncertainty study.
    KBT:
        prior_scale, obs_noise, hidden: ``BayesianModel(prior_scale, obs_noise, bayesian="all")`` and
            ``KalmanGuide(hidden=...)``.
    Retraining (warm-started, FIFO memory):
        retrain_epochs, retrain_lr, retrain_batch: ``Retrainer(epochs, lr, batch_size)`` (``None``: full buffer).
        memory_targets: ``(reference, factor)`` pairs; ``M = max(1, floor(factor · bytes(reference) / s))`` with
            ``bytes(reference)`` the KBT-``diag`` or KBT-``block`` belief bytes and ``s`` the bytes of one
            buffered sample. Retraining on all data is always run too.
    Uncertainty study:
        noise_levels: label-noise std σ in normalised action units (action / 3).
        n_uncertainty: streamed samples per σ; uncertainty_covariance: KBT covariance used.
        obs_noise_policies: ``"matched"`` (``obs_noise = sqrt(obs_noise² + σ²)``), ``"fixed"``
            (``obs_noise`` whatever σ), ``"auto"``, ``"auto-conjugate"`` and ``"auto-independent"`` (learnt
            online: :func:`uncertainty_study`); default: all but the ablation ``"auto-independent"``.
    threads: torch threads during the run (1 is fastest for these tiny networks).
    """

    n_nominal_episodes: int = 20
    nominal_noise: float = 0.5
    episode_steps: int = 1000
    d_model: int = 16
    n_layer: int = 1
    n_head: int = 1
    context: int = 5
    activation: str = "relu"
    pretrain_steps: int = 3000
    pretrain_batch: int = 256
    pretrain_lr: float = 3e-3
    pretrain_weight_decay: float = 1e-4
    candidates: tuple[str, ...] = ("sensor_bias_0.1", "gear_x0.15", "cart_mass_x10", "gear_x10", "gear_flip")
    expert_min_rate: float = 0.95
    pretrained_max_rate: float = 0.30
    n_stream_episodes: int = 8
    stream_noise: float = 0.5
    checkpoints: tuple[int, ...] = (0, 25, 50, 100, 200, 400)
    n_eval: int = 20
    n_heldout_episodes: int = 2
    n_heldout: int = 1000
    n_heldout_uncertainty: int = 500
    prior_scale: float = 0.05
    obs_noise: float = 0.1
    hidden: str = "token"
    retrain_epochs: int = 5
    retrain_lr: float = 3e-3
    retrain_batch: int | None = None
    memory_targets: tuple[tuple[str, float], ...] = (("diag", 0.125), ("diag", 0.5), ("diag", 1.0), ("block", 1.0))
    noise_levels: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4)
    n_uncertainty: int = 200
    uncertainty_covariance: str = "block"
    obs_noise_policies: tuple[str, ...] = ("matched", "fixed", "auto", "auto-conjugate")
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("candidates", "checkpoints", "noise_levels", "obs_noise_policies"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "memory_targets", tuple((str(r), float(f)) for r, f in self.memory_targets))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"StudySettings: {msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        for name in ("n_nominal_episodes", "episode_steps", "d_model", "n_layer", "n_head", "context",
                     "pretrain_steps", "pretrain_batch", "n_stream_episodes", "n_eval", "n_heldout_episodes",
                     "n_heldout", "n_heldout_uncertainty", "retrain_epochs", "n_uncertainty", "threads"):  # fmt: skip
            v = getattr(self, name)
            need(is_int(v) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        need(
            self.episode_steps <= 1000,
            f"episode_steps must be <= 1000 (the env's time limit), got {self.episode_steps}",
        )
        need(self.d_model % self.n_head == 0, f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        for name in ("nominal_noise", "stream_noise"):
            v = getattr(self, name)
            need(isinstance(v, int | float) and 0 <= v <= 3, f"{name} must be in [0, 3], got {v!r}")
        for name in ("pretrain_lr", "prior_scale", "obs_noise", "retrain_lr"):
            v = getattr(self, name)
            need(isinstance(v, int | float) and math.isfinite(v) and v > 0, f"{name} must be finite and > 0, got {v!r}")
        need(self.pretrain_weight_decay >= 0, f"pretrain_weight_decay must be >= 0, got {self.pretrain_weight_decay}")
        need(0 <= self.expert_min_rate <= 1, f"expert_min_rate must be in [0, 1], got {self.expert_min_rate}")
        need(
            0 <= self.pretrained_max_rate <= 1, f"pretrained_max_rate must be in [0, 1], got {self.pretrained_max_rate}"
        )
        need(len(self.candidates) >= 1, "candidates: need at least one shift name")
        for name in self.candidates:
            get_task(name)  # ValueError listing the known shifts
        cp = self.checkpoints
        need(len(cp) >= 1 and all(is_int(n) for n in cp), f"checkpoints must be integers, got {cp!r}")
        need(cp[0] == 0, f"checkpoints must start at 0 (the pre-trained network), got {cp!r}")
        need(all(b > a for a, b in zip(cp, cp[1:], strict=False)), f"checkpoints must increase strictly, got {cp!r}")
        need(
            self.hidden in ("diag", "token", "feature", "joint"),
            f"hidden must be diag/token/feature/joint, got {self.hidden!r}",
        )
        need(self.uncertainty_covariance in ("block", "diag"),
             f"uncertainty_covariance must be 'block' or 'diag', got {self.uncertainty_covariance!r}")  # fmt: skip
        need(self.retrain_batch is None or (is_int(self.retrain_batch) and self.retrain_batch >= 1),
             f"retrain_batch must be None or an integer >= 1, got {self.retrain_batch!r}")  # fmt: skip
        need(self.activation in ("relu", "gelu"), f"activation must be 'relu' or 'gelu', got {self.activation!r}")
        for ref, factor in self.memory_targets:
            need(ref in MEMORY_REFERENCES, f"memory_targets: reference must be one of {MEMORY_REFERENCES}, got {ref!r}")
            need(math.isfinite(factor) and factor > 0, f"memory_targets: factor must be finite and > 0, got {factor}")
        need(len(self.noise_levels) >= 1 and all(math.isfinite(s) and s >= 0 for s in self.noise_levels),
             f"noise_levels must be finite and >= 0, got {self.noise_levels!r}")  # fmt: skip
        policies = self.obs_noise_policies
        need(len(policies) >= 1 and set(policies) <= set(POLICIES),
             f"obs_noise_policies must be a non-empty subset of {POLICIES}, got {policies}")  # fmt: skip

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> StudySettings:
        """A copy with ``overrides`` applied; unknown names raise ``ValueError``."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise ValueError(
                f"settings: expected a StudySettings or a dict of overrides, got {type(overrides).__name__}"
            )
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"settings: unknown setting(s) {unknown}; known: {sorted(known)}")
        return replace(self, **dict(overrides))


FULL = StudySettings()
QUICK = StudySettings(
    n_nominal_episodes=10,
    pretrain_steps=1000,
    pretrain_batch=128,
    n_stream_episodes=3,
    checkpoints=(0, 25, 100),
    n_eval=5,
    n_heldout_episodes=1,
    n_heldout=300,
    n_heldout_uncertainty=200,
    n_uncertainty=50,
)


# ---------------------------------------------------------------------------------------------
# helpers


def _eval_dict(r: Any) -> dict[str, Any]:
    """A :class:`SuccessRate` or an :func:`evaluate_dt` dict as a JSON-safe dict."""
    if isinstance(r, dict):
        return {k: r[k] for k in ("successes", "n", "interval", "mean_length", "lengths")}
    return {"successes": int(r.successes), "n": int(r.n), "interval": list(r.interval)}


def _fmt_rate(r: Mapping[str, Any]) -> str:
    lo, hi = r["interval"]
    return f"{r['successes']}/{r['n']} [{lo:.2f}, {hi:.2f}]"


def _take(x: Mapping[str, torch.Tensor], idx: Any) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in x.items()}


def _split(ctx: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    x = {k: ctx[k] for k in CONTEXT_KEYS}
    return x, ctx["target"]  # (N, 1)


@torch.no_grad()
def _rmse(net: nn.Module, x: Mapping[str, torch.Tensor], y: torch.Tensor) -> float:
    was = net.training
    net.eval()
    pred = net(**x)[:, -1]  # (N, act_dim)
    net.train(was)
    return float(((pred - y) ** 2).mean().sqrt())


def _predict(guide: KalmanGuide, x: Mapping[str, torch.Tensor], chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``guide.predict`` in chunks of ``chunk`` samples (its cost grows faster than linearly with the batch size)."""
    n = next(iter(x.values())).shape[0]
    parts = [guide.predict(_take(x, slice(i, i + chunk))) for i in range(0, n, chunk)]
    return torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])


def _environment(threads: int) -> dict[str, Any]:
    import gymnasium
    import matplotlib
    import mujoco
    import pyro

    return {
        "ppl_kbnn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "gymnasium": gymnasium.__version__,
        "mujoco": mujoco.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "dtype": "float64",
    }


class _Progress:
    """Progress on stderr: ``log`` lines (one per stage) when enabled, tqdm bars only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars = enabled and sys.stderr.isatty()  # bars only on a terminal (a log file would get every frame)

    def bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.bars, leave=False, file=sys.stderr)

    def log(self, msg: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)


@dataclass
class _Method:
    """One streaming method: ``update(x, y)`` on a batch of samples (in order), the acting network, state bytes,
    cumulative update seconds."""

    name: str
    kind: str
    settings: dict[str, Any]
    update: Callable[[dict[str, torch.Tensor], torch.Tensor], None]
    network: Callable[[], nn.Module]
    state_bytes: Callable[[], int]
    seconds: Callable[[], float]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# the study


def run_study(
    *,
    out_dir: Path | str,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    command: str = "ppl-kbnn pendulum",
    settings: StudySettings | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the pendulum study and write ``results.json``, ``results.md``, PNGs and the pre-trained model to ``out_dir``.

    Args:
        out_dir: output folder (created).
        quick: use :data:`QUICK` instead of :data:`FULL`: a smoke test of the pipeline, not a result.
        seed: base seed of everything random (network initialisation, data, stream order, evaluation episodes).
        progress: show tqdm progress bars and log lines on stderr.
        command: the command line recorded in the results.
        settings: a :class:`StudySettings` (replaces the quick/full defaults) or a dict of overrides of them.

    Returns:
        the results dict written to ``results.json``.

    Raises:
        ValueError: bad arguments or settings.
    """
    if not isinstance(out_dir, str | Path):
        raise ValueError(f"out_dir must be a str or pathlib.Path, got {type(out_dir).__name__}")
    if not isinstance(quick, bool):
        raise ValueError(f"quick must be a bool, got {quick!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be a bool, got {progress!r}")
    if not isinstance(command, str):
        raise ValueError(f"command must be a str, got {type(command).__name__}")
    if isinstance(settings, StudySettings):
        s = settings
    else:
        s = (QUICK if quick else FULL).with_overrides(settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        with torch.random.fork_rng():
            return _run(out, quick, int(seed), progress, command, s)
    finally:
        torch.set_num_threads(old_threads)


def _seeds(seed: int, s: StudySettings) -> dict[str, list[int]]:
    """Env seeds of every group of episodes: disjoint blocks under ``10⁶ · seed``."""
    base = 1_000_000 * seed
    return {
        "nominal_data": [base + 100_000 + i for i in range(s.n_nominal_episodes)],
        "stream_pool": [base + 200_000 + i for i in range(s.n_stream_episodes)],
        "heldout": [base + 300_000 + i for i in range(s.n_heldout_episodes)],
        "evaluation": [base + 400_000 + i for i in range(s.n_eval)],
    }


def _run(out: Path, quick: bool, seed: int, progress: bool, command: str, s: StudySettings) -> dict[str, Any]:
    t_start = time.perf_counter()
    P = _Progress(progress)
    timings: dict[str, float] = {}
    seeds = _seeds(seed, s)
    eval_seeds = seeds["evaluation"]
    results: dict[str, Any] = {
        "version": __version__,
        "command": command,
        "seed": seed,
        "quick": quick,
        "settings": asdict(s),
        "seeds": {k: [v[0], v[-1]] for k, v in seeds.items()},
        "environment": _environment(s.threads),
        "stopped": None,
    }

    # 1. nominal data, pre-training, nominal success --------------------------------------------
    t0 = time.perf_counter()
    P.log(f"collecting {s.n_nominal_episodes} nominal expert episodes (action noise {s.nominal_noise})")
    nominal = collect_episodes("nominal", s.n_nominal_episodes, seed=seeds["nominal_data"][0],
                               max_steps=s.episode_steps, action_noise=s.nominal_noise)  # fmt: skip
    norm = Normalizer.fit(nominal)
    ds = DTDataset(nominal, s.context, norm, dtype=DTYPE)
    timings["nominal_data_s"] = time.perf_counter() - t0

    cfg = DTConfig(state_dim=4, act_dim=1, d_model=s.d_model, n_layer=s.n_layer, n_head=s.n_head,
                   max_ep_len=1000, context=s.context, activation=s.activation, action_tanh=True)  # fmt: skip
    torch.manual_seed(seed)
    net = DecisionTransformer(cfg).to(DTYPE)
    t0 = time.perf_counter()
    losses = pretrain(net, ds.loss_fn(), s.pretrain_steps, n_data=len(ds), lr=s.pretrain_lr,
                      weight_decay=s.pretrain_weight_decay, batch_size=s.pretrain_batch, seed=seed,
                      progress=P.bars)  # fmt: skip
    timings["pretrain_s"] = time.perf_counter() - t0
    net.eval()
    n_params = sum(p.numel() for p in net.parameters())
    tail = losses[-max(1, len(losses) // 20) :]
    pre = {
        "config": asdict(cfg),
        "normalizer": norm.to_dict(),
        "n_parameters": n_params,
        "n_train_samples": len(ds),
        "nominal_episodes": {
            "n": len(nominal),
            "successes": int(sum(ep["success"] for ep in nominal)),
            "mean_length": float(np.mean([ep["length"] for ep in nominal])),
        },
        "final_loss": float(np.mean(tail)),
        "first_loss": float(losses[0]),
        "loss_curve_file": "pretrained.json",
    }
    (out / "pretrained.json").write_text(
        json.dumps({"config": pre["config"], "normalizer": pre["normalizer"], "loss_curve": losses}, indent=1) + "\n"
    )
    torch.save({"config": pre["config"], "normalizer": pre["normalizer"], "state_dict": net.state_dict()},
               out / "pretrained.pt")  # fmt: skip
    t0 = time.perf_counter()
    nom = evaluate_dt(net, norm, "nominal", eval_seeds, max_steps=s.episode_steps)
    timings["nominal_eval_s"] = time.perf_counter() - t0
    pre["nominal_success"] = _eval_dict(nom)
    results["pretrained"] = pre
    P.log(f"pre-trained DT ({n_params} parameters, final MSE {pre['final_loss']:.4f}) on nominal: {_fmt_rate(nom)}")
    # the pre-trained network's error against the clean expert on nominal data (a reference for obs_noise)
    x_nom, y_nom = _split(make_contexts(nominal[:2], s.context, norm, target="policy_actions", dtype=DTYPE))
    pre["nominal_rmse_clean"] = _rmse(net, x_nom, y_nom)

    # 2. the shift --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    checked = []
    chosen = None
    for name in s.candidates:
        task = get_task(name)
        expert = success_rate(task, ExpertPolicy(task), s.n_eval, seed=eval_seeds[0], max_steps=s.episode_steps)
        dt = evaluate_dt(net, norm, task, eval_seeds, max_steps=s.episode_steps)
        ok = expert.rate >= s.expert_min_rate and dt["successes"] / dt["n"] <= s.pretrained_max_rate
        checked.append({"shift": name, "expert": _eval_dict(expert), "pretrained": _eval_dict(dt), "qualifies": ok})
        msg = f"shift {name}: recomputed expert {expert}, pre-trained DT {_fmt_rate(dt)} -> {'chosen' if ok else 'no'}"
        P.log(msg)
        if ok:
            chosen = name
            break
    timings["shift_selection_s"] = time.perf_counter() - t0
    results["shift"] = {
        "candidates": list(s.candidates),
        "rule": f"expert >= {s.expert_min_rate:.0%} and pre-trained DT <= {s.pretrained_max_rate:.0%} "
        f"of {s.n_eval} episodes",
        "checked": checked,
        "chosen": chosen,
    }
    if chosen is None:
        msg = (
            f"no candidate shift qualifies ({results['shift']['rule']}); checked "
            + "; ".join(
                f"{c['shift']}: expert {_fmt_rate(c['expert'])}, DT {_fmt_rate(c['pretrained'])}" for c in checked
            )
            + ". The study stops here."
        )
        print(f"ppl-kbnn pendulum: {msg}", file=sys.stderr)
        results["stopped"] = msg
        return _finish(out, results, timings, t_start)
    task = get_task(chosen)

    # 3. the stream -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    noise = s.stream_noise / max(1.0, abs(task.gear))
    pool_eps = collect_episodes(task, s.n_stream_episodes, seed=seeds["stream_pool"][0], max_steps=s.episode_steps,
                                action_noise=noise)  # fmt: skip
    held_eps = collect_episodes(task, s.n_heldout_episodes, seed=seeds["heldout"][0], max_steps=s.episode_steps,
                                action_noise=noise)  # fmt: skip
    x_pool, y_pool = _split(make_contexts(pool_eps, s.context, norm, target="policy_actions", dtype=DTYPE))
    x_held, y_held = _split(make_contexts(held_eps, s.context, norm, target="policy_actions", dtype=DTYPE))
    gen = torch.Generator().manual_seed(seed)
    n_max = max(s.checkpoints[-1], s.n_uncertainty)
    if y_pool.shape[0] < n_max:
        raise ValueError(
            f"the stream pool has {y_pool.shape[0]} samples but the study needs {n_max}: "
            "raise n_stream_episodes or lower checkpoints / n_uncertainty"
        )
    order = torch.randperm(y_pool.shape[0], generator=gen)[:n_max]
    x_stream, y_stream = _take(x_pool, order), y_pool[order]  # (n_max, ...) in streaming order
    hidx = torch.randperm(y_held.shape[0], generator=gen)[: s.n_heldout]
    x_held, y_held = _take(x_held, hidx), y_held[hidx]
    timings["shifted_data_s"] = time.perf_counter() - t0

    def ep_summary(eps: list[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(eps), "successes": int(sum(e["success"] for e in eps)),
                "mean_length": float(np.mean([e["length"] for e in eps]))}  # fmt: skip

    results["stream"] = {
        "task": chosen,
        "action_noise": noise,
        "label": "the expert's own action at the last state token (policy_actions, normalised: action / 3)",
        "pool_episodes": ep_summary(pool_eps),
        "pool_samples": int(y_pool.shape[0]),
        "heldout_episodes": ep_summary(held_eps),
        "heldout_samples": int(y_held.shape[0]),
        "order": "uniformly random permutation of the pool (torch.Generator seeded with seed), without replacement",
        "checkpoints": list(s.checkpoints),
        "pretrained_heldout_rmse": _rmse(net, x_held, y_held),
    }

    # 4. the methods ------------------------------------------------------------------------------
    def kbt(cov: str) -> tuple[_Method, KalmanGuide]:
        model = BayesianModel(net, prior_scale=s.prior_scale, obs_noise=s.obs_noise, bayesian="all")
        guide = KalmanGuide(model, covariance=cov, hidden=s.hidden)
        m = _Method(
            name=f"kbt_{cov}", kind="kbt",
            settings={"covariance": cov, "hidden": s.hidden, "prior_scale": s.prior_scale, "obs_noise": s.obs_noise,
                      "bayesian": "all", "n_bayesian_parameters": sum(v.numel() for v, _ in model.priors.values())},
            update=lambda x, y: guide.update(x, y),
            network=lambda: posterior_mean_net(guide, net),
            state_bytes=lambda: guide.belief_bytes,
            seconds=lambda: guide.update_seconds,
        )  # fmt: skip
        return m, guide

    kbt_block, g_block = kbt("block")
    kbt_diag, g_diag = kbt("diag")
    ref_bytes = {"diag": g_diag.belief_bytes, "block": g_block.belief_bytes}
    one = _take(x_stream, slice(0, 1))
    sample_bytes = tensor_bytes([one, y_stream[:1]])  # one buffered sample as the Retrainer holds it
    n_last = s.checkpoints[-1]
    Ms: dict[int, list[str]] = {}
    for ref, factor in s.memory_targets:
        M = max(1, int(factor * ref_bytes[ref] // sample_bytes))
        Ms.setdefault(M, []).append(f"{factor:g} x KBT-{ref}")
    results["memory"] = {
        "kbt_diag_belief_bytes": ref_bytes["diag"],
        "kbt_block_belief_bytes": ref_bytes["block"],
        "bytes_per_buffered_sample": sample_bytes,
        "rule": "M = max(1, floor(factor * KBT belief bytes / bytes per buffered sample))",
        "M": {
            str(M): {
                "targets": why,
                "run": M < n_last,
                "note": ""
                if M < n_last
                else f"M >= the stream length {n_last}: the buffer never drops a sample, so "
                "this retraining is identical to retraining on all data (run once, as retrain_all)",
            }
            for M, why in sorted(Ms.items())
        },
        "note": "retraining state = FIFO buffer + AdamW moments (2 x parameters); the AdamW part alone is about "
        "the size of the KBT-diag belief (mean + variance per parameter)",
    }

    base_model = BayesianModel(net, prior_scale=s.prior_scale, obs_noise=s.obs_noise, bayesian="all")

    def retrainer(M: int | None) -> _Method:
        r = Retrainer(base_model, memory=M, epochs=s.retrain_epochs, lr=s.retrain_lr, batch_size=s.retrain_batch,
                      seed=seed)  # fmt: skip
        return _Method(
            name="retrain_all" if M is None else f"retrain_M{M}", kind="retrain",
            settings={"memory": M, "epochs": s.retrain_epochs, "lr": s.retrain_lr, "batch_size": s.retrain_batch,
                      "optimizer": "AdamW (one optimiser for the whole stream, weight decay 0)",
                      "memory_reason": ", ".join(Ms[M]) if M is not None else ", ".join(
                          ["all samples", *[f"M = {k} ({', '.join(v)})" for k, v in sorted(Ms.items()) if k >= n_last]]
                      )},
            update=lambda x, y: r.update(x, y),
            network=lambda: r.point.net,
            state_bytes=lambda: r.memory_bytes,
            seconds=lambda: r.update_seconds,
        )  # fmt: skip

    none = _Method("none", "none", {}, update=lambda x, y: None, network=lambda: net, state_bytes=lambda: 0,
                   seconds=lambda: 0.0)  # fmt: skip
    methods = [none, kbt_block, kbt_diag, *[retrainer(M) for M in sorted(Ms) if M < n_last], retrainer(None)]

    t_eval = 0.0
    t0 = time.perf_counter()
    for m in methods:
        bar = P.bar(n_last, m.name)
        done = 0
        for n in s.checkpoints:
            if n > done and m.error is None:
                try:
                    if m.kind == "kbt" or m.kind == "retrain":
                        for i in range(done, n):  # one sample at a time (the bar moves per sample)
                            m.update(_take(x_stream, slice(i, i + 1)), y_stream[i : i + 1])
                            bar.update(1)
                    else:
                        bar.update(n - done)
                except FloatingPointError as exc:  # the guide leaves its belief as it was and raises
                    m.error = f"update failed after {i} samples: {exc}"
                    P.log(f"{m.name}: {m.error}")
                done = n
            if m.error is not None:
                break
            te = time.perf_counter()
            netw = m.network()
            ev = evaluate_dt(netw, norm, task, eval_seeds, max_steps=s.episode_steps)
            entry = {"n_samples": n, **_eval_dict(ev), "heldout_rmse": _rmse(netw, x_held, y_held),
                     "state_bytes": int(m.state_bytes()), "update_seconds": float(m.seconds())}  # fmt: skip
            t_eval += time.perf_counter() - te
            m.checkpoints.append(entry)
            bar.set_postfix(n=n, success=f"{ev['successes']}/{ev['n']}")
        bar.close()
        last = m.checkpoints[-1]
        ms = 1e3 * last["update_seconds"] / max(1, last["n_samples"])
        P.log(f"{m.name:>16}: " + ", ".join(f"n={c['n_samples']} {c['successes']}/{c['n']}" for c in m.checkpoints)
              + f"; {last['state_bytes']} B; {ms:.1f} ms/sample")  # fmt: skip
    timings["stream_and_eval_s"] = time.perf_counter() - t0
    timings["evaluation_s"] = t_eval
    results["methods"] = {}
    for m in methods:
        n_done = m.checkpoints[-1]["n_samples"] if m.checkpoints else 0
        total = m.checkpoints[-1]["update_seconds"] if m.checkpoints else 0.0
        results["methods"][m.name] = {
            "kind": m.kind,
            "settings": m.settings,
            "checkpoints": m.checkpoints,
            "seconds_per_sample": (total / n_done) if n_done and m.kind != "none" else None,
            "state_bytes_final": m.checkpoints[-1]["state_bytes"] if m.checkpoints else None,
            "error": m.error,
        }
    results["methods"]["none"]["settings"] = {"note": "the pre-trained network, never updated"}

    # 5. uncertainty ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    results["uncertainty"] = uncertainty_study(net, s, seed, x_stream, y_stream, x_held, y_held, P)
    timings["uncertainty_s"] = time.perf_counter() - t0
    return _finish(out, results, timings, t_start)


def _finish(out: Path, results: dict[str, Any], timings: dict[str, float], t_start: float) -> dict[str, Any]:
    from .._io import write_text_atomic
    from .report import write_figures, write_markdown

    t0 = time.perf_counter()
    results["figures"] = write_figures(out, results)
    timings["figures_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = timings
    results = copy.deepcopy(results)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "results.md", write_markdown(results))
    return results
