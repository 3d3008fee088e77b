"""``KalmanGuide``: the closed-form Kalman guide of a :class:`~ppl_kbnn.model.BayesianModel`.

The guide holds a Gaussian belief over the Bayesian weights of every linear layer — one full
``(d_in+1) × (d_in+1)`` covariance block per output neuron over ``[W_n, b_n]`` (KBNN, ``"block"``)
or a diagonal (``"diag"``) — initialised to the model's prior, and updates it one sample at a time
in closed form (:meth:`KalmanGuide.update`): a forward moment pass (:mod:`ppl_kbnn.moments`), a
Kalman filter step at the output, and KBNN smoothing steps back through the network
(:mod:`ppl_kbnn.kalman`). No gradients, no learning rate.

As a Pyro guide it samples every Bayesian site of the model from the belief, so
``Predictive(model, guide=guide)`` and ELBO evaluation work unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn.module import PyroModule
from torch import nn

from . import __version__
from .kalman import (
    Guards,
    filter_step,
    filter_step_full,
    smooth_activation,
    smooth_activation_full,
    smooth_linear,
    smooth_linear_full,
    weight_update,
)
from .model import BayesianModel
from .moments import activation_moments, linear_moments, validation
from .moments._checks import check_tensor
from .propagate import MODES, Propagator, full_cov

__all__ = ["KalmanGuide"]

_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu",
    nn.GELU: "gelu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Identity: "identity",
}


@dataclass(frozen=True)
class _Linear:
    """A linear layer of the network and where its belief lives."""

    module: str  # module name inside model.net ("0", "2", ...)
    index: int  # belief buffers: mean_{index}, cov_{index}
    d_in: int
    d_out: int
    bias: bool
    weight_site: str | None  # Bayesian site names (None: fixed)
    bias_site: str | None


@dataclass(frozen=True)
class _Activation:
    module: str
    activation: str


def _is_transformer(net: nn.Module) -> bool:
    from .nn import DecisionTransformer, Transformer

    return isinstance(net, Transformer | DecisionTransformer)


def _linear_node(model: BayesianModel, name: str, mod: nn.Linear, index: int) -> _Linear:
    full = f"net.{name}" if name else "net"
    w, b = f"{full}.weight", f"{full}.bias"
    has_bias = b in model.priors or "bias" in mod._buffers and mod._buffers["bias"] is not None
    return _Linear(name, index, mod.in_features, mod.out_features, has_bias,
                   w if w in model.priors else None, b if b in model.priors else None)  # fmt: skip


def _parse_transformer(model: BayesianModel) -> list[_Linear]:
    """The Bayesian linear maps of a transformer, in module order; a Bayesian parameter of any
    other module (LayerNorm, Embedding) is rejected by name."""
    nodes: list[_Linear] = []
    covered: set[str] = set()
    for name, mod in model.net.named_modules():
        if isinstance(mod, nn.Linear):
            node = _linear_node(model, name, mod, len(nodes))
            if node.weight_site or node.bias_site:
                nodes.append(node)
                covered.update(s for s in (node.weight_site, node.bias_site) if s)
    other = [site for site in model.priors if site not in covered]
    if other:
        raise ValueError(
            f"unsupported Bayesian parameter(s) {other}: KalmanGuide updates Linear weights only "
            "(LayerNorm gains and embeddings must stay fixed)"
        )
    return nodes


def _parse(model: BayesianModel) -> list[_Linear | _Activation]:
    """The network as a chain of nodes; anything unsupported is rejected by name."""
    net = model.net
    if _is_transformer(net):
        return _parse_transformer(model)
    children = list(net.named_children()) if isinstance(net, nn.Sequential) else [("", net)]
    nodes: list[_Linear | _Activation] = []
    n_linear = 0
    for name, mod in children:
        full = f"net.{name}" if name else "net"
        if isinstance(mod, nn.Linear):
            nodes.append(_linear_node(model, name, mod, n_linear))
            n_linear += 1
        elif (kind := next((v for t, v in _ACTIVATIONS.items() if isinstance(mod, t)), None)) is not None:
            if kind == "gelu" and getattr(mod, "approximate", "none") != "none":
                raise ValueError(f"unsupported module {full!r}: GELU(approximate={mod.approximate!r}); use exact GELU")
            nodes.append(_Activation(name, kind))
        else:
            torch_cls = next(c for c in type(mod).__mro__ if not issubclass(c, PyroModule))  # not PyroDropout
            raise ValueError(
                f"unsupported module {full!r} ({torch_cls.__name__}); KalmanGuide supports nn.Sequential of "
                "Linear, ReLU, GELU, Tanh, Sigmoid, Identity"
            )
    if not any(isinstance(n, _Linear) for n in nodes):
        raise ValueError("the network has no Linear layer")
    return nodes


def _take(x, i: int):
    """Sample ``i`` of a batch (a tensor or a dict of tensors), keeping a batch dim of 1."""
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


class KalmanGuide(PyroModule):
    """Closed-form Kalman guide (KBNN) for a :class:`~ppl_kbnn.model.BayesianModel`.

    Args:
        model: the Pyro model. Its network is an ``nn.Sequential`` of ``Linear``, ``ReLU``, ``GELU``,
            ``Tanh``, ``Sigmoid``, ``Identity`` (or a single ``Linear``): the KBNN chain; or a
            :class:`~ppl_kbnn.nn.Transformer` / :class:`~ppl_kbnn.nn.DecisionTransformer`: the KBT.
        covariance: ``"block"`` (per-neuron full covariance over ``[W_n, b_n]``) or ``"diag"``.
        hidden: hidden-state covariance of the forward and backward passes. Chains: ``"diag"`` (KBNN:
            scalar gains, neurons summed as independent) or ``"full"`` (full covariance within a
            sample: Wright-series activation covariances forward, vector RTS steps backward).
            Transformers: ``"diag"``, ``"token"``, ``"feature"`` or ``"joint"``
            (:mod:`ppl_kbnn.propagate`); the backward pass is the statistical gradient of the
            propagated mean (KBNN smoothing in closed form, docs/kbt.md).
        process_noise: variance ``q`` added to every Bayesian weight's variance before each
            sample's update (random-walk drift, ``θ_t = θ_{t-1} + N(0, qI)``); default 0 (static).
        var_floor, jitter, gain_clip, psd_repair: numerical guards (see :mod:`ppl_kbnn.kalman.guards`);
            each firing is counted in :attr:`guard_counts`.

    The belief of linear layer ``l`` is in the buffers ``mean_l`` ``(d_out, p)`` and ``cov_l``
    (``(d_out, p, p)`` or ``(d_out, p)``), ``p = d_in + 1`` with the bias last (``d_in`` without a
    bias). Fixed (non-Bayesian) entries have zero variance and never move.
    """

    def __init__(
        self,
        model: BayesianModel,
        covariance: str = "block",
        *,
        hidden: str = "diag",
        process_noise: float = 0.0,
        var_floor: float = 0.0,
        jitter: float = 0.0,
        gain_clip: float | None = None,
        psd_repair: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, BayesianModel):
            raise ValueError(f"model must be a ppl_kbnn.BayesianModel, got {type(model).__name__}")
        if covariance not in ("block", "diag"):
            raise ValueError(f"covariance must be 'block' or 'diag', got {covariance!r}")
        if process_noise < 0:
            raise ValueError(f"process_noise must be >= 0, got {process_noise}")
        self.transformer = _is_transformer(model.net)
        if self.transformer:
            if hidden not in MODES:
                raise ValueError(f"hidden must be one of {MODES} for a transformer, got {hidden!r}")
            if gain_clip is not None:
                raise ValueError("gain_clip applies to KBNN chains only (a transformer's gains are computed jointly)")
        else:
            if hidden not in ("diag", "full"):
                raise ValueError(f"hidden must be 'diag' or 'full', got {hidden!r}")
            if hidden == "full" and gain_clip is not None:
                raise ValueError("gain_clip is only available with hidden='diag' (the full RTS gains are matrices)")
        self.covariance = covariance
        self.hidden = hidden
        self._kind = "diag" if hidden == "diag" else "token"
        self.obs_noise = model.obs_noise
        self.observe = model.observe
        self.__dict__["_net"] = model.net  # structure and fixed weights (transformers); not a submodule
        self.process_noise = float(process_noise)
        self.guards = Guards(var_floor=var_floor, jitter=jitter, gain_clip=gain_clip, psd_repair=psd_repair)
        self.nodes = _parse(model)
        self.n_updates = 0
        self.update_seconds = 0.0
        for node in self._linears:
            mean, var, mask = self._prior(model, node)
            cov = torch.diag_embed(var) if covariance == "block" else var
            self.register_buffer(f"mean_{node.index}", mean)
            self.register_buffer(f"cov_{node.index}", cov)
            self.register_buffer(f"mask_{node.index}", mask)
        self.dtype = self.mean_0.dtype

    # ------------------------------------------------------------------ structure

    @property
    def _linears(self) -> list[_Linear]:
        return [n for n in self.nodes if isinstance(n, _Linear)]

    @staticmethod
    def _prior(model: BayesianModel, node: _Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prior mean ``(n, p)``, variance ``(n, p)`` and Bayesian mask ``(n, p)`` of a layer."""
        module = model.net.get_submodule(node.module) if node.module else model.net
        parts_m, parts_v = [], []
        parts = [(node.weight_site, "weight", (node.d_out, node.d_in))]
        if node.bias:
            parts.append((node.bias_site, "bias", (node.d_out, 1)))
        for site, par, shape in parts:
            if site is not None:
                loc, scale = model.priors[site]
                parts_m.append(loc.reshape(shape))
                parts_v.append((scale * scale).reshape(shape))
            else:
                fixed = module._buffers[par]
                parts_m.append(fixed.reshape(shape))
                parts_v.append(torch.zeros_like(fixed).reshape(shape))
        mean, var = torch.cat(parts_m, -1).clone(), torch.cat(parts_v, -1).clone()
        return mean, var, var > 0

    def _belief(self, node: _Linear) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"mean_{node.index}"), getattr(self, f"cov_{node.index}")

    def beliefs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{linear_module_name: (mean (rows, p), cov)}``: the belief of every Bayesian linear map
        (bias last in ``p``; ``cov`` ``(rows, p, p)`` for ``"block"``, ``(rows, p)`` for ``"diag"``)."""
        return {node.module: self._belief(node) for node in self._linears}

    @torch.no_grad()
    def load_beliefs(self, other: KalmanGuide) -> KalmanGuide:
        """Copy the belief of ``other`` (a guide of the same network and ``covariance``; its ``hidden``
        mode may differ), e.g. to evaluate one belief under several hidden-state modes."""
        if other.covariance != self.covariance or [n for n in other.nodes] != [n for n in self.nodes]:
            raise ValueError("load_beliefs: the other guide has a different structure or covariance kind")
        for node in self._linears:
            for name in (f"mean_{node.index}", f"cov_{node.index}"):
                getattr(self, name).copy_(getattr(other, name))
        return self

    @property
    def belief_bytes(self) -> int:
        """Bytes held by the belief (means and covariances) beyond the pre-trained weights."""
        return sum(t.numel() * t.element_size() for node in self._linears for t in self._belief(node))

    @property
    def guard_counts(self) -> dict[str, int]:
        """How often each numerical guard fired since construction."""
        return dict(self.guards.counts)

    # ------------------------------------------------------------------ forward moments

    def _forward_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Moments of the network output for inputs ``x`` ``(..., T, d_in)``; the cache holds, per node,
        ``(node, input covariance, output moments)`` for the backward pass."""
        mean, cov = x, None
        cache = []
        with validation(False):
            for node in self.nodes:
                if isinstance(node, _Linear):
                    w_mean, w_cov = self._belief(node)
                    out = linear_moments(mean, cov, w_mean, w_cov, kind=self._kind, w_kind=self.covariance)
                else:
                    out = activation_moments(mean, cov, activation=node.activation, kind=self._kind)
                cache.append((node, cov, out))
                mean, cov = out.mean, out.cov
        return mean, cov, cache

    # ------------------------------------------------------------------ inputs

    def _check_seq_x(self, x) -> tuple[torch.Tensor | dict, int]:
        """A transformer input: ``(N, T, d_in)``, or for a decision transformer a dict of ``(N, K, ...)``."""
        from collections.abc import Mapping

        items = x.items() if isinstance(x, Mapping) else [("x", x)]
        if not isinstance(x, Mapping) and not isinstance(x, torch.Tensor):
            raise ValueError(f"x: expected a tensor (N, T, d_in) or a dict of tensors, got {type(x).__name__}")
        n = None
        for name, t in items:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
            if t.is_floating_point():
                check_tensor(name, t)  # finite
            if t.is_floating_point() and t.dtype != self.dtype:
                raise ValueError(f"{name}: dtype {t.dtype} does not match the belief's {self.dtype}")
            if t.dim() < 2:
                raise ValueError(f"{name}: expected a batch of sequences (N, T, ...), got shape {tuple(t.shape)}")
            if n is not None and t.shape[0] != n:
                raise ValueError(f"{name}: batch size {t.shape[0]} differs from the other inputs' {n}")
            n = t.shape[0]
        if not isinstance(x, Mapping):
            d_in = self._net.config.d_in
            if x.dim() != 3 or x.shape[-1] != d_in:
                raise ValueError(f"x: expected shape (N, T, {d_in}), got {tuple(x.shape)}")
        return x, n

    def _check_seq_y(self, y: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
        check_tensor("y", y)
        if y.dtype != self.dtype:
            raise ValueError(f"y: dtype {y.dtype} does not match the belief's {self.dtype}")
        if y.shape != out_shape and y.dim() == len(out_shape) - 1 and out_shape[-1] == 1:
            y = y[..., None]  # one-output network: trailing dim may be omitted
        if y.shape != out_shape:
            raise ValueError(f"y: expected shape {out_shape} (the observed outputs, observe={self.observe!r}), "
                             f"got {tuple(y.shape)}")  # fmt: skip
        return y

    def _propagator(self) -> Propagator:
        return Propagator(self._net, self.beliefs(), mode=self.hidden, w_kind=self.covariance, observe=self.observe)

    def _out_shape(self, x, n: int) -> tuple[int, ...]:
        d_out = self._net.config.d_out if hasattr(self._net.config, "d_out") else self._net.config.act_dim
        if self.observe == "last":
            return (n, d_out)
        T = x["states"].shape[1] if isinstance(x, dict) else x.shape[1]
        return (n, T, d_out)

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        d_in = self._linears[0].d_in
        check_tensor("x", x)
        if x.dtype != self.dtype:
            raise ValueError(f"x: dtype {x.dtype} does not match the belief's {self.dtype}")
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[-1] != d_in:
            raise ValueError(f"x: expected shape (N, {d_in}) or ({d_in},), got {tuple(x.shape)}")
        return x

    def _check_y(self, y: torch.Tensor, n: int) -> torch.Tensor:
        d_out = self._linears[-1].d_out
        check_tensor("y", y)
        if y.dtype != self.dtype:
            raise ValueError(f"y: dtype {y.dtype} does not match the belief's {self.dtype}")
        if y.dim() == 1 and d_out == 1 and y.shape[0] == n:
            y = y[:, None]  # (N,) targets of a one-output network
        elif y.dim() == 1 and n == 1 and y.shape[0] == d_out:
            y = y[None]  # one sample given without its batch dim
        if y.shape != (n, d_out):
            raise ValueError(f"y: expected shape ({n}, {d_out}) for {n} input(s), got {tuple(y.shape)}")
        return y

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def predict(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form predictive ``(mean, var)`` of ``y`` at inputs ``x`` ``(N, d_in)``, each ``(N, d_out)``.

        Transformers: ``x`` ``(N, T, d_in)`` (decision transformer: a dict of ``(N, K, ...)`` tensors);
        outputs ``(N, d_out)`` for ``observe="last"``, ``(N, T, d_out)`` for ``"all"``. ``var`` (the
        marginal variances) includes the observation noise ``obs_noise²``.
        """
        if self.transformer:
            x, n = self._check_seq_x(x)
            with validation(False):
                out = self._propagator().forward(x)
            var = torch.diagonal(full_cov(out, self._propagator().kind), dim1=-2, dim2=-1).reshape(out.mean.shape)
            mean, var = out.mean, var + self.obs_noise**2  # (N, n_tok, d_out)
            return (mean[:, 0], var[:, 0]) if self.observe == "last" else (mean, var)
        x = self._check_x(x)
        mean, cov, _ = self._forward_moments(x[:, None, :])  # each input a one-token sequence
        var = cov if self.hidden == "diag" else torch.diagonal(cov, dim1=-2, dim2=-1)
        return mean[:, 0], var[:, 0] + self.obs_noise**2

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> KalmanGuide:
        """Sequential closed-form update with the samples ``(x_i, y_i)``, in order.

        Raises ``ValueError`` for bad input (shape, dtype, NaN/inf) and ``FloatingPointError`` if an
        update produces a non-finite belief; in both cases the belief is left exactly as it was.
        """
        if self.transformer:
            x, n = self._check_seq_x(x)
            y = self._check_seq_y(y, self._out_shape(x, n))
        else:
            x = self._check_x(x)
            y = self._check_y(y, x.shape[0])
            n = x.shape[0]
        snapshot = {k: v.clone() for k, v in self._buffers.items()}
        counts = self.guards.counts.copy()
        t0 = time.perf_counter()
        try:
            for i in range(n):  # samples are sequential by nature
                if self.transformer:
                    self._update_transformer(_take(x, i), y[i])
                else:
                    self._update_one(x[i], y[i])
        except Exception:
            for k, v in snapshot.items():
                self._buffers[k].copy_(v)
            self.guards.counts = counts
            raise
        self.n_updates += n
        self.update_seconds += time.perf_counter() - t0
        return self

    def _add_process_noise(self) -> None:
        if self.process_noise > 0:
            for node in self._linears:
                _, cov = self._belief(node)
                q = self.process_noise * getattr(self, f"mask_{node.index}").to(cov.dtype)
                cov += torch.diag_embed(q) if self.covariance == "block" else q

    def linearise(self, x) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Forward moments and statistical Jacobians of one transformer input (batch of 1).

        Returns ``(mean (m,), cov (m, m), jacs)``: the predictive mean and covariance of the ``m``
        observed outputs *without* observation noise, and ``jacs[module] = ∂E[y]/∂μ_W`` ``(m, rows, p)``
        for every Bayesian linear map (the statistical Jacobian: covariances held fixed, see
        :mod:`ppl_kbnn.propagate`). ``Cov(w_n, y) = C_n jacs[module][:, n]ᵀ``.
        """
        if not self.transformer:
            raise ValueError("linearise is available for transformer models")
        x, n = self._check_seq_x(x)
        if n != 1:
            raise ValueError(f"linearise takes one input (batch of 1), got {n}")
        nodes = self._linears
        leaves = {node.module: self._belief(node)[0].detach().clone().requires_grad_(True) for node in nodes}
        beliefs = {node.module: (leaves[node.module], self._belief(node)[1]) for node in nodes}
        prop = Propagator(self._net, beliefs, mode=self.hidden, w_kind=self.covariance, observe=self.observe)
        with torch.enable_grad(), validation(False):
            out = prop.forward(x)  # mean (1, n_tok, d_out)
            mu = out.mean.reshape(-1)  # (m,)
            m = mu.shape[0]
            if m == 1:  # the usual DT read-out; a plain backward pass (vmap costs +30-50% here: 24 vs 32-37 ms)
                grads = [None if g is None else g[None]
                         for g in torch.autograd.grad(mu[0], list(leaves.values()), allow_unused=True)]  # fmt: skip
            else:  # every output's gradient in one batched backward pass (vmap over the rows of I_m)
                grads = torch.autograd.grad(mu, list(leaves.values()), grad_outputs=torch.eye(m, dtype=mu.dtype),
                                            is_grads_batched=True, allow_unused=True)  # fmt: skip
        jacs = {
            node.module: torch.zeros(m, *leaves[node.module].shape, dtype=mu.dtype) if g is None else g
            for node, g in zip(nodes, grads, strict=True)
        }  # (m, rows, p)
        return mu.detach(), full_cov(out, prop.kind)[0], jacs

    def _update_transformer(self, x, y: torch.Tensor) -> None:
        """One sample: forward moments, then every weight row's Kalman update from the statistical
        Jacobian of the observed outputs (:func:`~ppl_kbnn.kalman.weight_update`)."""
        self._add_process_noise()
        mu, S, jacs = self.linearise(x)
        var = torch.diagonal(S)
        if self.guards.var_floor > 0:
            var = self.guards.floor(var)
        S = S - torch.diag(torch.diagonal(S)) + torch.diag(var + self.obs_noise**2)  # + R
        resid = y.reshape(-1) - mu
        S_inv = torch.linalg.inv(S)  # once for every layer
        new = {node.index: weight_update(*self._belief(node), jacs[node.module], S, resid, self.covariance,
                                         S_inv=S_inv) for node in self._linears}  # fmt: skip
        for index, (mean, cov) in new.items():
            self._commit(index, mean, cov)

    def _update_one(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._add_process_noise()
        if self.hidden == "full":
            new = self._backward_full(x, y)
        else:
            new = self._backward_diag(x, y)
        for index, (m, c) in new.items():
            self._commit(index, m, c)

    def _backward_diag(self, x: torch.Tensor, y: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """KBNN: filter at the output, then smoothing I/II with diagonal hidden states."""
        mean, var, cache = self._forward_moments(x[None, :])  # (1, d_out)
        filt_mean, filt_var = filter_step(mean, var, y[None, :], self.obs_noise**2)
        d_mean, d_var = filt_mean - mean, filt_var - var
        new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for node, in_var, out in reversed(cache):
            if isinstance(node, _Activation):
                d_mean, d_var_in = smooth_activation(d_mean, d_var, out.cov, out.cross, self.guards)
            else:
                dmw, dcw, d_mean, d_var_in = smooth_linear(
                    d_mean, d_var, out.cov, out.w_cross, out.cross, self.guards, w_kind=self.covariance
                )
                w_mean, w_cov = self._belief(node)
                new[node.index] = (w_mean + dmw, w_cov + dcw)
                if d_mean is None:  # the network input: nothing further back
                    break
            d_var = self.guards.floor(in_var + d_var_in) - in_var
        return new

    def _backward_full(self, x: torch.Tensor, y: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Filter at the output, then vector RTS steps with full within-sample hidden covariances."""
        mean, cov, cache = self._forward_moments(x[None, :])  # (1, d_out), (1, d_out, d_out)
        filt_mean, filt_cov = filter_step_full(mean, cov, y[None, :], self.obs_noise**2)
        d_mean, d_cov = filt_mean - mean, filt_cov - cov
        new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for node, _in_cov, out in reversed(cache):
            if isinstance(node, _Activation):
                d_mean, d_cov = smooth_activation_full(d_mean, d_cov, out.cov, out.cross)
            else:
                dmw, dcw, d_mean, d_cov = smooth_linear_full(
                    d_mean, d_cov, out.cov, out.w_cross, out.cross, w_kind=self.covariance
                )
                w_mean, w_cov = self._belief(node)
                new[node.index] = (w_mean + dmw, w_cov + dcw)
                if d_mean is None:
                    break
        return new

    def _commit(self, index: int, mean: torch.Tensor, cov: torch.Tensor) -> None:
        if self.covariance == "block":
            cov = 0.5 * (cov + cov.mT)
            if self.guards.jitter > 0:
                self.guards.counts["jitter"] += 1
                mask = getattr(self, f"mask_{index}").to(cov.dtype)
                cov = cov + torch.diag_embed(self.guards.jitter * mask)
            if self.guards.psd_repair:
                evals, evecs = torch.linalg.eigh(cov)
                bad = (evals < 0).any(-1)
                if bad.any():
                    self.guards.counts["psd_repair"] += int(bad.sum())
                    fixed = (evecs * evals.clamp_min(0)[..., None, :]) @ evecs.mT
                    cov = torch.where(bad[:, None, None], fixed, cov)
        else:
            if self.guards.jitter > 0:
                self.guards.counts["jitter"] += 1
                cov = cov + self.guards.jitter * getattr(self, f"mask_{index}").to(cov.dtype)
            if self.guards.psd_repair and (cov < 0).any():
                self.guards.counts["psd_repair"] += int((cov < 0).sum())
                cov = cov.clamp_min(0)
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise FloatingPointError(f"the update of linear layer {index} produced a non-finite belief")
        getattr(self, f"mean_{index}").copy_(mean)
        getattr(self, f"cov_{index}").copy_(cov)

    def posterior(self) -> dict[str, dist.Distribution]:
        """The belief as torch distributions, one per Bayesian site (marginal over the site).

        ``"block"``: weight rows are ``MultivariateNormal`` (batch ``d_out``, event ``d_in``) — the
        joint over ``[W_n, b_n]`` is in the buffers; ``"diag"``: independent ``Normal``. Event shapes
        equal the site shapes.
        """
        out: dict[str, dist.Distribution] = {}
        for node in self._linears:
            mean, cov = self._belief(node)
            d = node.d_in
            if node.weight_site is not None:
                if self.covariance == "block":
                    out[node.weight_site] = dist.MultivariateNormal(mean[:, :d], cov[:, :d, :d]).to_event(1)
                else:
                    out[node.weight_site] = dist.Normal(mean[:, :d], cov[:, :d].sqrt()).to_event(2)
            if node.bias_site is not None:
                var = cov[:, d, d] if self.covariance == "block" else cov[:, d]
                out[node.bias_site] = dist.Normal(mean[:, d], var.sqrt()).to_event(1)
        return out

    def forward(self, *args, **kwargs) -> None:
        """Pyro guide: sample every Bayesian site of the model from the belief (the joint, exactly).

        ``"block"``: with the Cholesky factor ``L`` of the ``[W_n, b_n]`` block, ``W_n ~ N(μ_w, L_ww L_wwᵀ)``
        and ``b_n | W_n ~ N(μ_b + L_bw L_ww⁻¹ (W_n - μ_w), L_bb²)``, which is the joint Gaussian.
        """
        for node in self._linears:
            mean, cov = self._belief(node)
            d = node.d_in
            if self.covariance == "diag":
                if node.weight_site is not None:
                    pyro.sample(node.weight_site, dist.Normal(mean[:, :d], cov[:, :d].sqrt()).to_event(2))
                if node.bias_site is not None:
                    pyro.sample(node.bias_site, dist.Normal(mean[:, d], cov[:, d].sqrt()).to_event(1))
                continue
            idx = getattr(self, f"mask_{node.index}").any(0).nonzero().squeeze(-1)  # Bayesian entries
            L, info = torch.linalg.cholesky_ex(cov[:, idx][:, :, idx])
            if (info != 0).any():
                raise ValueError(f"belief of layer {node.module!r} is not positive definite; cannot sample")
            nw = d if node.weight_site is not None else 0
            if node.weight_site is not None:
                w = pyro.sample(node.weight_site, dist.MultivariateNormal(mean[:, :d], scale_tril=L[:, :nw, :nw])
                                .to_event(1))  # fmt: skip
            if node.bias_site is not None:
                loc = mean[:, d]
                if nw:
                    z = torch.linalg.solve_triangular(L[:, :nw, :nw], (w - mean[:, :d])[..., None], upper=False)
                    loc = loc + (L[:, nw, :nw] * z[..., 0]).sum(-1)
                pyro.sample(node.bias_site, dist.Normal(loc, L[:, -1, -1]).to_event(1))

    # ------------------------------------------------------------------ state

    def _signature(self) -> dict:
        return {
            "covariance": self.covariance,
            "hidden": self.hidden,
            "obs_noise": self.obs_noise,
            "nodes": [
                (n.module, "linear", n.d_in, n.d_out, n.bias, n.weight_site, n.bias_site)
                if isinstance(n, _Linear)
                else (n.module, n.activation)
                for n in self.nodes
            ],  # fmt: skip
        }

    def get_extra_state(self) -> dict:
        return {
            "version": __version__,
            "signature": self._signature(),
            "process_noise": self.process_noise,
            "guards": self.guards.settings(),
            "guard_counts": dict(self.guards.counts),
            "n_updates": self.n_updates,
            "update_seconds": self.update_seconds,
        }

    def set_extra_state(self, state: dict) -> None:
        self.n_updates = int(state.get("n_updates", 0))
        self.update_seconds = float(state.get("update_seconds", 0.0))
        self.guards.counts.clear()
        self.guards.counts.update(state.get("guard_counts", {}))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a belief saved by :meth:`state_dict`; a different structure raises ``ValueError``."""
        extra = state_dict.get("_extra_state")
        if not isinstance(extra, dict) or "signature" not in extra:
            raise ValueError("not a KalmanGuide state dict (no '_extra_state' with a structure signature)")
        mine, theirs = self._signature(), extra["signature"]
        theirs = {**theirs, "nodes": [tuple(n) for n in theirs["nodes"]]}
        if mine != theirs:
            diffs = [k for k in mine if mine[k] != theirs.get(k)]
            raise ValueError(
                f"state dict was saved from a different model/guide (differs in {', '.join(diffs)}): "
                f"saved {theirs}, this guide {mine}"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
