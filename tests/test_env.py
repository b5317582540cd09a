"""The sandbox-manager environments: the Gymnasium env against the real engine, its JAX twin,
their equivalence, rewards, masks, vector envs, risk inputs and bad input."""

from __future__ import annotations

import json

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pytest
from gymnasium.utils.env_checker import check_env

from sandhop.enforcement.engine import TIERS
from sandhop.enforcement.events import CATEGORIES
from sandhop.envs import ENV_ID  # importing the package registers the env id
from sandhop.envs import data as envdata
from sandhop.envs.jax_env import JaxSandboxEnv
from sandhop.envs.sandbox_env import SandboxManagerEnv
from sandhop.envs.spec import EFFECTS, N_TIERS, OBS_KEYS, OUTCOMES, EnvError, EnvSpec


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SANDHOP_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def test_split():
    """The small dataset's test split: held-out suites with injected attacks."""
    return envdata.load("test", "small")


def sample(episodes: envdata.Episodes, n: int, seed: int = 0) -> list[int]:
    """n episodes: every attacked one first (up to half), then others at random."""
    rng = np.random.default_rng(seed)
    attacked = [i for i, a in enumerate(episodes.attack) if a]
    benign = [i for i, a in enumerate(episodes.attack) if not a]
    picked = attacked[: n // 2]
    return picked + rng.choice(benign, size=n - len(picked), replace=False).tolist()


def planned(plan: dict[int, str], names: list[str]):
    """A policy that takes each planned action (an action name, or a prefix such as "revoke:"
    for any of them) from its step on, as soon as the mask offers it (only stay at quiet events;
    elsewhere the actions that change the event's decision)."""
    todo: list = []

    def policy(obs, t):
        if t == 0:
            todo[:] = sorted(plan.items())
        for item in todo:
            step, want = item
            offered = [i for i, n in enumerate(names) if n.startswith(want) and obs["action_mask"][i]]
            if step <= t and offered:
                todo.remove(item)
                return offered[0]
        return 0
    return policy


def play(env: SandboxManagerEnv, episode: int, policy) -> tuple[float, list[dict], list[int]]:
    obs, _ = env.reset(options={"episode": episode})
    total, infos, actions, done = 0.0, [], [], False
    while not done:
        action = policy(obs, len(actions))
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        infos.append(info)
        actions.append(action)
        done = terminated or truncated
    return total, infos, actions


# --------------------------------------------------------------------------- Gymnasium API

def test_make_and_check_env():
    env = gymnasium.make(ENV_ID, split="val", dataset="small")
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=1)
    assert set(obs) == set(OBS_KEYS) and env.observation_space.contains(obs)
    assert info["test_id"] and info["length"] >= 1
    again, info2 = env.reset(seed=1)
    assert info2["episode"] == info["episode"]  # seeding follows Gymnasium's rules
    obs, reward, terminated, truncated, info = env.step(0)
    assert {"decision", "rule_id", "malicious", "tier"} <= set(info)
    assert info["decision"] in EFFECTS and isinstance(reward, float)
    assert env.unwrapped.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.NEXT_STEP


def test_the_env_decides_with_the_real_engine(test_split):
    env = SandboxManagerEnv(episodes=test_split, base_tier="observe")
    attacked = next(i for i, a in enumerate(test_split.attack) if a)
    _, infos, _ = play(env, attacked, lambda obs, t: 0)
    assert all(i["decision"] == "allow" and i["rule_id"] == "observe:default" for i in infos)
    assert any(i["outcome"] == "malicious_allowed" for i in infos)
    # the same attack with an escalation to lockdown first: the engine's lockdown rules decide
    # (at its first event that is not quiet: the mask allows only stay before)
    lockdown = 1 + TIERS.index("lockdown")
    _, infos, actions = play(env, attacked, lambda obs, t: lockdown if obs["action_mask"][lockdown] else 0)
    first = actions.index(lockdown)
    assert all(i["quiet"] and i["decision"] == "allow" for i in infos[:first])
    assert all(i["tier"] == "lockdown" for i in infos[first:])
    assert {i["rule_id"].split(":")[0] for i in infos[first:]} <= {"low", "high", "lockdown"}  # extends high
    # what lockdown lets through is quiet: every tier allows it
    assert not any(i["outcome"] == "malicious_allowed" and not i["quiet"] for i in infos)


