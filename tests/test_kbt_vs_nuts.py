"""KBT vs NUTS on a tiny transformer (issue 4): d_model 8, 1 layer, 1 head, 6 tokens, 40 samples.

Problem and reference: the session fixture ``transformer_reference`` (tests/conftest.py):
:func:`ppl_kbnn.toy.teacher_student_transformer` (student = prior centre, teacher = student with every parameter
shifted by 0.05·N(0, 1)), every Linear Bayesian (873 weights), prior_scale 0.05, obs_noise 0.1; 20 held-out
inputs. NUTS: 2 chains × (500 warm-up + 1500 draws), JIT, diagonal mass matrix (about 8 minutes per chain on one
core, computed in the background while the rest of the suite runs); SVI-normal 3000 steps.

The maximum split R-hat over 873 weights falls slowly with the number of draws: measured (seed 0)
1.026 with 400 draws per chain, 1.0055 with 1500 (min bulk ESS 2802). A dense mass matrix, which
helps on the MLP, made sampling slower here (its estimate from a few hundred warm-up draws in 873
dimensions is poor).
"""

import pytest
import torch

import ppl_kbnn as pk

torch.set_num_threads(1)


def _measures(mean, std, ref):
    """(max |m − m*| / s*, max |log(s / s*)|) over the held-out inputs."""
    err = ((mean - ref["nuts_mean"]).abs() / ref["nuts_std"]).max()
    return float(err), float((std / ref["nuts_std"]).log().abs().max())


@pytest.mark.slow
def test_nuts_reference_converged(transformer_reference):
    diagnostics = transformer_reference["diagnostics"]
    assert diagnostics["max_rhat"] <= 1.01
    assert diagnostics["min_ess_bulk"] >= 100


@pytest.mark.slow
@pytest.mark.parametrize("hidden", ["token", "joint"])
@pytest.mark.parametrize("covariance", ["block", "diag"])
def test_kbt_predictive_against_nuts(transformer_reference, covariance, hidden):
    """Mean within 0.5 NUTS predictive std and std within a factor 2 at every held-out input."""
    r = transformer_reference
    guide = pk.KalmanGuide(r["model"], covariance=covariance, hidden=hidden)
    guide.update(r["x"], r["y"])
    mean, var = guide.predict(r["xt"])
    err = ((mean - r["nuts_mean"]).abs() / r["nuts_std"]).max()
    ratio = var.sqrt() / r["nuts_std"]
    assert err <= 0.5, float(err)
    assert 0.5 <= ratio.min() and ratio.max() <= 2.0, (float(ratio.min()), float(ratio.max()))


@pytest.mark.slow
def test_lowrank_ekf_at_least_as_close_as_kbt_block_and_closer_than_svi_normal(transformer_reference):
    """``lowrank`` (rank 10) + ``ekf`` vs KBT-block (``hidden="joint"``, the most faithful moment mode) and SVI-normal,
    on both the max mean error and the max |log std ratio|."""
    r = transformer_reference
    low = pk.KalmanGuide(r["model"], "lowrank", update="ekf", rank=10).update(r["x"], r["y"])
    kbt = pk.KalmanGuide(r["model"], "block", hidden="joint").update(r["x"], r["y"])
    m, v = low.predict(r["xt"])
    low_err, low_log = _measures(m, v.sqrt(), r)
    m, v = kbt.predict(r["xt"])
    kbt_err, kbt_log = _measures(m, v.sqrt(), r)
    svi_err, svi_log = _measures(*r["svi_normal"], r)
    assert low_err <= kbt_err and low_log <= kbt_log, (low_err, kbt_err, low_log, kbt_log)
    assert low_err < svi_err and low_log < svi_log, (low_err, svi_err, low_log, svi_log)
