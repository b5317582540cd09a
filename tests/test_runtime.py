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
from types import SimpleNamespace

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("hydra")
import jax.numpy as jnp  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from sandhop.agents import network  # noqa: E402
from sandhop.enforcement.engine import PolicyEngine  # noqa: E402
from sandhop.enforcement.runtime import (MANIFEST, POLICY_FILE, RISK_FILE, Artifact, ArtifactError,  # noqa: E402
                                         Manager, sha256_file)

TINY_RISK = ("model=tiny", "dataset=small", "dataset.max_units_per_suite=12", "train.seq_len=32",
             "train.batch_size=8", "train.epochs=2", "train.lr=1e-2", "train.warmup_steps=1", "progress=false")


def _compose(name: str, *overrides: str):
    with initialize_config_module("sandhop.configs", version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny risk model, a tiny manager trained on its scores (two seeds), and their artifact."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    from sandhop.agents import train_agent, train_risk
    from sandhop.agents.export import export
    base = tmp_path_factory.mktemp("trained")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(base / "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    cc.reset_cache()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SANDHOP_CACHE", str(base / "cache"))
        risk, agent, art = base / "risk", base / "agent", base / "artifact"
        train_risk.run(_compose("train_risk", *TINY_RISK, f"out={risk}"))
        train_agent.run(_compose("train_agent", "experiment=smoke", "env.risk.source=model",
                                 f"env.risk.checkpoint={risk}", "agent.num_seeds=2", "agent.eval_every_chunks=4"),
                        agent)
        export(risk, agent, art)
        yield SimpleNamespace(risk=risk, agent=agent, artifact=art, cache=base / "cache")
    for name, value in before.items():
        jax.config.update(name, value)
    cc.reset_cache()


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rehash(art: Path) -> None:
    """Make the manifest vouch for the weight files as they are now (a deliberate edit)."""
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["files"] = {name: sha256_file(art / name) for name in manifest["files"]}
    (art / MANIFEST).write_text(json.dumps(manifest))


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

def recorded_episodes(table, limit: int = 150, max_events: int = 400) -> list[dict]:
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
    manager.begin(episode["key"][2], engine.config(manager.spec.base_tier))
    for cat, op, target, cls, phase, t in zip(*(episode[c] for c in ("category", "op", "target", "target_class",
                                                                      "phase", "t_ns"))):
        config, _ = manager.event(cat, op, target, cls, phase, t)
        manager.decided(engine.decide_target(cat, target, cls, config).effect)
    return manager.episode.steps


def test_the_numpy_runtime_reproduces_the_jax_models_on_recorded_traces(trained, monkeypatch):
    from sandhop.agents.risk_model import Calibrator
    from sandhop.agents.train_agent import load_run as load_agent
    from sandhop.agents.train_risk import load_run as load_risk, score_episodes
    from sandhop.datasets import splits
    from sandhop.envs.sandbox_env import SandboxManagerEnv
    monkeypatch.setenv("SANDHOP_CACHE", str(trained.cache))
    art = Artifact.load(trained.artifact)
    engine = PolicyEngine()
    root = splits.build(splits.compose(["dataset=small"]).dataset)
    episodes = recorded_episodes(splits.load(root, "test"))
    assert any(e["key"][2] for e in episodes)
    # JAX: the risk model over whole episodes, and the policy on the runtime's observations
    model, fspec, _ = load_risk(trained.risk)
    outputs = score_episodes(model, [fspec.encode(e) for e in episodes])
    calibrate = Calibrator(**art.manifest["risk"]["calibrator"])
    policy = load_agent(trained.agent)[art.manifest["agent"]["member"]]
    env = SandboxManagerEnv(split="test", dataset="small", env=art.manifest["env"])
    where = {k: i for i, k in enumerate(env.episodes.keys)}
    manager = Manager(art, engine, keep_steps=True)
    worst_risk = worst_tags = 0.0
    steps = hops = 0
    for episode, out in zip(episodes, outputs):
        recorded = replay(manager, engine, episode)
        risk = np.array([s["risk"] for s in recorded])
        worst_risk = max(worst_risk, float(np.abs(risk - calibrate(out["risk"], out["surprise"])).max()))
        worst_tags = max(worst_tags, float(np.abs(np.stack([s["tags"] for s in recorded]) - out["tags"]).max()))
        obs = {k: jnp.asarray(np.stack([np.atleast_1d(s["obs"][k]) if np.ndim(s["obs"][k]) else s["obs"][k]
                                        for s in recorded])) for k in recorded[0]["obs"]}
        x = network.normalize(jnp, jax.tree_util.tree_map(jnp.asarray, policy.norm),
                              network.policy_inputs(jnp, obs, art.env_spec), policy.config.normalize_obs)
        logits, _ = network.heads(jnp, jax.tree_util.tree_map(jnp.asarray, policy.params), x,
                                  obs["action_mask"].astype(bool))
        names = art.env_spec.action_names()
        assert [names[a] for a in np.asarray(jnp.argmax(logits, axis=-1))] == [s["action"] for s in recorded]
        # the Gymnasium env (risk from the JAX model, decisions from the engine) shows the
        # runtime the same observations when it takes the runtime's actions
        obs_env, _ = env.reset(options={"episode": where[episode["key"]]})
        for s in recorded:
            for k, v in s["obs"].items():
                if k in ("risk", "tags"):
                    np.testing.assert_allclose(obs_env[k], v, atol=1e-5)
                else:
                    np.testing.assert_array_equal(obs_env[k], v, err_msg=k)
            obs_env, *_ = env.step(names.index(s["action"]))
            steps += 1
            hops += s["action"] != "stay"
    assert worst_risk <= 1e-5 and worst_tags <= 1e-5, (worst_risk, worst_tags)
    assert steps > 500


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
    assert "1 passed" in done.stdout and "events scored" in done.stdout


# --------------------------------------------------------------------------- fail closed

def broken(trained, tmp_path, how: str) -> Path:
    art = copy_artifact(trained.artifact, tmp_path / how)
    manifest = json.loads((art / MANIFEST).read_text())
    if how == "missing":
        (art / POLICY_FILE).unlink()
    elif how == "hash":  # one byte of a weight changed
        raw = bytearray((art / RISK_FILE).read_bytes())
        raw[-1] ^= 1
        (art / RISK_FILE).write_bytes(bytes(raw))
    elif how == "corrupt":  # not a safetensors file, though the manifest vouches for it
        (art / POLICY_FILE).write_bytes(b"\x00" * 64)
        rehash(art)
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
    ("version", "format version 99, this sandhop reads version 1"),
    ("event_model", "does not match this sandhop's event model"),
    ("tiers", "tier templates changed"),
])
def test_a_broken_artifact_is_refused_with_what_to_do(trained, tmp_path, how, message):
    art = broken(trained, tmp_path, how)
    with pytest.raises(ArtifactError, match=message) as info:
        Artifact.load(art)
    assert "re-export" in str(info.value) or "retrain" in str(info.value)