def until_not_quiet(env: SandboxManagerEnv, obs: dict) -> dict:
    """Stay through quiet events (only stay is valid there) to the next one the manager acts at."""
    while not obs["action_mask"][1:].any():
        obs, _, terminated, truncated, _ = env.step(0)
        assert not (terminated or truncated), "the episode ended before an event the manager acts at"
    return obs


def current(env: SandboxManagerEnv) -> tuple[str, str, str]:
    """(category, target, class) of the event the env shows now."""
    e = env.episodes
    return e.targets[int(e.event[env._start + env._t])]


def until_offered(env: SandboxManagerEnv, obs: dict, action: int) -> dict:
    """Stay until the mask offers `action`."""
    while not obs["action_mask"][action]:
        obs, _, terminated, truncated, _ = env.step(0)
        assert not (terminated or truncated), "the episode ended before the action was offered"
    return obs


def test_masks_are_respected():
    env = SandboxManagerEnv(split="val", dataset="small", base_tier="low")
    names = env.env_spec.action_names()
    episode = max(range(len(env.episodes)), key=lambda e: env.episodes.length[e])
    obs, _ = env.reset(options={"episode": episode})
    obs = until_not_quiet(env, obs)
    mask = obs["action_mask"]
    assert mask[0] == 1
    category, target, cls = current(env)
    now = env.engine.decide_target(category, target, cls, env.config).effect
    # only escalations, and only to tiers that decide this event otherwise
    assert [mask[names.index(f"hop:{t}")] for t in TIERS] == [
        int(TIERS.index(t) > TIERS.index("low") and (category == "proc.spawn" or env.engine.decide_target(
            category, target, cls, env.engine.config(t)).effect != now)) for t in TIERS]
    lockdown = names.index("hop:lockdown")
    obs = until_offered(env, obs, lockdown)
    obs, _, terminated, truncated, info = env.step(lockdown)
    assert info["tier"] == "lockdown" and not info["invalid_action"] and not (terminated or truncated)
    mask = obs["action_mask"]
    assert not any(mask[1:1 + N_TIERS])                                   # lockdown is one-way
    assert not any(mask[names.index(f"grant:{c}")] for c in env.env_spec.categories)  # no grants in lockdown
    obs, *_, info = env.step(names.index("hop:low"))                      # a masked action: stays
    assert info["invalid_action"] and info["tier"] == "lockdown" and info["action"] == "stay"
    # a revoked category cannot be revoked again, and is shown in the observation
    obs, _ = env.reset(options={"episode": episode})
    revokes = [names.index(f"revoke:{c}") for c in env.env_spec.categories]
    while not obs["action_mask"][revokes].any():
        obs, *_ = env.step(0)
    revoke = revokes[int(np.flatnonzero(obs["action_mask"][revokes])[0])]
    k = revokes.index(revoke)
    obs, *_ = env.step(revoke)
    assert obs["permissions"][k] == 2 and obs["action_mask"][revoke] == 0
    assert env.env_spec.categories[k] in env.config.revocations


def test_actions_are_offered_where_they_change_the_decision(test_split):
    """Beyond the quiet events, the mask offers an action exactly where taking it would change
    the event's decision (asked of the engine, action by action), or at a spawn (the child starts
    under the config); random valid actions visit tiers, grants and revocations."""
    from sandhop.envs.spec import action_mask, apply_action
    env = SandboxManagerEnv(episodes=test_split, base_tier="observe")
    spec, engine = env.env_spec, env.engine
    names = spec.action_names()
    rng = np.random.default_rng(0)
    checked = offered = 0
    for e in sample(test_split, 24, seed=5):
        obs, _ = env.reset(options={"episode": e})
        done = False
        while not done:
            mask = obs["action_mask"]
            category, target, cls = current(env)
            if mask[1:].any() or category == "proc.spawn":
                now = engine.decide_target(category, target, cls, env.config).effect
                valid = action_mask(np, env.config.level, env._permissions, spec.n_categories)
                for a in range(1, spec.n_actions):
                    config, _, _ = apply_action(engine, env.config, env._permissions.copy(), a, spec)
                    changes = engine.decide_target(category, target, cls, config).effect != now
                    assert mask[a] == (valid[a] and (changes or category == "proc.spawn")), names[a]
                    checked += 1
                    offered += int(mask[a])
            action = int(rng.choice(np.flatnonzero(mask))) if rng.random() < 0.3 else 0
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
    assert checked > 500 and 0 < offered < checked


