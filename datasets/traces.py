"""Traces on disk: the Arrow schema that mirrors `Event`, Parquet storage, validation, and the
conversion of the recorder's spool into a trace.

A trace root is a dataset partitioned by suite, one Parquet file per run:
`<root>/suite=<url-quoted suite>/run-<url-quoted run_id>.parquet`. Each file carries the schema
version, its suite and its run id in its metadata, so a file read alone is still self-describing,
and every file is validated on read: a trace that does not match this sandhop's schema and
vocabularies is an error that names the file, never a silently wrong row.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Iterable, Sequence
from operator import itemgetter
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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

VERSION_KEY = "sandhop.schema_version"
SUITE_KEY = "sandhop.suite"
RUN_ID_KEY = "sandhop.run_id"
RUN_INFO_KEY = "sandhop.run"

_TYPES: dict[str, pa.DataType] = {
    "category": pa.string(), "op": pa.string(), "target": pa.string(),
    "target_class": pa.string(), "detail": pa.string(), "run_id": pa.string(),
    "suite": pa.string(), "test_id": pa.string(), "phase": pa.string(),
    "seq": pa.int64(), "t_ns": pa.int64(), "pid": pa.int32(), "ppid": pa.int32(),
    "count": pa.int32(), "decision": pa.string(), "tier": pa.string(), "risk": pa.float32(),
    "malicious": pa.bool_(), "attack": pa.string(), "tags": pa.list_(pa.string()),
    "test_outcome": pa.string(),
}
if set(_TYPES) != set(EVENT_FIELDS):  # a field added to Event must get a column type here
    raise ImportError(f"TRACE_SCHEMA is out of step with Event: {sorted(set(_TYPES) ^ set(EVENT_FIELDS))}")

TRACE_SCHEMA = pa.schema(
    [pa.field(name, _TYPES[name], nullable=(name == "risk")) for name in EVENT_FIELDS],
    metadata={VERSION_KEY: str(SCHEMA_VERSION)},
)

# Columns a trace may carry after the Event fields, never null: written by tools that know more
# than the recorder (the audit export adds the policy rule that decided each row). Runs with and
# without one read together; rows from a run without it get the blank value.
# Labelled (injected) traces add `step`, the index of an injected event's scenario step (-1 for
# a recorded event), and `damaging`, true on the step of an attack that does the harm.
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {"rule": pa.string(), "step": pa.int32(), "damaging": pa.bool_()}
_OPTIONAL_BLANKS: dict[str, object] = {"rule": "", "step": -1, "damaging": False}

# Closed vocabularies checked on every read: (column, allowed values).
_VOCABULARIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("category", CATEGORIES), ("phase", PHASES), ("target_class", TARGET_CLASSES),
    ("test_outcome", OUTCOMES),
)
_TEST_PHASES = ("setup", "call", "teardown")
_RECORDED_OUTCOMES = tuple(o for o in OUTCOMES if o)


class TraceError(ValueError):
    """A trace file, table or spool that sandhop cannot use: what is wrong, where, and the fix."""

    def __init__(self, source: str | os.PathLike, problem: str, fix: str) -> None:
        self.source, self.problem, self.fix = str(source), problem, fix
        super().__init__(f"{self.source}: {problem}; {fix}")

    def __reduce__(self):
        return type(self), (self.source, self.problem, self.fix)


class TraceWarning(UserWarning):
    """Data was kept but changed or dropped (a truncated spool line, an unencodable string)."""


# --------------------------------------------------------------------------- validation

def validate_trace(table: pa.Table, source: str | os.PathLike = "trace table", *,
                   require_version: bool = True) -> pa.Table:
    """Check a table against this sandhop's trace schema and vocabularies; return it with the
    columns in `EVENT_FIELDS` order and exactly the `TRACE_SCHEMA` types.

    `require_version=False` accepts a table without version metadata (one built in memory);
    a version that is present must still be this sandhop's.
    """
    meta = table.schema.metadata or {}
    _check_version(meta.get(VERSION_KEY.encode()), source, require_version)

    names = table.column_names
    duplicated = sorted({n for n in names if names.count(n) > 1})
    missing = [n for n in EVENT_FIELDS if n not in names]
    unexpected = [n for n in names if n not in _TYPES and n not in OPTIONAL_COLUMNS]
    if duplicated or missing or unexpected:
        problems = [f"{label} column(s) {', '.join(cols)}" for label, cols in
                    (("duplicated", duplicated), ("missing", missing), ("unexpected", unexpected)) if cols]
        raise TraceError(source, "; ".join(problems),
                         f"a schema-v{SCHEMA_VERSION} trace has exactly the columns "
                         f"{', '.join(EVENT_FIELDS)}; re-record the suite with this sandhop")
    optional = [n for n in OPTIONAL_COLUMNS if n in names]
    types = {**_TYPES, **OPTIONAL_COLUMNS}
    wrong = [f"{n} is {table.schema.field(n).type}, expected {types[n]}"
             for n in (*EVENT_FIELDS, *optional) if not table.schema.field(n).type.equals(types[n])]
    if wrong:
        raise TraceError(source, "wrong column type(s): " + "; ".join(wrong),
                         "the file was not written by sandhop's write_trace; re-record the suite "
                         "or cast the columns to TRACE_SCHEMA")

    for name in (*EVENT_FIELDS, *optional):
        if name != "risk" and table[name].null_count:
            row = _first_row(table[name], pc.is_null)
            if row is not None:
                raise TraceError(source, f"row {row}: {name} is null",
                                 f"only risk may be null; write {name!r} as a value "
                                 "(\"\" for an empty string)")
    for name, vocabulary in _VOCABULARIES:
        _check_vocabulary(table[name], name, vocabulary, lambda row: f"{source}: row {row}")
    _check_tags(table["tags"], source)
    row = _first_row(table["count"], lambda a: pc.less(a, 1))
    if row is not None:
        raise TraceError(source, f"row {row}: count is {table['count'][row].as_py()}",
                         "count is how many identical events a row stands for and must be >= 1")

    kept = {k: v for k, v in meta.items() if k in (SUITE_KEY.encode(), RUN_ID_KEY.encode())}
    columns = [table[n] for n in (*EVENT_FIELDS, *optional)]
    schema = _schema_with(kept)
    for name in optional:
        schema = schema.append(pa.field(name, OPTIONAL_COLUMNS[name], nullable=False))
    return pa.Table.from_arrays(columns, schema=schema)


def _check_version(raw: bytes | None, source, required: bool) -> None:
    if raw is None:
        if required:
            raise TraceError(source, f"no {VERSION_KEY} in the Parquet metadata, so this is not a "
                                     "sandhop trace (or a tool rewrote it and dropped the metadata)",
                             "convert the recording again with this sandhop (convert_spool / "
                             "write_trace), which writes the metadata")
        return
    text = raw.decode("utf-8", "replace")
    try:
        version = int(text)
    except ValueError:
        raise TraceError(source, f"schema version {text!r} is not a number",
                         "the metadata is damaged; re-record the suite") from None
    if version > SCHEMA_VERSION:
        raise TraceError(source, f"schema version {version} is newer than this sandhop "
                                 f"understands ({SCHEMA_VERSION})",
                         "upgrade sandhop or re-record the suite")
    if version < SCHEMA_VERSION:
        raise TraceError(source, f"schema version {version} is older than this sandhop reads "
                                 f"({SCHEMA_VERSION})",
                         "re-record the suite with this sandhop")


def _first_row(column: pa.ChunkedArray | pa.Array, predicate) -> int | None:
    """Index of the first row where `predicate(chunk)` is true, across chunks."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    offset = 0
    for chunk in chunks:
        mask = pc.fill_null(predicate(chunk), False)
        if pc.any(mask).as_py():
            return offset + int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])
        offset += len(chunk)
    return None


