"""PPO on the JAX twin (`sandhop.agents.ppo`, `sandhop-train-agent`): real training runs on the
small dataset with tiny settings, checkpoints and resume, the numpy policy against the jitted
one, GAE with terminated and truncated kept apart, and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_module

from sandhop.agents import ppo
from sandhop.agents.evaluate_agent import replay
from sandhop.agents.train_agent import false_alarms, load_run, missed_alarms, run, training_env
from sandhop.cli import main
from sandhop.enforcement.events import CATEGORIES, TARGET_CLASSES
from sandhop.envs import data as envdata
from sandhop.envs.jax_env import JaxSandboxEnv
from sandhop.envs.sandbox_env import SandboxManagerEnv
from sandhop.envs.spec import EnvSpec

FIXED_METRICS = ("episodic_return", "SPS", "approx_kl", "clipfrac", "explained_variance", "attacks_through",
                 "benign_denied", "tests_broken", "mean_tier")


def config(*overrides: str):
    with initialize_config_module("sandhop.configs", version_base="1.3"):
        return compose("train_agent", overrides=["experiment=smoke", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One smoke run (two seeds side by side) used by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("ppo") / "run"
    run(config("agent.num_seeds=2", "agent.eval_every_chunks=2"), out)
    return out


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_a_run_writes_metrics_checkpoints_and_its_val_evaluation(trained):
    rows = read_csv(trained / "metrics.csv")
    cfg = config()
    chunks = ppo.PPOConfig.from_config(cfg.agent).num_chunks
    assert len(rows) == 2 * chunks                      # one row per member and chunk
    assert {r["seed"] for r in rows} == {"0", "1"}
    for name in FIXED_METRICS:
        assert name in rows[0]
    assert all(0.0 <= float(r["attacks_through"]) <= 1.0 for r in rows if r["attacks_through"] != "nan")
    assert any(r.get("val_episodic_return") for r in rows)   # evaluated between chunks
    assert pq.read_table(trained / "metrics.parquet").num_rows == len(rows)
    result = json.loads((trained / "evaluation.json").read_text())
    assert [m["seed"] for m in result["val"]] == [0, 1]
    assert result["objective"] == pytest.approx(np.mean([m["episodic_return"] for m in result["val"]]))
    assert (trained / "config.yaml").exists() and any((trained / "checkpoints").iterdir())


def test_seeds_train_side_by_side_as_separate_members(trained):
    a, b = load_run(trained)
    assert (a.seed, b.seed) == (0, 1)
    assert not np.allclose(a.params["embed"]["table"], b.params["embed"]["table"])


def test_a_category_or_class_absent_from_training_adds_nothing_to_the_policy(trained):
    cfg = config()
    episodes = envdata.load("train", cfg.dataset, EnvSpec.from_config(cfg.env))
    rows = len(CATEGORIES) + len(TARGET_CLASSES)
    present = set(episodes.category.tolist()) | {len(CATEGORIES) + c for c in set(episodes.target_class.tolist())}
    absent = [r for r in range(rows) if r not in present]
    assert absent                                  # the small dataset has no /dev or unix-socket events
    # where training reaches (tests are cut after train_max_steps events)
    position = np.arange(episodes.n_events) - np.repeat(episodes.start, episodes.length)
    early = position < ppo.PPOConfig.from_config(cfg.agent).train_max_steps
    reached = sorted(set(episodes.category[early].tolist())
                     | {len(CATEGORIES) + c for c in set(episodes.target_class[early].tolist())})
    for member in load_run(trained):
        table = np.asarray(member.params["embed"]["table"])
        assert not table[absent].any()             # zero at init, and no gradient ever reached them
        assert table[reached].any(axis=1).mean() > 0.9


def test_false_alarms_give_benign_events_of_kinds_no_attack_uses_an_attack_events_scores():
    cfg = config()
    episodes = envdata.load("train", cfg.dataset, EnvSpec.from_config(cfg.env))
    risk, tags = episodes.risk.copy(), episodes.tags.copy()
    alarmed, hit = false_alarms(episodes, 0.5, seed=0)
    kind = episodes.kinds()
    candidates = ~episodes.malicious & ~np.isin(kind, kind[episodes.malicious])
    assert candidates.sum() > 200 and 0.4 < len(hit) / candidates.sum() < 0.6
    assert candidates[hit].all()
    attack_scores = {(float(r), *t.tolist()) for r, t in zip(risk[episodes.malicious], tags[episodes.malicious])}
    assert all((float(alarmed.risk[i]), *alarmed.tags[i].tolist()) in attack_scores for i in hit)
    assert np.mean(alarmed.risk[hit]) > np.mean(risk[hit]) + 0.3   # the point: they now look like attacks
    kept = np.ones(len(risk), bool)
    kept[hit] = False
    np.testing.assert_array_equal(alarmed.risk[kept], risk[kept])
    np.testing.assert_array_equal(alarmed.tags[kept], tags[kept])
    np.testing.assert_array_equal(episodes.risk, risk)             # the loaded (cached) episodes are untouched
    np.testing.assert_array_equal(episodes.tags, tags)
    assert alarmed.risk.dtype == np.float32 and alarmed.tags.dtype == np.float32
    np.testing.assert_array_equal(false_alarms(episodes, 0.5, seed=0)[1], hit)
    assert len(false_alarms(episodes, 0.0, seed=0)[1]) == 0


def test_missed_alarms_give_early_attack_steps_benign_events_scores():
    cfg = config()
    episodes = envdata.load("train", cfg.dataset, EnvSpec.from_config(cfg.env))
    risk, tags = episodes.risk.copy(), episodes.tags.copy()
    missed, hit = missed_alarms(episodes, 0.5, seed=0)
    assert len(hit) > 50
    episode = np.repeat(np.arange(len(episodes)), episodes.length)
    touched = sorted(set(episode[hit].tolist()))
    attacked = [e for e in range(len(episodes)) if episodes.attack[e]]
    assert set(touched) <= set(attacked) and 0.35 < len(touched) / len(attacked) < 0.65
    for e in touched:
        span = episodes.span(e)
        mine = hit[episode[hit] == e] - span.start
        damaging = np.flatnonzero(episodes.damaging[span])
        first = damaging[0] if len(damaging) else int(episodes.length[e])
        # every attack step before the damaging one, and nothing else
        assert mine.tolist() == np.flatnonzero(episodes.malicious[span][:first]).tolist()
        if len(damaging):
            assert missed.risk[span][first] == risk[span][first]
    benign_scores = {(float(r), *t.tolist()) for r, t in zip(risk[~episodes.malicious], tags[~episodes.malicious])}
    assert all((float(missed.risk[i]), *missed.tags[i].tolist()) in benign_scores for i in hit)
    assert np.mean(missed.risk[hit]) < np.mean(risk[hit]) - 0.2    # the point: they now look benign
    kept = np.ones(len(risk), bool)
    kept[hit] = False
    np.testing.assert_array_equal(missed.risk[kept], risk[kept])
    np.testing.assert_array_equal(missed.tags[kept], tags[kept])
    np.testing.assert_array_equal(episodes.risk, risk)             # the loaded (cached) episodes are untouched
    np.testing.assert_array_equal(missed_alarms(episodes, 0.5, seed=0)[1], hit)
    assert len(missed_alarms(episodes, 0.0, seed=0)[1]) == 0


def test_training_sees_the_missed_and_false_alarms_and_evaluation_does_not():
    cfg = config("agent.false_alarms=0.2", "agent.missed_alarms=0.5", "seed=3")
    spec, agent = EnvSpec.from_config(cfg.env), ppo.PPOConfig.from_config(cfg.agent)
    episodes = envdata.load("train", cfg.dataset, spec)
    missed, missed_hit = missed_alarms(episodes, 0.5, seed=3)
    alarmed, hit = false_alarms(episodes, 0.2, seed=3)
    assert len(hit) > 0 and len(missed_hit) > 0
    # each from the scores as loaded: false alarms carry attacks' own scores, not missed ones
    expected_risk, expected_tags = missed.risk.copy(), missed.tags.copy()
    expected_risk[hit], expected_tags[hit] = alarmed.risk[hit], alarmed.tags[hit]
    trained_on = np.asarray(training_env(cfg, agent, spec, progress=False).params.floats)
    np.testing.assert_array_equal(trained_on[:, 0], expected_risk)
    np.testing.assert_array_equal(trained_on[:, 1:1 + expected_tags.shape[1]], expected_tags)
    assert not np.array_equal(trained_on[:, 0], episodes.risk)
    none = config("agent.false_alarms=null", "agent.missed_alarms=null")
    plain = training_env(none, ppo.PPOConfig.from_config(none.agent), spec, progress=False)
    np.testing.assert_array_equal(np.asarray(plain.params.floats)[:, 0], episodes.risk)


def test_an_interrupted_run_resumes_where_it_stopped(trained, tmp_path):
    out = tmp_path / "run"
    run(config("agent.num_seeds=2", "agent.eval_every_chunks=2", "stop_after_chunks=1"), out)
    assert len(read_csv(out / "metrics.csv")) == 2         # stopped after one chunk
    assert not (out / "evaluation.json").exists()
    run(config("agent.num_seeds=2", "agent.eval_every_chunks=2"), out)
    # exactly the uninterrupted run: same parameters, same metrics
    for resumed, whole in zip(load_run(out), load_run(trained)):
        jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.params, whole.params)
    drop = ("SPS", "seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_csv(out / "metrics.csv")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_csv(trained / "metrics.csv")]


def test_members_split_over_cpu_devices_train_as_they_do_on_one(trained, tmp_path):
    """The app gives JAX one CPU device per core and splits the members over them (pmap): the
    same members, the same training."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "sandhop.agents.train_agent", "experiment=smoke", "agent.num_seeds=2",
                    "agent.eval_every_chunks=2", f"out={out}"], check=True, env=env, capture_output=True)
    split, whole = load_run(out), load_run(trained)
    assert [p.seed for p in split] == [p.seed for p in whole] == [0, 1]

    def distance(a, b):
        return sum(float(np.abs(x - y).max()) for x, y in zip(jax.tree_util.tree_leaves(a.params),
                                                              jax.tree_util.tree_leaves(b.params)))
    # other programs round differently, so not bit for bit; but each member is the same member
    between_seeds = distance(whole[0], whole[1])
    for s, w in zip(split, whole):
        assert distance(s, w) < 0.1 * between_seeds


