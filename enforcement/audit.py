"""The tamper-evident audit trail: what the live guard decided, written so that any later edit,
deletion, reordering or truncation of the record shows (DESIGN 3.8).

A log is a hash chain of canonical JSON lines: each record carries its number `n`, the hash of
the record before it (`prev`) and its own `hash`, a SHA-256 (an HMAC-SHA256 when a key is given)
over `prev` and the record's canonical JSON without `hash`. Changing a record breaks its hash,
removing or moving one breaks the numbering and the links, and only the key holder can re-forge
the chain. What a chain cannot show by itself is whole records cut from its end, so two more
things are kept: a `seal` record written on a clean close (a missing seal means the writer died,
or the tail was cut) and a small head file, rewritten atomically after every batch, holding the
count and last hash (with a MAC when keyed). A log whose head matches but that has no seal is a
writer killed mid-run: it verifies up to its last flushed batch and says it was not sealed.

The writer buffers records and hands each batch to the kernel with one O_APPEND write, so the
guard's cost per decision is two `json.dumps` and one hash, and a crash loses at most the
unflushed batch, never the chain. One chain has one writer: an advisory lock on the log refuses
a second one, and a forked child's copy of a log is disabled (the parent writes the records it
buffered; a child that audits opens a log on a path of its own). Stdlib only: the guard loads
this into every enforced process. Without a key the chain detects accidents and naive edits;
against someone who can rewrite the files, use a key and keep the head file (or a copy of its
hash) where they cannot reach it.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import hmac
import json
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandhop.enforcement.events import Event

KEY_ENV = "SANDHOP_AUDIT_KEY"
GENESIS = "0" * 64  # the `prev` of record 1
RESERVED_FIELDS = ("n", "prev", "hash")
PROBLEM_KINDS = ("edited", "deleted", "reordered", "duplicated", "malformed", "truncated-line",
                 "truncated-tail", "missing-segment", "wrong-key")
DEFAULT_SUITE = "audit==local"

_HEAD_MAC_DOMAIN = b"sandhop-audit-head\x00"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_VERIFY_HINT = "run `sandhop audit verify {log}` for the full report"


class AuditError(RuntimeError):
    """An audit log that cannot be extended or trusted: what is wrong, where, and what to do."""


# --------------------------------------------------------------------------- files and hashes

def segment_path(log: str | os.PathLike, index: int) -> Path:
    """Segment `index` of a log: the log's own path for 0, then `<log>.1`, `<log>.2`, ..."""
    log = Path(log)
    return log if index == 0 else log.with_name(f"{log.name}.{index}")


def head_path(log: str | os.PathLike) -> Path:
    log = Path(log)
    return log.with_name(f"{log.name}.head")


def segments(log: str | os.PathLike) -> list[Path]:
    """The log's segment files that exist, in chain order."""
    return [path for _, path in _numbered_segments(Path(log))]


def log_base(path: str | os.PathLike) -> Path:
    """The log a file belongs to: `audit.jsonl.3` and `audit.jsonl.head` give `audit.jsonl`, so
    a shell glob over a log's files names the log once."""
    path = Path(path)
    if path.name.endswith(".head"):
        return path.with_name(path.name[:-len(".head")])
    match = re.fullmatch(r"(.+)\.[1-9][0-9]*", path.name)
    if match:
        base = path.with_name(match.group(1))
        if base.exists() or head_path(base).exists():
            return base
    return path


