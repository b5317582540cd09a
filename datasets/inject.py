"""Injection of scenario events into benign real traces: the labelled data every model learns from.

A *unit* is one episode of a trace: a test (its setup, call and teardown events) or a collector
(a test module's import, phase `collect`). For each unit, a seeded draw decides whether it hosts
an attack, a hard negative or nothing; the scenario's generated events are inserted at a
realistic point of the unit (a random position inside the phase it fires in; a slow scenario's
steps each at their own position, interleaved with the unit's own work), take the unit's test
id, process and outcome, and carry the labels: `malicious`, `attack` (the scenario id, also on a
hard negative's benign events, so analysis can find them), `tags` (observed + inferred), and the
optional columns `step` (index of the scenario step, -1 for recorded events) and `damaging`.
Recorded events keep their labels; only `seq` is renumbered (order within the run).

Every draw comes from a generator seeded by (seed, suite, run id), so one run's injection does
not depend on which other runs are injected with it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from sandhop import __version__
from sandhop.datasets import scenarios as lib
from sandhop.datasets.traces import (
    OPTIONAL_COLUMNS, TRACE_SCHEMA, TraceError, events_to_table,
    read_traces, write_trace,
)

FORMAT = 1
_TEST_PHASES = ("setup", "call", "teardown")


@dataclass(frozen=True)
class InjectConfig:
    """What to inject and how often. `mix` weights scenarios by id or `family:NAME` (default:
    every selected attack equally likely); a unit gets at most one injected scenario."""

    scenarios: str | tuple[str, ...] = "all"
    rate: float = 0.2             # fraction of units that host an attack
    hard_negative_rate: float = 0.1  # fraction of units that host a hard negative
    mix: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rate", "hard_negative_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
        if self.rate + self.hard_negative_rate > 1:
            raise ValueError(f"rate + hard_negative_rate must be <= 1 (a unit hosts one scenario), "
                             f"got {self.rate} + {self.hard_negative_rate}")
        selected = lib.select(self.scenarios)
        for key, weight in self.mix.items():
            if not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"mix weight of {key!r} must be a number >= 0, got {weight!r}")
            if not lib.select(key):
                raise lib.ScenarioError(f"mix entry {key!r} names no scenario")
            if not {s.id for s in lib.select(key)} & {s.id for s in selected}:
                raise lib.ScenarioError(f"mix entry {key!r} names no scenario of the selection "
                                        f"{self.scenarios!r}")

    def weights(self) -> tuple[list[lib.Scenario], list[float], list[lib.Scenario], list[float]]:
        """(attacks, their weights, hard negatives, their weights) of the selection."""
        chosen = lib.select(self.scenarios)
        weight = {s.id: 1.0 for s in chosen}
        for key, w in self.mix.items():
            for s in lib.select(key):
                if s.id in weight:
                    weight[s.id] = float(w)
        attacks = [s for s in chosen if s.malicious]
        benign = [s for s in chosen if not s.malicious]
        return attacks, [weight[s.id] for s in attacks], benign, [weight[s.id] for s in benign]


@dataclass
class InjectSummary:
    units: int = 0
    attacked_units: int = 0
    hard_negative_units: int = 0
    injected_events: int = 0
    malicious_events: int = 0
    by_scenario: Counter = field(default_factory=Counter)
    by_phase: Counter = field(default_factory=Counter)

    def add(self, other: "InjectSummary") -> None:
        for name in ("units", "attacked_units", "hard_negative_units", "injected_events", "malicious_events"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.by_scenario.update(other.by_scenario)
        self.by_phase.update(other.by_phase)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["by_scenario"] = dict(sorted(self.by_scenario.items()))
        d["by_phase"] = dict(sorted(self.by_phase.items()))
        return d


# --------------------------------------------------------------------------- one run

@dataclass
class _Unit:
    test_id: str
    kind: str                          # "test" or "collector"
    rows: list[int]                    # row positions in the run, in order
    phases: list[str]                  # phase of each row
    browser: bool = False              # drives a browser (has browser.request events)


def _units(table: pa.Table) -> list[_Unit]:
    """Episodes of one run, in order of their first event: tests and collectors (a test module's
    collect-phase events). Session-level rows (test id "") belong to no unit."""
    test_ids = table["test_id"].to_pylist()
    phases = table["phase"].to_pylist()
    categories = table["category"].to_pylist()
    units: dict[str, _Unit] = {}
    for row, (tid, phase, category) in enumerate(zip(test_ids, phases, categories)):
        if not tid:
            continue
        unit = units.get(tid)
        if unit is None:
            unit = units[tid] = _Unit(tid, "collector", [], [])
        unit.rows.append(row)
        unit.phases.append(phase)
        unit.browser = unit.browser or category == "browser.request"
        if phase in _TEST_PHASES:
            unit.kind = "test"
    return list(units.values())


def _fits(scenario: lib.Scenario, unit: _Unit) -> list[str]:
    """Phases of `scenario` this unit can host: collectors only collect-time payloads, tests
    everything else; what happens in a web page only in a test that drives a browser."""
    if scenario.browser and not unit.browser:
        return []
    if unit.kind == "collector":
        return ["collect"] if "collect" in scenario.phases else []
    return [p for p in scenario.phases if p in _TEST_PHASES]


def _place(unit: _Unit, phase: str, n: int, slow: bool, rng: random.Random) -> list[int]:
    """Anchor row of each of `n` events (an event goes right after its anchor; -1 is before
    the run's first row): one random row of the unit's `phase` for a burst, a sorted random row
    each for a slow scenario. A unit without events in that phase gets them where that phase
    would be: after its last earlier-phase row, else just before its first row."""
    rows = [r for r, p in zip(unit.rows, unit.phases) if p == phase]
    if not rows:
        order = ("collect",) + _TEST_PHASES
        earlier = [r for r, p in zip(unit.rows, unit.phases) if order.index(p) < order.index(phase)]
        rows = [earlier[-1] if earlier else unit.rows[0] - 1]
    if slow:
        return sorted(rng.choice(rows) for _ in range(n))
    return [rng.choice(rows)] * n


def inject_run(table: pa.Table, config: InjectConfig) -> tuple[pa.Table, InjectSummary]:
    """Inject into one run (rows of one suite and run id, in recorded order)."""
    if table.num_rows == 0:
        raise TraceError("trace table", "is empty", "inject into a recorded run that has events")
    suite, run_id = table["suite"][0].as_py(), table["run_id"][0].as_py()
    if pc.count_distinct(table["run_id"]).as_py() != 1 or pc.count_distinct(table["suite"]).as_py() != 1:
        raise ValueError("inject_run takes the rows of one run; use inject() for a dataset")
    rng = random.Random(f"{config.seed}:{suite}:{run_id}")
    attacks, attack_w, benign, benign_w = config.weights()
    summary = InjectSummary()
    pids = table["pid"].to_numpy()
    t_ns = table["t_ns"].to_numpy()
    ppids = table["ppid"].to_numpy()
    outcomes = table["test_outcome"].to_pylist()
    next_pid = int(pids.max(initial=0)) + 1
    inserted: list[tuple[tuple[int, int], dict]] = []  # ((anchor row, insertion number), event)

    for unit in _units(table):
        summary.units += 1
        u = rng.random()
        if u < config.rate:
            pool, weights = attacks, attack_w
        elif u < config.rate + config.hard_negative_rate:
            pool, weights = benign, benign_w
        else:
            continue
        fitting = [(s, w) for s, w in zip(pool, weights) if w > 0 and _fits(s, unit)]
        if not fitting:
            continue
        scenario = rng.choices([s for s, _ in fitting], [w for _, w in fitting])[0]
        phases = _fits(scenario, unit)
        present = [p for p in phases if p in unit.phases]
        phase = rng.choice(present or phases)
        events = lib.generate(scenario, rng, phase=phase)

        anchors = _place(unit, phase, len(events), scenario.slow, rng)
        host_row = max(anchors[0], unit.rows[0])
        host_pid = int(pids[host_row])
        children = sorted({e.pid for e in events if e.pid})
        child_pids = {k: next_pid + i for i, k in enumerate(children)}
        next_pid += len(children)

        rows = []
        for j, (event, anchor) in enumerate(zip(events, anchors)):
            step_gap = event.t_ns - events[j - 1].t_ns if j else 0
            d = event.as_dict()
            d.update(suite=suite, run_id=run_id, test_id=unit.test_id, t_ns=step_gap,
                     pid=child_pids.get(event.pid, host_pid),
                     ppid=host_pid if event.pid else int(ppids[host_row]),
                     test_outcome=outcomes[host_row], step=event.seq,
                     damaging=scenario.malicious and event.seq == scenario.damaging_step)
            rows.append(((anchor, summary.injected_events + j), d))
        inserted.extend(rows)
        summary.injected_events += len(rows)
        summary.by_scenario[scenario.id] += 1
        summary.by_phase[phase] += 1
        if scenario.malicious:
            summary.attacked_units += 1
            summary.malicious_events += len(rows)
        else:
            summary.hard_negative_units += 1

    _timestamps(inserted, t_ns)
    return _merge(table, inserted), summary


def _timestamps(inserted: list[tuple[tuple[int, int], dict]], t_ns: np.ndarray) -> None:
    """Give inserted events times inside the gap after their anchor row, so time stays ordered:
    generated spacing where the gap allows, else evenly squeezed (`t_ns` holds each event's
    generated spacing from the one before it)."""
    by_anchor: dict[int, list[dict]] = {}
    for (anchor, _), d in sorted(inserted, key=lambda kd: kd[0]):
        by_anchor.setdefault(anchor, []).append(d)
    for anchor, group in by_anchor.items():
        start = int(t_ns[max(anchor, 0)])
        gap = max(int(t_ns[anchor + 1]) - start, 0) if anchor + 1 < len(t_ns) else 10**9
        spent = 0
        for rank, d in enumerate(group):
            spent += d["t_ns"]
            d["t_ns"] = start + min(spent, gap * (rank + 1) // (len(group) + 1))


def _merge(table: pa.Table, inserted: list[tuple[tuple[int, int], dict]]) -> pa.Table:
    """Recorded rows and inserted rows in one order (inserted after their anchor row), seq
    renumbered, with the label columns `step` and `damaging`."""
    base = _with_labels(table)
    if not inserted:
        return base.set_column(base.schema.get_field_index("seq"), "seq", pa.array(np.arange(base.num_rows, dtype=np.int64)))
    keys = [k for k, _ in inserted]
    rows = [d for _, d in inserted]
    from sandhop.enforcement.events import Event, EVENT_FIELDS
    extra = events_to_table(Event(**{k: d[k] for k in EVENT_FIELDS}) for d in rows)
    extra = extra.append_column(pa.field("step", OPTIONAL_COLUMNS["step"], nullable=False),
                                pa.array([d["step"] for d in rows], OPTIONAL_COLUMNS["step"]))
    extra = extra.append_column(pa.field("damaging", OPTIONAL_COLUMNS["damaging"], nullable=False),
                                pa.array([d["damaging"] for d in rows], OPTIONAL_COLUMNS["damaging"]))
    extra = extra.select(base.column_names).cast(base.schema)
    merged = pa.concat_tables([base, extra])
    # recorded row r sorts as (r, -1); an event inserted after it as (r, its insertion number)
    anchor = np.concatenate([np.arange(base.num_rows), np.array([k[0] for k in keys])])
    number = np.concatenate([np.full(base.num_rows, -1), np.array([k[1] for k in keys])])
    order = np.lexsort((number, anchor))
    merged = merged.take(pa.array(order))
    return merged.set_column(merged.schema.get_field_index("seq"), "seq",
                             pa.array(np.arange(merged.num_rows, dtype=np.int64)))


def _with_labels(table: pa.Table) -> pa.Table:
    """`table` with the columns `step` (-1: a recorded event) and `damaging`, and no others after
    the Event fields."""
    from sandhop.enforcement.events import EVENT_FIELDS
    cols = {n: table[n] for n in EVENT_FIELDS}
    n = table.num_rows
    step = table["step"] if "step" in table.column_names else pa.array(np.full(n, -1, dtype=np.int32))
    damaging = table["damaging"] if "damaging" in table.column_names else pa.array(np.zeros(n, dtype=bool))
    schema = TRACE_SCHEMA.append(pa.field("step", OPTIONAL_COLUMNS["step"], nullable=False)) \
                         .append(pa.field("damaging", OPTIONAL_COLUMNS["damaging"], nullable=False))
    return pa.Table.from_arrays([*cols.values(), step, damaging], schema=schema)


# --------------------------------------------------------------------------- datasets

def runs(table: pa.Table) -> Iterable[tuple[str, str, pa.Table]]:
    """(suite, run id, rows in recorded order) for each run of a trace table."""
    keys = sorted(set(zip(table["suite"].to_pylist(), table["run_id"].to_pylist())))
    for suite, run_id in keys:
        mask = pc.and_(pc.equal(table["suite"], suite), pc.equal(table["run_id"], run_id))
        run = table.filter(mask)
        yield suite, run_id, run.take(pc.sort_indices(run, sort_keys=[("seq", "ascending")]))


def inject(table: pa.Table, config: InjectConfig) -> tuple[list[tuple[str, str, pa.Table]], InjectSummary]:
    """Inject into every run of `table`: [(suite, run id, labelled run)], and the totals."""
    if table.num_rows == 0:
        raise TraceError("trace table", "is empty", "pass traces that hold at least one event")
    out, total = [], InjectSummary()
    for suite, run_id, run in runs(table):
        labelled, summary = inject_run(run, config)
        out.append((suite, run_id, labelled))
        total.add(summary)
    return out, total


def inject_dir(traces: str | Path, out: str | Path, config: InjectConfig, *,
               suites: Iterable[str] | None = None, progress: bool = False) -> dict:
    """Read a trace dataset, inject, write the labelled dataset (same layout) and its
    `inject.json` manifest into `out`, which must not hold a dataset already. Returns the
    manifest."""
    out = Path(out)
    if (out / "inject.json").exists() or any(out.glob("suite=*/run-*.parquet")):
        raise FileExistsError(f"{out} already holds a dataset; choose another --out or delete it")
    table = read_traces(traces, suites=suites)
    results, summary = inject(table, config)
    files = []
    for suite, run_id, labelled in tqdm(results, desc="writing runs", unit="run", leave=False, disable=not progress):
        path = write_trace(labelled, out, suite=suite, run_id=run_id,
                           run_info={"injected": True, "seed": config.seed})
        files.append(str(path.relative_to(out)))
    manifest = {
        "format": FORMAT, "sandhop": __version__, "traces": str(traces),
        "config": {**asdict(config), "mix": dict(config.mix),
                   "scenarios": config.scenarios if isinstance(config.scenarios, str) else list(config.scenarios)},
        "scenario_library": library_fingerprint(),
        "files": files, "summary": summary.as_dict(),
    }
    (out / "inject.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def library_fingerprint() -> str:
    """Changes whenever a scenario or a variation pool changes (cached datasets are rebuilt)."""
    text = repr((lib.SCENARIOS, sorted(lib.POOLS.items())))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_mix(text: str | None) -> dict[str, float]:
    """`id=w,family:NAME=w` from the command line."""
    mix: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.rpartition("=")
        try:
            if not sep:
                raise ValueError
            mix[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--mix entry {item!r} is not NAME=WEIGHT (e.g. dns-tunnel=2,family:persistence=0.5)") from None
    return mix