def test_resuming_with_other_settings_is_refused(trained):
    with pytest.raises(ppo.AgentError, match="another agent config"):
        run(config("agent.num_seeds=2", "agent.eval_every_chunks=2", "agent.hidden=8"), trained)


def test_the_numpy_policy_acts_like_the_jitted_one_in_the_gymnasium_env(trained):
    """The policy a user loads (numpy) replayed through the Gymnasium env and the real engine
    gives the same per-split results as the jitted greedy evaluation on the twin."""
    policy = load_run(trained)[0]
    spec = EnvSpec.from_config(policy.env_config)
    episodes = envdata.load("val", "small", spec)
    twin = JaxSandboxEnv.from_episodes(episodes, spec)
    params, norm = (jax.tree_util.tree_map(jnp.asarray, t) for t in (policy.params, policy.norm))
    sums = jax.device_get(jax.jit(ppo.make_evaluate(policy.config, twin))(params, norm, twin.params))
    gym = replay(policy, SandboxManagerEnv(episodes=episodes, env=policy.env_config))
    assert gym["attacks_through"] == sums["through"]
    assert gym["tests_broken"] == sums["broken"]
    assert gym["steps"] == sums["steps"]
    assert gym["episodic_return"] == pytest.approx(sums["return_sum"] / sums["episodes"], rel=1e-4)
    # and the logits agree on real observations
    env = SandboxManagerEnv(episodes=episodes, env=policy.env_config)
    obs, _ = env.reset(options={"episode": 0})
    jax_logits, _ = ppo.heads(jnp, params, ppo.normalize(jnp, norm, ppo.policy_inputs(
        jnp, jax.tree_util.tree_map(jnp.asarray, obs), spec), True), jnp.asarray(obs["action_mask"]).astype(bool))
    np.testing.assert_allclose(policy.logits(obs), np.asarray(jax_logits), rtol=1e-5, atol=1e-5)


