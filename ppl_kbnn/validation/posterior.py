r"""Validation section ``posterior``: KBT vs NUTS vs SVI on identical data and prior.

Problems (:data:`PROBLEMS`), float64:

* ``mlp``: ``Linear(1,16) → ReLU → Linear(16,1)`` pre-trained on ``sin x``
  (:func:`~ppl_kbnn.toy.pretrained_mlp`, seed ``seed``), every weight Bayesian, prior scale 0.1 around the
  pre-trained weights, obs noise 0.1; 50 training samples of ``sin x + 0.3 x`` + noise 0.1
  (:func:`~ppl_kbnn.toy.regression_stream`, seed ``seed + 1``; seed 0 gives exactly the issue-3 data);
  held out: 200 fresh noisy samples (seed ``seed + 10_000``). KBT hidden mode ``"diag"`` (KBNN's).
* ``mlp-head``: the same network and data with only the output layer Bayesian (17 weights). The output is
  linear in those weights, so the posterior is Gaussian and KBT-block is exact (conjugate regression on the
  frozen ReLU features): its distance to NUTS measures NUTS's own Monte-Carlo error. It is the cheapest
  problem on which NUTS reaches R-hat ≤ 1.01 (about 1200 draws per chain), so it is the ``--quick`` problem.
* ``transformer``: d_model 8, 1 layer, 1 head, 6 tokens
  (:func:`~ppl_kbnn.toy.teacher_student_transformer`, seed ``seed``): the student's weights centre the
  prior (scale 0.05, every ``Linear`` Bayesian), the teacher (student + 0.05·N(0, 1) on every parameter)
  generates 40 training samples and 200 held-out samples (noise 0.1), obs noise 0.1. KBT hidden mode
  ``"joint"`` (the most faithful one, see ``network_moments``).

Methods, all on the same :class:`~ppl_kbnn.model.BayesianModel` and data:

* ``prior`` — the closed-form prior predictive (no data), for scale;
* ``kbt-block``, ``kbt-diag`` — one pass of :meth:`~ppl_kbnn.guide.KalmanGuide.update` over the training
  samples in order; wall time = ``update_seconds`` (the total update time);
* ``svi-normal``, ``svi-lowrank`` — :func:`~ppl_kbnn.inference.svi` (AutoNormal / AutoLowRankMultivariateNormal,
  full-batch ELBO, initialised at the prior means; the function already copies the prior means so
  AutoNormal cannot move the prior in place); wall time includes the 500 predictive draws;
* ``laplace-full``, ``laplace-kron`` — :func:`~ppl_kbnn.inference.laplace` (laplace-torch): a Gaussian at the
  MAP (the pre-trained weights refined by L-BFGS) with the full / Kronecker-factored GGN over all Bayesian
  weights and a scalar prior precision from the marginal likelihood; predictive = the linearised (GLM) one;
  skipped if laplace-torch is not installed;
* ``nuts`` — the reference: :func:`~ppl_kbnn.inference.nuts`, JIT, 2 chains (seeds ``seed``,
  ``seed + 1``) side by side in two processes, initialised from prior draws; dense mass matrix on the
  MLPs (their posteriors are strongly correlated: 3× fewer seconds per effective draw on ``mlp-head``),
  diagonal on the transformer (a dense one estimated from 500 warm-up draws in 873 dimensions made it
  slower); wall time = the elapsed time of the call (chains side by side), including JIT compilation and
  the worker start; the sum of the chains' own times is reported beside it.

Metrics on the held-out inputs (``m``, ``s``: a method's predictive mean and std including the noise;
``m*``, ``s*``: NUTS's): ``mean_err_max`` / ``mean_err_mean`` = max / mean of ``|m − m*| / s*``;
``std_ratio_min`` / ``std_ratio_max`` = range of ``s / s*``; ``log_std_ratio_max`` = max ``|log(s / s*)|``
(a factor 2 too wide counts as much as a factor 2 too narrow); ``nll`` = mean Gaussian negative
log-likelihood of the held-out noisy targets under ``N(m, s²)``; ``coverage90`` = share of held-out
targets inside ``m ± 1.645 s``; ``wall_s``; ``memory_bytes``. NUTS also gets max R-hat (rank-normalised
split R-hat), min bulk / tail ESS (arviz), divergences, and the Monte-Carlo standard error of its own
predictive mean, ``nuts_mean_mcse_max`` = max over inputs of ``sd_s f(x; θ_s) / √ESS_mean / s*`` (the floor
below which a mean error is not resolved). ``heldout_compare``: ``az.compare`` of every method's held-out log
predictive density ``Σ_i log mean_s p(y_i | θ_s)`` (:func:`~ppl_kbnn.inference.compare` with ``heldout=True``).
``trace_weights`` / ``posterior_nuts_trace_<problem>.png``: the :data:`TRACE_WEIGHTS` weights of the NUTS
reference with the largest R-hat and the smallest bulk / tail ESS, their ``az.summary`` statistics, and their
``az.plot_trace`` (density and trace per chain) and ``az.plot_rank`` (rank histogram per chain) in one figure.

Checks: for every problem, NUTS converged: max R-hat ≤ 1.01 and min bulk ESS ≥ 100 (the reference must
be trustworthy); every method's predictive is finite with ``s > 0``.

Findings (measured, reported, not checks): whether KBT-block is at least as close to NUTS as SVI-normal
on both the predictive mean error (``mean_err_max``) and the std ratio (``log_std_ratio_max``), and
whether KBT-block's total update time is ≥ 100× smaller than NUTS's wall time.

``--quick`` runs ``mlp-head`` only, with fewer SVI steps (:data:`QUICK`): NUTS on the full MLP and on the
transformer needs more draws for R-hat ≤ 1.01 than a quick run allows (the rule still applies to the quick
run). The full run (:data:`FULL`) runs all three problems.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pyro.poutine as poutine
import torch
from tqdm import tqdm

from ..guide import KalmanGuide
from ..inference import (
    InferenceResult,
    compare,
    ess,
    from_guide,
    laplace,
    model_output,
    nuts,
    svi,
    trace_figure,
    trace_weights,
)
from ..model import BayesianModel
from ..toy import pretrained_mlp, regression_stream, teacher_student_transformer
from ._md import checks_md, findings_md

PROBLEMS: dict[str, dict[str, Any]] = {
    "mlp": {"width": 16, "prior_scale": 0.1, "obs_noise": 0.1, "n_train": 50, "kbt_hidden": "diag", "bayesian": "all"},
    "mlp-head": {"width": 16, "prior_scale": 0.1, "obs_noise": 0.1, "n_train": 50, "kbt_hidden": "diag",
                 "bayesian": "head"},
    "transformer": {"d_model": 8, "n_layer": 1, "n_head": 1, "T": 6, "shift": 0.05, "prior_scale": 0.05,
                    "obs_noise": 0.1, "n_train": 40, "kbt_hidden": "joint"},
}  # fmt: skip

FULL: dict[str, Any] = {
    "problems": ("mlp-head", "mlp", "transformer"),
    "nuts": {
        "mlp-head": {"warmup": 300, "draws": 2000, "full_mass": True},
        "mlp": {"warmup": 500, "draws": 1500, "full_mass": True},
        "transformer": {"warmup": 500, "draws": 1500, "full_mass": False},
    },
    "svi_steps": {"mlp-head": 3000, "mlp": 3000, "transformer": 3000},
    "n_test": 200,
}
QUICK: dict[str, Any] = {
    "problems": ("mlp-head",),
    "nuts": {"mlp-head": {"warmup": 200, "draws": 1200, "full_mass": True}},
    "svi_steps": {"mlp-head": 1500},
    "n_test": 200,
}
QUICK_NOTE = "quick run: the head-only MLP only (Gaussian posterior: the cheapest converged NUTS), fewer SVI steps"
NUM_CHAINS = 2
NUTS_PROCESSES = 2  # chains side by side (at most os.cpu_count()); identical draws to sequential chains
SVI_LR = 0.01
SVI_PREDICT = 500

RHAT_MAX = 1.01
ESS_MIN = 100.0
Z90 = 1.6448536269514722  # standard normal 95% quantile: the central 90% interval is m ± Z90·s
SPEEDUP_MIN = 100.0
GUIDES: tuple[tuple[str, str, str], ...] = (
    ("kbt-block", "block", "kbnn"), ("kbt-diag", "diag", "kbnn"),
    ("diag-ekf", "diag", "ekf"), ("block-ekf", "block", "ekf"), ("full-ekf", "full", "ekf"),
    ("lowrank-ekf", "lowrank", "ekf"),
    ("diag-slr", "diag", "slr"), ("block-slr", "block", "slr"), ("full-slr", "full", "slr"),
    ("lowrank-slr", "lowrank", "slr"),
)  # fmt: skip
"""Closed-form sequential methods: ``(name, covariance, update)``; each predicts with its matching read-out."""
N_ORDERS = 6  # stream orders per closed-form method (the given order and 5 random permutations)
METHODS = ("prior", *(g[0] for g in GUIDES), "svi-normal", "svi-lowrank", "laplace-full", "laplace-kron", "nuts")
TRACE_WEIGHTS = 4  # weights shown in the trace / rank figure of each NUTS reference (largest R-hat, smallest ESS)
LAPLACE_STRUCTURES = ("full", "kron")  # Hessian structures of the Laplace rows (all Bayesian weights, marglik prior)


def _problem(name: str, seed: int, n_test: int) -> dict[str, Any]:
    """The model, training data and held-out data of problem ``name``."""
    spec = PROBLEMS[name]
    if name.startswith("mlp"):
        net = pretrained_mlp(spec["width"], seed=seed)
        x, y = regression_stream(spec["n_train"], seed=seed + 1)  # (N, 1) each
        xt, yt = regression_stream(n_test, seed=seed + 10_000)
    else:
        net, _, x, y, xt, yt = teacher_student_transformer(
            spec["n_train"], n_test, T=spec["T"], d_model=spec["d_model"], n_layer=spec["n_layer"],
            n_head=spec["n_head"], shift=spec["shift"], noise=spec["obs_noise"], seed=seed,
        )  # fmt: skip
    model = BayesianModel(net, prior_scale=spec["prior_scale"], obs_noise=spec["obs_noise"],
                          bayesian=spec.get("bayesian", "all"))  # fmt: skip
    n_params = sum(loc.numel() for loc, _ in model.priors.values())
    return {"model": model, "x": x, "y": y, "xt": xt, "yt": yt, "n_params": n_params}


def _draw_outputs(model: BayesianModel, samples: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
    """``f(x; θ_s)`` for every draw, ``(S, *y_shape)`` (as in :func:`~ppl_kbnn.inference.draws_predictive`)."""
    S = next(iter(samples.values())).shape[0]
    outs = []
    for s in range(S):
        with poutine.condition(data={k: v[s] for k, v in samples.items()}):
            outs.append(model_output(model, x))
    return torch.stack(outs)


def _metrics(mean, std, ref_mean, ref_std, yt) -> dict[str, Any]:
    """Held-out metrics of one predictive ``(mean, std)`` against NUTS's and the noisy targets (all ``(N, d)``)."""
    z = ((mean - ref_mean).abs() / ref_std).flatten()
    ratio = (std / ref_std).flatten()
    resid = ((yt - mean) / std).flatten()
    nll = (0.5 * math.log(2 * math.pi) + std.log().flatten() + 0.5 * resid**2).mean()
    return {
        "mean_err_max": float(z.max()),
        "mean_err_mean": float(z.mean()),
        "std_ratio_min": float(ratio.min()),
        "std_ratio_max": float(ratio.max()),
        "log_std_ratio_max": float(ratio.log().abs().max()),
        "nll": float(nll),
        "coverage90": float((resid.abs() <= Z90).double().mean()),
        "finite": bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()),
        "per_input": {"mean_err": [round(float(v), 6) for v in z], "std_ratio": [round(float(v), 6) for v in ratio]},
    }


