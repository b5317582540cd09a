"""ADFA-LD system-call traces: the loader, the conversion into sandhop events, and the STIDE
baseline with the dataset's evaluation protocol (see ../shared/data/adfa-ld/README.md).

Reads any folder or zip in the ADFA-LD layout: `Training_Data_Master/*.txt`,
`Validation_Data_Master/*.txt` and `Attack_Data_Master/<Family>_<run>/*.txt`, either at the root
or under one top folder (the dev zip has `ADFA-LD/`). Each file is one trace of space-separated
i386 syscall numbers.

    python -m sandhop.datasets.adfa [--path P] [--n 6]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from sandhop.enforcement.events import Event

SUITE = "adfa-ld"
CATEGORY = "syscall"
ENV_VAR = "SANDHOP_ADFA_LD"
DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "adfa-ld"
DEFAULT_PATH = DATA_DIR / "ADFA-LD-dev.zip"
SYSCALL_TABLE = "syscalls-i386.tsv"

# split name -> folder name, in the order traces are returned
SPLITS: dict[str, str] = {
    "training": "Training_Data_Master",
    "validation": "Validation_Data_Master",
    "attack": "Attack_Data_Master",
}
_FOLDER_SPLIT = {folder: split for split, folder in SPLITS.items()}
_RUN_SUFFIX = re.compile(r"_\d+$")  # Attack_Data_Master/Adduser_8 -> family Adduser, run 8
_FIX_PATH = (f"pass path=... (CLI: --path), set {ENV_VAR}, or put the dev zip at "
             f"{os.path.normpath(DEFAULT_PATH)}")


class AdfaError(ValueError):
    """An ADFA-LD source that cannot be read: says which path, what is wrong, and the fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem}; {fix}")


@dataclass(frozen=True)
class Trace:
    """One ADFA-LD trace file. `family` is the attack family (`Adduser`), "" for normal traces;
    `run` is the attack folder (`Adduser_8`), "" for normal traces."""

    split: str
    family: str
    run: str
    name: str
    syscalls: np.ndarray = field(compare=False, repr=False)

    @property
    def malicious(self) -> bool:
        return self.split == "attack"


# --------------------------------------------------------------------------- loading

def resolve_path(path: str | os.PathLike | None = None) -> Path:
    """The source to read: `path`, else $SANDHOP_ADFA_LD, else the dev zip beside the repository."""
    chosen = path if path is not None else os.environ.get(ENV_VAR) or DEFAULT_PATH
    resolved = Path(chosen).expanduser()
    if not resolved.exists():
        raise AdfaError(resolved, "no ADFA-LD folder or zip at this path", _FIX_PATH)
    return resolved.resolve()


def load_adfa(path: str | os.PathLike | None = None) -> list[Trace]:
    """Every trace of an ADFA-LD folder or zip, ordered by split (training, validation,
    attack), then attack run folder, then file name."""
    source = resolve_path(path)
    if source.is_dir():
        members = {p.relative_to(source).as_posix(): p for p in source.rglob("*") if p.is_file()}
        traces = _parse_members(source, members, lambda p: p.read_bytes(), lambda m: members[m])
    else:
        try:
            archive = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError) as e:
            raise AdfaError(source, f"neither a folder nor a readable zip ({e})",
                            "point at the ADFA-LD folder or at an intact copy of its zip") from e
        with archive:
            members = {i.filename: i for i in archive.infolist() if not i.is_dir()}
            traces = _parse_members(source, members, archive.read, lambda m: f"{source}!{m}")
    return traces


def _parse_members(source: Path, members: dict, read, where) -> list[Trace]:
    """Traces from `relative posix path -> handle` of a folder or zip, after finding the root
    that holds the three split folders."""
    names = [m for m in members if not _ignored(m)]
    root = _find_root(source, names)
    traces = []
    for member in names:
        if not member.startswith(root):
            continue
        parts = member[len(root):].split("/")
        split = _FOLDER_SPLIT.get(parts[0])
        if split is None or not parts[-1].endswith(".txt"):
            continue
        if split == "attack":
            if len(parts) != 3:
                raise AdfaError(where(member), "an attack trace outside an attack-family folder",
                                f"put attack traces in {SPLITS['attack']}/<Family>_<run>/")
            run, family = parts[1], _RUN_SUFFIX.sub("", parts[1])
        elif len(parts) == 2:
            run = family = ""
        else:
            continue
        syscalls = _parse_trace(read(members[member]), where(member))
        traces.append(Trace(split, family, run, parts[-1], syscalls))
    order = {s: i for i, s in enumerate(SPLITS)}
    traces.sort(key=lambda t: (order[t.split], t.run, t.name))
    return traces


