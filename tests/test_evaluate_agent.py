"""`sandhop evaluate` and its baselines, replayed through the real Gymnasium env and engine on the
small dataset: static tiers against an independent count from the decision table, the oracle,
the threshold rule's tuning, the written results, and bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sandhop.agents.baselines import Oracle, StaticTier, ThresholdRule, threshold_grid
from sandhop.agents.evaluate_agent import (METRICS, confidence_interval, evaluate, parse_env_overrides, replay,
                                           spread, write_results)
from sandhop.cli import main
from sandhop.enforcement.engine import TIER_LEVEL, TIERS
from sandhop.envs import data as envdata
from sandhop.envs.sandbox_env import SandboxManagerEnv
from sandhop.envs.spec import EnvSpec

SPEC = EnvSpec()                       # configs/env/default.yaml: base tier low, rule-based risk


@pytest.fixture(scope="module")
def val() -> envdata.Episodes:
    return envdata.load("val", "small", SPEC)


def by_table(episodes: envdata.Episodes, tier: str, spec: EnvSpec = SPEC) -> dict[str, float]:
    """What a static tier does, counted straight from the engine's decision table, episode by episode."""
    level = TIER_LEVEL[tier]
    effect = envdata.decision_table(episodes, spec)[episodes.event, level, 0]
    costs, overhead = spec.outcome_costs(), np.float32(spec.tier_overhead[level])
    through = broken = 0
    total = 0.0
    for e, attack in enumerate(episodes.attack):
        span = episodes.span(e)
        mal, eff, dmg = episodes.malicious[span], effect[span], episodes.damaging[span]
        total += float(np.sum(costs[3 * mal + eff] - overhead, dtype=np.float64))
        if attack:
            last = int(np.flatnonzero(dmg)[0]) + 1 if dmg.any() else len(mal)
            through += bool(np.all(eff[:last][mal[:last]] == 0))
        else:
            broken += bool(np.any(eff == 2))
    return {"attacks_through": through, "tests_broken": broken,
            "malicious_steps_allowed": int(np.sum(episodes.malicious & (effect == 0))),
            "benign_steps_denied": int(np.sum(~episodes.malicious & (effect == 2))),
            "episodic_return": total / len(episodes), "mean_tier": level,
            "mean_tier_cost": spec.tier_overhead[level]}


def check_against_table(row: dict, expected: dict) -> None:
    for k, v in expected.items():
        assert row[k] == pytest.approx(v, abs=1e-4), (row["policy"], k)


def test_static_tiers_replayed_in_the_env_match_the_decision_table(val):
    rows = evaluate([StaticTier(t) for t in TIERS], ["val"], SPEC, "small")
    assert [r["policy"] for r in rows] == [f"static:{t}" for t in TIERS]
    for tier, row in zip(TIERS, rows):
        # static:observe runs although the env config's base tier is low: the policy sets its own
        check_against_table(row, by_table(val, tier))
        assert row["hops_per_test"] == 0 and row["episodes"] == len(val) and row["steps"] == val.n_events
    assert rows[0]["attacks_through"] == rows[0]["attacks"] > 0   # observe stops nothing, so attacks are there


def test_static_tiers_on_held_out_tests_match_the_decision_table():
    episodes = envdata.load("test", "small", SPEC)
    chosen = spread(len(episodes), 80)
    rows = evaluate([StaticTier("medium"), StaticTier("high")], ["test"], SPEC, "small", max_episodes=80)
    sample = episodes.subset(chosen)
    assert rows[0]["episodes"] == len(sample) and rows[0]["attacks"] == sum(bool(a) for a in sample.attack) > 0
    for tier, row in zip(("medium", "high"), rows):
        check_against_table(row, by_table(sample, tier))
    assert rows[1]["tests_broken"] > rows[0]["tests_broken"]     # high breaks more: the comparison has teeth


