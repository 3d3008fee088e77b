"""Per-call overhead of the moment ops: ``validation(False)`` removes every check (no host sync is left on
the hot path), and the marginal-only activation path (``K = 0``) gives the same numbers as the series path."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ppl_kbnn import moments as pm


class _Syncs(TorchDispatchMode):
    """Counts the ATen calls that read a tensor value back to the host (``.item()``, ``bool(tensor)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _psd(gen, *lead, n):
    a = torch.randn(*lead, n, n, generator=gen)
    return a @ a.mT / n + 0.1 * torch.eye(n)


def _calls(kind: str, gen: torch.Generator) -> list:
    """One call of every public sequence op in ``kind``'s layout (small random inputs)."""
    B, T, d, n = 1, 3, 4, 2
    m, mk = torch.randn(B, T, d, generator=gen), torch.randn(B, T, d, generator=gen)
    cov = {"diag": torch.rand(B, T, d, generator=gen), "token": _psd(gen, B, T, n=d),
           "joint": _psd(gen, B, n=T * d).reshape(B, T, d, T, d)}[kind]  # fmt: skip
    wm, wc = torch.randn(n, d + 1, generator=gen), _psd(gen, n, n=d + 1)
    a = torch.softmax(torch.randn(B, T, T, generator=gen), -1)
    a_cov = 0.01 * (_psd(gen, B, T, n=T) if kind != "joint" else _psd(gen, B, n=T * T).reshape(B, T, T, T, T))
    return [
        lambda: pm.linear_moments(m, cov, wm, wc, kind=kind),
        lambda: pm.activation_moments(m, cov, activation="gelu", kind=kind),
        lambda: pm.layernorm_moments(m, cov, kind=kind),
        lambda: pm.residual_moments(m, cov, mk, cov, None, kind=kind),
        lambda: pm.score_moments(m, cov, mk, cov, kind=kind),
        lambda: pm.attention_value_moments(a, a_cov, mk, cov, kind=kind),
    ]


@pytest.mark.parametrize("kind", ["diag", "token", "joint"])
def test_validation_off_leaves_no_host_sync(kind, gen):
    for call in _calls(kind, gen):
        with pm.validation(True), _Syncs() as on:
            call()
        with pm.validation(False), _Syncs() as off:
            call()
        assert on.n > 0  # the checks read values back (finite, PSD): the counter sees them
        assert off.n == 0  # and with validation off nothing does


def test_softmax_validation_off_leaves_no_host_sync(gen):
    S = torch.randn(2, 4, 4, generator=gen)
    P = 0.1 * _psd(gen, 2, 4, n=4)
    Pj = 0.1 * _psd(gen, 2, n=16).reshape(2, 4, 4, 4, 4)
    mask = pm.attention_mask(4)
    for call in (lambda: pm.softmax_moments(S, P, mask=mask), lambda: pm.softmax_joint_moments(S, Pj, mask=mask)):
        with pm.validation(True), _Syncs() as on:
            call()
        with pm.validation(False), _Syncs() as off:
            call()
        assert on.n > 0 and off.n == 0


@pytest.mark.parametrize("name", sorted(pm.ACTIVATIONS))
def test_marginals_without_series_equal_the_series_path(name, gen):
    m = 3.0 * torch.randn(200, generator=gen)
    v = torch.rand(200, generator=gen)
    v[:10] = 0.0  # deterministic entries
    v[10:20] = 1e-5  # the small-variance branch
    without, with_series = pm.ACTIVATIONS[name](m, v, 0), pm.ACTIVATIONS[name](m, v, 4)
    assert without.coeffs.shape == (200, 0) and with_series.coeffs.shape == (200, 4)
    for field in ("mean", "var", "dmean"):
        assert torch.equal(getattr(without, field), getattr(with_series, field)), field
