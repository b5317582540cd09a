"""The shipped dataset of real test-suite traces: present, valid, and as large as promised."""

from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from sandhop.datasets import traces
from sandhop.datasets.record import read_manifest
from sandhop.datasets.suites import LOCAL_SUITES, SUITES

DATA = Path(str(resources.files("sandhop.datasets") / "data"))
TRACES = DATA / "traces"
ALLOWED = {"attrs", "click", "packaging", "jinja2", "markupsafe", "werkzeug", "flask", "httpx",
           "urllib3", "requests", "virtualenv", "gitpython"}


@pytest.fixture(scope="module")
def manifest() -> list[dict]:
    rows = read_manifest(TRACES)
    assert rows, f"{TRACES} has no manifest: record the dataset (datasets/README.md)"
    return rows


@pytest.fixture(scope="module")
def table():
    return traces.read_traces(TRACES)


def test_at_least_eight_allowed_suites_with_3000_tests(manifest):
    names = {row["name"] for row in manifest} - set(LOCAL_SUITES)  # plus sandhop's own (the web shop)
    assert len(names) >= 8 and names <= ALLOWED
    assert sum(sum(row["tests"].values()) for row in manifest) >= 3000


def test_every_manifest_row_points_at_a_valid_trace(manifest, table):
    suites = set(table.column("suite").to_pylist())
    for row in manifest:
        assert (TRACES / row["trace"]).exists(), row["trace"]
        assert row["suite"] in suites
        assert row["command"].startswith("python -m pytest") and row["wall_s"] > 0
        assert all(d["reason"] for d in row["deselected"])


def test_required_categories_are_covered(table):
    counts = Counter(table.column("category").to_pylist())
    for category in ("fs.read", "fs.write", "fs.delete", "net.connect", "net.bind", "proc.spawn",
                     "code.import", "code.native"):
        assert counts[category] > 0, category
    loopback = [c for c, cls in zip(table.column("category").to_pylist(), table.column("target_class").to_pylist())
                if c == "net.connect" and cls == "loopback"]
    assert loopback, "no loopback server connections in the dataset"


def test_targets_are_portable(table):
    # No machine-specific prefix of the recording machine may leak into a stored path.
    leaks = [t for t in table.column("target").to_pylist() if t.startswith(("/tmp/", "/root/"))]
    assert not leaks[:5]


def test_dataset_size_limit():
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024


def test_manifest_matches_the_recipes(manifest):
    # A recipe changed after its suite was recorded means the shipped trace is stale: re-record it.
    for row in manifest:
        if row["name"] in LOCAL_SUITES:
            assert row["version"] == LOCAL_SUITES[row["name"]][0] and (DATA.parent / LOCAL_SUITES[row["name"]][1]).is_dir()
            continue
        recipe = SUITES[row["name"]]
        assert row["version"] == recipe.version
        assert row["deselected"] == [{"target": d.target, "reason": d.reason} for d in recipe.deselect]
