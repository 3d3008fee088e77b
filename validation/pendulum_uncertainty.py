"""The pendulum uncertainty study with the matched, fixed and auto obs-noise policies, for several seeds.

For each seed this pre-trains the decision transformer, chooses the shift and draws the stream and held-out
contexts exactly as ``ppl-kbnn pendulum --seed N`` does (the study's own functions and settings: FULL, or QUICK
with ``--quick``), then runs :func:`ppl_kbnn.pendulum.uncertainty.uncertainty_study` and prints one table row
per (seed, sigma, policy) and the acceptance check of the auto policy (90 % coverage in [0.85, 0.95], mean
predicted std within 20 % of the RMSE). The pre-trained network and data of each seed are cached in
``--cache`` (delete it after changing the study's pre-training).

Run: ``OMP_NUM_THREADS=1 python validation/pendulum_uncertainty.py --seeds 0 1 2 --out /tmp/pend_unc.json``
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ppl_kbnn.envs import DTDataset, ExpertPolicy, Normalizer, collect_episodes, get_task, make_contexts, success_rate
from ppl_kbnn.nn.train import pretrain
from ppl_kbnn.nn.transformer import DecisionTransformer, DTConfig
from ppl_kbnn.pendulum.evaluate import evaluate_dt
from ppl_kbnn.pendulum.study import DTYPE, FULL, QUICK, StudySettings, _seeds, _split, _take
from ppl_kbnn.pendulum.uncertainty import POLICIES, uncertainty_study


def prepare(seed: int, s: StudySettings, cache: Path) -> dict[str, Any]:
    """Steps 1-3 of the study (pre-training, shift, stream and held-out contexts) for ``seed``, cached."""
    f = cache / f"seed{seed}.pt"
    if f.exists():
        d = torch.load(f, weights_only=False)
        net = DecisionTransformer(DTConfig(**d["config"])).to(DTYPE)
        net.load_state_dict(d["net"])
        return {**d, "net": net.eval()}
    seeds = _seeds(seed, s)
    eval_seeds = seeds["evaluation"]
    nominal = collect_episodes("nominal", s.n_nominal_episodes, seed=seeds["nominal_data"][0],
                               max_steps=s.episode_steps, action_noise=s.nominal_noise)  # fmt: skip
    norm = Normalizer.fit(nominal)
    ds = DTDataset(nominal, s.context, norm, dtype=DTYPE)
    cfg = DTConfig(state_dim=4, act_dim=1, d_model=s.d_model, n_layer=s.n_layer, n_head=s.n_head,
                   max_ep_len=1000, context=s.context, activation=s.activation, action_tanh=True)  # fmt: skip
    torch.manual_seed(seed)
    net = DecisionTransformer(cfg).to(DTYPE)
    pretrain(net, ds.loss_fn(), s.pretrain_steps, n_data=len(ds), lr=s.pretrain_lr,
             weight_decay=s.pretrain_weight_decay, batch_size=s.pretrain_batch, seed=seed, progress=False)  # fmt: skip
    net.eval()
    chosen = None
    for name in s.candidates:
        task = get_task(name)
        expert = success_rate(task, ExpertPolicy(task), s.n_eval, seed=eval_seeds[0], max_steps=s.episode_steps)
        dt = evaluate_dt(net, norm, task, eval_seeds, max_steps=s.episode_steps)
        if expert.rate >= s.expert_min_rate and dt["successes"] / dt["n"] <= s.pretrained_max_rate:
            chosen = name
            break
    if chosen is None:
        raise RuntimeError(f"seed {seed}: no shift qualifies (the study stops there too)")
    task = get_task(chosen)
    noise = s.stream_noise / max(1.0, abs(task.gear))
    pool_eps = collect_episodes(task, s.n_stream_episodes, seed=seeds["stream_pool"][0], max_steps=s.episode_steps,
                                action_noise=noise)  # fmt: skip
    held_eps = collect_episodes(task, s.n_heldout_episodes, seed=seeds["heldout"][0], max_steps=s.episode_steps,
                                action_noise=noise)  # fmt: skip
    x_pool, y_pool = _split(make_contexts(pool_eps, s.context, norm, target="policy_actions", dtype=DTYPE))
    x_held, y_held = _split(make_contexts(held_eps, s.context, norm, target="policy_actions", dtype=DTYPE))
    gen = torch.Generator().manual_seed(seed)
    n_max = max(s.checkpoints[-1], s.n_uncertainty)
    order = torch.randperm(y_pool.shape[0], generator=gen)[:n_max]
    hidx = torch.randperm(y_held.shape[0], generator=gen)[: s.n_heldout]
    d = {"config": asdict(cfg), "shift": chosen,
         "x_stream": _take(x_pool, order), "y_stream": y_pool[order],
         "x_held": _take(x_held, hidx), "y_held": y_held[hidx]}  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({**d, "net": net.state_dict()}, f)
    return {**d, "net": net}


def main() -> None:
    """Run the study's uncertainty part for each seed; print the rows and the acceptance of the auto policy."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/pendulum_uncertainty_cache"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--policies", nargs="+", default=None, choices=POLICIES,
                    help="obs-noise policies to run (default: the study's settings)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    s = QUICK if args.quick else FULL
    if args.policies:
        s = replace(s, obs_noise_policies=tuple(args.policies))
    results = {}
    print("| seed | σ | policy | obs_noise (90% interval) | mean pred std | RMSE | std/RMSE | 90% coverage | NLL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        t0 = time.perf_counter()
        d = prepare(seed, s, args.cache)
        unc = uncertainty_study(d["net"], s, seed, d["x_stream"], d["y_stream"], d["x_held"], d["y_held"])
        results[seed] = {"shift": d["shift"], "seconds": time.perf_counter() - t0, **unc}
        for r in unc["rows"]:
            iv = r.get("obs_noise_interval_90")
            noise = f"{r['obs_noise']:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")
            ratio = r["mean_pred_std"] / r["rmse_noisy_labels"]
            print(f"| {seed} | {r['sigma']:g} | {r['obs_noise_policy']} | {noise} | {r['mean_pred_std']:.3f} "
                  f"| {r['rmse_noisy_labels']:.3f} | {ratio:.3f} | {r['coverage_90']:.3f} | {r['nll']:.2f} |",
                  flush=True)  # fmt: skip
    for policy in s.obs_noise_policies:
        rows = [(seed, r) for seed, res in results.items() for r in res["rows"] if r["obs_noise_policy"] == policy]
        ok = [0.85 <= r["coverage_90"] <= 0.95 and abs(r["mean_pred_std"] / r["rmse_noisy_labels"] - 1) <= 0.2
              for _, r in rows]  # fmt: skip
        print(f"{policy}: {sum(ok)}/{len(ok)} (seed, sigma) rows meet coverage in [0.85, 0.95] and std within 20%")
        for (seed, r), good in zip(rows, ok, strict=True):
            if not good:
                print(f"  fails: seed {seed} sigma {r['sigma']:g}: coverage {r['coverage_90']:.3f}, "
                      f"std/RMSE {r['mean_pred_std'] / r['rmse_noisy_labels']:.3f}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
