"""The audit trail: a log verifies after a clean run and after a SIGKILL (up to its last flushed
batch), and every edit, deletion, reordering or truncation is reported at its record number,
by `verify` and by `sandhop audit verify`'s exit code. Real files in tmp_path throughout."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from sandhop.cli import main
from sandhop.enforcement.audit import (
    GENESIS,
    KEY_ENV,
    AuditError,
    AuditLog,
    export,
    head_path,
    segments,
    verify,
)

KEY = b"correct horse battery staple"


@pytest.fixture(autouse=True)
def no_ambient_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def decision(i: int, **fields) -> dict:
    return {"kind": "decision", "run_id": "r1", "test_id": f"tests/test_x.py::test_{i}", "phase": "call",
            "pid": 100, "category": "fs.write", "op": "open", "target": f"${{tmp}}/f{i}",
            "target_class": "tmp", "detail": "w", "decision": "deny" if i % 3 == 0 else "allow",
            "rule": f"medium:{i}", "tier": "medium", "mode": "enforce", "reason": "test", "t_ns": i,
            **fields}


def write_log(path: Path, records: int = 20, **options) -> Path:
    with AuditLog(path, **options) as log:
        for i in range(1, records + 1):
            assert log.append(decision(i)) == i
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def problems(report) -> set[tuple[int, str]]:
    return {(p.record, p.kind) for p in report.problems}


def verify_exit(*args: str) -> int:
    return main(["audit", "verify", *args])


# --------------------------------------------------------------------------- intact logs

def test_a_closed_log_verifies_sealed_with_canonical_chained_lines(tmp_path, capsys):
    log = write_log(tmp_path / "audit.jsonl", batch=8)
    report = verify(log)
    assert report.ok and report.sealed
    assert (report.records, report.intact_through, report.head_records) == (21, 21, 21)

    records = [json.loads(line) for line in lines(log)]
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:]))
    assert records[6]["target"] == "${tmp}/f7" and records[6]["rule"] == "medium:7"
    assert records[-1] == {**records[-1], "kind": "seal", "records": 20}
    first = lines(log)[0]
    assert first == json.dumps(records[0], sort_keys=True, separators=(",", ":")) + "\n"
    assert json.loads(head_path(log).read_text()) == {"records": 21, "hash": records[-1]["hash"]}

    assert verify_exit(str(log)) == 0
    assert "ok, 21 records in 1 segment, sealed" in capsys.readouterr().out


def test_hmac_keyed_log_verifies_only_with_its_key(tmp_path, monkeypatch, capsys):
    log = write_log(tmp_path / "audit.jsonl", key=KEY)
    assert verify(log, key=KEY).ok
    assert "mac" in json.loads(head_path(log).read_text())

    for wrong in (b"another key", None):
        report = verify(log, key=wrong)
        assert problems(report) == {(1, "wrong-key")}, report.format()

    monkeypatch.setenv("AUDIT_KEY_FOR_TEST", KEY.decode())
    assert verify_exit(str(log), "--key-env", "AUDIT_KEY_FOR_TEST") == 0
    assert verify_exit(str(log)) == 1
    assert "written with a key" in capsys.readouterr().out
    monkeypatch.setenv("AUDIT_KEY_FOR_TEST", "another key")
    assert verify_exit(str(log), "--key-env", "AUDIT_KEY_FOR_TEST") == 1


def test_the_key_defaults_to_the_environment_for_writer_and_verifier(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    log = write_log(tmp_path / "audit.jsonl")
    assert verify(log).ok and verify(log, key=KEY).ok
    monkeypatch.delenv(KEY_ENV)
    assert problems(verify(log)) == {(1, "wrong-key")}


def test_a_second_writer_session_continues_the_chain(tmp_path):
    log = write_log(tmp_path / "audit.jsonl", records=5)
    with AuditLog(log) as again:
        assert again.append(decision(6)) == 7  # record 6 is the first session's seal
    report = verify(log)
    assert report.ok and report.sealed and report.records == 8
    assert [json.loads(line)["n"] for line in lines(log)] == list(range(1, 9))


def test_segments_rotate_and_the_chain_runs_across_them(tmp_path):
    log = write_log(tmp_path / "audit.jsonl", records=60, batch=4, segment_bytes=2000)
    files = segments(log)
    assert files[0] == log and [p.name for p in files[1:3]] == ["audit.jsonl.1", "audit.jsonl.2"]
    assert len(files) >= 4
    assert all(lines(p)[0].startswith("{") and p.read_text().endswith("\n") for p in files)
    assert all(p.stat().st_size <= 2000 for p in files[:-1])  # a batch here is well under 2000 bytes
    assert verify(log).ok and verify(log).records == 61
    assert verify(files).ok  # the segments named one by one

    with AuditLog(log, batch=4, segment_bytes=2000) as again:
        assert again.append(decision(61)) == 62
    assert verify(log).ok and segments(log)[:len(files)] == files


def test_records_from_many_threads_form_one_chain(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", batch=16)
    numbers: list[int] = []

    def writer(t: int) -> None:
        for i in range(200):
            numbers.append(log.append({"kind": "decision", "thread": t, "i": i}))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    assert sorted(numbers) == list(range(1, 801))
    report = verify(tmp_path / "audit.jsonl")
    assert report.ok and report.records == 801


# --------------------------------------------------------------------------- tampering

def _edit_7(log: Path) -> None:
    rows = lines(log)
    record = json.loads(rows[6])
    record["decision"] = "allow" if record["decision"] == "deny" else "deny"
    rows[6] = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    log.write_text("".join(rows))


def _delete_7(log: Path) -> None:
    rows = lines(log)
    del rows[6]
    log.write_text("".join(rows))


def _swap_7_and_8(log: Path) -> None:
    rows = lines(log)
    rows[6], rows[7] = rows[7], rows[6]
    log.write_text("".join(rows))


def _cut_mid_line(log: Path) -> None:
    data = log.read_bytes()
    log.write_bytes(data[:len(data) - len(lines(log)[-1]) // 2])


def _cut_3_records(log: Path) -> None:
    log.write_text("".join(lines(log)[:-3]))


def _cut_3_records_and_head(log: Path) -> None:
    _cut_3_records(log)
    head_path(log).unlink()


@pytest.mark.parametrize("tamper, record, kind", [
    (_edit_7, 7, "edited"),
    (_delete_7, 7, "deleted"),
    (_swap_7_and_8, 7, "reordered"),
    (_cut_mid_line, 21, "truncated-line"),
    (_cut_3_records, 19, "truncated-tail"),
    (_cut_3_records_and_head, 19, "truncated-tail"),
], ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_tampering_is_reported_at_its_record(tmp_path, capsys, tamper, record, kind, key):
    log = write_log(tmp_path / "audit.jsonl", key=key)
    tamper(log)
    report = verify(log, key=key)
    assert (record, kind) in problems(report), report.format()
    assert report.intact_through == record - 1
    if key is None:
        assert verify_exit(str(log)) == 1
        assert f"record {record}: {kind}" in capsys.readouterr().out


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(tmp_path):
    # Without a key anyone can rehash one record; the next record still names the old hash.
    log = write_log(tmp_path / "audit.jsonl")
    rows = lines(log)
    record = json.loads(rows[6])
    del record["hash"]
    record["decision"] = "allow" if record["decision"] == "deny" else "deny"
    import hashlib
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    record["hash"] = hashlib.sha256((record["prev"] + canonical).encode()).hexdigest()
    rows[6] = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    log.write_text("".join(rows))
    assert problems(verify(log)) == {(8, "edited")}


def test_a_deleted_segment_is_reported_at_its_first_record(tmp_path, capsys):
    log = write_log(tmp_path / "audit.jsonl", records=60, batch=4, segment_bytes=2000)
    gone = segments(log)[2]
    first = json.loads(lines(gone)[0])["n"]
    last = json.loads(lines(gone)[-1])["n"]
    gone.unlink()
    report = verify(log)
    assert {(first, "missing-segment"), (first, "deleted")} <= problems(report), report.format()
    assert report.intact_through == first - 1
    assert verify_exit(str(log)) == 1
    assert f"records {first}..{last} missing" in capsys.readouterr().out


def test_the_cli_run_as_a_program_exits_nonzero_on_an_edit(tmp_path):
    log = write_log(tmp_path / "audit.jsonl")
    _edit_7(log)
    out = subprocess.run([sys.executable, "-m", "sandhop", "audit", "verify", str(log)],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert "record 7: edited" in out.stdout and "Traceback" not in out.stderr


def test_verifying_a_missing_log_is_an_error(tmp_path, capsys):
    assert verify_exit(str(tmp_path / "nowhere.jsonl")) == 1
    assert "nowhere.jsonl: no such audit log" in capsys.readouterr().err


# --------------------------------------------------------------------------- crashes and forks

KILLED_WRITER = textwrap.dedent("""
    import sys
    from sandhop.enforcement.audit import AuditLog
    log = AuditLog(sys.argv[1], batch=10)
    for i in range(1, 36):
        log.append({"kind": "decision", "i": i})
        if i == 30:
            log.flush()
    print("ready", flush=True)
    sys.stdin.read()  # blocks until the test kills it