def _run_problem(name: str, cfg: dict[str, Any], seed: int, progress: bool, bar: tqdm, out_dir: Path) -> dict[str, Any]:
    spec = PROBLEMS[name]
    prob = _problem(name, seed, cfg["n_test"])
    model, x, y, xt, yt = prob["model"], prob["x"], prob["y"], prob["xt"], prob["yt"]
    preds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    predictors: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    results: dict[str, InferenceResult] = {}  # for the held-out az.compare

    def step(method: str) -> None:
        bar.set_description(f"posterior {name}: {method}")

    # NUTS first: the reference
    step("nuts")
    nc = cfg["nuts"][name]
    ref = nuts(model, x, y, num_samples=nc["draws"], warmup_steps=nc["warmup"], num_chains=NUM_CHAINS, seed=seed,
               jit_compile=True, progress=progress, full_mass=nc.get("full_mass", False),
               processes=max(1, min(NUTS_PROCESSES, os.cpu_count() or 1)))  # fmt: skip
    predictors["nuts"] = ref.predict
    results["nuts"] = ref
    preds["nuts"] = ref.predict(xt)
    f = _draw_outputs(model, ref.samples, xt)  # (C·D, N, d), chain-major
    f_chains = f.reshape(NUM_CHAINS, nc["draws"], *f.shape[1:])
    ess_mean = torch.as_tensor(ess({"f": f_chains}, method="mean")["f"])  # (N, d)
    mcse = f.std(0) / ess_mean.sqrt() / preds["nuts"][1]
    d = ref.diagnostics
    info["nuts"] = {
        "wall_s": ref.wall_seconds, "memory_bytes": ref.memory_bytes,
        "max_rhat": d["max_rhat"], "min_ess_bulk": d["min_ess_bulk"], "min_ess_tail": d["min_ess_tail"],
        "divergences": d["divergences"], "acceptance_rate": d["acceptance_rate"], "step_size": d["step_size"],
        "chain_seconds": d["chain_seconds"], "num_chains": NUM_CHAINS, "warmup": nc["warmup"], "draws": nc["draws"],
        "full_mass": d["full_mass"], "processes": d["processes"],
        "nuts_mean_mcse_max": float(mcse.max()),
    }  # fmt: skip
    # trace and rank plots of the least-mixed weights (largest R-hat, smallest bulk / tail ESS)
    chains = {k: v.reshape(NUM_CHAINS, nc["draws"], *v.shape[1:]) for k, v in ref.samples.items()}  # (C, D, ...)
    info["nuts"]["trace_weights"] = trace_weights(chains, TRACE_WEIGHTS)
    trace_png = f"posterior_nuts_trace_{name}.png"
    trace_figure(chains, info["nuts"]["trace_weights"], out_dir / trace_png,
                 title=f"{name}: NUTS reference, {NUM_CHAINS} chains × {nc['draws']} draws (least-mixed weights)")
    bar.update(1)

    # closed form
    step("prior, kbt")
    prior = KalmanGuide(model, covariance="block", hidden=spec["kbt_hidden"])
    results["prior"] = from_guide(prior, model=model)
    predictors["prior"] = results["prior"].predict
    preds["prior"] = predictors["prior"](xt)
    info["prior"] = {"wall_s": 0.0, "memory_bytes": int(prior.belief_bytes)}
    for name_g, cov, rule in GUIDES:
        step(name_g)
        guide = KalmanGuide(model, covariance=cov, update=rule, hidden=spec["kbt_hidden"]).update(x, y)
        res = results[name_g] = from_guide(guide, method=name_g, model=model)
        predictors[res.method] = res.predict
        preds[res.method] = res.predict(xt)
        orders = [preds[res.method]]
        for k in range(1, N_ORDERS):  # the same stream in other orders: how much the result depends on it
            perm = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed * 100 + k))
            g = KalmanGuide(model, covariance=cov, update=rule, hidden=spec["kbt_hidden"])
            g.update(_rows(x, perm), y[perm])
            orders.append(from_guide(g).predict(xt))
        info[res.method] = {"wall_s": res.wall_seconds, "memory_bytes": res.memory_bytes, "covariance": cov,
                            "update": rule, "hidden": spec["kbt_hidden"],
                            "guard_counts": res.diagnostics["guard_counts"], "orders": orders}  # fmt: skip
    bar.update(1)

    # variational baselines
    for kind in ("normal", "lowrank"):
        step(f"svi-{kind}")
        res = svi(model, x, y, guide=kind, num_steps=cfg["svi_steps"][name], lr=SVI_LR, seed=seed,
                  num_predict=SVI_PREDICT, progress=progress)  # fmt: skip
        predictors[res.method] = res.predict
        preds[res.method], results[res.method] = res.predict(xt), res
        info[res.method] = {"wall_s": res.wall_seconds, "memory_bytes": res.memory_bytes,
                            "num_steps": res.diagnostics["num_steps"], "final_loss": res.diagnostics["final_loss"],
                            "rank": res.diagnostics["rank"]}  # fmt: skip
        bar.update(1)
    step("laplace")
    _laplace_rows(model, x, y, xt, preds, predictors, info, results)
    bar.update(1)

    ref_mean, ref_std = preds["nuts"]
    methods = []
    for method in (m for m in METHODS if m in preds):
        mean, std = preds[method]
        extra = dict(info[method])
        if "orders" in extra:  # max mean error and max |log std ratio| over the stream orders: (min, max)
            per = [_metrics(m, sd, ref_mean, ref_std, yt) for m, sd in extra.pop("orders")]
            extra["orders"] = {"n": len(per), **{k: [min(r[k] for r in per), max(r[k] for r in per)]
                                                 for k in ("mean_err_max", "log_std_ratio_max")}}  # fmt: skip
        methods.append({"method": method, **_metrics(mean, std, ref_mean, ref_std, yt), **extra})
    kbt = next(r for r in methods if r["method"] == "kbt-block")
    return {
        "problem": name,
        "n_params": prob["n_params"],
        "n_train": int(y.shape[0]),
        "n_test": int(yt.shape[0]),
        **{k: spec[k] for k in ("prior_scale", "obs_noise", "kbt_hidden")},
        "methods": methods,
        "nuts": info["nuts"],
        "speedup_kbt_block": info["nuts"]["wall_s"] / max(kbt["wall_s"], 1e-12),
        "curve": _curve(predictors, x, y) if name.startswith("mlp") else None,
        "heldout_compare": _heldout_compare(results, xt, yt),
        "nuts_trace_figure": trace_png,
    }


