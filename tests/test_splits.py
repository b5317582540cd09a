"""Labelled splits built from real Hydra composition of `configs/dataset/`: split by suite,
novel families held out of train, deterministic, cached, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest

from sandhop.cli import main
from sandhop.datasets import scenarios as lib
from sandhop.datasets import splits
from sandhop.datasets.splits import SplitConfig, SplitError


def _small(**overrides) -> SplitConfig:
    cfg = splits.compose(["dataset=small", *(f"dataset.{k}={v}" for k, v in overrides.items())])
    return SplitConfig.from_config(cfg.dataset)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return splits.build(_small(), tmp_path_factory.mktemp("ds") / "small")


def _suites(table) -> set[str]:
    return set(table["suite"].to_pylist())


def _attack_families(table) -> set[str]:
    mal = table.filter(table["malicious"])
    return {lib.get(a).family for a in set(mal["attack"].to_pylist())}


def test_splits_never_share_a_suite_and_novel_families_stay_out_of_train(built):
    tables = {s: splits.load(built, s) for s in splits.SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test"), ("train", "novel"), ("val", "novel")):
        assert not _suites(tables[a]) & _suites(tables[b]), (a, b)
    novel = set(splits.read_manifest(built)["config"]["novel"]["families"])
    assert novel and _attack_families(tables["novel"]) <= novel
    for split in ("train", "val", "test"):
        assert _attack_families(tables[split]) and not _attack_families(tables[split]) & novel
    # novel reuses the test suites' benign traces, with other attacks in them
    assert _suites(tables["novel"]) == _suites(tables["test"])
    for table in tables.values():
        assert pc.sum(table["damaging"]).as_py() == len(
            set(zip(*(table.filter(table["malicious"])[c].to_pylist() for c in ("suite", "test_id", "attack")))))


def test_manifest_counts_match_the_data(built):
    manifest = splits.read_manifest(built)
    for split, stats in manifest["splits"].items():
        table = splits.load(built, split)
        assert stats["events"] == table.num_rows
        assert stats["malicious_events"] == pc.sum(table["malicious"]).as_py()
        assert set(stats["suites"]) == _suites(table)
    assert "| train |" in splits.format_stats(manifest)


def test_builds_are_deterministic_and_cached(tmp_path, monkeypatch, built):
    again = splits.build(_small(), tmp_path / "again")
    for split in splits.SPLITS:
        assert splits.load(again, split).equals(splits.load(built, split))
    monkeypatch.setenv("SANDHOP_CACHE", str(tmp_path / "cache"))
    first = splits.build(_small())
    stamp = (first / splits.MANIFEST).stat().st_mtime_ns
    assert splits.build(_small()) == first and (first / splits.MANIFEST).stat().st_mtime_ns == stamp
    other = splits.build(_small(seed=1))
    assert other != first and first.parent == other.parent == tmp_path / "cache" / "datasets"
    train = splits.load(_small(), "train")  # a config loads through the cache
    assert train.equals(splits.load(first, "train"))


def test_default_dataset_builds_from_the_bundled_traces(tmp_path):
    cfg = SplitConfig.from_config(splits.compose(["dataset=default"]).dataset)
    root = splits.build(cfg, tmp_path / "default")
    manifest = splits.read_manifest(root)
    assert set(manifest["splits"]) == set(splits.SPLITS)
    assert manifest["splits"]["train"]["attacked_units"] > 1000
    assert sum(s["units"] for k, s in manifest["splits"].items() if k != "novel") > 13000


def test_bad_configs_are_clear_errors(tmp_path, built):
    with pytest.raises(SplitError, match="in both train and test"):
        splits.build(_small(**{"splits.test": "[attrs,requests]"}), tmp_path / "a")
    with pytest.raises(SplitError, match="no suite 'nope'"):
        splits.build(_small(**{"splits.val": "[nope]"}), tmp_path / "b")
    with pytest.raises(SplitError, match="not a scenario family"):
        splits.build(_small(**{"novel.families": "[nope]"}), tmp_path / "c")
    with pytest.raises(SplitError, match="train would have no attack"):
        splits.build(_small(scenarios="[family:dns-exfil,benign]"), tmp_path / "d")
    with pytest.raises(SplitError, match="quote a value with commas"):
        splits.compose(["dataset.scenarios=dropper,reverse-shell"])
    with pytest.raises(SplitError, match="Could not find 'dataset/nope'"):
        splits.compose(["dataset=nope"])
    with pytest.raises(SplitError, match="dataset.FIELD=VALUE"):
        splits.compose(["dataset.bogus=1"])
    with pytest.raises(SplitError, match="of kind 'adfa_ld'"):
        SplitConfig.from_config(splits.compose(["dataset=adfa_ld"]).dataset)
    with pytest.raises(SplitError, match="unknown split"):
        splits.load(built, "holdout")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(SplitError, match="not a dataset build"):
        splits.build(_small(), tmp_path / "junk")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / splits.MANIFEST).write_text("{not json")
    with pytest.raises(SplitError, match="not valid JSON"):
        splits.load(broken, "train")
    (broken / splits.MANIFEST).write_text(json.dumps({"format": 99}))
    with pytest.raises(SplitError, match="format 99"):
        splits.read_manifest(broken)
    with pytest.raises(SplitError, match="another config"):
        splits.build(_small(seed=4), built)


def test_cli_dataset_build_and_show(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["dataset", "build", "dataset=small", "dataset.max_units_per_suite=40", "--out", str(out)]) == 0
    assert "| novel |" in capsys.readouterr().out
    assert main(["dataset", "show", str(out)]) == 0
    assert "dataset small" in capsys.readouterr().out
    assert main(["dataset", "build", "dataset=nope"]) == 1
    assert "dataset=NAME" in capsys.readouterr().err