def _check_vocabulary(column, name: str, vocabulary: Sequence[str], where) -> None:
    allowed = pa.array(vocabulary, pa.string())
    row = _first_row(column, lambda a: pc.invert(pc.is_in(a, value_set=allowed)))
    if row is not None:
        raise TraceError(where(row), f"{name} {column[row].as_py()!r} is not one of "
                                     f"{', '.join(repr(v) for v in vocabulary)}",
                         "this sandhop does not know that value: upgrade sandhop if a newer one "
                         "wrote it, otherwise fix the tool that produced it")


def _check_tags(column: pa.ChunkedArray, source) -> None:
    allowed = pa.array(ALL_TAGS, pa.string())
    offset = 0
    for chunk in column.chunks:
        values = pc.list_flatten(chunk)
        bad = pc.fill_null(pc.invert(pc.is_in(values, value_set=allowed)), True)
        if pc.any(bad).as_py():
            i = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            row = offset + pc.list_parent_indices(chunk)[i].as_py()
            raise TraceError(source, f"row {row}: tag {values[i].as_py()!r} is not one of "
                                     f"{', '.join(ALL_TAGS)}",
                             "tags come from the closed vocabulary in sandhop.enforcement.events; "
                             "upgrade sandhop or fix the tool that wrote the tag")
        offset += len(chunk)


