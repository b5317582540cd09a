"""Warm-starting the risk model from an exported artifact (`sandhop-train-risk init=ARTIFACT`):
the run starts from the artifact's weights and feature spec, records where it started, and
refuses artifacts that are corrupt or do not fit the configured model."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("hydra")
from safetensors.numpy import load_file, save_file  # noqa: E402

from sandhop.agents.features import UNK, FeatureSpec  # noqa: E402
from sandhop.enforcement.runtime import (MANIFEST, RISK_FILE,  # noqa: E402
                                         sha256_file)

TINY = ("model=tiny", "dataset=small", "dataset.max_units_per_suite=12", "train.seq_len=32",
        "train.batch_size=8", "train.epochs=1", "train.lr=0.0", "progress=false", "evaluate=false")


def compose(*overrides: str):
    from conftest import compose as compose_config
    return compose_config("train_risk", *overrides)


@pytest.fixture
def artifact(trained_caches) -> Path:
    """The session's exported tiny artifact (tests/conftest.py), with its dataset and compile
    caches. Its risk model was trained from seed 0 for two epochs, so its weights are not those a
    seed-0 run starts with; learning rate 0 (TINY) keeps a warm-started run at them."""
    return trained_caches.artifact


def weights(run_dir: Path) -> dict[str, np.ndarray]:
    from sandhop.agents.export import risk_weights
    from sandhop.agents.train_risk import load_run
    return risk_weights(load_run(run_dir)[0])


def test_a_warm_start_begins_at_the_artifacts_weights_and_spec(artifact, tmp_path):
    from sandhop.agents.train_risk import TrainError, run
    out = tmp_path / "b"
    # seed 0: B's own initial weights are not A's. Learning rate 0: its steps change nothing, so
    # its checkpoint holds the weights it started from
    run(compose(*TINY, f"init={artifact}", f"out={out}"))
    started, exported = weights(out), load_file(str(artifact / RISK_FILE))
    assert started.keys() == exported.keys() and len(started) > 10
    for name, value in exported.items():
        np.testing.assert_array_equal(started[name], value, err_msg=name)
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert FeatureSpec.from_json((out / "spec.json").read_text()) == FeatureSpec.from_json(manifest["feature_spec"])
    record = json.loads((out / "init.json").read_text())
    assert record["artifact"] == str(artifact.resolve())
    assert record["manifest_sha256"] == sha256_file(artifact / MANIFEST)
    assert record["feature_fingerprint"] == manifest["feature_fingerprint"]
    with pytest.raises(TrainError, match="another init config"):  # resuming must keep its start
        run(compose(*TINY, f"out={out}"))


def test_data_is_encoded_with_the_given_spec_and_unseen_ops_become_unknown(artifact):
    from sandhop.agents.train_risk import load_data
    spec = FeatureSpec.from_json(json.loads((artifact / MANIFEST).read_text())["feature_spec"])
    fewer = replace(spec, ops=spec.ops[:3])
    data, used, _ = load_data(compose(*TINY), fewer)
    assert used == fewer
    ops = np.concatenate([f[:, 1] for f in data["train"].features])
    assert (ops == UNK).any() and ops.max() <= 1 + len(fewer.ops)


def test_a_model_or_features_config_other_than_the_artifacts_is_refused(artifact, tmp_path):
    from sandhop.agents.train_risk import TrainError, run
    out = tmp_path / "b"
    with pytest.raises(TrainError, match=r"differs .* in width \(32 here, 16 there\).*model\.width=16"):
        run(compose(*TINY, f"init={artifact}", "model.width=32", f"out={out}"))
    with pytest.raises(TrainError, match=r"features\.pieces=4"):
        run(compose(*TINY, f"init={artifact}", "features.pieces=2", f"out={out}"))
    assert not (out / "config.yaml").exists()  # a refused start leaves no run behind to block the next
    with pytest.raises(TrainError, match="init=null"):
        run(compose("experiment=adfa_ld", f"init={artifact}", f"out={out}"))


def test_a_corrupt_or_unfitting_artifact_is_refused(artifact, tmp_path):
    from conftest import rehash_artifact
    from sandhop.agents.train_risk import TrainError, run
    corrupt = Path(shutil.copytree(artifact, tmp_path / "corrupt"))
    with open(corrupt / RISK_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(TrainError, match="sha256"):
        run(compose(*TINY, f"init={corrupt}", f"out={tmp_path / 'b'}"))
    with pytest.raises(TrainError, match="no manifest.json"):
        run(compose(*TINY, f"init={tmp_path}", f"out={tmp_path / 'c'}"))
    short = Path(shutil.copytree(artifact, tmp_path / "short"))
    tensors = load_file(str(short / RISK_FILE))
    del tensors["blocks.0.qkv.kernel"]
    save_file(tensors, str(short / RISK_FILE))
    rehash_artifact(short)
    with pytest.raises(TrainError, match="blocks.0.qkv.kernel is missing"):
        run(compose(*TINY, f"init={short}", f"out={tmp_path / 'd'}"))
