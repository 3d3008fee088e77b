"""The pendulum study (ppl_kbnn.pendulum): lockstep evaluation, posterior-mean network, run_study outputs.

``run_study`` runs here with tiny test-only settings (200-step episodes, 10 streamed samples, a
200-step pre-training); ``--quick`` itself is timed in docs/pendulum.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ppl_kbnn as pk
from ppl_kbnn.envs import DTPolicy, Normalizer, collect_episodes, make_contexts, make_env, rollout, wilson_interval
from ppl_kbnn.nn.transformer import DecisionTransformer, DTConfig
from ppl_kbnn.pendulum import QUICK, StudySettings, evaluate_dt, posterior_mean_net, run_study
from ppl_kbnn.pendulum.report import FIGURES

STEPS = 200
TINY = {
    "n_nominal_episodes": 3,
    "episode_steps": STEPS,
    "pretrain_steps": 200,
    "pretrain_batch": 64,
    "n_stream_episodes": 1,
    "checkpoints": (0, 5, 10),
    "n_eval": 3,
    "n_heldout_episodes": 1,
    "n_heldout": 50,
    "n_heldout_uncertainty": 16,
    "n_uncertainty": 5,
    "noise_levels": (0.0, 0.2),
}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Two tiny studies with seeds 0 and 1: ``{seed: (out_dir, returned results)}``."""
    torch.set_num_threads(1)
    out = {}
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"pendulum{seed}")
        out[seed] = (d, run_study(out_dir=d, quick=True, seed=seed, progress=False, command="test", settings=TINY))
    return out


def small_dt(seed: int = 0) -> DecisionTransformer:
    torch.manual_seed(seed)
    return DecisionTransformer(DTConfig(4, 1, d_model=8, n_layer=1, n_head=1, context=4)).double().eval()