def _ignored(member: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in member.split("/"))


def _find_root(source: Path, names: Sequence[str]) -> str:
    """The prefix ("" or "TOP/") under which the three split folders live."""
    for root in sorted({""} | {n.split("/", 1)[0] + "/" for n in names if "/" in n}, key=len):
        found = {folder for folder in SPLITS.values()
                 if any(n.startswith(f"{root}{folder}/") for n in names)}
        if found:
            missing = [f for f in SPLITS.values() if f not in found]
            if missing:
                raise AdfaError(source, f"ADFA-LD layout is incomplete under '{root or './'}': "
                                f"no {', '.join(missing)}", "an ADFA-LD source holds "
                                f"{', '.join(SPLITS.values())} (attack traces in family folders)")
            return root
    raise AdfaError(source, "not in ADFA-LD layout: no Training_Data_Master, "
                    "Validation_Data_Master or Attack_Data_Master folder at its top or one level down",
                    "point at the folder or zip that holds these three folders")


def _parse_trace(raw: bytes, where: str) -> np.ndarray:
    tokens = raw.split()
    bad = next((t for t in tokens if not t.isdigit()), None)
    if bad is not None or not tokens:
        problem = (f"unparsable trace: token {bad[:20].decode('ascii', 'replace')!r} is not a syscall number" if bad is not None
                   else "unparsable trace: the file is empty")
        raise AdfaError(where, problem, "an ADFA-LD trace is space-separated decimal syscall "
                        "numbers; replace the file with an intact copy or remove it")
    return np.array([int(t) for t in tokens], dtype=np.int32)


def syscall_names(table: str | os.PathLike | None = None) -> dict[int, str]:
    """The i386 syscall number -> name map (`syscalls-i386.tsv`, shipped beside the data)."""
    source = Path(table) if table is not None else DATA_DIR / SYSCALL_TABLE
    try:
        lines = source.read_text().splitlines()
    except OSError as e:
        raise AdfaError(source, f"cannot read the syscall table ({e.strerror or e})",
                        f"pass table=... pointing at {SYSCALL_TABLE} from the ADFA-LD data folder") from e
    names = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        number, _, name = line.partition("\t")
        if not number.strip().isdigit() or not name.strip():
            raise AdfaError(f"{source}:{i}", f"expected 'number<TAB>name', got {line[:40]!r}",
                            f"restore {SYSCALL_TABLE} from the ADFA-LD data folder")
        names[int(number)] = name.strip()
    return names


def _name(names: dict[int, str], number: int) -> str:
    return names.get(number, f"syscall_{number}")  # numbers missing from the table stay visible


# --------------------------------------------------------------------------- events

def to_events(traces: Iterable[Trace], names: dict[int, str] | None = None) -> Iterator[Event]:
    """One `syscall` event per call, in trace order: op and target are the i386 syscall name
    (`syscall_<n>` when the table lacks it), detail its number, seq its position, test_id the
    trace file, run_id the split, and attack traces are malicious with attack = family."""
    names = syscall_names() if names is None else names
    for trace in traces:
        for seq, number in enumerate(trace.syscalls.tolist()):
            name = _name(names, number)
            yield Event(CATEGORY, name, name, CATEGORY, detail=str(number), run_id=trace.split,
                        suite=SUITE, test_id=trace.name, phase="call", seq=seq,
                        malicious=trace.malicious, attack=trace.family)