""")


def test_a_sigkilled_writer_leaves_a_log_intact_through_its_last_flushed_batch(tmp_path, capsys):
    log = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(log)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL

    report = verify(log)
    assert report.ok and not report.sealed
    assert (report.records, report.intact_through) == (30, 30)
    assert verify_exit(str(log)) == 0
    assert "intact through record 30, not sealed (the writer did not exit cleanly)" in capsys.readouterr().out
    assert verify_exit(str(log), "--require-seal") == 1

    with AuditLog(log) as next_run:  # the dead writer's lock went with it
        assert next_run.append({"kind": "session"}) == 31
    assert verify(log).ok and verify(log).sealed


FORKING_WRITER = textwrap.dedent("""
    import os, sys
    from sandhop.enforcement.audit import AuditError, AuditLog
    log = AuditLog(sys.argv[1])
    for i in range(3):
        log.append({"kind": "decision", "i": i})
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            log.append({"kind": "decision", "i": "child"})
            code = 1
        except AuditError:
            pass
        try:
            AuditLog(sys.argv[1])  # the parent still writes this chain
            code = 1
        except AuditError:
            pass
        sys.exit(code)  # runs atexit: must neither write the parent's buffer nor seal
    _, status = os.waitpid(pid, 0)
    log.append({"kind": "decision", "i": 3})
    log.close()
    print(os.waitstatus_to_exitcode(status))