def _numbered_segments(log: Path) -> list[tuple[int, Path]]:
    found = [(0, log)] if log.is_file() else []
    pattern = re.compile(re.escape(log.name) + r"\.([1-9][0-9]*)")
    if log.parent.is_dir():
        for path in log.parent.iterdir():
            match = pattern.fullmatch(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def _resolve_key(key: bytes | None) -> bytes | None:
    if key is None:
        env = os.environ.get(KEY_ENV)
        return env.encode() if env else None
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError(f"an audit key must be non-empty bytes, got {key!r:.40}; pass None for "
                         f"the {KEY_ENV} environment variable, or plain SHA-256 when it is unset")
    return bytes(key)


def _canonical(record: dict) -> str:
    # ASCII escapes keep lone surrogates (undecodable file names) representable and the bytes hashed
    # independent of any encoding choice.
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _digest(key: bytes | None, prev: str, canonical: str) -> str:
    data = (prev + canonical).encode("ascii")
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _head_mac(key: bytes, head: dict) -> str:
    body = _canonical({k: v for k, v in head.items() if k != "mac"}).encode("ascii")
    return hmac.new(key, _HEAD_MAC_DOMAIN + body, hashlib.sha256).hexdigest()


class _BadHead(Exception):
    pass


def _load_head(log: Path) -> dict | None:
    path = head_path(log)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        head = json.loads(text)
    except ValueError:
        head = None
    if not (isinstance(head, dict) and type(head.get("records")) is int and head["records"] >= 0
            and isinstance(head.get("hash"), str) and isinstance(head.get("mac", ""), str)):
        raise _BadHead(f"{path} is not an audit head file (expected {{\"records\": int, \"hash\": str}})")
    return head


def _parse_record(line: bytes) -> dict:
    """A log line as a record with a well-formed n, prev and hash; ValueError says what is wrong."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    n = record.get("n")
    if type(n) is not int or n < 1:
        raise ValueError(f"n is {n!r}, not a record number")
    for name in ("prev", "hash"):
        if not isinstance(record.get(name), str) or not _HEX64.fullmatch(record[name]):
            raise ValueError(f"{name} is not a 64-digit hex digest")
    return record


def _record_digest(key: bytes | None, record: dict) -> str:
    return _digest(key, record["prev"], _canonical({k: v for k, v in record.items() if k != "hash"}))


def _last_line(path: Path) -> bytes | None:
    """The last line of a segment without its newline; None for an empty file; ValueError when
    the file does not end with a newline (a write was cut)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return None
        f.seek(end - 1)
        if f.read(1) != b"\n":
            raise ValueError("ends in the middle of a line")
        tail, pos = b"", end - 1
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            cut = tail.rfind(b"\n")
            if cut >= 0:
                return tail[cut + 1:]
        return tail


# --------------------------------------------------------------------------- writer

class AuditLog:
    """Append-only writer of one hash-chained log. Thread-safe; one writer per log.

    `path` names segment 0; further segments are `<path>.1`, `<path>.2`, ..., started when the
    next batch would take the current one past `segment_bytes` (a batch never splits). Records
    are written `batch` at a time and on `flush()`, `close()` and interpreter exit; `close()`
    adds the seal. Opening an existing log continues its chain, after checking its last record
    and head against this key, so a truncated or differently keyed log is never silently extended.
    In a child made by `os.fork` the inherited log is disabled: the parent writes what it had
    buffered, and appending in the child raises `AuditError` (open another path there).
    """

    def __init__(self, path: str | os.PathLike, *, key: bytes | None = None, batch: int = 64,
                 segment_bytes: int = 8 << 20) -> None:
        if batch < 1 or segment_bytes < 1:
            raise ValueError(f"batch and segment_bytes must be >= 1, got {batch} and {segment_bytes}")
        self.path = Path(path)
        self._key = _resolve_key(key)
        self._batch = batch
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._pid = os.getpid()
        self._forked_from: int | None = None
        self._closed = False
        self._failed: BaseException | None = None

        numbered = _numbered_segments(self.path)
        missing = sorted(set(range(numbered[-1][0] + 1)) - {i for i, _ in numbered}) if numbered else []
        if missing:
            raise AuditError(f"{self.path}: segment(s) {', '.join(segment_path(self.path, i).name for i in missing)} "
                             f"are missing, so the chain is broken; {_VERIFY_HINT.format(log=self.path)}, "
                             "then move the log away and start a new one")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditError(f"{self.path} is being written by another AuditLog (in this or another "
                                 "process); two writers would fork the chain, so give each its own path") from None
            self._n, self._prev, self._segment = self._resume()
            self._fd = os.open(segment_path(self.path, self._segment),
                               os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._segment_size = os.fstat(self._fd).st_size
        _LIVE.add(self)

    def _resume(self) -> tuple[int, str, int]:
        """(last record number, last hash, segment to append to) of the chain on disk."""
        numbered = _numbered_segments(self.path)
        where = f"{self.path}: {_VERIFY_HINT.format(log=self.path)}, then move the log away or use another path"
        try:
            head = _load_head(self.path)
        except _BadHead as e:
            raise AuditError(f"{e}; {where}") from None
        last = None
        for _, segment in reversed(numbered):
            try:
                line = _last_line(segment)
            except ValueError as e:
                raise AuditError(f"{segment} {e} (a cut write): {where}") from None
            if line is not None:
                try:
                    last = _parse_record(line)
                except ValueError as e:
                    raise AuditError(f"{segment}: the last line is not an audit record ({e}); {where}") from None
                break
        segment = numbered[-1][0] if numbered else 0
        if head is not None and ("mac" in head) != (self._key is not None):
            raise AuditError(f"{self.path} was written {'with' if 'mac' in head else 'without'} a key, "
                             f"and this writer has {'one' if self._key else 'none'}; use the log's key "
                             f"(environment variable {KEY_ENV}) or another path")
        if head is not None and self._key is not None and not hmac.compare_digest(head["mac"], _head_mac(self._key, head)):
            raise AuditError(f"{head_path(self.path)}: its MAC does not match this key (another key, or an "
                             f"edited head); {where}")
        if last is None:
            if head is not None and head["records"] > 0:
                raise AuditError(f"{self.path} holds no records but its head file says {head['records']}: "
                                 f"the log was cut; {where}")
            return 0, GENESIS, segment
        if not hmac.compare_digest(_record_digest(self._key, last), last["hash"]):
            raise AuditError(f"{self.path}: the last record ({last['n']}) does not match its hash with this "
                             f"key: the log was written with another key, or edited; {where}")
        if head is None:
            if last.get("kind") != "seal":
                raise AuditError(f"{self.path} is not sealed and its head file is missing, so a cut at "
                                 f"the end cannot be told from a crash; {where}")
        elif head["records"] > last["n"]:
            raise AuditError(f"{self.path} ends at record {last['n']} but its head file says "
                             f"{head['records']}: whole records were cut from the end; {where}")
        elif head["records"] == last["n"] and head["hash"] != last["hash"]:
            raise AuditError(f"{self.path}: record {last['n']} does not match its head file; {where}")
        return last["n"], last["hash"], segment

    # ---- public interface

    @property
    def closed(self) -> bool:
        """True after `close()`, and in a forked child (where the parent's log is disabled)."""
        return self._closed

    def append(self, record: dict) -> int:
        """Add a record to the chain and return its number (1-based); it is written with its batch."""
        if not isinstance(record, dict):
            raise TypeError(f"an audit record is a dict, got {type(record).__name__}")
        clash = [k for k in RESERVED_FIELDS if k in record]
        if clash:
            raise ValueError(f"audit record fields {', '.join(clash)} belong to the chain; rename them")
        with self._lock:
            n = self._add(record)
            if len(self._pending) >= self._batch:
                self._write_pending()
            return n

    def flush(self) -> None:
        """Write the buffered records now (one write) and update the head."""
        with self._lock:
            if not self._closed:
                self._writable()
                self._write_pending()

    def close(self) -> None:
        """Seal the chain and write what is buffered. Idempotent; a no-op in a forked child."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._failed is None:
                    self._add({"kind": "seal", "records": self._n})
                    self._write_pending()
            finally:
                self._closed = True
                _LIVE.discard(self)
                for fd in (self._fd, self._lock_fd):
                    os.close(fd)

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals (the lock is held)

    def _writable(self) -> None:
        if self._forked_from is not None:
            raise AuditError(f"{self.path}: this AuditLog belongs to process {self._forked_from}; a "
                             "forked child cannot extend its parent's chain. Open an AuditLog on a "
                             "path of the child's own")
        if self._closed:
            raise AuditError(f"{self.path}: the AuditLog is closed (and sealed); open a new one to append")
        if self._failed is not None:
            raise AuditError(f"{self.path}: an earlier write failed ({self._failed}), so the chain "
                             "on disk may be incomplete; open a new log") from self._failed

    def _add(self, record: dict) -> int:
        self._writable()
        n = self._n + 1
        body = {**record, "n": n, "prev": self._prev}
        try:
            canonical = _canonical(body)
        except (TypeError, ValueError) as e:
            raise TypeError(f"audit record {record!r:.200} is not plain JSON ({e}); use str, int, "
                            "float, bool, None, lists and dicts with str keys") from e
        body["hash"] = _digest(self._key, self._prev, canonical)
        self._pending.append(_canonical(body) + "\n")
        self._n, self._prev = n, body["hash"]
        return n

    def _write_pending(self) -> None:
        if not self._pending:
            return
        data = "".join(self._pending).encode("ascii")
        try:
            if self._segment_size and self._segment_size + len(data) > self._segment_bytes:
                os.close(self._fd)
                self._segment += 1
                self._fd = os.open(segment_path(self.path, self._segment),
                                   os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                self._segment_size = 0
            view = memoryview(data)
            while view:  # one write, unless the kernel takes less
                view = view[os.write(self._fd, view):]
            self._segment_size += len(data)
            self._pending.clear()
            self._write_head()
        except OSError as e:
            self._failed = e
            raise AuditError(f"{self.path}: writing the audit log failed ({e}); records from "
                             f"{self._n - len(self._pending) + 1} on may be lost") from e

    def _write_head(self) -> None:
        head = {"records": self._n, "hash": self._prev}
        if self._key is not None:
            head["mac"] = _head_mac(self._key, head)
        path = head_path(self.path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (_canonical(head) + "\n").encode("ascii"))
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _disown(self) -> None:
        """In a forked child: drop the parent's buffer and handles, refuse further writes."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._pending.clear()
        self._forked_from = self._pid
        self._closed = True
        for fd in (self._fd, self._lock_fd):
            try:
                os.close(fd)
            except OSError:
                pass


_LIVE: set[AuditLog] = set()  # open logs: sealed at exit, disowned in forked children


def _close_at_exit() -> None:
    for log in list(_LIVE):
        try:
            log.close()
        except Exception as e:  # at exit there is no caller left to raise to
            print(f"sandhop: the audit log {log.path} could not be sealed at exit: {e}", file=sys.stderr)


def _after_fork_in_child() -> None:
    for log in list(_LIVE):
        log._disown()
    _LIVE.clear()


atexit.register(_close_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------- verification

@dataclass(frozen=True)
class Problem:
    """One way a log differs from what its writer wrote, at the record where it shows."""

    record: int
    kind: str  # one of PROBLEM_KINDS
    message: str


@dataclass(frozen=True)
class VerifyReport:
    """The result of re-walking a log's chain. `ok` means no edit, deletion, reordering or
    truncation was found; an unsealed log can still be ok (its writer was killed)."""

    log: Path
    segments: tuple[Path, ...]
    records: int          # readable records in the segments
    intact_through: int   # records 1..intact_through are present, in order, and unaltered
    sealed: bool
    head_records: int | None
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def passed(self, require_seal: bool = False) -> bool:
        return self.ok and (self.sealed or not require_seal)

    def format(self) -> str:
        """The report as lines for a terminal: a verdict, then each problem with its record."""
        where = f"{len(self.segments)} segment{'s' if len(self.segments) != 1 else ''}"
        if self.ok and self.sealed:
            return f"{self.log}: ok, {self.records} records in {where}, sealed"
        if self.ok and not self.records:
            return f"{self.log}: ok, no records yet, not sealed (the writer flushed nothing)"
        if self.ok:
            return (f"{self.log}: ok, intact through record {self.intact_through}, not sealed "
                    "(the writer did not exit cleanly)")
        lines = [f"{self.log}: BROKEN, {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''} "
                 f"({self.records} records in {where}, intact through record {self.intact_through})"]
        lines += [f"  record {p.record}: {p.kind}: {p.message}" for p in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Line:
    segment: int         # position of its segment in the walk
    where: str           # "file:line" for messages
    raw: bytes
    record: dict | None  # None: unreadable
    defect: str = ""     # why it is unreadable, or "truncated-line"


def verify(paths: str | os.PathLike | Sequence[str | os.PathLike], *, key: bytes | None = None) -> VerifyReport:
    """Re-walk a log's chain and report every problem with its record number.

    `paths` is the log's path, whose segments (`<path>.1`, ...) and head are found beside it, or
    the log's segment files in chain order, the first being the log's path. `key` defaults to
    the SANDHOP_AUDIT_KEY environment variable, as for the writer.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("verify needs a log path")
    key = _resolve_key(key)
    log = paths[0]
    if len(paths) == 1:
        numbered = _numbered_segments(log)
    else:
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"no such audit log segment(s): {', '.join(absent)}")
        numbered = list(enumerate(paths))
    problems: list[Problem] = []
    try:
        head = _load_head(log)
    except _BadHead as e:
        head = None
        problems.append(Problem(0, "edited", f"{e}: it was damaged or replaced"))
    if not numbered and head is None and not problems:
        raise FileNotFoundError(f"{log}: no such audit log (no segment files and no head file)")

    lines = list(_read_lines(numbered))
    records = [line.record for line in lines if line.record is not None]
    hash_ok = {id(r): hmac.compare_digest(_record_digest(key, r), r["hash"]) for r in records}
    wrong_key = _wrong_key(head, key, records, hash_ok)
    if wrong_key:
        problems.append(Problem(1, "wrong-key", wrong_key))
    elif head is not None and key is not None and not hmac.compare_digest(head["mac"], _head_mac(key, head)):
        problems.append(Problem(head["records"], "edited", f"{head_path(log).name}: its MAC does not "
                                                           "match (the head file was edited)"))

    walk, intact_through = _walk(lines, numbered, log, hash_ok, check_hashes=not wrong_key)
    problems += walk
    hash_by_n: dict[int, str] = {}
    for r in records:
        hash_by_n.setdefault(r["n"], r["hash"])
    last_n = max(hash_by_n, default=0)
    sealed = bool(lines) and lines[-1].record is not None and lines[-1].record.get("kind") == "seal"

    if head is not None:
        if head["records"] > last_n:
            problems.append(Problem(last_n + 1, "truncated-tail",
                                    f"{_span(range(last_n + 1, head['records'] + 1))} missing: the head file "
                                    f"says the log holds {head['records']} records (whole records were cut "
                                    "from the end)"))
        elif head["records"] and hash_by_n.get(head["records"]) not in (None, head["hash"]):
            problems.append(Problem(head["records"], "edited",
                                    f"record {head['records']} is not the one the head file names "
                                    "(the record or the head was replaced)"))
    elif last_n and not sealed:
        problems.append(Problem(last_n + 1, "truncated-tail",
                                f"the log is not sealed and its head file {head_path(log).name} is missing, "
                                "so records cut from the end cannot be told from a crash; restore the "
                                f"head file, or treat the log as ending at record {last_n}"))
    return VerifyReport(log=log, segments=tuple(p for _, p in numbered), records=len(records),
                        intact_through=0 if wrong_key else intact_through, sealed=sealed,
                        head_records=None if head is None else head["records"],
                        problems=tuple(sorted(problems, key=lambda p: p.record)))


def _read_lines(numbered: list[tuple[int, Path]]) -> Iterator[_Line]:
    for position, (_, path) in enumerate(numbered):
        data = path.read_bytes()
        pieces = data.split(b"\n")
        for line_no, raw in enumerate(pieces, 1):
            where = f"{path.name}:{line_no}"
            if line_no == len(pieces):  # after the last newline
                if raw:
                    yield _Line(position, where, raw, None, "truncated-line")
                break
            try:
                record = _parse_record(raw)
                canonical = _canonical(record).encode("ascii") == raw
            except (ValueError, UnicodeEncodeError) as e:
                yield _Line(position, where, raw, None, f"not an audit record ({e})")
                continue
            yield _Line(position, where, raw, record, "" if canonical else "not canonical")


def records(log: str | os.PathLike) -> list[dict]:
    """Every JSON object line of a log, all its segments in chain order, without checking the
    chain or the records' fields (`verify` is the judge of those; a cut last line is left out)."""
    paths = segments(log)
    if not paths:
        raise FileNotFoundError(f"{log}: no such audit log")
    found = []
    for path in paths:
        for raw in path.read_bytes().split(b"\n"):
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                found.append(record)
    return found


def _wrong_key(head: dict | None, key: bytes | None, records: list[dict], hash_ok: dict) -> str:
    """Why the key cannot be the log's, or "" when it may be."""
    if head is not None and ("mac" in head) != (key is not None):
        if key is None:
            return (f"the log was written with a key (its head carries a MAC) and none was given: set "
                    f"{KEY_ENV}, or pass --key-env NAME, to the key it was written with")
        return (f"the log was written without a key (plain SHA-256) but a key was given: unset {KEY_ENV} "
                "or drop --key-env")
    if records and not any(hash_ok.values()):
        return ("no record matches its hash with the " + ("given key" if key else "plain SHA-256 (no key)")
                + ": the log was written with another key")
    return ""


def _walk(lines: list[_Line], numbered: list[tuple[int, Path]], log: Path, hash_ok: dict,
          check_hashes: bool) -> tuple[list[Problem], int]:
    """Problems found walking the lines in file order, and the end of the unbroken prefix."""
    present = {line.record["n"] for line in lines if line.record is not None}
    first_hash: dict[int, str] = {}
    for line in lines:
        if line.record is not None:
            first_hash.setdefault(line.record["n"], line.record["hash"])
    indices = [i for i, _ in numbered]
    gap_before = {pos: list(range(indices[pos - 1] + 1 if pos else 0, i)) for pos, i in enumerate(indices)}

    problems: list[Problem] = []
    expected, intact_through, clean, seen = 1, 0, True, set()
    entered = -1
    for line in lines:
        found: list[Problem] = []
        while entered < line.segment:
            entered += 1
            if gap_before.get(entered):
                names = ", ".join(segment_path(log, m).name for m in gap_before[entered])
                found.append(Problem(expected, "missing-segment", f"segment(s) {names} missing"))
        r = line.record
        if r is None:
            kind = "truncated-line" if line.defect == "truncated-line" else "malformed"
            message = (f"{line.where} ends in the middle of a record (a cut or interrupted write)"
                       if kind == "truncated-line" else f"{line.where} is {line.defect}")
            found.append(Problem(expected, kind, message))
            expected += 1
        else:
            n = r["n"]
            if check_hashes and not hash_ok[id(r)]:
                found.append(Problem(n, "edited", f"record {n} ({line.where}) does not match its hash: "
                                                  "its content was changed"))
            elif line.defect:
                found.append(Problem(n, "edited", f"record {n} ({line.where}) is not in the canonical form "
                                                  "the writer writes: the line was rewritten"))
            if n in seen:
                found.append(Problem(n, "duplicated", f"record {n} appears again at {line.where}"))
            elif n < expected:
                found.append(Problem(n, "reordered", f"record {n} comes after record {expected - 1} "
                                                     "(records were reordered)"))
            elif n > expected:
                skipped = range(expected, n)
                moved = [m for m in skipped if m in present]
                gone = [m for m in skipped if m not in present]
                if moved:
                    found.append(Problem(moved[0], "reordered", f"record {n} comes before record {moved[0]} "
                                                               "(records were reordered)"))
                if gone:
                    found.append(Problem(gone[0], "deleted", f"{_span(gone)} missing (deleted)"))
            if n not in seen:
                prev = GENESIS if n == 1 else first_hash.get(n - 1)
                if prev is not None and r["prev"] != prev:
                    found.append(Problem(n, "edited", f"record {n} does not link to record {n - 1} (its prev "
                                                      f"is not that record's hash): one of them was replaced"))
                if r.get("kind") == "seal" and r.get("records") != n - 1:
                    found.append(Problem(n, "edited", f"the seal at record {n} says {r.get('records')!r} "
                                                      f"records precede it"))
            seen.add(n)
            expected = max(expected, n + 1)
            if clean and not found:
                intact_through = n
        clean = clean and not found
        problems += found
    return problems, intact_through


def _span(numbers: Iterable[int]) -> str:
    """`record 4`, `records 4..6`, `records 4..6, 9`."""
    numbers = sorted(numbers)
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)
    return f"record{'s' if len(numbers) > 1 else ''} {text}"


# --------------------------------------------------------------------------- export

def export(logs: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike, *,
           key: bytes | None = None, force: bool = False) -> Path:
    """Write the decision records of audit logs as trace runs under `out_dir` (one Parquet file
    per run id, in the trace schema plus a `rule` column) and return `out_dir`. A run enforced
    with an artifact also logs every allowed event its manager scored (`event` records), so its
    export is the whole trace of what the tests did, with the risk of each event.

    Each log is verified first; a broken chain is refused unless `force`, since its records may
    have been altered. An unsealed log (a killed run) exports what it holds. Suite and run id
    come from the `session` records; a run without them is suite `audit==local`.
    """
    import pyarrow as pa

    from sandhop.datasets.traces import events_to_table, write_trace

    if isinstance(logs, (str, os.PathLike)):
        logs = [logs]
    logs = [Path(p) for p in logs]
    out_dir = Path(out_dir)
    suites: dict[str, str] = {}
    outcomes: dict[tuple[str, str], str] = {}
    decisions: dict[str, list[tuple[str, dict]]] = {}
    for log in logs:
        report = verify(log, key=key)
        if not report.ok and not force:
            shown = "; ".join(f"record {p.record}: {p.kind}" for p in report.problems[:3])
            raise AuditError(f"{log}: the chain is broken ({shown}{'; ...' if len(report.problems) > 3 else ''}), "
                             f"so its records may have been altered; {_VERIFY_HINT.format(log=log)}, "
                             "or export anyway with --force")
        run_id = None
        for line in _read_lines(list(enumerate(report.segments))):
            record = line.record
            if record is None:
                continue
            kind = record.get("kind")
            if run_id is None:
                run_id = f"audit-{record['hash'][:16]}"  # a log without session records is one run
            if kind == "session":
                run_id = str(record.get("run_id") or run_id)
                if record.get("suite"):
                    suites[run_id] = str(record["suite"])
            elif kind == "test" and record.get("test_id"):
                outcomes[(str(record.get("run_id") or run_id), record["test_id"])] = record.get("outcome", "")
            elif kind in ("decision", "event"):  # events: allowed ones a learned manager scored
                rid = str(record.get("run_id") or run_id)
                decisions.setdefault(rid, []).append((f"{log} record {record['n']}", record))
    if not decisions:
        raise AuditError(f"{', '.join(map(str, logs))}: no decision records to export")

    for run_id, rows in decisions.items():
        suite = suites.get(run_id, DEFAULT_SUITE)
        events = [_decision_event(where, record, run_id, suite, seq, outcomes)
                  for seq, (where, record) in enumerate(rows)]
        table = events_to_table(events)
        table = table.append_column("rule", pa.array([str(r.get("rule", "")) for _, r in rows], pa.string()))
        try:
            write_trace(table, out_dir, suite=suite, run_id=run_id,
                        run_info={"source": "sandhop audit export", "logs": [str(p) for p in logs],
                                  "decisions": len(rows)})
        except FileExistsError as e:
            raise AuditError(f"{e}; export into a fresh folder") from e
    return out_dir


def _decision_event(where: str, record: dict, run_id: str, suite: str, seq: int,
                    outcomes: dict[tuple[str, str], str]) -> Event:
    from sandhop.enforcement.events import Event, observed_tags, target_class

    try:
        category, target, detail = record["category"], str(record.get("target", "")), str(record.get("detail", ""))
        klass = record.get("target_class") or target_class(category, target, detail)
        test_id = str(record.get("test_id", ""))
        risk = record.get("risk")
        return Event(
            category=category, op=str(record.get("op", "")), target=target, target_class=klass,
            detail=detail, run_id=run_id, suite=suite, test_id=test_id,
            phase=record.get("phase") or "session", seq=seq, t_ns=int(record.get("t_ns", 0)),
            pid=int(record.get("pid", 0)), ppid=int(record.get("ppid", 0)),
            count=int(record.get("count", 1)), decision=str(record.get("decision", "")),
            tier=str(record.get("tier", "")), risk=None if risk is None else float(risk),
            malicious=bool(record.get("malicious", False)), attack=str(record.get("attack", "")),
            tags=tuple(dict.fromkeys((*observed_tags(category, klass), *record.get("tags", ())))),
            test_outcome=outcomes.get((run_id, test_id), ""),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise AuditError(f"{where}: this decision record cannot become a trace row ({e!r}); "
                         "the writer of the log does not follow the decision record format") from e
