"""Traces on disk: schema round trips, partitioned storage, validation errors, spool conversion."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandhop.datasets import traces
from sandhop.datasets.traces import (
    TRACE_SCHEMA,
    TraceError,
    TraceWarning,
    convert_spool,
    events_to_table,
    format_summary,
    read_traces,
    spool_to_table,
    summarise,
    table_to_events,
    write_trace,
)
from sandhop.enforcement.events import (
    ALL_TAGS,
    CATEGORIES,
    EVENT_FIELDS,
    OUTCOMES,
    PHASES,
    SCHEMA_VERSION,
    SPOOL_FIELDS,
    TARGET_CLASSES,
    Event,
    observed_tags,
)

SUITE = "requests==2.31.0"


def event(**overrides) -> Event:
    values = dict(category="fs.read", op="open", target="${site}/requests/api.py",
                  target_class="site", detail="r", run_id="r1", suite=SUITE,
                  test_id="tests/test_api.py::test_get", phase="call", t_ns=10, pid=100, ppid=1,
                  tags=("file_read",), test_outcome="passed")
    values.update(overrides)
    return Event(**values)


def plant(path: Path, table: pa.Table, metadata: dict | None) -> Path:
    """Write a Parquet file by hand, bypassing write_trace, to make bad trace files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return path


def good_metadata(suite: str = SUITE, run_id: str = "r1") -> dict:
    return {"sandhop.schema_version": str(SCHEMA_VERSION), "sandhop.suite": suite,
            "sandhop.run_id": run_id}


# --------------------------------------------------------------------------- round trips

def test_schema_mirrors_event():
    assert TRACE_SCHEMA.names == list(EVENT_FIELDS)
    assert TRACE_SCHEMA.field("risk").nullable
    assert TRACE_SCHEMA.field("tags").type == pa.list_(pa.string())
    assert TRACE_SCHEMA.field("pid").type == pa.int32() and TRACE_SCHEMA.field("seq").type == pa.int64()
    assert TRACE_SCHEMA.metadata[b"sandhop.schema_version"] == str(SCHEMA_VERSION).encode()


def test_events_survive_parquet_round_trip(tmp_path):
    events = [
        event(seq=0),
        event(seq=1, category="net.connect", op="socket.connect", target="[::1]:8080",
              target_class="loopback", detail="", risk=0.25, decision="deny", tier="strict",
              tags=("network_access",), count=3),
        event(seq=2, target="${home}/.ssh/id_ed25519 — ключ", target_class="home.secret",
              tags=("file_read", "sensitive_data_access", "credential_access"), malicious=True,
              attack="steal-ssh-key", test_outcome="failed"),
        event(seq=3, category="code.import", op="import", target="json", target_class="stdlib_module",
              test_id="tests/test_api.py", phase="collect", tags=(), test_outcome=""),
    ]
    path = write_trace(events_to_table(events), tmp_path, suite=SUITE, run_id="r1")
    assert table_to_events(read_traces(tmp_path)) == events
    assert table_to_events(read_traces(path)) == events


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_events = st.builds(
    Event,
    category=st.sampled_from(CATEGORIES), op=_text, target=_text,
    target_class=st.sampled_from(TARGET_CLASSES), detail=_text,
    test_id=_text, phase=st.sampled_from(PHASES),
    seq=st.integers(0, 2**63 - 1), t_ns=st.integers(0, 2**63 - 1),
    pid=st.integers(0, 2**31 - 1), ppid=st.integers(0, 2**31 - 1), count=st.integers(1, 2**31 - 1),
    decision=_text, tier=_text,
    risk=st.none() | st.floats(width=32, allow_nan=False),
    malicious=st.booleans(), attack=_text,
    tags=st.lists(st.sampled_from(ALL_TAGS), max_size=4).map(tuple),
    test_outcome=st.sampled_from(OUTCOMES),
)


@settings(max_examples=40, deadline=None)
@given(events=st.lists(_events, max_size=8), suite=_text.filter(bool), run_id=_text.filter(bool))
def test_generated_events_survive_parquet_round_trip(events, suite, run_id):
    events = [Event(**{**e.as_dict(), "tags": e.tags, "suite": suite, "run_id": run_id}) for e in events]
    with tempfile.TemporaryDirectory() as root:
        path = write_trace(events_to_table(events), root, suite=suite, run_id=run_id)
        assert path.parent.parent == Path(root)  # quoting keeps any suite in one folder level
        assert table_to_events(read_traces(root, suites=[suite])) == events