""")


def test_a_forked_child_neither_writes_nor_seals_its_parents_log(tmp_path):
    log = tmp_path / "audit.jsonl"
    out = subprocess.run([sys.executable, "-c", FORKING_WRITER, str(log)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr
    report = verify(log)
    assert report.ok and report.sealed and report.records == 5
    assert [json.loads(line).get("i") for line in lines(log)] == [0, 1, 2, 3, None]


def test_the_writer_refuses_to_fork_or_extend_a_damaged_chain(tmp_path):
    log = tmp_path / "audit.jsonl"
    with AuditLog(log) as first:
        first.append(decision(1))
        with pytest.raises(AuditError, match="another AuditLog"):
            AuditLog(log)

    write_log(tmp_path / "cut.jsonl")
    _cut_3_records(tmp_path / "cut.jsonl")
    with pytest.raises(AuditError, match="head file says 21"):
        AuditLog(tmp_path / "cut.jsonl")

    write_log(tmp_path / "keyed.jsonl", key=KEY)
    with pytest.raises(AuditError, match="written with a key"):
        AuditLog(tmp_path / "keyed.jsonl")
    with pytest.raises(AuditError, match="MAC does not match"):
        AuditLog(tmp_path / "keyed.jsonl", key=b"another key")


def test_records_must_be_plain_json_without_chain_fields(tmp_path):
    with AuditLog(tmp_path / "audit.jsonl") as log:
        with pytest.raises(ValueError, match="belong to the chain"):
            log.append({"kind": "decision", "hash": "x"})
        with pytest.raises(TypeError, match="not plain JSON"):
            log.append({"kind": "decision", "target": Path("/etc")})
        assert log.append({"kind": "decision"}) == 1
    with pytest.raises(AuditError, match="closed"):
        log.append({"kind": "decision"})


# --------------------------------------------------------------------------- export

def test_export_writes_decisions_as_a_trace_with_rule_decision_and_tier(tmp_path):
    from sandhop.datasets.traces import read_traces

    log = tmp_path / "audit.jsonl"
    logged = [
        decision(1, test_id="t.py::a", category="fs.write", target="${home}/.ssh/id_rsa",
                 target_class="home.secret", decision="deny", rule="medium:12", tier="medium"),
        decision(2, test_id="t.py::b", category="net.connect", op="connect", target="93.184.216.34:443",
                 target_class="public_net", detail="", decision="allow", rule="", tier="low"),
        decision(3, test_id="t.py::b", category="env.read", op="getenv", target="AWS_SECRET_ACCESS_KEY",
                 detail="", decision="deny", rule="policy.yaml:4", tier="strict"),
    ]
    del logged[2]["target_class"]  # export classes a target the guard did not
    with AuditLog(log) as audit:
        audit.append({"kind": "session", "run_id": "run-7", "suite": "demo==1.0"})
        for record in logged:
            audit.append({**record, "run_id": "run-7"})
        audit.append({"kind": "test", "test_id": "t.py::a", "outcome": "failed"})
        audit.append({"kind": "test", "test_id": "t.py::b", "outcome": "passed"})

    assert main(["audit", "export", str(log), "--out", str(tmp_path / "traces")]) == 0
    table = read_traces(tmp_path / "traces")
    rows = table.to_pylist()
    for name in ("decision", "rule", "tier", "target", "category", "test_id"):
        assert [r[name] for r in rows] == [r[name] for r in logged]
    assert {(r["suite"], r["run_id"]) for r in rows} == {("demo==1.0", "run-7")}
    assert [r["test_outcome"] for r in rows] == ["failed", "passed", "passed"]
    assert [r["target_class"] for r in rows] == ["home.secret", "public_net", "env.secret"]
    assert "sensitive_data_access" in rows[0]["tags"] and rows[0]["seq"] == 0


def test_export_refuses_a_broken_chain_unless_forced(tmp_path, capsys):
    from sandhop.datasets.traces import read_traces

    log = write_log(tmp_path / "audit.jsonl")
    _edit_7(log)
    with pytest.raises(AuditError, match="record 7: edited"):
        export([log], tmp_path / "traces")
    assert main(["audit", "export", str(log), "--out", str(tmp_path / "traces")]) == 1
    assert "--force" in capsys.readouterr().err

    export([log], tmp_path / "traces", force=True)
    table = read_traces(tmp_path / "traces")
    assert table.num_rows == 20 and set(table.column("suite").to_pylist()) == {"audit==local"}


def test_an_exported_run_reads_together_with_a_recorded_one(tmp_path):
    from sandhop.datasets.traces import events_to_table, read_traces, write_trace
    from sandhop.enforcement.events import Event

    recorded = Event(category="fs.read", op="open", target="${cwd}/setup.py", target_class="cwd",
                     run_id="rec-1", suite="audit==local")
    write_trace(events_to_table([recorded]), tmp_path / "traces", suite="audit==local", run_id="rec-1")
    export([write_log(tmp_path / "audit.jsonl", records=2)], tmp_path / "traces")
    table = read_traces(tmp_path / "traces")
    by_run = {(r["run_id"], r["rule"]) for r in table.to_pylist()}
    assert ("rec-1", "") in by_run and {r for _, r in by_run} == {"", "medium:1", "medium:2"}
