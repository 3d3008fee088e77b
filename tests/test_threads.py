"""``ppl_kbnn._threads``: the oversubscription rule and its once-per-process warning."""

from __future__ import annotations

import warnings

import pytest

from ppl_kbnn import _threads
from ppl_kbnn._threads import ThreadOversubscriptionWarning, oversubscription, warn_if_oversubscribed


@pytest.mark.parametrize(
    "threads, cores, load, fires",
    [
        (1, 1, 50.0, False),  # one thread never oversubscribes
        (2, 2, 0.5, False),
        (2, 2, None, False),  # no load average on this platform: the core rule only
        (3, 2, 0.0, True),  # more threads than cores
        (2, 2, 2.5, True),  # every core already busy
        (4, 16, 15.0, False),
    ],
)
def test_rule(threads, cores, load, fires):
    reason = oversubscription(threads, cores, load)
    assert (reason is not None) == fires
    if fires:
        assert f"{threads} intra-op threads" in reason


def test_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(_threads, "_warned", False)
    monkeypatch.delenv("PPL_KBNN_THREAD_WARNING", raising=False)
    monkeypatch.setattr(_threads.torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(_threads, "_cores", lambda: 2)
    monkeypatch.setattr(_threads, "_load", lambda: 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_oversubscribed()
        warn_if_oversubscribed()
    assert len(caught) == 1
    w = caught[0]
    assert issubclass(w.category, ThreadOversubscriptionWarning) and issubclass(w.category, UserWarning)
    assert "8 intra-op threads on 2 core(s)" in str(w.message) and "torch.set_num_threads(1)" in str(w.message)


def test_silent_when_fine_or_disabled(monkeypatch):
    monkeypatch.setattr(_threads, "_warned", False)
    monkeypatch.setattr(_threads.torch, "get_num_threads", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_oversubscribed()  # one thread: nothing
        monkeypatch.setattr(_threads.torch, "get_num_threads", lambda: 64)
        monkeypatch.setenv("PPL_KBNN_THREAD_WARNING", "0")
        warn_if_oversubscribed()  # disabled: nothing
    assert _threads._warned is False
