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

from .._args import bool_arg, real_arg


@dataclass
class Guards:
    """Guard settings and their firing counts (``counts``, a ``Counter`` keyed by guard name)."""

    var_floor: float = 0.0
    jitter: float = 0.0
    gain_clip: float | None = None
    psd_repair: bool = False
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        # Each setting must be a finite number: a NaN would compare False everywhere and switch its guard off
        # silently, an inf would make every update non-finite. Stored as plain Python values.
        self.var_floor = real_arg("var_floor", self.var_floor, minimum=0.0)
        self.jitter = real_arg("jitter", self.jitter, minimum=0.0)
        if self.gain_clip is not None:
            try:
                self.gain_clip = real_arg("gain_clip", self.gain_clip, minimum=0.0, strict=True)
            except ValueError as err:
                raise ValueError(f"{err} (or None to switch gain clipping off)") from None
        self.psd_repair = bool_arg("psd_repair", self.psd_repair)

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
