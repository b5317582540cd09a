"""`sandhop record NAME==VERSION`: a real sdist from the package index, a throwaway venv, a trace."""

from __future__ import annotations

import json
import subprocess
import sys

from sandhop.datasets import traces


def test_record_downloads_installs_runs_and_appends_a_manifest_row(tmp_path):
    out = tmp_path / "dataset"
    proc = subprocess.run([sys.executable, "-m", "sandhop", "record", "markupsafe==3.0.4", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in proc.stdout
    (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["suite"] == "markupsafe==3.0.4" and row["tests"]["passed"] > 50
    assert row["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert row["events"] > 0 and sum(row["events_by_category"].values()) == row["events"]
    assert row["command"].startswith("python -m pytest") and "--sandhop-record=$OUT" in row["command"]
    table = traces.read_traces(out / row["trace"])
    assert set(table.column("suite").to_pylist()) == {"markupsafe==3.0.4"}
    # The venv's own paths are spelled portably, not as the throwaway folder they lived in.
    assert not [t for t in table.column("target").to_pylist() if "sandhop-record-" in t][:3]


def test_record_refuses_a_spec_without_version(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sandhop", "record", "click", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "NAME==VERSION" in proc.stderr