def test_oracle_stops_every_attack_and_breaks_no_test():
    rows = evaluate([Oracle(), StaticTier("observe")], ["test"], SPEC, "small")
    oracle, observe = rows
    assert oracle["attacks"] > 0 and observe["attacks_through"] == oracle["attacks"]
    assert oracle["attacks_through"] == 0 and oracle["attacks_stopped_pct"] == 100.0
    assert oracle["tests_broken"] == 0
    assert 0 < oracle["hops_per_test"] * oracle["episodes"] <= oracle["attacks"]   # hops only in attacked tests
    assert oracle["mean_tier"] < 1.5                                           # not just lockdown everywhere


def trace(*tests: tuple[str, list[tuple[str, str, str, bool, bool]]]) -> envdata.Episodes:
    """Episodes of a hand-written labelled trace: per test, (category, target, class, malicious, damaging)."""
    rows = [{"suite": "s", "run_id": "r", "test_id": test, "seq": seq, "category": c, "target": t,
             "target_class": k, "malicious": m, "damaging": d, "attack": "x" if m else ""}
            for test, events in tests for seq, (c, t, k, m, d) in enumerate(events)]
    return envdata.from_table(pa.Table.from_pylist(rows), "hand-written")


BENIGN = ("fs.read", "/tmp/x", "tmp", False, False)                         # allowed below high
SECRET = ("fs.read", "${home}/.ssh/id_rsa", "home.secret", True, False)      # denied from low on
C2 = ("net.connect", "91.92.243.18:8080", "public_net", True, False)         # allowed at low, denied from medium


def test_an_attack_counts_as_stopped_only_before_its_first_damaging_step():
    damaging_c2 = C2[:4] + (True,)
    episodes = trace(("late", [BENIGN, damaging_c2, SECRET]),       # the secret read is denied, but after the damage
                     ("early", [SECRET, damaging_c2]),              # denied before the damage
                     ("undamaging", [C2, SECRET]),                 # no damaging step: any stopped step counts
                     ("benign", [BENIGN, BENIGN]))
    env = SandboxManagerEnv(env=SPEC.as_dict(), episodes=episodes)
    low = replay(StaticTier("low"), env)
    assert (low["attacks"], low["attacks_through"], low["tests_broken"], low["malicious_steps_allowed"]) == (3, 1, 0, 3)
    assert low["attacks_stopped_pct"] == pytest.approx(200 / 3)
    high = replay(StaticTier("high"), env)                          # high stops everything, and breaks the benign test
    assert (high["attacks_through"], high["tests_broken"], high["benign_steps_denied"]) == (0, 1, 3)
    oracle, env = Oracle(), SandboxManagerEnv(env=replace(SPEC, base_tier="observe").as_dict(), episodes=episodes)
    oracle.bind(env)
    seen = replay(oracle, env)
    assert (seen["attacks_through"], seen["tests_broken"], seen["hops_per_test"]) == (0, 0, 0.75)
    # each attack hops, at its first malicious step, to the least strict tier that stops all of
    # them (the secret read alone needs low; with the connection, medium)
    assert seen["mean_tier"] == pytest.approx((0 + 2 + 2 + 2 + 2 + 2 + 2 + 0 + 0) / 9)


def test_oracle_must_be_bound_to_an_env():
    with pytest.raises(RuntimeError, match="bind"):
        Oracle().reset({"episode": 0})


def test_threshold_grid_is_exact_and_the_tuned_rule_is_its_best_in_the_real_env(val):
    spec = replace(SPEC, base_tier="observe")
    grid = threshold_grid(val, spec)
    rules = [ThresholdRule(t, tier) for t, tier in zip(grid["threshold"], grid["tier"])]
    rows = evaluate(rules, ["val"], spec, "small")
    replayed = np.array([r["episodic_return"] for r in rows])
    # the numpy shortcut used for tuning is the Gym replay, rule by rule
    np.testing.assert_allclose(grid["mean_return"], replayed, atol=1e-5)
    assert [r["tests_broken"] for r in rows] == grid["tests_broken"].tolist()
    assert [r["attacks_through"] for r in rows] == grid["attacks_through"].tolist()
    assert len(set(np.round(replayed, 6))) > 1                     # the choice matters
    tuned = ThresholdRule.tune(val, spec)
    best = evaluate([tuned], ["val"], spec, "small")[0]
    assert best["episodic_return"] >= replayed.max() - 1e-6
    assert best["episodic_return"] == pytest.approx(tuned.tuning["mean_return"], abs=1e-5)
    assert tuned.tier in ("medium", "high", "lockdown") and tuned.threshold in grid["threshold"]