def _rows(x: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a batch (a tensor or a dict of tensors)."""
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def _laplace_rows(model: BayesianModel, x: Any, y: torch.Tensor, xt: Any, preds: dict[str, Any],
                  predictors: dict[str, Any], info: dict[str, dict[str, Any]], results: dict[str, Any]) -> None:
    """The Laplace baseline (laplace-torch; :data:`LAPLACE_STRUCTURES` over all Bayesian weights, MAP refined from
    the pre-trained weights, scalar prior precision from the marginal likelihood), added in place beside the other
    methods. Skipped, with a note in ``info``, if laplace-torch is not installed."""
    for structure in LAPLACE_STRUCTURES:
        try:
            res = laplace(model, x, y, structure)
        except ImportError as err:
            info[f"laplace-{structure}"] = {"skipped": str(err)}
            continue
        d = res.diagnostics
        predictors[res.method], results[res.method] = res.predict, res
        preds[res.method] = res.predict(xt)
        info[res.method] = {"wall_s": res.wall_seconds, "memory_bytes": res.memory_bytes,
                            "prior_precision": d["prior_precision"][0], "log_marglik": d["log_marglik"],
                            "map_grad_norm": d["map_grad_norm"]}  # fmt: skip


def _heldout_compare(results: dict[str, Any], xt: Any, yt: torch.Tensor, num_draws: int = 500) -> list[dict[str, Any]]:
    """``az.compare`` of every method's held-out log predictive density ``Σ_i log mean_s p(y_i | θ_s)`` (draws: NUTS's
    and SVI's own, ``num_draws`` from the Kalman beliefs and Laplace); rows best first."""
    idatas = {m: r.to_inference_data(xt, yt, num_draws=num_draws if r.sampler else None) for m, r in results.items()}
    table = compare(idatas, heldout=True)
    return [{"method": m, "rank": int(row["rank"]), "elpd": float(row["elpd_loo"]), "se": float(row["se"]),
             "elpd_diff": float(row["elpd_diff"]), "dse": float(row["dse"]), "weight": float(row["weight"]),
             "num_draws": int(idatas[m].log_likelihood["obs"].shape[0] * idatas[m].log_likelihood["obs"].shape[1])}
            for m, row in table.iterrows()]  # fmt: skip


def _curve(predictors: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """A 1-d input's predictive of every method on a grid of ``x`` (for the figure), and the training data."""
    grid = torch.linspace(-3.5, 3.5, 141)[:, None]  # (G, 1)
    methods = {}
    for name, predict in predictors.items():
        mean, std = predict(grid)
        methods[name] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    return {"x": grid.flatten().tolist(), "methods": methods, "x_train": x.flatten().tolist(),
            "y_train": y.flatten().tolist()}  # fmt: skip


def _checks(problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for p in problems:
        n = p["nuts"]
        ok = n["max_rhat"] <= RHAT_MAX and n["min_ess_bulk"] >= ESS_MIN  # NaN fails
        checks.append({
            "name": f"nuts_converged_{p['problem']}",
            "passed": bool(ok),
            "detail": (
                f"{p['problem']}: NUTS {n['num_chains']} chains × ({n['warmup']} warm-up + {n['draws']} draws): "
                f"max R-hat {n['max_rhat']:.4f} (need <= {RHAT_MAX:g}), min bulk ESS {n['min_ess_bulk']:.0f} "
                f"(need >= {ESS_MIN:g}), min tail ESS {n['min_ess_tail']:.0f}, {n['divergences']} divergences"
                + ("" if ok else " — the NUTS reference is not converged; the comparison below is not trustworthy")
            ),
        })  # fmt: skip
    bad = [f"{p['problem']}/{m['method']}" for p in problems for m in p["methods"] if not m["finite"]]
    checks.append({
        "name": "predictives_finite",
        "passed": not bad,
        "detail": "every method's held-out predictive mean and std are finite with std > 0"
        + (f"; not: {', '.join(bad)}" if bad else f" ({sum(len(p['methods']) for p in problems)} predictives)"),
    })  # fmt: skip
    return checks


def _findings(problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in problems:
        by = {m["method"]: m for m in p["methods"]}
        k, s = by["kbt-block"], by["svi-normal"]
        mean_ok = k["mean_err_max"] <= s["mean_err_max"]
        std_ok = k["log_std_ratio_max"] <= s["log_std_ratio_max"]
        out.append({
            "name": f"kbt_block_vs_svi_normal_{p['problem']}",
            "holds": bool(mean_ok and std_ok),
            "detail": (
                f"{p['problem']}: KBT-block is {'' if mean_ok and std_ok else 'NOT '}at least as close to NUTS as "
                f"SVI-normal on both measures: mean error (max over {p['n_test']} held-out inputs, NUTS std) "
                f"{k['mean_err_max']:.3f} vs {s['mean_err_max']:.3f} ({'<=' if mean_ok else '>'}; means "
                f"{k['mean_err_mean']:.3f} vs {s['mean_err_mean']:.3f}); std ratio to NUTS "
                f"[{k['std_ratio_min']:.3f}, {k['std_ratio_max']:.3f}] vs [{s['std_ratio_min']:.3f}, "
                f"{s['std_ratio_max']:.3f}], max |log ratio| {k['log_std_ratio_max']:.3f} vs "
                f"{s['log_std_ratio_max']:.3f} ({'<=' if std_ok else '>'}); NUTS mean MC error "
                f"{p['nuts']['nuts_mean_mcse_max']:.3f} NUTS std"
            ),
        })  # fmt: skip
        svis = [by["svi-normal"], by["svi-lowrank"]]
        for name_g, _, rule in GUIDES:
            if rule == "kbnn":
                continue
            g = by[name_g]
            closer = all(g["mean_err_max"] < v["mean_err_max"] and g["log_std_ratio_max"] < v["log_std_ratio_max"]
                         for v in svis)  # fmt: skip
            out.append({
                "name": f"{name_g}_vs_svi_{p['problem']}",
                "holds": bool(closer),
                "detail": (
                    f"{p['problem']}: {name_g} is {'' if closer else 'NOT '}closer to NUTS than both SVI baselines on "
                    f"both measures: mean error max {g['mean_err_max']:.3f} vs SVI-normal {svis[0]['mean_err_max']:.3f}"
                    f" / SVI-lowrank {svis[1]['mean_err_max']:.3f}; max |log std ratio| {g['log_std_ratio_max']:.3f} "
                    "vs "
                    f"{svis[0]['log_std_ratio_max']:.3f} / {svis[1]['log_std_ratio_max']:.3f}; total update time "
                    f"{g['wall_s']:.3g} s (KBT-block {k['wall_s']:.3g} s, NUTS {p['nuts']['wall_s']:.1f} s)"
                ),
            })  # fmt: skip
        fast = p["speedup_kbt_block"] >= SPEEDUP_MIN
        out.append({
            "name": f"kbt_block_100x_faster_{p['problem']}",
            "holds": bool(fast),
            "detail": (
                f"{p['problem']}: KBT-block total update time {k['wall_s']:.3g} s vs NUTS {p['nuts']['wall_s']:.1f} s "
                f"wall ({p['nuts']['processes']} process(es); {sum(p['nuts']['chain_seconds']):.1f} s summed over "
                f"chains): {p['speedup_kbt_block']:.0f}× smaller ({'>=' if fast else '<'} {SPEEDUP_MIN:g}×)"
            ),
        })  # fmt: skip
    missing = [name for name in FULL["problems"] if name not in {p["problem"] for p in problems}]
    if missing:
        out.append({"name": "not_run", "holds": None,
                    "detail": f"not run here: {', '.join(missing)} (NUTS on the full MLP and the transformer needs "
                    "more draws for R-hat <= 1.01 than a quick run allows); they are in the full run"})  # fmt: skip
    return out


def _machine() -> dict[str, Any]:
    """What the wall times depend on: CPU model, cores, torch threads, and the load average (if the OS has one)."""
    model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {"cpu": model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg": load}


def plt_color(i: int) -> Any:
    """A distinct colour for method ``i`` (matplotlib's tab20: more methods than the default cycle's 10)."""
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def _markdown(result: dict[str, Any], command: str) -> str:
    cfg = result["config"]
    mach = cfg["machine"]
    lines = [
        "## Posterior: KBT vs NUTS vs SVI",
        "",
        f"Command: `{command}`",
        "",
        f"Identical model, prior and data for every method; seed {cfg['seed']}, float64, "
        f"{QUICK_NOTE if cfg['quick'] else 'full run'}. "
        f"Errors against NUTS on {cfg['n_test']} held-out inputs: mean error = |m − m_NUTS| / s_NUTS (max, mean), "
        "std ratio = s / s_NUTS (min, max); NLL and 90% coverage on the held-out noisy targets (Gaussian "
        "intervals m ± 1.645 s); wall = fitting time (KBT: total update time; NUTS: the whole call, chains "
        "side by side, incl. JIT; "
        "SVI: steps + predictive draws).",
        "",
        f"Machine: {mach['cpu']}, {mach['cpu_count']} cores, {mach['torch_threads']} torch threads, load average "
        f"{mach['loadavg']} at the start and {mach['loadavg_end']} at the end of the section (1/5/15 min; other "
        "processes on the machine stretch every wall time).",
        "",
    ]
    for p in result["problems"]:
        n = p["nuts"]
        lines += [
            f"### {p['problem']} ({p['n_params']} Bayesian weights, {p['n_train']} training samples, prior scale "
            f"{p['prior_scale']:g}, obs noise {p['obs_noise']:g}, KBT hidden mode {p['kbt_hidden']})",
            "",
            "| method | mean err max | mean err mean | std ratio min | std ratio max | NLL | 90% coverage "
            f"| wall s | memory | mean err max over {N_ORDERS} stream orders |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m in p["methods"]:
            o = m.get("orders")
            span = f"{o['mean_err_max'][0]:.3f}–{o['mean_err_max'][1]:.3f}" if o else ""
            lines.append(
                f"| {m['method']} | {m['mean_err_max']:.3f} | {m['mean_err_mean']:.3f} | {m['std_ratio_min']:.3f} "
                f"| {m['std_ratio_max']:.3f} | {m['nll']:.3f} | {m['coverage90']:.3f} | {m['wall_s']:.3g} "
                f"| {_fmt_bytes(m['memory_bytes'])} | {span} |"
            )
        lines += [
            "",
            f"NUTS: {n['num_chains']} chains × ({n['warmup']} warm-up + {n['draws']} draws), JIT, "
            f"{'dense' if n['full_mass'] else 'diagonal'} mass matrix, {n['processes']} process(es); max R-hat "
            f"{n['max_rhat']:.4f}, min bulk ESS {n['min_ess_bulk']:.0f}, min tail ESS {n['min_ess_tail']:.0f}, "
            f"{n['divergences']} divergences, chains {', '.join(f'{s:.1f}' for s in n['chain_seconds'])} s; "
            f"MC error of its predictive mean ≤ {n['nuts_mean_mcse_max']:.3f} NUTS std. "
            f"NUTS time / KBT-block total update time = {p['speedup_kbt_block']:.0f}.",
            "",
            f"NUTS trace and rank plots of the {len(n['trace_weights'])} least-mixed weights (largest R-hat, "
            "smallest bulk / tail ESS; `az.plot_trace`, `az.plot_rank`: the rank histograms are flat when the "
            f"chains sample the same distribution): [{p['nuts_trace_figure']}]({p['nuts_trace_figure']})",
            "",
            "| weight | shown for | mean | sd | R-hat | ESS bulk | ESS tail |",
            "|---|---|---:|---:|---:|---:|---:|",
            *(f"| `{w['weight']}` | {w['why']} | {w['mean']:.4f} | {w['sd']:.4f} | {w['r_hat']:.4f} "
              f"| {w['ess_bulk']:.0f} | {w['ess_tail']:.0f} |" for w in n["trace_weights"]),
            "",
            f"![{p['problem']}: NUTS trace and rank plots]({p['nuts_trace_figure']})",
            "",
            "Held-out log predictive density (`az.compare` of Σ_i log mean_s p(y_i | θ_s) on the held-out samples; "
            "dse = standard error of the difference to the best):",
            "",
            "| method | rank | elpd | se | elpd diff | dse | draws |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(f"| {r['method']} | {r['rank']} | {r['elpd']:.2f} | {r['se']:.2f} | {r['elpd_diff']:.2f} "
              f"| {r['dse']:.2f} | {r['num_draws']} |" for r in p["heldout_compare"]),
            "",
        ]
    lines += ["Checks:", ""]
    lines += checks_md(result["checks"])
    lines += ["", "Findings (measured in this run; reported, not checks):", ""]
    lines += findings_md(result["findings"])
    lines.append("")
    if result.get("figure"):
        lines += [f"![posterior]({result['figure']})", ""]
    if result.get("figure_mlp"):
        lines += [f"![posterior: MLP predictive]({result['figure_mlp']})", ""]
    return "\n".join(lines)


def _plot(problems: list[dict[str, Any]], path: Path) -> None:
    """One row per problem: sorted per-input mean error, sorted per-input std ratio, wall time per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(14, 3.8 * len(problems)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(problems), 3, squeeze=False)
    colors = {m: plt_color(i) for i, m in enumerate(METHODS)}
    for row, p in zip(axes, problems, strict=True):
        for m in p["methods"]:
            if m["method"] == "nuts":
                continue
            q = [(i + 0.5) / len(m["per_input"]["mean_err"]) for i in range(len(m["per_input"]["mean_err"]))]
            row[0].plot(sorted(m["per_input"]["mean_err"]), q, color=colors[m["method"]], label=m["method"])
            row[1].plot(sorted(m["per_input"]["std_ratio"]), q, color=colors[m["method"]], label=m["method"])
        row[0].axvline(p["nuts"]["nuts_mean_mcse_max"], color="grey", ls=":", lw=0.8, label="NUTS MC error (max)")
        row[0].set(xscale="log", xlabel="|m − m_NUTS| / s_NUTS", ylabel="share of held-out inputs",
                   title=f"{p['problem']}: predictive mean error")  # fmt: skip
        row[1].axvline(1.0, color="grey", lw=0.8)
        row[1].set(xlabel="s / s_NUTS", ylabel="share of held-out inputs",
                   title=f"{p['problem']}: predictive std ratio to NUTS")  # fmt: skip
        names = [m["method"] for m in p["methods"] if m["method"] != "prior"]
        walls = [m["wall_s"] for m in p["methods"] if m["method"] != "prior"]
        row[2].barh(names, walls, color=[colors[n] for n in names])
        for i, w in enumerate(walls):
            row[2].text(w, i, f" {w:.3g} s", va="center", fontsize=8)
        row[2].set(xscale="log", xlabel="wall time (s)", title=f"{p['problem']}: fitting time")
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        row[2].xaxis.set_minor_formatter(NullFormatter())  # no overlapping minor labels
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_curve(curves: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """One row per MLP problem: each method's predictive mean ± 1.645 std over x against NUTS's (shaded),
    training data as dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2 * len(curves)))
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(curves), 3, sharey=True, squeeze=False)
    for axes, (problem, curve) in zip(grid, curves, strict=True):
        x = curve["x"]
        ref = curve["methods"]["nuts"]
        lo = [m - Z90 * s for m, s in zip(ref["mean"], ref["std"], strict=True)]
        hi = [m + Z90 * s for m, s in zip(ref["mean"], ref["std"], strict=True)]
        groups = (("prior", "kbt-block"), ("kbt-diag",), ("svi-normal", "svi-lowrank"))
        for ax, others in zip(axes, groups, strict=True):
            ax.fill_between(x, lo, hi, color="grey", alpha=0.3, label="NUTS 90%")
            ax.plot(x, ref["mean"], color="k", lw=1.2, label="NUTS mean")
            for name in others:
                c = f"C{METHODS.index(name)}"
                m, s = curve["methods"][name]["mean"], curve["methods"][name]["std"]
                ax.plot(x, m, color=c, label=f"{name} mean")
                ax.plot(x, [a - Z90 * b for a, b in zip(m, s, strict=True)], color=c, ls="--", lw=0.8)
                ax.plot(x, [a + Z90 * b for a, b in zip(m, s, strict=True)], color=c, ls="--", lw=0.8,
                        label=f"{name} 90%")  # fmt: skip
            ax.scatter(curve["x_train"], curve["y_train"], s=8, color="k", zorder=3, label="training data")
            ax.set(xlabel="x", title=f"{problem}: " + " vs ".join(others) + " vs NUTS")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def posterior_section(
    *,
    quick: bool,
    seed: int,
    out_dir: Path,
    progress: bool = True,
    command: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare KBT, SVI and NUTS posteriors on the tiny MLP (and, in the full run, the tiny transformer).

    Args:
        quick: :data:`QUICK` settings (MLP only) instead of :data:`FULL`.
        seed: base seed of the problems, NUTS chains (``seed``, ``seed + 1``) and SVI.
        out_dir: folder for ``posterior.json``, ``posterior.md``, ``posterior.png``, ``posterior_mlp.png`` and one
            ``posterior_nuts_trace_<problem>.png`` per problem (trace and rank plots of the NUTS reference).
        progress: progress bars on stderr (the section's, NUTS's per chain, SVI's).
        command: the command line recorded in the markdown (default: from ``sys.argv``).
        settings: override entries of the chosen settings (``problems``, ``nuts``, ``svi_steps``, ``n_test``).

    Returns:
        The dict written to ``posterior.json``: ``problems`` (one entry per problem with ``methods`` rows,
        ``nuts`` diagnostics and ``speedup_kbt_block``), ``config``, ``checks`` and ``findings``
        (``{name, holds, detail}``; measured statements that are not checks).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    cfg = {**(QUICK if quick else FULL), **(settings or {})}
    t0 = time.perf_counter()
    machine_start = _machine()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with tqdm(total=5 * len(cfg["problems"]), desc="posterior", disable=not progress, file=sys.stderr) as bar:
            problems = [_run_problem(name, cfg, seed, progress, bar, out_dir) for name in cfg["problems"]]
    finally:
        torch.set_default_dtype(old)
    result: dict[str, Any] = {
        "problems": problems,
        "config": {
            "problems": list(cfg["problems"]),
            "nuts": cfg["nuts"],
            "svi_steps": cfg["svi_steps"],
            "svi_lr": SVI_LR,
            "svi_num_predict": SVI_PREDICT,
            "n_test": cfg["n_test"],
            "num_chains": NUM_CHAINS,
            "rhat_max": RHAT_MAX,
            "ess_min": ESS_MIN,
            "seed": seed,
            "quick": quick,
            "dtype": "float64",
            "specs": {k: PROBLEMS[k] for k in cfg["problems"]},
            "machine": {**machine_start, "loadavg_end": _machine()["loadavg"]},
        },  # fmt: skip
        "checks": _checks(problems),
        "findings": _findings(problems),
    }
    _plot(problems, out_dir / "posterior.png")
    result["figure"] = "posterior.png"
    curves = [(p["problem"], p["curve"]) for p in problems if p.get("curve")]
    if curves:
        _plot_curve(curves, out_dir / "posterior_mlp.png")
        result["figure_mlp"] = "posterior_mlp.png"
    result["config"]["elapsed_s"] = round(time.perf_counter() - t0, 3)
    (out_dir / "posterior.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "posterior.md").write_text(_markdown(result, command))
    return result
