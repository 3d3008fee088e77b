"""The Kalman guide vs NUTS on the 16-unit ReLU MLP: a posterior-level comparison of every belief and update rule.

Problem and reference: the session fixture ``mlp_reference`` (tests/conftest.py): ``Linear(1,16) → ReLU →
Linear(16,1)`` pre-trained on sin(x), prior_scale 0.1, obs_noise 0.1, 50 samples of sin(x) + 0.3x, 20 test
inputs; NUTS 2 chains × (300 warm-up + 1000 draws), dense mass matrix; SVI-normal and SVI-lowrank, 2000 steps.

Measured (seed 0; NUTS max R-hat 1.0037), max / mean predictive-mean error in NUTS predictive stds and the
range of the std ratio over the test inputs:

| method | mean error max (mean) | std ratio |
|---|---|---|
| KBT-block (``kbnn``) | 0.879 (0.442) | 1.167–2.004 |
| ``full`` + ``ekf`` | 0.300 (0.082) | 0.969–1.092 |
| ``lowrank`` (rank 10) + ``ekf`` | 0.308 (0.083) | 0.970–1.093 |
| ``full`` + ``slr`` (1000 draws) | 0.190 (0.058) | 1.035–1.256 |
| ``lowrank`` (rank 10) + ``slr`` | 0.192 (0.058) | 1.038–1.279 |

The paper's per-neuron block belief cannot get closer: the *best* block-diagonal Gaussian — the per-neuron blocks
moment-matched to the NUTS draws themselves — has its mean within 0.27 NUTS std but a predictive std up to
3.99× NUTS's, because the posterior correlations between layers and between neurons carry most of the
predictive-variance reduction (docs/beliefs.md). The beliefs with cross-layer covariance reach NUTS.
"""

import pytest
import torch

import ppl_kbnn as pk


def _distance(mean, var, ref):
    """(max |m − m*| / s*, std ratios s / s*) at the test inputs."""
    return ((mean[:, 0] - ref["nuts_mean"]).abs() / ref["nuts_std"]).max(), var[:, 0].sqrt() / ref["nuts_std"]


@pytest.mark.slow
def test_nuts_reference_converged(mlp_reference):
    assert mlp_reference["rhat"] <= 1.01


@pytest.mark.slow
@pytest.mark.parametrize(("covariance", "mean_tol", "ratio_range"), [("block", 1.0, (0.8, 2.5)),
                                                                      ("diag", 1.4, (0.8, 4.0))])  # fmt: skip
def test_kbt_predictive_against_nuts(mlp_reference, covariance, mean_tol, ratio_range):
    """The paper's rule: its measured envelope (0.88, 1.17–2.00 for block), with a margin."""
    ref = mlp_reference
    guide = pk.KalmanGuide(ref["model"], covariance=covariance).update(ref["X"], ref["Y"])
    err, ratio = _distance(*guide.predict(ref["Xt"]), ref)
    assert err <= mean_tol, err
    assert ratio_range[0] <= ratio.min() and ratio.max() <= ratio_range[1], ratio
    # better than not adapting at all
    prior_mean, _ = pk.KalmanGuide(ref["model"], covariance=covariance).predict(ref["Xt"])
    assert err < ((prior_mean[:, 0] - ref["nuts_mean"]).abs() / ref["nuts_std"]).max()


@pytest.mark.slow
@pytest.mark.parametrize(("covariance", "update", "mean_tol", "ratio_range"), [
    ("full", "ekf", 0.35, (0.85, 1.2)), ("lowrank", "ekf", 0.35, (0.85, 1.2)),
    ("full", "slr", 0.3, (0.8, 1.4)), ("lowrank", "slr", 0.3, (0.8, 1.4)),
])  # fmt: skip
def test_cross_layer_beliefs_reach_nuts_and_beat_both_svi_baselines(mlp_reference, covariance, update, mean_tol,
                                                                     ratio_range):  # fmt: skip
    """Beliefs with cross-layer covariance, with their matching read-outs: within the targets at every test input,
    and closer to NUTS than SVI-normal and SVI-lowrank on both the max mean error and the max |log std ratio|."""
    ref = mlp_reference
    guide = pk.KalmanGuide(ref["model"], covariance, update=update, rank=10 if covariance == "lowrank" else None)
    guide.update(ref["X"], ref["Y"])
    err, ratio = _distance(*guide.predict(ref["Xt"]), ref)
    assert err <= mean_tol, err
    assert ratio_range[0] <= ratio.min() and ratio.max() <= ratio_range[1], ratio
    for name, (m, s) in ref["svi"].items():
        svi_err = ((m - ref["nuts_mean"]).abs() / ref["nuts_std"]).max()
        svi_log = (s / ref["nuts_std"]).log().abs().max()
        assert err < svi_err, (name, float(err), float(svi_err))
        assert ratio.log().abs().max() < svi_log, (name, float(ratio.log().abs().max()), float(svi_log))


@pytest.mark.slow
def test_best_block_diagonal_gaussian_cannot_reach_factor_two(mlp_reference):
    """The structural limit: moment-match per-neuron blocks to the NUTS draws, predict in closed form."""
    ref = mlp_reference
    samples = ref["samples"]
    oracle = pk.KalmanGuide(ref["model"], covariance="block")
    for name in oracle.beliefs():
        rows = torch.cat([samples[f"net.{name}.weight"], samples[f"net.{name}.bias"][..., None]], -1)  # (S, n, p)
        centred = rows - rows.mean(0)
        oracle.set_layer(name, rows.mean(0), torch.einsum("snp,snq->npq", centred, centred) / (len(rows) - 1))
    err, ratio = _distance(*oracle.predict(ref["Xt"]), ref)
    assert err < 0.5  # the mean is representable
    assert ratio.max() > 2.0  # the std is not


@pytest.mark.slow
def test_full_gaussian_of_the_draws_reaches_nuts(mlp_reference):
    """The same oracle with a joint belief (the full covariance of the NUTS draws), sampled through the network: the
    std is representable once cross-layer covariance is kept (the counterpart of the test above)."""
    ref = mlp_reference
    theta = torch.cat([ref["samples"][s].reshape(len(ref["samples"][s]), -1) for s in ref["model"].site_names], 1)
    oracle = pk.KalmanGuide(ref["model"], "full", update="ekf")
    oracle.belief.loc.copy_(theta.mean(0))
    oracle.belief.cov.copy_(torch.cov(theta.T))
    err, ratio = _distance(*oracle.predict(ref["Xt"], method="sampled", draws=4000), ref)
    assert err < 0.2 and ratio.max() < 1.6, (float(err), ratio)