# --------------------------------------------------------------------------- storage layout

def test_runs_are_partitioned_by_suite_and_filtered_on_read(tmp_path):
    a = write_trace(events_to_table([event(), event(seq=1)]), tmp_path, suite=SUITE, run_id="r1")
    b = write_trace(events_to_table([event(suite="attrs==23.1", run_id="r2")]), tmp_path,
                    suite="attrs==23.1", run_id="r2")
    assert a == tmp_path / "suite=requests%3D%3D2.31.0" / "run-r1.parquet"
    assert b == tmp_path / "suite=attrs%3D%3D23.1" / "run-r2.parquet"
    assert pq.read_table(a).column("suite").to_pylist() == [SUITE, SUITE]  # column kept in file

    assert read_traces(tmp_path).num_rows == 3
    only = read_traces(tmp_path, suites="attrs==23.1")
    assert only.column("suite").to_pylist() == ["attrs==23.1"]
    assert read_traces(tmp_path / "suite=requests%3D%3D2.31.0").num_rows == 2
    with pytest.raises(TraceError, match="no runs of suite"):
        read_traces(tmp_path, suites=["requests==9"])


def test_writing_refuses_to_replace_a_stored_run(tmp_path):
    path = write_trace(events_to_table([event()]), tmp_path, suite=SUITE, run_id="r1")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="run-r1.parquet"):
        write_trace(events_to_table([event(), event()]), tmp_path, suite=SUITE, run_id="r1")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["run-r1.parquet"]  # no temp left


def test_writing_refuses_rows_of_another_run(tmp_path):
    with pytest.raises(TraceError, match=r"run-r2\.parquet \(not written\).*run_id 'r1'"):
        write_trace(events_to_table([event()]), tmp_path, suite=SUITE, run_id="r2")
    assert not (tmp_path / "suite=requests%3D%3D2.31.0" / "run-r2.parquet").exists()


def test_writing_validates_vocabularies(tmp_path):
    table = events_to_table([event()]).set_column(0, "category", pa.array(["fs.chmod"]))
    with pytest.raises(TraceError, match=r"run-r1\.parquet \(not written\).*fs\.chmod"):
        write_trace(table, tmp_path, suite=SUITE, run_id="r1")


@pytest.mark.parametrize("make_root", [lambda p: p / "nowhere", lambda p: p])
def test_reading_a_missing_or_empty_root_is_an_error(tmp_path, make_root):
    root = make_root(tmp_path)
    with pytest.raises(TraceError, match=str(root)):
        read_traces(root)


# --------------------------------------------------------------------------- bad trace files

def _run_file(root: Path) -> Path:
    return root / "suite=requests%3D%3D2.31.0" / "run-r1.parquet"


def _good_table() -> pa.Table:
    return events_to_table([event(), event(seq=1, category="net.dns", op="getaddrinfo",
                                           target="pypi.org", target_class="domain")])


