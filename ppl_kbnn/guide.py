"""``KalmanGuide``: the closed-form Kalman guide of a :class:`~ppl_kbnn.model.BayesianModel`.

The guide is the Pyro face of three pieces:

* a **belief** over the Bayesian weights (:mod:`ppl_kbnn.beliefs`, ``covariance=``): ``"block"`` (one full
  covariance per output neuron over ``[W_n, b_n]``, KBNN), ``"diag"``, ``"full"`` (one dense covariance
  over every Bayesian weight) or ``"lowrank"`` (diagonal plus rank-``r`` precision), initialised to the
  model's prior;
* an **update rule** (:mod:`ppl_kbnn.engines`, ``update=``): ``"kbnn"`` (the paper's: moment propagation
  forward, Kalman smoothing backward), ``"ekf"`` (the whole network linearised at the belief mean) or
  ``"slr"`` (statistical linear regression from weight draws), one sample at a time, in closed form;
* the matching **read-out** for :meth:`KalmanGuide.predict`.

As a Pyro guide it samples every Bayesian site of the model from the belief, so
``Predictive(model, guide=guide)`` and ELBO evaluation work unchanged.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn.module import PyroModule
from torch import nn

from . import __version__
from ._args import real_arg
from ._threads import warn_if_oversubscribed
from .beliefs import BELIEFS, Belief, Layout, LinearSlot
from .engines import ENGINES, READOUTS, SLR, KBNNChain, KBNNTransformer, NetworkFunction, antithetic_draws
from .hyper import (
    NOISE_MODES,
    NOISE_RULES,
    OUTLIERS,
    PRIOR_DISCOUNT,
    PRIOR_GRID,
    NoiseBelief,
    OutlierWarning,
    default_threshold,
)
from .kalman import Guards
from .model import BayesianModel
from .moments._checks import check_tensor
from .nn import DecisionTransformer, Transformer
from .propagate import MODES

__all__ = ["KalmanGuide"]

_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu",
    nn.GELU: "gelu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Identity: "identity",
}


_Linear = LinearSlot  # a linear layer of the network and where its belief lives


@dataclass(frozen=True)
class _Activation:
    module: str
    activation: str


def _is_transformer(net: nn.Module) -> bool:
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
    prev: tuple[str, int] | None = None  # (module, out_features) of the previous Linear
    for name, mod in children:
        full = f"net.{name}" if name else "net"
        if isinstance(mod, nn.Linear):
            if prev is not None and mod.in_features != prev[1]:
                raise ValueError(
                    f"the Linear layers do not chain: {full!r} expects {mod.in_features} input features but the "
                    f"previous Linear {prev[0]!r} gives {prev[1]}"
                )
            nodes.append(_linear_node(model, name, mod, n_linear))
            n_linear += 1
            prev = (full, mod.out_features)
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


def _no_grad(f: Callable) -> Callable:
    """``@torch.no_grad()`` for :meth:`KalmanGuide.update` with less Python per call (it runs once per sample: the
    context manager's objects cost a few microseconds, a fifth of a compiled chain update's Python)."""

    @functools.wraps(f)
    def call(*args, **kwargs):
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return f(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(prev)

    return call


def _take(x, i: int):
    """Sample ``i`` of a batch (a tensor or a dict of tensors), keeping a batch dim of 1."""
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


class KalmanGuide(PyroModule):
    """Closed-form Kalman guide for a :class:`~ppl_kbnn.model.BayesianModel`.

    Args:
        model: the Pyro model. Its network is an ``nn.Sequential`` of ``Linear``, ``ReLU``, ``GELU``,
            ``Tanh``, ``Sigmoid``, ``Identity`` (or a single ``Linear``): the KBNN chain; or a
            :class:`~ppl_kbnn.nn.Transformer` / :class:`~ppl_kbnn.nn.DecisionTransformer`: the KBT.
        covariance: the belief structure (:data:`ppl_kbnn.beliefs.BELIEFS`): ``"block"`` (per-neuron full
            covariance over ``[W_n, b_n]``), ``"diag"``, ``"full"`` (dense over all Bayesian weights) or
            ``"lowrank"`` (diagonal + rank-``rank`` precision).
        update: the update rule (:data:`ppl_kbnn.engines.ENGINES`): ``"kbnn"`` (the paper's; ``"block"`` and
            ``"diag"`` only), ``"ekf"`` or ``"slr"`` (every structure).
        hidden: hidden-state covariance of the ``"kbnn"`` forward and backward passes. Chains: ``"diag"``
            (KBNN: scalar gains, neurons summed as independent) or ``"full"`` (full covariance within a
            sample: Wright-series activation covariances forward, vector RTS steps backward).
            Transformers: ``"diag"``, ``"token"``, ``"feature"`` or ``"joint"`` (:mod:`ppl_kbnn.propagate`);
            the backward pass is the statistical gradient of the propagated mean (docs/kbt.md). Also used by
            ``predict(method="moments")``.
        rank: rank of the ``"lowrank"`` precision factor (default 10).
        truncation: how ``"lowrank"`` truncates its precision factor back to ``rank`` after each update:
            ``"drop"`` (default: discard the weakest directions; the kept precision is below the exact one, so
            the belief is never more confident than the untruncated update) or ``"diag"`` (LoFi's rule: move the
            discarded part's diagonal onto the diagonal precision; exact precision diagonal, but more confident
            than the exact posterior when it fires). Measured in docs/beliefs.md.
        draws: weight draws per ``"slr"`` update and per ``"sampled"`` prediction (even; default 1000).
        seed: seed of those draws (each update and each prediction reseeds from it: reproducible).
        process_noise: variance ``q`` added to every Bayesian weight's variance before each
            sample's update (random-walk drift, ``θ_t = θ_{t-1} + N(0, qI)``); default 0 (static).
        var_floor, jitter, gain_clip, psd_repair: numerical guards (see :mod:`ppl_kbnn.kalman.guards`);
            each firing is counted in :attr:`guard_counts`.
        obs_noise: ``None`` (default: the model's ``obs_noise``, fixed) or a mode that learns each output's noise
            variance online with an inverse-Gamma belief centred on the model's ``obs_noise`` (:mod:`ppl_kbnn.hyper`):
            ``"auto"`` (the data absorbed so far reweighed by every new estimate, the weight prior kept in absolute
            units: on a linear network the exact posterior under the current estimate), ``"auto-conjugate"`` (the
            conjugate normal-inverse-Gamma rule: the weight prior scales with the noise) or ``"auto-independent"``
            (the weight belief left as absorbed; an ablation). :attr:`obs_noise` reports the current estimate,
            :meth:`obs_noise_belief` its uncertainty. The model keeps its number (NUTS and SVI need one).
        outliers: what an update does with a sample whose innovation's squared Mahalanobis distance ``d²`` exceeds
            ``outlier_threshold`` (:mod:`ppl_kbnn.hyper`): ``"warn"`` (default; update, count in
            ``guard_counts["outlier"]``, one :class:`~ppl_kbnn.hyper.OutlierWarning` per :meth:`update` call),
            ``"gate"`` (skip the sample, counted) or ``"wolf"`` (every sample absorbed with the noise inflated by
            ``1 + d²/outlier_threshold``: WoLF's inverse-multiquadric weight; flagged samples counted).
        prior_scale: ``None`` (default: the model's priors) or ``"auto"``: the prior scale chosen from the data. One
            belief per scale ``s`` in :data:`~ppl_kbnn.hyper.PRIOR_GRID` (every Bayesian weight ``N(μ₀, s²)``, ``μ₀``
            the model's prior means), each updated with every sample and scoring its one-step log predictive
            density, discounted by :data:`~ppl_kbnn.hyper.PRIOR_DISCOUNT` per sample (0.99: a recency-weighted
            log evidence, :attr:`prior_log_evidence`); :attr:`belief` is the best-scoring one and :attr:`prior_scale`
            its scale. Cost: ``len(PRIOR_GRID)`` (5) updates per sample and 5 beliefs in memory until frozen.
            With ``obs_noise="auto"`` each candidate has its own noise belief.
        prior_warmup: ``None`` (default: never freeze, the choice keeps following the score) or the number of
            samples after which the best scale is frozen and the other beliefs stop being updated (their memory
            stays allocated).
        outlier_threshold: the ``d²`` threshold; default ``None``: the ``χ²_m`` quantile at ``1 - 10⁻⁶`` for ``m``
            observed outputs (:func:`~ppl_kbnn.hyper.default_threshold`; 23.93 for ``m = 1``).
        compile: ``False`` (default): the update runs op by op. ``True`` (``update="kbnn"``): compiled — on a chain
            the whole sample step (``hidden="diag"``, fixed ``obs_noise``, no ``prior_scale="auto"``), on the CPU
            ahead of time with AOTInductor and called without ``torch.compile``'s per-call guards (the sample's values
            are checked inside the compiled step; on a GPU with ``torch.compile``); on a transformer the moment
            propagation with its backward pass (the statistical Jacobian), with ``torch.compile``. Both need a C++
            compiler; the first update compiles (tens of seconds for a small chain, minutes for a transformer). A
            string names a ``torch.compile`` backend (``"inductor"``, ``"eager"``, ``"aot_eager"``). Same results up
            to round-off; measured in docs/bench.md.

    The belief is :attr:`belief` (a :class:`~ppl_kbnn.beliefs.Belief`); :meth:`layer` / :meth:`set_layer` read
    and set one linear map's rows. Fixed (non-Bayesian) entries have zero variance and never move.

    Devices and dtypes: the belief is made in the model's dtype and on its device; ``guide.to(device, dtype)`` (and
    ``float()``, ``double()``, ``cuda()``) moves the belief, the noise and prior-scale candidates, and the model's
    network and priors together (the model is shared: a second guide on the same model must be moved too).
    :attr:`dtype` and :attr:`device` are the belief's; inputs and targets must match them (``ValueError``).

    Threads: the updates are many small tensor operations; for small networks ``torch.set_num_threads(1)``
    is often several times faster than the default on a busy machine (measured: 65× less CPU per update of the
    tiny transformer on a loaded 2-core machine). ``update`` warns once per process when the thread count
    cannot help (:func:`ppl_kbnn._threads.warn_if_oversubscribed`).
    """

    # Plain Python counters set on every update: stored directly (Module.__setattr__ checks each assignment against
    # parameters, buffers and submodules: a few microseconds each, several times per sample).
    _PLAIN: frozenset[str] = frozenset({"_outliers_in_call", "_in_batch", "_noise_ratio", "_last_logpdf", "_last_d2",
                                        "n_updates", "update_seconds"})  # fmt: skip

    def __setattr__(self, name: str, value: object) -> None:
        """Set an attribute (the per-update counters of ``_PLAIN`` directly in ``__dict__``)."""
        if name in KalmanGuide._PLAIN and not isinstance(value, torch.Tensor | nn.Module):
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def __init__(
        self,
        model: BayesianModel,
        covariance: str = "block",
        *,
        update: str = "kbnn",
        hidden: str = "diag",
        rank: int | None = None,
        truncation: str | None = None,
        draws: int | None = None,
        seed: int = 0,
        process_noise: float = 0.0,
        var_floor: float = 0.0,
        jitter: float = 0.0,
        gain_clip: float | None = None,
        psd_repair: bool = False,
        obs_noise: str | None = None,
        outliers: str = "warn",
        outlier_threshold: float | None = None,
        prior_scale: str | None = None,
        prior_warmup: int | None = None,
        compile: bool | str = False,  # noqa: A002
    ) -> None:
        super().__init__()
        if not isinstance(model, BayesianModel):
            raise ValueError(f"model must be a ppl_kbnn.BayesianModel, got {type(model).__name__}")
        if not isinstance(covariance, str) or covariance not in BELIEFS:
            raise ValueError(f"covariance must be one of {sorted(BELIEFS)}, got {covariance!r}")
        if not isinstance(update, str) or update not in ENGINES:
            raise ValueError(f"update must be one of {sorted(ENGINES)}, got {update!r}")
        if not isinstance(hidden, str):
            raise ValueError(f"hidden must be a string, got {hidden!r}")
        process_noise = real_arg("process_noise", process_noise, minimum=0.0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
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
        engine_cls = ENGINES[update][int(self.transformer)]
        belief_cls = BELIEFS[covariance]
        if belief_cls not in engine_cls.beliefs:
            ok = sorted(c.key for c in engine_cls.beliefs)
            raise ValueError(f"update={update!r} does not support covariance={covariance!r}; supported: {ok}")
        if gain_clip is not None and update != "kbnn":
            raise ValueError("gain_clip applies to update='kbnn' only (its per-node smoothing gains)")
        if (rank is not None or truncation is not None) and covariance != "lowrank":
            raise ValueError("rank and truncation apply to covariance='lowrank' only")
        if process_noise > 0 and covariance == "lowrank":
            raise ValueError("process_noise > 0 is not supported with covariance='lowrank'; supported: "
                             "'diag', 'block', 'full'")  # fmt: skip
        self.covariance, self.update_rule, self.hidden = covariance, update, hidden
        self._kind = "diag" if hidden == "diag" else "token"
        if obs_noise is not None and obs_noise not in NOISE_MODES:
            raise ValueError(f"obs_noise must be None (the model's, fixed) or one of {NOISE_MODES}, got {obs_noise!r}")
        if not isinstance(outliers, str) or outliers not in OUTLIERS:
            raise ValueError(f"outliers must be one of {OUTLIERS}, got {outliers!r}")
        if outlier_threshold is not None:
            outlier_threshold = real_arg("outlier_threshold", outlier_threshold, strict=True)
        self.outliers, self.outlier_threshold = outliers, outlier_threshold
        self._outliers_in_call = 0
        self._last_d2, self._last_logpdf, self._noise_ratio = math.nan, math.nan, 1.0
        self._obs_noise0 = float(model.obs_noise)
        if prior_scale is not None and prior_scale != "auto":
            raise ValueError(f"prior_scale must be None (the model's priors) or 'auto', got {prior_scale!r}")
        if prior_warmup is not None and (isinstance(prior_warmup, bool) or not isinstance(prior_warmup, int)
                                         or prior_warmup < 1):  # fmt: skip
            raise ValueError(f"prior_warmup must be None or an int >= 1, got {prior_warmup!r}")
        self.prior_scale_mode, self.prior_warmup = ("auto" if prior_scale == "auto" else "model"), prior_warmup
        self.obs_noise_mode = "fixed" if obs_noise is None else obs_noise
        self.observe = model.observe
        self.__dict__["_net"] = model.net  # structure and fixed weights (transformers); not a submodule
        self.process_noise = float(process_noise)
        self.guards = Guards(var_floor=var_floor, jitter=jitter, gain_clip=gain_clip, psd_repair=psd_repair)
        self.nodes = _parse(model)
        self.n_updates = 0
        self._in_batch = 0  # index of the sample being absorbed within the current update() call
        self.update_seconds = 0.0
        layout = Layout(model.priors, self._linears)
        loc = torch.cat([loc.reshape(-1) for loc, _ in model.priors.values()])  # (D,)
        var = torch.cat([(scale * scale).reshape(-1) for _, scale in model.priors.values()])  # (D,)
        fixed = [self._fixed_rows(model, node) for node in self._linears]
        low = {"rank": rank, "truncation": truncation or "drop"} if covariance == "lowrank" else {}
        if prior_scale == "auto":  # one belief per candidate scale (PRIOR_GRID); self.belief is the current best
            self.candidates = nn.ModuleList(
                [belief_cls(layout, loc, torch.full_like(var, s * s), self.guards, fixed=fixed, **low)
                 for s in PRIOR_GRID])  # fmt: skip
            self.register_buffer("prior_log_evidence", torch.zeros(len(PRIOR_GRID), dtype=loc.dtype,
                                                                   device=loc.device))
            self.prior_choice: int | None = None  # index into PRIOR_GRID once frozen
            self.__dict__["belief"] = self.candidates[0]
        else:
            self.candidates = None
            self.belief: Belief = belief_cls(layout, loc, var, self.guards, fixed=fixed, **low)
        self.noise_candidates = None
        rule = NOISE_RULES.get(obs_noise)
        if rule == "reweigh":  # the prior the reweighing keeps (not state: rebuilt from the model)
            self.register_buffer("_prior_loc", loc.clone(), persistent=False)
            self.register_buffer("_prior_var", var.clone(), persistent=False)
        if obs_noise is not None and self.candidates is not None:  # one noise belief per candidate prior scale
            self.noise_candidates = nn.ModuleList(
                [NoiseBelief(self._d_out(), self._obs_noise0, loc.dtype, rule=rule, device=loc.device)
                 for _ in PRIOR_GRID]  # fmt: skip
            )
            self.__dict__["noise"] = self.noise_candidates[0]
        elif obs_noise is not None:
            self.noise = NoiseBelief(self._d_out(), self._obs_noise0, loc.dtype, rule=rule, device=loc.device)
        else:
            self.noise = None
        opts = {} if update != "slr" else {"draws": draws, "seed": seed}
        if compile is not False:
            chain_ok = hidden == "diag" and (obs_noise, prior_scale) == (None, None)
            if update != "kbnn" or not (self.transformer or chain_ok):
                raise ValueError("compile applies to update='kbnn': on a transformer, or on a chain with hidden="
                                 "'diag', a fixed obs_noise and the model's prior (prior_scale=None)")  # fmt: skip
            opts["compile"] = compile
        if update != "slr" and draws is not None:
            raise ValueError("draws applies to update='slr' (use predict(method='sampled', draws=...) otherwise)")
        self.engine = engine_cls(self, **opts)
        self.draws = getattr(self.engine, "draws", SLR.DEFAULT_DRAWS)  # (draws is only accepted with "slr")
        self.seed = int(seed)
        self._moments = (KBNNTransformer if self.transformer else KBNNChain)(self)
        self.__dict__["_network"] = None  # built on first use (a deterministic copy of the network)
        self.__dict__["_model"] = model

    # ------------------------------------------------------------------ device and dtype

    def _state(self) -> torch.Tensor:
        """The belief's first state tensor (a direct dict lookup: these checks run on every update)."""
        belief = self.__dict__.get("belief") or self._modules["belief"]
        return next(iter(belief._buffers.values()))

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the belief (inputs and targets must have it)."""
        return self._state().dtype

    @property
    def device(self) -> torch.device:
        """The device of the belief (inputs and targets must be on it)."""
        return self._state().device

    def _apply(self, fn, recurse: bool = True):
        """``to`` / ``float`` / ``double`` / ``cuda``: the beliefs (weights, noise, prior candidates) are the guide's
        buffers; the model's network and priors move with them (the model is shared with the guide, not a
        submodule: its Pyro site names must stay the model's own)."""
        super()._apply(fn, recurse)
        self._model._apply(fn, recurse)
        self.__dict__["_network"] = None  # the deterministic copy of the network is rebuilt on the new device/dtype
        return self

    def _check_placement(self) -> None:
        """The model must sit where the belief sits (moved together by :meth:`to`)."""
        model = self._model
        if model.dtype != self.dtype or model.device != self.device:
            raise ValueError(f"the model ({model.dtype}, {model.device}) and the belief ({self.dtype}, {self.device}) "
                             "differ: move them together with guide.to(device, dtype)")  # fmt: skip

    # ------------------------------------------------------------------ structure

    @property
    def obs_noise(self) -> float | torch.Tensor:
        """Observation-noise std: the model's (a float), or with a learnt ``obs_noise`` the current estimate
        ``sqrt(β/α)`` per output ``(d_out,)``."""
        return self._obs_noise0 if self.noise is None else self.noise.var.sqrt()

    def obs_noise_belief(self) -> dist.Distribution:
        """The belief over each output's noise *variance* (a learnt ``obs_noise``): ``InverseGamma(α, β)``, batch
        ``(d_out,)``; its ``.mean`` / ``.variance`` give the estimate's uncertainty."""
        if self.noise is None:
            raise ValueError("obs_noise_belief needs obs_noise='auto' (this guide's noise is fixed)")
        return self.noise.distribution()

    def _d_out(self) -> int:
        if not self.transformer:
            return self._linears[-1].d_out
        c = self._net.config
        return c.d_out if hasattr(c, "d_out") else c.act_dim

    def _outlier_threshold(self, m: int) -> float:
        return default_threshold(m) if self.outlier_threshold is None else self.outlier_threshold

    @property
    def _linears(self) -> list[_Linear]:
        return [n for n in self.nodes if isinstance(n, _Linear)]

    @property
    def network(self) -> NetworkFunction:
        """``f(θ, x)`` of the network at flat Bayesian weights (used by the ``"ekf"``/``"slr"`` rules)."""
        if self._network is None:
            self.__dict__["_network"] = NetworkFunction(self._model, self.belief.layout)
        return self._network

    @staticmethod
    def _fixed_rows(model: BayesianModel, node: _Linear) -> torch.Tensor:
        """The pre-trained ``[W, b]`` rows ``(n, p)`` of a linear map (its fixed entries' values)."""
        module = model.net.get_submodule(node.module) if node.module else model.net
        parts = [(node.weight_site, "weight", (node.d_out, node.d_in))]
        if node.bias:
            parts.append((node.bias_site, "bias", (node.d_out, 1)))
        out = []
        for site, par, shape in parts:
            value = model.priors[site][0] if site is not None else module._buffers[par]
            out.append(value.reshape(shape))
        return torch.cat(out, -1).clone()

    def layer(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The belief of linear map ``module`` (its name inside the network): rows ``[W_n, b_n]`` mean ``(rows, p)``
        (bias last) and covariance ``(rows, p, p)`` (``"diag"``: variances ``(rows, p)``). For ``"full"`` and
        ``"lowrank"`` the covariance is the per-row marginal block of the joint belief."""
        return self.belief.layer(self._slot(module).index)

    def set_layer(self, module: str, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """Set the belief of linear map ``module`` (``"block"``/``"diag"``; validated like a checkpoint)."""
        if not hasattr(self.belief, "set_layer"):
            raise ValueError(f"set_layer needs a per-row belief ('block' or 'diag'), not {self.covariance!r}")
        self.belief.set_layer(self._slot(module).index, mean, cov)

    def _slot(self, module: str) -> _Linear:
        for node in self._linears:
            if node.module == module:
                return node
        raise ValueError(f"no Bayesian linear map named {module!r}; maps: {[n.module for n in self._linears]}")

    def beliefs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{linear_module_name: (mean (rows, p), cov)}`` for every linear map (see :meth:`layer`)."""
        return {node.module: self.belief.layer(node.index) for node in self._linears}

    @torch.no_grad()
    def load_beliefs(self, other: KalmanGuide) -> KalmanGuide:
        """Copy the belief of ``other`` (a guide of the same network and ``covariance``; its ``hidden``
        mode and update rule may differ), e.g. to evaluate one belief under several hidden-state modes."""
        if other.covariance != self.covariance or [n for n in other.nodes] != [n for n in self.nodes]:
            raise ValueError("load_beliefs: the other guide has a different structure or covariance kind")
        if other.belief.signature() != self.belief.signature():
            raise ValueError("load_beliefs: the other guide's belief has different settings")
        if other.dtype != self.dtype:
            raise ValueError(f"load_beliefs: the other guide's belief is {other.dtype}, this one {self.dtype}")
        if other.fixed_weights_fingerprint() != self.fixed_weights_fingerprint():
            raise ValueError("load_beliefs: the other guide's network has different fixed (non-Bayesian) weights")
        for mine, theirs in zip(self.belief.buffers(), other.belief.buffers(), strict=True):
            mine.copy_(theirs)
        return self

    @property
    def belief_bytes(self) -> int:
        """Bytes held by the belief (means and covariances or precision factors) beyond the pre-trained weights."""
        return self.belief.nbytes

    @property
    def guard_counts(self) -> dict[str, int]:
        """How often each numerical guard fired since construction."""
        return dict(self.guards.counts)

    # ------------------------------------------------------------------ inputs
    def _check_seq_x(self, x) -> tuple[torch.Tensor | dict, int]:
        """A transformer input: ``(N, T, d_in)``, or for a decision transformer a dict of ``(N, K, ...)``."""
        items = x.items() if isinstance(x, Mapping) else [("x", x)]
        if not isinstance(x, Mapping) and not isinstance(x, torch.Tensor):
            raise ValueError(f"x: expected a tensor (N, T, d_in) or a dict of tensors, got {type(x).__name__}")
        if isinstance(x, Mapping):
            need, allowed = {"returns_to_go", "states", "actions", "timesteps"}, {"attention_mask"}
            if not isinstance(self._net, DecisionTransformer):
                raise ValueError("x: a dict input is for a DecisionTransformer; this network takes a tensor "
                                 "(N, T, d_in)")  # fmt: skip
            if not need <= set(x) or not set(x) <= need | allowed:
                raise ValueError(f"x: expected a dict with keys {sorted(need)} (and optionally 'attention_mask'), "
                                 f"got {sorted(map(str, x))}")  # fmt: skip
        n = None
        for name, t in items:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
            if not t.is_floating_point() and name not in ("timesteps", "attention_mask"):
                raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
            self._check_device(name, t)
            if t.is_floating_point():
                self._check_values(name, t)
            if t.dim() < 2:
                raise ValueError(f"{name}: expected a batch of sequences (N, T, ...), got shape {tuple(t.shape)}")
            if n is not None and t.shape[0] != n:
                raise ValueError(f"{name}: batch size {t.shape[0]} differs from the other inputs' {n}")
            n = t.shape[0]
        if not isinstance(x, Mapping):
            d_in, max_len = self._net.config.d_in, self._net.config.max_len
            if x.dim() != 3 or x.shape[-1] != d_in:
                raise ValueError(f"x: expected shape (N, T, {d_in}), got {tuple(x.shape)}")
            if not 1 <= x.shape[1] <= max_len:
                raise ValueError(f"x: sequence length T={x.shape[1]} must be between 1 and max_len={max_len}")
        else:
            self._net._check(x["returns_to_go"], x["states"], x["actions"], x["timesteps"])  # shapes, timestep range
        return x, n

    def _check_device(self, name: str, t: torch.Tensor) -> None:
        """A data tensor must be on the belief's device (``ValueError`` naming it)."""
        if isinstance(t, torch.Tensor) and t.device != self.device:
            raise ValueError(f"{name}: device {t.device} does not match the belief's {self.device}")

    def _check_values(self, name: str, t: torch.Tensor) -> None:
        """A floating-point data tensor must be finite and in the belief's dtype (``ValueError`` naming it)."""
        check_tensor(name, t)
        if t.dtype != self.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} does not match the belief's {self.dtype}")

    def _check_seq_y(self, y: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
        self._check_device("y", y)
        self._check_values("y", y)
        if y.shape != out_shape and y.dim() == len(out_shape) - 1 and out_shape[-1] == 1:
            y = y[..., None]  # one-output network: trailing dim may be omitted
        if y.shape != out_shape:
            raise ValueError(f"y: expected shape {out_shape} (the observed outputs, observe={self.observe!r}), "
                             f"got {tuple(y.shape)}")  # fmt: skip
        return y

    def _out_shape(self, x, n: int) -> tuple[int, ...]:
        d_out = self._net.config.d_out if hasattr(self._net.config, "d_out") else self._net.config.act_dim
        if self.observe == "last":
            return (n, d_out)
        T = x["states"].shape[1] if isinstance(x, dict) else x.shape[1]
        return (n, T, d_out)

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        d_in = self._linears[0].d_in
        self._check_device("x", x)
        self._check_values("x", x)
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[-1] != d_in:
            raise ValueError(f"x: expected shape (N, {d_in}) or ({d_in},), got {tuple(x.shape)}")
        return x

    def _check_y(self, y: torch.Tensor, n: int) -> torch.Tensor:
        d_out = self._linears[-1].d_out
        self._check_device("y", y)
        self._check_values("y", y)
        if y.dim() == 1 and d_out == 1 and y.shape[0] == n:
            y = y[:, None]  # (N,) targets of a one-output network
        elif y.dim() == 1 and n == 1 and y.shape[0] == d_out:
            y = y[None]  # one sample given without its batch dim
        if y.shape != (n, d_out):
            raise ValueError(f"y: expected shape ({n}, {d_out}) for {n} input(s), got {tuple(y.shape)}")
        return y

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def predict(self, x, method: str | None = None, *, draws: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive ``(mean, var)`` of ``y`` at inputs ``x``; ``var`` (marginal variances) includes ``obs_noise²``.

        Chains: ``x`` ``(N, d_in)``, outputs ``(N, d_out)``. Transformers: ``x`` ``(N, T, d_in)`` (decision
        transformer: a dict of ``(N, K, ...)`` tensors); outputs ``(N, d_out)`` for ``observe="last"``,
        ``(N, T, d_out)`` for ``"all"``.

        ``method`` (default: the one that matches the update rule): ``"moments"`` (closed-form moment
        propagation; ``"kbnn"``; with a joint belief it uses the per-row marginal blocks), ``"linearised"``
        (``f(x; μ)`` and ``diag(J P Jᵀ)``; ``"ekf"``) or ``"sampled"`` (``draws`` weight draws pushed through the
        network, antithetic pairs, seeded; ``"slr"``).
        """
        method = self.engine.readout if method is None else method
        if method not in READOUTS:
            raise ValueError(f"method must be one of {READOUTS}, got {method!r}")
        self._check_placement()
        if self.transformer:
            x, _ = self._check_seq_x(x)
        else:
            x = self._check_x(x)
        if method == "moments":
            joint = None if hasattr(self.belief, "rows") else self.beliefs()
            mean, var = self._moments.moments(x, joint)
        elif method == "linearised":
            mean, J = self.network.jacobian(self.belief.mean, x)  # (*y), (k, D)
            var = (J * self.belief.cov_jac(J).mT).sum(-1).reshape(mean.shape)  # diag(J P Jᵀ)
        else:
            L = self.draws if draws is None else draws
            f = self.network.batched(antithetic_draws(self.belief, L, self.seed, -1), x)  # (L, *out)
            mean, var = f.mean(0), f.var(0)
        return mean, var + self.obs_noise**2

    @_no_grad
    def update(self, x: torch.Tensor, y: torch.Tensor) -> KalmanGuide:
        """Sequential closed-form update with the samples ``(x_i, y_i)``, in order.

        Raises ``ValueError`` for bad input (shape, dtype, NaN/inf) and ``FloatingPointError`` if an
        update produces a non-finite belief; in both cases, and on any interruption (``KeyboardInterrupt``
        included), the belief, ``n_updates`` and ``guard_counts`` are left exactly as they were.
        """
        if isinstance(self.engine, KBNNChain) and self.engine.compile is not False and self.engine.lean_update(x, y):
            self._warn_outliers()  # the compiled chain step absorbed every sample (checks included; lean_update)
            return self
        self._check_placement()
        if self.transformer:
            x, n = self._check_seq_x(x)
            y = self._check_seq_y(y, self._out_shape(x, n))
        else:
            x = self._check_x(x)
            y = self._check_y(y, x.shape[0])
            n = x.shape[0]
        warn_if_oversubscribed()
        current = (self.belief, self.noise)
        snapshot = [b.snapshot() for b in (self.candidates or [self.belief])]
        evidence = None if self.candidates is None else (self.prior_log_evidence.clone(), self.prior_choice)
        noises = [] if self.noise is None else list(self.noise_candidates or [self.noise])
        noise = [(nb.alpha.clone(), nb.beta.clone()) for nb in noises]
        counts = self.guards.counts.copy()
        self._outliers_in_call = 0
        t0 = time.perf_counter()
        try:
            for i in range(n):  # samples are sequential by nature
                self._in_batch = i
                searching = self.candidates is not None and self.prior_choice is None
                for k in range(len(PRIOR_GRID)) if searching else [None]:
                    if searching:
                        self._select(k)  # each candidate in turn
                    self._step(x, y, i)
                    if searching:
                        self.prior_log_evidence[k] = PRIOR_DISCOUNT * self.prior_log_evidence[k] + self._last_logpdf
                if searching:  # the best so far; frozen after the warm-up
                    best = int(torch.argmax(self.prior_log_evidence))
                    self._select(best)
                    if self.prior_warmup is not None and self.n_updates + i + 1 >= self.prior_warmup:
                        self.prior_choice = best
        except BaseException:
            self.__dict__["belief"], self.__dict__["noise"] = current
            for b, snap in zip(self.candidates or [self.belief], snapshot, strict=True):
                b.restore(snap)
            if evidence is not None:
                self.prior_log_evidence.copy_(evidence[0])
                self.prior_choice = evidence[1]
            for nb, (a, b) in zip(noises, noise, strict=True):
                nb.alpha.copy_(a)
                nb.beta.copy_(b)
            self.guards.counts.clear()
            self.guards.counts.update(counts)
            raise
        finally:
            self._in_batch = 0
        self.n_updates += n
        self.update_seconds += time.perf_counter() - t0
        self._warn_outliers()
        return self

    def _warn_outliers(self) -> None:
        """The end of :meth:`update`: one :class:`~ppl_kbnn.hyper.OutlierWarning` if samples of the call were flagged
        (``outliers="warn"``)."""
        if self._outliers_in_call and self.outliers == "warn":
            # a constant text: Python shows it once per calling line, the counts are in guard_counts["outlier"]
            thr = "the chi-square 1-1e-6 quantile" if self.outlier_threshold is None else self.outlier_threshold
            warnings.warn(
                f"sample(s) with an innovation beyond the outlier threshold (squared Mahalanobis distance > {thr}) "
                "were absorbed as usual and counted in guard_counts['outlier']. Use outliers='gate' or 'wolf' for "
                "robust updates, or obs_noise='auto' if the noise is larger than assumed.", OutlierWarning,
                stacklevel=4)  # fmt: skip  (1: here, 2: update, 3: _no_grad's wrapper, 4: the caller of update)

    def _select(self, k: int) -> None:
        """Point :attr:`belief` (and the noise belief) at candidate prior scale ``k`` (plain attributes: the
        candidates stay registered once, under ``candidates`` / ``noise_candidates``)."""
        self.__dict__["belief"] = self.candidates[k]
        if self.noise_candidates is not None:
            self.__dict__["noise"] = self.noise_candidates[k]

    def _step(self, x, y, i: int) -> None:
        """Absorb sample ``i`` into :attr:`belief` (process noise, the engine's step, the noise rescaling)."""
        if self.process_noise > 0:
            self.belief.add_process_noise(self.process_noise)
        self._noise_ratio, self._last_logpdf = 1.0, math.nan
        if self.transformer:
            self.engine.step(_take(x, i), y[i])
        else:
            self.engine.step(x[i], y[i])
        f = self._noise_ratio  # ρ⁺/ρ: the noise estimate moved during this step
        if f != 1.0 and self.noise.rule == "conjugate":  # the weight belief is conditional on the noise
            self.belief.scale_cov(f)
        elif f != 1.0 and self.noise.rule == "reweigh":  # the data absorbed so far, weighed by the new noise
            var = self._prior_var
            if self.candidates is not None:
                k = next(j for j, b in enumerate(self.candidates) if b is self.belief)
                var = torch.full_like(var, PRIOR_GRID[k] ** 2)
            self.belief.reweigh_data(1.0 / f, self._prior_loc, var)

    @property
    def prior_scale(self) -> float | None:
        """With ``prior_scale="auto"``: the chosen scale once frozen, else the best so far; ``None`` otherwise."""
        if self.candidates is None:
            return None
        k = self.prior_choice if self.prior_choice is not None else int(torch.argmax(self.prior_log_evidence))
        return PRIOR_GRID[k]

    def linearise(self, x) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Forward moments and statistical Jacobians of one transformer input (batch of 1).

        Returns ``(mean (m,), cov (m, m), jacs)``: the predictive mean and covariance of the ``m``
        observed outputs *without* observation noise, and ``jacs[module] = ∂E[y]/∂μ_W`` ``(m, rows, p)``
        for every Bayesian linear map (the statistical Jacobian: covariances held fixed, see
        :mod:`ppl_kbnn.propagate`). ``Cov(w_n, y) = C_n jacs[module][:, n]ᵀ``.
        """
        if not self.transformer:
            raise ValueError("linearise is available for transformer models")
        if not hasattr(self.belief, "rows"):
            raise ValueError("linearise (the KBNN statistical Jacobian) needs covariance 'block' or 'diag'")
        x, n = self._check_seq_x(x)
        if n != 1:
            raise ValueError(f"linearise takes one input (batch of 1), got {n}")
        return self._moments.linearise(x)

    def posterior(self) -> dict[str, dist.Distribution]:
        """The belief as torch distributions, one per Bayesian site (marginal over the site).

        ``"block"``: weight rows are ``MultivariateNormal`` (batch ``d_out``, event ``d_in``) — the
        joint over ``[W_n, b_n]`` is in the belief; ``"diag"``, ``"full"``, ``"lowrank"``: independent
        ``Normal`` marginals (the joint of ``"full"``/``"lowrank"`` is :meth:`joint_posterior`). Event
        shapes equal the site shapes.
        """
        out: dict[str, dist.Distribution] = {}
        if not hasattr(self.belief, "rows"):
            means = self.belief.layout.split(self.belief.mean)
            sds = self.belief.layout.split(self.belief.marginal_var().clamp_min(0).sqrt())
            return {k: dist.Normal(means[k], sds[k]).to_event(means[k].dim()) for k in means}
        for node in self._linears:
            mean, cov = self.belief.rows(node.index)
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

    def joint_posterior(self) -> dist.Distribution:
        """The belief over all Bayesian weights, flattened in model site order, as one distribution (event ``(D,)``)."""
        return self.belief.joint_posterior()

    def forward(self, *args, **kwargs) -> None:
        """Pyro guide: sample every Bayesian site of the model from the belief (the joint, exactly).

        ``"block"``: with the Cholesky factor ``L`` of the ``[W_n, b_n]`` block, ``W_n ~ N(μ_w, L_ww L_wwᵀ)``
        and ``b_n | W_n ~ N(μ_b + L_bw L_ww⁻¹ (W_n - μ_w), L_bb²)``, which is the joint Gaussian.
        ``"full"``/``"lowrank"``: one auxiliary draw of the flat weight vector, split into the sites
        (``Delta`` sites carrying the joint log density), as Pyro's ``AutoContinuous`` guides do.
        """
        if not hasattr(self.belief, "rows"):
            joint = self.belief.joint_posterior()
            theta = pyro.sample("_kalman_latent", joint, infer={"is_auxiliary": True})
            log_density = joint.log_prob(theta)
            for i, (site, value) in enumerate(self.belief.layout.split(theta).items()):
                pyro.sample(site, dist.Delta(value, log_density if i == 0 else 0.0, event_dim=value.dim()))
            return
        for node in self._linears:
            mean, cov = self.belief.rows(node.index)
            d = node.d_in
            if self.covariance == "diag":
                if node.weight_site is not None:
                    pyro.sample(node.weight_site, dist.Normal(mean[:, :d], cov[:, :d].sqrt()).to_event(2))
                if node.bias_site is not None:
                    pyro.sample(node.bias_site, dist.Normal(mean[:, d], cov[:, d].sqrt()).to_event(1))
                continue
            idx = getattr(self.belief, f"mask_{node.index}").any(0).nonzero().squeeze(-1)  # Bayesian entries
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
            **self.belief.signature(),
            "update": self.update_rule,
            "hidden": self.hidden,
            "obs_noise": self._obs_noise0,
            "nodes": [
                (n.module, "linear", n.d_in, n.d_out, n.bias, n.weight_site, n.bias_site)
                if isinstance(n, _Linear)
                else (n.module, n.activation)
                for n in self.nodes
            ],  # fmt: skip
        }

    def _settings(self) -> dict:
        """Settings outside the structure signature that change what an update does; a checkpoint must share them."""
        out = {
            "process_noise": self.process_noise,
            "guards": self.guards.settings(),
            "observe": self.observe,
            "obs_noise_mode": self.obs_noise_mode,
            **({} if self.noise is None else {"obs_noise_rule": self.noise.rule}),
            "outliers": self.outliers,
            "outlier_threshold": self.outlier_threshold,
            "prior_scale_mode": self.prior_scale_mode,
        }
        if self.candidates is not None:
            out |= {"prior_grid": list(PRIOR_GRID), "prior_warmup": self.prior_warmup}
        if self.update_rule == "slr":
            out |= {"draws": self.draws, "seed": self.seed}
        return out

    def fixed_weights_fingerprint(self) -> str:
        """SHA-256 of the network's fixed (non-Bayesian) weights, the buffers of ``model.net`` (names, dtypes, shapes
        and bytes): the frozen part the belief is a belief about, e.g. a transformer's body under
        ``bayesian="head"``. Stored in checkpoints; :meth:`load_state_dict` refuses a different one."""
        h = hashlib.sha256()
        for name, buf in self._model.net.named_buffers():
            t = buf.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def get_extra_state(self) -> dict:
        """The guide's non-tensor state: structure signature, update settings, fixed-weights fingerprint, counters."""
        return {
            "version": __version__,
            "signature": self._signature(),
            **self._settings(),
            "fixed_weights": self.fixed_weights_fingerprint(),
            "guard_counts": dict(self.guards.counts),
            "n_updates": self.n_updates,
            "update_seconds": self.update_seconds,
            **({} if self.candidates is None else {"prior_choice": self.prior_choice}),
        }

    def set_extra_state(self, state: dict) -> None:
        """Restore the counters of :meth:`get_extra_state` (validated by :meth:`load_state_dict` before)."""
        self.n_updates = int(state.get("n_updates", 0))
        self.update_seconds = float(state.get("update_seconds", 0.0))
        if self.candidates is not None:
            self.prior_choice = state.get("prior_choice")
            k = self.prior_choice if self.prior_choice is not None else int(torch.argmax(self.prior_log_evidence))
            self._select(k)
        self.guards.counts.clear()
        self.guards.counts.update(state.get("guard_counts", {}))

    def _check_extra(self, extra: object) -> None:
        """Validate a checkpoint's ``_extra_state`` against this guide; ``ValueError`` names the first difference."""
        if not isinstance(extra, Mapping) or not isinstance(extra.get("signature"), Mapping):
            raise ValueError("not a KalmanGuide state dict (no '_extra_state' with a structure signature)")
        mine, theirs = self._signature(), dict(extra["signature"])
        try:
            theirs["nodes"] = [tuple(n) for n in theirs["nodes"]]
        except (KeyError, TypeError):
            raise ValueError("corrupt checkpoint: '_extra_state' signature has no list of nodes") from None
        want = {**mine, **self._settings()}
        got = {**theirs, **{k: extra.get(k, "<missing>") for k in self._settings()}}
        for key in [*want, *(k for k in theirs if k not in want)]:
            if want.get(key, "<missing>") != got.get(key, "<missing>"):
                raise ValueError(
                    f"state dict was saved from a different model/guide (differs in {key}: saved "
                    f"{got.get(key, '<missing>')!r}, this guide {want.get(key, '<missing>')!r})"
                )
        n = extra.get("n_updates")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"corrupt checkpoint: '_extra_state' n_updates must be an int >= 0, got {n!r}")
        sec = extra.get("update_seconds")
        if isinstance(sec, bool) or not isinstance(sec, int | float) or not (math.isfinite(sec) and sec >= 0):
            raise ValueError(f"corrupt checkpoint: '_extra_state' update_seconds must be a number >= 0, got {sec!r}")
        if self.candidates is not None:
            k = extra.get("prior_choice", "<missing>")
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(PRIOR_GRID)):
                raise ValueError(f"corrupt checkpoint: '_extra_state' prior_choice must be None or an index into "
                                 f"{list(PRIOR_GRID)}, got {k!r}")  # fmt: skip
        counts = extra.get("guard_counts")
        if not isinstance(counts, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in counts.items()
        ):
            raise ValueError(f"corrupt checkpoint: '_extra_state' guard_counts must map names to ints >= 0, "
                             f"got {counts!r}")  # fmt: skip

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint saved by :meth:`state_dict`: all of it, or nothing.

        The whole checkpoint is validated before anything is written: its keys; every tensor's type, dtype
        and shape; the structure signature (covariance, update rule, hidden mode, observation noise, the
        network's nodes), every update setting (process noise, guards, ``observe``; draws and seed of
        ``"slr"``); the fingerprint of the network's fixed weights (:meth:`fixed_weights_fingerprint`); the
        counters; the noise belief (a learnt ``obs_noise``: finite, positive); and the belief itself: finite,
        symmetric, positive semi-definite, fixed entries equal to
        this network's (:meth:`~ppl_kbnn.beliefs.Belief.check_state`). The first difference raises a
        ``ValueError`` that names it, and the guide is left bit-identical. ``strict=False`` and ``assign=True``
        (partial or aliasing loads) are refused.
        """
        if strict is not True or assign is not False:
            raise ValueError("KalmanGuide.load_state_dict loads a whole checkpoint or nothing: strict=False and "
                             "assign=True are not supported")  # fmt: skip
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"not a KalmanGuide state dict: expected a dict, got {type(state_dict).__name__}")
        extra = state_dict.get("_extra_state")
        self._check_extra(extra)
        current = self.state_dict()
        missing = [k for k in current if k not in state_dict]
        if missing:
            raise ValueError(f"checkpoint is missing key(s) {missing}")
        unexpected = [k for k in state_dict if k not in current]
        if unexpected:
            raise ValueError(f"checkpoint has unexpected key(s) {unexpected}")
        for k, mine in current.items():
            if not isinstance(mine, torch.Tensor):
                continue
            t = state_dict[k]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{k}: expected a tensor, got {type(t).__name__}")
            if t.dtype != mine.dtype:
                raise ValueError(f"{k}: dtype {t.dtype} (checkpoint) differs from this guide's {mine.dtype}; convert "
                                 "one of them explicitly")  # fmt: skip
            if t.shape != mine.shape:
                raise ValueError(f"{k}: shape {tuple(t.shape)} (checkpoint) differs from this guide's "
                                 f"{tuple(mine.shape)}")  # fmt: skip
        if extra.get("fixed_weights") != self.fixed_weights_fingerprint():
            raise ValueError(
                "state dict was saved from a different model/guide (differs in fixed_weights: the network's fixed, "
                "non-Bayesian weights are not the ones the belief was computed with)"
            )
        for name, b in [("belief.", self.belief)] if self.candidates is None else [
                (f"candidates.{i}.", c) for i, c in enumerate(self.candidates)]:  # fmt: skip
            b.check_state({k[len(name) :]: v for k, v in state_dict.items() if k.startswith(name)}, name)
        if self.candidates is not None:
            check_tensor("prior_log_evidence", state_dict["prior_log_evidence"])
        if self.noise is not None:
            named = [("noise.", self.noise)] if self.noise_candidates is None else [
                (f"noise_candidates.{i}.", nb) for i, nb in enumerate(self.noise_candidates)]  # fmt: skip
            for name, nb in named:
                nb.check_state({k[len(name) :]: v for k, v in state_dict.items() if k.startswith(name)}, name)
        backup = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in current.items()}
        try:
            return super().load_state_dict(state_dict, strict=True)
        except BaseException:  # only an interruption can get here: put every value back, then re-raise
            super().load_state_dict(backup, strict=True)
            raise
