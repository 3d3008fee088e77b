r"""The Laplace baseline: a Gaussian around the MAP, on top of laplace-torch (``pip install "ppl-kbnn[laplace]"``).

The same posterior as every other method, ``p(θ_B | x, y) ∝ N(θ_B; θ̂_B, diag(σ0²)) Π_i N(y_i; f(x_i; θ), σ_obs² I)``,
approximated by

.. math::
    q(\theta_B) = \mathcal N(\theta_*, (\mathrm{GGN} + \Lambda_0)^{-1}), \qquad
    \mathrm{GGN} = \sigma_{obs}^{-2} \sum_i J_i^\top J_i, \quad J_i = \partial f(x_i; \theta) / \partial \theta_B
    \big|_{\theta_*}

(the generalised Gauss-Newton matrix is the exact Hessian of the Gaussian log-likelihood of the network
linearised at ``θ_*``), with the Hessian ``"full"`` (``D × D``), ``"kron"`` (per layer, Kronecker-factored
K-FAC) or ``"diag"``, over ``"all"`` Bayesian weights or the ``"last_layer"`` only (the other Bayesian
weights then stay at the MAP).

* **MAP** ``θ_*``: the pre-trained weights ``θ̂`` (the prior means) refined by ``map_steps`` iterations of
  full-batch L-BFGS (strong-Wolfe line search) on the model's own negative log joint
  ``Σ_i ||f(x_i; θ) − y_i||² / (2σ_obs²) + Σ_j (θ_j − θ̂_j)² / (2σ0_j²)``. A Laplace approximation is a
  second-order expansion at a mode; at the un-refined pre-trained weights the gradient of the log joint is
  not zero. ``map_steps=0`` keeps ``θ_* = θ̂``.
* **Prior precision** ``Λ_0``: ``prior_precision="marglik"`` (default) a scalar ``λ I`` maximising
  laplace-torch's Laplace evidence ``log p(y | x) ≈ log p(y | x, θ_*) − ½ (θ_* − θ̂)ᵀ Λ_0 (θ_* − θ̂)
  − ½ log det(GGN + Λ_0) + ½ log det Λ_0`` (``optimize_prior_precision(method="marglik")``, Adam on
  ``log λ``, started at the mean of the model's ``1/σ0²``); the prior mean stays ``θ̂``.
  ``prior_precision="model"``: the model's own ``1/σ0²`` per weight (for ``"kron"`` it must be constant
  within each weight tensor). A float: that scalar ``λ``.
* **Predictive**: laplace-torch's GLM (linearised) predictive, ``mean = f(x; θ_*)``,
  ``var = diag(J(x) Σ J(x)ᵀ) + σ_obs²``.
* **InferenceData**: weight draws from ``q`` (``la.sample``), pushed through the same linearised network
  ``f(x; θ_*) + J(x)(θ_s − θ_*)``, so the log-likelihood and posterior predictive are those of the GLM
  predictive above.

With a linear network (``nn.Linear``) and ``prior_precision="model"`` this is exact: conjugate Bayesian
linear regression (checked in the tests).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .result import InferenceResult, model_output, tensor_bytes
from .retrain import point_network

__all__ = ["laplace", "STRUCTURES", "SUBSETS"]

STRUCTURES = ("full", "kron", "diag")
SUBSETS = ("all", "last_layer")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the torch deprecation warnings that laplace-torch's backends raise (curvlinops calls torch.jit)."""
    with warnings.catch_warnings():
        # DeprecationWarning in torch 2.13, FutureWarning in 2.14
        warnings.filterwarnings("ignore", r"`torch\.jit\.(script|trace)` is deprecated", Warning)
        yield


def _import_laplace() -> Any:
    """``laplace.Laplace``, or an ``ImportError`` that says how to get it."""
    try:
        with _quiet():
            from laplace import Laplace
    except ImportError as err:
        raise ImportError('inference.laplace needs laplace-torch: pip install "ppl-kbnn[laplace]"') from err
    except (OSError, RuntimeError) as err:  # e.g. a torchvision build for another torch (CUDA wheel, CPU torch)
        raise ImportError(
            f"laplace-torch is installed but does not import ({err}); it pulls in torchvision, which must match "
            "torch: install the matching torchvision build, or uninstall torchvision (laplace-torch does not "
            "need it)"
        ) from err
    return Laplace


class _Flat(nn.Module):
    """``x -> f(x)`` flattened to ``(N, K)``, ``K`` = outputs per observation (laplace-torch's regression shape)."""

    def __init__(self, point: nn.Module) -> None:
        super().__init__()
        self.m = point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = model_output(self.m, x)
        return out.reshape(out.shape[0], -1)


