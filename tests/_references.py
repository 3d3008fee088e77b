"""The test suite's NUTS references, as plain functions that a spawned worker process can run.

``tests/conftest.py`` starts both in background processes when the session begins (each chain one after the
other, one torch thread), so that the single-threaded tests run on the other core meanwhile; the chains are
seeded as in :func:`ppl_kbnn.inference.nuts` with ``processes=2``, so the draws are the same. Each returns only
tensors and numbers (picklable); the fixtures rebuild the models in the main process.
"""

from __future__ import annotations

from typing import Any

import torch


def mlp_problem() -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(model, X, Y, Xt)`` of the MLP problem (float64; deterministic)."""
    import ppl_kbnn as pk
    from ppl_kbnn.toy import pretrained_mlp, regression_stream

    model = pk.BayesianModel(pretrained_mlp(16), prior_scale=0.1, obs_noise=0.1)
    X, Y = regression_stream(50)
    return model, X, Y, torch.linspace(-2.8, 2.8, 20)[:, None]


def transformer_problem() -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(model, x, y, xt)`` of the tiny-transformer problem (float64; deterministic)."""
    import ppl_kbnn as pk
    from ppl_kbnn.toy import teacher_student_transformer

    student, _, x, y, xt, _ = teacher_student_transformer()
    return pk.BayesianModel(student, prior_scale=0.05, obs_noise=0.1), x, y, xt


def mlp_reference() -> dict[str, Any]:
    """NUTS (2 chains × (300 warm-up + 1000 draws), dense mass matrix) and SVI-normal / SVI-lowrank (2000 steps)."""
    import ppl_kbnn as pk

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    model, X, Y, Xt = mlp_problem()
    ref = pk.inference.nuts(model, X, Y, num_samples=1000, warmup_steps=300, num_chains=2, seed=0, full_mass=True)
    mean, std = ref.predict(Xt)  # (20, 1) each; std includes the observation noise
    svi = {}
    for kind in ("normal", "lowrank"):
        res = pk.inference.svi(model, X, Y, guide=kind, num_steps=2000, lr=0.01, seed=0, num_predict=2000)
        m, s = res.predict(Xt)
        svi[kind] = (m[:, 0], s[:, 0])
    return {"samples": ref.samples, "diagnostics": ref.diagnostics, "nuts_mean": mean[:, 0], "nuts_std": std[:, 0],
            "svi": svi}  # fmt: skip


def transformer_reference() -> dict[str, Any]:
    """NUTS (2 chains × (500 warm-up + 1500 draws), diagonal mass matrix) and SVI-normal (3000 steps)."""
    import ppl_kbnn as pk

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    model, x, y, xt = transformer_problem()
    ref = pk.inference.nuts(model, x, y, num_samples=1500, warmup_steps=500, num_chains=2, seed=0)
    mean, std = ref.predict(xt)
    svi = pk.inference.svi(model, x, y, guide="normal", num_steps=3000, lr=0.01, seed=0, num_predict=500)
    return {"diagnostics": ref.diagnostics, "nuts_mean": mean, "nuts_std": std, "svi_normal": svi.predict(xt)}
