"""The feature spec: how one event becomes the integers the risk model embeds.

One versioned object, shared by training (JAX) and the runtime (numpy only): this module imports
nothing but numpy and the event model. An event becomes a row of `N_FIXED + pieces` integers:

    category, op, target class, phase, time-delta bucket, hashed target pieces...

Vocabularies are closed (category, class, phase: from `sandhop.enforcement.events`) or fitted on
training data (`ops`: every op seen, index 1 = unknown). Target pieces are path segments, domain
labels, argv[0], module parts or variable names, hashed (crc32, stable across processes) into
`piece_buckets`; in path segments and command words, numbers and `tempfile`'s random names are
one token each (version 2), so a piece says the same in every run. 0 is padding everywhere. The
spec is stored as JSON beside every checkpoint and artifact; `fingerprint()` names it, and a
checkpoint refuses data encoded under another spec.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Iterable, Mapping, Sequence

import numpy as np

from sandhop.enforcement.events import CATEGORIES, INFERRED_TAGS, PHASES, TARGET_CLASSES, split_address

FEATURE_VERSION = 2
# Parts of names that differ between runs of the same test: `tempfile`'s `tmpXXXXXXXX`, and
# numbers (pytest's `pytest-1066/test_x0`, pids, ports in arguments). Version 1 hashed them as
# they were, so one test's risk moved with the random name of its temporary file.
_RUN_SPECIFIC = re.compile(r"\btmp[a-z0-9_]{8}\b|[0-9]+")
PAD, UNK = 0, 1
FIXED = ("category", "op", "target_class", "phase", "dt")
N_FIXED = len(FIXED)


class FeatureError(ValueError):
    """Data and spec do not fit together (another version, another vocabulary)."""


@dataclass(frozen=True)
class FeatureSpec:
    version: int = FEATURE_VERSION
    categories: tuple[str, ...] = CATEGORIES
    target_classes: tuple[str, ...] = TARGET_CLASSES
    phases: tuple[str, ...] = PHASES
    ops: tuple[str, ...] = ()            # fitted; id = 2 + index (0 pad, 1 unknown)
    tags: tuple[str, ...] = INFERRED_TAGS
    pieces: int = 4                      # hashed target pieces per event
    piece_buckets: int = 4096
    dt_buckets: int = 16                 # log2 buckets of microseconds since the previous event

    # ---- sizes of the embedding tables (0 = padding is included)
    @property
    def n_categories(self) -> int:
        return len(self.categories) + 1

    @property
    def n_ops(self) -> int:
        return len(self.ops) + 2

    @property
    def n_classes(self) -> int:
        return len(self.target_classes) + 1

    @property
    def n_phases(self) -> int:
        return len(self.phases) + 1

    @property
    def width(self) -> int:
        return N_FIXED + self.pieces

    # ---- construction and identity
    @classmethod
    def fit(cls, ops: Iterable[str], **settings) -> "FeatureSpec":
        """A spec whose op vocabulary is every op in `ops` (sorted, so the order is stable)."""
        return cls(ops=tuple(sorted(set(ops))), **settings)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | Mapping) -> "FeatureSpec":
        data = json.loads(text) if isinstance(text, str) else dict(text)
        if data.get("version") != FEATURE_VERSION:
            raise FeatureError(f"feature spec version {data.get('version')!r}; this sandhop reads version "
                               f"{FEATURE_VERSION}: retrain, or use the sandhop that wrote it")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        except TypeError as exc:
            raise FeatureError(f"feature spec has unknown fields: {exc}") from None

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def check_compatible(self, other: "FeatureSpec", what: str = "the data") -> None:
        """Raise unless `other` encodes events exactly as this spec does."""
        if self.fingerprint() != other.fingerprint():
            diff = [k for k in asdict(self) if getattr(self, k) != getattr(other, k)]
            raise FeatureError(f"{what} was encoded with another feature spec (differs in {', '.join(diff)}; "
                               f"{other.fingerprint()} vs {self.fingerprint()}): encode it with the "
                               "checkpoint's spec, or retrain")

    # ---- encoding
    @cached_property
    def _index(self) -> tuple[dict, dict, dict, dict]:
        return ({c: i + 1 for i, c in enumerate(self.categories)}, {c: i + 1 for i, c in enumerate(self.target_classes)},
                {p: i + 1 for i, p in enumerate(self.phases)}, {o: i + 2 for i, o in enumerate(self.ops)})

    def _fill(self, out: np.ndarray, cat: str, op: str, target: str, cls: str, phase: str, where: str) -> None:
        cat_ix, cls_ix, ph_ix, op_ix = self._index
        try:
            out[0], out[2], out[3] = cat_ix[cat], cls_ix[cls], ph_ix[phase]
        except KeyError as exc:
            raise FeatureError(f"{where}: {exc.args[0]!r} is not in the spec's vocabulary "
                               "(an event model newer than the spec): retrain with this sandhop") from None
        out[1] = op_ix.get(op, UNK)
        for j, piece in enumerate(target_pieces(cat, target)[: self.pieces]):
            out[N_FIXED + j] = 1 + zlib.crc32(piece.encode("utf-8", "backslashreplace")) % (self.piece_buckets - 1)

    def encode(self, events: Mapping[str, Sequence]) -> np.ndarray:
        """Integer features [n, width] of events given as columns (category, op, target,
        target_class, phase, t_ns), in order. The first event's time delta is bucket 0."""
        n = len(events["category"])
        out = np.zeros((n, self.width), dtype=np.int32)
        t = np.asarray(events["t_ns"], dtype=np.int64)
        dt = np.diff(t, prepend=t[:1] if n else t)
        out[:, 4] = dt_bucket(dt, self.dt_buckets)
        for i, (cat, op, target, cls, phase) in enumerate(zip(
                events["category"], events["op"], events["target"], events["target_class"], events["phase"])):
            self._fill(out[i], cat, op, target, cls, phase, f"event {i}")
        return out

    def encode_event(self, category: str, op: str, target: str, target_class: str, phase: str) -> np.ndarray:
        """One event's features [width] without its time delta (column 4 is 0): what the runtime
        encodes as events happen, and may cache (the same operation recurs)."""
        out = np.zeros(self.width, dtype=np.int32)
        self._fill(out, category, op, target, target_class, phase, "event")
        return out

    def tag_matrix(self, tags: Sequence[Sequence[str]]) -> np.ndarray:
        """Multi-hot inferred tags [n, len(self.tags)] (observed tags are ignored)."""
        index = {t: i for i, t in enumerate(self.tags)}
        out = np.zeros((len(tags), len(self.tags)), dtype=np.float32)
        for i, row in enumerate(tags):
            for t in row:
                if t in index:
                    out[i, index[t]] = 1.0
        return out