def to_table(traces: Sequence[Trace], names: dict[int, str] | None = None):
    """The same rows as `events_to_table(to_events(traces))`, built column-wise (millions of
    calls), and validated against the trace schema."""
    import pyarrow as pa

    from sandhop.datasets.traces import TRACE_SCHEMA, validate_trace

    names = syscall_names() if names is None else names
    lengths = np.array([len(t.syscalls) for t in traces], dtype=np.int64)
    calls = np.concatenate([t.syscalls for t in traces]) if traces else np.zeros(0, np.int32)
    numbers, index = np.unique(calls, return_inverse=True)
    text = pa.DictionaryArray.from_arrays(
        pa.array(index.astype(np.int32)), pa.array([_name(names, int(n)) for n in numbers])
    ).cast(pa.string())
    detail = pa.DictionaryArray.from_arrays(
        pa.array(index.astype(np.int32)), pa.array([str(int(n)) for n in numbers])).cast(pa.string())

    def per_trace(values: list, type_) -> pa.Array:
        codes = np.repeat(np.arange(len(traces), dtype=np.int32), lengths)
        return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(values, type_)).cast(type_)

    rows = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    constant = lambda value, type_: pa.array(np.full(rows, value), type_)  # noqa: E731
    columns = {
        "category": pa.array([CATEGORY] * rows, pa.string()),
        "op": text, "target": text,
        "target_class": pa.array([CATEGORY] * rows, pa.string()),
        "detail": detail,
        "run_id": per_trace([t.split for t in traces], pa.string()),
        "suite": pa.array([SUITE] * rows, pa.string()),
        "test_id": per_trace([t.name for t in traces], pa.string()),
        "phase": pa.array(["call"] * rows, pa.string()),
        "seq": pa.array(np.arange(rows, dtype=np.int64) - starts, pa.int64()),
        "t_ns": constant(0, pa.int64()), "pid": constant(0, pa.int32()),
        "ppid": constant(0, pa.int32()), "count": constant(1, pa.int32()),
        "decision": pa.array([""] * rows, pa.string()), "tier": pa.array([""] * rows, pa.string()),
        "risk": pa.nulls(rows, pa.float32()),
        "malicious": per_trace([t.malicious for t in traces], pa.bool_()),
        "attack": per_trace([t.family for t in traces], pa.string()),
        "tags": pa.ListArray.from_arrays(pa.array(np.zeros(rows + 1, np.int32)), pa.array([], pa.string())),
        "test_outcome": pa.array([""] * rows, pa.string()),
    }
    table = pa.Table.from_arrays([columns[f.name] for f in TRACE_SCHEMA], schema=TRACE_SCHEMA)
    return validate_trace(table, f"ADFA-LD ({len(traces)} traces)")


# --------------------------------------------------------------------------- STIDE

@dataclass(frozen=True)
class Stide:
    """STIDE (Forrest et al. 1996): the set of n-grams seen in normal training traces."""

    n: int
    grams: frozenset


def ngrams(syscalls: np.ndarray | Sequence[int], n: int) -> list[tuple[int, ...]]:
    """Every length-n window of a trace, in order. A trace shorter than n is one gram, the whole
    trace, so short traces are scored too (they match only an identical short training trace)."""
    calls = list(np.asarray(syscalls).tolist())
    if len(calls) < n:
        return [tuple(calls)]
    return list(zip(*(calls[i:] for i in range(n))))


def fit_stide(training: Iterable[Trace | np.ndarray | Sequence[int]], n: int = 6) -> Stide:
    """Learn the n-gram set of the normal training traces (the only data STIDE sees)."""
    if n < 1:
        raise ValueError(f"STIDE needs n >= 1, got {n}")
    grams: set = set()
    for trace in training:
        grams.update(ngrams(getattr(trace, "syscalls", trace), n))
    return Stide(n, frozenset(grams))


def stide_score(model: Stide, trace: Trace | np.ndarray | Sequence[int]) -> float:
    """The fraction of the trace's windows (positions, repeats counted) never seen in training."""
    windows = ngrams(getattr(trace, "syscalls", trace), model.n)
    return sum(w not in model.grams for w in windows) / len(windows)


# --------------------------------------------------------------------------- evaluation

