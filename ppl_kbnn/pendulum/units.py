r"""Units of the on-policy pendulum study: plain top-level functions of plain arguments, callable by any executor.

:func:`run_unit` ``(kind=..., **kwargs) -> dict`` is the one entry point; every argument is a number, a string,
a list or a dict, and the result is a JSON-safe dict, so a process pool (``concurrent.futures``) or a
cluster executor can run units anywhere the package is installed. The pre-trained network travels as the
path of the ``.pt`` file :func:`pretrain_unit` writes. Kinds:

* ``"pretrain"``: pre-train one decision transformer (one *network seed*) on nominal LQR-expert episodes;
* ``"check"``: the recomputed expert and the pre-trained DT on each shift, under the study's evaluation;
* ``"onpolicy"``: one *stream* on one shift: every ``block`` (25) samples each method's **current** network
  runs one episode (more if it ends before ``block`` steps) on the shifted task with action noise; the
  expert recomputed for the task labels the visited states, and ``block`` of those states (drawn without
  replacement) are the next samples. A sample is one label; the environment steps are counted apart.
  After each checkpoint the method is evaluated (success over ``n_eval`` noisy episodes, held-out RMSE
  on expert states, prequential RMSE on its own next block of on-policy states);
* ``"expert"``: the same methods on an i.i.d. stream of expert states (the secondary condition: RMSE only);
* ``"tolerance"``: the pre-trained DT with a fraction of the exact fix of the sensor bias applied;
* ``"uncertainty"``: KBT's predicted std against injected label noise (``uncertainty_study``).

Methods are dicts: ``{"name", "kind": "none" | "exact" | "kbt" | "retrain", "subset": "all" | "embed_bias",
...}`` (KBT: ``covariance``, ``prior_scale``, ``obs_noise``, ``psd_repair``, optionally ``update``, ``rank``,
``noise_mode`` (``KalmanGuide(obs_noise=...)``); retraining: ``memory``, ``lr``,
``epochs``). ``subset="embed_bias"`` makes only the 16 biases of the state embedding (``embed_state.bias``)
adaptable, for KBT and retraining alike.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..envs import (
    DTDataset,
    DTPolicy,
    ExpertPolicy,
    Normalizer,
    Task,
    collect_episodes,
    get_task,
    make_contexts,
    make_env,
    rollout,
)
from ..guide import KalmanGuide
from ..inference.retrain import Retrainer
from ..model import BayesianModel
from ..nn.train import pretrain
from ..nn.transformer import DecisionTransformer, DTConfig
from .evaluate import evaluate_dt, posterior_mean_net

__all__ = [
    "SUBSETS",
    "block_seed",
    "embed_bias",
    "exact_fix",
    "expert_labeler",
    "load_pretrained",
    "n_until_stable",
    "onpolicy_samples",
    "run_unit",
    "unit_seeds",
]

DTYPE = torch.float64
CONTEXT_KEYS = ("returns_to_go", "states", "actions", "timesteps", "attention_mask")
TARGET_RETURN = 1000.0


def embed_bias(name: str) -> bool:
    """The ``bayesian=`` predicate of the ``"embed_bias"`` subset: the state embedding's bias only."""
    return name == "embed_state.bias"


#: Named subsets of adaptable parameters -> the ``bayesian=`` argument of :class:`~ppl_kbnn.BayesianModel`.
SUBSETS: dict[str, Any] = {"all": "all", "embed_bias": embed_bias}


# ---------------------------------------------------------------------------------------------
# seeds


def unit_seeds(network: int, stream: int, shift: str, role: str) -> int:
    """First env seed of a block of episodes: disjoint across networks, streams, shifts and roles.

    ``role`` is ``"stream"`` (on-policy / expert-stream episodes), ``"eval"`` (evaluation episodes),
    ``"heldout"`` (held-out expert episodes) or ``"order"`` (the sample draws). Development streams use
    stream indices from 1000 on, so they never share a seed with a test stream.
    """
    roles = {"stream": 0, "eval": 1, "heldout": 2, "order": 3}
    shifts = {"sensor_bias_0.1": 0, "gear_flip": 1, "gear_x0.15": 2, "nominal": 3}
    if role not in roles:
        raise ValueError(f"unit_seeds: role must be one of {sorted(roles)}, got {role!r}")
    k = shifts.get(shift, 4 + sum(map(ord, shift)) % 5)
    return 10_000_000 * network + 100_000 * roles[role] + 10_000 * k + 5_000 * (stream >= 1000) + 50 * (stream % 1000)


