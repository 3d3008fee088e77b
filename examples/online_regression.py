"""Online regression: a pre-trained MLP adapts to a shifted function, one sample at a time, with the Kalman guide.

What it shows
-------------
An MLP ``Linear(1, 16) -> ReLU -> Linear(16, 1)`` is pre-trained (Adam, full batch, float64) on
``f0(x) = sin(x)`` over ``x ∈ [-3, 3]``. The world then changes to ``f1(x) = sin(x) + 0.3 x``, observed
with noise std 0.1 at uniformly random ``x ∈ [-3, 3]``, one sample at a time. The pre-trained weights
become the prior mean of ``BayesianModel(net, prior_scale=0.1, obs_noise=0.1)`` (every weight random) and

* ``KalmanGuide(model, covariance="block")`` (KBT/KBNN, per-neuron full covariance) and
  ``KalmanGuide(model, covariance="diag")`` absorb the stream in closed form, one ``update`` per sample;
* NUTS (``pyro.infer.MCMC``) samples the exact posterior of the *same* model given the same first ``n``
  samples — the reference. For ``n = 0`` the reference is the prior predictive, sampled with
  ``pyro.infer.Predictive`` (no MCMC).

For every checkpoint ``n`` (samples seen) the predictive mean and std of ``y`` (observation noise
included) on a 50-point grid are compared: the largest ``|KBT mean - NUTS mean| / NUTS std``, the range
of the std ratio KBT/NUTS, the RMSE of each predictive mean to ``f1``, the total KBT update time, the
NUTS wall time and the largest R-hat over all weights (ArviZ's rank-normalised split R-hat through
``ppl_kbnn.inference.rhat``; with one chain, its two halves are compared). A NUTS reference with R-hat
above ``RHAT_OK = 1.01`` is not converged: its panel says so in red, and a warning is printed.

Outputs (in ``--out``)
----------------------
* ``online_regression.png``: one panel per ``n``: true ``f1``, pre-trained ``f0`` (dashed), the data seen
  so far (dots), the KBT-block predictive mean ± 2 std (shaded) and the NUTS predictive mean ± 2 std.
* ``online_regression.json``: the grid, per ``n`` and method the predictive mean/std on the grid, and the
  metrics above (``nuts.max_rhat`` is ``null`` for ``n = 0``, where nothing is sampled by MCMC).
* a table on stdout; progress on stderr.

How to run
----------
::

    python examples/online_regression.py                 # n = 0 10 50 200, NUTS 2 chains x (300 warmup + 300)
    python examples/online_regression.py --quick         # smoke test: n = 0 5 10, NUTS 1 chain x (30 + 30)
    python examples/online_regression.py --samples 0 20 100 --nuts-samples 500 --chains 4 --out /tmp/online

NUTS chains run sequentially (one ``MCMC`` object per chain, different seeds), so no multiprocessing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyro
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pyro.infer import MCMC, NUTS, Predictive
from pyro.infer.autoguide.initialization import init_to_sample
from torch import nn

try:
    import ppl_kbnn as pk
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ppl_kbnn as pk
from ppl_kbnn.toy import pretrained_mlp, regression_stream, shifted_sine, sine  # noqa: E402

__all__ = ["f0", "f1", "pretrain", "run", "main"]

X_LOW, X_HIGH = -3.0, 3.0
PRIOR_SCALE = 0.1
OBS_NOISE = 0.1
N_GRID = 50
DTYPE = torch.float64
COVARIANCES = ("block", "diag")
RHAT_OK = 1.01  # a NUTS reference above this is flagged as not converged


f0, f1 = sine, shifted_sine  # the pre-training and the shifted function (ppl_kbnn.toy)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default dtype (Pyro/NUTS create tensors with it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op threads: the tensors here are tiny, so one thread is fastest, and more
    threads than free cores make every small op spin-wait (a 20x slowdown on a busy 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def pretrain(seed: int, steps: int = 3000) -> tuple[nn.Module, float]:
    """The MLP of :func:`ppl_kbnn.toy.pretrained_mlp` fitted to ``f0``; returns it and its training RMSE."""
    net = pretrained_mlp(16, f0, steps=steps, seed=seed, dtype=DTYPE)
    x = torch.linspace(X_LOW, X_HIGH, 200, dtype=DTYPE)[:, None]
    with torch.no_grad():
        rmse = (net(x) - f0(x)).pow(2).mean().sqrt().item()
    return net, rmse


def _stream(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples ``x ~ U[-3, 3]``, ``y = f1(x) + 0.1 ε`` (:func:`ppl_kbnn.toy.regression_stream`)."""
    return regression_stream(n, f1, noise=OBS_NOISE, seed=seed + 1, dtype=DTYPE)


