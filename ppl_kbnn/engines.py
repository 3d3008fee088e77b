r"""Update engines: how one observation ``(x, y)`` becomes a Kalman step on the weight belief.

Every engine reduces the network around the current belief to a linear-Gaussian observation of the
weights and hands it to the belief (:meth:`~ppl_kbnn.beliefs.Belief.condition`); they differ only in the
linearisation (the dynamax pattern: one filter, the integrals swapped).

``"kbnn"`` — the paper's rule. Forward: closed-form moment propagation through every layer
(:mod:`ppl_kbnn.moments`, :mod:`ppl_kbnn.propagate`); backward: the Kalman filter step at the output and
KBNN smoothing steps node by node (:mod:`ppl_kbnn.kalman`). On a transformer the backward chain is the
statistical Jacobian of the propagated mean. Belief structures: ``"block"``, ``"diag"``.

``"ekf"`` — the extended Kalman filter over all Bayesian weights. With ``f`` the network's observed output
and ``J = ∂f(x; θ)/∂θ`` at the belief mean ``μ`` (``torch.func.jacrev``):

.. math:: \hat y = f(x; \mu), \qquad c = P J^\top, \qquad S = J c + R, \qquad
          \mu^+ = \mu + c S^{-1}(y - \hat y), \qquad P^+ = P - c S^{-1} c^\top .

Its read-out is the same linearisation: ``E[y] ≈ f(x; μ)``, ``Var[y] ≈ diag(J P Jᵀ) + R``.

``"slr"`` — statistical linear regression (posterior linearisation, one pass). ``L`` weight draws
``θ_s ~ N(μ, P)`` (antithetic pairs, so their mean is exactly ``μ``) give

.. math:: \hat y = \tfrac1L \textstyle\sum_s f(x; \theta_s), \qquad
          c = \widehat{\mathrm{Cov}}(\theta, y), \qquad S = \widehat{\mathrm{Cov}}(y) + R ,

and the same Kalman step. It is the Gaussian update that best fits ``f`` over the belief's spread, not at a
point; its read-out pushes draws through the network (Monte Carlo). Draws come from a generator seeded by
``(seed, update count)``, so a run is reproducible.
"""

from __future__ import annotations

import functools
import math
import operator
import time
import types
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call, vmap

from ._threads import warn_if_oversubscribed
from .beliefs import Belief, BlockBelief, DiagBelief, FullBelief, LowRankBelief
from .hyper import observation
from .kalman import (
    filter_step,
    smooth_activation,
    smooth_activation_full,
    smooth_linear,
    smooth_linear_full,
    weight_update,
)
from .kalman.steps import _safe_div, _weight_update
from .moments import activation_moments, linear_moments, validation
from .moments._checks import is_validating, set_validation
from .propagate import Propagator, full_cov

if TYPE_CHECKING:
    from .guide import KalmanGuide

__all__ = ["ENGINES", "EKF", "SLR", "KBNNChain", "KBNNTransformer", "NetworkFunction", "READOUTS"]

_LOG_2PI = math.log(2 * math.pi)

READOUTS = ("moments", "linearised", "sampled")
"""Predictive read-outs: closed-form moment propagation, Jacobian linearisation at the mean, Monte Carlo draws."""


