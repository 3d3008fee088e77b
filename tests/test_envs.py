"""Pendulum tasks, shifts, LQR expert, rollouts, decision-transformer contexts (ppl_kbnn.envs)."""

import json
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from scipy.linalg import solve_discrete_are
from scipy.stats import binomtest, norm

from ppl_kbnn.envs import (
    GENERIC_ID,
    SHIFTS,
    AngleBiasObservation,
    DTDataset,
    DTPolicy,
    ExpertPolicy,
    Normalizer,
    Task,
    collect_episodes,
    get_task,
    linearize,
    lqr_gain,
    make_contexts,
    make_env,
    returns_to_go,
    rollout,
    solve_dare,
    success_rate,
    task_id,
    wilson_interval,
)
from ppl_kbnn.nn.transformer import DecisionTransformer, DTConfig

STEPS = 300  # short episodes; the nominal expert fails within ~150 steps on the informative shifts


@pytest.fixture(scope="module")
def nominal_expert():
    return ExpertPolicy("nominal")


# ---------------------------------------------------------------------------------------------
# tasks and shifts


def test_shift_changes_model_parameters():
    ref = make_env("nominal").unwrapped.model
    pole, cart = ref.body("pole").id, ref.body("cart").id
    m = make_env(Task("x", pole_mass=4.0, cart_mass=2.0, gear=-6.0, gravity=3.0)).unwrapped.model
    assert m.body_mass[pole] == pytest.approx(4.0 * ref.body_mass[pole])
    np.testing.assert_allclose(m.body_inertia[pole], 4.0 * ref.body_inertia[pole])
    assert m.body_mass[cart] == pytest.approx(2.0 * ref.body_mass[cart])
    assert m.actuator_gear[0, 0] == pytest.approx(-6.0 * ref.actuator_gear[0, 0]) == pytest.approx(-600.0)
    np.testing.assert_allclose(m.opt.gravity, [0.0, 0.0, -3 * 9.81])
    # a second env of the same task is not scaled twice
    assert make_env("gear_x6").unwrapped.model.actuator_gear[0, 0] == pytest.approx(600.0)


def test_sensor_bias_shifts_only_the_observed_angle():
    env = make_env("sensor_bias_0.1")
    obs, _ = env.reset(seed=3)
    data = env.unwrapped.data
    true = np.concatenate([data.qpos, data.qvel])
    np.testing.assert_allclose(obs - true, [0.0, 0.1, 0.0, 0.0], atol=1e-12)
    obs, *_ = env.step(np.zeros(1, dtype=np.float32))
    np.testing.assert_allclose(obs[1] - env.unwrapped.data.qpos[1], 0.1, atol=1e-12)


def test_registry_and_bad_inputs():
    assert get_task("gear_x6") is SHIFTS["gear_x6"] and SHIFTS["nominal"] == Task.nominal()
    assert Task.nominal().is_nominal and not SHIFTS["gear_flip"].is_nominal
    with pytest.raises(ValueError, match="unknown shift name 'gear_x7'"):
        make_env("gear_x7")
    with pytest.raises(ValueError, match="gear factor must be non-zero"):
        Task("bad", gear=0.0)
    with pytest.raises(ValueError, match="pole_mass factor must be > 0"):
        Task("bad", pole_mass=-1.0)


# ---------------------------------------------------------------------------------------------
# gymnasium ids, specs, check_env


def _physics(env: gym.Env) -> list[np.ndarray]:
    m = env.unwrapped.model
    return [m.body_mass.copy(), m.body_inertia.copy(), m.actuator_gear.copy(), m.opt.gravity.copy(),
            m.body_subtreemass.copy()]  # fmt: skip


def _trajectory(env: gym.Env, steps: int = 30) -> np.ndarray:
    """Observations of a seeded episode under a fixed open-loop action sequence: (steps + 1, 4)."""
    obs, _ = env.reset(seed=7)
    out = [obs]
    for t in range(steps):
        obs, _, terminated, truncated, _ = env.step(np.array([0.5 * math.sin(0.3 * t)], dtype=np.float32))
        out.append(obs)
        if terminated or truncated:
            break
    return np.array(out)


