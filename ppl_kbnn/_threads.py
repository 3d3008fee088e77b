"""A once-per-process warning when torch's intra-op thread count cannot help.

KBT updates of small networks are chains of small matrix products; extra intra-op threads only add
synchronisation, and on a machine whose cores are already busy they wait for cores. ``ppl-kbnn`` sets one
thread; a library user gets :func:`warn_if_oversubscribed`'s warning instead.

The rule (simple on purpose), with ``threads = torch.get_num_threads()``, ``cores`` the CPUs this process
may run on (``os.sched_getaffinity`` where available, else ``os.cpu_count()``) and ``load`` the 1-minute
load average (``os.getloadavg``, where available):

* ``threads > cores``: more threads than cores, by construction oversubscribed;
* ``threads > 1`` and ``load > cores``: every core is already busy, so the extra threads queue for them.

It warns once per process (a :class:`ThreadOversubscriptionWarning`, a ``UserWarning``), never raises, and
is silent when the environment variable ``PPL_KBNN_THREAD_WARNING`` is ``0``. Test suites that turn
warnings into errors avoid it by running with one thread (``torch.set_num_threads(1)`` in a fixture, or
``OMP_NUM_THREADS=1``), by setting ``PPL_KBNN_THREAD_WARNING=0``, or with the filter
``ignore::ppl_kbnn._threads.ThreadOversubscriptionWarning``.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["ThreadOversubscriptionWarning", "oversubscription", "warn_if_oversubscribed"]

_warned = False


class ThreadOversubscriptionWarning(UserWarning):
    """torch uses more intra-op threads than the machine's free cores can run."""


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available (Windows)
        return None


def oversubscription(threads: int, cores: int, load: float | None) -> str | None:
    """The rule of this module: why ``threads`` cannot help on ``cores`` cores at ``load``, or ``None``.

    Args:
        threads: intra-op threads (``torch.get_num_threads()``).
        cores: CPUs available to the process.
        load: the 1-minute load average, or ``None`` where the platform has none.

    Returns:
        A sentence naming the numbers, or ``None`` when the thread count is fine.
    """
    if threads > cores:
        return f"torch uses {threads} intra-op threads on {cores} core(s)"
    if threads > 1 and load is not None and load > cores:
        return f"torch uses {threads} intra-op threads while the machine is busy (load {load:.1f} on {cores} core(s))"
    return None


def warn_if_oversubscribed() -> None:
    """Warn once per process when torch's intra-op thread count cannot help (the rule in the module docstring).

    Cheap enough to call at every update: after the first warning (or when disabled through
    ``PPL_KBNN_THREAD_WARNING=0``) it returns at once.
    """
    global _warned
    if _warned or os.environ.get("PPL_KBNN_THREAD_WARNING", "1") == "0":
        return
    threads = torch.get_num_threads()
    if threads <= 1:  # never oversubscribed (the rule below): skip its two system calls on the update path
        return
    reason = oversubscription(threads, _cores(), _load())
    if reason is None:
        return
    _warned = True
    warnings.warn(
        f"{reason}; for small models one thread is usually fastest: call torch.set_num_threads(1) "
        "(set PPL_KBNN_THREAD_WARNING=0 to silence this warning).",
        ThreadOversubscriptionWarning,
        stacklevel=3,
    )
