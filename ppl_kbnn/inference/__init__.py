"""Inference baselines on the same Pyro model as the Kalman guide: NUTS, SVI, Laplace, warm-started retraining.

Every method returns an :class:`InferenceResult` (``predict(x) -> (mean, std)`` including the
observation noise, ``wall_seconds``, ``memory_bytes``, ``diagnostics``, and an ArviZ ``InferenceData``
from :meth:`InferenceResult.to_inference_data`), and :func:`from_guide` wraps a fitted
:class:`~ppl_kbnn.guide.KalmanGuide` the same way, so all methods compare side by side.
See docs/inference.md.
"""

from ._arviz import compare, convergence, elpd, ess, rhat, summary, trace_figure, trace_weights
from .laplace import laplace
from .nuts import nuts
from .result import InferenceResult, draw_outputs, draws_predictive, from_guide, model_output, tensor_bytes
from .retrain import Retrainer, point_network, retrain
from .svi import svi

__all__ = [
    "InferenceResult",
    "Retrainer",
    "compare",
    "convergence",
    "draw_outputs",
    "draws_predictive",
    "elpd",
    "ess",
    "from_guide",
    "laplace",
    "model_output",
    "nuts",
    "point_network",
    "retrain",
    "rhat",
    "summary",
    "svi",
    "tensor_bytes",
    "trace_figure",
    "trace_weights",
]