def dt_bucket(dt_ns: np.ndarray, buckets: int) -> np.ndarray:
    """1 + log2(microseconds + 1), clipped into [1, buckets - 1] (0 is padding)."""
    us = np.maximum(np.asarray(dt_ns, dtype=np.float64), 0) / 1e3
    return np.clip(1 + np.floor(np.log2(us + 1)), 1, buckets - 1).astype(np.int32)


def dt_bucket_one(dt_ns: int, buckets: int) -> int:
    """`dt_bucket` of one time delta (the runtime's per-event path; the same float64 steps)."""
    return int(min(max(1 + math.floor(math.log2(max(dt_ns, 0) / 1e3 + 1)), 1), buckets - 1))


def stable(word: str) -> str:
    """`word` with its run-specific parts (`_RUN_SPECIFIC`) replaced by one token each."""
    return _RUN_SPECIFIC.sub(lambda m: "#" if m.group()[0].isdigit() else "tmp~", word)


def target_pieces(category: str, target: str) -> list[str]:
    """The parts of a target that say what it is: a path's first two and last two segments, a
    host's last three labels (or its port), argv[0] and the first argument, a module's parts, an
    environment variable's name. Prefixed by family, so `ssh` the path part is not `ssh` the
    domain label."""
    family = category.split(".", 1)[0]
    if not target:
        return []
    if family == "fs" or (category == "code.native" and "/" in target):
        parts = [p for p in target.split("/") if p]
        picked = parts[:2] + [p for p in parts[-2:] if p not in parts[:2]]
        return ["p:" + stable(p) for p in picked]
    if category in ("net.connect", "net.bind", "net.send"):
        host, port = split_address(target)
        return ["port:" + port] + ["h:" + label for label in host.split(".")[::-1][:3] if not host[:1].isdigit()]
    if category == "net.dns":
        return ["h:" + label for label in target.split(".")[::-1][:3]]
    if category == "proc.spawn":
        words = target.replace("'", " ").split()
        return ["x:" + stable(words[0].rsplit("/", 1)[-1])] + ["a:" + stable(w) for w in words[1:2]] if words else []
    if family == "env":
        return ["e:" + target] + ["e:" + w for w in target.split("_")[:2]]
    if family == "code":
        return ["m:" + p for p in target.replace("/", ".").split(".")[:3]]
    return ["t:" + target[:64]]