@pytest.mark.parametrize("name", list(SHIFTS))
def test_registered_id_and_spec_reproduce_the_task_exactly(name):
    ref = make_env(name)
    assert task_id(name) == f"ppl_kbnn/InvertedPendulum-{name}-v0" == ref.spec.id
    by_id = gym.make(task_id(name))
    by_spec = gym.make(ref.spec)
    for env in (by_id, by_spec):
        assert env.unwrapped.task == SHIFTS[name]
        assert env.spec.max_episode_steps == 1000
        for a, b in zip(_physics(ref), _physics(env), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(_trajectory(ref), _trajectory(env))


def test_spec_of_an_unnamed_task_reproduces_it():
    task = Task("custom", pole_mass=2.0, gear=-0.5, gravity=1.5, angle_bias=-0.03)
    ref = make_env(task, max_episode_steps=50)
    assert ref.spec.id == GENERIC_ID and ref.spec.max_episode_steps == 50
    again = gym.make(ref.spec)
    assert again.unwrapped.task == task and again.unwrapped.model.actuator_gear[0, 0] == pytest.approx(-50.0)
    np.testing.assert_array_equal(_trajectory(ref), _trajectory(again))
    with pytest.raises(ValueError, match="not a named task"):
        task_id(task)


def test_the_module_prefix_form_of_the_id():
    env = gym.make("ppl_kbnn.envs:" + task_id("gear_x0.15"))
    assert env.unwrapped.model.actuator_gear[0, 0] == pytest.approx(15.0)


def _check_env_warnings(env: gym.Env) -> set[str]:
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    # the wrapped-env notice names the env; keep its kind only
    return {str(w.message).split("(")[0] for w in caught}


def test_check_env_passes_on_every_task():
    # the warnings gymnasium's own InvertedPendulum-v5 gets (unbounded Box, action range) are the only ones allowed
    allowed = _check_env_warnings(gym.make("InvertedPendulum-v5")) | _check_env_warnings(
        gym.make("InvertedPendulum-v5").unwrapped
    )
    for name in SHIFTS:
        env = make_env(name)
        assert _check_env_warnings(env) <= allowed, name
        assert _check_env_warnings(env.unwrapped) <= allowed, name


def test_angle_bias_wrapper_records_its_arguments():
    env = AngleBiasObservation(gym.make("InvertedPendulum-v5"), 0.1)
    assert env.spec.additional_wrappers[-1].kwargs == {"bias": 0.1}
    assert _check_env_warnings(env) <= _check_env_warnings(gym.make("InvertedPendulum-v5"))
    again = gym.make(env.spec)
    assert isinstance(again, AngleBiasObservation) and again.bias == 0.1
    np.testing.assert_array_equal(_trajectory(env), _trajectory(again))
    np.testing.assert_allclose(_trajectory(env)[:, 1] - _trajectory(gym.make("InvertedPendulum-v5"))[:, 1], 0.1)


# ---------------------------------------------------------------------------------------------
# LQR


def test_linearisation_and_dare():
    A, B = linearize("nominal")
    Ag, Bg = linearize("gear_x6")
    np.testing.assert_allclose(Ag, A, atol=1e-8)  # the gear only scales the input matrix
    np.testing.assert_allclose(Bg, 6 * B, rtol=1e-6)
    assert B[2, 0] > 0 and B[3, 0] < 0  # pushing the cart right tips the pole back
    assert np.abs(np.linalg.eigvals(A)).max() > 1  # upright equilibrium unstable
    Q, R = np.diag([1.0, 10.0, 1.0, 1.0]), np.array([[0.1]])
    P = solve_dare(A, B, Q, R)
    np.testing.assert_allclose(P, solve_discrete_are(A, B, Q, R), rtol=1e-8)
    K = lqr_gain("nominal")
    np.testing.assert_allclose(K, np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A), rtol=1e-10)
    assert np.abs(np.linalg.eigvals(A - B @ K)).max() < 1  # closed loop stable
    np.testing.assert_allclose(lqr_gain("gear_flip"), -K, rtol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        solve_dare(A, B, Q[:3, :3], R)


def test_nominal_expert_succeeds_on_nominal(nominal_expert):
    res = success_rate("nominal", nominal_expert, n_episodes=4, seed=0, max_steps=STEPS)
    assert (res.successes, res.n) == (4, 4)
    assert res.interval == pytest.approx(wilson_interval(4, 4))


@pytest.mark.parametrize("shift", ["gear_x6", "sensor_bias_0.1", "gear_x0.15"])
def test_informative_shift_nominal_fails_recomputed_succeeds(shift, nominal_expert):
    nominal = success_rate(shift, nominal_expert, n_episodes=3, seed=0, max_steps=STEPS)
    recomputed = success_rate(shift, ExpertPolicy(shift), n_episodes=3, seed=0, max_steps=STEPS)
    assert nominal.successes == 0 and recomputed.successes == 3


def test_uninformative_shift_nominal_still_succeeds(nominal_expert):
    assert success_rate("pole_mass_x4", nominal_expert, n_episodes=2, max_steps=STEPS).successes == 2


def test_sensor_bias_expert_without_calibration_fails():
    uncalibrated = ExpertPolicy("sensor_bias_0.1", knows_bias=False)
    assert success_rate("sensor_bias_0.1", uncalibrated, n_episodes=2, max_steps=STEPS).successes == 0


def test_rollout_record_and_noise(nominal_expert):
    env = make_env("nominal")
    ep = rollout(env, nominal_expert, seed=5, max_steps=50, action_noise=0.5)
    T = ep["length"]
    assert T == 50 and ep["success"] and ep["task"] == "nominal"
    assert ep["states"].shape == (T, 4) and ep["actions"].shape == (T, 1) and ep["policy_actions"].shape == (T, 1)
    assert ep["rewards"].shape == (T,) and ep["timesteps"].dtype == np.int64
    np.testing.assert_array_equal(ep["timesteps"], np.arange(T))
    assert np.all(np.abs(ep["actions"]) <= 3.0)
    noise = ep["actions"] - ep["policy_actions"]
    assert 0.3 < noise.std() < 0.7  # N(0, 0.5²) before clipping
    # reproducible given the seed
    ep2 = rollout(env, nominal_expert, seed=5, max_steps=50, action_noise=0.5)
    np.testing.assert_array_equal(ep["actions"], ep2["actions"])
    # no noise: applied == expert action, and equals -K x clipped
    ep3 = rollout(env, nominal_expert, seed=5, max_steps=10)
    np.testing.assert_array_equal(ep3["actions"], ep3["policy_actions"])
    np.testing.assert_allclose(ep3["actions"], np.clip(-ep3["states"] @ nominal_expert.K.T, -3, 3))
    with pytest.raises(ValueError, match="exceeds the env's time limit"):
        rollout(make_env("nominal", max_episode_steps=10), nominal_expert, seed=0, max_steps=11)


def test_failed_episode_is_not_a_success(nominal_expert):
    ep = rollout(make_env("gear_x10"), nominal_expert, seed=0, max_steps=STEPS)
    assert not ep["success"] and ep["length"] < STEPS
    assert ep["rewards"][-1] == 0.0 and np.all(ep["rewards"][:-1] == 1.0)  # v5: no reward when terminating


def _dare_doubling(A, B, Q, R, tol=1e-12, max_iter=100):
    """The structure-preserving doubling algorithm the package used before SciPy (the reference of the swap)."""
    n = A.shape[0]
    Ak, Gk, Hk = A.copy(), B @ np.linalg.solve(R, B.T), Q.copy()
    for _ in range(max_iter):
        W = np.eye(n) + Gk @ Hk
        WiA, WiG = np.linalg.solve(W, Ak), np.linalg.solve(W, Gk)
        H_new = Hk + Ak.T @ Hk @ WiA
        Gk, Ak = Gk + Ak @ WiG @ Ak.T, Ak @ WiA
        done = np.linalg.norm(H_new - Hk) <= tol * max(1.0, np.linalg.norm(H_new))
        Hk = 0.5 * (H_new + H_new.T)
        if done:
            break
    return Hk


@pytest.mark.parametrize("name", ["nominal", "gear_x0.15", "gear_x10", "gear_flip", "cart_mass_x10", "pole_mass_x4"])
def test_dare_swap_keeps_the_numbers(name):
    A, B = linearize(name)
    Q, R = np.diag([1.0, 10.0, 1.0, 1.0]), np.array([[0.1]])
    P_new, P_old = solve_dare(A, B, Q, R), _dare_doubling(A, B, Q, R)
    assert np.abs(P_new - P_old).max() <= 1e-12 * np.abs(P_old).max()
    K_new = lqr_gain(name)
    K_old = np.linalg.solve(R + B.T @ P_old @ B, B.T @ P_old @ A)
    assert np.abs(K_new - K_old).max() <= 1e-12 * np.abs(K_old).max()


def test_dare_not_stabilisable():
    A, B = np.diag([2.0, 0.5]), np.array([[0.0], [1.0]])  # the unstable mode is not controllable
    with pytest.raises(ValueError, match="stabilis"):
        solve_dare(A, B, np.eye(2), np.eye(1))


# ---------------------------------------------------------------------------------------------
# statistics


def _wilson_formula(k, n, z):
    """The closed form the package used before SciPy (the reference of the swap)."""
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def test_wilson_swap_keeps_the_numbers():
    for n in (1, 2, 3, 5, 20, 37, 100, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for z in (0.5, 1.0, 1.6448536269514722, 1.96, 2.5758293035489, 3.0, 4.0):
                new, old = wilson_interval(k, n, z=z), _wilson_formula(k, n, z)
                assert abs(new[0] - old[0]) <= 1e-12 and abs(new[1] - old[1]) <= 1e-12, (k, n, z, new, old)
    with pytest.raises(ValueError, match="0 < z < 8"):
        wilson_interval(1, 2, z=9.0)


@pytest.mark.parametrize(("k", "n"), [(0, 20), (7, 20), (20, 20), (1, 3)])
def test_wilson_interval_matches_scipy(k, n):
    z = norm.ppf(0.975)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n, z=z) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_interval_known_value_and_errors():
    # 0/20 -> upper bound z²/(n+z²) = 3.8416/23.8416
    assert wilson_interval(0, 20) == pytest.approx((0.0, 3.8416 / 23.8416))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(21, 20)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)


