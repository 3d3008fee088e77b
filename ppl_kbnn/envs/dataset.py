r"""Decision-transformer data: returns-to-go, normalisation, fixed-length contexts, and a DT policy.

Returns-to-go (undiscounted, as in the Decision Transformer) of an episode with rewards ``r_0..r_{T-1}``:

.. math::
    \hat R_t = \sum_{t' = t}^{T-1} r_{t'}, \qquad \hat R_{t+1} = \hat R_t - r_t .

Normalisation (:class:`Normalizer`, fitted on the *nominal* data and saved with the model):

.. math::
    \tilde s = (s - \mu_s) / \sigma_s, \qquad \tilde R = \hat R / c_R, \qquad \tilde a = a / c_a,

with ``μ_s, σ_s`` the per-dimension mean and std of the states, ``c_R`` the largest return in the
data (1000 for successful 1000-step episodes) and ``c_a = 3`` (the action bound), so that normalised
actions lie in ``[-1, 1]`` as a ``tanh`` action head produces.

Contexts (:func:`make_contexts`): one sample per (episode, step ``t``) — the ``K`` steps ending at
``t``, and the target is the (normalised, applied) action ``a_t``, which the network reads at the state
token of the last step. **Episode starts are left-padded with a mask**: for ``t < K-1`` the first
``K-1-t`` steps are zeros with ``attention_mask`` ``False``, exactly as
:meth:`DecisionTransformer.get_action` pads short histories, so training inputs and rollout inputs are
built the same way (``full_only=True`` keeps only windows with ``K`` real steps). The action slot of
the last step is a zero placeholder in both (the network cannot see it anyway: its action token
comes after the state token that is read).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .pendulum import ACT_DIM, ACTION_BOUND, STATE_DIM, Policy

__all__ = ["DTDataset", "DTPolicy", "Normalizer", "make_contexts", "returns_to_go"]

CONTEXT_KEYS = ("returns_to_go", "states", "actions", "timesteps", "attention_mask")


def returns_to_go(rewards: np.ndarray | Sequence[float]) -> np.ndarray:
    """``R̂_t = Σ_{t' >= t} r_{t'}`` (T,) float64 for rewards (T,)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"returns_to_go: rewards must be 1-D (T,), got shape {r.shape}")
    return np.cumsum(r[::-1])[::-1].copy()


