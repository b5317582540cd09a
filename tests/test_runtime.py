"""The exported artifact and the numpy runtime enforcer (`sandhop export`, `sandhop.enforcement.
runtime`, `pytest --sandhop-enforce`, `sandhop run`).

One tiny risk model and one tiny sandbox manager are really trained (small dataset, tiny
settings) and exported; the tests then check that the numpy runtime reproduces the JAX models on
recorded traces, that it runs without JAX, that a broken artifact stops the run before anything
is enforced, and that live runs apply the manager's actions before the one engine decides.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("hydra")
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from sandhop.agents import network  # noqa: E402
from sandhop.enforcement.engine import PolicyEngine  # noqa: E402
from sandhop.enforcement.runtime import (MANIFEST, POLICY_FILE, RISK_FILE, Artifact, ArtifactError,  # noqa: E402
                                         Manager, sha256_file)

# --------------------------------------------------------------------------- export

def test_export_writes_a_manifest_and_safetensors_weights(trained, capsys, tmp_path):
    art = trained.artifact
    assert sorted(p.name for p in art.iterdir()) == sorted([MANIFEST, RISK_FILE, POLICY_FILE])
    m = json.loads((art / MANIFEST).read_text())
    for key in ("format_version", "sandhop_version", "feature_spec", "feature_fingerprint", "event_model", "tiers",
                "env", "files"):
        assert key in m, key
    assert m["files"] == {n: sha256_file(art / n) for n in (RISK_FILE, POLICY_FILE)}
    assert set(m["tiers"]) == {"observe", "low", "medium", "high", "lockdown"}
    assert m["risk"]["calibrator"] and m["risk"]["thresholds"] and m["risk"]["config"]["model"]["width"] == 16
    assert m["agent"]["config"]["env"]["risk"]["source"] == "model" and m["agent"]["member"] in (0, 1)
    assert "val" in m["agent"]["why"] or m["agent"]["metrics"] == []
    for name in (RISK_FILE, POLICY_FILE):  # safetensors: a little-endian header length, then JSON
        raw = (art / name).read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
    assert "blocks.0.qkv.kernel" in load_file(str(art / RISK_FILE))
    # the command line, and its refusals
    from sandhop.cli import main
    assert main(["export", "--risk", str(trained.risk), "--agent", str(trained.agent), "--out", str(art)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["export", "--risk", str(trained.risk), "--agent", str(trained.agent), "--out",
                 str(tmp_path / "again"), "--member", "0"]) == 0
    out = capsys.readouterr().out
    assert "member 0" in out and "--sandhop-enforce" in out


def test_export_refuses_an_agent_trained_on_other_risk_inputs(trained, tmp_path):
    from sandhop.agents.export import ExportError, export
    other = tmp_path / "agent"
    shutil.copytree(trained.agent, other)
    cfg = (other / "config.yaml").read_text().replace("source: model", "source: rules")
    (other / "config.yaml").write_text(cfg)
    with pytest.raises(ExportError, match="rule-based risk.*env.risk.source=model"):
        export(trained.risk, other, tmp_path / "art")


# --------------------------------------------------------------------------- numpy = JAX

def recorded_episodes(table, limit: int = 100, max_events: int = 400) -> list[dict]:
    """Episodes of a labelled trace table (attacked ones first), as event columns in order."""
    cols = table.select(["suite", "run_id", "test_id", "seq", "category", "op", "target", "target_class", "phase",
                         "t_ns", "malicious"]).to_pydict()
    groups: dict[tuple, list[int]] = {}
    for i in sorted(range(len(cols["seq"])), key=lambda i: (cols["suite"][i], cols["run_id"][i], cols["test_id"][i],
                                                           cols["seq"][i])):
        if cols["test_id"][i]:
            groups.setdefault((cols["suite"][i], cols["run_id"][i], cols["test_id"][i]), []).append(i)
    keys = sorted(groups, key=lambda k: (not any(cols["malicious"][i] for i in groups[k]), k))[:limit]
    return [{"key": k, **{c: [cols[c][i] for i in groups[k][:max_events]]
                          for c in ("category", "op", "target", "target_class", "phase", "t_ns")}} for k in keys]


def replay(manager: Manager, engine: PolicyEngine, episode: dict) -> list[dict]:
    """The runtime on a recorded test: each event scored, acted on and decided by the engine."""
    manager.replay(episode["key"][2], episode)
    return manager.episode.steps


def test_the_numpy_runtime_reproduces_the_jax_models_on_recorded_traces(trained_caches):
    import pyarrow as pa

    from sandhop.agents.train_agent import load_run as load_agent
    from sandhop.datasets import splits
    from sandhop.envs import data as envdata
    from sandhop.envs.sandbox_env import SandboxManagerEnv
    trained = trained_caches
    art = Artifact.load(trained.artifact)
    engine = PolicyEngine()
    table = splits.load(splits.build(splits.compose(["dataset=small"]).dataset), "test")
    episodes = recorded_episodes(table)
    # The Gymnasium env over the same tests, its risk inputs from the JAX risk model (the
    # calibrated `score_episodes`, as in training) and its decisions from the engine
    keys = {e["key"] for e in episodes}
    sample = table.filter(pa.array([k in keys for k in zip(*(table[c].to_pylist() for c in
                                                             ("suite", "run_id", "test_id")))]))
    replayable = envdata.with_risk(envdata.from_table(sample, "sample"), art.env_spec, sample)
    env = SandboxManagerEnv(episodes=replayable, env=art.manifest["env"])
    where = {k: i for i, k in enumerate(replayable.keys)}
    policy = load_agent(trained.agent)[art.manifest["agent"]["member"]]
    names = art.env_spec.action_names()
    manager = Manager(art, engine, keep_steps=True)
    worst = 0.0
    steps = quiet_steps = 0
    first = []
    for episode in episodes:
        recorded = replay(manager, engine, episode)
        first.append(recorded)
        # the JAX policy on the runtime's observations takes the runtime's actions (at quiet
        # events, which the runtime does not score, the mask leaves it only stay)
        scored = [s for s in recorded if not s["quiet"]]
        quiet_steps += len(recorded) - len(scored)
        assert all(s["action"] == "stay" for s in recorded if s["quiet"])
        if scored:
            obs = {k: jnp.asarray(np.stack([np.atleast_1d(s["obs"][k]) if np.ndim(s["obs"][k]) else s["obs"][k]
                                            for s in scored])) for k in scored[0]["obs"]}
            x = network.normalize(jnp, jax.tree_util.tree_map(jnp.asarray, policy.norm),
                                  network.policy_inputs(jnp, obs, art.env_spec), policy.config.normalize_obs)
            logits, _ = network.heads(jnp, jax.tree_util.tree_map(jnp.asarray, policy.params), x,
                                      obs["action_mask"].astype(bool))
            assert [names[a] for a in np.asarray(jnp.argmax(logits, axis=-1))] == [s["action"] for s in scored]
        # the env shows the same observations when it takes the runtime's actions: risk and
        # tags as the JAX model scores them (within 1e-5; the runtime read the quiet events
        # before them in batches), everything else exactly, the action mask included
        obs_env, _ = env.reset(options={"episode": where[episode["key"]]})
        for s in recorded:
            for k, v in s["obs"].items():
                if k in ("risk", "tags"):
                    if not s["quiet"]:
                        worst = max(worst, float(np.abs(obs_env[k] - v).max()))
                else:
                    np.testing.assert_array_equal(obs_env[k], v, err_msg=k)
            obs_env, *_ = env.step(names.index(s["action"]))
            steps += 1
    assert worst <= 1e-5, worst
    assert steps > 500 and steps - quiet_steps > 100 and quiet_steps > 100
    # a second pass replays from the prefix and action caches: the same numbers exactly
    misses, hits = art.risk.misses, art.risk.hits
    for episode, recorded in zip(episodes, first):
        again = replay(manager, engine, episode)
        assert [(s["risk"], s["action"], s.get("surprise")) for s in again] == \
            [(s["risk"], s["action"], s.get("surprise")) for s in recorded]
    assert art.risk.misses - misses < steps / 10 and art.risk.hits - hits > (steps - quiet_steps)


def test_deferred_events_score_as_stepping_through_each(trained):
    """The fast path's batches (`RiskRuntime.defer`, then `step`; `run` over any split into
    blocks) give the scores of one step per event, past the key/value ring's wrap-around, and
    replay them from the prefix cache."""
    art = Artifact.load(trained.artifact)
    risk = art.risk
    kinds = [("fs.read", "open", "${site}/pkg/mod.py", "site", "call"),
             ("fs.write", "open", "${tmp}/out/data.json", "tmp", "call"),
             ("net.connect", "connect", "203.0.113.7:443", "public_net", "call"),
             ("env.read", "environ.get", "AWS_SECRET_ACCESS_KEY", "env.secret", "setup"),
             ("proc.spawn", "subprocess.Popen", "/usr/bin/git", "system", "call")]
    rng = np.random.default_rng(7)
    n = 3 * risk.context + 11
    state = risk.new_state()
    rows = np.stack([risk.encode(state, art.feature_spec.encode_event(*kinds[k]), int(t))
                     for k, t in zip(rng.integers(0, len(kinds), n), np.cumsum(rng.integers(1, 10**7, n)))])
    embedded = np.stack([risk.embed(r) for r in rows])
    limit, risk.cache_limit = risk.cache_limit, 0   # the network on every event
    state = risk.new_state()
    one_by_one = [risk.step(state, rows[i], embedded[i]) for i in range(n)]

    def close(a, b):
        assert abs(a[0] - b[0]) < 1e-6 and abs(a[2] - b[2]) < 1e-4 and abs(a[3] - b[3]) < 1e-4
        np.testing.assert_allclose(a[1], b[1], atol=1e-6)

    scored = rng.random(n) < 0.2
    state = risk.new_state()
    for i in range(n):
        if scored[i]:
            close(risk.step(state, rows[i], embedded[i]), one_by_one[i])
        else:
            risk.defer(state, rows[i], embedded[i])
    for split in ([n], [1, 2, risk.context + 3, n - risk.context - 6]):
        state, start = risk.new_state(), 0
        for size in split:
            close(risk.run(state, rows[start:start + size], embedded[start:start + size]), one_by_one[start + size - 1])
            start += size
    # with the prefix cache: a batch fills it, the same events again are answered from it
    risk.cache_limit = limit
    first = risk.run(risk.new_state(), rows, embedded)
    misses = risk.misses
    again = risk.run(risk.new_state(), rows, embedded)
    assert risk.misses == misses and (again[0], again[2], again[3]) == (first[0], first[2], first[3])
    np.testing.assert_array_equal(again[1], first[1])
    close(first, one_by_one[-1])


def test_the_runtime_imports_no_jax(trained, tmp_path):
    blocker = tmp_path / "blocker"
    for name in ("jax", "jaxlib", "flax", "optax", "orbax"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    script = textwrap.dedent(f"""
        import sys
        from sandhop.enforcement.engine import PolicyEngine
        from sandhop.enforcement.runtime import Artifact, Manager
        engine = PolicyEngine()
        manager = Manager(Artifact.load({str(trained.artifact)!r}), engine)
        manager.begin("t", engine.config("observe"))
        for i in range(40):
            config, said = manager.event("fs.read", "open", "${{home}}/.ssh/id_rsa", "home.secret", "call", i * 1000)
            manager.decided(engine.decide_target("fs.read", "${{home}}/.ssh/id_rsa", "home.secret", config).effect)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax"))
        print("scored", manager.episode.events, "risk", round(said["risk"], 3), "loaded", loaded)
    """)
    env = {"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "scored 40" in done.stdout and "loaded []" in done.stdout
    # and a whole pytest session enforcing the artifact
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_x.py").write_text("import sys\n\ndef test_no_jax(tmp_path):\n"
                                                  "    (tmp_path / 'a').write_text('x')\n"
                                                  "    assert 'jax' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           f"--sandhop-enforce={trained.artifact}", "test_x.py"],
                          cwd=tmp_path / "suite", capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout and "scored and" in done.stdout


# --------------------------------------------------------------------------- fail closed

def broken(trained, tmp_path, how: str) -> Path:
    from conftest import rehash_artifact
    art = shutil.copytree(trained.artifact, tmp_path / how)
    manifest = json.loads((art / MANIFEST).read_text())
    if how == "missing":
        (art / POLICY_FILE).unlink()
    elif how == "hash":  # one byte of a weight changed
        raw = bytearray((art / RISK_FILE).read_bytes())
        raw[-1] ^= 1
        (art / RISK_FILE).write_bytes(bytes(raw))
    elif how == "corrupt":  # not a safetensors file, though the manifest vouches for it
        (art / POLICY_FILE).write_bytes(b"\x00" * 64)
        rehash_artifact(art)
    elif how == "version":
        manifest["format_version"] = 99
        (art / MANIFEST).write_text(json.dumps(manifest))
    elif how == "event_model":  # trained on an event model with another category
        from sandhop.agents.features import FeatureSpec
        spec = FeatureSpec.from_json(manifest["feature_spec"])
        spec = FeatureSpec.from_json({**json.loads(spec.to_json()), "categories": [*spec.categories, "gpu.launch"]})
        manifest["feature_spec"], manifest["feature_fingerprint"] = json.loads(spec.to_json()), spec.fingerprint()
        (art / MANIFEST).write_text(json.dumps(manifest))
    elif how == "tiers":
        manifest["tiers"]["medium"] = "0" * 64
        (art / MANIFEST).write_text(json.dumps(manifest))
    return art


@pytest.mark.parametrize("how, message", [
    ("missing", "policy.safetensors is missing"),
    ("hash", "does not match the manifest"),
    ("corrupt", "not a readable safetensors file"),
    ("version", "format version 99, this sandhop reads version 2"),
    ("event_model", "does not match this sandhop's event model"),
    ("tiers", "tier templates changed"),
])
def test_a_broken_artifact_is_refused_with_what_to_do(trained, tmp_path, how, message):
    art = broken(trained, tmp_path, how)
    with pytest.raises(ArtifactError, match=message) as info:
        Artifact.load(art)
    assert "re-export" in str(info.value) or "retrain" in str(info.value)


from conftest import KEY_SUITE as SUITE  # noqa: E402


def inner(pytester, *args: str):
    pytester.makepyfile(test_inner=textwrap.dedent(SUITE))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args)


def test_a_run_with_a_broken_artifact_does_not_start_unless_a_fallback_tier_is_asked_for(trained, pytester, home,
                                                                                          tmp_path):
    art = broken(trained, tmp_path, "hash")
    result = inner(pytester, f"--sandhop-enforce={art}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*does not match the manifest*fail closed*--sandhop-fallback-tier*"])
    assert "passed" not in result.stdout.str()
    result = inner(pytester, f"--sandhop-enforce={art}", "--sandhop-fallback-tier=medium")
    result.assert_outcomes(passed=1, failed=1)   # medium denies the key
    result.stdout.fnmatch_lines(["*cannot be used*running the static tier medium instead*"])
    assert inner(pytester, f"--sandhop-enforce={art}", "--sandhop-policy=medium").ret == pytest.ExitCode.USAGE_ERROR


# --------------------------------------------------------------------------- live

def records(log: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == kind]


def test_the_manager_acts_before_the_engine_decides_and_the_audit_log_says_so(artifact_tools, pytester, home,
                                                                                tmp_path):
    log = tmp_path / "audit.jsonl"
    result = inner(pytester, f"--sandhop-enforce={artifact_tools.with_policy(tmp_path, 'hop:high')}",
                   f"--sandhop-audit-log={log}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*hop:high*observe -> high*", "*deny*fs.read*id_rsa*(risk *",
                                 "*events in*scored and*quiet*manager actions*"])
    actions = records(log, "action")
    assert {a["test_id"].rsplit("::", 1)[-1] for a in actions} >= {"test_reads_key", "test_writes_tmp"}
    assert all(a["action"] == "hop:high" and a["tier_before"] == "observe" and a["tier"] == "high"
               and 0 <= a["risk"] <= 1 for a in actions)
    (deny,) = [r for r in records(log, "decision") if r["target"].endswith("id_rsa")]
    assert deny["decision"] == "deny" and deny["tier"] == "high" and "risk" in deny and deny["action"] in ("hop:high", "stay")
    episodes = records(log, "episode")
    assert sum(e["events"] for e in episodes) > 0 and all(e["tier"] == "high" for e in episodes if e["actions"])
    assert subprocess.run([sys.executable, "-m", "sandhop", "audit", "verify", str(log)]).returncode == 0
    # every scored event is in the log (allowed ones as `event` records), so it exports as a trace
    scored = records(log, "event") + [r for r in records(log, "decision") if "risk" in r]
    assert len(scored) == sum(e["events"] for e in episodes)
    from sandhop.datasets.traces import read_traces
    from sandhop.enforcement import audit
    table = read_traces(audit.export(log, tmp_path / "trace"))
    # (quiet events, on the fast path, carry no risk: the model read them without scoring them)
    assert table.num_rows == len(scored)
    assert table.column("risk").to_pylist().count(None) == sum(e["quiet"] for e in episodes) > 0
    assert {"passed", "failed"} <= set(table.column("test_outcome").to_pylist())
    # the same artifact in audit mode blocks nothing and records what it would have denied
    audit_log = tmp_path / "audit-mode.jsonl"
    inner(pytester, f"--sandhop-enforce={artifact_tools.with_policy(tmp_path / 'a', 'hop:high')}", "--sandhop-mode=audit",
          f"--sandhop-audit-log={audit_log}").assert_outcomes(passed=2)
    assert [r["decision"] for r in records(audit_log, "decision") if r["target"].endswith("id_rsa")] == ["deny"]


def test_a_manager_that_stays_enforces_the_base_tier(artifact_tools, pytester, home, tmp_path):
    result = inner(pytester, f"--sandhop-enforce={artifact_tools.with_policy(tmp_path, 'stay')}")
    result.assert_outcomes(passed=2)  # the base tier (observe) allows the read
    result.stdout.fnmatch_lines(["*base tier observe*0 manager actions*denied 0 operations*"])


CHILD_SUITE = """
    import os, subprocess, sys

    STEAL = "import os; print(open(os.path.expanduser('~/.ssh/id_rsa')).read())"

    def test_child_reads_key():
        child = subprocess.run([sys.executable, "-c", STEAL], capture_output=True, text=True)
        assert child.returncode == 0 and child.stdout.strip() == "CANARY", child.stderr
