"""`sandhop learn --logs AUDIT_LOG... --from ARTIFACT --out NEW_ARTIFACT`: the learning loop.

Audit logs of runs enforced with an artifact hold every event the manager scored (DESIGN 3.8),
so each becomes a trace (`sandhop audit export`). Labels:

- a suite's own tests are benign: every event of them. A denied step in a test that then failed
  is a **candidate false block**: the test broke because the sandbox was too strict, and the
  step is now labelled benign in training (counted in the report);
- the live attack probes keep their labels: in a probe's test, the events that match its
  scenario's steps (`probe.match_steps`) are malicious, its damaging step marked; the hard
  negatives are benign.

The new traces join the artifact's training dataset: its suites are added to the train split (a
suite that was in val or test moves to train; the report says so), and scenarios are injected
into them as into the rest. The risk model and the manager are retrained warm-started from the
artifact (`sandhop-train-risk init=`, `sandhop-train-agent init=`), exported as the next
artifact, and both artifacts are compared by replaying recorded traces through the runtime and
the engine (`Manager.replay`): the held-out test split, and the new logs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sandhop.enforcement.runtime import MANIFEST, Artifact, Manager, sha256_file


class LearnError(ValueError):
    """Logs or artifacts the learning loop cannot use (says what and how to fix it)."""


UNLABELLED = "unlabelled:"   # the attack column of a probe attack whose steps were not found


# --------------------------------------------------------------------------- logs -> labelled traces

@dataclass
class LogSummary:
    suite: str
    run_id: str
    tests: int = 0
    failed: list[str] = field(default_factory=list)
    false_blocks: int = 0               # denied events in tests that then failed
    attacks: dict[str, str] = field(default_factory=dict)   # probe test -> scenario (labelled)
    unlabelled: list[str] = field(default_factory=list)     # probe tests whose steps did not match


def labelled_traces(logs: Sequence[str | Path], out: Path) -> tuple[Path, list[LogSummary]]:
    """The logs as labelled trace runs in the dataset folder `out`, and what each held."""
    import pyarrow as pa

    from sandhop.datasets.traces import read_traces, write_trace
    from sandhop.enforcement import audit
    exported = out.parent / (out.name + ".exported")
    shutil.rmtree(exported, ignore_errors=True)
    try:
        audit.export([Path(p) for p in logs], exported)
    except audit.AuditError as exc:
        raise LearnError(str(exc)) from None
    table = read_traces(exported)
    if "risk" not in table.column_names or all(r is None for r in table.column("risk").to_pylist()):
        raise LearnError(f"{', '.join(map(str, logs))}: no event was scored by a learned manager; learn from the "
                         "audit logs of runs enforced with an artifact (pytest --sandhop-enforce ARTIFACT "
                         "--sandhop-audit-log LOG)")
    summaries = []
    shutil.rmtree(out, ignore_errors=True)
    for (suite, run_id), rows in _runs(table):
        labelled, summary = label_run(rows, suite, run_id)
        write_trace(pa.Table.from_pylist(labelled, schema=_schema(table)), out, suite=suite, run_id=run_id,
                    run_info={"source": "sandhop learn", "logs": [str(p) for p in logs]})
        summaries.append(summary)
    shutil.rmtree(exported, ignore_errors=True)
    return out, summaries


def _schema(table):
    import pyarrow as pa

    from sandhop.datasets.traces import OPTIONAL_COLUMNS
    schema = table.schema
    for name in ("step", "damaging"):
        if name not in schema.names:
            schema = schema.append(pa.field(name, OPTIONAL_COLUMNS[name], nullable=False))
    return schema


def _runs(table):
    rows = table.to_pylist()
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        runs.setdefault((r["suite"], r["run_id"]), []).append(r)
    for key, rs in runs.items():
        yield key, sorted(rs, key=lambda r: r["seq"])


def label_run(rows: list[dict], suite: str, run_id: str) -> tuple[list[dict], LogSummary]:
    from sandhop.datasets import scenarios as sc
    from sandhop.datasets.probe import PROBES, match_steps
    summary = LogSummary(suite, run_id)
    tests: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        r.update(malicious=False, attack="", step=-1, damaging=False)
        if r["test_id"]:
            tests.setdefault(r["test_id"], []).append(i)
    summary.tests = len(tests)
    probe_of = {p.events: sid for sid, p in PROBES.items()}
    for test_id, idx in tests.items():
        outcome = next((rows[i]["test_outcome"] for i in idx if rows[i]["test_outcome"]), "")
        sid = probe_of.get(test_id)
        failed = outcome in ("failed", "error")
        if failed:
            summary.failed.append(test_id)
        if sid is None or not sc.get(sid).malicious:
            if failed:  # a benign test the sandbox broke: its denied steps were false blocks
                summary.false_blocks += sum(rows[i]["decision"] == "deny" for i in idx)
            continue
        scenario = sc.get(sid)
        where, problems = match_steps(scenario, [rows[i] for i in idx], partial=True)
        if problems or not where:
            summary.unlabelled.append(test_id)
            for i in idx:  # an attack whose steps were not found: neither benign nor labelled
                rows[i]["attack"] = UNLABELLED + sid
            continue
        for step, positions in where.items():
            tags = scenario.steps[step].tags if step < len(scenario.steps) else ()
            for p in positions:
                r = rows[idx[p]]
                r.update(malicious=True, attack=sid, step=step, damaging=step == scenario.damaging_step,
                         tags=list(dict.fromkeys([*r.get("tags", []), *tags])))
        summary.attacks[test_id] = sid
    return rows, summary


# --------------------------------------------------------------------------- comparing artifacts

def replay_metrics(artifact: Artifact, table, *, limit_events: int | None = None) -> dict:
    """Replay every test of a labelled trace table through the artifact's runtime and the
    engine: attacks through (damaging step allowed), benign tests broken (any step denied)."""
    from sandhop.enforcement.engine import PolicyEngine
    manager = Manager(artifact, PolicyEngine())
    cols = table.select(["suite", "run_id", "test_id", "seq", "category", "op", "target", "target_class", "phase",
                         "t_ns", "malicious", "damaging", "attack"]).to_pydict()
    order = sorted(range(len(cols["seq"])), key=lambda i: (cols["suite"][i], cols["run_id"][i], cols["test_id"][i],
                                                           cols["seq"][i]))
    tests: dict[tuple, list[int]] = {}
    for i in order:
        if cols["test_id"][i]:
            tests.setdefault((cols["suite"][i], cols["run_id"][i], cols["test_id"][i]), []).append(i)
    counts = Counter()
    broken_tests, through_tests = [], []
    for key, idx in tests.items():
        idx = idx[:limit_events] if limit_events else idx
        events = {c: [cols[c][i] for i in idx] for c in ("category", "op", "target", "target_class", "phase", "t_ns")}
        malicious = [cols["malicious"][i] for i in idx]
        damaging = [cols["damaging"][i] for i in idx]
        if any(cols["attack"][i].startswith(UNLABELLED) for i in idx):
            counts["unlabelled"] += 1  # a probe attack whose steps were not found: not judged
            continue
        effects = manager.replay(key[2], events)
        if any(malicious):
            counts["attacked"] += 1
            if any(d and e == "allow" for d, e in zip(damaging, effects)):
                counts["through"] += 1
                through_tests.append(key[2])
        else:
            counts["benign"] += 1
            if "deny" in effects:
                counts["broken"] += 1
                broken_tests.append(key[2])
        counts["events"] += len(idx)
    return {"tests": len(tests), "events": counts["events"], "attacked": counts["attacked"],
            "unlabelled_attacks": counts["unlabelled"],
            "attacks_through": counts["through"], "benign": counts["benign"], "tests_broken": counts["broken"],
            "broken": broken_tests[:50], "through": through_tests[:50]}


# --------------------------------------------------------------------------- the loop

def learn(logs: Sequence[str | Path], source: str | Path, out: str | Path, *, work: str | Path | None = None,
          risk_overrides: Sequence[str] = (), agent_overrides: Sequence[str] = (), share: float = 0.1,
          force: bool = False, progress: bool = True) -> dict:
    from omegaconf import OmegaConf

    from sandhop.agents import train_agent, train_risk
    from sandhop.agents.export import export
    from sandhop.datasets import splits
    from sandhop.enforcement.runtime import ArtifactError

    source, out = Path(source).expanduser().resolve(), Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not force:
        raise LearnError(f"{out} exists and is not empty; choose another --out or pass --force")
    try:
        old = Artifact.load(source)
    except ArtifactError as exc:
        raise LearnError(f"--from {source}: {exc}") from None
    missing = [str(p) for p in logs if not Path(p).exists()]
    if missing:
        raise LearnError(f"audit log(s) {', '.join(missing)} do not exist")
    work = Path(work).expanduser().resolve() if work else out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    say = print if progress else (lambda *a, **k: None)

    say(f"sandhop learn: labelling {len(logs)} audit log(s)")
    new_traces, summaries = labelled_traces(logs, work / "new-traces")

    # the artifact's dataset, with the new runs in its train split
    data_cfg = OmegaConf.create(old.manifest["risk"]["config"]["dataset"])
    original = Path(data_cfg.traces) if data_cfg.get("traces") else splits.BUNDLED_TRACES
    merged = work / "traces"
    shutil.rmtree(merged, ignore_errors=True)
    merged.mkdir(parents=True)
    for folder in sorted(original.glob("suite=*")):
        (merged / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    moved = []
    new_suites = sorted({s.suite for s in summaries})
    # The new tests are few beside the dataset's thousands: each new run is repeated so that they
    # make about `share` of the training tests (injection then varies the copies).
    base_units = splits.read_manifest(splits.build(OmegaConf.create(old.manifest["risk"]["config"]["dataset"])))[
        "splits"]["train"]["units"]
    new_tests = max(1, sum(s.tests for s in summaries))
    already: list[str] = []
    copies = max(1, round(share * base_units / ((1 - share) * new_tests))) if share > 0 else 1
    for folder in sorted(new_traces.glob("suite=*")):
        target = merged / folder.name
        if target.is_symlink():  # the suite is in the dataset already: keep its runs, add the new ones
            real = target.resolve()
            target.unlink()
            target.mkdir()
            for f in real.iterdir():
                (target / f.name).symlink_to(f.resolve())
        for f in sorted(folder.glob("run-*.parquet")):
            run_id = f.stem[len("run-"):]
            if (target / f.name).exists() or (target / f"run-{run_id}-0.parquet").exists():
                already.append(run_id)  # learned from in an earlier round: its copies are there
                continue
            _repeat_run(f, merged, copies)
    names = {s.split("==")[0] for s in new_suites}
    for split in ("val", "test"):
        kept = [s for s in data_cfg.splits[split] if s.split("==")[0] not in names]
        moved += [f"{s} ({split} -> train)" for s in data_cfg.splits[split] if s.split("==")[0] in names]
        data_cfg.splits[split] = kept
    data_cfg.splits.train = list(data_cfg.splits.train) + [s for s in new_suites if s.split("==")[0] not in
                                                           {t.split("==")[0] for t in data_cfg.splits.train}]
    data_cfg.traces = str(merged)
    data_cfg.root = None
    data_cfg.name = data_cfg.name if str(data_cfg.name).endswith("-learn") else f"{data_cfg.name}-learn"

    say("sandhop learn: retraining the risk model (warm start)")
    risk_cfg = OmegaConf.merge(OmegaConf.create(old.manifest["risk"]["config"]),
                               {"dataset": data_cfg, "init": str(source), "out": str(work / "risk"),
                                "progress": progress})
    risk_cfg.train.epochs = 1
    risk_cfg = OmegaConf.merge(risk_cfg, OmegaConf.from_dotlist(list(risk_overrides)))
    shutil.rmtree(work / "risk", ignore_errors=True)
    train_risk.run(risk_cfg)

    say("sandhop learn: retraining the sandbox manager (warm start)")
    agent_cfg = OmegaConf.create(old.manifest["agent"]["config"])
    agent_cfg = OmegaConf.merge(agent_cfg, {"dataset": data_cfg, "init": str(source), "progress": progress})
    agent_cfg.env.risk.checkpoint = str(work / "risk")
    agent_cfg.agent.total_timesteps = min(int(agent_cfg.agent.total_timesteps), 10_000_000)
    agent_cfg = OmegaConf.merge(agent_cfg, OmegaConf.from_dotlist(list(agent_overrides)))
    shutil.rmtree(work / "agent", ignore_errors=True)
    train_agent.run(agent_cfg, work / "agent")

    export(work / "risk", work / "agent", out, force=True)
    new = Artifact.load(out)

    say("sandhop learn: comparing the artifacts on held-out traces and on the new logs")
    from sandhop.datasets.traces import read_traces
    root = splits.build(data_cfg)
    held_out = splits.load(root, "test") if "test" in splits.read_manifest(root)["splits"] else None
    logs_table = read_traces(new_traces)
    comparison = {}
    for name, table in (("held_out_test", held_out), ("new_logs", logs_table)):
        if table is None or table.num_rows == 0:
            continue
        comparison[name] = {"old": replay_metrics(old, table), "new": replay_metrics(new, table)}
    report = {"from": str(source), "from_manifest_sha256": sha256_file(source / MANIFEST), "out": str(out),
              "logs": [str(p) for p in logs], "seconds": round(time.time() - t0, 1),
              "runs": [vars(s) for s in summaries], "copies": copies, "already_in_training": already,
              "moved_to_train": moved, "train_suites": list(data_cfg.splits.train),
              "comparison": comparison}
    (out / "learn_report.json").write_text(json.dumps(report, indent=1, default=_plain) + "\n")
    (out / "learn_report.md").write_text(render(report))
    return report


def _repeat_run(path: Path, root: Path, copies: int) -> None:
    """Write a labelled run `copies` times into the dataset folder `root`, as runs of their own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sandhop.datasets.traces import write_trace
    table = pq.read_table(path)
    suite, run_id = table["suite"][0].as_py(), table["run_id"][0].as_py()
    for i in range(copies):
        rid = run_id if copies == 1 else f"{run_id}-{i}"
        write_trace(table.set_column(table.schema.get_field_index("run_id"), "run_id",
                                     pa.array([rid] * table.num_rows, pa.string())),
                    root, suite=suite, run_id=rid, run_info={"source": "sandhop learn", "copy_of": run_id})


