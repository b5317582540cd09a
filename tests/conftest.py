"""Fixtures shared by the tests of the exported artifact, its runtime and the learning loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# No fold models (out_of_fold=0): the smoke manager trains on the full small dataset, not on this
# model's 12-test one, so it uses the in-sample scores (tests/test_out_of_fold.py trains folds).
TINY_RISK = ("model=tiny", "dataset=small", "dataset.max_units_per_suite=12", "train.seq_len=32",
             "train.batch_size=8", "train.epochs=2", "train.lr=1e-2", "train.warmup_steps=1", "progress=false",
             "out_of_fold=0")
IN_SAMPLE = "agent.risk_scores=in_sample"   # what a manager on TINY_RISK's scores needs


# A suite with one test the strict tiers break (it reads a key from a fake HOME; see `home`).
KEY_SUITE = """
    import os

    def test_reads_key():
        assert open(os.path.expanduser("~/.ssh/id_rsa")).read() == "CANARY"

    def test_writes_tmp(tmp_path):
        (tmp_path / "out.txt").write_text("ok")
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """A fake HOME holding a key (~/.ssh/id_rsa, "CANARY")."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("CANARY")
    monkeypatch.setenv("HOME", str(home))
    return home


def compose(name: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_module("sandhop.configs", version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny risk model, a tiny manager trained on its scores (two seeds), and their artifact:
    trained once per session, only read by the tests (copy before changing)."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("hydra")
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
        train_risk.run(compose("train_risk", *TINY_RISK, f"out={risk}"))
        train_agent.run(compose("train_agent", "experiment=smoke", "env.risk.source=model",
                                f"env.risk.checkpoint={risk}", IN_SAMPLE, "agent.num_seeds=2",
                                "agent.eval_every_chunks=4"),
                        agent)
        export(risk, agent, art)
    for name, value in before.items():
        jax.config.update(name, value)
    cc.reset_cache()
    return SimpleNamespace(risk=risk, agent=agent, artifact=art, cache=base / "cache", xla_cache=base / "xla-cache")


def rehash_artifact(art: Path) -> None:
    """Make the manifest vouch for the weight files as they are now (a deliberate edit)."""
    from sandhop.enforcement.runtime import MANIFEST, sha256_file
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["files"] = {name: sha256_file(art / name) for name in manifest["files"]}
    (art / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def artifact_tools(trained):
    """Deliberate edits of the trained artifact, in copies."""
    from safetensors.numpy import load_file, save_file

    from sandhop.enforcement.runtime import POLICY_FILE, Artifact

    def with_policy(where: Path, action: str) -> Path:
        """The artifact with a policy head that always prefers `action` (and otherwise stays),
        re-hashed: makes the live behaviour certain."""
        art = shutil.copytree(trained.artifact, Path(where) / action.replace(":", "-"))
        weights = load_file(str(art / POLICY_FILE))
        names = Artifact.load(art).env_spec.action_names()
        weights["actor.1.w"] = np.zeros_like(weights["actor.1.w"])
        weights["actor.1.b"] = np.zeros_like(weights["actor.1.b"])
        weights["actor.1.b"][names.index(action)] = 5.0
        save_file(weights, str(art / POLICY_FILE))
        rehash_artifact(art)
        return art

    def when_class(where: Path, target_class: str, action: str) -> Path:
        """The artifact with a policy that takes `action` at events of `target_class` only and
        otherwise stays (a hand-set network: one hidden unit lit by that class's embedding)."""
        from sandhop.enforcement.events import CATEGORIES, TARGET_CLASSES
        art = shutil.copytree(trained.artifact, Path(where) / f"{action.replace(':', '-')}-at-{target_class}")
        weights = {k: np.zeros_like(v) if k.startswith(("embed.", "actor.")) else v
                   for k, v in load_file(str(art / POLICY_FILE)).items()}
        names = Artifact.load(art).env_spec.action_names()
        weights["embed.table"][len(CATEGORIES) + TARGET_CLASSES.index(target_class), 0] = 3.0
        weights["actor.0.w"][0, 0] = 3.0
        weights["actor.1.w"][0, names.index(action)] = 10.0
        weights["actor.1.b"][names.index("stay")] = 5.0
        save_file(weights, str(art / POLICY_FILE))
        rehash_artifact(art)
        return art

    return SimpleNamespace(with_policy=with_policy, when_class=when_class, rehash=rehash_artifact)


@pytest.fixture
def trained_caches(trained, monkeypatch):
    """The session artifact's dataset and compilation caches for a test that trains or scores
    again: the small dataset is not rebuilt and programs the session compiled are loaded."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    monkeypatch.setenv("SANDHOP_CACHE", str(trained.cache))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(trained.xla_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    cc.reset_cache()
    yield trained
    for name, value in before.items():
        jax.config.update(name, value)
    cc.reset_cache()
