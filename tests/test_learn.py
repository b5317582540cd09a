"""The learning loop (`sandhop learn`): audit logs of an enforced run become labelled traces, both
models are retrained warm-started from the artifact, and the next artifact comes with a report.
A real inner pytest run under a deliberately too strict artifact makes the false block."""

from __future__ import annotations

import json
import textwrap

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("hydra")

from sandhop.agents.learn import LearnError, label_run, learn  # noqa: E402
from sandhop.enforcement.runtime import MANIFEST, Artifact  # noqa: E402

from conftest import KEY_SUITE  # noqa: E402


@pytest.fixture
def enforced_log(artifact_tools, pytester, home, tmp_path):
    """An audit log of a suite run under an artifact that hops to `high` at once: the key read
    is denied and its test fails (a false block: the suite is benign)."""
    strict = artifact_tools.with_policy(tmp_path, "hop:high")
    log = tmp_path / "audit.jsonl"
    pytester.makepyfile(test_inner=textwrap.dedent(KEY_SUITE))
    pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--sandhop-enforce={strict}",
                                  f"--sandhop-audit-log={log}", "--sandhop-suite=learnsuite==1"
                                  ).assert_outcomes(passed=1, failed=1)
    return strict, log


def test_learn_retrains_from_the_logs_and_exports_the_next_artifact(trained_caches, enforced_log, tmp_path):
    strict, log = enforced_log
    out, work = tmp_path / "next", tmp_path / "work"
    report = learn([log], strict, out, work=work, progress=False)
    (run,) = report["runs"]
    assert run["suite"] == "learnsuite==1" and run["tests"] >= 2
    assert [t.rsplit("::", 1)[-1] for t in run["failed"]] == ["test_reads_key"] and run["false_blocks"] >= 1
    assert "learnsuite==1" in report["train_suites"]
    # both models started from the artifact
    source = json.loads((strict / MANIFEST).read_text())
    for part in ("risk", "agent"):
        init = json.loads((work / part / "init.json").read_text())
        assert str(strict) in json.dumps(init), part
    new = Artifact.load(out)
    assert new.manifest["agent"]["run"] == str(work / "agent") and new.manifest["risk"]["run"] == str(work / "risk")
    assert new.manifest["feature_fingerprint"] == source["feature_fingerprint"]
    # old and new compared on held-out traces and on the new logs, by replay through the runtime
    for name in ("held_out_test", "new_logs"):
        for which in ("old", "new"):
            m = report["comparison"][name][which]
            assert m["tests"] > 0 and 0 <= m["tests_broken"] <= m["benign"]
    # the strict artifact breaks the key-reading test when its log is replayed
    assert report["comparison"]["new_logs"]["old"]["tests_broken"] >= 1
    text = (out / "learn_report.md").read_text()
    assert "candidate false blocks" in text and "held_out_test" in text and "new_logs" in text
    # the logs really became a trace: every scored event, with its risk
    from sandhop.datasets.traces import read_traces
    table = read_traces(work / "new-traces")
    assert table.num_rows > 0 and not any(table.column("malicious").to_pylist())


def test_learn_refuses_what_it_cannot_use(trained, tmp_path):
    with pytest.raises(LearnError, match="do not exist"):
        learn([tmp_path / "nope.jsonl"], trained.artifact, tmp_path / "out", progress=False)
    with pytest.raises(LearnError, match="--from"):
        learn([tmp_path / "nope.jsonl"], tmp_path, tmp_path / "out", progress=False)
    from sandhop.cli import main
    assert main(["learn", "--logs", str(tmp_path / "nope.jsonl"), "--from", str(trained.artifact),
                 "--out", str(tmp_path / "out")]) == 1


def test_probe_events_keep_their_labels():
    """A probe's test in a log: the events matching its scenario's steps are malicious (up to
    where the sandbox stopped it), the damaging one marked; a benign test's denied step in a
    failed test is a candidate false block."""
    def row(test_id, category, op, cls, decision="allow", outcome="failed", pid=1):
        return {"test_id": test_id, "category": category, "op": op, "target": "x", "target_class": cls,
                "decision": decision, "test_outcome": outcome, "pid": pid, "tags": []}
    probe = "test_persistence.py::test_authorized_keys_backdoor"
    rows = [row(probe, "fs.meta", "os.stat", "home"), row(probe, "fs.write", "open", "home.secret", "deny"),
            row("tests/test_a.py::test_ok", "fs.read", "open", "home.secret", "deny")]
    from sandhop.datasets import scenarios as sc
    steps = sc.get("authorized-keys-backdoor").steps
    rows[0].update(category=steps[0].category, op=steps[0].op)
    labelled, summary = label_run(rows, "probes==local", "r1")
    assert summary.attacks == {probe: "authorized-keys-backdoor"} and summary.false_blocks == 1
    assert summary.failed == [probe, "tests/test_a.py::test_ok"]
    malicious = [r for r in labelled if r["malicious"]]
    assert malicious and all(r["attack"] == "authorized-keys-backdoor" for r in malicious)
    assert not labelled[2]["malicious"]