def _refine_map(point: nn.Module, model: Any, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
    """L-BFGS on the negative log joint of ``model`` over ``point``'s parameters (the Bayesian sites), in place."""
    names = [n for n, _ in point.named_parameters()]
    params = [p for _, p in point.named_parameters()]
    locs = [model.priors[n][0] for n in names]
    precs = [model.priors[n][1] ** -2 for n in names]
    noise2 = model.obs_noise**2

    def neg_log_joint() -> torch.Tensor:
        fit = ((model_output(point, x) - y) ** 2).sum() / (2 * noise2)
        prior = sum(((p - m) ** 2 * lam).sum() for p, m, lam in zip(params, locs, precs, strict=True)) / 2
        return fit + prior

    start = float(neg_log_joint().detach())
    if steps > 0:
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = neg_log_joint()
            loss.backward()
            return loss

        opt.step(closure)
    loss = neg_log_joint()
    grads = torch.autograd.grad(loss, params)
    grad_norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    return {"map_start_loss": start, "map_loss": float(loss.detach()), "map_grad_norm": grad_norm}


def _last_layer(point: nn.Module) -> str:
    """Name (inside ``point``) of the last ``nn.Linear`` holding Bayesian parameters."""
    names = [n for n, mod in point.named_modules()
             if isinstance(mod, nn.Linear) and any(True for _ in mod.parameters(recurse=False))]  # fmt: skip
    if not names:
        raise ValueError("subset='last_layer': the last Linear layer of the network has no Bayesian weight")
    return names[-1]


def laplace(
    model: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    structure: str = "full",
    subset: str = "all",
    *,
    prior_precision: str | float = "marglik",
    map_steps: int = 100,
    marglik_steps: int = 300,
    marglik_lr: float = 0.1,
) -> InferenceResult:
    """A Laplace approximation of the posterior of ``model`` given ``(x, y)`` (see the module docstring).

    Args:
        model: a :class:`~ppl_kbnn.model.BayesianModel`.
        x, y: the data; ``x`` a tensor ``(N, ...)`` (laplace-torch's data loader), ``y`` shaped like the model's
            observed output ``(N, ...)``.
        structure: Hessian structure, ``"full"``, ``"kron"`` or ``"diag"``.
        subset: ``"all"`` Bayesian weights, or ``"last_layer"`` (the last ``Linear`` layer; it must be Bayesian).
        prior_precision: ``"marglik"`` (a scalar fitted by laplace-torch's marginal likelihood), ``"model"``
            (the model's ``1/σ0²``) or a positive float.
        map_steps: L-BFGS iterations refining the pre-trained weights to the MAP (0: none).
        marglik_steps, marglik_lr: Adam steps and learning rate of the marginal-likelihood fit.

    Returns:
        :class:`InferenceResult`, ``method`` ``"laplace-<structure>"`` (``"-ll"`` appended for the last layer);
        ``predict`` the GLM predictive including the obs noise; ``wall_seconds`` = MAP refinement + curvature +
        prior-precision fit; ``memory_bytes`` = the MAP of the Laplace weights and the curvature laplace-torch
        holds (``D²``, the Kronecker factors, or ``D`` scalars); ``fitted`` the laplace-torch object;
        diagnostics ``structure``, ``subset``, ``n_params``, ``prior_precision`` (list), ``log_marglik``,
        ``map_steps``, ``map_start_loss`` / ``map_loss`` (negative log joint before / after refinement),
        ``map_grad_norm`` (its gradient norm at the MAP). ``to_inference_data`` samples the Gaussian.

    Raises:
        ValueError: unknown ``structure`` / ``subset`` / ``prior_precision``, non-tensor ``x``, wrong ``y`` shape,
            a model that is not a ``BayesianModel``, or ``"model"`` precision for ``"kron"`` that varies
            within a weight tensor.
        ImportError: laplace-torch is not installed (or does not import).
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if not (prior_precision in ("marglik", "model") or (isinstance(prior_precision, float | int)
                                                        and not isinstance(prior_precision, bool)
                                                        and prior_precision > 0)):  # fmt: skip
        raise ValueError(f"prior_precision must be 'marglik', 'model' or a positive float, got {prior_precision!r}")
    for name, value in (("map_steps", map_steps), ("marglik_steps", marglik_steps)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor for laplace (laplace-torch's data loader), got {type(x).__name__}")
    Laplace = _import_laplace()
    from torch.utils.data import DataLoader, TensorDataset

    t0 = time.perf_counter()
    point = point_network(model)  # Bayesian sites as parameters at θ̂, frozen weights as buffers
    with torch.no_grad():
        out = model_output(point, x)
    if y.shape != out.shape:
        raise ValueError(f"y: expected shape {tuple(out.shape)} (the network's output), got {tuple(y.shape)}")
    map_info = _refine_map(point, model, x, y, map_steps)
    point.requires_grad_(True)
    net = _Flat(point)
    named = dict(net.named_parameters())  # "m.net.0.weight" -> parameter at θ_*
    if subset == "all":
        la_names, extra = list(named), {}
    else:
        layer = "m." + _last_layer(point)
        la_names = [n for n in named if n.rpartition(".")[0] == layer]
        extra = {"last_layer_name": layer}
    sites = [n[2:] for n in la_names]  # site names: "net.0.weight"
    prior_mean = torch.cat([model.priors[s][0].reshape(-1) for s in sites])  # θ̂ of the Laplace weights, (D,)
    model_prec = torch.cat([model.priors[s][1].reshape(-1) ** -2 for s in sites])  # (D,)
    if prior_precision == "model":
        if structure == "kron":
            per_tensor = [model.priors[s][1] ** -2 for s in sites]
            if any(not torch.allclose(p, p.flatten()[0].expand_as(p)) for p in per_tensor):
                raise ValueError("prior_precision='model' with structure='kron' needs one prior scale per tensor")
            init: Any = torch.stack([p.flatten()[0] for p in per_tensor])  # layer-wise, (n_tensors,)
        else:
            init = model_prec
    elif prior_precision == "marglik":
        init = float(model_prec.mean())
    else:
        init = float(prior_precision)
    la = Laplace(net, "regression", subset_of_weights=subset, hessian_structure=structure,
                 sigma_noise=model.obs_noise, prior_precision=init, prior_mean=prior_mean, **extra)  # fmt: skip
    yf = y.reshape(y.shape[0], -1)  # (N, K)
    with _quiet():
        la.fit(DataLoader(TensorDataset(x, yf), batch_size=x.shape[0]))
        if prior_precision == "marglik":
            la.optimize_prior_precision(method="marglik", pred_type="glm", n_steps=marglik_steps, lr=marglik_lr,
                                        init_prior_prec=init)  # fmt: skip
        wall = time.perf_counter() - t0
        log_marglik = float(la.log_marginal_likelihood().detach())
    theta_star = {s: named[n].detach().clone() for s, n in zip(sites, la_names, strict=True)}
    fixed = {n[2:]: p.detach().clone() for n, p in named.items() if n not in la_names}  # at θ_*, not sampled
    mean = la.mean.detach()  # (D,)
    curvature = la.H if isinstance(la.H, torch.Tensor) else vars(la.H)  # Kron: factors (or their eigen-pairs)

    def jacobians(x_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _quiet():
            if subset == "all":
                Js, f = la.backend.jacobians(x_new)
            else:
                Js, f = la.backend.last_layer_jacobians(x_new)
        return Js.detach(), f.detach()  # (B, K, D), (B, K)

    def predict(x_new: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x_new, torch.Tensor):
            raise ValueError(f"x must be a tensor for laplace, got {type(x_new).__name__}")
        with _quiet():
            f_mu, f_var = la(x_new, pred_type="glm")  # (B, K), (B, K, K)
        var = f_var.diagonal(dim1=-2, dim2=-1) + model.obs_noise**2
        with torch.no_grad():
            shape = model_output(point, x_new[:1]).shape[1:]
        return f_mu.detach().reshape(-1, *shape), var.detach().sqrt().reshape(-1, *shape)

    def sampler(num_draws: int, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator(device=mean.device).manual_seed(seed)
        with _quiet():
            theta = la.sample(num_draws, generator=gen).detach()  # (S, D), order of la_names
        out, i = {}, 0
        for s in sites:
            n = theta_star[s].numel()
            out[s] = theta[:, i : i + n].reshape(num_draws, *theta_star[s].shape)
            i += n
        return out

    def outputs(draws: dict[str, torch.Tensor], x_new: Any) -> torch.Tensor:
        theta = torch.cat([draws[s].reshape(draws[s].shape[0], -1) for s in sites], 1)  # (S, D)
        Js, f = jacobians(x_new)
        f_lin = f[None] + torch.einsum("bkd,sd->sbk", Js, theta - mean)  # (S, B, K): linearised network
        with torch.no_grad():
            shape = model_output(point, x_new[:1]).shape[1:]
        return f_lin.reshape(theta.shape[0], -1, *shape)

    pp = la.prior_precision
    return InferenceResult(
        method=f"laplace-{structure}" + ("-ll" if subset == "last_layer" else ""),
        predict=predict,
        wall_seconds=wall,
        memory_bytes=tensor_bytes(mean) + tensor_bytes(curvature),
        diagnostics={
            "structure": structure,
            "subset": subset,
            "n_params": int(mean.numel()),
            "prior_precision": [float(v) for v in torch.as_tensor(pp).reshape(-1)[:64]],
            "prior_precision_source": prior_precision if isinstance(prior_precision, str) else "fixed",
            "log_marglik": log_marglik,
            "map_steps": map_steps,
            "laplace_sites": sites,
            "fixed_at_map": sorted(fixed),
            **map_info,
        },
        fitted=la,
        model=model,
        data=(x, y),
        sampler=sampler,
        outputs=outputs,
    )
