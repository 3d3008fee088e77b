"""Numerical guards of the Kalman backward pass: named, default off (or exactly the minimum the
math requires), and counted every time they fire.

=================  ==========  ===========================================================
guard              default     what it does
=================  ==========  ===========================================================
``var_floor``      ``0.0``     smoothed hidden-state variances are clamped at this floor.
                               A floor of 0 is the minimum the math needs: KBNN sums the input
                               updates of all neurons as if they were independent, which can
                               overshoot below zero; counted as ``var_floor``.
``jitter``         ``0.0``     added to the diagonal of every belief block after each update
                               (counted once per update when > 0).
``gain_clip``      ``None``    smoothing gains are clipped to ``[-gain_clip, gain_clip]``
                               (counted per clipped entry).
``psd_repair``     ``False``   after each update, belief blocks with a negative eigenvalue are
                               projected onto the PSD cone (eigenvalues clamped at 0; counted
                               per repaired block).
=================  ==========  ===========================================================
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class Guards:
    """Guard settings and their firing counts (``counts``, a ``Counter`` keyed by guard name)."""

    var_floor: float = 0.0
    jitter: float = 0.0
    gain_clip: float | None = None
    psd_repair: bool = False
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.var_floor < 0:
            raise ValueError(f"var_floor must be >= 0, got {self.var_floor}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")
        if self.gain_clip is not None and not self.gain_clip > 0:
            raise ValueError(f"gain_clip must be > 0 or None, got {self.gain_clip}")

    def floor(self, var: torch.Tensor) -> torch.Tensor:
        """Clamp variances at ``var_floor``, counting the entries below it."""
        low = var < self.var_floor
        n = int(low.sum())
        if n:
            self.counts["var_floor"] += n
            var = torch.where(low, torch.full_like(var, self.var_floor), var)
        return var

    def clip(self, gain: torch.Tensor) -> torch.Tensor:
        """Clip a gain at ``±gain_clip`` (if set), counting clipped entries."""
        if self.gain_clip is None:
            return gain
        big = gain.abs() > self.gain_clip
        n = int(big.sum())
        if n:
            self.counts["gain_clip"] += n
            gain = gain.clamp(-self.gain_clip, self.gain_clip)
        return gain

    def settings(self) -> dict[str, float | bool | None]:
        """The guard settings (without counts), for state dicts and reports."""
        return {"var_floor": self.var_floor, "jitter": self.jitter, "gain_clip": self.gain_clip,
                "psd_repair": self.psd_repair}  # fmt: skip
