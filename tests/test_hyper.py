"""Hyperparameters online (ppl_kbnn.hyper): outlier handling, the observation-noise belief, the prior scale."""

from __future__ import annotations

import warnings

import pytest
import torch

import ppl_kbnn as pk
from ppl_kbnn.hyper import OutlierWarning, default_threshold

ROBUST = [("block", "kbnn", 0.1), ("diag", "kbnn", 0.1), ("full", "ekf", 0.5), ("diag", "slr", 0.5)]


def sine_stream(n: int = 200, seed: int = 1):
    """``y = sin x + 0.3 x + 0.1 ε`` on ``x ~ U(-3, 3)``, and a noise-free held-out grid."""
    gen = torch.Generator().manual_seed(seed)
    X = 6 * torch.rand(n, 1, generator=gen) - 3
    Y = torch.sin(X) + 0.3 * X + 0.1 * torch.randn(n, 1, generator=gen)
    Xt = torch.linspace(-3, 3, 101)[:, None]
    return X, Y, Xt, torch.sin(Xt) + 0.3 * Xt


def mlp_guide(covariance: str, update: str, scale: float = 0.1, **kw) -> pk.KalmanGuide:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    extra = {"draws": 200} if update == "slr" else {}
    return pk.KalmanGuide(pk.BayesianModel(net, scale, 0.1), covariance, update=update, **extra, **kw)


def rmse(guide: pk.KalmanGuide, Xt: torch.Tensor, Yt: torch.Tensor) -> float:
    return float(((guide.predict(Xt)[0] - Yt) ** 2).mean().sqrt())


def test_default_threshold_is_the_chi_square_quantile():
    assert default_threshold(1) == pytest.approx(23.928, abs=1e-3)  # P(χ²₁ > 23.93) = 1e-6
    assert default_threshold(3) > default_threshold(1)


@pytest.mark.parametrize(("covariance", "update", "scale"), ROBUST)
def test_one_huge_label_is_warned_by_default_and_harmless_when_gated_or_wolf(covariance, update, scale):
    """One label of 1e6 among 200 ordinary samples (outputs O(1)). Default: the update happens, the event is counted
    and warned about. ``"gate"`` and ``"wolf"``: held-out RMSE within 1.5x of the run without the outlier.

    Each structure at a prior scale where its belief is not overconfident on the clean stream (EKF at 0.1 flags 5
    ordinary samples and gating them costs 1.7x: docs/hyper.md)."""
    X, Y, Xt, Yt = sine_stream()
    Yo = Y.clone()
    Yo[100] = 1e6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutlierWarning)  # an ordinary sample may exceed the threshold too
        clean = rmse(mlp_guide(covariance, update, scale).update(X, Y), Xt, Yt)
    guide = mlp_guide(covariance, update, scale)
    guide.update(X[:100], Yo[:100])
    n0 = guide.guard_counts.get("outlier", 0)
    with pytest.warns(OutlierWarning, match="beyond the outlier threshold"):
        guide.update(X[100:101], Yo[100:101])
    assert guide.guard_counts["outlier"] == n0 + 1
    assert float(guide.predict(X[100:101])[0].abs()) > 1e3  # absorbed as usual: the mean moved far
    for mode in ("gate", "wolf"):
        robust = mlp_guide(covariance, update, scale, outliers=mode).update(X, Yo)
        assert robust.guard_counts["outlier"] >= 1
        assert rmse(robust, Xt, Yt) < 1.5 * clean, (mode, rmse(robust, Xt, Yt), clean)


def test_gate_skips_the_sample_and_wolf_bounds_its_influence():
    X, Y, _, _ = sine_stream(20)
    gated = mlp_guide("block", "kbnn", outliers="gate").update(X, Y)
    before = gated.state_dict()
    gated.update(X[:1], torch.tensor([[1e6]]))
    after = gated.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))
    assert gated.n_updates == 21  # the sample was seen (and counted), not absorbed
    # WoLF: the mean shift from one label of size L falls as L grows (bounded influence)
    shifts = []
    for label in (1e2, 1e4, 1e6):
        wolf = mlp_guide("block", "kbnn", outliers="wolf").update(X, Y)
        m0 = wolf.predict(X[:1])[0]
        shifts.append(float((wolf.update(X[:1], torch.tensor([[label]])).predict(X[:1])[0] - m0).abs()))
    assert shifts[2] < shifts[1] < shifts[0], shifts


def test_transformer_outliers_are_gated():
    from ppl_kbnn.toy import teacher_student_transformer

    student, _, x, _, _, _ = teacher_student_transformer(n_train=4, n_test=3)
    model = pk.BayesianModel(student, prior_scale=0.05, obs_noise=0.1)
    ys = model.output(x).detach()
    ys[1] = 1e6
    for update in ("kbnn", "ekf"):
        guide = pk.KalmanGuide(model, "diag", update=update, outliers="gate").update(x, ys)
        assert guide.guard_counts["outlier"] == 1
        assert guide.predict(x)[0].abs().max() < 10


def test_outlier_options_are_checked_and_checkpointed():
    with pytest.raises(ValueError, match="outliers must be one of"):
        mlp_guide("block", "kbnn", outliers="drop")
    with pytest.raises(ValueError, match="outlier_threshold"):
        mlp_guide("block", "kbnn", outlier_threshold=-1.0)
    sd = mlp_guide("block", "kbnn", outliers="gate").state_dict()
    with pytest.raises(ValueError, match="differs in outliers"):
        mlp_guide("block", "kbnn").load_state_dict(sd)
    with pytest.raises(ValueError, match="differs in outlier_threshold"):
        mlp_guide("block", "kbnn", outliers="gate", outlier_threshold=9.0).load_state_dict(sd)