def _schema_with(metadata: dict) -> pa.Schema:
    return TRACE_SCHEMA.with_metadata({**TRACE_SCHEMA.metadata, **metadata})


# --------------------------------------------------------------------------- events <-> table

def events_to_table(events: Iterable[Event]) -> pa.Table:
    """Columns straight from the events' fields (the Event already checked its vocabularies)."""
    columns: dict[str, list] = {name: [] for name in EVENT_FIELDS}
    for event in events:
        for name in EVENT_FIELDS:
            columns[name].append(getattr(event, name))
    columns["tags"] = [list(t) for t in columns["tags"]]
    arrays = []
    for name in EVENT_FIELDS:
        if _TYPES[name] == pa.string():
            array, changed = _string_array(columns[name])
            if changed:
                _warn_unencodable(changed, name, "events")
        else:
            try:
                array = pa.array(columns[name], _TYPES[name])
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                raise ValueError(f"event field {name} does not fit the trace column type "
                                 f"{_TYPES[name]}: {e}") from e
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=TRACE_SCHEMA)


def table_to_events(table: pa.Table) -> list[Event]:
    """Events from a trace table; validates first, so a bad table fails with its row number."""
    table = validate_trace(table, require_version=False)
    columns = table.to_pydict()
    columns["tags"] = [tuple(t) for t in columns["tags"]]
    return [Event(**dict(zip(EVENT_FIELDS, row))) for row in zip(*(columns[n] for n in EVENT_FIELDS))]


def _string_array(values: Sequence) -> tuple[pa.Array, int]:
    """Arrow strings must be UTF-8; a lone surrogate (an undecodable byte in a file name, from
    os.fsdecode) is spelled as its escape `\\udcff` rather than losing the whole trace."""
    try:
        return pa.array(values, pa.string()), 0
    except UnicodeEncodeError:
        fixed = [v.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(v, str) else v
                 for v in values]
        changed = sum(1 for a, b in zip(values, fixed) if a != b)
        return pa.array(fixed, pa.string()), changed


def _warn_unencodable(n: int, column: str, where: str) -> None:
    warnings.warn(TraceWarning(
        f"{where}: {n} {column} value(s) held undecodable bytes (lone surrogates) and are stored "
        "with them spelled as \\udcXX escapes"), stacklevel=3)


# --------------------------------------------------------------------------- Parquet storage