"""


def test_a_child_process_runs_the_manager_from_its_first_event_that_is_not_quiet(artifact_tools, pytester, home,
                                                                                   tmp_path):
    """The parent only spawns (the hand-set policy stays there); the child reads the key, which
    its own manager, loaded then, hops to high for: the read is denied in the child."""
    pytester.makepyfile(test_inner=textwrap.dedent(CHILD_SUITE))
    art = artifact_tools.when_class(tmp_path, "home.secret", "hop:high")
    log = tmp_path / "audit.jsonl"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", f"--sandhop-enforce={art}",
                                           f"--sandhop-audit-log={log}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*deny*fs.read*id_rsa*(risk *", "*tests and collectors and 1 child processes*"])
    (action,) = records(log, "action")
    (deny,) = [r for r in records(log, "decision") if r["target"].endswith("id_rsa")]
    parent = {e["pid"] for e in records(log, "episode") if not e.get("child")}
    (child,) = [e for e in records(log, "episode") if e.get("child")]
    assert action["pid"] == deny["pid"] == child["pid"] and child["pid"] not in parent
    assert action["tier_before"] == "observe" and action["tier"] == deny["tier"] == "high"
    assert child["quiet"] > 0 and child["events"] > child["quiet"]   # its imports waited, unscored
    # the same artifact with a policy that never acts lets the child read it (observe)
    calm = artifact_tools.with_policy(tmp_path / "calm", "stay")
    pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--sandhop-enforce={calm}").assert_outcomes(passed=1)


def test_a_child_that_cannot_load_the_artifact_fails_closed(artifact_tools, pytester, home, tmp_path):
    """The artifact changed after the run began: the child's manager cannot load, so the child
    runs under lockdown's rules and says why."""
    art = artifact_tools.with_policy(tmp_path, "stay")
    pytester.makepyfile(test_inner=textwrap.dedent(CHILD_SUITE).replace(
        "def test_child_reads_key():", f"def test_child_reads_key():\n    open({str(art / POLICY_FILE)!r}, 'ab').write(b'x')"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", f"--sandhop-enforce={art}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*deny*fs.read*id_rsa*", "*could not load the artifact*fail closed*"])


def test_sandhop_run_passes_pytest_arguments_and_fails_closed(trained, artifact_tools, home, tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_inner.py").write_text(textwrap.dedent(SUITE))
    run = [sys.executable, "-m", "sandhop", "run"]
    done = subprocess.run([*run, str(artifact_tools.with_policy(tmp_path, "hop:high")), "--", "-q", "-p",
                           "no:cacheprovider", "-k", "writes"], cwd=suite, capture_output=True, text=True)
    assert done.returncode == 0 and "1 passed, 1 deselected" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([*run, str(broken(trained, tmp_path, "missing")), "--", "-q"], cwd=suite,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "is missing" in done.stderr and "Nothing was run" in done.stderr


def test_the_runtime_leaves_no_objects_behind_per_event(trained, pytester):
    """Suites check for leaks by counting gc-tracked objects between calls that are audit events
    (markupsafe's test_leak does); scoring those events must not grow the count (its caches
    hold arrays and bytes keys, which the collector does not track)."""
    pytester.makepyfile(test_leak="""
        import gc

        def test_counts_stay_the_same():
            counts = set()
            gc.collect()
            for _ in range(20):
                counts.add(len(gc.get_objects()))   # an audited event each time
            assert len(counts) < 3, counts
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--sandhop-enforce={trained.artifact}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*events in*scored and*quiet*"])