SUITE = """
    import os

    def test_reads_key():
        assert open(os.path.expanduser("~/.ssh/id_rsa")).read() == "CANARY"

    def test_writes_tmp(tmp_path):
        (tmp_path / "out.txt").write_text("ok")
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("CANARY")
    monkeypatch.setenv("HOME", str(home))
    return home


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

def with_policy(trained, tmp_path: Path, action: str) -> Path:
    """The artifact with its policy head replaced by one that always prefers `action` (and
    otherwise stays): a deliberate edit, re-hashed, to make the live behaviour certain."""
    art = copy_artifact(trained.artifact, tmp_path / action.replace(":", "-"))
    weights = load_file(str(art / POLICY_FILE))
    names = Artifact.load(art).env_spec.action_names()
    weights["actor.1.w"] = np.zeros_like(weights["actor.1.w"])
    weights["actor.1.b"] = np.zeros_like(weights["actor.1.b"])
    weights["actor.1.b"][names.index(action)] = 5.0
    save_file(weights, str(art / POLICY_FILE))
    rehash(art)
    return art


def records(log: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == kind]


def test_the_manager_acts_before_the_engine_decides_and_the_audit_log_says_so(trained, pytester, home, tmp_path):
    log = tmp_path / "audit.jsonl"
    result = inner(pytester, f"--sandhop-enforce={with_policy(trained, tmp_path, 'hop:high')}",
                   f"--sandhop-audit-log={log}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*hop:high*observe -> high*", "*deny*fs.read*id_rsa*(risk *",
                                 "*events scored in*manager actions*"])
    actions = records(log, "action")
    assert {a["test_id"].rsplit("::", 1)[-1] for a in actions} >= {"test_reads_key", "test_writes_tmp"}
    assert all(a["action"] == "hop:high" and a["tier_before"] == "observe" and a["tier"] == "high"
               and 0 <= a["risk"] <= 1 for a in actions)
    (deny,) = [r for r in records(log, "decision") if r["target"].endswith("id_rsa")]
    assert deny["decision"] == "deny" and deny["tier"] == "high" and "risk" in deny and deny["action"] in ("hop:high", "stay")
    episodes = records(log, "episode")
    assert sum(e["events"] for e in episodes) > 0 and all(e["tier"] == "high" for e in episodes if e["actions"])
    assert subprocess.run([sys.executable, "-m", "sandhop", "audit", "verify", str(log)]).returncode == 0
    # the same artifact in audit mode blocks nothing and records what it would have denied
    audit_log = tmp_path / "audit-mode.jsonl"
    inner(pytester, f"--sandhop-enforce={with_policy(trained, tmp_path / 'a', 'hop:high')}", "--sandhop-mode=audit",
          f"--sandhop-audit-log={audit_log}").assert_outcomes(passed=2)
    assert [r["decision"] for r in records(audit_log, "decision") if r["target"].endswith("id_rsa")] == ["deny"]


def test_a_manager_that_stays_enforces_the_base_tier(trained, pytester, home, tmp_path):
    result = inner(pytester, f"--sandhop-enforce={with_policy(trained, tmp_path, 'stay')}")
    result.assert_outcomes(passed=2)  # the base tier (observe) allows the read
    result.stdout.fnmatch_lines(["*base tier observe*0 manager actions*denied 0 operations*"])


def test_sandhop_run_passes_pytest_arguments_and_fails_closed(trained, home, tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_inner.py").write_text(textwrap.dedent(SUITE))
    run = [sys.executable, "-m", "sandhop", "run"]
    done = subprocess.run([*run, str(with_policy(trained, tmp_path, "hop:high")), "--", "-q", "-p",
                           "no:cacheprovider", "-k", "writes"], cwd=suite, capture_output=True, text=True)
    assert done.returncode == 0 and "1 passed, 1 deselected" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([*run, str(broken(trained, tmp_path, "missing")), "--", "-q"], cwd=suite,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "is missing" in done.stderr and "Nothing was run" in done.stderr