def _plain(x: Any):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)


def render(report: dict) -> str:
    lines = [f"# sandhop learn: {Path(report['from']).name} -> {Path(report['out']).name}", "",
             f"From `{report['from']}` (manifest sha256 {report['from_manifest_sha256'][:16]}…), "
             f"{len(report['logs'])} audit log(s), {report['seconds']} s.", "",
             "## The logs", "", "| suite | run | tests | failed | candidate false blocks | probe attacks labelled |",
             "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['suite']} | {r['run_id']} | {r['tests']} | {len(r['failed'])} | {r['false_blocks']} | "
                     f"{len(r['attacks'])}{' (' + str(len(r['unlabelled'])) + ' not matched)' if r['unlabelled'] else ''} |")
    if report.get("already_in_training"):
        lines += ["", "Runs already in the training data (learned from in an earlier round): "
                  + ", ".join(report["already_in_training"]) + "."]
    if report["moved_to_train"]:
        lines += ["", "Moved into the train split: " + ", ".join(report["moved_to_train"]) + "."]
    lines += ["", "## Old vs new (replayed through the runtime and the engine)", "",
              "| traces | artifact | tests | attacked | attacks through | benign | tests broken |", "|---|---|---|---|---|---|---|"]
    for name, both in report["comparison"].items():
        for which in ("old", "new"):
            m = both[which]
            lines.append(f"| {name} | {which} | {m['tests']} | {m['attacked']} | {m['attacks_through']} | {m['benign']} | "
                         f"{m['tests_broken']} |")
    return "\n".join(lines) + "\n"
