"""``BayesianModel``: a pre-trained network turned into the Pyro model of KBT.

.. math::
    \\theta_B \\sim \\mathcal N(\\hat\\theta_B, \\mathrm{diag}(\\sigma_0^2)), \\qquad
    \\theta_F = \\hat\\theta_F, \\qquad
    y_i \\mid x_i, \\theta \\sim \\mathcal N(f(x_i; \\theta), \\sigma_{obs}^2 I)

The Bayesian subset ``θ_B`` gets ``PyroSample`` priors centred on the pre-trained values; the rest
becomes fixed buffers (not parameters, so SVI cannot move them). The same object serves NUTS, SVI,
``Predictive`` and the closed-form :class:`~ppl_kbnn.guide.KalmanGuide`, so their posteriors are
posteriors of one model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn.module import PyroModule, PyroSample, to_pyro_module_
from torch import nn

from ._args import real_arg

__all__ = ["BayesianModel", "Input", "RelativeScale"]


@dataclass(frozen=True)
class RelativeScale:
    """Prior std proportional to the pre-trained magnitude: ``σ0 = max(rel · |θ̂|, floor)``."""

    rel: float
    floor: float

    def __post_init__(self) -> None:
        real_arg("RelativeScale.rel", self.rel, minimum=0.0)
        real_arg("RelativeScale.floor", self.floor, minimum=0.0, strict=True)


PriorScale = float | Mapping[str, float] | RelativeScale
Input = torch.Tensor | tuple | Mapping[str, torch.Tensor]
BayesianSpec = str | Sequence[str] | Callable[[str], bool]

_FIXED_BY_DEFAULT = (nn.LayerNorm, nn.Embedding)
"""Module types whose parameters stay at their pre-trained values under ``bayesian="all"``."""


def _head_and_blocks(net: nn.Module) -> tuple[str, list[str]]:
    """The output head's module name and the names of the transformer blocks, in order."""
    from .nn import DecisionTransformer, Transformer

    if isinstance(net, Transformer):
        return "head", [f"blocks.{i}" for i in range(len(net.blocks))]
    if isinstance(net, DecisionTransformer):
        return "predict_action", [f"blocks.{i}" for i in range(len(net.blocks))]
    linears = [name for name, mod in net.named_modules() if isinstance(mod, nn.Linear)]
    if not linears:
        raise ValueError("bayesian='head' needs a network with a Linear layer")
    return linears[-1], []


def _selector(bayesian: BayesianSpec, net: nn.Module, module_names: set[str]) -> Callable[[str, str], bool]:
    """``(module_name, param_name) -> bool`` from the user's ``bayesian=`` argument."""
    if isinstance(bayesian, str):
        fixed = {name for name, mod in net.named_modules() if isinstance(mod, _FIXED_BY_DEFAULT)}
        if bayesian == "all":
            return lambda mod, par: mod not in fixed
        head, blocks = _head_and_blocks(net)
        if bayesian == "head":
            k = 0
        elif bayesian == "last_block":
            k = 1
        elif bayesian.startswith("blocks:") and bayesian[7:].isdigit():
            k = int(bayesian[7:])
        else:
            raise ValueError(
                f"bayesian={bayesian!r}: expected 'all', 'head', 'last_block', 'blocks:k', a list of module "
                "names or a predicate on parameter names"
            )
        if k > len(blocks):
            raise ValueError(f"bayesian={bayesian!r}: the network has only {len(blocks)} block(s)")
        chosen = blocks[len(blocks) - k :]

        def in_subset(mod: str, par: str) -> bool:
            if mod in fixed:
                return False
            return mod == head or any(mod == b or mod.startswith(b + ".") for b in chosen)

        return in_subset
    if callable(bayesian):
        return lambda mod, par: bool(bayesian(f"{mod}.{par}" if mod else par))
    if not isinstance(bayesian, Sequence | set | frozenset):
        raise ValueError(
            f"bayesian={bayesian!r}: expected 'all', 'head', 'last_block', 'blocks:k', a list of module names or a "
            "predicate on parameter names"
        )
    names = list(bayesian)
    unknown = [n for n in names if n not in module_names]
    if unknown:
        raise ValueError(f"bayesian: unknown module name(s) {unknown}; modules with parameters: {sorted(module_names)}")
    return lambda mod, par: mod in names


