"""ppl-kbnn: the Kalman Bayesian Transformer as a Pyro model with a closed-form Kalman guide."""

from . import moments

__version__ = "0.1.0.dev0"
__all__ = ["moments", "__version__"]
