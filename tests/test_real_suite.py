"""A bundled real test suite under the recorder: same results, and the demo end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sandhop.datasets import traces
from sandhop.datasets.record import suite_env, unpack_sdist
from sandhop.demo import bundled_sdists, junit_outcomes


@pytest.fixture(scope="module")
def click_src(tmp_path_factory) -> Path:
    return unpack_sdist(bundled_sdists()["click"], tmp_path_factory.mktemp("click"))


def run_click(src: Path, junit: Path, *extra: str) -> subprocess.CompletedProcess:
    env = suite_env({"PYTHONPATH": str(src / "src")})
    return subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", *extra], cwd=src, env=env, capture_output=True, text=True)


def test_recording_does_not_change_results(click_src, tmp_path):
    plain = run_click(click_src, tmp_path / "plain.xml")
    recorded = run_click(click_src, tmp_path / "rec.xml", f"--sandhop-record={tmp_path / 'trace'}",
                         "--sandhop-suite=click==8.5.1")
    assert plain.returncode == recorded.returncode == 0, recorded.stdout[-2000:]
    before, after = junit_outcomes(tmp_path / "plain.xml"), junit_outcomes(tmp_path / "rec.xml")
    assert len(before) > 2000
    assert before == after
    table = traces.read_traces(tmp_path / "trace")
    categories = set(table.column("category").to_pylist())
    assert {"fs.read", "fs.write", "fs.delete", "proc.spawn", "code.import"} <= categories
    tested = dict(zip(table.column("test_id").to_pylist(), table.column("test_outcome").to_pylist()))
    assert sum(o == "passed" for o in tested.values()) > 100
    assert not any(o in ("failed", "error") for o in tested.values())


def test_the_demo_runs_the_chain_writes_its_report_and_reuses_finished_steps(trained, tmp_path):
    """The demo on markupsafe with its training steps reused from this session's tiny runs (the
    training apps and the dataset build have their own tests): it records the suite, evaluates
    the manager against the baselines, exports the artifact, runs the suite plain and under it,
    prints the summary and writes report.md with its plots; a second run reuses every step."""
    from sandhop.enforcement.runtime import Artifact
    from sandhop.report import PNG_MAGIC
    out = tmp_path / "demo"
    out.mkdir()
    (out / "risk").symlink_to(trained.risk)
    (out / "agent").symlink_to(trained.agent)
    (out / "dataset.txt").write_text("built by an earlier run\n")
    command = [sys.executable, "-m", "sandhop", "demo", "--suite", "markupsafe", "--out", str(out), "--no-probes"]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for step in ("[1/8] record: the real test suite of markupsafe==3.0.4", "[3/8] risk: reusing",
                 "[4/8] agent: reusing", "[5/8] evaluate: the manager", "[6/8] export: the artifact",
                 "[7/8] live: markupsafe==3.0.4 plain and under the artifact", "[8/8] report"):
        assert step in first.stdout, step
    assert list((out / "traces").glob("suite=*/run-*.parquet"))
    Artifact.load(out / "artifact")
    live = json.loads((out / "live" / "live.json").read_text())
    suite = live["suite"]
    assert suite["name"] == "markupsafe==3.0.4" and suite["outcomes_plain"]["passed"] > 30
    assert suite["broken"] == sorted(suite["broken"]) and suite["overhead"] > 0
    assert live["probes"] == {"skipped": "--no-probes"}
    report = (out / "report.md").read_text()
    assert "oracle" in report and "markupsafe==3.0.4" in report and "not run (--no-probes)" in report
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"roc.png", "learning_curves.png"} <= set(images) and any(i.startswith("pareto") for i in images)
    assert all((out / i).read_bytes().startswith(PNG_MAGIC) for i in images)
    assert "attacks through" in first.stdout and "report: " in first.stdout
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(f"[{n}/8] {name}: reusing" in second.stdout
               for n, name in enumerate(("record", "dataset", "risk", "agent", "evaluate", "export", "live"), 1))
    assert len(list((out / "traces").glob("suite=*/run-*.parquet"))) == 1
    # a step made again makes the steps after it again (the report never mixes two runs)
    (out / "artifact" / "manifest.json").unlink()
    third = subprocess.run(command, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "[5/8] evaluate: reusing" in third.stdout and "[6/8] export: the artifact" in third.stdout
    assert "[7/8] live: markupsafe==3.0.4 plain and under the artifact" in third.stdout


def test_probes_are_judged_by_the_audit_log_and_the_attackers_listeners(tmp_path):
    from sandhop.datasets import scenarios as sc
    from sandhop.datasets.probe import PROBES
    from sandhop.demo import judge_probes
    attacks = [s for s in PROBES if sc.get(s).family != "benign"]
    negatives = [s for s in PROBES if sc.get(s).family == "benign"]
    log = tmp_path / "audit.jsonl"
    records = [{"kind": "decision", "test_id": PROBES[attacks[0]].test, "decision": "deny"},
               {"kind": "decision", "test_id": PROBES["import-time-payload"].events, "decision": "redirect"},
               {"kind": "event", "test_id": PROBES[attacks[1]].test, "decision": "allow"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = {"outcomes": {PROBES[s].test: "passed" for s in negatives} | {PROBES[negatives[0]].test: "failed"},
              "listeners": [{"kind": "tcp", "address": "91.92.243.18:9001"}]}
    judged = judge_probes(report, log)
    assert judged["stopped"] == [attacks[0], "import-time-payload"] and attacks[1] in judged["through"]
    assert judged["attacks"] == len(attacks) == len(judged["stopped"]) + len(judged["through"])
    assert judged["payloads"] == 1 and judged["hard_negatives_broken"] == [negatives[0]]


def test_demo_names_an_unknown_suite(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sandhop", "demo", "--suite", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no bundled suite 'nope'" in proc.stderr and "click" in proc.stderr