def trace_path(root: str | os.PathLike, suite: str, run_id: str) -> Path:
    """Where `write_trace` puts a run: `root/suite=<quoted suite>/run-<quoted run_id>.parquet`."""
    for name, value in (("suite", suite), ("run_id", run_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return Path(root) / f"suite={quote(suite, safe='')}" / f"run-{quote(run_id, safe='')}.parquet"


def write_trace(table: pa.Table, root: str | os.PathLike, *, suite: str, run_id: str,
                run_info: dict | None = None) -> Path:
    """Validate and write one run, atomically, never replacing a stored run. `run_info` (the
    recorder's run.json: command line, interpreter, outcome counts) is kept in the metadata.

    The file appears complete or not at all (temp file in the same folder, fsync, os.replace), so
    a reader never sees half a run and a caller may delete its source once this returns.
    """
    path = trace_path(root, suite, run_id)
    if path.exists():
        raise FileExistsError(f"{path}: run {run_id!r} of suite {suite!r} is already stored; "
                              "use a new run id, or delete the file to record it again")
    label = f"{path} (not written)"
    table = validate_trace(table, label, require_version=False)
    for name, value in (("suite", suite), ("run_id", run_id)):
        row = _first_row(table[name], lambda a, v=value: pc.not_equal(a, v))
        if row is not None:
            raise TraceError(label, f"row {row} has {name} {table[name][row].as_py()!r}, but the "
                                    f"run is written as {name}={value!r}",
                             f"set {name} on every event to the value passed to write_trace")
    table = table.replace_schema_metadata(
        {**TRACE_SCHEMA.metadata, SUITE_KEY.encode(): suite.encode(), RUN_ID_KEY.encode(): run_id.encode(),
         RUN_INFO_KEY.encode(): json.dumps(run_info or {}).encode()})

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        if path.exists():  # another writer got there while this one was writing
            raise FileExistsError(f"{path}: run {run_id!r} of suite {suite!r} was stored while "
                                  "this copy was being written; use a new run id")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows) make the rename durable anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_traces(root: str | os.PathLike, suites: Iterable[str] | str | None = None) -> pa.Table:
    """Every run under a trace root (or one run file, or one `suite=` folder), validated and
    concatenated; `suites` keeps only those partitions and names any that are absent."""
    root = Path(root)
    wanted = None if suites is None else ({suites} if isinstance(suites, str) else set(suites))
    if not root.exists():
        raise TraceError(root, "does not exist",
                         "record a suite first (pytest --sandhop-record SPOOL, then convert_spool) "
                         "or pass the folder that holds the suite=... folders")
    if root.is_file():
        files = [root]
    else:
        pattern = "run-*.parquet" if root.name.startswith("suite=") else "suite=*/run-*.parquet"
        files = sorted(p for p in root.glob(pattern) if p.is_file())
        if not files:
            raise TraceError(root, f"holds no run files ({pattern})",
                             "pass the trace root that write_trace/convert_spool wrote to")
        if wanted is not None:
            present = {_partition_suite(p) for p in files}
            absent = sorted(wanted - present)
            if absent:
                raise TraceError(root, f"holds no runs of suite(s) {', '.join(absent)}; it holds "
                                       f"{', '.join(sorted(present))}",
                                 "check the spelling (a suite is written name==version)")
            files = [p for p in files if _partition_suite(p) in wanted]

    tables = [_read_run_file(p) for p in files]
    if root.is_file() and wanted is not None:
        suite = tables[0].schema.metadata[SUITE_KEY.encode()].decode()
        if suite not in wanted:
            raise TraceError(root, f"is a run of suite {suite!r}, not of {', '.join(sorted(wanted))}",
                             "drop the suite filter or pass the trace root")
    tables = [t.replace_schema_metadata(TRACE_SCHEMA.metadata) for t in tables]
    optional = [n for n in OPTIONAL_COLUMNS if any(n in t.column_names for t in tables)]
    return pa.concat_tables([_with_optional_columns(t, optional) for t in tables])


def _with_optional_columns(table: pa.Table, optional: list[str]) -> pa.Table:
    """`table` with every column in `optional`, in that order; an absent one filled blank."""
    for name in optional:
        column = (table[name] if name in table.column_names else
                  pa.repeat(pa.scalar(_OPTIONAL_BLANKS[name], OPTIONAL_COLUMNS[name]), table.num_rows))
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(pa.field(name, OPTIONAL_COLUMNS[name], nullable=False), column)
    return table


def _partition_suite(path: Path) -> str | None:
    folder = path.parent.name
    return unquote(folder[len("suite="):]) if folder.startswith("suite=") else None


def _read_run_file(path: Path) -> pa.Table:
    try:
        with pq.ParquetFile(path) as parquet:
            table = parquet.read()
    except (pa.ArrowException, OSError) as e:
        raise TraceError(path, f"is not a readable Parquet file ({e})",
                         "it is truncated or corrupt (an interrupted copy?); restore it, or "
                         "convert the run's spool again") from e
    table = validate_trace(table, path)
    meta = table.schema.metadata
    found = {key: meta.get(key.encode()) for key in (SUITE_KEY, RUN_ID_KEY)}
    missing = [key for key, value in found.items() if not value]
    if missing:
        raise TraceError(path, f"no {' or '.join(missing)} in the Parquet metadata",
                         "write traces with write_trace, which records both")
    suite = found[SUITE_KEY].decode()
    partition = _partition_suite(path)
    if partition is not None and partition != suite:
        raise TraceError(path, f"lies in the folder of suite {partition!r} but its metadata says "
                               f"suite {suite!r}",
                         f"move it to suite={quote(suite, safe='')}/ under the trace root")
    for name, key in (("suite", SUITE_KEY), ("run_id", RUN_ID_KEY)):
        value = found[key].decode()
        row = _first_row(table[name], lambda a, v=value: pc.not_equal(a, v))
        if row is not None:
            raise TraceError(path, f"row {row} has {name} {table[name][row].as_py()!r}, but the "
                                   f"file's metadata says {value!r}",
                             "the file was edited by hand; convert the run's spool again")
    return table


# --------------------------------------------------------------------------- spool conversion

_SPOOL_TYPES: dict[str, pa.DataType] = {
    "t_ns": pa.int64(), "pid": pa.int32(), "ppid": pa.int32(), "lseq": pa.int64(),
    **{name: pa.string() for name in SPOOL_FIELDS if name not in ("t_ns", "pid", "ppid", "lseq")},
}
_SPOOL_SCHEMA = pa.schema([(name, _SPOOL_TYPES[name]) for name in SPOOL_FIELDS])
_SPOOL_VOCABULARIES = (("phase", PHASES), ("category", CATEGORIES), ("target_class", TARGET_CLASSES))
_COALESCE_KEYS = ["test_id", "phase", "pid", "category", "op", "target", "detail", "target_class"]
_BLOCK_BYTES = 8 << 20  # spool bytes parsed per step: bounds the Python objects alive at once
_SPOOL_FIX = ("the recorder wrote something this sandhop cannot read; convert with the sandhop "
              "that recorded the spool, or re-record the suite")


class _BadColumn(Exception):
    pass


def spool_to_table(spool_dir: str | os.PathLike) -> pa.Table:
    """The trace of one recorded run: events of every traced process in one global order,
    identical repeats within a test coalesced into counts, outcomes and observed tags attached.

    Columns are built directly from the spool (no Event per row) so a million lines stay fast.
    """
    spool = Path(spool_dir)
    if not spool.is_dir():
        raise TraceError(spool, "is not a folder", "pass the folder given to pytest --sandhop-record")
    run = _read_run_json(spool / "run.json")
    dropped: list[str] = []
    outcomes = _read_outcomes(spool / "outcomes.jsonl", dropped)
    batches: list[pa.RecordBatch] = []
    changed = 0
    for path in sorted(spool.glob("events-*.jsonl")):
        changed += _read_event_file(path, batches, dropped)
    if dropped:
        warnings.warn(TraceWarning(
            f"{spool}: dropped {len(dropped)} truncated last line(s), each from a process killed "
            f"mid-write: {', '.join(dropped)}"), stacklevel=2)
    if changed:
        _warn_unencodable(changed, "string", str(spool))

    raw = pa.Table.from_batches(batches, schema=_SPOOL_SCHEMA)
    first, counts = _order_and_coalesce(raw)
    events = raw.take(first)
    n = events.num_rows

    test_ids = events["test_id"]
    outcome_keys = pa.array(list(outcomes), pa.string())
    outcome_values = pa.array(list(outcomes.values()), pa.string())
    test_outcome = pc.fill_null(pc.take(outcome_values, pc.index_in(test_ids, value_set=outcome_keys)), "")

    def constant(value, type_):
        return pa.repeat(pa.scalar(value, type_), n)

    columns = {
        "category": events["category"], "op": events["op"], "target": events["target"],
        "target_class": events["target_class"], "detail": events["detail"],
        "run_id": constant(run["run_id"], pa.string()), "suite": constant(run["suite"], pa.string()),
        "test_id": test_ids, "phase": events["phase"],
        "seq": pa.array(np.arange(n, dtype=np.int64)), "t_ns": events["t_ns"],
        "pid": events["pid"], "ppid": events["ppid"], "count": counts,
        "decision": constant("", pa.string()), "tier": constant("", pa.string()),
        "risk": pa.nulls(n, pa.float32()), "malicious": constant(False, pa.bool_()),
        "attack": constant("", pa.string()), "tags": _observed_tags(events),
        "test_outcome": test_outcome,
    }
    metadata = {SUITE_KEY: run["suite"], RUN_ID_KEY: run["run_id"]}
    return pa.Table.from_arrays([columns[name] for name in EVENT_FIELDS], schema=_schema_with(metadata))


def convert_spool(spool_dir: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Convert one spool into a run file under `root` and return its path. The spool is left in
    place: the caller deletes it once this has returned, so a failure loses nothing."""
    run = _read_run_json(Path(spool_dir) / "run.json")
    path = trace_path(root, run["suite"], run["run_id"])
    if path.exists():  # fail before the slow part
        raise FileExistsError(f"{path}: run {run['run_id']!r} of suite {run['suite']!r} is already "
                              f"stored; the spool {spool_dir} was converted before")
    table = spool_to_table(spool_dir)
    return write_trace(table, root, suite=run["suite"], run_id=run["run_id"], run_info=run)


def read_run_info(path: str | os.PathLike) -> dict:
    """The recorder's description of one stored run (empty for runs written without one)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise TraceError(path, f"cannot be read as Parquet ({e})", "re-record the suite") from e
    return json.loads(meta.get(RUN_INFO_KEY.encode(), b"{}"))


def _read_run_json(path: Path) -> dict:
    if not path.is_file():
        raise TraceError(path, "is missing",
                         "the recorder writes run.json when the session starts; pass the folder "
                         "given to pytest --sandhop-record, from a run that started")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise TraceError(path, f"is not valid JSON ({e})", "the spool is damaged; re-record the suite") from e
    bad = [key for key in ("run_id", "suite")
           if not isinstance(run, dict) or not isinstance(run.get(key), str) or not run.get(key)]
    if bad:
        raise TraceError(path, f"has no non-empty string {' or '.join(bad)}",
                         "the spool is damaged or from another tool; re-record the suite")
    return run


def _read_outcomes(path: Path, dropped: list[str]) -> dict[str, str]:
    """test_id -> outcome; a later line overrides an earlier one (a rerun, a teardown error)."""
    outcomes: dict[str, str] = {}
    if not path.exists():
        return outcomes
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError as e:
                if not line.endswith(b"\n"):
                    dropped.append(f"{path.name}:{line_no}")
                    break
                raise TraceError(f"{path}:{line_no}", f"is not JSON ({e})", _SPOOL_FIX) from e
            if (not isinstance(record, dict) or not isinstance(record.get("test_id"), str)
                    or record.get("outcome") not in _RECORDED_OUTCOMES):
                raise TraceError(f"{path}:{line_no}",
                                 f"expected {{\"test_id\": str, \"outcome\": one of "
                                 f"{', '.join(_RECORDED_OUTCOMES)}}}, got {line[:200]!r}", _SPOOL_FIX)
            outcomes[record["test_id"]] = record["outcome"]
    return outcomes


def _read_event_file(path: Path, batches: list[pa.RecordBatch], dropped: list[str]) -> int:
    """Append the file's events to `batches`, a block of whole lines at a time; return how many
    strings were re-spelled."""
    changed = 0
    first_line = 1
    pending = b""
    with open(path, "rb") as f:
        while block := f.read(_BLOCK_BYTES):
            data = pending + block
            cut = data.rfind(b"\n") + 1
            lines, pending = data[:cut], data[cut:]
            if lines:
                changed += _parse_event_lines(lines, path, first_line, batches)
                first_line += lines.count(b"\n")
    if pending:
        # Only the last line can lack its newline; if it is not whole JSON, the process died
        # while writing it.
        if _is_json(pending):
            changed += _parse_event_lines(pending + b"\n", path, first_line, batches)
        else:
            dropped.append(f"{path.name}:{first_line}")
    return changed


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _parse_event_lines(lines: bytes, path: Path, first_line: int, batches: list[pa.RecordBatch]) -> int:
    """Newline-terminated spool lines as one batch of Arrow columns: parsed in one json call
    (JSON strings cannot hold a raw newline, so newlines are exactly the separators), and only
    if that fails, line by line to name the bad line."""
    n_lines = lines.count(b"\n")
    width = len(SPOOL_FIELDS)
    try:
        rows = json.loads(b"[" + lines[:-1].replace(b"\n", b",") + b"]")
    except ValueError:
        rows = None
    if (rows is None or len(rows) != n_lines
            or set(map(type, rows)) != {list} or set(map(len, rows)) != {width}):
        _raise_bad_line(lines, path, first_line)
    arrays, changed = [], 0
    try:
        for i, name in enumerate(SPOOL_FIELDS):
            array, n = _spool_column(list(map(itemgetter(i), rows)), _SPOOL_TYPES[name])
            arrays.append(array)
            changed += n
    except _BadColumn:
        _raise_bad_line(lines, path, first_line)
    del rows
    batch = pa.RecordBatch.from_arrays(arrays, schema=_SPOOL_SCHEMA)
    for name, vocabulary in _SPOOL_VOCABULARIES:
        _check_vocabulary(batch[name], name, vocabulary, lambda row: f"{path}:{first_line + row}")
    batches.append(batch)
    return changed


def _spool_column(values: list, type_: pa.DataType) -> tuple[pa.Array, int]:
    if type_ == pa.string():
        try:
            array, changed = _string_array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise _BadColumn from e
    else:
        # Inferred first: an explicit int type would silently truncate a float.
        try:
            array = pa.array(values)
            if not pa.types.is_integer(array.type):
                raise _BadColumn
            array = array.cast(type_)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            raise _BadColumn from e
        changed = 0
    if array.null_count:
        raise _BadColumn
    return array, changed


def _raise_bad_line(lines: bytes, path: Path, first_line: int) -> None:
    limits = {pa.int32(): 2**31, pa.int64(): 2**63}
    split = lines.split(b"\n")[:-1]
    for offset, line in enumerate(split):
        where = f"{path}:{first_line + offset}"
        if not line.strip():
            raise TraceError(where, "is an empty line", _SPOOL_FIX)
        try:
            row = json.loads(line)
        except ValueError as e:
            raise TraceError(where, f"is not JSON ({e})", _SPOOL_FIX) from e
        if type(row) is not list or len(row) != len(SPOOL_FIELDS):
            raise TraceError(where, f"is not a JSON array of the {len(SPOOL_FIELDS)} fields "
                                    f"{', '.join(SPOOL_FIELDS)}: {line[:200]!r}", _SPOOL_FIX)
        for name, value in zip(SPOOL_FIELDS, row):
            type_ = _SPOOL_TYPES[name]
            if type_ == pa.string():
                ok = isinstance(value, str)
            else:
                ok = type(value) is int and -limits[type_] <= value < limits[type_]
            if not ok:
                raise TraceError(where, f"field {name} is {value!r}, expected "
                                        f"{'a string' if type_ == pa.string() else f'an {type_} integer'}",
                                 _SPOOL_FIX)
    raise TraceError(f"{path}:{first_line}-{first_line + len(split) - 1}",
                     "these lines do not parse as spool events", _SPOOL_FIX)


def _order_and_coalesce(raw: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Rows of `raw` to keep, in global (t_ns, pid, lseq) order, and the count of each: an event
    repeated identically within a test is kept at its first occurrence only.

    The identity columns are folded into one integer key per row (exact: built from the codes of
    each column's distinct values, never a hash), so finding first occurrences is one np.unique.
    """
    order = pc.sort_indices(raw, sort_keys=[("t_ns", "ascending"), ("pid", "ascending"),
                                             ("lseq", "ascending")]).to_numpy()
    key = np.zeros(raw.num_rows, dtype=np.int64)
    bound = 1  # key < bound
    for name in _COALESCE_KEYS:
        distinct = pc.unique(raw[name])
        if bound * len(distinct) >= 2**62:
            key = np.unique(key, return_inverse=True)[1].astype(np.int64).reshape(-1)
            bound = int(key.max(initial=0)) + 1
        key = key * len(distinct) + pc.index_in(raw[name], value_set=distinct).to_numpy()
        bound *= max(len(distinct), 1)
    _, first, counts = np.unique(key[order], return_index=True, return_counts=True)
    by_position = np.argsort(first)
    return pa.array(order[first[by_position]]), pa.array(counts[by_position].astype(np.int32))


def _observed_tags(events: pa.Table) -> pa.Array:
    """`observed_tags` once per distinct (category, target_class), spread to the rows."""
    pairs = pc.binary_join_element_wise(events["category"], events["target_class"], "\x00")
    encoded = pairs.combine_chunks().dictionary_encode() if events.num_rows else None
    if encoded is None:
        return pa.array([], pa.list_(pa.string()))
    per_pair = pa.array([list(observed_tags(*p.split("\x00"))) for p in encoded.dictionary.to_pylist()],
                        pa.list_(pa.string()))
    return per_pair.take(encoded.indices)


# --------------------------------------------------------------------------- summary

def summarise(table: pa.Table) -> dict:
    """What a trace holds, for a person deciding whether it is the recording they meant."""
    table = validate_trace(table, require_version=False)
    in_test = pc.and_(pc.is_in(table["phase"], value_set=pa.array(_TEST_PHASES)),
                      pc.not_equal(table["test_id"], ""))
    # A test is one (run, test id): the same test recorded in two runs counts twice.
    tests = (table.filter(in_test).select(["run_id", "test_id", "test_outcome"])
             .group_by(["run_id", "test_id"]).aggregate([("test_outcome", "max")]))
    outcome_counts = _counts(tests["test_outcome_max"])
    outcomes = {o: outcome_counts.pop(o, 0) for o in _RECORDED_OUTCOMES}
    if outcome_counts.get(""):
        outcomes["none"] = outcome_counts[""]
    return {
        "suites": sorted(pc.unique(table["suite"]).to_pylist()),
        "runs": len(pc.unique(table["run_id"])),
        "events": table.num_rows,
        "events_weighted": int(pc.sum(table["count"]).as_py() or 0),
        "tests": tests.num_rows,
        "outcomes": outcomes,
        "by_category": _counts(table["category"]),
        "by_class": _counts(table["target_class"]),
    }


def _counts(column) -> dict[str, int]:
    """value -> rows, most frequent first (ties by name)."""
    pairs = [(v["values"], v["counts"]) for v in pc.value_counts(column).to_pylist()]
    return dict(sorted(pairs, key=lambda vc: (-vc[1], vc[0])))


def format_summary(summary: dict) -> str:
    """The summary as an aligned plain-text table, for a terminal."""
    outcomes = ", ".join(f"{k} {v:,}" for k, v in summary["outcomes"].items())
    head = [
        ("suites", ", ".join(summary["suites"]) or "-"),
        ("runs", f"{summary['runs']:,}"),
        ("events", f"{summary['events']:,} rows, {summary['events_weighted']:,} with repeats"),
        ("tests with events", f"{summary['tests']:,}" + (f" ({outcomes})" if summary["tests"] else "")),
    ]
    width = max(len(label) for label, _ in head)
    lines = [f"{label:<{width}}  {value}" for label, value in head]
    total = summary["events"] or 1
    for title, counts in (("category", summary["by_category"]), ("target class", summary["by_class"])):
        name_w = max([len(title)] + [len(k) for k in counts])
        rows_w = max([len("rows")] + [len(f"{v:,}") for v in counts.values()])
        lines += ["", f"{title:<{name_w}}  {'rows':>{rows_w}}  {'share':>6}"]
        lines += [f"{k:<{name_w}}  {v:>{rows_w},}  {100 * v / total:>5.1f}%" for k, v in counts.items()]
    return "\n".join(lines)