def test_quiet_events_allow_only_stay_and_every_tier_allows_them(test_split):
    """At a quiet event the manager cannot change its decision (every tier allows it, with or
    without a grant), so the mask allows only stay; revoking its category makes it count again."""
    from sandhop.enforcement.engine import PolicyEngine
    engine = PolicyEngine()
    env = SandboxManagerEnv(episodes=test_split, base_tier="observe", engine=engine)
    names = env.env_spec.action_names()
    seen = {True: 0, False: 0}
    for e in sample(test_split, 20, seed=3):
        _, infos, _ = play(env, e, lambda obs, t: 0)
        for t, info in enumerate(infos):
            seen[info["quiet"]] += 1
            if info["quiet"]:
                category, target, cls = test_split.targets[int(test_split.event[test_split.start[e] + t])]
                for tier in TIERS:
                    for grants in ((), (category,)):
                        config = engine.config(tier, grants=grants)
                        assert engine.decide_target(category, target, cls, config).effect == "allow"
            if info["category"] == "proc.spawn":   # the child inherits the config: never quiet
                assert not info["quiet"]
    assert seen[True] > 5 * seen[False] > 0   # most events are quiet
    # a quiet fs.read after fs.read was revoked: the manager may act there (grant it back)
    quiet = test_split.quiet(envdata.decision_table(test_split, env.env_spec))
    is_read = np.array([t[0] == "fs.read" for t in test_split.targets])

    def fits(e):   # an event the manager acts at, then an fs.read
        span = test_split.span(e)
        loud = np.flatnonzero(~quiet[span])
        return len(loud) > 0 and is_read[test_split.event[span][loud[0] + 1:]].any()
    e = next(e for e in range(len(test_split)) if fits(e))
    obs, _ = env.reset(options={"episode": e})
    revoke = names.index("revoke:fs.read")
    while not obs["action_mask"][revoke]:
        obs, *_ = env.step(0)
    obs, *_, info = env.step(revoke)
    while True:
        i = test_split.start[e] + env._t
        if test_split.targets[int(test_split.event[i])][0] == "fs.read":
            break
        obs, *_ = env.step(0)
    assert obs["action_mask"][names.index("grant:fs.read")] == 1
    obs, *_, info = env.step(0)
    assert info["decision"] == "deny" and not info["quiet"]


def test_vector_envs():
    for mode in ("sync", "async"):
        envs = gymnasium.make_vec(ENV_ID, num_envs=2, vectorization_mode=mode, split="val", dataset="small")
        try:
            obs, _ = envs.reset(seed=0)
            assert obs["action_mask"].shape == (2, envs.single_action_space.n)
            finished, keys = 0, set()
            for _ in range(40):
                actions = np.array([np.flatnonzero(m)[-1] for m in obs["action_mask"]])
                obs, reward, terminated, truncated, info = envs.step(actions)
                assert reward.shape == (2,) and envs.observation_space.contains(obs)
                keys |= set(info)
                finished += int(np.sum(terminated | truncated))
            assert finished > 0  # tests of the val split are short: episodes ended and restarted
            assert {"decision", "tier", "test_id"} <= keys  # step infos, and reset infos after an autoreset
        finally:
            envs.close()


# --------------------------------------------------------------------------- equivalence with the twin

