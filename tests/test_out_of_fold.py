"""Out-of-fold risk scores: `sandhop-train-risk out_of_fold=K` scores every test of the train
split with a fold model that did not train on it, and the sandbox manager trains on those
(`agent.risk_scores=out_of_fold`) instead of the final model's in-sample scores."""

from __future__ import annotations

import csv
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("hydra")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from conftest import TINY_RISK, compose  # noqa: E402

from sandhop.agents import evaluate_risk as ev  # noqa: E402
from sandhop.agents import ppo  # noqa: E402
from sandhop.agents.risk_model import ModelConfig  # noqa: E402
from sandhop.agents.train_agent import training_env  # noqa: E402
from sandhop.agents.train_risk import (OUT_OF_FOLD, Trainer, TrainError, fold_of, load_data, pack, run,  # noqa: E402
                                       score_episodes, steps_per_epoch)
from sandhop.envs import data as envdata  # noqa: E402
from sandhop.envs.spec import EnvSpec  # noqa: E402

FOLDED = (*(o for o in TINY_RISK if not o.startswith("out_of_fold=")), "out_of_fold=2")


@pytest.fixture(scope="module")
def folded(trained, tmp_path_factory):
    """A tiny risk run with two fold models, on the session's dataset and compilation caches."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(trained.xla_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    cc.reset_cache()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SANDHOP_CACHE", str(trained.cache))
        out = tmp_path_factory.mktemp("folded") / "risk"
        cfg = compose("train_risk", *FOLDED, f"out={out}")
        evaluation = run(cfg)
        yield SimpleNamespace(out=out, cfg=cfg, evaluation=evaluation)
    for name, value in before.items():
        jax.config.update(name, value)
    cc.reset_cache()


def agent_config(risk, *overrides: str):
    """The smoke manager on the tiny risk run's own dataset (its 12 tests per suite)."""
    return compose("train_agent", "experiment=smoke", "dataset.max_units_per_suite=12", "env.risk.source=model",
                   f"env.risk.checkpoint={risk}", "agent.false_alarms=0", "agent.missed_alarms=0", *overrides)


def fold_model(out, k: int, cfg):
    trainer = Trainer(out / "folds" / f"{k + 1}-of-2", load_data(cfg)[1], ModelConfig(**cfg.model), cfg.train, 1,
                      int(cfg.seed))
    assert trainer.restore()
    return trainer


def test_every_train_test_is_scored_by_the_fold_model_that_did_not_train_on_it(folded):
    data, spec, _ = load_data(folded.cfg)
    train = data["train"]
    table = pq.read_table(folded.out / OUT_OF_FOLD)
    keys = list(zip(*(table[c].to_pylist() for c in ("suite", "run_id", "test_id"))))
    assert sorted(keys) == sorted(train.keys)                       # every train test, once
    fold = np.array(table["fold"].to_pylist())
    assert fold.tolist() == [fold_of(s, t, 2) for s, _, t in keys]
    assert set(fold.tolist()) == {0, 1}
    where = {k: i for i, k in enumerate(train.keys)}
    stored = table["risk"].to_pylist()
    summary = folded.evaluation["out_of_fold"]
    assert [f["tests"] for f in summary["per_fold"]] == np.bincount(fold).tolist()
    for k in (0, 1):
        trainer = fold_model(folded.out, k, folded.cfg)
        # it trained on the other fold only: its step count is that data's, not the whole split's
        others = train.subset([where[key] for key, f in zip(keys, fold) if f != k])
        assert trainer.step == int(folded.cfg.train.epochs) * steps_per_epoch(
            len(pack(others, int(folded.cfg.train.seq_len))), int(folded.cfg.train.batch_size))
        model = trainer.current_model()
        calibrator = ev.fit_calibrator(data["val"], score_episodes(model, data["val"].features))
        mine = [i for i, f in enumerate(fold) if f == k]
        held = train.subset([where[keys[i]] for i in mine])
        _, _, probs = ev.episode_probs(held, score_episodes(model, held.features), calibrator)
        for i, p in zip(mine, probs):
            np.testing.assert_allclose(stored[i], p, rtol=1e-6)
    # and they are not the final model's scores of the tests it trained on
    spec_env = EnvSpec.from_config(agent_config(folded.out).env)
    episodes = envdata.load("train", agent_config(folded.out).dataset, spec_env)
    assert not np.allclose(envdata.out_of_fold_risk(episodes, str(folded.out)).risk, episodes.risk)


