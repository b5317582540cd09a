"""The `sandhop` command: help lists the subcommands; bad input is a clear error, not a traceback."""

from __future__ import annotations

import subprocess
import sys


def sandhop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandhop", *args], capture_output=True, text=True)


def test_help_lists_subcommands():
    out = sandhop("--help")
    assert out.returncode == 0
    for command in ("demo", "record", "trace"):
        assert command in out.stdout


def test_summary_of_a_corrupt_trace_names_the_file(tmp_path):
    bad = tmp_path / "suite=x%3D%3D1" / "run-1.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"not parquet at all")
    out = sandhop("trace", "summary", str(tmp_path))
    assert out.returncode == 1
    assert str(bad) in out.stderr and "Traceback" not in out.stderr


def test_summary_of_a_missing_folder(tmp_path):
    out = sandhop("trace", "summary", str(tmp_path / "nowhere"))
    assert out.returncode == 1 and "nowhere" in out.stderr and "Traceback" not in out.stderr


def test_convert_of_a_folder_that_is_not_a_spool(tmp_path):
    out = sandhop("trace", "convert", str(tmp_path), str(tmp_path / "out"))
    assert out.returncode == 1 and "run.json" in out.stderr and "Traceback" not in out.stderr
