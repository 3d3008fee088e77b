r"""The pendulum study with on-policy streams: does closed-form Bayesian adaptation (KBT) beat memory-limited
retraining in samples, memory and time, with intervals across streams?

``ppl-kbnn pendulum [--quick | --full] [--seeds 0-2] [--workers N] --out DIR`` calls :func:`run_onpolicy_study`:

1. **pre-train** one decision transformer per network seed (as in the first design: nominal LQR-expert
   episodes with action noise, AdamW);
2. **check** each shift (``sensor_bias_0.1``, ``gear_flip``, ``gear_x0.15``) on each network under the
   study's evaluation: the recomputed expert, the pre-trained DT, its exact fix (where one exists);
3. **choose retraining's learning rate** for each subset and shift from :attr:`OnPolicySettings.lr_grid` on
   *development* streams (stream indices from 1000 on: their episodes, draws and evaluation seeds are
   disjoint from the test streams'): the highest mean success over the development checkpoints after 0
   (ties: the lower mean on-policy RMSE);
4. **stream** ``n_streams`` test streams per network and shift, on-policy (primary) and i.i.d. expert
   (secondary, RMSE only), to: no adaptation, the exact fix (a reference, not a method), KBT on all weights
   (the paper's setting), KBT on the 16 state-embedding biases, retraining on the same two subsets with the
   chosen learning rate, at memory matched to KBT's state bytes and at a larger ``M``;
5. the pre-trained DT's **offset tolerance** (success vs the fraction of the exact fix applied) and the
   **uncertainty** check of the first design (KBT's predicted std vs injected label noise);
6. **aggregate** across streams (means with Student-t 95 % intervals over the streams of a network, and
   over all (network, stream) units), the paired KBT − retraining differences per stream, "samples until
   success stays >= 90 %", and a conclusion generated from those intervals; write ``results.json``,
   ``results.md`` and PNGs.

Units (:func:`~ppl_kbnn.pendulum.units.run_unit`) run in turn, or in a ``ProcessPoolExecutor`` with
``workers > 1``; every unit sets one torch thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .study import FULL as FIRST_DESIGN
from .units import SUBSETS, load_pretrained, run_unit

__all__ = [
    "DEFAULT",
    "FULL_DESIGN",
    "KBT_VARIANTS",
    "QUICK_DESIGN",
    "OnPolicySettings",
    "mean_interval",
    "paired_difference",
    "report_from_results",
    "run_onpolicy_study",
    "select_lr",
]

PRETRAIN_KEYS = ("n_nominal_episodes", "nominal_noise", "episode_steps", "d_model", "n_layer", "n_head", "context",
                 "activation", "pretrain_steps", "pretrain_batch", "pretrain_lr", "pretrain_weight_decay")  # fmt: skip


KBT_VARIANTS = ("lowrank", "auto_noise")
"""Further KBT rows on all weights (:class:`OnPolicySettings` ``kbt_variants``)."""


@dataclass(frozen=True)
class OnPolicySettings:
    """Every knob of the on-policy study (defaults: the default run; :data:`QUICK_DESIGN`, :data:`FULL_DESIGN`).

    networks: pre-trained network seeds. n_streams: test streams per network and shift.
    shifts: shifted tasks. checkpoints: sample counts evaluated (multiples of ``block``, from 0).
    block: samples per on-policy episode batch (one episode of the current network, more if it ends sooner).
    n_eval: evaluation episodes per checkpoint; eval_action_noise, eval_reset_noise: their action noise std and
        the env's reset_noise_scale. stream_action_noise: action noise of the stream episodes.
    kbt_prior_all, kbt_prior_subset, obs_noise, kbt_covariance: KBT settings (all weights / embedding biases).
    kbt_variants: further KBT rows on all weights (:data:`KBT_VARIANTS`): ``"lowrank"`` (``covariance="lowrank"``,
        rank 10, ``update="ekf"``) and ``"auto_noise"`` (the block belief with ``obs_noise="auto"``: the noise
        learnt online from the model's ``obs_noise`` as the guess).
    retrain_epochs, lr_grid: retraining; the learning rate is chosen from ``lr_grid`` on development streams.
    large_memory: the larger retraining buffer ``M`` (beside the one matched to KBT's bytes).
    n_dev_streams, dev_checkpoints, dev_n_eval: the development streams of the learning-rate choice.
    n_expert_streams: i.i.d. expert streams per network and shift (secondary condition, RMSE only).
    predictive_checkpoints, predictive_streams, predictive_methods: checkpoints where the KBT methods
        ``predictive_methods`` also act with their predictive mean (the secondary row; one closed-form predictive
        per step, so costly), on the first ``predictive_streams`` streams.
    large_memory: the larger retraining buffer (when below the stream length; otherwise retraining on all data).
    tolerance_fractions: fractions of the exact sensor-bias fix in the offset-tolerance plot.
    uncertainty: run the uncertainty check (network ``networks[0]``, ``sensor_bias_0.1``).
    pretrain: overrides of the first design's pre-training settings (``StudySettings`` fields).
    """

    networks: tuple[int, ...] = (0,)
    n_streams: int = 3
    shifts: tuple[str, ...] = ("sensor_bias_0.1", "gear_flip", "gear_x0.15")
    checkpoints: tuple[int, ...] = (0, 25, 50, 100)
    block: int = 25
    n_eval: int = 10
    eval_action_noise: float = 0.3
    eval_reset_noise: float = 0.05
    stream_action_noise: float = 0.3
    episode_steps: int = 1000
    n_heldout: int = 300
    kbt_prior_all: float = 0.05
    kbt_prior_subset: float = 0.5
    obs_noise: float = 0.1
    kbt_covariance: str = "block"
    kbt_variants: tuple[str, ...] = ("lowrank", "auto_noise")
    retrain_epochs: int = 5
    lr_grid: tuple[float, ...] = (0.003, 0.03, 0.1)
    large_memory: int = 50
    n_dev_streams: int = 1
    dev_checkpoints: tuple[int, ...] = (0, 50, 100)
    dev_n_eval: int = 5
    n_expert_streams: int = 1
    predictive_checkpoints: tuple[int, ...] = (100,)
    predictive_streams: int = 1
    predictive_methods: tuple[str, ...] = ("kbt_embed",)
    tolerance_fractions: tuple[float, ...] = (0.0, 0.5, 0.75, 0.85, 0.9, 1.0, 1.1, 1.25, 1.5)
    uncertainty: bool = True
    pretrain: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for name in ("networks", "shifts", "checkpoints", "lr_grid", "dev_checkpoints", "predictive_checkpoints",
                     "tolerance_fractions", "predictive_methods", "kbt_variants"):  # fmt: skip
            object.__setattr__(self, name, tuple(getattr(self, name)))
        pre = self.pretrain.items() if isinstance(self.pretrain, Mapping) else self.pretrain
        object.__setattr__(self, "pretrain", tuple((str(k), v) for k, v in pre))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"OnPolicySettings: {msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        need(len(self.networks) >= 1 and all(is_int(n) and n >= 0 for n in self.networks),
             f"networks must be integers >= 0, got {self.networks!r}")  # fmt: skip
        need(len(set(self.networks)) == len(self.networks), f"networks must be distinct, got {self.networks!r}")
        for name in ("n_streams", "block", "n_eval", "episode_steps", "n_heldout", "retrain_epochs", "large_memory",
                     "n_dev_streams", "dev_n_eval", "predictive_streams"):  # fmt: skip
            v = getattr(self, name)
            need(is_int(v) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        need(is_int(self.n_expert_streams) and self.n_expert_streams >= 0, "n_expert_streams must be an integer >= 0")
        need(self.n_streams <= 20 and self.n_dev_streams <= 20 and self.n_expert_streams <= 20,
             "n_streams, n_dev_streams and n_expert_streams must be <= 20 (the seed layout)")  # fmt: skip
        need(self.block <= 50, f"block must be <= 50 (the seed layout), got {self.block}")
        need(self.episode_steps <= 1000, f"episode_steps must be <= 1000, got {self.episode_steps}")
        from ..envs import get_task

        need(len(self.shifts) >= 1, "shifts: need at least one")
        for s in self.shifts:
            get_task(s)
        for name in ("checkpoints", "dev_checkpoints"):
            cp = getattr(self, name)
            need(len(cp) >= 2 and cp[0] == 0 and all(is_int(n) for n in cp), f"{name} must start at 0, got {cp!r}")
            need(all(b > a for a, b in zip(cp, cp[1:], strict=False)), f"{name} must increase strictly, got {cp!r}")
            need(all(n % self.block == 0 for n in cp), f"{name} must be multiples of block={self.block}, got {cp!r}")
        need(set(self.predictive_checkpoints) <= set(self.checkpoints),
             f"predictive_checkpoints {self.predictive_checkpoints} must be among checkpoints")  # fmt: skip
        for name in ("eval_action_noise", "eval_reset_noise", "stream_action_noise"):
            v = getattr(self, name)
            need(isinstance(v, int | float) and math.isfinite(v) and 0 <= v <= 3, f"{name} must be in [0, 3], got {v}")
        for name in ("kbt_prior_all", "kbt_prior_subset", "obs_noise"):
            v = getattr(self, name)
            need(isinstance(v, int | float) and math.isfinite(v) and v > 0, f"{name} must be finite and > 0, got {v}")
        need(
            self.kbt_covariance in ("block", "diag"), f"kbt_covariance must be block/diag, got {self.kbt_covariance!r}"
        )
        need(set(self.kbt_variants) <= set(KBT_VARIANTS),
             f"kbt_variants must be a subset of {KBT_VARIANTS}, got {self.kbt_variants!r}")  # fmt: skip
        need(len(self.lr_grid) >= 1 and all(math.isfinite(v) and v > 0 for v in self.lr_grid),
             f"lr_grid must hold finite learning rates > 0, got {self.lr_grid!r}")  # fmt: skip
        need(all(math.isfinite(f) and f >= 0 for f in self.tolerance_fractions), "tolerance_fractions must be >= 0")
        unknown = sorted(set(dict(self.pretrain)) - set(PRETRAIN_KEYS))
        need(not unknown, f"pretrain: unknown setting(s) {unknown}; known: {list(PRETRAIN_KEYS)}")

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> OnPolicySettings:
        """A copy with ``overrides`` applied; unknown names raise ``ValueError``."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise ValueError(f"settings: expected a dict of overrides, got {type(overrides).__name__}")
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"settings: unknown setting(s) {unknown}; known: {sorted(known)}")
        return replace(self, **dict(overrides))

    def pretrain_settings(self) -> dict[str, Any]:
        """The pre-training settings: the first design's defaults with :attr:`pretrain` applied."""
        base = {k: getattr(FIRST_DESIGN, k) for k in PRETRAIN_KEYS}
        base.update(dict(self.pretrain))
        base["episode_steps"] = self.episode_steps
        return base


DEFAULT = OnPolicySettings()
QUICK_DESIGN = OnPolicySettings(
    n_streams=2,
    shifts=("sensor_bias_0.1", "gear_flip"),
    checkpoints=(0, 25, 50),
    n_eval=3,
    lr_grid=(0.003, 0.03),
    large_memory=50,
    dev_checkpoints=(0, 25),
    dev_n_eval=2,
    predictive_checkpoints=(),
    tolerance_fractions=(0.0, 1.0),
    uncertainty=False,
    n_expert_streams=0,
    pretrain=(("n_nominal_episodes", 10), ("pretrain_steps", 1000), ("pretrain_batch", 128)),
)
FULL_DESIGN = OnPolicySettings(
    networks=(0, 1, 2),
    n_streams=10,
    checkpoints=(0, 25, 50, 75, 100, 125, 150, 175, 200),
    n_eval=10,
    lr_grid=(0.001, 0.003, 0.01, 0.03, 0.1),
    n_dev_streams=2,
    dev_checkpoints=(0, 50, 100, 200),
    dev_n_eval=10,
    n_expert_streams=2,
    predictive_checkpoints=(100, 200),
    predictive_streams=2,
    predictive_methods=("kbt_all", "kbt_embed"),
    large_memory=100,
)


# ---------------------------------------------------------------------------------------------
# statistics across streams


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of per-stream values with a Student-t ``level`` interval across them (``None`` with fewer than 2)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    m = float(v.mean())
    if v.size < 2:
        return {"mean": m, "lo": None, "hi": None, "n": 1}
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": int(v.size)}


def paired_difference(a: Sequence[float | None], b: Sequence[float | None], level: float = 0.95) -> dict[str, Any]:
    """``a − b`` per stream (pairs where both exist) with its across-stream interval; ``verdict`` is ``"a > b"``,
    ``"a < b"`` (the interval excludes 0) or ``"no difference shown"``."""
    d = [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    out = mean_interval(d, level)
    if out["lo"] is not None and out["lo"] > 0:
        out["verdict"] = "a > b"
    elif out["hi"] is not None and out["hi"] < 0:
        out["verdict"] = "a < b"
    else:
        out["verdict"] = "no difference shown"
    return out


def select_lr(dev_units: Sequence[Mapping[str, Any]], candidates: Mapping[float, str]) -> dict[str, Any]:
    """The learning rate whose method (``candidates``: lr -> method name in the development units) has the highest
    mean success over the development checkpoints after 0 (ties: the lower mean on-policy RMSE).

    Only the units passed in are read (the caller passes development streams only; a test checks it)."""
    scores = {}
    for lr, name in candidates.items():
        succ, rmse = [], []
        for u in dev_units:
            rows = u["methods"][name]["rows"]
            succ += [r["successes"] / r["n_eval"] for r in rows if r["n"] > 0 and "successes" in r]
            rmse += [r["next_block_rmse"] for r in rows if r["n"] > 0 and "next_block_rmse" in r]
        scores[lr] = {"mean_success": float(np.mean(succ)) if succ else 0.0,
                      "mean_onpolicy_rmse": float(np.mean(rmse)) if rmse else math.inf}  # fmt: skip
    best = max(scores, key=lambda lr: (scores[lr]["mean_success"], -scores[lr]["mean_onpolicy_rmse"], -lr))
    return {"lr": best, "scores": {str(k): v for k, v in scores.items()},
            "streams": sorted({int(u["stream"]) for u in dev_units})}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the study


def _executor(
    workers: int,
    cache: Path | None = None,
    log: Callable[[str], None] = lambda msg: None,
    executor: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """``run_all(jobs) -> results`` (in the jobs' order): in turn, in a process pool of ``workers``, or (with
    ``executor="ray"``) as Ray tasks of one CPU each through :func:`ppl_kbnn.sweep.run_tasks` (``address``,
    ``num_cpus`` as there).

    With ``cache``, each finished unit is written to ``cache/<hash of its arguments>.json`` and a later call with
    the same arguments reads it instead of running the unit again (an interrupted run resumes); a pre-training
    unit only while the network file it wrote still exists."""

    def key(job: dict[str, Any]) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def run_all(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        todo = []
        for i, job in enumerate(jobs):
            f = None if cache is None else cache / f"{key(job)}.json"
            # a pre-training unit is reused only while the network file it wrote is still there
            if f is not None and f.exists() and (job.get("kind") != "pretrain" or Path(job["path"]).exists()):
                results[i] = json.loads(f.read_text())
            else:
                todo.append(i)

        def done(i: int, res: dict[str, Any]) -> None:
            results[i] = res
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                (cache / f"{key(jobs[i])}.json").write_text(json.dumps(res, default=_json_default))
            j = jobs[i]
            what = ", ".join(f"{k} {j[k]}" for k in ("kind", "network", "shift", "stream", "condition") if k in j)
            log(f"  unit done ({sum(r is not None for r in results)}/{len(jobs)}): {what}, {res['seconds']:.0f} s")

        if executor == "ray":
            from ..sweep import run_tasks

            run_tasks(_run_job_kwargs, [jobs[i] for i in todo], executor="ray", address=address, num_cpus=num_cpus,
                      on_done=lambda k, res: done(todo[k], res))  # fmt: skip
        elif workers <= 1:
            for i in todo:
                done(i, run_unit(**jobs[i]))
        else:
            import multiprocessing as mp

            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
                futures = {ex.submit(_run_job, jobs[i]): i for i in todo}
                for fut in cf.as_completed(futures):
                    done(futures[fut], fut.result())
        return [r for r in results if r is not None]

    return run_all


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    """``run_unit(**job)`` (a picklable top-level function for process pools)."""
    import warnings

    from ..hyper import OutlierWarning

    warnings.filterwarnings("ignore", category=OutlierWarning)
    return run_unit(**job)


def _run_job_kwargs(**job: Any) -> dict[str, Any]:
    """``run_unit(**job)`` for :func:`ppl_kbnn.sweep.run_tasks` (which calls ``fn(**kwargs)``)."""
    return _run_job(job)


def _matched_memory(pretrained: str, s: OnPolicySettings) -> dict[str, Any]:
    """KBT's state bytes per subset, the bytes of one buffered sample and of AdamW's state, and the matched ``M``."""
    import warnings

    from ..envs import collect_episodes, make_contexts
    from ..guide import KalmanGuide
    from ..inference.retrain import Retrainer
    from ..model import BayesianModel

    net, norm = load_pretrained(pretrained)
    eps = collect_episodes("nominal", 1, seed=0, max_steps=20)
    ctx = make_contexts(eps, net.config.context, norm, target="policy_actions", dtype=torch.float64)
    y = ctx.pop("target")[:1]
    x = {k: v[:1] for k, v in ctx.items()}
    out: dict[str, Any] = {}
    for subset, prior in (("all", s.kbt_prior_all), ("embed_bias", s.kbt_prior_subset)):
        model = BayesianModel(net, prior_scale=prior, obs_noise=s.obs_noise, bayesian=SUBSETS[subset])
        kbt = KalmanGuide(model, covariance=s.kbt_covariance, hidden="token").belief_bytes
        r = Retrainer(model, memory=1, epochs=1, lr=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r.update(x, y)
        from ..inference.result import tensor_bytes

        sample = tensor_bytes([x, y])
        adam = r.memory_bytes - sample
        M = max(1, (kbt - adam) // sample)
        out[subset] = {"kbt_bytes": int(kbt), "sample_bytes": int(sample), "adamw_bytes": int(adam), "M": int(M),
                       "n_parameters": sum(v.numel() for v, _ in model.priors.values())}  # fmt: skip
    out["rule"] = "M = max(1, floor((KBT state bytes - AdamW state bytes) / bytes of one buffered sample))"
    return out


def _methods(s: OnPolicySettings, mem: dict[str, Any], lrs: Mapping[str, float]) -> list[dict[str, Any]]:
    """The method specs of a test stream (learning rates ``lrs`` per subset)."""
    last = s.checkpoints[-1]
    kbt = {"kind": "kbt", "covariance": s.kbt_covariance, "obs_noise": s.obs_noise}
    ms: list[dict[str, Any]] = [
        {"name": "none", "kind": "none"},
        {"name": "exact_fix", "kind": "exact"},
        {
            "name": "kbt_all",
            **kbt,
            "subset": "all",
            "prior_scale": s.kbt_prior_all,
            "predictive": "kbt_all" in s.predictive_methods,
        },
        {
            "name": "kbt_embed",
            **kbt,
            "subset": "embed_bias",
            "prior_scale": s.kbt_prior_subset,
            "psd_repair": True,
            "predictive": "kbt_embed" in s.predictive_methods,
        },
    ]
    every = {"kind": "kbt", "subset": "all", "prior_scale": s.kbt_prior_all, "obs_noise": s.obs_noise}
    if "lowrank" in s.kbt_variants:
        ms.append({"name": "kbt_all_lowrank", **every, "covariance": "lowrank", "rank": 10, "update": "ekf"})
    if "auto_noise" in s.kbt_variants:
        ms.append({"name": "kbt_all_auto_noise", **every, "covariance": s.kbt_covariance, "noise_mode": "auto"})
    for subset, short in (("all", "all"), ("embed_bias", "embed")):
        M = mem[subset]["M"]
        sizes: list[tuple[str, int | None]] = [("matched", M if M < last else None)]
        if M < last:  # a larger buffer, or all data when the larger buffer would hold the whole stream
            sizes.append(("large", s.large_memory) if s.large_memory < last else ("alldata", None))
        seen = set()
        for why, size in sizes:
            if size in seen:
                continue
            seen.add(size)
            name = f"retrain_{short}_" + ("all_data" if size is None else f"M{size}")
            ms.append({"name": name, "kind": "retrain", "subset": subset, "memory": size, "lr": lrs[subset],
                       "epochs": s.retrain_epochs, "obs_noise": s.obs_noise, "memory_role": why})  # fmt: skip
    return ms


def run_onpolicy_study(
    *,
    out_dir: Path | str,
    preset: str = "default",
    networks: Sequence[int] | None = None,
    workers: int = 1,
    progress: bool = True,
    command: str = "ppl-kbnn pendulum",
    settings: OnPolicySettings | Mapping[str, Any] | None = None,
    resume: bool = False,
    executor: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Run the on-policy pendulum study; write ``results.json``, ``results.md`` and PNGs to ``out_dir``.

    Args:
        out_dir: output folder (created).
        preset: ``"default"`` (about 10 minutes on 2 cores), ``"quick"`` (a smoke test, not a result) or
            ``"full"`` (the issue's full design; see docs/pendulum.md for its cost).
        networks: pre-trained network seeds (overrides the preset's).
        workers: processes running units in parallel (1: in turn). The pool spawns fresh interpreters, so a
            script that calls this with ``workers > 1`` needs the ``if __name__ == "__main__":`` guard.
        progress: one log line per stage on stderr.
        command: the command line recorded in the results.
        settings: an :class:`OnPolicySettings` (replaces the preset) or a dict of overrides of the preset.
        resume: reuse the units an earlier (interrupted) run of the same code and settings finished
            (``out_dir/units/*.json``, keyed by each unit's arguments); without it that folder is cleared first.
        executor: ``"local"`` (in turn or in ``workers`` processes) or ``"ray"``: every unit a Ray task of one CPU
            (:func:`ppl_kbnn.sweep.run_tasks`; a local Ray of ``num_cpus`` CPUs, or the cluster at ``address``).
            Units pass the pre-trained networks as files under ``out_dir``, so a multi-machine cluster needs
            ``out_dir`` on a shared file system.
        address: the address of an existing Ray cluster (``executor="ray"`` only).
        num_cpus: CPUs of the local Ray (``executor="ray"`` without ``address`` only).

    Returns:
        the results dict written to ``results.json``.
    """
    presets = {"default": DEFAULT, "quick": QUICK_DESIGN, "full": FULL_DESIGN}
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not isinstance(out_dir, str | Path):
        raise ValueError(f"out_dir must be a str or pathlib.Path, got {type(out_dir).__name__}")
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if executor == "ray" and workers > 1:
        raise ValueError("workers > 1 is the local process pool; with executor='ray' use num_cpus")
    s = settings if isinstance(settings, OnPolicySettings) else presets[preset].with_overrides(settings)
    if networks is not None:
        s = s.with_overrides({"networks": tuple(int(n) for n in networks)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if not resume and (out / "units").is_dir():
        for f in (out / "units").glob("*.json"):
            f.unlink()
    run_all = _executor(workers, out / "units", log, executor=executor, address=address, num_cpus=num_cpus)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    results: dict[str, Any] = {
        "design": "on-policy",
        "version": __version__,
        "command": command,
        "preset": preset,
        "quick": preset == "quick",
        "workers": workers,
        "executor": executor,
        "settings": asdict(s),
        "pretrain_settings": s.pretrain_settings(),
        "environment": _environment(),
    }

    def phase(name: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        log(f"{name}: {len(jobs)} unit(s)")
        res = run_all(jobs)
        timings[f"{name}_s"] = time.perf_counter() - t0
        log(f"{name}: done in {timings[f'{name}_s']:.0f} s")
        return res

    # 1. pre-train ----------------------------------------------------------------------------
    paths = {n: str(out / f"pretrained_seed{n}.pt") for n in s.networks}
    pre = phase("pretrain", [{"kind": "pretrain", "seed": n, "path": paths[n], "settings": s.pretrain_settings()}
                             for n in s.networks])  # fmt: skip
    results["pretrained"] = {str(p["seed"]): p for p in pre}
    mem = _matched_memory(paths[s.networks[0]], s)
    results["memory"] = mem
    ev = {"n_eval": s.n_eval, "eval_action_noise": s.eval_action_noise, "eval_reset_noise": s.eval_reset_noise,
          "episode_steps": s.episode_steps}  # fmt: skip
    stream_kw = {**ev, "block": s.block, "stream_action_noise": s.stream_action_noise, "n_heldout": s.n_heldout}

    # 2. checks, development streams, tolerance, uncertainty -----------------------------------
    jobs: list[dict[str, Any]] = []
    for n in s.networks:
        jobs.append({"kind": "check", "pretrained": paths[n], "network": n, "shifts": list(s.shifts), **ev})
        jobs.append({"kind": "tolerance", "pretrained": paths[n], "network": n,
                     "fractions": list(s.tolerance_fractions), **ev})  # fmt: skip
    dev_methods = []
    for subset, short in (("all", "all"), ("embed_bias", "embed")):
        M = mem[subset]["M"]
        for lr in s.lr_grid:
            dev_methods.append({"name": f"dev_{short}_lr{lr:g}", "kind": "retrain", "subset": subset,
                                "memory": M if M < s.dev_checkpoints[-1] else None, "lr": lr,
                                "epochs": s.retrain_epochs, "obs_noise": s.obs_noise})  # fmt: skip
    for shift in s.shifts:
        for k in range(s.n_dev_streams):
            jobs.append({"kind": "stream", "pretrained": paths[s.networks[0]], "network": s.networks[0],
                         "shift": shift, "stream": 1000 + k, "condition": "onpolicy", "methods": dev_methods,
                         "checkpoints": list(s.dev_checkpoints), **{**stream_kw, "n_eval": s.dev_n_eval}})  # fmt: skip
    if s.uncertainty:
        jobs.append({"kind": "uncertainty", "pretrained": paths[s.networks[0]], "network": s.networks[0],
                     "settings": {"episode_steps": s.episode_steps, "prior_scale": s.kbt_prior_all,
                                  "obs_noise": s.obs_noise}})  # fmt: skip
    res2 = phase("checks_and_development", jobs)
    results["checks"] = [r for r in res2 if r["kind"] == "check"]
    results["tolerance"] = [r for r in res2 if r["kind"] == "tolerance"]
    unc = [r for r in res2 if r["kind"] == "uncertainty"]
    results["uncertainty"] = unc[0] if unc else None
    dev = [r for r in res2 if r["kind"] == "stream"]
    lrs: dict[str, dict[str, Any]] = {}
    for shift in s.shifts:
        units = [u for u in dev if u["shift"] == shift]
        lrs[shift] = {}
        for subset, short in (("all", "all"), ("embed_bias", "embed")):
            cands = {lr: f"dev_{short}_lr{lr:g}" for lr in s.lr_grid}
            lrs[shift][subset] = select_lr(units, cands)
    results["learning_rates"] = {
        "rule": "highest mean success over the development checkpoints after 0 (ties: lower on-policy RMSE); "
        f"grid {list(s.lr_grid)}; development streams {sorted({u['stream'] for u in dev})} of network "
        f"{s.networks[0]} (episodes, draws and evaluation seeds disjoint from the test streams)",
        "chosen": lrs,
        "development_units": dev,
    }
    log("learning rates: " + "; ".join(f"{sh}: " + ", ".join(f"{k} {v['lr']:g}" for k, v in d.items())
                                        for sh, d in lrs.items()))  # fmt: skip

    # 3. test streams -----------------------------------------------------------------------------
    jobs = []
    for n in s.networks:
        for shift in s.shifts:
            methods = _methods(s, mem, {k: v["lr"] for k, v in lrs[shift].items()})
            for k in range(s.n_streams):
                jobs.append({"kind": "stream", "pretrained": paths[n], "network": n, "shift": shift, "stream": k,
                             "condition": "onpolicy", "methods": methods, "checkpoints": list(s.checkpoints),
                             "predictive_checkpoints": list(s.predictive_checkpoints) if k < s.predictive_streams
                             else [], **stream_kw})  # fmt: skip
            for k in range(s.n_expert_streams):
                jobs.append({"kind": "stream", "pretrained": paths[n], "network": n, "shift": shift, "stream": k,
                             "condition": "expert", "methods": [m for m in methods if m["kind"] != "exact"],
                             "checkpoints": list(s.checkpoints), **{**stream_kw, "n_eval": 0}})  # fmt: skip
    # longest first, so the pool's last units are short ones
    jobs.sort(key=lambda j: j["condition"] != "onpolicy")
    units = phase("streams", jobs)
    results["units"] = units
    results["summary"] = summarize(units, s)
    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = timings
    return _finish(out, results)


def _environment() -> dict[str, Any]:
    import os
    import platform

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads_per_unit": 1,
            "dtype": "float64"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# aggregation


def _n90(rows: Sequence[Mapping[str, Any]], last: int, block: int) -> tuple[int | None, float]:
    """Samples until success stays >= 90 % (``None``: never), and the value used in paired means (never:
    ``last + block``, a lower bound)."""
    from .units import n_until_stable

    cps = [r["n"] for r in rows]
    rates = [r["successes"] / r["n_eval"] if "successes" in r else None for r in rows]
    n = n_until_stable(cps, rates, 0.9) if cps and cps[-1] == last else None
    return n, float(last + block if n is None else n)


def summarize(units: Sequence[Mapping[str, Any]], s: OnPolicySettings) -> dict[str, Any]:
    """Per shift and method: success, RMSE, bytes and time per checkpoint with intervals across streams; samples
    until success stays >= 90 %; paired KBT − retraining differences; the conclusion lines."""
    last = s.checkpoints[-1]
    out: dict[str, Any] = {}
    for shift in s.shifts:
        on = [u for u in units if u["shift"] == shift and u["condition"] == "onpolicy"]
        ex = [u for u in units if u["shift"] == shift and u["condition"] == "expert"]
        if not on:
            continue
        names = list(on[0]["methods"])
        keys = [(u["network"], u["stream"]) for u in on]
        per: dict[str, Any] = {}
        for name in names:
            by_unit = [u["methods"][name] for u in on]
            rows_by_n: dict[int, list[Mapping[str, Any]]] = {}
            for m in by_unit:
                for r in m["rows"]:
                    rows_by_n.setdefault(r["n"], []).append(r)
            cps = []
            for n in s.checkpoints:
                rs = rows_by_n.get(n, [])
                rate = [r["successes"] / r["n_eval"] for r in rs if "successes" in r]
                cps.append({
                    "n": n,
                    "success": mean_interval(rate),
                    "success_per_network": {str(net): mean_interval([r["successes"] / r["n_eval"]
                                                                      for m, u in zip(by_unit, on, strict=True)
                                                                      if u["network"] == net
                                                                      for r in m["rows"] if r["n"] == n])
                                            for net in s.networks},
                    "heldout_rmse": mean_interval([r["heldout_rmse"] for r in rs]),
                    "onpolicy_rmse": mean_interval([r.get("next_block_rmse") for r in rs]),
                    "state_bytes": mean_interval([r["state_bytes"] for r in rs]),
                    "env_steps": mean_interval([r["env_steps"] for r in rs]),
                    "predictive_success": mean_interval([r["predictive_successes"] / r["n_eval"] for r in rs
                                                         if "predictive_successes" in r]),
                })  # fmt: skip
            n90 = [_n90(m["rows"], last, s.block) for m in by_unit]
            secs = [
                m["rows"][-1]["update_seconds"] / m["rows"][-1]["n"]
                for m in by_unit
                if m["rows"] and m["rows"][-1]["n"] > 0 and m["spec"].get("kind") in ("kbt", "retrain")
            ]
            per[name] = {
                "spec": on[0]["methods"][name]["spec"],
                "n_parameters": on[0]["methods"][name]["n_parameters"],
                "errors": [m["error"] for m in by_unit if m["error"]],
                "checkpoints": cps,
                "n90_per_stream": [a for a, _ in n90],
                "n90": mean_interval([b for _, b in n90]),
                "n90_reached": sum(a is not None for a, _ in n90),
                "seconds_per_sample": mean_interval(secs),
                "state_bytes_final": cps[-1]["state_bytes"]["mean"],
            }
            if ex and name in ex[0]["methods"]:
                per[name]["expert_stream_rmse"] = [
                    {"n": n, "heldout_rmse": mean_interval([r["heldout_rmse"] for u in ex
                                                            for r in u["methods"][name]["rows"] if r["n"] == n])}
                    for n in s.checkpoints
                ]  # fmt: skip
        comps = []
        for kbt, rivals in (("kbt_embed", [n for n in names if n.startswith("retrain_embed")]),
                            ("kbt_all", [n for n in names if n.startswith("retrain_all")])):  # fmt: skip
            if kbt not in names:
                continue
            for rival in rivals:
                comps.append(_compare(on, kbt, rival, s))
        out[shift] = {"units": [list(k) for k in keys], "methods": per, "comparisons": comps}
    return out


def _at(unit: Mapping[str, Any], name: str, n: int) -> float | None:
    for r in unit["methods"][name]["rows"]:
        if r["n"] == n and "successes" in r:
            return r["successes"] / r["n_eval"]
    return None


def _compare(on: Sequence[Mapping[str, Any]], a: str, b: str, s: OnPolicySettings) -> dict[str, Any]:
    """Paired (same stream seeds, same evaluation episodes) differences of method ``a`` against ``b``."""
    last = s.checkpoints[-1]
    res: dict[str, Any] = {"a": a, "b": b}
    for n in (100, 200):
        if n in s.checkpoints:
            res[f"success_at_{n}"] = paired_difference([_at(u, a, n) for u in on], [_at(u, b, n) for u in on])
    na = [_n90(u["methods"][a]["rows"], last, s.block)[1] for u in on]
    nb = [_n90(u["methods"][b]["rows"], last, s.block)[1] for u in on]
    res["n90"] = paired_difference(na, nb)  # a − b < 0: a reaches 90 % sooner

    def sec(u: Mapping[str, Any], name: str) -> float | None:
        rows = u["methods"][name]["rows"]
        return rows[-1]["update_seconds"] / rows[-1]["n"] if rows and rows[-1]["n"] > 0 else None

    ratio = [sec(u, b) / sec(u, a) for u in on if sec(u, a) and sec(u, b)]
    res["time_ratio_b_over_a"] = mean_interval([math.log(r) for r in ratio])
    for k in ("mean", "lo", "hi"):
        v = res["time_ratio_b_over_a"][k]
        res["time_ratio_b_over_a"][k] = None if v is None else math.exp(v)
    res["time_ratio_b_over_a"]["note"] = "geometric mean of per-stream ratios, interval on the log scale"
    res["bytes"] = {a: _final_bytes(on, a), b: _final_bytes(on, b)}
    return res


def _final_bytes(on: Sequence[Mapping[str, Any]], name: str) -> float | None:
    v = [u["methods"][name]["rows"][-1]["state_bytes"] for u in on if u["methods"][name]["rows"]]
    return float(np.mean(v)) if v else None


def report_from_results(out_dir: Path | str) -> dict[str, Any]:
    """Recompute the summary, conclusion, figures and ``results.md`` of an earlier run from its ``results.json``
    (its units are all there), e.g. after a change of the report; returns the rewritten results."""
    out = Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    s = OnPolicySettings(
        **{k: v for k, v in results["settings"].items() if k in {f.name for f in fields(OnPolicySettings)}}
    )
    results["summary"] = summarize(results["units"], s)
    return _finish(out, results)


def _finish(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    from .._io import write_text_atomic
    from .onpolicy_report import conclusion, write_figures, write_markdown

    results["conclusion"] = conclusion(results)
    results["figures"] = write_figures(out, results)
    results = copy.deepcopy(results)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=_json_default) + "\n")
    write_text_atomic(out / "results.md", write_markdown(results))
    return results


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.integer | np.floating):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