def test_twin_and_gymnasium_env_agree_step_by_step(test_split):
    spec = EnvSpec(max_episode_steps=60)
    episodes = test_split.subset(sample(test_split, 120))
    twin = JaxSandboxEnv.from_episodes(episodes, spec)
    env = SandboxManagerEnv(episodes=episodes, env=spec.as_dict())
    step = jax.jit(twin.step_env)
    reset_to = jax.jit(twin.reset_to)
    rng = np.random.default_rng(0)
    outcomes = set()
    steps = 0
    for e in range(len(episodes)):
        obs, _ = env.reset(options={"episode": e})
        jobs, state = reset_to(e, twin.params)
        done = False
        while not done:
            for k in OBS_KEYS:
                np.testing.assert_array_equal(np.asarray(obs[k]), np.asarray(jobs[k]), err_msg=f"{e}/{k}")
            # mostly valid actions, sometimes any action (a masked one must count as stay in both)
            valid = np.flatnonzero(obs["action_mask"])
            action = int(rng.choice(valid) if rng.random() < 0.9 else rng.integers(env.action_space.n))
            obs, reward, terminated, truncated, info = env.step(action)
            jobs, state, jreward, jterm, jtrunc, jinfo = step(state, action, twin.params)
            assert reward == float(jreward), (e, steps)
            assert (terminated, truncated) == (bool(jterm), bool(jtrunc))
            assert info["decision"] == EFFECTS[int(jinfo["effect"])]
            assert info["invalid_action"] == bool(jinfo["invalid_action"])
            outcomes.add(info["outcome"])
            steps += 1
            done = terminated or truncated
        for k in OBS_KEYS:
            np.testing.assert_array_equal(np.asarray(obs[k]), np.asarray(jobs[k]), err_msg=f"final {e}/{k}")
    assert steps > 500 and {"benign_allowed", "malicious_allowed"} <= outcomes
    assert len(outcomes) >= 4, outcomes


def test_twin_vmaps_jits_and_autoresets(test_split):
    twin = JaxSandboxEnv.from_episodes(test_split.subset(range(50)), EnvSpec(max_episode_steps=16))
    n = 512
    reset = jax.jit(jax.vmap(twin.reset, in_axes=(0, None)))
    step = jax.vmap(twin.step, in_axes=(0, 0, None))

    @jax.jit
    def rollout(obs, state):
        def body(carry, _):
            obs, state = carry
            action = jnp.argmax(obs["action_mask"] * jnp.arange(twin.n_actions), axis=-1)  # last valid
            obs, state, reward, term, trunc, info = step(state, action, twin.params)
            return (obs, state), (reward, term | trunc, state.t, info["invalid_action"])
        return jax.lax.scan(body, (obs, state), None, length=40)

    obs, state = reset(jax.random.split(jax.random.key(0), n), twin.params)
    again, _ = reset(jax.random.split(jax.random.key(0), n), twin.params)
    np.testing.assert_array_equal(obs["category"], again["category"])  # same key, same episodes
    assert len(np.unique(np.asarray(state.episode))) > 20
    (obs, state), (reward, done, t, invalid) = rollout(obs, state)
    reward, done, t = map(np.asarray, (reward, done, t))
    assert reward.shape == (40, n) and np.isfinite(reward).all()
    assert done.any() and (t[done] == 0).all()                 # finished episodes restart at once
    assert t.max() <= 16 and not np.asarray(invalid).any()


def test_alerts_count_earlier_events_that_were_not_quiet_and_looked_risky(test_split):
    """`alerts` at an event: the test's earlier events that were not quiet with risk >= ALERT_RISK
    (capped), never the current one; the twin agrees step by step (the equivalence test)."""
    from sandhop.envs.spec import ALERT_CAP, ALERT_RISK
    env = SandboxManagerEnv(episodes=test_split, base_tier="observe")
    seen = set()
    for e in sample(test_split, 30, seed=2):
        obs, _ = env.reset(options={"episode": e})
        expected, done, t = 0, False, 0
        while not done:
            assert obs["alerts"] == min(expected, ALERT_CAP)
            risk = float(test_split.risk[test_split.start[e] + t])
            obs, _, terminated, truncated, info = env.step(0)
            expected += int(not info["quiet"] and risk >= ALERT_RISK)
            seen.add(min(expected, ALERT_CAP))
            done, t = terminated or truncated, t + 1
    assert max(seen) >= 2   # attacked tests raise it


# --------------------------------------------------------------------------- rewards

TERMS = {  # reward term -> what it is charged for: an outcome, or a counter kept by the test
    "malicious_allowed": "malicious_allowed",
    "damaging_allowed": "damage",
    "benign_denied": "benign_denied",
    "benign_redirected": "benign_redirected",
    "hop": "hops",
    "permission_change": "changes",
    "tier_overhead": "steps",
}