def block_seed(base: int, j: int) -> int:
    """First env seed of the episodes of block ``j`` of a stream whose :func:`unit_seeds` is ``base``.

    Blocks 0-4: ``base + 1000 j`` (inside the stream's slot); later blocks: ``base + 10⁹ (j − 4)``, above every
    slot. With stream indices below 20 (test) or 1000-1019 (development) and at most 50 episodes per block
    (``block <= 50``), no two (network, shift, stream, block, episode) share a seed (tested)."""
    return base + 1000 * j if j < 5 else base + 1_000_000_000 * (j - 4)


# ---------------------------------------------------------------------------------------------
# networks


def pretrain_unit(*, seed: int, path: str, settings: Mapping[str, Any], threads: int = 1) -> dict[str, Any]:
    """Pre-train network ``seed`` (nominal expert episodes with action noise, AdamW) and save it to ``path``.

    ``settings`` holds the :class:`~ppl_kbnn.pendulum.StudySettings` pre-training fields
    (``n_nominal_episodes, nominal_noise, episode_steps, d_model, n_layer, n_head, context, activation,
    pretrain_steps, pretrain_batch, pretrain_lr, pretrain_weight_decay``). Returns the loss summary.
    """
    torch.set_num_threads(threads)
    s = dict(settings)
    t0 = time.perf_counter()
    base = 1_000_000 * seed
    nominal = collect_episodes("nominal", s["n_nominal_episodes"], seed=base + 100_000, max_steps=s["episode_steps"],
                               action_noise=s["nominal_noise"])  # fmt: skip
    norm = Normalizer.fit(nominal)
    ds = DTDataset(nominal, s["context"], norm, dtype=DTYPE)
    cfg = DTConfig(state_dim=4, act_dim=1, d_model=s["d_model"], n_layer=s["n_layer"], n_head=s["n_head"],
                   max_ep_len=1000, context=s["context"], activation=s["activation"], action_tanh=True)  # fmt: skip
    torch.manual_seed(seed)
    net = DecisionTransformer(cfg).to(DTYPE)
    losses = pretrain(net, ds.loss_fn(), s["pretrain_steps"], n_data=len(ds), lr=s["pretrain_lr"],
                      weight_decay=s["pretrain_weight_decay"], batch_size=s["pretrain_batch"], seed=seed)  # fmt: skip
    net.eval()
    from dataclasses import asdict

    torch.save({"config": asdict(cfg), "normalizer": norm.to_dict(), "state_dict": net.state_dict()}, path)
    tail = losses[-max(1, len(losses) // 20) :]
    return {
        "seed": seed,
        "path": str(path),
        "n_parameters": sum(p.numel() for p in net.parameters()),
        "n_train_samples": len(ds),
        "first_loss": float(losses[0]),
        "final_loss": float(np.mean(tail)),
        "loss_curve": [float(v) for v in losses[:: max(1, len(losses) // 200)]],
        "seconds": time.perf_counter() - t0,
    }


def load_pretrained(path: str | Path) -> tuple[DecisionTransformer, Normalizer]:
    """The network and normaliser saved by :func:`pretrain_unit` (float64, eval mode)."""
    blob = torch.load(path, weights_only=False)
    net = DecisionTransformer(DTConfig(**blob["config"])).to(DTYPE)
    net.load_state_dict(blob["state_dict"])
    return net.eval(), Normalizer.from_dict(blob["normalizer"])


@torch.no_grad()
def exact_fix(net: DecisionTransformer, norm: Normalizer, task: Task | str, fraction: float = 1.0) -> nn.Module | None:
    """The pre-trained network corrected exactly for ``task``'s shift, or ``None`` when no exact fix exists.

    * sensor bias ``b`` on the angle (and nothing else): the normalised angle input is shifted by
      ``b / σ_θ`` (``σ_θ`` the normaliser's angle std), so the state embedding ``W s + c`` of a biased
      observation equals the nominal one when ``c' = c − W[:, 1] · b / σ_θ``. ``fraction`` scales that
      correction (the offset-tolerance plot);
    * actuator sign flip (``gear = −1``, nothing else): negating the action head (weight and bias; the tanh
      is odd) and the action-token embedding's weight gives the nominal network's behaviour in the flipped
      coordinates;
    * anything else (e.g. a weaker gear, whose needed actions exceed the tanh head's range): ``None``.
    """
    task = get_task(task)
    others = (task.pole_mass, task.cart_mass, task.gravity)
    out = copy.deepcopy(net).eval()
    if task.angle_bias != 0 and task.gear == 1 and others == (1, 1, 1):
        W = out.embed_state.weight  # (d, 4)
        out.embed_state.bias -= fraction * W[:, 1] * task.angle_bias / norm.state_std[1]
        return out
    if task.gear == -1 and task.angle_bias == 0 and others == (1, 1, 1):
        out.predict_action.weight.neg_()
        out.predict_action.bias.neg_()
        out.embed_action.weight.neg_()
        return out
    return None


# ---------------------------------------------------------------------------------------------
# the on-policy stream


def expert_labeler(task: Task | str) -> Callable[[np.ndarray], np.ndarray]:
    """``states (T, 4) -> actions (T, 1)``: the LQR expert recomputed for ``task`` (it knows the sensor bias)."""
    expert = ExpertPolicy(task)
    return lambda states: np.stack([expert.act(s) for s in np.asarray(states, dtype=np.float64)])


def onpolicy_samples(
    net: nn.Module,
    norm: Normalizer,
    task: Task | str,
    labeler: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    seed: int,
    rng: np.random.Generator,
    action_noise: float,
    reset_noise: float | None,
    max_steps: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    """``n`` samples from the states ``net`` itself visits on ``task``, labelled by ``labeler``.

    Episodes (env seeds ``seed, seed + 1, …``) of ``net`` acting (with ``action_noise`` on the applied action)
    run until they hold at least ``n`` steps; ``labeler`` maps their states to the label actions (the
    context's action tokens stay the applied actions); ``n`` of the contexts are drawn without replacement.

    Returns:
        ``(x, y, info)``: contexts ``x`` (dict of ``(n, K, ...)``), labels ``y`` ``(n, 1)`` (normalised), and
        ``info = {"env_steps", "episodes", "lengths", "states" (n, 4) raw states of the samples}``.
    """
    env = make_env(task, max_episode_steps=max(1000, max_steps), reset_noise_scale=reset_noise)
    eps: list[dict[str, Any]] = []
    try:
        policy = DTPolicy(net, norm, TARGET_RETURN)
        while sum(e["length"] for e in eps) < n:
            ep = rollout(env, policy, seed=seed + len(eps), max_steps=max_steps, action_noise=action_noise)
            ep["policy_actions"] = np.asarray(labeler(ep["states"]), dtype=np.float64).reshape(-1, 1)  # (T, 1)
            eps.append(ep)
    finally:
        env.close()
    ctx = make_contexts(eps, net.config.context, norm, target="policy_actions", dtype=DTYPE)
    raw = np.concatenate([e["states"] for e in eps])  # (T_total, 4), same order as the contexts
    idx = np.sort(rng.choice(raw.shape[0], size=n, replace=False))
    y = ctx.pop("target")[idx]
    x = {k: v[idx] for k, v in ctx.items()}
    info = {"env_steps": int(raw.shape[0]), "episodes": len(eps), "lengths": [int(e["length"]) for e in eps],
            "states": raw[idx]}  # fmt: skip
    return x, y, info


# ---------------------------------------------------------------------------------------------
# methods


class _Method:
    """One adapting method inside a unit: ``update(x, y)``, the acting network, state bytes, update seconds."""

    def __init__(self, spec: Mapping[str, Any], net: DecisionTransformer, norm: Normalizer, task: Task, seed: int):
        self.spec = dict(spec)
        self.name = str(spec["name"])
        self.kind = spec.get("kind", "none")
        self.net = net
        self.guide: KalmanGuide | None = None
        self.retrainer: Retrainer | None = None
        self.fixed: nn.Module | None = net
        if self.kind == "exact":
            self.fixed = exact_fix(net, norm, task)
        elif self.kind == "kbt":
            model = BayesianModel(net, prior_scale=spec["prior_scale"], obs_noise=spec["obs_noise"],
                                  bayesian=SUBSETS[spec.get("subset", "all")])  # fmt: skip
            low = {"rank": spec["rank"]} if "rank" in spec else {}
            self.guide = KalmanGuide(model, covariance=spec.get("covariance", "block"),
                                     update=spec.get("update", "kbnn"), hidden=spec.get("hidden", "token"),
                                     obs_noise=spec.get("noise_mode"), psd_repair=bool(spec.get("psd_repair", False)),
                                     **low)  # fmt: skip
        elif self.kind == "retrain":
            model = BayesianModel(net, prior_scale=1.0, obs_noise=spec.get("obs_noise", 0.1),
                                  bayesian=SUBSETS[spec.get("subset", "all")])  # fmt: skip
            self.retrainer = Retrainer(model, memory=spec.get("memory"), epochs=spec.get("epochs", 5), lr=spec["lr"],
                                       seed=seed)  # fmt: skip
        elif self.kind != "none":
            raise ValueError(f"method {self.name!r}: kind must be none/exact/kbt/retrain, got {self.kind!r}")
        self.n_params = (
            sum(v.numel() for v, _ in model.priors.values()) if self.guide is not None
            else sum(p.numel() for p in self.retrainer.point.parameters()) if self.retrainer is not None else 0
        )  # fmt: skip

    @property
    def adapts(self) -> bool:
        return self.kind in ("kbt", "retrain")

    def update(self, x: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        for i in range(y.shape[0]):  # one sample at a time
            xi, yi = {k: v[i : i + 1] for k, v in x.items()}, y[i : i + 1]
            if self.guide is not None:
                self.guide.update(xi, yi)
            elif self.retrainer is not None:
                self.retrainer.update(xi, yi)

    def network(self) -> nn.Module | None:
        if self.guide is not None:
            return posterior_mean_net(self.guide, self.net)
        if self.retrainer is not None:
            return self.retrainer.point.net.eval()
        return self.fixed

    def state_bytes(self) -> int:
        if self.guide is not None:
            return int(self.guide.belief_bytes)
        if self.retrainer is not None:
            return int(self.retrainer.memory_bytes)
        return 0

    def seconds(self) -> float:
        if self.guide is not None:
            return float(self.guide.update_seconds)
        if self.retrainer is not None:
            return float(self.retrainer.update_seconds)
        return 0.0


class _PredictiveMeanDT(nn.Module):
    """Acts with KBT's closed-form predictive mean (the secondary row) instead of the posterior-mean network."""

    def __init__(self, guide: KalmanGuide, net: DecisionTransformer) -> None:
        super().__init__()
        self.guide = guide
        self.config = net.config
        self._p = nn.Parameter(torch.zeros((), dtype=DTYPE), requires_grad=False)  # dtype/device for evaluate_dt

    def forward(self, returns_to_go: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
                timesteps: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        B = states.shape[0]
        mask = torch.ones(states.shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask
        x = {"returns_to_go": returns_to_go, "states": states, "actions": actions, "timesteps": timesteps,
             "attention_mask": mask}  # fmt: skip
        means = [self.guide.predict({k: v[i : i + 8] for k, v in x.items()})[0] for i in range(0, B, 8)]
        return torch.cat(means)[:, None, :]  # (B, 1, act_dim)


@torch.no_grad()
def _rmse(net: nn.Module, x: Mapping[str, torch.Tensor], y: torch.Tensor) -> float:
    pred = net(**x)[:, -1]  # (N, act_dim)
    return float(((pred - y) ** 2).mean().sqrt())


def n_until_stable(checkpoints: Sequence[int], rates: Sequence[float], level: float = 0.9) -> int | None:
    """The first checkpoint from which the success rate stays ``>= level`` at every later checkpoint (``None``:
    never; a rate that is ``None`` (not measured) counts as a failure)."""
    first = None
    for n, r in zip(checkpoints, rates, strict=True):
        if r is not None and r >= level:
            first = n if first is None else first
        else:
            first = None
    return first


# ---------------------------------------------------------------------------------------------
# units


def _common(kwargs: Mapping[str, Any]) -> tuple[DecisionTransformer, Normalizer, Task]:
    net, norm = load_pretrained(kwargs["pretrained"])
    return net, norm, get_task(kwargs["shift"])


def _heldout(task: Task, norm: Normalizer, K: int, seed: int, n: int, episodes: int, noise: float, steps: int
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
    eps = collect_episodes(task, episodes, seed=seed, max_steps=steps, action_noise=noise)
    ctx = make_contexts(eps, K, norm, target="policy_actions", dtype=DTYPE)
    y = ctx.pop("target")
    idx = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return {k: v[idx] for k, v in ctx.items()}, y[idx]


def stream_unit(
    *,
    pretrained: str,
    network: int,
    shift: str,
    stream: int,
    condition: str,
    methods: Sequence[Mapping[str, Any]],
    checkpoints: Sequence[int],
    block: int = 25,
    n_eval: int = 10,
    eval_action_noise: float = 0.3,
    eval_reset_noise: float | None = 0.05,
    stream_action_noise: float = 0.3,
    episode_steps: int = 1000,
    n_heldout: int = 300,
    predictive_checkpoints: Sequence[int] = (),
    labeler: Callable[[np.ndarray], np.ndarray] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """One stream of one shift for every method in ``methods``; see the module docstring.

    ``condition="onpolicy"``: every ``block`` samples come from the method's own current network;
    ``"expert"``: an i.i.d. stream of expert states (expert episodes with ``stream_action_noise``, drawn in a
    seeded order), evaluated by RMSE only. ``n_eval = 0`` skips the closed-loop evaluation.
    ``predictive_checkpoints``: checkpoints at which KBT methods (those whose spec does not set ``"predictive":
    False``) are also evaluated acting with the predictive
    mean. ``labeler`` (default: the recomputed expert) labels states; tests pass a stub.
    """
    torch.set_num_threads(threads)
    if condition not in ("onpolicy", "expert"):
        raise ValueError(f"condition must be 'onpolicy' or 'expert', got {condition!r}")
    cps = [int(n) for n in checkpoints]
    if cps[0] != 0 or any(b <= a for a, b in zip(cps, cps[1:], strict=False)):
        raise ValueError(f"checkpoints must start at 0 and increase, got {cps}")
    if any(n % block for n in cps):
        raise ValueError(f"checkpoints must be multiples of block={block}, got {cps}")
    if not 1 <= block <= 50 or not 0 <= stream % 1000 < 20:
        raise ValueError(f"block must be in [1, 50] and stream in [0, 20) or [1000, 1020), got {block}, {stream}")
    net, norm, task = _common({"pretrained": pretrained, "shift": shift})
    K = net.config.context
    labeler = expert_labeler(task) if labeler is None else labeler
    s_stream = unit_seeds(network, stream, shift, "stream")
    s_eval = unit_seeds(network, stream, shift, "eval")
    eval_seeds = list(range(s_eval, s_eval + n_eval))
    noise = stream_action_noise / max(1.0, abs(task.gear))
    x_held, y_held = _heldout(task, norm, K, unit_seeds(network, 0, shift, "heldout"), n_heldout, 2, noise,
                              episode_steps)  # fmt: skip
    pool = None
    if condition == "expert":
        eps = collect_episodes(task, max(1, math.ceil(cps[-1] / 200)), seed=s_stream, max_steps=episode_steps,
                               action_noise=noise)  # fmt: skip
        ctx = make_contexts(eps, K, norm, target="policy_actions", dtype=DTYPE)
        y_pool = ctx.pop("target")
        order = torch.randperm(y_pool.shape[0], generator=torch.Generator().manual_seed(s_stream))
        pool = ({k: v[order] for k, v in ctx.items()}, y_pool[order])
        if y_pool.shape[0] < cps[-1] + block:
            raise ValueError(f"expert stream pool has {y_pool.shape[0]} samples, need {cps[-1] + block}")
    out: dict[str, Any] = {"kind": "stream", "network": network, "shift": shift, "stream": stream,
                           "condition": condition, "checkpoints": cps, "block": block, "eval_seeds": eval_seeds[:1],
                           "methods": {}}  # fmt: skip
    for spec in methods:
        t_method = time.perf_counter()
        m = _Method(spec, net, norm, task, seed=s_stream)
        rng = np.random.default_rng(unit_seeds(network, stream, shift, "order"))
        rows: list[dict[str, Any]] = []
        env_steps = 0
        error = None
        n_done = 0
        next_block: tuple[Any, ...] | None = None
        t_eval = 0.0
        for n in cps:
            while n_done < n and error is None and m.adapts:
                if next_block is None:
                    next_block = _block(m, condition, pool, n_done, block, norm, task, labeler, s_stream, rng, noise,
                                        eval_reset_noise, episode_steps)  # fmt: skip
                x, y, info = next_block
                next_block = None
                env_steps += info["env_steps"]
                try:
                    m.update(x, y)
                except FloatingPointError as exc:
                    error = f"update failed after {n_done} samples: {exc}"
                n_done += block
            if error is not None or m.network() is None:
                break
            te = time.perf_counter()
            netw = m.network()
            row: dict[str, Any] = {"n": n, "env_steps": env_steps, "heldout_rmse": _rmse(netw, x_held, y_held),
                                   "state_bytes": m.state_bytes(), "update_seconds": m.seconds()}  # fmt: skip
            if m.adapts or n == 0:
                # prequential: the next block of the method's own states (labelled) before it learns from it
                nb = _block(m, condition, pool, n, block, norm, task, labeler, s_stream, rng, noise, eval_reset_noise,
                            episode_steps)  # fmt: skip
                row["next_block_rmse"] = _rmse(netw, nb[0], nb[1])
                next_block = nb if m.adapts else None
            if n_eval:
                if m.adapts or n == 0:
                    ev = evaluate_dt(netw, norm, task, eval_seeds, max_steps=episode_steps,
                                     action_noise=eval_action_noise, reset_noise=eval_reset_noise)  # fmt: skip
                    row.update(successes=ev["successes"], n_eval=ev["n"], mean_length=ev["mean_length"])
                else:  # a fixed network: the n = 0 evaluation holds at every checkpoint
                    row.update({k: rows[0][k] for k in ("successes", "n_eval", "mean_length", "next_block_rmse")})
                if m.guide is not None and n in predictive_checkpoints and m.spec.get("predictive", True):
                    ev = evaluate_dt(_PredictiveMeanDT(m.guide, net), norm, task, eval_seeds, max_steps=episode_steps,
                                     action_noise=eval_action_noise, reset_noise=eval_reset_noise)  # fmt: skip
                    row["predictive_successes"] = ev["successes"]
            t_eval += time.perf_counter() - te
            rows.append(row)
        out["methods"][m.name] = {"spec": m.spec, "n_parameters": m.n_params, "rows": rows, "error": error,
                                  "eval_seconds": t_eval, "seconds": time.perf_counter() - t_method}  # fmt: skip
    return out


Block = tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]


def _block(m: _Method, condition: str, pool: Any, start: int, block: int, norm: Normalizer, task: Task,
           labeler: Callable[[np.ndarray], np.ndarray], seed: int, rng: np.random.Generator, noise: float,
           reset_noise: float | None, steps: int) -> Block:  # fmt: skip
    """The next ``block`` samples of a method's stream (its own episodes, or the expert pool from ``start``)."""
    if condition == "expert":
        x, y = pool
        return {k: v[start : start + block] for k, v in x.items()}, y[start : start + block], {"env_steps": 0}
    netw = m.network()
    return onpolicy_samples(netw, norm, task, labeler, block, seed=block_seed(seed, start // block), rng=rng,
                            action_noise=noise, reset_noise=reset_noise, max_steps=steps)  # fmt: skip


def check_unit(*, pretrained: str, network: int, shifts: Sequence[str], n_eval: int = 10,
               eval_action_noise: float = 0.3, eval_reset_noise: float | None = 0.05, episode_steps: int = 1000,
               threads: int = 1) -> dict[str, Any]:  # fmt: skip
    """The recomputed expert, the pre-trained DT and its exact fix on the nominal task and every shift, under the
    study's evaluation (action noise, reset noise)."""
    torch.set_num_threads(threads)
    net, norm = load_pretrained(pretrained)
    out: dict[str, Any] = {"kind": "check", "network": network, "shifts": {}}
    for shift in ["nominal", *shifts]:
        task = get_task(shift)
        s_eval = unit_seeds(network, 999, shift, "eval")
        seeds = list(range(s_eval, s_eval + n_eval))
        env = make_env(task, max_episode_steps=max(1000, episode_steps), reset_noise_scale=eval_reset_noise)
        try:
            expert = ExpertPolicy(task)
            k = sum(rollout(env, expert, seed=s, max_steps=episode_steps, action_noise=eval_action_noise,
                            rng=np.random.default_rng([s, 1]))["success"] for s in seeds)  # fmt: skip
        finally:
            env.close()
        kw = {"max_steps": episode_steps, "action_noise": eval_action_noise, "reset_noise": eval_reset_noise}
        dt = evaluate_dt(net, norm, task, seeds, **kw)
        dt0 = evaluate_dt(net, norm, task, seeds, max_steps=episode_steps)  # noiseless (lengths: near-copies)
        fix = exact_fix(net, norm, task)
        out["shifts"][shift] = {
            "expert": int(k), "pretrained": dt["successes"], "pretrained_lengths": dt["lengths"],
            "pretrained_noiseless": dt0["successes"], "pretrained_noiseless_lengths": dt0["lengths"],
            "exact_fix": None if fix is None else evaluate_dt(fix, norm, task, seeds, **kw)["successes"], "n": n_eval,
        }  # fmt: skip
    return out


def tolerance_unit(*, pretrained: str, network: int, fractions: Sequence[float], n_eval: int = 10,
                   eval_action_noise: float = 0.3, eval_reset_noise: float | None = 0.05, episode_steps: int = 1000,
                   shift: str = "sensor_bias_0.1", threads: int = 1) -> dict[str, Any]:  # fmt: skip
    """Success of the pre-trained DT with ``fraction`` × the exact fix of the sensor bias, per fraction."""
    torch.set_num_threads(threads)
    net, norm = load_pretrained(pretrained)
    s_eval = unit_seeds(network, 998, shift, "eval")
    seeds = list(range(s_eval, s_eval + n_eval))
    rows = []
    for f in fractions:
        fix = exact_fix(net, norm, shift, fraction=float(f))
        ev = evaluate_dt(fix, norm, shift, seeds, max_steps=episode_steps, action_noise=eval_action_noise,
                         reset_noise=eval_reset_noise)  # fmt: skip
        rows.append(
            {"fraction": float(f), "successes": ev["successes"], "n": ev["n"], "mean_length": ev["mean_length"]}
        )
    return {"kind": "tolerance", "network": network, "shift": shift, "rows": rows}


def uncertainty_unit(*, pretrained: str, network: int, settings: Mapping[str, Any], shift: str = "sensor_bias_0.1",
                     threads: int = 1) -> dict[str, Any]:  # fmt: skip
    """KBT's predicted std vs its actual error under injected label noise, on an expert stream of ``shift``
    (:func:`~ppl_kbnn.pendulum.uncertainty.uncertainty_study`, with the :class:`~ppl_kbnn.pendulum.StudySettings`
    fields in ``settings``)."""
    from .study import StudySettings
    from .uncertainty import uncertainty_study

    torch.set_num_threads(threads)
    s = StudySettings().with_overrides(settings)
    net, norm = load_pretrained(pretrained)
    task = get_task(shift)
    noise = s.stream_noise / max(1.0, abs(task.gear))
    seed = unit_seeds(network, 0, shift, "stream")
    eps = collect_episodes(task, s.n_stream_episodes, seed=seed + 500, max_steps=s.episode_steps, action_noise=noise)
    ctx = make_contexts(eps, s.context, norm, target="policy_actions", dtype=DTYPE)
    y = ctx.pop("target")
    order = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed))
    x_stream, y_stream = {k: v[order] for k, v in ctx.items()}, y[order]
    x_held, y_held = _heldout(task, norm, s.context, unit_seeds(network, 0, shift, "heldout"), s.n_heldout_uncertainty,
                              s.n_heldout_episodes, noise, s.episode_steps)  # fmt: skip
    res = uncertainty_study(net, s, seed, x_stream, y_stream, x_held, y_held)
    return {"kind": "uncertainty", "network": network, "shift": shift, **res}


_KINDS: dict[str, Callable[..., dict[str, Any]]] = {
    "pretrain": pretrain_unit,
    "check": check_unit,
    "stream": stream_unit,
    "tolerance": tolerance_unit,
    "uncertainty": uncertainty_unit,
}


def run_unit(**kwargs: Any) -> dict[str, Any]:
    """Run one unit of the study: ``kind`` (``"pretrain"``, ``"check"``, ``"stream"``, ``"tolerance"``,
    ``"uncertainty"``) and that kind's keyword arguments (plain values); returns a JSON-safe dict with the unit's
    wall ``seconds`` and ``cpu_seconds`` added."""
    kind = kwargs.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"run_unit: kind must be one of {sorted(_KINDS)}, got {kind!r}")
    t0, c0 = time.perf_counter(), time.process_time()
    out = _KINDS[kind](**kwargs)
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0  # this process's CPU time (less sensitive to the machine's load)
    return out
