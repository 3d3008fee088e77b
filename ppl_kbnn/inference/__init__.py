"""Inference baselines on the same Pyro model as the Kalman guide: NUTS, SVI, warm-started retraining.

Every method returns an :class:`InferenceResult` (``predict(x) -> (mean, std)`` including the
observation noise, ``wall_seconds``, ``memory_bytes``, ``diagnostics``), and :func:`from_guide` wraps a
fitted :class:`~ppl_kbnn.guide.KalmanGuide` the same way, so all methods compare side by side.
See docs/inference.md.
"""

from ._arviz import convergence, ess, rhat, summary
from .nuts import nuts
from .result import InferenceResult, draws_predictive, from_guide, model_output, tensor_bytes
from .retrain import Retrainer, point_network, retrain
from .svi import svi

__all__ = [
    "InferenceResult",
    "Retrainer",
    "convergence",
    "draws_predictive",
    "ess",
    "from_guide",
    "model_output",
    "nuts",
    "point_network",
    "retrain",
    "rhat",
    "summary",
    "svi",
    "tensor_bytes",
]