def fit_spec(tables: Iterable[Mapping[str, Sequence]], **settings) -> FeatureSpec:
    """The spec fitted on training data: its op vocabulary."""
    ops: set[str] = set()
    for t in tables:
        ops.update(t["op"])
    return FeatureSpec.fit(ops, **settings)


@dataclass
class Encoded:
    """Encoded episodes (tests) of a dataset, with their labels, as ragged lists."""

    spec: FeatureSpec
    keys: list[tuple[str, str, str]] = field(default_factory=list)   # (suite, run_id, test_id)
    features: list[np.ndarray] = field(default_factory=list)        # [n, width] int32
    malicious: list[np.ndarray] = field(default_factory=list)       # [n] float32
    tags: list[np.ndarray] = field(default_factory=list)            # [n, n_tags] float32
    damaging: list[np.ndarray] = field(default_factory=list)        # [n] bool
    attack: list[str] = field(default_factory=list)                 # scenario id of the episode, "" if none

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, indices) -> "Encoded":
        """The given episodes only, in that order."""
        picked = {f.name: [getattr(self, f.name)[int(i)] for i in indices] for f in fields(self) if f.name != "spec"}
        return Encoded(self.spec, **picked)


def encode_episodes(columns: Mapping[str, Sequence], spec: FeatureSpec, *, min_events: int = 1) -> Encoded:
    """Split a trace (columns as lists, rows in order of suite, run, seq) into episodes (one per
    test or collector; session rows are dropped) and encode each."""
    n = len(columns["category"])
    keys = list(zip(columns["suite"], columns["run_id"], columns["test_id"]))
    order = sorted(range(n), key=lambda i: (keys[i], columns["seq"][i]))
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i in order:
        if keys[i][2]:
            groups.setdefault(keys[i], []).append(i)
    out = Encoded(spec)
    has_damaging = "damaging" in columns
    for key, rows in groups.items():
        if len(rows) < min_events:
            continue
        sub = {c: [columns[c][i] for i in rows] for c in ("category", "op", "target", "target_class", "phase", "t_ns")}
        out.keys.append(key)
        out.features.append(spec.encode(sub))
        out.malicious.append(np.array([bool(columns["malicious"][i]) for i in rows], dtype=np.float32))
        out.tags.append(spec.tag_matrix([columns["tags"][i] for i in rows]))
        out.damaging.append(np.array([bool(columns["damaging"][i]) if has_damaging else False for i in rows]))
        attacks = [columns["attack"][i] for i in rows if columns["malicious"][i]]
        out.attack.append(attacks[0] if attacks else "")
    return out


def windows(length: int, context: int, stride: int | None = None) -> list[tuple[int, int]]:
    """[start, end) crops of an episode of `length` events: the whole of it when it fits, else
    overlapping windows of `context` events (stride half a window) that cover every event."""
    if length <= context:
        return [(0, length)]
    stride = stride or max(1, context // 2)
    starts = list(range(0, length - context + 1, stride))
    if starts[-1] != length - context:
        starts.append(length - context)
    return [(s, s + context) for s in starts]


def ceil_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))