class _Output(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> torch.Tensor:
        return self.model.output(x)


class NetworkFunction:
    """``f(θ, x)``: the model's observed output with the flat Bayesian weights ``θ`` ``(D,)`` plugged in
    (a deterministic copy of the network, evaluated with ``torch.func.functional_call``)."""

    CHUNK = 256  # draws per vmapped call

    def __init__(self, model: nn.Module, layout: Any) -> None:
        from .inference.retrain import point_network

        self.module = _Output(point_network(model)).requires_grad_(False)
        self.layout = layout

    def __call__(self, theta: torch.Tensor, x: Any) -> torch.Tensor:
        params = {f"model.{k}": v for k, v in self.layout.split(theta).items()}
        return functional_call(self.module, params, (x,))

    def batched(self, thetas: torch.Tensor, x: Any) -> torch.Tensor:
        """``f`` at each of ``thetas`` ``(L, D)``: ``(L, *out)``."""
        f = vmap(self.__call__, in_dims=(0, None))
        return torch.cat([f(t, x) for t in thetas.split(self.CHUNK)])

    def jacobian(self, theta: torch.Tensor, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(x; θ) (*out), J (k, D))`` with ``k`` the number of outputs (``f`` flattened): one backward pass per
        output, batched (``is_grads_batched``) when there are several."""
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            out = self(t, x)
            flat = out.reshape(-1)
            k = flat.shape[0]
            if k == 1:  # a plain backward pass (cheaper than jacrev's vmap)
                J = torch.autograd.grad(flat[0], t)[0][None]
            else:
                eye = torch.eye(k, dtype=flat.dtype, device=flat.device)
                J = torch.autograd.grad(flat, t, grad_outputs=eye, is_grads_batched=True)[0]
        return out.detach(), J  # (*out), (k, D)


class Engine:
    """An update rule (module docstring). ``step`` absorbs one sample; ``readout`` is the matching predictive."""

    key: ClassVar[str]
    beliefs: ClassVar[tuple[type[Belief], ...]]
    readout: ClassVar[str]

    def __init__(self, guide: KalmanGuide, **options: Any) -> None:
        self.guide = guide
        unknown = set(options) - self.options()
        if unknown:
            raise ValueError(f"update={self.key!r} takes no option(s) {sorted(unknown)}")

    @classmethod
    def options(cls) -> set[str]:
        """The keyword options the rule takes (passed through :class:`~ppl_kbnn.guide.KalmanGuide`)."""
        return set()

    def step(self, x: Any, y: torch.Tensor) -> None:
        """Absorb one sample (``x`` a batch of 1 for transformers, one input row for chains; ``y`` its targets)
        into ``guide.belief``."""
        raise NotImplementedError


class _CompileOption(Engine):
    """An engine with the ``compile`` option (``False``, ``True`` or a ``torch.compile`` backend name; validated by
    :func:`_compile_arg`); the compiled function is built on the first compiled step and kept in ``_compiled``."""

    def __init__(self, guide: KalmanGuide, *, compile: bool | str = False) -> None:  # noqa: A002
        super().__init__(guide)
        self.compile = _compile_arg(compile)
        self._compiled: Any = None
        self._lean: Any = None  # KBNNChain.lean_update's per-guide constants, set on its first call
        self._placement: tuple | None = None  # the (dtype, device) the compiled function was built for

    @classmethod
    def options(cls) -> set[str]:  # noqa: D102
        return {"compile"}


# ------------------------------------------------------------------------------------------------- KBNN


class KBNNChain(_CompileOption):
    """KBNN on an ``nn.Sequential`` chain: forward moments, output filter, smoothing I/II (:mod:`ppl_kbnn.kalman`).

    Option ``compile`` (``hidden="diag"``, fixed observation noise, one prior): ``False`` (default) runs the step
    op by op. Otherwise the whole sample step (forward moments, observation test, filter, smoothing, guard counts,
    the finiteness of the sample and of the new rows) is one compiled function that returns the new rows and every
    count as tensors, read back once per sample. ``True`` on the CPU compiles it ahead of time with AOTInductor
    (``torch.export`` + ``torch._inductor.aoti_compile_and_package``, which needs a C++ compiler; once per process
    for a structure, settings, dtype and device) and calls the compiled code directly: no ``torch.compile`` guards
    or wrappers per call, so the shapes, dtypes and devices are checked by the guide (:meth:`lean_update`); on a
    GPU ``True`` means ``torch.compile`` with inductor (the ahead-of-time path is not tested there). A
    ``torch.compile`` backend name (``"inductor"``, ``"eager"``, ``"aot_eager"``, ...) compiles it with
    ``torch.compile`` and that backend instead. ``"eager"`` gives the op-by-op results bit for bit; inductor's fused
    kernels agree up to round-off (they reorder sums; with one output the ahead-of-time step also takes ``√S``
    instead of LAPACK's 1 × 1 Cholesky factor, which differ in the last bit).
    """

    key, beliefs, readout = "kbnn", (BlockBelief, DiagBelief), "moments"

    def _compiled_step(self) -> Any:
        """The compiled sample step of :func:`_chain_diag_step` for this guide's structure, settings, dtype and
        device: ``(x (1, d_in), y (1, d_out), rows) -> (new rows, stats)``. ``compile=True``: on the CPU compiled
        ahead of time (AOTInductor, :func:`_aot_step`), elsewhere ``torch.compile`` with inductor; a backend name:
        ``torch.compile`` with that backend. Rebuilt when the guide has been moved (``guide.to``)."""
        g = self.guide
        placement = (g.dtype, g.device)
        if self._compiled is None or self._placement != placement:
            nodes = tuple((n.index, None) if hasattr(n, "weight_site") else (None, n.activation) for n in g.nodes)
            kw = dict(nodes=nodes, kind=g._kind, w_kind=g.belief.w_kind, noise_var=float(g.obs_noise) ** 2,
                      var_floor=g.guards.var_floor, gain_clip=g.guards.gain_clip, outliers=g.outliers,
                      threshold=g._outlier_threshold(g._linears[-1].d_out))  # fmt: skip
            if self.compile is True and g.device.type == "cpu":
                rows = tuple(t for s in g.belief.layout.slots for t in g.belief.rows(s.index))
                x = torch.zeros(1, g._linears[0].d_in, dtype=g.dtype, device=g.device)
                y = torch.zeros(1, g._linears[-1].d_out, dtype=g.dtype, device=g.device)
                self._compiled = _aot_step(kw, x, y, rows)
            else:  # (AOTInductor on a GPU is untested here: the GPU keeps torch.compile)
                fn = functools.partial(_fresh(_chain_diag_step), **kw)
                backend = "inductor" if self.compile is True else self.compile
                self._compiled = torch.compile(fn, backend=backend, dynamic=False)
            self._placement = placement
        return self._compiled

    def lean_update(self, x: Any, y: Any) -> int:
        """``guide.update(x, y)`` through the compiled step with the least Python per sample, or 0 where the full
        path must run (which then checks, raises or falls back exactly as :meth:`KalmanGuide.update` does).

        Taken for tensors of the belief's dtype and device in the shapes ``update`` accepts (``x`` ``(N, d_in)`` or
        ``(d_in,)``; ``y`` ``(N, d_out)``, or ``(N,)`` / ``(d_out,)`` where unambiguous), with the model where the
        belief is, no process noise, jitter or PSD repair. Whether ``x`` and ``y`` are finite is computed inside the
        compiled step and read back with its other numbers (one host read per sample). Where a sample is not finite,
        its innovation covariance is not positive definite or its update is not finite, every sample of the call is
        taken back (the belief, counters and guard counts as before the call) and 0 returned: the full path then
        raises the usual ``ValueError`` / ``FloatingPointError`` or runs the op-by-op step. Returns the number of
        samples absorbed; sets ``n_updates`` and ``update_seconds``."""
        g = self.guide
        belief = g.belief
        if self._lean is None:
            slots = belief.layout.slots
            keys = [k for s in slots for k in (f"mean_{s.index}", f"cov_{s.index}")]
            self._lean = (g.process_noise == 0 and g.guards.jitter == 0 and not g.guards.psd_repair,
                          (g._linears[0].d_in, g._linears[-1].d_out), [s.index for s in slots], keys[0],
                          operator.itemgetter(*keys), g._outlier_threshold(g._linears[-1].d_out),
                          g.outliers == "gate")  # fmt: skip
        eligible, (d_in, d_out), indices, first, rows, threshold, gate = self._lean
        if not eligible:
            return 0
        bufs = belief._buffers
        ref = bufs[first]
        dtype, device = ref.dtype, ref.device
        if type(x) is not torch.Tensor or type(y) is not torch.Tensor or x.dtype != dtype or y.dtype != dtype:
            return 0
        if x.device != device or y.device != device or g._model.dtype != dtype or g._model.device != device:
            return 0
        if x.dim() == 1:
            x = x[None]
        elif x.dim() != 2:
            return 0
        n = x.shape[0]
        if y.dim() == 1 and d_out == 1 and y.shape[0] == n:
            y = y[:, None]
        elif y.dim() == 1 and n == 1 and y.shape[0] == d_out:
            y = y[None]
        if x.shape != (n, d_in) or y.shape != (n, d_out) or n == 0:
            return 0
        if torch.get_num_threads() > 1:  # (it returns at once at one thread)
            warn_if_oversubscribed()
        step = self._compiled
        if step is None or self._placement != (dtype, device):
            step = self._compiled_step()
        aot = isinstance(step, _AOTStep)
        swap, gd = belief._swap, g.__dict__  # (the per-update counters live in __dict__)
        snapshot, last = dict(bufs), (gd["_last_d2"], gd["_last_logpdf"])
        outliers = floors = clips = 0
        checks = is_validating()
        if not aot:
            set_validation(False)  # torch.compile traces the moment functions: their checks off, as in the plain step
        t0 = time.perf_counter()
        try:
            for xi, yi in ((x, y),) if n == 1 else zip(x.split(1), y.split(1), strict=True):  # (1, d_in), (1, d_out)
                new, stats = step(xi, yi, rows(bufs))
                d2, logdet, n_floor, n_clip, info, finite, data_ok = stats.tolist()  # the one read-back of the sample
                if not (data_ok and info == 0 and finite):  # the full path raises or falls back (nothing kept)
                    bufs.update(snapshot)
                    gd["_last_d2"], gd["_last_logpdf"] = last
                    return 0
                gd["_last_d2"], gd["_last_logpdf"] = d2, -0.5 * (d2 + logdet + d_out * _LOG_2PI)
                if d2 > threshold:
                    outliers += 1
                    if gate:
                        continue
                floors += n_floor
                clips += n_clip
                for k, index in enumerate(indices):
                    swap(index, new[2 * k], new[2 * k + 1])
        except BaseException:  # an interruption: put every row back, then re-raise
            bufs.update(snapshot)
            gd["_last_d2"], gd["_last_logpdf"] = last
            raise
        finally:
            if not aot:
                set_validation(checks)
        counts = g.guards.counts
        if outliers:
            counts["outlier"] += outliers
        if floors:
            counts["var_floor"] += int(floors)
        if clips:
            counts["gain_clip"] += int(clips)
        gd["_outliers_in_call"] = outliers
        gd["n_updates"] += n
        gd["update_seconds"] += time.perf_counter() - t0
        return n

    def forward_moments(self, x: torch.Tensor, beliefs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Moments of the network output for inputs ``x`` ``(..., T, d_in)``; the cache holds, per node,
        ``(node, input covariance, output moments)`` for the backward pass."""
        g = self.guide
        w_kind = g.belief.w_kind if beliefs is None else "block"
        mean, cov, cache = x, None, []
        with validation(False):
            for node in g.nodes:
                if hasattr(node, "weight_site"):
                    w_mean, w_cov = g.belief.rows(node.index) if beliefs is None else beliefs[node.module]
                    out = linear_moments(mean, cov, w_mean, w_cov, kind=g._kind, w_kind=w_kind)
                else:
                    out = activation_moments(mean, cov, activation=node.activation, kind=g._kind)
                cache.append((node, cov, out))
                mean, cov = out.mean, out.cov
        return mean, cov, cache

    def step(self, x, y):
        g = self.guide
        if self.compile is not False and self._step_compiled(x, y):
            return
        new = self._backward_full(x, y) if g.hidden == "full" else self._backward_diag(x, y)
        g.belief.update_rows(new)

    def _step_compiled(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """The compiled sample step; ``False`` (nothing changed) where the op-by-op step must run instead (an
        innovation covariance that is not positive definite)."""
        g = self.guide
        slots = g.belief.layout.slots
        rows = tuple(t for s in slots for t in g.belief.rows(s.index))
        with validation(False):
            new, stats = self._compiled_step()(x[None], y[None], rows)
        d2, logdet, n_floor, n_clip, info, finite, _ = stats.tolist()  # the one read-back of the sample
        if info != 0:
            return False
        m = y.shape[0]
        g._last_d2, g._last_logpdf = d2, -0.5 * (d2 + logdet + m * math.log(2 * math.pi))
        if d2 > g._outlier_threshold(m):
            g.guards.counts["outlier"] += 1
            g._outliers_in_call += 1
            if g.outliers == "gate":
                return True
        if n_floor:
            g.guards.counts["var_floor"] += int(n_floor)
        if n_clip:
            g.guards.counts["gain_clip"] += int(n_clip)
        rows = {s.index: (new[2 * k], new[2 * k + 1]) for k, s in enumerate(slots)}
        if finite and not (g.guards.jitter > 0 or g.guards.psd_repair):  # nothing left to apply or check
            for index, (mean, cov) in rows.items():
                g.belief._swap(index, mean, cov)
        else:
            g.belief.update_rows(rows)
        return True

    def _backward_diag(self, x, y):
        """KBNN: filter at the output, then smoothing I/II with diagonal hidden states."""
        g = self.guide
        mean, var, cache = self.forward_moments(x[None, :])  # (1, d_out)
        rho = observation(g, torch.diag(var[0]), y - mean[0])  # noise variances (d_out,), None: skip
        if rho is None:
            return {}
        filt_mean, filt_var = filter_step(mean, var, y[None, :], rho)
        d_mean, d_var = filt_mean - mean, filt_var - var
        new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for node, in_var, out in reversed(cache):
            if not hasattr(node, "weight_site"):
                d_mean, d_var_in = smooth_activation(d_mean, d_var, out.cov, out.cross, g.guards)
            else:
                dmw, dcw, d_mean, d_var_in = smooth_linear(
                    d_mean, d_var, out.cov, out.w_cross, out.cross, g.guards, w_kind=g.belief.w_kind
                )
                w_mean, w_cov = g.belief.rows(node.index)
                new[node.index] = (w_mean + dmw, w_cov + dcw)
                if d_mean is None:  # the network input: nothing further back
                    break
            d_var = g.guards.floor(in_var + d_var_in) - in_var
        return new

    def _backward_full(self, x, y):
        """Filter at the output, then vector RTS steps with full within-sample hidden covariances."""
        g = self.guide
        mean, cov, cache = self.forward_moments(x[None, :])  # (1, d_out), (1, d_out, d_out)
        rho = observation(g, cov[0], y - mean[0])  # noise variances (d_out,), None: skip
        if rho is None:
            return {}
        filt_mean, filt_cov = _filter_full(mean, cov, y[None, :], rho)
        d_mean, d_cov = filt_mean - mean, filt_cov - cov
        new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for node, _in_cov, out in reversed(cache):
            if not hasattr(node, "weight_site"):
                d_mean, d_cov = smooth_activation_full(d_mean, d_cov, out.cov, out.cross)
            else:
                dmw, dcw, d_mean, d_cov = smooth_linear_full(
                    d_mean, d_cov, out.cov, out.w_cross, out.cross, w_kind=g.belief.w_kind
                )
                w_mean, w_cov = g.belief.rows(node.index)
                new[node.index] = (w_mean + dmw, w_cov + dcw)
                if d_mean is None:
                    break
        return new

    def moments(self, x: torch.Tensor, beliefs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form predictive moments of the network output (no observation noise): ``(N, d_out)`` each."""
        mean, cov, _ = self.forward_moments(x[:, None, :], beliefs)  # each input a one-token sequence
        var = cov if self.guide.hidden == "diag" else torch.diagonal(cov, dim1=-2, dim2=-1)
        return mean[:, 0], var[:, 0]


def _chain_diag_step(
    x: torch.Tensor,
    y: torch.Tensor,
    rows: tuple[torch.Tensor, ...],
    *,
    nodes: tuple[tuple[int | None, str | None], ...],
    kind: str,
    w_kind: str,
    noise_var: float,
    var_floor: float,
    gain_clip: float | None,
    outliers: str,
    threshold: float,
    scalar: bool = False,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """One KBNN chain sample step (``hidden="diag"``, fixed noise) as a pure function of tensors, for
    ``torch.compile``: the same operations as :meth:`KBNNChain._backward_diag` with the guards counted as tensors.

    ``x`` ``(1, d_in)`` and ``y`` ``(1, d_out)``: one sample (a row of the caller's batch, taken without a copy).

    ``rows``: ``(mean_0, cov_0, mean_1, cov_1, ...)`` in layer order; ``nodes``: per node ``(layer index, None)``
    or ``(None, activation)``. Returns the new rows (same layout; a layer the step does not reach keeps its
    tensors; block covariances symmetrised) and ``stats`` ``(7,)``: ``d²``, ``log det S``, var-floor and gain-clip
    counts, Cholesky ``info``, 1 if every new row is finite (else 0), 1 if ``x`` and ``y`` are finite (else 0).
    ``scalar``: with one output, ``S`` is a number and its Cholesky factor a square root (no LAPACK call; the same
    values up to round-off: LAPACK's factor of a 1 × 1 matrix is not always the correctly rounded square root).
    """
    mean, cov, cache = x, None, []  # (1, d_in)
    for index, act in nodes:
        if index is not None:
            out = linear_moments(mean, cov, rows[2 * index], rows[2 * index + 1], kind=kind, w_kind=w_kind)
        else:
            out = activation_moments(mean, cov, activation=act, kind=kind)
        cache.append((index, cov, out))
        mean, cov = out.mean, out.cov
    var = cov  # (1, d_out)
    resid = y[0] - mean[0]  # (d_out,)
    R = torch.full(resid.shape, noise_var, dtype=resid.dtype, device=resid.device)
    if scalar and resid.shape[0] == 1:  # one output: S is a number (no LAPACK calls; equal up to round-off)
        s = var[0, 0] + R[0]
        sd = torch.sqrt(s)
        info = (~(s > 0)).to(torch.int32)  # not positive (or NaN): as cholesky_ex's info
        z = resid / sd
        d2 = (z * z)[0]
        logdet = 2.0 * torch.log(sd)
    else:
        S = torch.diag(var[0]) + torch.diag(R)  # as ppl_kbnn.hyper.observation
        L, info = torch.linalg.cholesky_ex(S)
        z = torch.linalg.solve_triangular(L, resid[:, None], upper=False)[:, 0]
        d2 = z @ z
        logdet = 2.0 * torch.log(torch.diagonal(L)).sum()
    if outliers == "wolf":
        R = R / (1.0 / (1.0 + d2 / threshold))
    n_floor = n_clip = torch.zeros((), dtype=var.dtype, device=var.device)

    def clip(k: torch.Tensor) -> torch.Tensor:
        nonlocal n_clip
        if gain_clip is None:
            return k
        n_clip = n_clip + (k.abs() > gain_clip).sum()
        return k.clamp(-gain_clip, gain_clip)

    filt_mean, filt_var = filter_step(mean, var, y, R)
    d_mean, d_var = filt_mean - mean, filt_var - var
    new = list(rows)
    for index, in_var, out in reversed(cache):
        if index is None:
            k = clip(_safe_div(out.cross, out.cov))
            d_mean, d_var_in = k * d_mean, k * k * d_var
        else:
            Kw = clip(_safe_div(out.w_cross, out.cov[..., None]))
            dmw, dcw = _weight_update(Kw, d_mean, d_var, w_kind)
            new[2 * index], new[2 * index + 1] = rows[2 * index] + dmw, rows[2 * index + 1] + dcw
            if out.cross is None:
                break
            Ku = clip(_safe_div(out.cross, out.cov[..., None, :]))
            d_mean = torch.einsum("...tin,...tn->...ti", Ku, d_mean)
            d_var_in = torch.einsum("...tin,...tn->...ti", Ku * Ku, d_var)
        v = in_var + d_var_in
        low = v < var_floor
        n_floor = n_floor + low.sum()
        d_var = torch.where(low, var_floor, v) - in_var
    if w_kind == "block":  # symmetrised as BlockBelief commits them (the same ops; repeating them changes nothing)
        new[1::2] = [0.5 * (c + c.mT) for c in new[1::2]]
    finite = torch.stack([torch.isfinite(t).all() for t in new]).all()
    data_ok = torch.isfinite(x).all() & torch.isfinite(y).all()  # the sample's values (checked here, read back once)
    stats = torch.stack([d2, logdet, n_floor.to(d2.dtype), n_clip.to(d2.dtype), info.to(d2.dtype), finite.to(d2.dtype),
                         data_ok.to(d2.dtype)])  # fmt: skip
    return tuple(new), stats


def _transformer_forward(
    means: list[torch.Tensor], covs: list[torch.Tensor], x: Any, *, net: nn.Module, modules: tuple[str, ...],
    mode: str, w_kind: str, observe: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``E[y]`` ``(m,)`` and ``Cov(y)`` ``(m, m)`` of one transformer input propagated through the per-row belief
    ``(means, covs)`` (listed in ``modules`` order)."""
    prop = Propagator(net, dict(zip(modules, zip(means, covs, strict=True), strict=True)), mode=mode, w_kind=w_kind,
                      observe=observe)  # fmt: skip
    out = prop.forward(x)  # mean (1, n_tok, d_out)
    return out.mean.reshape(-1), full_cov(out, prop.kind)[0]


def _fresh(f: Any) -> Any:
    """A copy of function ``f`` with its own code object: ``torch.compile`` keeps its compiled graphs per code
    object, at most ``torch._dynamo.config.recompile_limit`` (8) of them, so one guide's step cannot evict
    another's."""
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    return g


AOT_INDUCTOR_CONFIGS: dict[str, Any] = {
    "realize_opcount_threshold": 4,
    "post_grad_fusion_options": {"decompose_mm_pass": {}},
}
"""Inductor settings of the ahead-of-time compiled chain step. ``realize_opcount_threshold``: a pointwise result with
more operations than this is stored once rather than recomputed inside each consumer's loop (inductor's CPU default,
50, recomputes a ReLU layer's output moments, ``erf`` and ``exp``, inside every loop over a ``(p, p)`` weight block
that reads them: the 1-50-1 block step took 90 µs instead of 50). ``decompose_mm_pass``: a product with one row (a
sample's first linear map) becomes part of the generated kernel instead of a call into ATen's ``addmm``."""

_AOT_STEPS: dict[tuple, _AOTStep] = {}  # compiled steps by structure, settings, shapes, dtype and device


class _StepModule(nn.Module):
    """:func:`_chain_diag_step` with fixed settings as a module of tensors only, for ``torch.export``."""

    def __init__(self, kw: dict[str, Any]) -> None:
        super().__init__()
        self.kw = kw

    def forward(self, x: torch.Tensor, y: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with validation(False):
            new, stats = _chain_diag_step(x, y, rows, scalar=True, **self.kw)
        return (*new, stats)


class _AOTStep:
    """A loaded AOTInductor package of :func:`_chain_diag_step`: ``(x, y, rows) -> (new rows, stats)``, called
    without ``torch.compile``'s guards or wrappers. The package was compiled for contiguous tensors of fixed shapes,
    dtype and device; the shapes, dtype and device are the caller's to check (:meth:`KBNNChain.lean_update` and
    :meth:`KalmanGuide.update` do), contiguity is made here."""

    def __init__(self, model: Any) -> None:
        self._run = model.loader.boxed_run  # the flat call under AOTICompiledModel.__call__ (no pytree round trip)

    def __deepcopy__(self, memo: dict) -> _AOTStep:
        return self  # compiled code, no state: a copied guide shares it

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rows: tuple[torch.Tensor, ...]) -> tuple[list, torch.Tensor]:
        out = self._run([t if t.is_contiguous() else t.contiguous() for t in (x, y, *rows)])
        return out[:-1], out[-1]


def _aot_step(kw: dict[str, Any], x: torch.Tensor, y: torch.Tensor, rows: tuple[torch.Tensor, ...]) -> _AOTStep:
    """The AOTInductor-compiled :func:`_chain_diag_step` for settings ``kw`` and example inputs (their shapes, dtype
    and device), compiled once per process and shared by guides of the same structure and settings."""
    configs = dict(AOT_INDUCTOR_CONFIGS)
    key = (tuple(sorted(kw.items())), repr(sorted(configs.items())), x.dtype, str(x.device), tuple(x.shape),
           tuple(y.shape), tuple(tuple(t.shape) for t in rows))  # fmt: skip
    if key not in _AOT_STEPS:
        import tempfile

        import torch._inductor

        args = (x, y, *(t.contiguous() for t in rows))
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            # torch.export and inductor's own deprecation notices (about their internals, not about this call)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.export(_StepModule(kw), args, strict=False)
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=f"{tmp}/step.pt2", inductor_configs=configs
            )
            _AOT_STEPS[key] = _AOTStep(torch._inductor.aoti_load_package(path))
    return _AOT_STEPS[key]


def _compile_arg(compile: Any) -> bool | str:  # noqa: A002
    if compile is not False and compile is not True and not isinstance(compile, str):
        raise ValueError(f"compile must be False, True or a torch.compile backend name, got {compile!r}")
    if isinstance(compile, str):
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if compile not in known:
            raise ValueError(f"compile={compile!r} is not a torch.compile backend; known: {known}")
    return compile


class KBNNTransformer(_CompileOption):
    """KBT: moment propagation through the transformer, every weight row's Kalman update from the statistical
    Jacobian of the observed outputs (:func:`~ppl_kbnn.kalman.weight_update`)."""

    key, beliefs, readout = "kbnn", (BlockBelief, DiagBelief), "moments"

    def propagator(self, beliefs: dict | None = None) -> Propagator:
        """A :class:`~ppl_kbnn.propagate.Propagator` over the guide's per-row belief (or ``beliefs``)."""
        g = self.guide
        w_kind = getattr(g.belief, "w_kind", "block") if beliefs is None else "block"
        return Propagator(g._net, g.beliefs() if beliefs is None else beliefs, mode=g.hidden, w_kind=w_kind,
                          observe=g.observe)  # fmt: skip

    def moments(self, x: Any, beliefs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form predictive moments of the observed outputs (no observation noise)."""
        prop = self.propagator(beliefs)
        with validation(False):
            out = prop.forward(x)
        var = torch.diagonal(full_cov(out, prop.kind), dim1=-2, dim2=-1).reshape(out.mean.shape)
        mean = out.mean  # (N, n_tok, d_out)
        return (mean[:, 0], var[:, 0]) if self.guide.observe == "last" else (mean, var)

    def _forward(self) -> Any:
        """``(means, covs, x) -> (E[y] (m,), Cov(y) (m, m))``: the propagation of :meth:`linearise` as a function of
        the rows (``torch.compile``d with its backward pass when the option is on)."""
        if self._compiled is None:
            g = self.guide
            modules = tuple(s.module for s in g.belief.layout.slots)
            f = _transformer_forward if self.compile is False else _fresh(_transformer_forward)
            fn = functools.partial(f, net=g._net, modules=modules, mode=g.hidden, w_kind=g.belief.w_kind,
                                   observe=g.observe)  # fmt: skip
            self._compiled = fn if self.compile is False else torch.compile(
                fn, backend="inductor" if self.compile is True else self.compile, dynamic=False)  # fmt: skip
        return self._compiled

    def linearise(self, x: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Forward moments and statistical Jacobians of one input (batch of 1): ``(mean (m,), cov (m, m), jacs)``,
        ``jacs[module] = ∂E[y]/∂μ_W`` ``(m, rows, p)``."""
        g = self.guide
        slots = g.belief.layout.slots
        # leaves that share the buffers' storage: nothing writes into a belief buffer (updates swap in new tensors)
        leaves = [g.belief.rows(s.index)[0].detach().requires_grad_(True) for s in slots]
        covs = [g.belief.rows(s.index)[1] for s in slots]
        with torch.enable_grad(), validation(False), warnings.catch_warnings():
            # torch.compile's tracer reads .grad of intermediate tensors, which warns; nothing here uses .grad
            warnings.filterwarnings("ignore", "The .grad attribute of a Tensor that is not a leaf", UserWarning)
            mu, S = self._forward()(leaves, covs, x)  # (m,), (m, m)
            m = mu.shape[0]
            if m == 1:  # the usual DT read-out; a plain backward pass (vmap costs +30-50% here: 24 vs 32-37 ms)
                grads = [None if gr is None else gr[None]
                         for gr in torch.autograd.grad(mu[0], leaves, allow_unused=True)]  # fmt: skip
            elif self.compile is not False:  # one backward pass per output through the compiled graph
                per = [torch.autograd.grad(mu[k], leaves, retain_graph=k < m - 1, allow_unused=True) for k in range(m)]
                grads = [None if per[0][j] is None else torch.stack([p[j] for p in per]) for j in range(len(leaves))]
            else:  # every output's gradient in one batched backward pass (vmap over the rows of I_m)
                grads = torch.autograd.grad(mu, leaves, grad_outputs=torch.eye(m, dtype=mu.dtype, device=mu.device),
                                            is_grads_batched=True, allow_unused=True)  # fmt: skip
        jacs = {
            s.module: torch.zeros(m, *leaf.shape, dtype=mu.dtype, device=mu.device) if gr is None else gr
            for s, leaf, gr in zip(slots, leaves, grads, strict=True)
        }  # (m, rows, p)
        return mu.detach(), S.detach(), jacs

    def step(self, x, y):
        g = self.guide
        mu, S, jacs = self.linearise(x)
        if g.guards.var_floor > 0:  # (with no floor this would rebuild S unchanged: (s - s) + s = s)
            var = g.guards.floor(torch.diagonal(S))
            S = S - torch.diag(torch.diagonal(S)) + torch.diag(var)
        resid = y.reshape(-1) - mu
        rho = observation(g, S, resid)  # noise variances (m,), None: skip
        if rho is None:
            return
        S = S + torch.diag(rho)  # + R
        S_inv = torch.linalg.inv(S)  # once for every layer
        g.belief.update_rows({s.index: weight_update(*g.belief.rows(s.index), jacs[s.module], S, resid,
                                                     g.belief.w_kind, S_inv=S_inv)
                              for s in g.belief.layout.slots})  # fmt: skip


# ------------------------------------------------------------------------------------------------- EKF / SLR


class _Linearised(Engine):
    """Shared by the whole-network engines: the Kalman step given ``(ŷ, c, Cov_f(y))``."""

    beliefs = (DiagBelief, BlockBelief, FullBelief, LowRankBelief)

    def _kalman(self, y: torch.Tensor, y_hat: torch.Tensor, c: torch.Tensor, P_y: torch.Tensor,
                J: torch.Tensor | None) -> None:  # fmt: skip
        g = self.guide
        P_y = 0.5 * (P_y + P_y.mT)
        var = torch.diagonal(P_y)
        if g.guards.var_floor > 0:
            P_y = P_y - torch.diag(var) + torch.diag(g.guards.floor(var))
        resid = y.reshape(-1) - y_hat
        rho = observation(g, P_y, resid)  # noise variances (m,), None: skip
        if rho is None:
            return
        R = torch.diag(rho)
        g.belief.condition(c, P_y + R, resid, R=R, J=J)


class EKF(_Linearised):
    """Extended Kalman filter over all Bayesian weights (module docstring)."""

    key, readout = "ekf", "linearised"

    def step(self, x, y):
        g = self.guide
        y_hat, J = g.network.jacobian(g.belief.mean, x)  # (*y), (m, D)
        y_hat = y_hat.reshape(-1)  # (m,)
        c = g.belief.cov_jac(J)  # (D, m)
        self._kalman(y, y_hat, c, J @ c, J)


class SLR(_Linearised):
    """Statistical linear regression from ``draws`` weight draws (module docstring)."""

    key, readout = "slr", "sampled"
    DEFAULT_DRAWS: ClassVar[int] = 1000

    def __init__(self, guide: KalmanGuide, *, draws: int | None = None, seed: int = 0) -> None:
        super().__init__(guide)
        self.draws = self.DEFAULT_DRAWS if draws is None else draws
        if isinstance(self.draws, bool) or not isinstance(self.draws, int) or self.draws < 2 or self.draws % 2:
            raise ValueError(f"draws must be an even integer >= 2 (antithetic pairs), got {draws!r}")
        self.seed = int(seed)

    @classmethod
    def options(cls) -> set[str]:
        return {"draws", "seed"}

    def step(self, x, y):
        g = self.guide
        gen = torch.Generator(device=g.belief.mean.device).manual_seed(_seed(self.seed, g.n_updates + g._in_batch))
        thetas, z = g.belief.draws_and_normals(self.draws, gen)  # (L, D), (L, k): θ_s = μ + G z_s
        f = g.network.batched(thetas, x).reshape(self.draws, -1)  # (L, m)
        y_hat = f.mean(0)  # antithetic pairs: the draws' mean is exactly μ
        fc = f - y_hat
        c = (thetas - g.belief.mean).mT @ fc / (self.draws - 1)  # Cov(θ, y) = G B: (D, m)
        B = z.mT @ fc / (self.draws - 1)  # Stein: E[z f] = Gᵀ E[∇f]ᵀ, (k, m)
        P_y = fc.mT @ fc / (self.draws - 1)  # Cov(y) (m, m)
        # Cov(y) = BᵀB + Ω (the linear part and the regression's residual); with few draws the estimate of Ω can come
        # out negative, which would let the step remove more variance than the belief has: keep its PSD part.
        lin = B.mT @ B
        evals, evecs = torch.linalg.eigh(0.5 * (P_y - lin + (P_y - lin).mT))
        self._kalman(y, y_hat, c, lin + (evecs * evals.clamp_min(0)) @ evecs.mT, None)


def _filter_full(mean: torch.Tensor, cov: torch.Tensor, y: torch.Tensor, rho: torch.Tensor) -> tuple:
    """Output filter step with full covariance ``(..., d, d)`` and noise ``diag(rho)``."""
    S = cov + torch.diag(rho)
    K = torch.linalg.solve(S, cov).mT  # P S⁻¹ (S, P symmetric)
    new_cov = cov - K @ cov
    return mean + (K @ (y - mean)[..., None])[..., 0], 0.5 * (new_cov + new_cov.mT)


def _seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def antithetic_draws(belief: Belief, n: int, seed: int, step: int) -> torch.Tensor:
    """``n`` draws ``(n, D)`` in antithetic pairs ``μ ± δ`` from a generator seeded by ``(seed, step)``."""
    gen = torch.Generator(device=belief.mean.device).manual_seed(_seed(seed, step))
    return belief.sample(n, gen, antithetic=True)


ENGINES: dict[str, tuple[type[Engine], type[Engine]]] = {
    "kbnn": (KBNNChain, KBNNTransformer),
    "ekf": (EKF, EKF),
    "slr": (SLR, SLR),
}
"""``update=`` key -> (engine for chains, engine for transformers)."""