def _predictive_moments(
    model: pk.BayesianModel, draws: dict[str, torch.Tensor] | None, num_samples: int, grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``y`` on ``grid`` from weight draws (``None``: prior draws), noise added exactly.

    The network output ``f(x; θ)`` is evaluated per draw; ``Var y = Var f + σ_obs²`` avoids the extra
    Monte-Carlo noise of sampling ``obs``.
    """
    if draws is None:
        pred = Predictive(model, num_samples=num_samples, return_sites=["_RETURN"])
    else:
        pred = Predictive(model, posterior_samples=draws, return_sites=["_RETURN"])
    f = pred(grid)["_RETURN"][..., 0]  # (S, G)
    return f.mean(0), (f.var(0) + OBS_NOISE**2).sqrt()


def _nuts(
    model: pk.BayesianModel,
    x: torch.Tensor,
    y: torch.Tensor,
    nuts_samples: int,
    nuts_warmup: int,
    chains: int,
    seed: int,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], float]:
    """NUTS on the model given ``(x, y)``: one ``MCMC`` per chain, run sequentially with seeds ``seed + c``.

    Returns the draws of every chain concatenated ``{site: (chains * nuts_samples, ...)}`` and the
    largest R-hat over every weight (ArviZ's rank-normalised split R-hat, ``pk.inference.rhat``; one chain
    is split into its two halves, as split R-hat does).
    """
    per_chain: list[dict[str, torch.Tensor]] = []
    for c in range(chains):
        pyro.set_rng_seed(seed + c)
        kernel = NUTS(model, init_strategy=init_to_sample)
        mcmc = MCMC(kernel, num_samples=nuts_samples, warmup_steps=nuts_warmup, disable_progbar=not progress)
        mcmc.run(x, y)
        per_chain.append(mcmc.get_samples())
    grouped = {k: torch.stack([s[k] for s in per_chain]) for k in per_chain[0]}  # (C, S, ...)
    if chains == 1:  # arviz needs two chains: compare the two halves of the one chain
        half = nuts_samples // 2
        as_chains = {k: torch.stack([v[0, :half], v[0, half : 2 * half]]) for k, v in grouped.items()}
    else:
        as_chains = grouped
    rhat = max(float(r.max()) for r in pk.inference.rhat(as_chains).values())
    draws = {k: v.reshape(-1, *v.shape[2:]) for k, v in grouped.items()}
    return draws, rhat


def _compare(
    kbt_mean: torch.Tensor, kbt_std: torch.Tensor, ref_mean: torch.Tensor, ref_std: torch.Tensor, truth: torch.Tensor
) -> dict[str, float]:
    """Agreement of a KBT predictive with the NUTS reference on the grid."""
    ratio = kbt_std / ref_std
    return {
        "max_mean_err_over_nuts_std": float(((kbt_mean - ref_mean).abs() / ref_std).max()),
        "std_ratio_min": float(ratio.min()),
        "std_ratio_max": float(ratio.max()),
        "rmse_to_f1": float((kbt_mean - truth).pow(2).mean().sqrt()),
    }


def _plot(
    path: Path,
    grid: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    results: dict[str, dict],
    samples: Sequence[int],
    net0: nn.Module,
    smoke_test: bool = False,
) -> None:
    """One panel per checkpoint: f1, f0 (dashed), data, KBT-block ±2 std (shaded), NUTS ±2 std (lines).

    A panel whose NUTS reference has R-hat above :data:`RHAT_OK` says "NUTS NOT CONVERGED" in red; a
    smoke-test run says so across the top.
    """
    g = grid[:, 0].numpy()
    with torch.no_grad():
        pre = net0(grid)[:, 0].numpy()
    truth = f1(grid)[:, 0].numpy()
    fig = Figure(figsize=(4.2 * len(samples), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(samples), sharey=True, squeeze=False)[0]
    for ax, n in zip(axes, samples, strict=True):
        r = results[str(n)]
        km, ks = (torch.tensor(r["kbt_block"][k]).numpy() for k in ("mean", "std"))
        nm, ns = (torch.tensor(r["nuts"][k]).numpy() for k in ("mean", "std"))
        ax.fill_between(g, km - 2 * ks, km + 2 * ks, color="tab:blue", alpha=0.25, lw=0, label="KBT block ±2 std")
        ax.plot(g, km, color="tab:blue", lw=2, label="KBT block mean")
        ax.plot(g, nm, color="tab:orange", lw=1.5, label="NUTS mean")
        ax.plot(g, nm - 2 * ns, color="tab:orange", lw=1, ls=":", label="NUTS ±2 std")
        ax.plot(g, nm + 2 * ns, color="tab:orange", lw=1, ls=":")
        ax.plot(g, truth, color="black", lw=1.2, label="true f1 = sin x + 0.3x")
        ax.plot(g, pre, color="gray", lw=1.2, ls="--", label="pre-trained (f0 = sin x)")
        if n:
            ax.plot(x[:n, 0].numpy(), y[:n, 0].numpy(), "o", color="crimson", ms=3, alpha=0.8, label="data seen")
        title = "prior (n = 0)" if n == 0 else f"n = {n} samples"
        rhat = r["nuts"]["max_rhat"]
        if rhat is not None and not rhat <= RHAT_OK:  # nan counts as not converged
            ax.set_title(f"{title}\nNUTS NOT CONVERGED (R-hat {rhat:.3f} > {RHAT_OK})", color="firebrick")
        else:
            ax.set_title(f"{title}\nKBT RMSE {r['kbt_block']['rmse_to_f1']:.3f}, NUTS {r['nuts']['rmse_to_f1']:.3f}")
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("y")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False)
    title = "Online adaptation of a pre-trained MLP: Kalman guide (block) vs NUTS on the same BayesianModel"
    if smoke_test:
        fig.suptitle(f"SMOKE TEST (--quick): not a result\n{title}", color="firebrick")
    else:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)


def run(
    out_dir: str | Path,
    samples: Sequence[int] = (0, 10, 50, 200),
    nuts_samples: int = 300,
    nuts_warmup: int = 300,
    chains: int = 2,
    seed: int = 0,
    *,
    progress: bool = True,
    pretrain_steps: int = 3000,
    threads: int = 1,
    smoke_test: bool = False,
) -> dict:
    """Run the experiment, write ``online_regression.png`` and ``online_regression.json`` into ``out_dir``.

    Args:
        out_dir: output folder (created).
        samples: checkpoints ``n`` (number of stream samples seen); sorted and de-duplicated.
        nuts_samples, nuts_warmup: NUTS draws and warm-up steps per chain.
        chains: NUTS chains (run one after the other); ``n = 0`` draws ``chains * nuts_samples`` prior samples.
        seed: seeds the pre-training, the stream and NUTS.
        progress: progress messages and NUTS progress bars on stderr.
        pretrain_steps: Adam steps of the pre-training.
        threads: torch intra-op threads during the run (restored afterwards).
        smoke_test: label the figure and the JSON as a smoke test (``--quick``), not a result.

    Returns:
        The JSON content: ``{"config", "grid", "pretrain_rmse", "results": {str(n): {...}}, "png", "json"}``.
    """
    samples = sorted({int(n) for n in samples})
    if not samples or samples[0] < 0:
        raise ValueError(f"samples must be non-negative integers, got {samples}")
    if nuts_samples < 2 or nuts_warmup < 0 or chains < 1:
        raise ValueError(
            f"need nuts_samples >= 2, nuts_warmup >= 0, chains >= 1; got {nuts_samples}, {nuts_warmup}, {chains}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with _default_dtype(DTYPE), _num_threads(threads):
        net, pre_rmse = pretrain(seed, steps=pretrain_steps)
        _log(f"pre-trained on f0 = sin(x): train RMSE {pre_rmse:.4f}", progress)
        model = pk.BayesianModel(net, prior_scale=PRIOR_SCALE, obs_noise=OBS_NOISE)
        guides = {cov: pk.KalmanGuide(model, covariance=cov) for cov in COVARIANCES}
        x, y = _stream(samples[-1], seed)
        grid = torch.linspace(X_LOW, X_HIGH, N_GRID, dtype=DTYPE)[:, None]
        truth = f1(grid)[:, 0]
        results: dict[str, dict] = {}
        seen = 0
        for i, n in enumerate(samples):
            for guide in guides.values():  # one sample at a time, continuing from the last checkpoint
                for t in range(seen, n):
                    guide.update(x[t : t + 1], y[t : t + 1])
            seen = n
            entry: dict[str, dict] = {}
            t0 = time.perf_counter()
            if n == 0:
                _log(f"[n=0] prior predictive: {chains * nuts_samples} prior draws", progress)
                pyro.set_rng_seed(seed + 1000)
                ref_mean, ref_std = _predictive_moments(model, None, chains * nuts_samples, grid)
                rhat = None
            else:
                _log(f"[n={n}] NUTS: {chains} chain(s) x ({nuts_warmup} warmup + {nuts_samples})", progress)
                draws, rhat = _nuts(
                    model, x[:n], y[:n], nuts_samples, nuts_warmup, chains, seed + 1000 * (i + 1), progress
                )
                ref_mean, ref_std = _predictive_moments(model, draws, 0, grid)
            nuts_seconds = time.perf_counter() - t0
            entry["nuts"] = {
                "mean": ref_mean.tolist(),
                "std": ref_std.tolist(),
                "rmse_to_f1": float((ref_mean - truth).pow(2).mean().sqrt()),
                "wall_seconds": nuts_seconds,
                "max_rhat": rhat,
                "num_draws": chains * nuts_samples,
            }
            for cov, guide in guides.items():
                mean, var = guide.predict(grid)
                mean, std = mean[:, 0], var[:, 0].sqrt()
                entry[f"kbt_{cov}"] = {
                    "mean": mean.tolist(),
                    "std": std.tolist(),
                    **_compare(mean, std, ref_mean, ref_std, truth),
                    "update_seconds": guide.update_seconds,
                    "n_updates": guide.n_updates,
                }
            results[str(n)] = entry
            b = entry["kbt_block"]
            rhat_txt = "-" if rhat is None else f"{rhat:.3f}"
            _log(
                f"[n={n}] KBT block: max |Δmean|/std {b['max_mean_err_over_nuts_std']:.3f}, std ratio "
                f"[{b['std_ratio_min']:.3f}, {b['std_ratio_max']:.3f}]; NUTS {nuts_seconds:.1f} s, R-hat {rhat_txt}",
                progress,
            )
        png, js = out_dir / "online_regression.png", out_dir / "online_regression.json"
        _plot(png, grid, x, y, results, samples, net, smoke_test=smoke_test)
    report = {
        "config": {
            "samples": samples,
            "nuts_samples": nuts_samples,
            "nuts_warmup": nuts_warmup,
            "chains": chains,
            "seed": seed,
            "prior_scale": PRIOR_SCALE,
            "obs_noise": OBS_NOISE,
            "pretrain_steps": pretrain_steps,
            "threads": threads,
            "smoke_test": smoke_test,
            "rhat_ok": RHAT_OK,
            "network": "Sequential(Linear(1,16), ReLU, Linear(16,1)), every weight Bayesian",
            "std_includes_obs_noise": True,
            "versions": {"ppl_kbnn": pk.__version__, "torch": torch.__version__, "pyro": pyro.__version__},
        },
        "grid": grid[:, 0].tolist(),
        "pretrain_rmse": pre_rmse,
        "total_seconds": time.perf_counter() - t_start,
        "results": results,
        "png": str(png),
        "json": str(js),
    }
    js.write_text(json.dumps(report, indent=1))
    return report


def format_table(report: dict) -> str:
    """A plain-text table of the metrics of every checkpoint and method."""
    head = (
        f"{'n':>4}  {'method':<10} {'RMSE f1':>8} {'max|Δμ|/σ':>10} {'σ ratio min':>11} {'σ ratio max':>11} "
        f"{'time s':>8} {'R-hat':>6}"
    )
    lines = [head, "-" * len(head)]
    for n, entry in report["results"].items():
        for cov in COVARIANCES:
            r = entry[f"kbt_{cov}"]
            lines.append(
                f"{n:>4}  {'KBT ' + cov:<10} {r['rmse_to_f1']:>8.4f} {r['max_mean_err_over_nuts_std']:>10.3f} "
                f"{r['std_ratio_min']:>11.3f} {r['std_ratio_max']:>11.3f} {r['update_seconds']:>8.3f} {'':>6}"
            )
        r = entry["nuts"]
        rhat = "-" if r["max_rhat"] is None else f"{r['max_rhat']:.3f}"
        name = "prior MC" if n == "0" else "NUTS"
        lines.append(
            f"{n:>4}  {name:<10} {r['rmse_to_f1']:>8.4f} {'':>10} {'':>11} {'':>11} {r['wall_seconds']:>8.2f} {rhat:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples-out"), help="output folder")
    parser.add_argument("--samples", type=int, nargs="+", default=[0, 10, 50, 200], help="checkpoints n")
    parser.add_argument("--nuts-samples", type=int, default=300, help="NUTS draws per chain")
    parser.add_argument("--nuts-warmup", type=int, default=300, help="NUTS warm-up steps per chain")
    parser.add_argument("--chains", type=int, default=2, help="NUTS chains, run sequentially")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=3000, help="Adam steps of the pre-training")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny tensors: 1 is fastest)")
    parser.add_argument("--quick", action="store_true", help="tiny run: samples 0 5 10, NUTS 1 chain x (30 + 30)")
    parser.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    args = parser.parse_args(argv)
    if args.quick:
        print("SMOKE TEST (--quick): not a result; NUTS is far too short to converge")
        args.samples, args.nuts_samples, args.nuts_warmup, args.chains = [0, 5, 10], 30, 30, 1
    report = run(
        args.out,
        args.samples,
        args.nuts_samples,
        args.nuts_warmup,
        args.chains,
        args.seed,
        progress=not args.no_progress,
        pretrain_steps=args.pretrain_steps,
        threads=args.threads,
        smoke_test=args.quick,
    )
    print(format_table(report))
    print(f"\nwrote {report['png']} and {report['json']} ({report['total_seconds']:.1f} s)")
    bad = [n for n, e in report["results"].items() if e["nuts"]["max_rhat"] is not None
           and not e["nuts"]["max_rhat"] <= RHAT_OK]  # fmt: skip
    if bad:
        print(
            f"warning: NUTS not converged (max R-hat > {RHAT_OK}) at n = {', '.join(bad)}; its numbers are not a "
            "reference: increase --nuts-warmup/--nuts-samples/--chains",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
