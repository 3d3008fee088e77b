"""KBT (Kalman guide) vs NUTS on the issue's MLP problem: a posterior-level comparison.

Setup (issue 3): ``Linear(1,16) → ReLU → Linear(16,1)`` pre-trained on sin(x), prior_scale 0.1 around the
pre-trained weights, obs_noise 0.1, 50 samples of sin(x) + 0.3x, 20 test inputs; NUTS with 2 chains side
by side (JIT, dense mass matrix, 300 warm-up + 1000 draws each), R-hat ≤ 1.01. (2 × (200 + 300) draws with a
diagonal mass matrix gave R-hat 1.009 on one software stack and 1.012 on another: too close to the line.)

Measured (seed 0; max R-hat 1.0041): KBT-block mean error 0.89 NUTS predictive std, std ratio KBT/NUTS in
[1.17, 2.01]; KBT-diag 1.23 and [1.41, 3.03]. The tests assert that measured envelope with a margin, not the
issue's target (0.5 std, factor 2), which is not met; the reason is structural and measured here too: the
*best* block-diagonal Gaussian — the per-neuron blocks moment-matched to the NUTS draws themselves — has its
mean within 0.27 NUTS std but a predictive std up to 3.99× NUTS's, because the posterior correlations
between layers and between neurons carry most of the predictive-variance reduction, and a per-neuron block
belief cannot hold them
(docs/kbnn.md, "How close to NUTS").
"""

import pytest
import torch

import ppl_kbnn as pk
from ppl_kbnn.toy import pretrained_mlp, regression_stream

NUTS_WARMUP, NUTS_DRAWS = 300, 1000


@pytest.fixture(scope="module")
def problem():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield _problem()
    finally:
        torch.set_default_dtype(old)


def _problem():
    model = pk.BayesianModel(pretrained_mlp(16), prior_scale=0.1, obs_noise=0.1)
    X, Y = regression_stream(50)
    Xt = torch.linspace(-2.8, 2.8, 20)[:, None]
    ref = pk.inference.nuts(model, X, Y, num_samples=NUTS_DRAWS, warmup_steps=NUTS_WARMUP, num_chains=2, seed=0,
                            full_mass=True, processes=2)  # fmt: skip
    mean, std = ref.predict(Xt)  # (20, 1) each; std includes the observation noise
    return model, X, Y, Xt, ref.samples, ref.diagnostics["max_rhat"], mean[:, 0], std[:, 0]


@pytest.mark.slow
def test_nuts_reference_converged(problem):
    assert problem[5] <= 1.01


@pytest.mark.slow
@pytest.mark.parametrize(("covariance", "mean_tol", "ratio_range"), [("block", 1.0, (0.8, 2.5)),
                                                                      ("diag", 1.4, (0.8, 4.0))])  # fmt: skip
def test_kbt_predictive_against_nuts(problem, covariance, mean_tol, ratio_range):
    model, X, Y, Xt, _, _, nuts_mean, nuts_std = problem
    guide = pk.KalmanGuide(model, covariance=covariance).update(X, Y)
    mean, var = guide.predict(Xt)
    err = ((mean[:, 0] - nuts_mean).abs() / nuts_std).max()
    ratio = var[:, 0].sqrt() / nuts_std
    assert err <= mean_tol, err
    assert ratio_range[0] <= ratio.min() and ratio.max() <= ratio_range[1], ratio
    # better than not adapting at all
    prior_mean, _ = pk.KalmanGuide(model, covariance=covariance).predict(Xt)
    assert err < ((prior_mean[:, 0] - nuts_mean).abs() / nuts_std).max()


@pytest.mark.slow
def test_best_block_diagonal_gaussian_cannot_reach_factor_two(problem):
    """The structural limit: moment-match per-neuron blocks to the NUTS draws, predict in closed form."""
    model, _, _, Xt, samples, _, nuts_mean, nuts_std = problem
    oracle = pk.KalmanGuide(model, covariance="block")
    for name in oracle.beliefs():
        rows = torch.cat([samples[f"net.{name}.weight"], samples[f"net.{name}.bias"][..., None]], -1)  # (S, n, p)
        centred = rows - rows.mean(0)
        oracle.set_layer(name, rows.mean(0), torch.einsum("snp,snq->npq", centred, centred) / (len(rows) - 1))
    mean, var = oracle.predict(Xt)
    assert ((mean[:, 0] - nuts_mean).abs() / nuts_std).max() < 0.5  # the mean is representable
    assert (var[:, 0].sqrt() / nuts_std).max() > 2.0  # the std is not
