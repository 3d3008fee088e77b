"""Inverted-pendulum tasks, distribution shifts, the LQR expert, and decision-transformer datasets.

See :mod:`ppl_kbnn.envs.pendulum` (tasks, shifts, expert, rollouts), :mod:`ppl_kbnn.envs.dataset`
(returns-to-go, normalisation, contexts, the decision-transformer policy) and
:mod:`ppl_kbnn.envs.stats` (Wilson interval). ``python -m ppl_kbnn.envs.survey`` measures every
named shift; results are in ``docs/pendulum-envs.md``. Importing this package registers every named
task as a gymnasium id (``ppl_kbnn/InvertedPendulum-<name>-v0``, see :func:`task_id`).
"""

from .dataset import DTDataset, DTPolicy, Normalizer, make_contexts, returns_to_go
from .pendulum import (
    ACTION_BOUND,
    ENV_ID,
    GENERIC_ID,
    SHIFTS,
    AngleBiasObservation,
    ExpertPolicy,
    Policy,
    ShiftedInvertedPendulumEnv,
    SuccessRate,
    Task,
    collect_episodes,
    get_task,
    linearize,
    lqr_gain,
    make_env,
    rollout,
    solve_dare,
    success_rate,
    task_id,
    time_episode,
)
from .stats import wilson_interval

__all__ = [
    "ACTION_BOUND",
    "ENV_ID",
    "GENERIC_ID",
    "SHIFTS",
    "AngleBiasObservation",
    "DTDataset",
    "DTPolicy",
    "ExpertPolicy",
    "Normalizer",
    "Policy",
    "ShiftedInvertedPendulumEnv",
    "SuccessRate",
    "Task",
    "collect_episodes",
    "get_task",
    "linearize",
    "lqr_gain",
    "make_contexts",
    "make_env",
    "returns_to_go",
    "rollout",
    "solve_dare",
    "success_rate",
    "task_id",
    "time_episode",
    "wilson_interval",
]
