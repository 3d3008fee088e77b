r"""Small statistics helpers for success rates.

Wilson score interval (Wilson 1927) for a binomial proportion with ``k`` successes out of ``n``:

.. math::
    \hat p = k/n, \qquad
    \text{centre} = \frac{\hat p + z^2/(2n)}{1 + z^2/n}, \qquad
    \text{half-width} = \frac{z}{1 + z^2/n}\sqrt{\frac{\hat p(1-\hat p)}{n} + \frac{z^2}{4n^2}}

It stays inside ``[0, 1]`` and is sensible at ``k = 0`` and ``k = n`` (where the Wald interval
collapses to a point), which matters for the 0/20 and 20/20 results of the pendulum protocol.
"""

from __future__ import annotations

import math

__all__ = ["wilson_interval"]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for ``k`` successes in ``n`` trials (``z = 1.96``: about 95 %).

    ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`` at the confidence level
    ``erf(z/√2)`` of the two-sided normal quantile ``z`` (the formula above; identical to it within 1e-12
    for ``z <= 4``: the round trip of ``z`` through a confidence level close to 1 loses digits beyond).

    Raises:
        ValueError: unless ``n >= 1``, ``0 <= k <= n`` and ``0 < z < 8`` (beyond 8 the confidence level
            rounds to 1 in float64).
    """
    from scipy.stats import binomtest

    if n < 1:
        raise ValueError(f"wilson_interval: need n >= 1 trials, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if not 0 < z < 8:
        raise ValueError(f"wilson_interval: need 0 < z < 8, got z={z}")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=math.erf(z / math.sqrt(2.0)), method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))