@pytest.mark.parametrize("term", sorted(TERMS))
def test_each_reward_term_changes_the_return_as_configured(test_split, term):
    episodes = test_split.subset(sample(test_split, 30, seed=1))
    names = EnvSpec().action_names()
    # escalate mid-test, revoke a category, grant one; in every other test go to lockdown:
    # every outcome and cost occurs
    plans = [planned({1: "hop:medium", 2: "revoke:", 3: "grant:"}, names),
             planned({1: "hop:lockdown", 2: "revoke:"}, names)]

    def returns(**overrides):
        env = SandboxManagerEnv(episodes=episodes, base_tier="observe", max_episode_steps=40, **overrides)
        total, counts = 0.0, dict.fromkeys(["hops", "changes", "steps", "damage"] + list(OUTCOMES), 0)
        for e in range(len(episodes)):
            ret, infos, actions = play(env, e, plans[e % 2])
            total += ret
            for info, a in zip(infos, actions):
                counts[info["outcome"]] += 1
                counts["steps"] += info["tier"] == "lockdown"
                counts["damage"] += info["damaging"] and info["outcome"] == "malicious_allowed"
                counts["hops"] += info["action"].startswith("hop:")
                counts["changes"] += info["action"].startswith(("grant:", "revoke:"))
        return total, counts

    base, counts = returns()
    delta = 0.5
    if term == "tier_overhead":
        costs = dict(zip(TIERS, EnvSpec().tier_overhead))
        changed, _ = returns(reward={"tier_overhead": {**costs, "lockdown": costs["lockdown"] + delta}})
    else:
        changed, _ = returns(reward={term: getattr(EnvSpec(), term) + delta})
    n = counts[TERMS[term]]
    assert n > 0, f"the plan never produced {TERMS[term]}"
    assert changed - base == pytest.approx(-delta * n, rel=1e-4, abs=1e-3)


# --------------------------------------------------------------------------- risk inputs

def test_rule_based_risk_is_documented_and_scores_secrets_above_imports(test_split):
    risk, tags = envdata.rule_risk("fs.read", "home.secret")
    assert risk >= 0.8 and tags.sum() == 1
    assert envdata.rule_risk("code.import", "stdlib_module")[0] == envdata.LOW_RISK
    assert test_split.risk_source == "rules" and test_split.risk.dtype == np.float32
    assert test_split.risk[test_split.malicious].mean() > 3 * test_split.risk[~test_split.malicious].mean()