def evaluate(scores_normal: Sequence[float], scores_attack: Sequence[float]) -> dict:
    """The README protocol, higher score = more anomalous: ROC-AUC (rank statistic, ties count
    half), detection rate at 1% and 5% false-positive rate, false-positive rate at 90% detection.

    Operating points flag `score >= t` for every observed score t (and t = +inf, flagging
    nothing); tied scores are never split, so each figure is the best a real threshold reaches:
    the highest detection with FPR <= the budget, the lowest FPR with detection >= 90%.
    """
    normal = np.asarray(scores_normal, dtype=np.float64).ravel()
    attack = np.asarray(scores_attack, dtype=np.float64).ravel()
    if normal.size == 0 or attack.size == 0:
        raise ValueError(f"evaluate needs normal and attack scores, got {normal.size} normal "
                         f"and {attack.size} attack")
    if np.isnan(normal).any() or np.isnan(attack).any():
        raise ValueError("evaluate got NaN scores; score every trace with a number")

    both = np.concatenate([normal, attack])
    values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    mid_rank = last - (counts - 1) / 2.0  # 1-based rank, the mean over a tie
    attack_ranks = mid_rank[inverse.ravel()][normal.size:].sum()
    auc = (attack_ranks - attack.size * (attack.size + 1) / 2.0) / (attack.size * normal.size)

    thresholds = np.append(values, np.inf)
    fpr = 1.0 - np.searchsorted(np.sort(normal), thresholds, side="left") / normal.size
    tpr = 1.0 - np.searchsorted(np.sort(attack), thresholds, side="left") / attack.size
    eps = 1e-12  # budgets like 1% of n normals are exact in decimal, not in binary
    return {
        "roc_auc": float(auc),
        "detection_at_1pct_fpr": float(tpr[fpr <= 0.01 + eps].max()),
        "detection_at_5pct_fpr": float(tpr[fpr <= 0.05 + eps].max()),
        "fpr_at_90pct_detection": float(fpr[tpr >= 0.90 - eps].min()),
        "n_normal": int(normal.size),
        "n_attack": int(attack.size),
    }


def run_stide(traces: Sequence[Trace], n: int = 6) -> dict:
    """Fit on the training split, score validation normals and attacks, evaluate; per-family
    ROC-AUC as well (each family against all validation normals)."""
    model = fit_stide((t for t in traces if t.split == "training"), n)
    normal = [stide_score(model, t) for t in traces if t.split == "validation"]
    attacks = [(t.family, stide_score(model, t)) for t in traces if t.split == "attack"]
    metrics = {"n": n, "distinct_training_grams": len(model.grams),
               **evaluate(normal, [s for _, s in attacks])}
    metrics["roc_auc_by_family"] = {
        family: evaluate(normal, [s for f, s in attacks if f == family])["roc_auc"]
        for family in sorted({f for f, _ in attacks})}
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandhop.datasets.adfa",
                                     description="STIDE on ADFA-LD with the dataset's protocol")
    parser.add_argument("--path", default=None, help=f"ADFA-LD folder or zip (default: ${ENV_VAR} "
                        f"or {os.path.normpath(DEFAULT_PATH)})")
    parser.add_argument("--n", type=int, default=6, help="n-gram length (default 6)")
    args = parser.parse_args(argv)
    try:
        traces = load_adfa(args.path)
    except AdfaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {s: sum(t.split == s for t in traces) for s in SPLITS}
    metrics = {"source": str(resolve_path(args.path)), "traces": counts, **run_stide(traces, args.n)}
    print(f"ADFA-LD {metrics['source']}: " + ", ".join(f"{s} {c}" for s, c in counts.items()))
    print(f"STIDE n={args.n}: {metrics['distinct_training_grams']} distinct training grams")
    print(f"  ROC-AUC                     {metrics['roc_auc']:.3f}")
    print(f"  detection at 1% FPR         {metrics['detection_at_1pct_fpr']:.3f}")
    print(f"  detection at 5% FPR         {metrics['detection_at_5pct_fpr']:.3f}")
    print(f"  FPR at 90% detection        {metrics['fpr_at_90pct_detection']:.3f}")
    for family, auc in metrics["roc_auc_by_family"].items():
        print(f"  ROC-AUC {family:<20}{auc:.3f}")
    print(json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