class _Prior:
    """``N(loc, scale²)`` over a whole parameter, read from the model's prior buffers on every access.

    The buffers (``prior_loc_k``, ``prior_scale_k`` of the :class:`BayesianModel`) are read at sampling time, so
    ``model.to(device, dtype)`` moves the prior with the network. A fresh (cloned) ``loc`` each time keeps the
    model's prior immutable: Pyro's ``init_to_mean`` hands the prior's own ``loc`` tensor to autoguides
    (``AutoNormal``), which would otherwise wrap it in a parameter and move the prior in place during SVI.
    """

    def __init__(self, owner: BayesianModel, k: int) -> None:
        self.owner, self.k = owner, k

    def __call__(self, module: nn.Module) -> dist.Distribution:
        loc, scale = self.owner._prior(self.k)
        return dist.Normal(loc.clone(), scale).to_event(loc.dim())


class BayesianModel(PyroModule):
    """The Pyro model ``model(x, y=None)`` of a pre-trained network with a Gaussian prior around it.

    Args:
        net: the pre-trained deterministic network (copied; the original is not modified).
        prior_scale: prior std ``σ0``: a float, a dict ``{module_name: float}`` (every Bayesian
            module must be listed), or :class:`RelativeScale`.
        obs_noise: observation noise std ``σ_obs`` of the Normal likelihood.
        bayesian: which parameters are random: ``"all"`` (every parameter except those of LayerNorm and
            Embedding modules, which stay fixed by default), ``"head"`` (the output layer),
            ``"last_block"`` (= ``"blocks:1"``), ``"blocks:k"`` (the last ``k`` transformer blocks plus the
            head; LayerNorms inside stay fixed), a list of module names (e.g. ``["2"]`` for the third
            layer of an ``nn.Sequential``), or a predicate on dotted parameter names (e.g.
            ``lambda n: n.startswith("2.")``; this is how to make LayerNorm gains or embeddings random).
        observe: which network outputs are observed: ``"last"`` (the last token of a sequence model; for
            a :class:`~ppl_kbnn.nn.DecisionTransformer`, the action at the last state token) or ``"all"``
            (every token / every state token). ``"auto"``: ``"last"`` for the transformers of
            :mod:`ppl_kbnn.nn`, ``"all"`` (the whole output) otherwise.

    Attributes:
        net: the Pyro version of the network (Bayesian parameters are ``PyroSample`` sites).
        priors: ``{site_name: (loc, scale)}`` of every Bayesian site, site names as in Pyro traces (read from the
            registered buffers ``prior_loc_k`` / ``prior_scale_k``, so they follow ``model.to(device, dtype)``).

    Devices and dtypes: the network is a registered submodule and the priors are buffers, so ``model.to(...)``,
    ``model.float()`` and ``model.double()`` move all of it; the model's dtype is that of its priors.
    """

    def __init__(
        self,
        net: nn.Module,
        prior_scale: PriorScale,
        obs_noise: float,
        bayesian: BayesianSpec = "all",
        observe: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.obs_noise = real_arg("obs_noise", obs_noise, strict=True)
        if not isinstance(prior_scale, RelativeScale | Mapping):
            real_arg("prior_scale", prior_scale, strict=True)  # a scalar: checked before any module is touched
        if observe not in ("auto", "last", "all"):
            raise ValueError(f"observe must be 'auto', 'last' or 'all', got {observe!r}")
        if observe == "auto":
            from .nn import DecisionTransformer, Transformer

            observe = "last" if isinstance(net, Transformer | DecisionTransformer) else "all"
        self.observe = observe
        net = copy.deepcopy(net)
        params = dict(net.named_parameters())
        if not params:
            raise ValueError("net has no parameters")
        module_names = {name.rpartition(".")[0] for name in params}
        select = _selector(bayesian, net, module_names)
        to_pyro_module_(net)
        self.net = net
        self._sites: list[str] = []  # Bayesian site names, in network order; priors in buffers prior_{loc,scale}_k
        for full, value in params.items():
            mod_name, _, par = full.rpartition(".")
            module = net.get_submodule(mod_name) if mod_name else net
            value = value.detach().clone()
            delattr(module, par)
            if select(mod_name, par):
                scale = self._scale(prior_scale, mod_name, value)
                k = len(self._sites)
                try:
                    module.__setattr__(par, PyroSample(_Prior(self, k)))
                except (AttributeError, TypeError, RuntimeError) as err:  # e.g. nn.LSTM's flat weight list
                    torch_cls = next(c for c in type(module).__mro__ if not issubclass(c, PyroModule))
                    raise ValueError(
                        f"bayesian: parameter {full!r} of module {mod_name!r} ({torch_cls.__name__}) cannot be made "
                        f"random: {torch_cls.__name__} does not read its weights as plain attributes ({err}); keep "
                        "that module fixed (choose the Bayesian subset with bayesian=...)"
                    ) from err
                self.register_buffer(f"prior_loc_{k}", value)
                self.register_buffer(f"prior_scale_{k}", scale)
                self._sites.append(f"net.{full}")
            else:
                module.register_buffer(par, value)
        if not self._sites:
            raise ValueError(f"bayesian={bayesian!r} selects no parameter; parameters: {sorted(params)}")

    @staticmethod
    def _scale(prior_scale: PriorScale, mod_name: str, value: torch.Tensor) -> torch.Tensor:
        if isinstance(prior_scale, RelativeScale):
            return (prior_scale.rel * value.abs()).clamp_min(prior_scale.floor)
        if isinstance(prior_scale, Mapping):
            if mod_name not in prior_scale:
                raise ValueError(f"prior_scale: no entry for Bayesian module {mod_name!r} (got {sorted(prior_scale)})")
            s = real_arg(f"prior_scale[{mod_name!r}]", prior_scale[mod_name], strict=True)
        else:
            s = real_arg("prior_scale", prior_scale, strict=True)
        return torch.full_like(value, s)

    def _prior(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` buffers of Bayesian site ``k``."""
        return self._buffers[f"prior_loc_{k}"], self._buffers[f"prior_scale_{k}"]

    @property
    def priors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{site_name: (loc, scale)}`` of every Bayesian site, in network order (the prior buffers themselves)."""
        return {site: self._prior(k) for k, site in enumerate(self._sites)}

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the model (its priors')."""
        return self._buffers["prior_loc_0"].dtype

    @property
    def device(self) -> torch.device:
        """The device of the model (its priors')."""
        return self._buffers["prior_loc_0"].device

    @property
    def site_names(self) -> list[str]:
        """Names of the Bayesian sites, in network order."""
        return list(self._sites)

    def output(self, x: Input) -> torch.Tensor:
        """The observed network output for inputs ``x`` (current weights): ``(N, d_out)`` for
        ``observe="last"``, the full output ``(N, ..., d_out)`` for ``observe="all"``.

        ``x`` is a tensor ``(N, ...)``, a tuple of tensors (positional arguments of the network) or a
        dict (keyword arguments, e.g. ``returns_to_go``, ``states``, ``actions``, ``timesteps`` of a
        decision transformer).
        """
        if isinstance(x, Mapping):
            out = self.net(**x)
        elif isinstance(x, tuple | list):
            out = self.net(*x)
        else:
            out = self.net(x)
        if self.observe == "last":
            if out.dim() != 3:
                raise ValueError(f"observe='last' needs a sequence output (N, T, d_out), got {tuple(out.shape)}")
            out = out[:, -1]  # (N, d_out)
        return out

    def forward(self, x: Input, y: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the weights once, evaluate the network on ``x`` (see :meth:`output`), observe ``y``
        (the shape of the observed output)."""
        out = self.output(x)
        if y is not None and y.shape != out.shape:
            raise ValueError(f"y: expected shape {tuple(out.shape)} (the network's output), got {tuple(y.shape)}")
        with pyro.plate("data", out.shape[0]):
            pyro.sample("obs", dist.Normal(out, self.obs_noise).to_event(out.dim() - 1), obs=y)
        return out
