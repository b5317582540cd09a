"""Warm-starting PPO from an exported artifact (`sandhop-train-agent init=ARTIFACT`, for `sandhop
learn`): a tiny risk model and a smoke manager are really trained and exported; a new run starts
every member from the artifact's policy and normaliser, trains on as a normal run, and refuses
an artifact that does not fit (another hidden size, other actions, a corrupt file) clearly."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("hydra")
from hydra import compose, initialize_config_module  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from conftest import IN_SAMPLE  # noqa: E402
from sandhop.agents.export import flatten  # noqa: E402
from sandhop.agents.ppo import AgentError  # noqa: E402
from sandhop.enforcement.runtime import MANIFEST, POLICY_FILE, sha256_file  # noqa: E402

def _compose(name: str, *overrides: str):
    with initialize_config_module("sandhop.configs", version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture
def built(trained_caches):
    """The session's tiny risk model and artifact (tests/conftest.py), with its caches."""
    return trained_caches


def agent_config(risk: Path, *overrides: str):
    """A smoke run with two members on the risk model's scores: the artifact's env and agent."""
    return _compose("train_agent", "experiment=smoke", "env.risk.source=model", f"env.risk.checkpoint={risk}",
                    IN_SAMPLE, "agent.num_seeds=2", *overrides)


def policy_tensors(policy) -> dict[str, np.ndarray]:
    """One member's networks and normaliser under the names policy.safetensors uses."""
    return flatten({**policy.params, "norm": policy.norm})


def test_every_member_starts_from_the_artifact_and_then_trains_as_a_normal_run(built, tmp_path):
    from sandhop.agents.train_agent import load_run, run
    out = tmp_path / "warm"
    result = run(agent_config(built.risk, f"init={built.artifact}", "stop_after_chunks=0"), out)
    assert result["update"] == 0
    record = json.loads((out / "init.json").read_text())
    assert record == result["init"]
    assert record["artifact"] == str(built.artifact.resolve())
    assert record["manifest_sha256"] == sha256_file(built.artifact / MANIFEST)
    exported = load_file(str(built.artifact / POLICY_FILE))
    members = load_run(out)                       # the start, saved as update 0
    assert len(members) == 2
    for member in members:
        tensors = policy_tensors(member)
        assert tensors.keys() == exported.keys()
        for name, value in exported.items():
            assert member_dtype(member, name) == np.float32, name
            np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    # resumed from that start, it trains like any run
    result = run(agent_config(built.risk, f"init={built.artifact}", "stop_after_chunks=1"), out)
    assert result["update"] > 0 and result["init"] == record
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["seed"] for r in rows} == {"0", "1"}
    trained = policy_tensors(load_run(out)[0])
    assert not np.array_equal(trained["actor.1.w"], exported["actor.1.w"])   # it learned from there


def member_dtype(member, name: str):
    """The dtype of one tensor as the checkpoint holds it (not as `flatten` casts it)."""
    node: object = {**member.params, "norm": member.norm}
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return np.asarray(node).dtype


def corrupt(art: Path, tmp_path: Path) -> Path:
    """A copy of the artifact with one byte of its policy flipped (the manifest not updated)."""
    copy = shutil.copytree(art, tmp_path / "corrupt")
    raw = bytearray((copy / POLICY_FILE).read_bytes())
    raw[-1] ^= 1
    (copy / POLICY_FILE).write_bytes(bytes(raw))
    return copy


@pytest.mark.parametrize("override, message", [
    ("agent.hidden=8", r"hidden size 16, this run's agent.hidden is 8; set agent.hidden=16"),
    ("env.categories=[fs.read,fs.write]", r"other actions.*only in the artifact: .*grant:net.dns.*env.categories="),
    ("agent.normalize_obs=false", r"set agent.normalize_obs=True"),
    ("corrupt", r"cannot be used: .*policy.safetensors: sha256 .* does not match the manifest"),
])
def test_an_artifact_that_does_not_fit_is_refused_before_anything_is_written(built, tmp_path, override, message):
    from sandhop.agents.train_agent import run
    art = corrupt(built.artifact, tmp_path) if override == "corrupt" else built.artifact
    overrides = [] if override == "corrupt" else [override]
    out = tmp_path / "run"
    with pytest.raises(AgentError, match=message):
        run(agent_config(built.risk, f"init={art}", *overrides), out)
    assert not out.exists()