@pytest.mark.parametrize("name, make, message", [
    ("newer version", lambda t: (t, {**good_metadata(), "sandhop.schema_version": "7"}),
     "schema version 7 is newer than this sandhop understands"),
    ("no metadata", lambda t: (t, None), "no sandhop.schema_version"),
    ("no suite metadata", lambda t: (t, {"sandhop.schema_version": str(SCHEMA_VERSION)}),
     "no sandhop.suite or sandhop.run_id"),
    ("missing column", lambda t: (t.drop_columns(["target_class"]), good_metadata()),
     "missing column.*target_class"),
    ("wrong type", lambda t: (t.set_column(t.schema.get_field_index("pid"), "pid",
                                           t["pid"].cast(pa.int64())), good_metadata()),
     "pid is int64, expected int32"),
    ("unknown category", lambda t: (t.set_column(0, "category", pa.array(["fs.read", "fs.chmod"])),
                                    good_metadata()),
     r"row 1: category 'fs.chmod' is not one of"),
    ("unknown tag", lambda t: (t.set_column(t.schema.get_field_index("tags"), "tags",
                                            pa.array([[], ["file_read", "telepathy"]], pa.list_(pa.string()))),
                               good_metadata()),
     "row 1: tag 'telepathy'"),
    ("unknown outcome", lambda t: (t.set_column(t.schema.get_field_index("test_outcome"), "test_outcome",
                                                pa.array(["passed", "xfailed"])), good_metadata()),
     "row 1: test_outcome 'xfailed'"),
    ("wrong suite in partition", lambda t: (t, good_metadata(suite="attrs==1")),
     "lies in the folder of suite"),
])
def test_bad_trace_files_are_errors_naming_the_file(tmp_path, name, make, message):
    path = plant(_run_file(tmp_path), *make(_good_table()))
    with pytest.raises(TraceError, match=message) as caught:
        read_traces(tmp_path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("damage", [lambda good: b"this is not parquet at all" * 10,
                                    lambda good: good[: len(good) // 2]])
def test_corrupt_parquet_is_an_error_naming_the_file(tmp_path, damage):
    path = write_trace(_good_table(), tmp_path, suite=SUITE, run_id="r1")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(TraceError, match="not a readable Parquet file") as caught:
        read_traces(tmp_path)
    assert str(path) in str(caught.value)
    assert caught.value.__cause__ is not None


# --------------------------------------------------------------------------- spool conversion

def spool_line(t_ns, pid, lseq, test_id="tests/test_a.py::test_one", phase="call",
               category="fs.read", op="open", target="${tmp}/data.txt", detail="r",
               target_class="tmp", ppid=1) -> str:
    fields = dict(t_ns=t_ns, pid=pid, ppid=ppid, lseq=lseq, test_id=test_id, phase=phase,
                  category=category, op=op, target=target, detail=detail, target_class=target_class)
    return json.dumps([fields[name] for name in SPOOL_FIELDS]) + "\n"


def make_spool(folder: Path, files: dict[str, str], outcomes: list[dict] = (),
               run_id: str = "run-1", suite: str = SUITE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"run_id": run_id, "suite": suite, "python": "3.11"}))
    (folder / "outcomes.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outcomes))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_spool_events_are_ordered_across_processes(tmp_path):
    spool = make_spool(tmp_path / "spool", {
        "events-100-aa.jsonl": spool_line(10, 100, 0, target="${tmp}/a")
                               + spool_line(30, 100, 1, target="${tmp}/c")
                               + spool_line(30, 100, 2, target="${tmp}/d"),
        "events-200-bb.jsonl": spool_line(20, 200, 0, ppid=100, target="${tmp}/b")
                               + spool_line(30, 200, 1, ppid=100, target="${tmp}/e"),
    })
    table = spool_to_table(spool)
    assert table["target"].to_pylist() == ["${tmp}/a", "${tmp}/b", "${tmp}/c", "${tmp}/d", "${tmp}/e"]
    assert table["seq"].to_pylist() == [0, 1, 2, 3, 4]
    assert table["pid"].to_pylist() == [100, 200, 100, 100, 200]
    assert set(table["run_id"].to_pylist()) == {"run-1"} and set(table["suite"].to_pylist()) == {SUITE}
    assert table.schema.metadata[b"sandhop.run_id"] == b"run-1"


def test_spool_repeats_within_a_test_coalesce_into_counts(tmp_path):
    lines = [
        spool_line(1, 100, 0),                                          # first of three
        spool_line(2, 100, 1, category="fs.write", op="open", detail="w"),
        spool_line(3, 100, 2),                                          # repeat
        spool_line(4, 100, 3, detail="rb"),                             # differs in detail
        spool_line(5, 100, 4),                                          # repeat
        spool_line(6, 100, 5, test_id="tests/test_a.py::test_two"),     # another test
    ]
    table = spool_to_table(make_spool(tmp_path / "spool", {"events-100-x.jsonl": "".join(lines)}))
    rows = table.select(["t_ns", "test_id", "category", "detail", "count"]).to_pylist()
    assert [(r["t_ns"], r["category"], r["detail"], r["count"]) for r in rows] == [
        (1, "fs.read", "r", 3), (2, "fs.write", "w", 1), (4, "fs.read", "rb", 1), (6, "fs.read", "r", 1)]
    assert table["seq"].to_pylist() == [0, 1, 2, 3]
    assert summarise(table)["events_weighted"] == 6


def test_spool_rows_get_outcomes_tags_and_blank_enforcement_columns(tmp_path):
    spool = make_spool(tmp_path / "spool", {"events-100-x.jsonl": "".join([
        spool_line(1, 100, 0, test_id="tests/test_a.py", phase="collect", category="code.import",
                   op="import", target="requests", detail="", target_class="module"),
        spool_line(2, 100, 1, test_id="tests/test_a.py::test_one", phase="setup"),
        spool_line(3, 100, 2, test_id="tests/test_a.py::test_one", category="net.connect",
                   op="socket.connect", target="93.184.216.34:443", detail="", target_class="public_net"),
        spool_line(4, 100, 3, test_id="tests/test_a.py::test_two"),
        spool_line(5, 100, 4, test_id="tests/test_a.py::test_three"),
    ])}, outcomes=[{"test_id": "tests/test_a.py::test_one", "outcome": "passed"},
                   {"test_id": "tests/test_a.py::test_two", "outcome": "passed"},
                   {"test_id": "tests/test_a.py::test_two", "outcome": "error"}])
    table = spool_to_table(spool)
    assert table["test_outcome"].to_pylist() == ["", "passed", "passed", "error", ""]
    assert [tuple(t) for t in table["tags"].to_pylist()] == [
        observed_tags(c, k) for c, k in zip(table["category"].to_pylist(), table["target_class"].to_pylist())]
    assert "external_api_call" in table["tags"][2].as_py()
    assert table["risk"].null_count == 5
    assert set(table["malicious"].to_pylist()) == {False}
    assert set(table["decision"].to_pylist() + table["tier"].to_pylist() + table["attack"].to_pylist()) == {""}
    summary = summarise(table)
    assert summary["tests"] == 3
    assert summary["outcomes"] == {"passed": 1, "failed": 0, "error": 1, "skipped": 0, "none": 1}


def test_spool_tolerates_a_truncated_last_line(tmp_path):
    spool = make_spool(tmp_path / "spool", {
        "events-100-x.jsonl": spool_line(1, 100, 0) + spool_line(2, 100, 1, detail="w")[:25],
        "events-200-y.jsonl": spool_line(3, 200, 0, detail="a"),
    })
    with pytest.warns(TraceWarning, match=r"dropped 1 truncated.*events-100-x\.jsonl:2"):
        table = spool_to_table(spool)
    assert table["t_ns"].to_pylist() == [1, 3]


def test_spool_keeps_a_whole_last_line_without_newline(tmp_path):
    spool = make_spool(tmp_path / "spool", {"events-100-x.jsonl": spool_line(1, 100, 0).rstrip("\n")})
    assert spool_to_table(spool)["t_ns"].to_pylist() == [1]


@pytest.mark.parametrize("bad, message", [
    ('[1, 100, 1, 1, "t"\n', "is not JSON"),
    ("\n", "empty line"),
    ('{"t_ns": 1}\n', "is not a JSON array of the 11 fields"),
    (spool_line("2", 100, 1), "field t_ns is '2'"),
    (spool_line(2.5, 100, 1), "field t_ns is 2.5"),
    (spool_line(2, 2**40, 1), "field pid is 1099511627776"),
    (spool_line(2, 100, 1, category="fs.chmod"), "category 'fs.chmod' is not one of"),
    (spool_line(2, 100, 1, target_class="moon"), "target_class 'moon' is not one of"),
])
def test_spool_malformed_line_is_an_error_naming_file_and_line(tmp_path, bad, message):
    spool = make_spool(tmp_path / "spool", {
        "events-100-x.jsonl": spool_line(1, 100, 0) + bad + spool_line(3, 100, 2)})
    with pytest.raises(TraceError, match=message) as caught:
        spool_to_table(spool)
    assert f"{spool / 'events-100-x.jsonl'}:2:" in str(caught.value)


def test_spool_line_numbers_hold_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(traces, "_BLOCK_BYTES", 100)  # a few lines per block
    good = [spool_line(i, 100, i, target=f"${{tmp}}/{i}") for i in range(40)]
    spool = make_spool(tmp_path / "spool", {"events-100-x.jsonl": "".join(good)})
    assert spool_to_table(spool)["t_ns"].to_pylist() == list(range(40))

    (spool / "events-100-x.jsonl").write_text("".join(good[:30]) + "oops\n" + "".join(good[30:]))
    with pytest.raises(TraceError, match=r"events-100-x\.jsonl:31: is not JSON"):
        spool_to_table(spool)


def test_spool_bad_outcome_and_missing_run_json_are_errors(tmp_path):
    spool = make_spool(tmp_path / "spool", {"events-100-x.jsonl": spool_line(1, 100, 0)},
                       outcomes=[{"test_id": "t", "outcome": "passed"}, {"test_id": "t", "outcome": "xpass"}])
    with pytest.raises(TraceError, match=r"outcomes\.jsonl:2"):
        spool_to_table(spool)
    (spool / "run.json").unlink()
    with pytest.raises(TraceError, match=r"run\.json: is missing"):
        spool_to_table(spool)


def test_convert_spool_writes_the_run_and_keeps_the_spool(tmp_path):
    spool = make_spool(tmp_path / "spool", {
        "events-100-x.jsonl": spool_line(1, 100, 0) + spool_line(2, 100, 1),
        "events-200-y.jsonl": spool_line(3, 200, 0, ppid=100, category="proc.spawn",
                                         op="subprocess.Popen", target="/usr/bin/git status",
                                         detail="", target_class="system")})
    root = tmp_path / "traces"
    path = convert_spool(spool, root)
    assert path == root / "suite=requests%3D%3D2.31.0" / "run-run-1.parquet"
    assert sorted(p.name for p in spool.iterdir()) == [
        "events-100-x.jsonl", "events-200-y.jsonl", "outcomes.jsonl", "run.json"]
    stored = read_traces(root)
    assert stored.equals(spool_to_table(spool).replace_schema_metadata(stored.schema.metadata))
    assert [e.count for e in table_to_events(stored)] == [2, 1]
    with pytest.raises(FileExistsError):
        convert_spool(spool, root)


# --------------------------------------------------------------------------- summary

def test_summary_counts_and_formats(tmp_path):
    events = [
        event(seq=0, test_id="tests/test_a.py", phase="collect", test_outcome="", count=1),
        event(seq=1, test_id="t::one", phase="setup", count=4),
        event(seq=2, test_id="t::one", category="net.dns", op="getaddrinfo", target="pypi.org",
              target_class="domain", tags=("network_access", "dns_lookup")),
        event(seq=3, test_id="t::two", test_outcome="skipped"),
    ]
    summary = summarise(events_to_table(events))
    assert summary == {
        "suites": [SUITE], "runs": 1, "events": 4, "events_weighted": 7, "tests": 2,
        "outcomes": {"passed": 1, "failed": 0, "error": 0, "skipped": 1},
        "by_category": {"fs.read": 3, "net.dns": 1},
        "by_class": {"site": 3, "domain": 1},
    }
    text = format_summary(summary)
    assert "requests==2.31.0" in text and "4 rows, 7 with repeats" in text
    lines = text.splitlines()
    fs_line = next(line for line in lines if line.startswith("fs.read"))
    dns_line = next(line for line in lines if line.startswith("net.dns"))
    assert fs_line.index("75.0%") == dns_line.index("25.0%")  # columns line up


def test_undecodable_bytes_in_targets_are_kept_as_escapes(tmp_path):
    # os.fsdecode turns a non-UTF-8 file name byte into a lone surrogate, which Arrow cannot store.
    spool = make_spool(tmp_path / "spool", {
        "events-100-x.jsonl": spool_line(1, 100, 0, target="${tmp}/caf\udce9")})
    with pytest.warns(TraceWarning, match="undecodable"):
        table = spool_to_table(spool)
    assert table["target"].to_pylist() == ["${tmp}/caf\\udce9"]
    with pytest.warns(TraceWarning, match="undecodable"):
        table = events_to_table([event(target="/srv/\udcff")])
    assert table["target"].to_pylist() == ["/srv/\\udcff"]
