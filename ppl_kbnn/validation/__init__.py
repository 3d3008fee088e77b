"""Validation sections of ``ppl-kbnn validate``: closed forms measured against Monte Carlo.

Each section is a function ``section(*, quick, seed, out_dir, progress) -> dict`` that writes
``<name>.json``, ``<name>.md`` and figures into ``out_dir`` and returns the JSON dict, whose
``checks`` entry is a list of ``{name, passed, detail}``.
"""

from __future__ import annotations

from .softmax import softmax_section

__all__ = ["softmax_section"]