def test_risk_from_a_trained_checkpoint(trained):
    """The session's tiny risk model run (tests/conftest.py) as the env's risk inputs."""
    from sandhop.agents.features import encode_episodes
    from sandhop.agents.risk_model import Calibrator
    from sandhop.agents.train_risk import load_run, score_episodes
    from sandhop.datasets import splits
    out = trained.risk
    env = SandboxManagerEnv(split="val", dataset="small", risk={"source": "model", "checkpoint": str(out)})
    assert env.episodes.risk_source.startswith("model:")
    # the env's inputs are the checkpoint's calibrated risk and tag head, event by event
    model, spec, _ = load_run(out)
    table = splits.load(splits.build(splits.compose(["dataset=small"]).dataset), "val")
    enc = encode_episodes(table.to_pydict(), spec)
    calibrator = Calibrator(**json.loads((out / "evaluation.json").read_text())["calibrator"])
    e = enc.keys.index(env.episodes.keys[3])
    expected = score_episodes(model, [enc.features[e]])[0]
    span = env.episodes.span(3)
    np.testing.assert_allclose(env.episodes.risk[span], calibrator(expected["risk"], expected["surprise"]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(env.episodes.tags[span], expected["tags"], rtol=1e-5, atol=1e-6)
    assert list((splits.cache_dir() / "risk").glob("*.npz"))  # computed once, then cached
    obs, _ = env.reset(options={"episode": 3})
    assert obs["risk"][0] == env.episodes.risk[span][0]


# --------------------------------------------------------------------------- bad input

def test_unknown_split_and_dataset_are_clear_errors():
    with pytest.raises(EnvError, match="unknown split 'holdout'; one of train, val, test, novel"):
        gymnasium.make(ENV_ID, split="holdout", dataset="small")
    with pytest.raises(EnvError, match="unknown dataset 'nope'"):
        SandboxManagerEnv(split="val", dataset="nope")


def test_bad_env_settings_are_clear_errors():
    with pytest.raises(EnvError, match="base_tier 'paranoid' is not a tier"):
        SandboxManagerEnv(split="val", dataset="small", base_tier="paranoid")
    with pytest.raises(EnvError, match=r"unknown env setting\(s\) reward.hopp"):
        EnvSpec.from_config(None, reward={"hopp": 1.0})
    with pytest.raises(EnvError, match="needs env.risk.checkpoint"):
        EnvSpec.from_config(None, risk={"source": "model"})
    with pytest.raises(EnvError, match="unknown categories"):
        EnvSpec.from_config(None, categories=["fs.read", "fs.teleport"])


def small_table() -> pa.Table:
    from sandhop.datasets import splits
    return splits.load(splits.build(splits.compose(["dataset=small"]).dataset), "val")


def test_empty_dataset_is_a_clear_error():
    table = small_table()
    only_session = table.filter(pa.compute.equal(table["test_id"], ""))
    with pytest.raises(EnvError, match="no test events"):
        envdata.from_table(only_session, "empty")
    episodes = envdata.from_table(table, "val").subset([])
    with pytest.raises(EnvError, match="has no episodes"):
        SandboxManagerEnv(episodes=episodes)
    with pytest.raises(EnvError, match="has no episodes"):
        JaxSandboxEnv.from_episodes(episodes)


def test_unknown_category_in_a_trace_is_a_clear_error():
    table = small_table()
    categories = table["category"].to_pylist()
    row = next(i for i, t in enumerate(table["test_id"].to_pylist()) if t)
    categories[row] = "fs.teleport"
    bad = table.set_column(table.schema.get_field_index("category"), "category", pa.array(categories))
    with pytest.raises(EnvError, match="category 'fs.teleport', which is not in this sandhop's event model"):
        envdata.from_table(bad, "bad")
    assert "fs.teleport" not in CATEGORIES


def test_a_risk_checkpoint_of_another_feature_spec_is_refused(tmp_path):
    from sandhop.agents.features import FeatureSpec
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: {kind: traces}\n")
    (run / "spec.json").write_text(FeatureSpec(categories=("fs.read", "fs.write")).to_json())
    settings = {"risk": {"source": "model", "checkpoint": str(run)}}
    with pytest.raises(EnvError, match="does not match this sandhop's event model .*categories.*retrain"):
        SandboxManagerEnv(split="val", dataset="small", **settings)
    (run / "spec.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(EnvError, match="version 99"):
        SandboxManagerEnv(split="val", dataset="small", **settings)
    (run / "spec.json").write_text(FeatureSpec().to_json())
    (run / "config.yaml").write_text("dataset: {kind: adfa_ld}\n")
    with pytest.raises(EnvError, match="ADFA-LD system calls"):
        SandboxManagerEnv(split="val", dataset="small", **settings)
    with pytest.raises(EnvError, match="not a risk-model run folder"):
        SandboxManagerEnv(split="val", dataset="small", risk={"source": "model", "checkpoint": str(tmp_path)})


def test_the_env_config_file_loads_and_round_trips():
    spec = EnvSpec.from_config(None)
    assert spec == EnvSpec() == EnvSpec.from_config(spec.as_dict())  # configs/env/default.yaml = the defaults
    assert spec.n_actions == 1 + N_TIERS + 2 * len(spec.categories) and "syscall" not in spec.categories


def test_reward_terms_are_hydra_parameters():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_module("sandhop.configs", version_base="1.3"):
        cfg = compose(overrides=["+env=default", "env.reward.hop=0.25", "env.reward.tier_overhead.high=0.5",
                                 "env.base_tier=medium", "env.risk.source=rules"])
        typo = compose(overrides=["+env=default", "+env.reward.hopp=1"])
    spec = EnvSpec.from_config(cfg.env)
    assert (spec.hop, spec.tier_overhead[TIERS.index("high")], spec.base_tier) == (0.25, 0.5, "medium")
    with pytest.raises(EnvError, match=r"unknown env setting\(s\) reward.hopp"):
        EnvSpec.from_config(typo.env)
