"""A bundled real test suite under the recorder: same results, and the demo end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sandhop.datasets import traces
from sandhop.datasets.record import unpack_sdist
from sandhop.demo import bundled_sdists


def outcomes(junit: Path) -> dict[str, str]:
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    return result


@pytest.fixture(scope="module")
def click_src(tmp_path_factory) -> Path:
    return unpack_sdist(bundled_sdists()["click"], tmp_path_factory.mktemp("click"))


def run_click(src: Path, junit: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src / "src"), "PYTEST_ADDOPTS": ""}
    return subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", *extra], cwd=src, env=env, capture_output=True, text=True)


def test_recording_does_not_change_results(click_src, tmp_path):
    plain = run_click(click_src, tmp_path / "plain.xml")
    recorded = run_click(click_src, tmp_path / "rec.xml", f"--sandhop-record={tmp_path / 'trace'}",
                         "--sandhop-suite=click==8.5.1")
    assert plain.returncode == recorded.returncode == 0, recorded.stdout[-2000:]
    before, after = outcomes(tmp_path / "plain.xml"), outcomes(tmp_path / "rec.xml")
    assert len(before) > 2000
    assert before == after
    table = traces.read_traces(tmp_path / "trace")
    categories = set(table.column("category").to_pylist())
    assert {"fs.read", "fs.write", "fs.delete", "proc.spawn", "code.import"} <= categories
    tested = dict(zip(table.column("test_id").to_pylist(), table.column("test_outcome").to_pylist()))
    assert sum(o == "passed" for o in tested.values()) > 100
    assert not any(o in ("failed", "error") for o in tested.values())


def test_demo_records_the_bundled_suite_and_reuses_it(tmp_path):
    out = tmp_path / "demo"
    first = subprocess.run([sys.executable, "-m", "sandhop", "demo", "--suite", "markupsafe", "--out", str(out)],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "category" in first.stdout and "code.import" in first.stdout
    assert "markupsafe==3.0.4" in first.stdout
    assert list((out / "traces").glob("suite=*/run-*.parquet"))
    assert "| novel |" in first.stdout and (out / "dataset" / "splits.json").exists()
    second = subprocess.run([sys.executable, "-m", "sandhop", "demo", "--suite", "markupsafe", "--out", str(out)],
                            capture_output=True, text=True)
    assert second.returncode == 0 and "reusing the recording" in second.stdout
    assert "reusing the labelled splits" in second.stdout
    assert len(list((out / "traces").glob("suite=*/run-*.parquet"))) == 1


def test_demo_names_an_unknown_suite(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sandhop", "demo", "--suite", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no bundled suite 'nope'" in proc.stderr and "click" in proc.stderr
