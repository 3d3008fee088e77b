"""Whole-network moments vs Monte Carlo: the KBT predictive against weight draws pushed through the network.

For a transformer with a Gaussian weight belief (the prior, or the belief after ``n`` Kalman updates),
the closed-form predictive mean and std of every observed output, in every hidden-state covariance
mode, are compared with ``n_draws`` weight draws from the same belief pushed through the deterministic
network (:func:`ppl_kbnn.mc.network_samples`). Errors are in units of the Monte-Carlo std; the
Monte-Carlo standard errors are reported beside them (std ratio: ``≈ 1/√(2 n_draws)``).

Shared by the tests (``tests/test_kbt.py``), ``ppl-kbnn validate`` and the table in docs/kbt.md.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch

from ..guide import KalmanGuide
from ..mc import network_samples
from ..model import BayesianModel
from ..nn import DecisionTransformer, DTConfig, Transformer, TransformerConfig
from ..propagate import MODES

__all__ = ["NetCase", "CASES", "make_case", "network_moments_rows"]


@dataclass(frozen=True)
class NetCase:
    """A small random transformer configuration (``dt``: a decision transformer with ``T = 3·context``)."""

    d_model: int
    n_layer: int
    n_head: int
    T: int
    activation: str = "relu"
    dt: bool = False

    @property
    def label(self) -> str:
        """Short name of the configuration for tables, e.g. ``"TF d8 L1 H1 T6 relu"``."""
        kind = "DT" if self.dt else "TF"
        return f"{kind} d{self.d_model} L{self.n_layer} H{self.n_head} T{self.T} {self.activation}"


CASES = (
    NetCase(8, 1, 1, 12, "relu"),
    NetCase(16, 2, 2, 12, "gelu"),
    NetCase(16, 1, 2, 8, "relu"),
    NetCase(8, 2, 1, 6, "gelu"),
    NetCase(16, 1, 2, 12, "relu", dt=True),
)
"""The configurations of the acceptance test: d_model ∈ {8, 16}, 1–2 layers, 1–2 heads, up to 12 tokens."""


def make_case(case: NetCase, seed: int, n_inputs: int = 4, n_stream: int = 50, teacher_shift: float = 0.05):
    """A default-initialised network, ``n_inputs`` test inputs, and a stream of ``n_stream`` samples from a
    "teacher" (the network with every parameter shifted by ``teacher_shift · N(0, 1)``), noise 0.05.

    Returns ``(net, x_test, x_stream, y_stream)``; inputs are tensors (dicts for a decision transformer).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initialisation
    if case.dt:
        K = case.T // 3
        cfg = DTConfig(state_dim=3, act_dim=1, d_model=case.d_model, n_layer=case.n_layer, n_head=case.n_head,
                       max_ep_len=50, context=K, activation=case.activation)  # fmt: skip
        net = DecisionTransformer(cfg)

        def inputs(n: int) -> dict[str, torch.Tensor]:
            return {
                "returns_to_go": torch.randn(n, K, 1, generator=g),
                "states": torch.randn(n, K, 3, generator=g),
                "actions": torch.randn(n, K, 1, generator=g).tanh(),
                "timesteps": torch.randint(0, 50, (n, K), generator=g),
            }
    else:
        net = Transformer(TransformerConfig(d_in=3, d_out=2, d_model=case.d_model, n_layer=case.n_layer,
                                            n_head=case.n_head, max_len=12, activation=case.activation))  # fmt: skip

        def inputs(n: int) -> torch.Tensor:
            return torch.randn(n, case.T, 3, generator=g)

    net = net.to(torch.get_default_dtype())
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(teacher_shift * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x_test, x_stream = inputs(n_inputs), inputs(n_stream)
    with torch.no_grad():
        y = teacher(**x_stream) if case.dt else teacher(x_stream)
        y_stream = y[:, -1] + 0.05 * torch.randn(y[:, -1].shape, generator=g, dtype=y.dtype)
    return net, x_test, x_stream, y_stream


def network_moments_rows(
    cases: tuple[NetCase, ...] = CASES,
    scales: tuple[float, ...] = (0.01, 0.05, 0.1),
    n_updates: tuple[int, ...] = (0, 50),
    modes: tuple[str, ...] = MODES,
    w_kinds: tuple[str, ...] = ("block", "diag"),
    n_draws: int = 4000,
    seed: int = 0,
    progress=None,
) -> list[dict]:
    """One row per (case, prior scale, updates, covariance, mode): the largest mean error over the
    observed outputs of every test input in Monte-Carlo std, the range of the closed-form/MC std ratio,
    the Monte-Carlo standard error of that ratio, and the closed-form time.

    The belief after ``n`` updates comes from ``n`` Kalman updates (hidden mode ``"token"``) on the
    case's teacher stream; every mode is then evaluated on that same belief.
    """
    rows = []
    for ci, case in enumerate(cases):
        net, x_test, x_stream, y_stream = make_case(case, seed + ci)
        for scale in scales:
            for w_kind in w_kinds:
                model = BayesianModel(net, prior_scale=scale, obs_noise=0.05)
                guide = KalmanGuide(model, covariance=w_kind, hidden="token")
                done = 0
                for n in sorted(n_updates):
                    if n > done:
                        xs = {k: v[done:n] for k, v in x_stream.items()} if case.dt else x_stream[done:n]
                        guide.update(xs, y_stream[done:n])
                        done = n
                    gen = torch.Generator().manual_seed(seed + 1000 * ci + n)
                    ys, _ = network_samples(net, guide.beliefs(), x_test, n_draws, gen)
                    mc_mean, mc_std = ys.mean(0), ys.std(0)
                    for mode in modes:
                        g = KalmanGuide(model, covariance=w_kind, hidden=mode)
                        g.load_beliefs(guide)
                        t0 = time.perf_counter()
                        mean, var = g.predict(x_test)
                        seconds = time.perf_counter() - t0
                        ratio = (var - model.obs_noise**2).clamp_min(0).sqrt() / mc_std
                        rows.append({
                            "case": case.label, **asdict(case), "prior_scale": scale, "updates": n,
                            "covariance": w_kind, "mode": mode,
                            "mean_err": float(((mean - mc_mean).abs() / mc_std).max()),
                            "std_ratio_min": float(ratio.min()), "std_ratio_max": float(ratio.max()),
                            "std_ratio_mc_se": (2 * (n_draws - 1)) ** -0.5, "n_draws": n_draws,
                            "seconds": seconds,
                        })  # fmt: skip
                    if progress is not None:
                        progress(f"{case.label} scale {scale} {w_kind} n={n}")
    return rows