def numbers(obj: object, path: str = "") -> list[tuple[str, object]]:
    """Every number (or None) leaf of a JSON value, with its path."""
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in numbers(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [leaf for i, v in enumerate(obj) for leaf in numbers(v, f"{path}[{i}]")]
    if obj is None or (isinstance(obj, int | float) and not isinstance(obj, bool)):
        return [(path, obj)]
    return []


def check_rate(r: dict, steps: int) -> None:
    """A success record agrees with its own episode lengths and its Wilson interval."""
    assert r["n"] == len(r["lengths"]) >= 1
    assert list(r["interval"]) == pytest.approx(wilson_interval(r["successes"], r["n"]), abs=1e-12)
    assert r["mean_length"] == pytest.approx(np.mean(r["lengths"]))
    assert all(1 <= L <= steps for L in r["lengths"])
    assert r["successes"] <= sum(L == steps for L in r["lengths"])  # a success survives every step


# ---------------------------------------------------------------------------------------------
# building blocks


def test_evaluate_dt_matches_single_episode_rollouts():
    net = small_dt()
    norm = Normalizer((0.0,) * 4, (0.05, 0.05, 0.2, 0.4), 1000.0)
    for task in ("nominal", "sensor_bias_0.1"):
        res = evaluate_dt(net, norm, task, [3, 4, 5], max_steps=60)
        env = make_env(task)
        policy = DTPolicy(net, norm, 1000.0)
        expected = [rollout(env, policy, seed=s, max_steps=60) for s in (3, 4, 5)]
        env.close()
        assert res["lengths"] == [e["length"] for e in expected]
        assert res["success"] == [e["success"] for e in expected]
        check_rate(res, 60)


def test_evaluate_dt_bad_arguments():
    net = small_dt()
    norm = Normalizer((0.0,) * 4, (1.0,) * 4, 1000.0)
    with pytest.raises(ValueError, match="at least one"):
        evaluate_dt(net, norm, "nominal", [])
    with pytest.raises(ValueError, match="max_steps"):
        evaluate_dt(net, norm, "nominal", [0], max_steps=0)
    with pytest.raises(ValueError, match="unknown shift"):
        evaluate_dt(net, norm, "no_such_shift", [0])


def test_posterior_mean_net():
    net = small_dt()
    norm = Normalizer((0.0,) * 4, (0.05, 0.05, 0.2, 0.4), 1000.0)
    eps = collect_episodes("sensor_bias_0.1", 1, seed=0, max_steps=30, action_noise=0.5)
    ctx = make_contexts(eps, 4, norm, target="policy_actions", dtype=torch.float64)
    y = ctx.pop("target")
    guide = pk.KalmanGuide(pk.BayesianModel(net, prior_scale=0.05, obs_noise=0.1), covariance="diag", hidden="token")
    with torch.no_grad():
        before = net(**ctx)[:, -1]
        assert torch.equal(posterior_mean_net(guide, net)(**ctx)[:, -1], before)  # prior mean = pre-trained
        guide.update({k: v[:5] for k, v in ctx.items()}, y[:5])
        moved = posterior_mean_net(guide, net)
        assert torch.equal(net(**ctx)[:, -1], before)  # the original is not modified
    for name, (mean, _) in guide.beliefs().items():
        mod = moved.get_submodule(name)
        assert torch.equal(mod.weight, mean[:, : mod.in_features])
        assert torch.equal(mod.bias, mean[:, mod.in_features])
    assert not torch.equal(moved.predict_action.weight, net.predict_action.weight)


# ---------------------------------------------------------------------------------------------
# run_study


def test_study_writes_every_output(studies):
    d, res = studies[0]
    for name in ("results.json", "results.md", "pretrained.json", "pretrained.pt"):
        assert (d / name).stat().st_size > 0
    for png in FIGURES.values():
        assert (d / png).read_bytes()[:8] == PNG and (d / png).stat().st_size > 5000
    data = json.loads((d / "results.json").read_text())
    assert data == json.loads(json.dumps(res))  # the returned dict is what was written
    assert set(data["figures"]) == set(FIGURES)
    assert data["stopped"] is None and data["seed"] == 0 and data["quick"] is True and data["command"] == "test"
    assert data["settings"]["checkpoints"] == [0, 5, 10]
    for key in ("torch", "pyro", "numpy", "gymnasium", "mujoco", "python"):
        assert data["environment"][key]
    saved = json.loads((d / "pretrained.json").read_text())
    assert len(saved["loss_curve"]) == TINY["pretrain_steps"]
    assert saved["config"] == data["pretrained"]["config"] and saved["normalizer"] == data["pretrained"]["normalizer"]
    sd = torch.load(d / "pretrained.pt")
    net = DecisionTransformer(DTConfig(**sd["config"])).double()
    net.load_state_dict(sd["state_dict"])

    md = (d / "results.md").read_text()
    for heading in ("## Shift", "### Success rate", "### Memory and time", "## Predicted uncertainty", "## Figures"):
        assert heading in md
    for label in ("no adaptation", "KBT block", "KBT diag", "retrain, all data"):
        assert f"| {label} |" in md


def test_study_numbers_are_consistent(studies):
    _, res = studies[0]
    for path, value in numbers(res):
        assert value is None or math.isfinite(value), path
    t = res["timings"]
    assert all(v > 0 for v in t.values()) and t["total_s"] >= t["pretrain_s"] + t["stream_and_eval_s"]

    check_rate(res["pretrained"]["nominal_success"], STEPS)
    for c in res["shift"]["checked"]:
        check_rate(c["pretrained"], STEPS)
        assert c["expert"]["interval"] == pytest.approx(wilson_interval(c["expert"]["successes"], c["expert"]["n"]))
    assert res["shift"]["chosen"] == res["shift"]["checked"][-1]["shift"] == "sensor_bias_0.1"
    assert res["shift"]["checked"][-1]["qualifies"]

    mem, methods = res["memory"], res["methods"]
    M_run = sorted(int(M) for M, v in mem["M"].items() if v["run"])
    assert set(methods) == {"none", "kbt_block", "kbt_diag", "retrain_all", *(f"retrain_M{M}" for M in M_run)}
    assert all(int(M) >= 10 for M, v in mem["M"].items() if not v["run"])  # only M >= stream length collapse
    # M rule: floor(factor * KBT bytes / bytes per sample)
    ref = {"diag": mem["kbt_diag_belief_bytes"], "block": mem["kbt_block_belief_bytes"]}
    expected_M = {max(1, int(f * ref[r] // mem["bytes_per_buffered_sample"])) for r, f in QUICK.memory_targets}
    assert {int(M) for M in mem["M"]} == expected_M
    assert 0 < mem["kbt_diag_belief_bytes"] < mem["kbt_block_belief_bytes"]

    n0 = {name: m["checkpoints"][0] for name, m in methods.items()}
    for name, m in methods.items():
        cps = m["checkpoints"]
        assert [c["n_samples"] for c in cps] == [0, 5, 10] and m["error"] is None
        for c in cps:
            check_rate(c, STEPS)
            assert c["n"] == TINY["n_eval"] and c["heldout_rmse"] > 0
        # n = 0 is the pre-trained network for every method: same episodes, same error
        assert n0[name]["lengths"] == n0["none"]["lengths"] and n0[name]["heldout_rmse"] == n0["none"]["heldout_rmse"]
        if m["kind"] == "none":
            assert m["seconds_per_sample"] is None and all(c["state_bytes"] == 0 for c in cps)
            assert len({c["heldout_rmse"] for c in cps}) == 1
        else:
            assert m["seconds_per_sample"] > 0
            assert [c["update_seconds"] for c in cps][0] == 0 < cps[1]["update_seconds"] < cps[2]["update_seconds"]
            assert cps[-1]["heldout_rmse"] != cps[0]["heldout_rmse"]  # it adapted
    for cov in ("block", "diag"):
        assert all(c["state_bytes"] == ref[cov] for c in methods[f"kbt_{cov}"]["checkpoints"])
    # retraining: buffer grows by one sample's bytes per arrival, AdamW state is constant after the first step
    s_bytes = mem["bytes_per_buffered_sample"]
    for m in methods.values():
        if m["kind"] == "retrain":
            M = m["settings"]["memory"] or 10**9
            (_, b5, b10) = (c["state_bytes"] for c in m["checkpoints"])
            assert b10 - b5 == (min(10, M) - min(5, M)) * s_bytes
            assert b5 > 2 * 8 * methods["kbt_diag"]["settings"]["n_bayesian_parameters"]  # AdamW moments

    unc = res["uncertainty"]
    rows = {(r["sigma"], r["obs_noise_policy"]): r for r in unc["rows"]}
    assert set(rows) == {(s, p) for s in TINY["noise_levels"] for p in ("matched", "fixed", "auto", "auto-conjugate")}
    for (sigma, policy), r in rows.items():
        expected = math.sqrt(0.1**2 + sigma**2) if policy == "matched" else 0.1
        if not policy.startswith("auto"):  # learnt noise: the final estimate (tests/test_hyper.py)
            assert r["obs_noise"] == pytest.approx(expected)
        assert r["mean_pred_std"] >= r["obs_noise"] and r["rms_pred_std"] >= r["mean_pred_std"] - 1e-12
        assert 0 <= r["coverage_90"] <= 1 and r["rmse_noisy_labels"] > 0 and r["seconds_per_sample"] > 0
        assert r["n_updates"] == TINY["n_uncertainty"]
    for key in ("mean_pred_std", "rmse_noisy_labels", "rmse_clean_labels", "coverage_90"):
        assert rows[(0.0, "matched")][key] == rows[(0.0, "fixed")][key]  # sigma = 0: the same model
    assert rows[(0.2, "matched")]["mean_pred_std"] > rows[(0.2, "fixed")]["mean_pred_std"]


def test_seeds_change_what_they_should(studies):
    (_, a), (_, b) = studies[0], studies[1]
    assert a["settings"] == b["settings"] and a["seeds"] != b["seeds"]
    assert a["pretrained"]["final_loss"] != b["pretrained"]["final_loss"]
    assert a["pretrained"]["normalizer"] != b["pretrained"]["normalizer"]  # different nominal data
    assert a["stream"]["pretrained_heldout_rmse"] != b["stream"]["pretrained_heldout_rmse"]
    for name in ("kbt_block", "kbt_diag", "retrain_all"):
        assert (
            a["methods"][name]["checkpoints"][-1]["heldout_rmse"]
            != b["methods"][name]["checkpoints"][-1]["heldout_rmse"]
        )
    ua, ub = a["uncertainty"]["rows"], b["uncertainty"]["rows"]
    assert [r["rmse_noisy_labels"] for r in ua] != [r["rmse_noisy_labels"] for r in ub]
    # what does not depend on the seed
    assert a["memory"] == b["memory"]


def test_study_stops_when_no_shift_qualifies(tmp_path):
    # 1-step episodes: every policy "succeeds", so the pre-trained DT is never below 30 % and no shift qualifies
    settings = {**TINY, "episode_steps": 1, "pretrain_steps": 5, "n_nominal_episodes": 1,
                "candidates": ("sensor_bias_0.1",)}  # fmt: skip
    res = run_study(out_dir=tmp_path, quick=True, seed=0, progress=False, settings=settings)
    assert "no candidate shift qualifies" in res["stopped"]
    assert [c["shift"] for c in res["shift"]["checked"]] == ["sensor_bias_0.1"] and res["shift"]["chosen"] is None
    assert not res["shift"]["checked"][0]["qualifies"]
    assert "methods" not in res and "uncertainty" not in res
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["stopped"] == res["stopped"]
    assert "**Stopped:**" in (tmp_path / "results.md").read_text()
    assert set(data["figures"]) == {"pretrain_loss"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"out_dir": 3}, "out_dir"),
        ({"quick": "yes"}, "quick"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"progress": None}, "progress"),
        ({"settings": {"no_such_setting": 1}}, "unknown setting"),
        ({"settings": [1, 2]}, "dict of overrides"),
        ({"settings": {"checkpoints": (5, 10)}}, "start at 0"),
        ({"settings": {"checkpoints": (0, 10, 5)}}, "increase"),
        ({"settings": {"candidates": ("no_such_shift",)}}, "unknown shift"),
        ({"settings": {"candidates": ()}}, "at least one"),
        ({"settings": {"n_eval": 0}}, "n_eval"),
        ({"settings": {"episode_steps": 2000}}, "episode_steps"),
        ({"settings": {"obs_noise": 0.0}}, "obs_noise"),
        ({"settings": {"hidden": "full"}}, "hidden"),
        ({"settings": {"memory_targets": (("lowrank", 1.0),)}}, "reference"),
        ({"settings": {"noise_levels": (-0.1,)}}, "noise_levels"),
        ({"settings": {"obs_noise_policies": ("estimated",)}}, "obs_noise_policies"),
        ({"settings": {"d_model": 10, "n_head": 3}}, "divisible"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, match):
    args = {"out_dir": tmp_path, "quick": True, "seed": 0, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        run_study(**args)
    assert not (tmp_path / "results.json").exists()


def test_stream_longer_than_the_pool_raises(tmp_path):
    settings = {**TINY, "pretrain_steps": 5, "episode_steps": 100, "checkpoints": (0, 200)}
    with pytest.raises(ValueError, match="stream pool has 100 samples"):
        run_study(out_dir=tmp_path, quick=True, seed=0, progress=False, settings=settings)


def test_settings_object_and_defaults():
    assert StudySettings().checkpoints == (0, 25, 50, 100, 200, 400) and StudySettings().n_eval == 20
    assert QUICK.checkpoints == (0, 25, 100) and QUICK.n_eval == 5
    assert StudySettings().candidates[0] == "sensor_bias_0.1"
    s = QUICK.with_overrides({"n_eval": 7})
    assert s.n_eval == 7 and s.checkpoints == QUICK.checkpoints


# ---------------------------------------------------------------------------------------------
# the on-policy design (ppl_kbnn.pendulum.onpolicy / units)

from ppl_kbnn.pendulum import exact_fix, onpolicy_samples, run_onpolicy_study  # noqa: E402
from ppl_kbnn.pendulum.onpolicy import mean_interval, paired_difference, select_lr  # noqa: E402
from ppl_kbnn.pendulum.units import n_until_stable, unit_seeds  # noqa: E402

NORM = Normalizer((0.0,) * 4, (0.05, 0.05, 0.2, 0.4), 1000.0)


def test_onpolicy_stream_gives_each_network_its_own_states():
    """Each network is streamed the states *it* visits (replayed here episode by episode), labelled by the labeler."""
    seen = []

    def stub_expert(states):
        seen.append(np.array(states))
        return states[:, 1:2] * 10.0  # (T, 1): a label the test can recompute

    nets = [small_dt(0), small_dt(1)]
    got = []
    for net in nets:
        seen.clear()
        x, y, info = onpolicy_samples(net, NORM, "sensor_bias_0.1", stub_expert, 12, seed=7,
                                      rng=np.random.default_rng(0), action_noise=0.3, reset_noise=0.05,
                                      max_steps=200)  # fmt: skip
        # the same episodes, replayed with the same network: the labeler saw exactly their states
        env = make_env("sensor_bias_0.1", reset_noise_scale=0.05)
        replay = [rollout(env, DTPolicy(net, NORM, 1000.0), seed=7 + i, max_steps=200, action_noise=0.3)
                  for i in range(info["episodes"])]  # fmt: skip
        env.close()
        visited = np.concatenate([e["states"] for e in replay])
        assert np.array_equal(np.concatenate(seen), visited)
        assert info["env_steps"] == visited.shape[0] >= 12
        # every sample is one of those states (its last state token, normalised) with the labeler's label
        last = x["states"][:, -1].numpy()  # (12, 4) normalised
        raw = last * np.asarray(NORM.state_std) + np.asarray(NORM.state_mean)
        assert np.allclose(raw, info["states"])
        assert all(np.isclose(visited, s).all(axis=1).any() for s in info["states"])
        assert torch.allclose(y, torch.as_tensor(info["states"][:, 1:2] * 10.0 / 3.0))
        got.append(visited)
    assert got[0].shape != got[1].shape or not np.allclose(got[0], got[1])  # two networks, two sets of states


def test_evaluation_episodes_differ_under_evaluation_noise():
    net = small_dt()
    seeds = list(range(10, 16))
    noisy = evaluate_dt(net, NORM, "nominal", seeds, max_steps=100, action_noise=0.3, reset_noise=0.05)
    again = evaluate_dt(net, NORM, "nominal", seeds, max_steps=100, action_noise=0.3, reset_noise=0.05)
    quiet = evaluate_dt(net, NORM, "nominal", seeds, max_steps=100)
    assert noisy["lengths"] == again["lengths"]  # seeded: reproducible
    assert len(set(noisy["lengths"])) >= 3  # the episodes differ from each other
    assert noisy["lengths"] != quiet["lengths"]  # and the noise is what makes them differ
    with pytest.raises(ValueError, match="action_noise"):
        evaluate_dt(net, NORM, "nominal", seeds, action_noise=-1.0)


def test_exact_fix_cancels_the_sensor_bias_in_the_state_embedding():
    net = small_dt()
    fixed = exact_fix(net, NORM, "sensor_bias_0.1")
    obs = torch.randn(6, 4) * 0.05
    biased = obs.clone()
    biased[:, 1] += 0.1
    n = lambda o: (o - torch.tensor(NORM.state_mean)) / torch.tensor(NORM.state_std)  # noqa: E731
    with torch.no_grad():
        assert torch.allclose(fixed.embed_state(n(biased)), net.embed_state(n(obs)), atol=1e-12)
        assert not torch.allclose(net.embed_state(n(biased)), net.embed_state(n(obs)))
    flipped = exact_fix(net, NORM, "gear_flip")
    assert torch.equal(flipped.predict_action.weight, -net.predict_action.weight)
    assert exact_fix(net, NORM, "gear_x0.15") is None


def test_samples_until_success_stays_above_90_percent():
    cps = [0, 25, 50, 100, 200]
    assert n_until_stable(cps, [0, 1, 0.8, 0.9, 1]) == 100  # a dip resets the count
    assert n_until_stable(cps, [1, 1, 1, 1, 1]) == 0
    assert n_until_stable(cps, [0, 1, 1, 1, 0.5]) is None  # not stable at the last checkpoint
    assert n_until_stable(cps, [0, 1, 1, None, 1]) == 200  # not measured counts as a failure


def test_intervals_are_student_t_across_streams():
    from scipy.stats import t

    v = [0.2, 0.5, 0.9, 0.6]
    r = mean_interval(v)
    half = t.ppf(0.975, 3) * np.std(v, ddof=1) / 2
    assert r["n"] == 4 and r["mean"] == pytest.approx(0.55)
    assert (r["lo"], r["hi"]) == pytest.approx((0.55 - half, 0.55 + half))
    assert mean_interval([0.3])["lo"] is None  # one stream: no interval
    d = paired_difference([1.0, 0.9, 1.0], [0.1, 0.2, 0.0])
    assert d["verdict"] == "a > b" and d["lo"] > 0
    assert paired_difference([1.0, 0.0, 1.0], [0.0, 1.0, 0.5])["verdict"] == "no difference shown"


def test_learning_rate_is_chosen_from_the_development_units_only():
    def unit(stream, rates):
        return {"stream": stream, "methods": {f"m{lr}": {"rows": [{"n": 0, "successes": 0, "n_eval": 4},
                                                                 {"n": 25, "successes": k, "n_eval": 4,
                                                                  "next_block_rmse": 0.1}]}
                                              for lr, k in rates.items()}}  # fmt: skip

    dev = [unit(1000, {0.01: 4, 0.1: 1}), unit(1001, {0.01: 3, 0.1: 2})]
    test = [unit(0, {0.01: 0, 0.1: 4})]  # would flip the choice if it were read
    r = select_lr(dev, {0.01: "m0.01", 0.1: "m0.1"})
    assert r["lr"] == 0.01 and r["streams"] == [1000, 1001]
    assert select_lr(test, {0.01: "m0.01", 0.1: "m0.1"})["lr"] == 0.1  # (what reading the test stream would give)
    # the episodes of every block of every stream get their own env seeds (blocks up to 400 samples / 25, up to
    # 50 episodes per block), across networks, shifts, development and test streams
    from ppl_kbnn.pendulum.units import block_seed

    seen = set()
    for n in range(3):
        for shift in ("sensor_bias_0.1", "gear_flip", "gear_x0.15"):
            for k in [*range(20), *range(1000, 1020)]:
                base = unit_seeds(n, k, shift, "stream")
                seeds = {block_seed(base, j) + e for j in range(17) for e in range(50)}
                assert len(seeds) == 17 * 50 and not seeds & seen
                seen |= seeds
    # development seeds never coincide with a test stream's, for any role, network or shift
    for role in ("stream", "eval", "heldout", "order"):
        for shift in ("sensor_bias_0.1", "gear_flip", "gear_x0.15"):
            dev_seeds = {unit_seeds(n, k, shift, role) for n in range(3) for k in range(1000, 1003)}
            test_seeds = {unit_seeds(n, k, shift, role) for n in range(3) for k in range(20)}
            assert not dev_seeds & test_seeds


ONPOLICY_TINY = {
    "shifts": ("sensor_bias_0.1",),
    "n_streams": 2,
    "checkpoints": (0, 5, 10),
    "block": 5,
    "n_eval": 2,
    "episode_steps": 40,
    "n_heldout": 20,
    "lr_grid": (0.003, 0.03),
    "large_memory": 8,
    "dev_checkpoints": (0, 5),
    "dev_n_eval": 2,
    "n_expert_streams": 1,
    "predictive_checkpoints": (),
    "tolerance_fractions": (0.0, 1.0),
    "uncertainty": False,
    "pretrain": {"n_nominal_episodes": 1, "pretrain_steps": 5, "pretrain_batch": 32},
}


@pytest.fixture(scope="module")
def onpolicy_study(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("onpolicy")
    return d, run_onpolicy_study(out_dir=d, preset="quick", progress=False, command="test", settings=ONPOLICY_TINY)


def test_onpolicy_study_outputs_and_intervals_across_streams(onpolicy_study):
    d, res = onpolicy_study
    saved = json.loads((d / "results.json").read_text())
    assert saved["summary"].keys() == {"sensor_bias_0.1"}
    assert (d / "results.md").read_text().startswith("# Pendulum study (on-policy streams)")
    for name in res["figures"].values():
        assert (d / name).read_bytes().startswith(PNG)
    sm = res["summary"]["sensor_bias_0.1"]
    on = [u for u in res["units"] if u["condition"] == "onpolicy"]
    assert sorted(u["stream"] for u in on) == [0, 1]
    # the belief-family and learnt-noise rows join the table
    assert {"kbt_all_lowrank", "kbt_all_auto_noise"} <= set(sm["methods"])
    md = (d / "results.md").read_text()
    assert "low-rank (r = 10) + EKF" in md and "obs_noise='auto'" in md
    for name, m in sm["methods"].items():
        for c in m["checkpoints"]:
            per_stream = [r["successes"] / r["n_eval"] for u in on for r in u["methods"][name]["rows"]
                          if r["n"] == c["n"]]  # fmt: skip
            if not per_stream:
                continue
            # the interval is over the 2 streams (each one success rate over n_eval episodes), not the 4 episodes
            assert c["success"]["n"] == 2 == len(per_stream)
            assert c["success"] == mean_interval(per_stream)
    # every adapting method saw one label per sample and ran episodes for them; the fixed ones did not
    for u in on:
        for m in u["methods"].values():
            last = m["rows"][-1]
            if m["spec"]["kind"] in ("kbt", "retrain"):
                assert last["n"] == 10 and last["env_steps"] >= 10 and last["update_seconds"] > 0
            else:
                assert last["env_steps"] == 0
    # learning rates: from development streams (>= 1000) only; the test streams use the chosen one
    lr = res["learning_rates"]
    assert {u["stream"] for u in lr["development_units"]} == {1000}
    for subset, short in (("all", "all"), ("embed_bias", "embed")):
        chosen = lr["chosen"]["sensor_bias_0.1"][subset]
        again = select_lr(lr["development_units"], {v: f"dev_{short}_lr{v:g}" for v in ONPOLICY_TINY["lr_grid"]})
        assert chosen["lr"] == again["lr"] in ONPOLICY_TINY["lr_grid"]
        for m in sm["methods"].values():
            if m["spec"].get("subset") == subset and m["spec"]["kind"] == "retrain":
                assert m["spec"]["lr"] == chosen["lr"]
    assert res["conclusion"] and all(line for line in res["conclusion"])


def test_predictive_mean_network_acts_with_kbt_predictive_mean():
    from ppl_kbnn.pendulum.units import _PredictiveMeanDT

    net = small_dt()
    eps = collect_episodes("sensor_bias_0.1", 1, seed=0, max_steps=20, action_noise=0.5)
    ctx = make_contexts(eps, 4, NORM, target="policy_actions", dtype=torch.float64)
    ctx.pop("target")
    guide = pk.KalmanGuide(pk.BayesianModel(net, prior_scale=1e-4, obs_noise=0.1), covariance="diag", hidden="token")
    with torch.no_grad():
        pm = _PredictiveMeanDT(guide, net)(**ctx)[:, -1]  # (N, 1)
        assert torch.allclose(pm, guide.predict(ctx)[0])
        assert torch.allclose(pm, net(**ctx)[:, -1], atol=1e-5)  # a tiny prior: predictive mean ~ plug-in mean
    res = evaluate_dt(_PredictiveMeanDT(guide, net), NORM, "sensor_bias_0.1", [0, 1], max_steps=5)
    assert res["n"] == 2 and all(1 <= L <= 5 for L in res["lengths"])


def test_unit_cache_resumes_without_rerunning_finished_units(tmp_path, monkeypatch):
    """``--resume``: a finished unit is read back from ``units/<hash>.json`` (same arguments, same result, not run
    again); other arguments run; a pre-training unit runs again when its network file is gone."""
    from ppl_kbnn.pendulum import onpolicy

    calls = []

    def fake_unit(**job):
        calls.append(job)
        if job["kind"] == "pretrain":
            Path(job["path"]).write_text("net")
        return {"kind": job["kind"], "value": job.get("x", 0) * 2, "seconds": 0.0}

    monkeypatch.setattr(onpolicy, "run_unit", fake_unit)
    run_all = onpolicy._executor(1, cache=tmp_path / "units")
    net = tmp_path / "pretrained_seed0.pt"
    jobs = [{"kind": "pretrain", "path": str(net)}, {"kind": "stream", "x": 1}, {"kind": "stream", "x": 2}]
    first = run_all(jobs)
    assert len(calls) == 3 and [r.get("value") for r in first] == [0, 2, 4]
    again = run_all([*jobs, {"kind": "stream", "x": 3}])
    assert len(calls) == 4 and calls[-1]["x"] == 3  # only the new unit ran
    assert again[:3] == first and again[3]["value"] == 6
    net.unlink()
    run_all(jobs)
    assert len(calls) == 5 and calls[-1]["kind"] == "pretrain"  # its file was gone
