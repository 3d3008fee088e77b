r"""The pendulum study: sequential adaptation of a pre-trained decision transformer to a shifted task.

``ppl-kbnn pendulum [--quick | --full] [--seeds A-B] [--workers N] --out DIR`` runs the on-policy design,
:func:`run_onpolicy_study` (:mod:`ppl_kbnn.pendulum.onpolicy`): on-policy streams (every 25 labels the method's
current network runs an episode that the recomputed expert labels), three shifts, KBT on all weights and on the
16 state-embedding biases against retraining of the same subsets (learning rate from development streams,
memory matched to KBT's bytes and larger), noisy evaluation, 95 % intervals across streams, and a conclusion
generated from them. Its units (:func:`run_unit`) are plain functions that any executor can run.

``ppl-kbnn pendulum --first-design [--quick] [--seed N] --out DIR`` runs the first design, :func:`run_study`, which

1. **pre-trains** a decision transformer (:class:`~ppl_kbnn.nn.DecisionTransformer`, d_model 16, one
   layer, one head, context ``K = 5``, tanh action head) with AdamW on contexts from nominal LQR-expert
   episodes with Gaussian exploration noise (std 0.5) on the applied action; the network, its
   configuration, the :class:`~ppl_kbnn.envs.Normalizer` and the loss curve are saved
   (``pretrained.pt``, ``pretrained.json``); its success on the nominal task is measured;
2. **chooses the shift**: the first candidate of ``settings.candidates`` (``sensor_bias_0.1`` first) on
   which the LQR expert recomputed for the task succeeds on ≥ 95 % of the evaluation episodes and the
   pre-trained DT on ≤ 30 %; both are printed and recorded with Wilson 95 % intervals. If none
   qualifies the study records why and stops (``results["stopped"]``);
3. **streams** shifted-task samples one at a time — contexts from expert episodes on the shifted task
   (same exploration noise, divided by ``max(1, |gear|)``), the label being the expert's own action at
   the last state token (normalised: action / 3), in a seeded random order — to: no adaptation;
   KBT with block and with diagonal covariance (:class:`~ppl_kbnn.KalmanGuide`, every linear map
   Bayesian, prior scale 0.05, obs noise 0.1, hidden ``"token"``); warm-started retraining
   (:class:`~ppl_kbnn.inference.Retrainer`, AdamW lr 3e-3, 5 full-buffer epochs per arrival) with a
   FIFO memory of ``M`` samples, the ``M`` chosen to bracket KBT's memory (``M = factor · KBT belief
   bytes / bytes of one buffered sample`` for ``factor · reference`` = 1/8, 1/2, 1 × diag and
   1 × block); and retraining on all data;
4. **evaluates** after each checkpoint ``n`` (``0, 25, 50, 100, 200, 400``): the success rate over 20
   episodes with fixed seeds (the same for every method; Wilson 95 % intervals), mean episode length,
   held-out action RMSE, the bytes of state beyond the pre-trained weights (KBT: belief means and
   covariances; retraining: buffer + AdamW moments) and the wall time per streamed sample. KBT acts
   with its posterior-mean network (:func:`posterior_mean_net`); episodes run in lockstep with one
   batched network call per step (:func:`evaluate_dt`);
5. **uncertainty**: Gaussian label noise σ ∈ {0, 0.05, 0.1, 0.2, 0.4} (normalised action units) on the
   streamed and held-out labels; KBT-block is updated with 200 noisy samples, with its obs noise
   either matched (``sqrt(0.1² + σ²)``) or fixed (0.1), and its mean predicted std (closed-form
   predictive, obs noise included) is compared with its actual RMSE on held-out noisy labels (also:
   epistemic std, RMSE against clean labels, 90 % interval coverage, NLL);
6. writes ``results.json`` (every number measured in the run, the settings, seeds, timings and
   versions), ``results.md`` (tables) and PNGs (success vs samples with interval bands, success vs
   memory, time per sample, predicted std vs actual error, the pre-training loss).

Everything runs in float64 with one torch thread (set for the run, restored afterwards). ``--quick``
(:data:`QUICK`) shortens pre-training, uses checkpoints ``0, 25, 100``, 5 evaluation episodes and 50
samples per noise level. ``docs/pendulum.md`` explains each choice and reports results.
"""

from .evaluate import evaluate_dt, posterior_mean_net
from .onpolicy import DEFAULT, FULL_DESIGN, QUICK_DESIGN, OnPolicySettings, run_onpolicy_study
from .study import FULL, QUICK, StudySettings, run_study
from .units import exact_fix, onpolicy_samples, run_unit

__all__ = [
    "DEFAULT",
    "FULL",
    "FULL_DESIGN",
    "QUICK",
    "QUICK_DESIGN",
    "OnPolicySettings",
    "StudySettings",
    "evaluate_dt",
    "exact_fix",
    "onpolicy_samples",
    "posterior_mean_net",
    "run_onpolicy_study",
    "run_study",
    "run_unit",
]
