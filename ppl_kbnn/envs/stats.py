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

    Raises:
        ValueError: unless ``n >= 1``, ``0 <= k <= n`` and ``z > 0``.
    """
    if n < 1:
        raise ValueError(f"wilson_interval: need n >= 1 trials, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if not z > 0:
        raise ValueError(f"wilson_interval: need z > 0, got z={z}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