# ---------------------------------------------------------------------------------------------
# decision-transformer data


def hand_episode() -> dict:
    T = 4
    return {
        "states": np.arange(T * 4, dtype=np.float64).reshape(T, 4),
        "actions": np.array([[3.0], [-1.5], [0.0], [1.5]]),
        "policy_actions": np.array([[2.0], [-1.0], [0.5], [1.0]]),
        "rewards": np.array([1.0, 1.0, 2.0, 0.5]),
        "timesteps": np.arange(T, dtype=np.int64),
    }


def test_returns_to_go():
    np.testing.assert_allclose(returns_to_go([1.0, 1.0, 2.0, 0.5]), [4.5, 3.5, 2.5, 0.5])
    with pytest.raises(ValueError, match="1-D"):
        returns_to_go(np.ones((2, 2)))


def test_contexts_shapes_padding_and_values():
    ep = hand_episode()
    nz = Normalizer(state_mean=(1.0, 2.0, 3.0, 4.0), state_std=(2.0, 2.0, 2.0, 2.0), return_scale=10.0)
    K = 3
    c = make_contexts([ep, ep], K, nz)
    N = 8
    shapes = {"returns_to_go": (N, K, 1), "states": (N, K, 4), "actions": (N, K, 1), "timesteps": (N, K)}
    for key, shape in {**shapes, "attention_mask": (N, K), "target": (N, 1)}.items():
        assert tuple(c[key].shape) == shape, key
    assert c["timesteps"].dtype == torch.long and c["attention_mask"].dtype == torch.bool
    assert c["states"].dtype == torch.get_default_dtype()
    # sample 0: step 0 with two padded steps in front
    assert c["attention_mask"][0].tolist() == [False, False, True]
    assert c["returns_to_go"][0, :, 0].tolist() == pytest.approx([0.0, 0.0, 0.45])
    assert c["states"][0, 2].tolist() == pytest.approx([(0 - 1) / 2, (1 - 2) / 2, (2 - 3) / 2, (3 - 4) / 2])
    assert c["states"][0, :2].abs().sum() == 0 and c["timesteps"][0].tolist() == [0, 0, 0]
    # sample 3: steps 1..3, full window; rtg (3.5, 2.5, 0.5)/10; actions /3 with the last one a placeholder
    assert c["attention_mask"][3].all() and c["timesteps"][3].tolist() == [1, 2, 3]
    assert c["returns_to_go"][3, :, 0].tolist() == pytest.approx([0.35, 0.25, 0.05])
    assert c["actions"][3, :, 0].tolist() == pytest.approx([-0.5, 0.0, 0.0])
    assert c["actions"][2, :, 0].tolist() == pytest.approx([1.0, -0.5, 0.0])
    assert c["target"][:4, 0].tolist() == pytest.approx([1.0, -0.5, 0.0, 0.5])
    # the second episode repeats the first
    for v in c.values():
        assert torch.equal(v[:4], v[4:])
    # expert actions as targets, full windows only, stride
    c2 = make_contexts([ep], K, nz, target="policy_actions", full_only=True)
    assert c2["target"][:, 0].tolist() == pytest.approx([0.5 / 3, 1.0 / 3]) and c2["attention_mask"].all()
    assert torch.equal(c2["actions"], c["actions"][2:4])  # context tokens are the applied actions
    c3 = make_contexts([ep], K, nz, stride=2, dtype=torch.float32)
    assert c3["timesteps"][:, -1].tolist() == [0, 2] and c3["states"].dtype == torch.float32


