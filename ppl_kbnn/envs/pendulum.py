r"""Inverted-pendulum tasks (gymnasium ``InvertedPendulum-v5``, MuJoCo), shifts, LQR expert, rollouts.

The environment
---------------
A cart on a rail (slide joint, range ±1 m) carries a pole (hinge joint). The observation is
``x = (cart position, pole angle θ, cart velocity, pole angular velocity)`` (4,), the action is the
motor control ``u ∈ [-3, 3]`` (1,), multiplied by the actuator gear (100) to give the force on the
cart. One env step is ``frame_skip = 2`` MuJoCo steps of 0.02 s (RK4), so ``dt = 0.04`` s. The reward
is 1 per step while ``|θ| <= 0.2`` rad; the episode terminates when ``|θ| > 0.2`` (the *true* angle,
whatever the sensor says). **Success** means surviving ``max_steps`` steps (1000 in the protocol).

Tasks and shifts
----------------
A :class:`Task` is the nominal model with multiplicative factors on physical parameters, applied to
``env.unwrapped.model`` after ``gymnasium.make`` (see :func:`make_env`), and an additive sensor bias:

* ``pole_mass``: pole ``body_mass`` *and* ``body_inertia`` scaled together (a denser pole, same shape);
* ``cart_mass``: the same for the cart;
* ``gear``: the actuator gear (force per unit of action); ``-1`` flips the sign of the actuator;
* ``gravity``: ``opt.gravity``;
* ``angle_bias``: added to the observed pole angle by an observation wrapper (a mis-calibrated
  sensor); the dynamics and the termination test see the true angle.

:data:`SHIFTS` names the tasks used in the study; ``docs/pendulum-envs.md`` has the measured success
of the nominal and recomputed experts on each.

LQR expert
----------
Around the upright equilibrium ``x = 0, u = 0`` the env step (both MuJoCo sub-steps, with the
task's parameters) is linearised by central finite differences on ``mj_step``:

.. math::
    x_{t+1} \approx A x_t + B u_t, \qquad
    A_{:,i} = \frac{f(\varepsilon e_i, 0) - f(-\varepsilon e_i, 0)}{2\varepsilon}, \quad
    B = \frac{f(0, \varepsilon) - f(0, -\varepsilon)}{2\varepsilon}

(``mjd_transitionFD`` does not support the RK4 integrator of this model). The discrete-time LQR
minimises ``Σ_t x_tᵀ Q x_t + u_tᵀ R u_t`` with ``Q = diag(1, 10, 1, 1)``, ``R = 0.1``; its gain is

.. math::
    K = (R + B^\top P B)^{-1} B^\top P A, \qquad u_t = -K x_t,

where ``P`` solves the discrete algebraic Riccati equation (DARE)

.. math::
    P = Q + A^\top P A - A^\top P B (R + B^\top P B)^{-1} B^\top P A.

:func:`solve_dare` solves it with ``scipy.linalg.solve_discrete_are``. :class:`ExpertPolicy` clips
``-K x`` to the action bounds ±3. The expert *for* a task
uses that task's linearisation and, for a sensor-bias task, knows the bias and subtracts it from the
observation before applying the gain; the *nominal* expert (``ExpertPolicy(Task.nominal())``) run
on a shifted task uses the nominal gain on the raw (possibly biased) observation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.envs.mujoco.inverted_pendulum_v5 import InvertedPendulumEnv

from .stats import wilson_interval

__all__ = [
    "ACTION_BOUND",
    "ENV_ID",
    "GENERIC_ID",
    "SHIFTS",
    "AngleBiasObservation",
    "ExpertPolicy",
    "Policy",
    "ShiftedInvertedPendulumEnv",
    "SuccessRate",
    "Task",
    "collect_episodes",
    "get_task",
    "linearize",
    "lqr_gain",
    "make_env",
    "rollout",
    "solve_dare",
    "success_rate",
    "task_id",
    "time_episode",
]

ENV_ID = "InvertedPendulum-v5"
ACTION_BOUND = 3.0  # the motor's ctrlrange is [-3, 3]
STATE_DIM = 4
ACT_DIM = 1
ANGLE_INDEX = 1  # observation index of the pole angle
Q_DEFAULT = (1.0, 10.0, 1.0, 1.0)  # diag(Q) over (cart x, θ, cart ẋ, θ̇)
R_DEFAULT = 0.1


# ---------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class Task:
    """A pendulum task: the nominal MuJoCo model with multiplicative factors and a sensor bias.

    Attributes:
        name: label used in tables and logs.
        pole_mass: factor on the pole's mass and rotational inertia (> 0).
        cart_mass: factor on the cart's mass and rotational inertia (> 0).
        gear: factor on the actuator gear (non-zero; negative flips the actuator's sign).
        gravity: factor on gravity (> 0).
        angle_bias: radians added to the *observed* pole angle (the dynamics are unchanged).
    """

    name: str = "nominal"
    pole_mass: float = 1.0
    cart_mass: float = 1.0
    gear: float = 1.0
    gravity: float = 1.0
    angle_bias: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "name":
                continue
            v = getattr(self, f.name)
            if not math.isfinite(v):
                raise ValueError(f"Task {self.name!r}: {f.name}={v} is not finite")
        for attr in ("pole_mass", "cart_mass", "gravity"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"Task {self.name!r}: {attr} factor must be > 0, got {getattr(self, attr)}")
        if self.gear == 0:
            raise ValueError(f"Task {self.name!r}: gear factor must be non-zero (the cart could not be moved)")

    @classmethod
    def nominal(cls) -> Task:
        """The unmodified ``InvertedPendulum-v5``."""
        return cls("nominal")

    @property
    def is_nominal(self) -> bool:
        """True when every shift factor is 1 and the sensor bias 0 (the pre-training task)."""
        return (self.pole_mass, self.cart_mass, self.gear, self.gravity, self.angle_bias) == (1, 1, 1, 1, 0)


#: Named tasks. "Uninformative" shifts are those the nominal LQR expert still handles
#: (see docs/pendulum-envs.md for the measured success of each).
SHIFTS: dict[str, Task] = {
    t.name: t
    for t in (
        Task.nominal(),
        # uninformative: the nominal LQR still balances these
        Task("pole_mass_x4", pole_mass=4.0),
        Task("gravity_x3", gravity=3.0),
        Task("gear_x0.3", gear=0.3),
        # informative: the nominal LQR fails, an LQR recomputed for the task succeeds
        Task("gear_x0.15", gear=0.15),
        Task("gear_x6", gear=6.0),
        Task("gear_x10", gear=10.0),
        Task("gear_flip", gear=-1.0),
        Task("sensor_bias_0.1", angle_bias=0.1),
        Task("sensor_bias_0.05", angle_bias=0.05),
        Task("cart_mass_x10", cart_mass=10.0),
    )
}


def get_task(task: Task | str) -> Task:
    """``task`` itself, or the named task from :data:`SHIFTS`; unknown names raise ``ValueError``."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        if task not in SHIFTS:
            raise ValueError(f"unknown shift name {task!r}; known shifts: {sorted(SHIFTS)}")
        return SHIFTS[task]
    raise ValueError(f"task: expected a Task or a shift name (str), got {type(task).__name__}")


class AngleBiasObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Adds a constant ``bias`` (radians) to the observed pole angle ``obs[1]``.

    Records its constructor arguments (``gymnasium.utils.RecordConstructorArgs``), so an env wrapped in it
    passes ``gymnasium.utils.env_checker.check_env`` and ``gym.make(env.spec)`` re-applies it. The
    registered tasks (:func:`task_id`) do not need it: their base env applies the bias itself.
    """

    def __init__(self, env: gym.Env, bias: float) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, bias=float(bias))
        gym.ObservationWrapper.__init__(self, env)
        self.bias = float(bias)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        obs = np.array(observation, dtype=np.float64, copy=True)  # (4,)
        obs[ANGLE_INDEX] += self.bias
        return obs


def _apply_physics(model: Any, task: Task) -> None:
    """Scale the physical parameters of a freshly loaded ``InvertedPendulum`` model in place."""
    pole = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "pole")
    cart = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "cart")
    if pole < 0 or cart < 0:
        raise ValueError("make_env: the model has no 'pole'/'cart' bodies; is this InvertedPendulum?")
    model.body_mass[pole] *= task.pole_mass
    model.body_inertia[pole] *= task.pole_mass
    model.body_mass[cart] *= task.cart_mass
    model.body_inertia[cart] *= task.cart_mass
    model.actuator_gear[0, 0] *= task.gear
    model.opt.gravity[:] = model.opt.gravity * task.gravity


class ShiftedInvertedPendulumEnv(InvertedPendulumEnv):
    """``InvertedPendulum-v5`` with a :class:`Task`'s shift built in (the env behind the registered ids).

    The physical factors are written into ``self.model`` at construction (followed by ``mj_setConst`` so
    derived constants such as subtree masses follow); the sensor bias is added to the observed pole angle of
    every observation ``reset`` and ``step`` return, while termination (``|θ| > 0.2``) and the dynamics see
    the true angle. Every argument is recorded (``EzPickle`` and ``env.spec.kwargs``), so
    ``gym.make(env.spec)`` rebuilds the same shifted physics. ``self.task`` is the task.

    Args:
        name, pole_mass, cart_mass, gear, gravity, angle_bias: the :class:`Task` fields.
        **kwargs: passed to ``InvertedPendulumEnv`` (e.g. ``render_mode``, ``reset_noise_scale``).
    """

    def __init__(
        self,
        name: str = "nominal",
        pole_mass: float = 1.0,
        cart_mass: float = 1.0,
        gear: float = 1.0,
        gravity: float = 1.0,
        angle_bias: float = 0.0,
        **kwargs: Any,
    ) -> None:
        # the Task validates the factors before any MuJoCo work
        task = Task(name, pole_mass=pole_mass, cart_mass=cart_mass, gear=gear, gravity=gravity, angle_bias=angle_bias)
        super().__init__(**kwargs)
        gym.utils.EzPickle.__init__(self, name=name, pole_mass=pole_mass, cart_mass=cart_mass, gear=gear,
                                    gravity=gravity, angle_bias=angle_bias, **kwargs)  # fmt: skip
        _apply_physics(self.model, task)
        mujoco.mj_setConst(self.model, self.data)
        self.task = task

    def _biased(self, observation: np.ndarray) -> np.ndarray:
        if self.task.angle_bias == 0.0:
            return observation
        obs = np.array(observation, dtype=np.float64, copy=True)  # (4,)
        obs[ANGLE_INDEX] += self.task.angle_bias
        return obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """One env step; termination uses the true angle, the returned observation carries the bias."""
        observation, reward, terminated, truncated, info = super().step(action)
        return self._biased(observation), reward, terminated, truncated, info

    def reset_model(self) -> np.ndarray:
        """Reset the MuJoCo state (as ``InvertedPendulumEnv``); returns the biased observation."""
        return self._biased(super().reset_model())


NAMESPACE = "ppl_kbnn"
GENERIC_ID = f"{NAMESPACE}/InvertedPendulum-v0"


def task_id(task: Task | str) -> str:
    """The gymnasium id of a named task (``"sensor_bias_0.1"`` -> ``"ppl_kbnn/InvertedPendulum-sensor_bias_0.1-v0"``).

    ``gym.make(task_id(name))`` builds exactly the shifted env of :func:`make_env` (1000-step episodes).
    Without importing ``ppl_kbnn`` first, ``gym.make("ppl_kbnn.envs:" + task_id(name))`` imports it.
    A :class:`Task` that is not in :data:`SHIFTS` has no id of its own: it is made from
    :data:`GENERIC_ID` with the task fields as keyword arguments (what :func:`make_env` does).
    """
    task = get_task(task)
    if SHIFTS.get(task.name) != task:
        raise ValueError(f"task_id: {task!r} is not a named task of SHIFTS; use make_env (or {GENERIC_ID!r} "
                         "with the task fields as keyword arguments)")  # fmt: skip
    return f"{NAMESPACE}/InvertedPendulum-{task.name}-v0"


def _task_kwargs(task: Task) -> dict[str, Any]:
    return {f.name: getattr(task, f.name) for f in fields(task)}


def _register() -> None:
    """Register :data:`GENERIC_ID` and one id per named task (idempotent)."""
    entry = f"{__name__}:ShiftedInvertedPendulumEnv"
    if GENERIC_ID not in gym.registry:
        gym.register(GENERIC_ID, entry_point=entry, max_episode_steps=1000)
    for task in SHIFTS.values():
        env_id = task_id(task)
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=entry, max_episode_steps=1000, kwargs=_task_kwargs(task))


_register()


def make_env(
    task: Task | str = "nominal",
    seed: int | None = None,
    *,
    max_episode_steps: int = 1000,
    reset_noise_scale: float | None = None,
) -> gym.Env:
    """``gymnasium.make`` of the task's registered id (:func:`task_id`), or of :data:`GENERIC_ID` with the task.

    The shifted physics and the sensor bias live in the base env (:class:`ShiftedInvertedPendulumEnv`), so
    ``env.spec`` records them and ``gym.make(env.spec)`` reproduces the task exactly. With ``seed``, the
    env is reset once with that seed and the action space is seeded. ``env.unwrapped.task`` records the
    task. ``reset_noise_scale`` (default: gymnasium's 0.01) is the half-width of the uniform noise on the
    initial ``qpos`` and ``qvel``.
    """
    task = get_task(task)
    if max_episode_steps < 1:
        raise ValueError(f"make_env: max_episode_steps must be >= 1, got {max_episode_steps}")
    extra: dict[str, Any] = {}
    if reset_noise_scale is not None:
        if not (math.isfinite(reset_noise_scale) and reset_noise_scale >= 0):
            raise ValueError(f"make_env: reset_noise_scale must be finite and >= 0, got {reset_noise_scale!r}")
        extra["reset_noise_scale"] = float(reset_noise_scale)
    if SHIFTS.get(task.name) == task:
        env = gym.make(task_id(task), max_episode_steps=max_episode_steps, **extra)
    else:
        env = gym.make(GENERIC_ID, max_episode_steps=max_episode_steps, **_task_kwargs(task), **extra)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


# ---------------------------------------------------------------------------------------------
# LQR


def linearize(task: Task | str = "nominal", eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Central finite-difference linearisation ``(A (4, 4), B (4, 1))`` of one env step at ``x = 0, u = 0``.

    The state is ``(qpos, qvel) = (cart x, θ, cart ẋ, θ̇)``, the same order as the observation; one
    env step is ``frame_skip`` calls of ``mj_step`` with the control held.
    """
    task = get_task(task)
    env = make_env(task)
    try:
        model = env.unwrapped.model
        n_sub = int(env.unwrapped.frame_skip)
    finally:
        env.close()
    data = mujoco.MjData(model)

    def step(x: np.ndarray, u: float) -> np.ndarray:  # (4,), scalar -> (4,)
        mujoco.mj_resetData(model, data)
        data.qpos[:] = x[:2]
        data.qvel[:] = x[2:]
        data.ctrl[:] = u
        for _ in range(n_sub):
            mujoco.mj_step(model, data)
        return np.concatenate([data.qpos, data.qvel])

    zero = np.zeros(STATE_DIM)
    A = np.empty((STATE_DIM, STATE_DIM))
    for i in range(STATE_DIM):
        e = np.zeros(STATE_DIM)
        e[i] = eps
        A[:, i] = (step(e, 0.0) - step(-e, 0.0)) / (2 * eps)
    B = ((step(zero, eps) - step(zero, -eps)) / (2 * eps))[:, None]  # (4, 1)
    return A, B


def solve_dare(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray) -> np.ndarray:
    r"""Stabilising solution ``P`` of ``P = Q + AᵀPA − AᵀPB(R + BᵀPB)⁻¹BᵀPA``: ``scipy.linalg.solve_discrete_are``.

    SciPy's solver (a generalised Schur decomposition of the extended symplectic pencil); this wrapper
    checks the shapes, symmetrises the result and checks the residual of the equation.

    Raises:
        ValueError: on bad shapes, or if there is no stabilising solution (e.g. ``(A, B)`` not
            stabilisable).
    """
    from scipy.linalg import solve_discrete_are

    A, B, Q, R = (np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in (A, B, Q, R))
    n, m = B.shape
    if A.shape != (n, n) or Q.shape != (n, n) or R.shape != (m, m):
        raise ValueError(f"solve_dare: shapes A {A.shape}, B {B.shape}, Q {Q.shape}, R {R.shape} do not match")
    try:
        P = solve_discrete_are(A, B, Q, R)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise ValueError(f"solve_dare: no stabilising solution (is (A, B) stabilisable?): {exc}") from None
    P = 0.5 * (P + P.T)
    S = R + B.T @ P @ B
    resid = Q + A.T @ P @ A - A.T @ P @ B @ np.linalg.solve(S, B.T @ P @ A) - P
    if not np.all(np.isfinite(P)) or np.linalg.norm(resid) > 1e-6 * max(1.0, np.linalg.norm(P)):
        raise ValueError("solve_dare: no converged stabilising solution (is (A, B) stabilisable?)")
    return P


def lqr_gain(
    task: Task | str = "nominal", Q: np.ndarray | None = None, R: np.ndarray | float | None = None
) -> np.ndarray:
    """Discrete LQR gain ``K`` (1, 4) for the task's linearisation, ``u = -K x``; defaults ``Q = diag(1, 10, 1, 1)``,
    ``R = 0.1``."""
    A, B = linearize(task)
    Qm = np.diag(Q_DEFAULT) if Q is None else np.asarray(Q, dtype=np.float64)
    Rm = np.atleast_2d(R_DEFAULT if R is None else np.asarray(R, dtype=np.float64))
    P = solve_dare(A, B, Qm, Rm)
    return np.linalg.solve(Rm + B.T @ P @ B, B.T @ P @ A)  # (1, 4)


# ---------------------------------------------------------------------------------------------
# policies and rollouts


class Policy:
    """Interface used by :func:`rollout`: ``reset()`` at episode start, ``act(obs) -> action (1,)``,
    and ``update(action, reward)`` after each step with the action actually applied (noise included).

    Plain callables ``obs -> action`` are accepted by :func:`rollout` too.
    """

    def reset(self) -> None:
        """Forget the current episode."""

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The action ``(1,)`` for observation ``obs`` ``(4,)`` (subclasses implement it)."""
        raise NotImplementedError

    def update(self, action: np.ndarray, reward: float) -> None:
        """Record the applied action and the reward of the last step."""

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.act(obs)


class ExpertPolicy(Policy):
    """LQR expert designed for ``task``: ``u = clip(-K (obs - b), -3, 3)``.

    ``b`` is the task's sensor bias on the pole angle when ``knows_bias`` (the expert "recomputed
    for the task" is calibrated), else zero. ``ExpertPolicy(Task.nominal())`` is the nominal expert.
    """

    def __init__(
        self,
        task: Task | str = "nominal",
        *,
        knows_bias: bool = True,
        Q: np.ndarray | None = None,
        R: np.ndarray | float | None = None,
    ) -> None:
        self.task = get_task(task)
        self.K = lqr_gain(self.task, Q, R)  # (1, 4)
        self.bias = np.zeros(STATE_DIM)  # (4,)
        if knows_bias:
            self.bias[ANGLE_INDEX] = self.task.angle_bias

    def act(self, obs: np.ndarray) -> np.ndarray:
        """LQR feedback on the bias-corrected observation, clipped to the actuator range:
        ``clip(−K (obs − bias), ±ACTION_BOUND)``, ``(1,)``."""
        x = np.asarray(obs, dtype=np.float64) - self.bias  # (4,)
        return np.clip(-self.K @ x, -ACTION_BOUND, ACTION_BOUND)  # (1,)

    def __repr__(self) -> str:
        return f"ExpertPolicy(task={self.task.name!r}, K={np.array2string(self.K[0], precision=3)})"


def rollout(
    env: gym.Env,
    policy: Policy | Callable[[np.ndarray], np.ndarray],
    *,
    seed: int,
    max_steps: int = 1000,
    action_noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Run one episode of at most ``max_steps`` steps from ``env.reset(seed=seed)``.

    The applied action is ``clip(clip(policy(obs), -3, 3) + action_noise · ξ, -3, 3)`` with ``ξ ~ N(0, 1)`` drawn
    from ``rng`` (default ``np.random.default_rng(seed)``); exploration noise for data collection.

    Returns:
        dict with ``states`` (T, 4) float64 (the observations the policy saw, bias included),
        ``actions`` (T, 1) float64 (applied, noise included), ``policy_actions`` (T, 1) float64 (the
        policy's own clipped actions, before noise), ``rewards`` (T,) float64, ``timesteps`` (T,) int64
        ``0..T-1``, ``length`` T, ``success`` (survived ``max_steps`` steps without termination),
        ``seed``, and ``task`` (name, if the env was made by :func:`make_env`).
    """
    if max_steps < 1:
        raise ValueError(f"rollout: max_steps must be >= 1, got {max_steps}")
    if action_noise < 0:
        raise ValueError(f"rollout: action_noise must be >= 0, got {action_noise}")
    limit = env.spec.max_episode_steps if env.spec is not None else None
    if limit is not None and max_steps > limit:
        raise ValueError(f"rollout: max_steps={max_steps} exceeds the env's time limit {limit}; see make_env")
    if rng is None:
        rng = np.random.default_rng(seed)
    act = policy.act if isinstance(policy, Policy) else policy
    if isinstance(policy, Policy):
        policy.reset()

    obs, _ = env.reset(seed=seed)
    states, actions, policy_actions, rewards = [], [], [], []
    terminated = False
    for _ in range(max_steps):
        a_policy = np.clip(np.asarray(act(obs), dtype=np.float64).reshape(ACT_DIM), -ACTION_BOUND, ACTION_BOUND)
        a = a_policy
        if action_noise > 0:
            a = np.clip(a_policy + action_noise * rng.standard_normal(ACT_DIM), -ACTION_BOUND, ACTION_BOUND)
        states.append(np.asarray(obs, dtype=np.float64))
        actions.append(a)
        policy_actions.append(a_policy)
        obs, r, terminated, truncated, _ = env.step(a.astype(np.float32))
        rewards.append(float(r))
        if isinstance(policy, Policy):
            policy.update(a, float(r))
        if terminated or truncated:
            break
    T = len(states)
    task = getattr(env.unwrapped, "task", None)
    return {
        "states": np.stack(states),  # (T, 4)
        "actions": np.stack(actions),  # (T, 1)
        "policy_actions": np.stack(policy_actions),  # (T, 1)
        "rewards": np.asarray(rewards),  # (T,)
        "timesteps": np.arange(T, dtype=np.int64),  # (T,)
        "length": T,
        "success": bool(T == max_steps and not terminated),
        "seed": seed,
        "task": task.name if task is not None else None,
    }


class SuccessRate(NamedTuple):
    """``successes`` out of ``n`` episodes, with the Wilson 95 % ``interval``."""

    successes: int
    n: int
    interval: tuple[float, float]

    @property
    def rate(self) -> float:
        """Share of successful episodes, ``successes / n``."""
        return self.successes / self.n

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{self.successes}/{self.n} [{lo:.2f}, {hi:.2f}]"


def success_rate(
    task: Task | str,
    policy: Policy | Callable[[np.ndarray], np.ndarray],
    n_episodes: int = 20,
    seed: int = 0,
    *,
    max_steps: int = 1000,
    action_noise: float = 0.0,
) -> SuccessRate:
    """Episodes ``i = 0..n_episodes-1`` on a fresh env of ``task`` with seeds ``seed + i``; returns
    ``(successes, n, wilson 95 % interval)``."""
    if n_episodes < 1:
        raise ValueError(f"success_rate: n_episodes must be >= 1, got {n_episodes}")
    env = make_env(task, max_episode_steps=max(1000, max_steps))
    try:
        k = sum(
            rollout(env, policy, seed=seed + i, max_steps=max_steps, action_noise=action_noise)["success"]
            for i in range(n_episodes)
        )
    finally:
        env.close()
    return SuccessRate(int(k), n_episodes, wilson_interval(int(k), n_episodes))


def collect_episodes(
    task: Task | str,
    n_episodes: int,
    *,
    policy: Policy | None = None,
    seed: int = 0,
    max_steps: int = 1000,
    action_noise: float = 0.0,
) -> list[dict[str, Any]]:
    """``n_episodes`` rollouts (seeds ``seed + i``) of ``policy`` (default: the expert for ``task``)."""
    task = get_task(task)
    if n_episodes < 1:
        raise ValueError(f"collect_episodes: n_episodes must be >= 1, got {n_episodes}")
    policy = ExpertPolicy(task) if policy is None else policy
    env = make_env(task, max_episode_steps=max(1000, max_steps))
    try:
        return [
            rollout(env, policy, seed=seed + i, max_steps=max_steps, action_noise=action_noise)
            for i in range(n_episodes)
        ]
    finally:
        env.close()


def time_episode(task: Task | str, policy: Policy, *, max_steps: int = 1000, seed: int = 0) -> float:
    """Wall-clock seconds of one ``max_steps`` rollout (env already made)."""
    env = make_env(task, max_episode_steps=max(1000, max_steps))
    try:
        t0 = time.perf_counter()
        rollout(env, policy, seed=seed, max_steps=max_steps)
        return time.perf_counter() - t0
    finally:
        env.close()