def test_a_finished_run_run_again_keeps_its_fold_models(folded):
    before = {k: (folded.out / "folds" / f"{k}-of-2" / "metrics.csv").read_text() for k in (1, 2)}
    scores = pq.read_table(folded.out / OUT_OF_FOLD)
    run(folded.cfg)
    assert {k: (folded.out / "folds" / f"{k}-of-2" / "metrics.csv").read_text() for k in (1, 2)} == before
    assert pq.read_table(folded.out / OUT_OF_FOLD).equals(scores)
    with open(folded.out / "folds" / "1-of-2" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == int(folded.cfg.train.epochs)   # one row per epoch


def test_the_manager_trains_on_the_out_of_fold_scores_and_evaluates_on_the_final_models(folded):
    cfg = agent_config(folded.out)
    spec, agent = EnvSpec.from_config(cfg.env), ppo.PPOConfig.from_config(cfg.agent)
    assert agent.risk_scores == "out_of_fold"                       # the default
    episodes = envdata.load("train", cfg.dataset, spec)
    oof = envdata.out_of_fold_risk(episodes, str(folded.out))
    twin = np.asarray(training_env(cfg, agent, spec, progress=False).params.floats)
    np.testing.assert_array_equal(twin[:, 0], oof.risk)
    np.testing.assert_array_equal(twin[:, 1:1 + oof.tags.shape[1]], oof.tags)
    assert episodes.risk is not oof.risk and not np.array_equal(episodes.risk, oof.risk)   # cache untouched
    in_sample = agent_config(folded.out, "agent.risk_scores=in_sample")
    plain = training_env(in_sample, ppo.PPOConfig.from_config(in_sample.agent), spec, progress=False)
    np.testing.assert_array_equal(np.asarray(plain.params.floats)[:, 0], episodes.risk)
    # the val split (evaluation) is scored by the final model as before
    val = envdata.load("val", cfg.dataset, spec)
    assert "out of fold" not in val.risk_source


def test_missing_foreign_or_corrupt_scores_are_refused_with_the_fix(folded, trained, tmp_path):
    cfg = agent_config(trained.risk)                                  # a run without fold models
    spec, agent = EnvSpec.from_config(cfg.env), ppo.PPOConfig.from_config(cfg.agent)
    with pytest.raises(ppo.AgentError, match="no out-of-fold scores.*add them to the run.*out_of_fold=2.*agent.risk_scores=in_sample"):
        training_env(cfg, agent, spec, progress=False)
    # the folded run's scores against another dataset's train split (the whole small dataset)
    other = compose("train_agent", "experiment=smoke", "env.risk.source=model", f"env.risk.checkpoint={folded.out}")
    with pytest.raises(ppo.AgentError, match="trained on another dataset"):
        training_env(other, ppo.PPOConfig.from_config(other.agent), EnvSpec.from_config(other.env), progress=False)
    copy = shutil.copytree(folded.out, tmp_path / "risk")
    episodes = envdata.load("train", cfg.dataset, EnvSpec.from_config(agent_config(copy).env))
    table = pq.read_table(copy / OUT_OF_FOLD)
    # one event's label flipped: the scores no longer belong to these events
    labels = table["malicious"].to_pylist()
    labels[0][0] = not labels[0][0]
    flipped = table.set_column(table.column_names.index("malicious"), "malicious", pa.array(labels))
    pq.write_table(flipped.replace_schema_metadata(table.schema.metadata), copy / OUT_OF_FOLD)
    with pytest.raises(envdata.EnvError, match=f"lack 1 of the {len(episodes)} tests.*key, event count and labels"):
        envdata.out_of_fold_risk(episodes, str(copy))
    meta = json.loads(table.schema.metadata[b"sandhop.out_of_fold"])
    pq.write_table(table.replace_schema_metadata({"sandhop.out_of_fold": json.dumps({**meta, "format": 2})}),
                   copy / OUT_OF_FOLD)
    with pytest.raises(envdata.EnvError, match="has format 2.*reads format 1.*retrain the risk model"):
        envdata.out_of_fold_risk(episodes, str(copy))
    (copy / OUT_OF_FOLD).write_bytes(b"not parquet")
    with pytest.raises(envdata.EnvError, match="not readable as out-of-fold scores.*retrain"):
        envdata.out_of_fold_risk(episodes, str(copy))
    np.testing.assert_array_equal(envdata.out_of_fold_risk(episodes, str(folded.out)).malicious, episodes.malicious)


def test_one_fold_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TrainError, match="out_of_fold=1: use 2 or more folds"):
        run(compose("train_risk", *(o for o in FOLDED if not o.startswith("out_of_fold=")), "out_of_fold=1",
                    f"out={tmp_path / 'one'}"))
    assert not (tmp_path / "one").exists()


def test_folds_are_added_to_a_finished_run_without_training_it_again(folded, trained, tmp_path):
    """What the missing-scores error tells a user to do."""
    copy = shutil.copytree(trained.risk, tmp_path / "risk")        # trained with out_of_fold=0
    before = (copy / "metrics.csv").read_text()
    run(compose("train_risk", *FOLDED, f"out={copy}"))
    assert (copy / "metrics.csv").read_text() == before
    assert pq.read_table(copy / OUT_OF_FOLD).num_rows == len(load_data(folded.cfg)[0]["train"])