def test_context_errors():
    nz = Normalizer((0.0,) * 4, (1.0,) * 4, 1.0)
    with pytest.raises(ValueError, match="K must be an integer >= 1"):
        make_contexts([hand_episode()], 0, nz)
    with pytest.raises(ValueError, match="no sample"):
        make_contexts([hand_episode()], 5, nz, full_only=True)
    with pytest.raises(ValueError, match="target must be"):
        make_contexts([hand_episode()], 2, nz, target="rewards")


def test_normalizer_fit_and_round_trip():
    eps = [hand_episode(), {**hand_episode(), "states": -hand_episode()["states"]}]
    nz = Normalizer.fit(eps)
    assert nz.state_mean == pytest.approx((0.0,) * 4)
    assert nz.return_scale == 4.5 and nz.action_scale == 3.0
    back = Normalizer.from_dict(json.loads(json.dumps(nz.to_dict())))
    assert back == nz
    np.testing.assert_allclose(nz.denorm_actions(nz.norm_actions([[1.2]])), [[1.2]])
    with pytest.raises(ValueError, match="missing keys"):
        Normalizer.from_dict({"state_mean": [0.0]})
    with pytest.raises(ValueError, match="state_std > 0"):
        Normalizer((0.0,), (0.0,), 1.0)


def test_dt_policy_matches_contexts():
    """The policy's inputs during a rollout are exactly the contexts built from that episode."""
    K, T = 4, 12
    net = DecisionTransformer(DTConfig(4, 1, d_model=8, n_layer=1, n_head=1, max_ep_len=64, context=K))
    net.eval()
    with torch.no_grad():  # small actions, so that the pole does not fall within T steps
        net.predict_action.weight.mul_(0.05)
        net.predict_action.bias.zero_()
    nz = Normalizer((0.0, 0.0, 0.0, 0.0), (0.1, 0.05, 0.2, 0.4), return_scale=T)
    policy = DTPolicy(net, nz, target_return=T)
    ep = rollout(make_env("nominal", max_episode_steps=T), policy, seed=1, max_steps=T)
    assert ep["length"] == T
    # returns-to-go as the policy saw them: target minus rewards so far
    ep = {**ep, "rewards": ep["rewards"].copy()}
    ep["rewards"][0] += T - ep["rewards"].sum()
    ds = DTDataset([ep], K, nz)
    with torch.no_grad():
        pred = net(*ds.inputs())[:, -1]  # (T, 1)
    np.testing.assert_allclose(np.clip(3 * pred.numpy(), -3, 3), ep["actions"], atol=1e-6)
    loss = ds.loss_fn()(net, torch.arange(len(ds)))
    assert loss.item() == pytest.approx(torch.mean((pred - ds.data["target"]) ** 2).item())
    assert ds[0]["states"].shape == (K, 4) and len(ds) == ep["length"]
    with pytest.raises(ValueError, match="equal the network's context"):
        DTPolicy(net, nz, target_return=T, K=K + 1)


def test_collect_episodes_default_expert():
    eps = collect_episodes("gear_x6", 2, seed=10, max_steps=100, action_noise=0.3)
    assert [e["seed"] for e in eps] == [10, 11] and all(e["success"] for e in eps)
    assert all(e["task"] == "gear_x6" for e in eps)
    assert math.isclose(eps[0]["rewards"].sum(), 100.0)


def test_make_env_reset_noise_scale():
    """``reset_noise_scale`` widens the start states (the env's default is 0.01); bad values raise."""
    import numpy as np

    from ppl_kbnn.envs import make_env

    wide = [make_env("sensor_bias_0.1", reset_noise_scale=0.05).reset(seed=s)[0] for s in range(20)]
    narrow = [make_env("sensor_bias_0.1").reset(seed=s)[0] for s in range(20)]
    assert np.abs(np.stack(narrow)[:, 0]).max() <= 0.01 < np.abs(np.stack(wide)[:, 0]).max() <= 0.05
    with pytest.raises(ValueError, match="reset_noise_scale"):
        make_env("nominal", reset_noise_scale=-1.0)
