"""ppl-kbnn: the Kalman Bayesian Transformer as a Pyro model with a closed-form Kalman guide."""

__version__ = "0.1.0.dev0"

from . import envs, inference, kalman, moments, nn  # noqa: E402
from .guide import KalmanGuide  # noqa: E402
from .model import BayesianModel, RelativeScale  # noqa: E402

__all__ = [
    "BayesianModel",
    "KalmanGuide",
    "RelativeScale",
    "envs",
    "inference",
    "kalman",
    "moments",
    "nn",
    "__version__",
]