def test_evaluate_command_writes_parquet_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--dataset", "small", "--split", "val", "--out", str(out),
                 "--policies", "static:medium,static:lockdown,threshold,oracle"])
    assert code == 0
    table = pq.read_table(out / "results.parquet")
    assert table.column_names == ["policy", "seed", "split", *METRICS]
    rows = table.to_pylist()
    assert [(r["policy"], r["seed"], r["split"]) for r in rows] == [
        ("static:medium", 0, "val"), ("static:lockdown", 0, "val"), ("threshold", 0, "val"), ("oracle", 0, "val")]
    oracle = rows[3]
    assert oracle["attacks_through"] == 0 and oracle["tests_broken"] == 0 and oracle["episodes"] > 0
    md = (out / "results.md").read_text()
    assert "## val" in md and "| oracle | 1 | 0 ± —" in md
    assert "threshold rule: hop observe ->" in md and "tuned on" in md
    assert "oracle dominates" in md and "static:lockdown" in md.split("oracle dominates")[1].split(";")[0]
    assert (out / "pareto_val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| policy | seeds | attacks_through |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--policies", "static,bogus"], "unknown policy 'bogus'"),
    (["--policies", "static:extreme"], "unknown tier 'extreme'"),
    (["--split", "test,holdout"], "unknown split(s) ['holdout']"),
    (["--policies", "ppo:{tmp}/missing"], "no such folder"),
    (["--policies", "ppo:{tmp}"], "holds no trained sandhop-train-agent run"),
    (["--env", "bogus=1"], "unknown env setting(s) bogus"),
    (["--env", "base_tier"], "expected KEY=VALUE"),
    (["--env", "base_tier=extreme"], "'extreme' is not a tier"),
])
def test_bad_input_exits_1_with_the_fix(tmp_path, capsys, args, message):
    (tmp_path / "config.yaml").write_text("agent: ppo\n")       # a run folder that never saved a checkpoint
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["evaluate", "--dataset", "small", "--out", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sandhop evaluate: ") and message in err
    assert not (tmp_path / "out").exists()


def test_env_overrides_nest_and_parse_values():
    assert parse_env_overrides(["risk.source=model", "risk.checkpoint=runs/r", "reward.hop=0.5",
                                "env.base_tier=observe", "max_episode_steps=null"]) == {
        "risk": {"source": "model", "checkpoint": "runs/r"}, "reward": {"hop": 0.5}, "base_tier": "observe",
        "max_episode_steps": None}


def test_results_over_seeds_show_t_intervals_and_pareto_dominance(tmp_path):
    def row(policy, seed, through, broken):
        return {"policy": policy, "seed": seed, "split": "test", **{m: 0.0 for m in METRICS},
                "attacks_through": through, "tests_broken": broken, "episodes": 10, "attacks": 4, "steps": 50}
    rows = [row("ppo", 0, 1, 2), row("ppo", 1, 2, 3), row("ppo", 2, 3, 4),      # mean 2 / 3
            row("static:medium", 0, 2, 5), row("static:high", 0, 0, 9)]
    md = write_results(rows, tmp_path, ["dataset: synthetic"])
    half = 4.302652729911275 / np.sqrt(3)                        # t(0.975, 2) * sd 1 / sqrt(3)
    assert confidence_interval([1, 2, 3]) == pytest.approx(half)
    assert f"| ppo | 3 | 2.0 ± {half:.1f} | " in md
    assert "ppo dominates static:medium." in md and "Non-dominated: ppo, static:high." in md
    assert pq.read_table(tmp_path / "results.parquet").num_rows == 5
    assert (tmp_path / "pareto_test.png").stat().st_size > 0