@dataclass(frozen=True)
class Normalizer:
    """Input/output scaling of the decision transformer; save it with the model (``to_dict``).

    Attributes:
        state_mean, state_std: per-dimension state statistics (4 floats each, std > 0).
        return_scale: divisor of returns-to-go (> 0).
        action_scale: divisor of actions (> 0); 3.0 maps the action bounds to ``[-1, 1]``.
    """

    state_mean: tuple[float, ...]
    state_std: tuple[float, ...]
    return_scale: float
    action_scale: float = ACTION_BOUND

    def __post_init__(self) -> None:
        mean, std = tuple(map(float, self.state_mean)), tuple(map(float, self.state_std))
        object.__setattr__(self, "state_mean", mean)
        object.__setattr__(self, "state_std", std)
        if len(mean) != len(std) or len(mean) < 1:
            raise ValueError(f"Normalizer: state_mean ({len(mean)}) and state_std ({len(std)}) need one entry per dim")
        if not all(np.isfinite(mean)) or not all(s > 0 and np.isfinite(s) for s in std):
            raise ValueError(f"Normalizer: need finite state_mean and finite state_std > 0, got {mean}, {std}")
        for name in ("return_scale", "action_scale"):
            v = float(getattr(self, name))
            if not (v > 0 and np.isfinite(v)):
                raise ValueError(f"Normalizer: {name} must be finite and > 0, got {v}")
            object.__setattr__(self, name, v)

    @classmethod
    def fit(
        cls,
        episodes: Sequence[dict[str, Any]],
        *,
        action_scale: float = ACTION_BOUND,
        return_scale: float | None = None,
        min_std: float = 1e-6,
    ) -> Normalizer:
        """Statistics of all states of ``episodes`` (pass the nominal data); ``return_scale`` defaults to the
        largest episode return (at least 1)."""
        if len(episodes) == 0:
            raise ValueError("Normalizer.fit: need at least one episode")
        states = np.concatenate([np.asarray(ep["states"], dtype=np.float64) for ep in episodes])  # (ΣT, 4)
        if return_scale is None:
            return_scale = max(1.0, max(float(np.sum(ep["rewards"])) for ep in episodes))
        std = np.maximum(states.std(axis=0), min_std)
        return cls(tuple(states.mean(axis=0)), tuple(std), return_scale, action_scale)

    def to_dict(self) -> dict[str, Any]:
        """The normaliser as plain JSON-able lists and floats (stored with the model)."""
        return {
            "state_mean": list(self.state_mean),
            "state_std": list(self.state_std),
            "return_scale": self.return_scale,
            "action_scale": self.action_scale,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        """Rebuild a normaliser from :meth:`to_dict`; raises ``ValueError`` naming missing keys."""
        missing = {"state_mean", "state_std", "return_scale", "action_scale"} - set(d)
        if missing:
            raise ValueError(f"Normalizer.from_dict: missing keys {sorted(missing)}")
        return cls(tuple(d["state_mean"]), tuple(d["state_std"]), d["return_scale"], d["action_scale"])

    def norm_states(self, s: np.ndarray) -> np.ndarray:
        """(..., 4) -> (..., 4)."""
        return (np.asarray(s, dtype=np.float64) - np.asarray(self.state_mean)) / np.asarray(self.state_std)

    def norm_returns(self, r: np.ndarray) -> np.ndarray:
        """Returns-to-go in network units: ``r / return_scale``."""
        return np.asarray(r, dtype=np.float64) / self.return_scale

    def norm_actions(self, a: np.ndarray) -> np.ndarray:
        """Actions in network units: ``a / action_scale``."""
        return np.asarray(a, dtype=np.float64) / self.action_scale

    def denorm_actions(self, a: np.ndarray) -> np.ndarray:
        """Network actions back in environment units: ``a · action_scale``."""
        return np.asarray(a, dtype=np.float64) * self.action_scale


def make_contexts(
    episodes: Sequence[dict[str, Any]],
    K: int,
    normalizer: Normalizer,
    *,
    stride: int = 1,
    full_only: bool = False,
    target: str = "actions",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Decision-transformer samples from episodes (dicts as returned by :func:`rollout`).

    One sample per episode step ``t = 0, stride, 2·stride, …`` (from ``t = K-1`` with ``full_only``):
    the ``K`` steps ``t-K+1..t``, left-padded with zeros and a ``False`` mask before the episode start.

    Returns:
        dict of tensors, ``N`` samples: ``returns_to_go`` (N, K, 1), ``states`` (N, K, 4), ``actions``
        (N, K, 1) (last step: zero placeholder), ``timesteps`` (N, K) long, ``attention_mask`` (N, K)
        bool, ``target`` (N, 1) (the normalised action at step ``t``), all normalised by
        ``normalizer``; floats in ``dtype`` (default: torch's default dtype).

    ``target="actions"`` (default) takes the applied actions (exploration noise included: the labels
    carry that noise); ``target="policy_actions"`` takes the expert's own actions before the noise,
    while the context's action tokens are always the applied actions.
    """
    if target not in ("actions", "policy_actions"):
        raise ValueError(f"make_contexts: target must be 'actions' or 'policy_actions', got {target!r}")
    if not isinstance(K, int | np.integer) or K < 1:
        raise ValueError(f"make_contexts: context length K must be an integer >= 1, got {K!r}")
    if stride < 1:
        raise ValueError(f"make_contexts: stride must be >= 1, got {stride}")
    if len(episodes) == 0:
        raise ValueError("make_contexts: need at least one episode")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    out: dict[str, list[np.ndarray]] = {k: [] for k in (*CONTEXT_KEYS, "target")}
    for i, ep in enumerate(episodes):
        s = normalizer.norm_states(ep["states"])  # (T, 4)
        a = normalizer.norm_actions(ep["actions"])  # (T, 1)
        rtg = normalizer.norm_returns(returns_to_go(ep["rewards"]))[:, None]  # (T, 1)
        ts = np.asarray(ep["timesteps"], dtype=np.int64)  # (T,)
        T = s.shape[0]
        if s.shape != (T, STATE_DIM) or a.shape != (T, ACT_DIM) or rtg.shape[0] != T or ts.shape != (T,):
            raise ValueError(
                f"make_contexts: episode {i} has inconsistent shapes states {s.shape}, actions {a.shape}, "
                f"rewards {rtg.shape[:1]}, timesteps {ts.shape}"
            )
        ends = np.arange(K - 1 if full_only else 0, T, stride)  # (n,) last step of each window
        if ends.size == 0:
            continue
        a_in = a.copy()  # (T, 1): inputs; the last slot of each window is replaced by 0 below

        def windows(x: np.ndarray, ends: np.ndarray = ends) -> np.ndarray:  # (T, ...) -> (n, K, ...)
            padded = np.concatenate([np.zeros((K - 1, *x.shape[1:]), dtype=x.dtype), x])  # (T+K-1, ...)
            idx = ends[:, None] + np.arange(K)[None, :]  # (n, K) rows in `padded`
            return padded[idx]

        out["returns_to_go"].append(windows(rtg))
        out["states"].append(windows(s))
        acts = windows(a_in)  # (n, K, 1)
        acts[:, -1] = 0.0  # placeholder for the action being predicted
        out["actions"].append(acts)
        out["timesteps"].append(windows(ts))
        out["attention_mask"].append(windows(np.ones(T, dtype=bool)))
        y = a if target == "actions" else normalizer.norm_actions(ep[target]).reshape(T, ACT_DIM)  # (T, 1)
        out["target"].append(y[ends])  # (n, 1)
    if not out["target"]:
        raise ValueError(f"make_contexts: no sample (all episodes shorter than K={K} with full_only=True)")
    res = {k: torch.from_numpy(np.concatenate(v)) for k, v in out.items()}
    for k in ("returns_to_go", "states", "actions", "target"):
        res[k] = res[k].to(dtype)
    return res


class DTDataset(torch.utils.data.Dataset):
    """:func:`make_contexts` as a torch ``Dataset``; ``ds[i]`` is a dict of unbatched tensors, ``ds.data`` the
    batched dict, and :meth:`loss_fn` plugs into :func:`ppl_kbnn.nn.train.pretrain`."""

    def __init__(
        self,
        episodes: Sequence[dict[str, Any]],
        K: int,
        normalizer: Normalizer,
        *,
        stride: int = 1,
        full_only: bool = False,
        target: str = "actions",
        dtype: torch.dtype | None = None,
    ) -> None:
        self.K = K
        self.normalizer = normalizer
        self.data = make_contexts(
            episodes, K, normalizer, stride=stride, full_only=full_only, target=target, dtype=dtype
        )

    def __len__(self) -> int:
        return self.data["target"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}

    def inputs(self, idx: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, ...]:
        """``(returns_to_go, states, actions, timesteps, attention_mask)`` rows ``idx``, for ``net(*inputs)``."""
        idx = slice(None) if idx is None else idx
        return tuple(self.data[k][idx] for k in CONTEXT_KEYS)

    def loss_fn(self) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
        """``loss(net, idx)``: MSE between the action read at the last state token and ``target``."""

        def loss(net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
            pred = net(*self.inputs(idx))[:, -1]  # (b, 1)
            return F.mse_loss(pred, self.data["target"][idx])

        return loss


class DTPolicy(Policy):
    """Rollout policy from a :class:`DecisionTransformer` with normalised inputs.

    At step ``t`` the history holds the last ``K`` normalised ``(R̂, s, a, t)`` tuples with the current
    action slot a zero placeholder; :meth:`DecisionTransformer.get_action` left-pads histories shorter
    than ``K`` with a mask (the convention of :func:`make_contexts`). ``R̂_0 = target_return`` (raw,
    e.g. 1000) and ``R̂_{t+1} = R̂_t - r_t``. The network's output is de-normalised and clipped to ±3.

    Speed: about 1 ms per step for a 1-layer ``d_model = 16`` network with ``torch.set_num_threads(1)``;
    with more threads than free cores, torch's thread pool makes each step several times slower.
    """

    def __init__(self, net: nn.Module, normalizer: Normalizer, target_return: float, K: int | None = None) -> None:
        context = net.config.context
        if K is None:
            K = context
        if K < 1 or K != context:
            raise ValueError(f"DTPolicy: K={K} must be >= 1 and equal the network's context {context}")
        self.net = net
        self.normalizer = normalizer
        self.target_return = float(target_return)
        self.K = K
        p = next(net.parameters())
        self._dtype, self._device = p.dtype, p.device
        self._max_t = net.config.max_ep_len - 1
        self.reset()

    def reset(self) -> None:
        self._rtg: list[float] = []  # normalised returns-to-go
        self._states: list[np.ndarray] = []  # normalised (4,)
        self._actions: list[np.ndarray] = []  # normalised (1,)
        self._timesteps: list[int] = []
        self._rtg_raw = self.target_return
        self._t = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Append ``obs`` (and the current return-to-go) to the context and return the network's action in
        environment units, ``(1,)``; call :meth:`update` with the executed action and reward afterwards."""
        self._rtg.append(float(self.normalizer.norm_returns(self._rtg_raw)))
        self._states.append(self.normalizer.norm_states(obs))
        self._actions.append(np.zeros(ACT_DIM))  # placeholder, replaced in update()
        self._timesteps.append(min(self._t, self._max_t))
        del self._rtg[: -self.K], self._states[: -self.K], self._actions[: -self.K], self._timesteps[: -self.K]

        def t(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
            return torch.as_tensor(np.asarray(x), dtype=dtype or self._dtype, device=self._device)

        was_training = self.net.training
        if was_training:  # switching modes walks every submodule: do it only when needed
            self.net.eval()
        y = self.net.get_action(
            t(self._rtg)[:, None],  # (L, 1)
            t(np.stack(self._states)),  # (L, 4)
            t(np.stack(self._actions)),  # (L, 1)
            t(self._timesteps, torch.long),  # (L,)
        )  # (1,)
        if was_training:
            self.net.train()
        a = self.normalizer.denorm_actions(y.detach().cpu().double().numpy())
        return np.clip(a, -ACTION_BOUND, ACTION_BOUND)  # (1,)

    def update(self, action: np.ndarray, reward: float) -> None:
        self._actions[-1] = self.normalizer.norm_actions(np.asarray(action).reshape(ACT_DIM))
        self._rtg_raw -= reward
        self._t += 1