def test_sandhop_evaluate_replays_a_trained_run_beside_the_baselines(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--policies", f"ppo:{trained},static:medium", "--split", "val", "--out", str(out)]) == 0
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted((r["policy"], r["seed"]) for r in table) == [("ppo", 0), ("ppo", 1), ("static:medium", 0)]
    assert "ppo" in (out / "results.md").read_text()


def transition(reward, value, terminated=False, truncated=False, final_value=0.0) -> ppo.Transition:
    f = jnp.float32
    return ppo.Transition(None, None, None, None, f(value), f(reward), jnp.bool_(terminated), jnp.bool_(truncated),
                          f(final_value))


def stack(ts: list[ppo.Transition]) -> ppo.Transition:
    return jax.tree_util.tree_map(lambda *x: jnp.stack(x)[:, None], *ts)


def test_gae_bootstraps_truncated_tests_and_not_terminated_ones():
    gamma, lam = 0.9, 1.0
    # step 0 ends a test by termination, step 1 one by truncation (final value 5), step 2 runs on (next value 2)
    traj = stack([transition(1.0, 0.5, terminated=True), transition(1.0, 0.5, truncated=True, final_value=5.0),
                  transition(1.0, 0.5)])
    advantages, targets = ppo.gae(traj, jnp.array([2.0]), gamma, lam)
    np.testing.assert_allclose(np.asarray(targets)[:, 0], [1.0, 1.0 + gamma * 5.0, 1.0 + gamma * 2.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(advantages)[:, 0], np.asarray(targets)[:, 0] - 0.5, rtol=1e-6)
    # without an episode end, the advantage carries back
    traj = stack([transition(0.0, 0.0), transition(1.0, 0.0)])
    advantages, _ = ppo.gae(traj, jnp.array([0.0]), gamma, lam)
    assert float(advantages[0, 0]) == pytest.approx(gamma * 1.0)


def test_hyperparameters_vmap_as_members():
    c = ppo.PPOConfig(num_seeds=2, lr=(1e-3, 3e-4), ent_coef=(0.0, 0.01))
    hp = c.member_hparams()
    assert c.num_members == 4
    np.testing.assert_allclose(hp["lr"], [1e-3, 3e-4, 1e-3, 3e-4], rtol=1e-6)
    np.testing.assert_allclose(hp["clip_eps"], [0.2] * 4, rtol=1e-6)


@pytest.mark.parametrize("settings, message", [
    ({"num_envs": 6, "num_steps": 1, "num_minibatches": 4}, "equal groups of environments"),
    ({"lr": (1e-3, 3e-4), "ent_coef": (0.0, 0.1, 0.2)}, "same length"),
    ({"num_envs": 0}, "num_envs must be >= 1"),
    ({"false_alarms": 1.0}, "false_alarms must be in \\[0, 1\\)"),
    ({"missed_alarms": -0.1}, "missed_alarms must be in \\[0, 1\\]"),
    ({"risk_scores": "held_out"}, "risk_scores 'held_out': use out_of_fold or in_sample"),
])
def test_bad_agent_settings_are_clear_errors(settings, message):
    with pytest.raises(ppo.AgentError, match=message):
        ppo.PPOConfig(**settings)


def test_unknown_agent_setting_is_a_clear_error():
    with pytest.raises(ppo.AgentError, match="unknown agent setting.*learning_rate"):
        ppo.PPOConfig.from_config({"learning_rate": 1e-3})


def test_loading_a_folder_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(ppo.AgentError, match="no trained sandhop-train-agent run"):
        ppo.load_policies(tmp_path)
