"""The demo's report: `report.md` with PNG plots, written from the folders of one run of the whole
chain (risk model, sandbox manager, `sandhop evaluate`, the live suite and probes).

    md = write_report(out, risk_run=risk, agent_run=agent, eval_dir=evaluation, live=live)
    print("\\n".join(summary_lines(eval_dir=evaluation, live=live)))

Every part may be missing (a demo step was skipped): its section then says "not run". Plots are
drawn with matplotlib's Figure API on an Agg canvas, so a notebook's backend is left alone.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from sandhop.enforcement.engine import TIER_LEVEL, TIERS

REPORT = "report.md"
NOT_RUN = "not run"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# evaluation.json's per-split metrics of the risk model, in the order the report shows them
RISK_METRICS: dict[str, str] = {
    "episodes": "tests",
    "attacked_tests": "attacked tests",
    "events": "events",
    "malicious_events": "malicious events",
    "event_roc_auc": "ROC-AUC per event",
    "event_pr_auc": "PR-AUC per event",
    "test_roc_auc": "ROC-AUC per test",
    "test_pr_auc": "PR-AUC per test",
    "test_detection_at_1pct_fpr": "detection at 1 % FPR (tests)",
    "test_detection_at_5pct_fpr": "detection at 5 % FPR (tests)",
    "test_fpr_at_threshold": "FPR at the alert threshold (tests)",
    "flagged_before_damage": "flagged before damage (alert threshold)",
    "event_fpr_at_event_threshold": "FPR per event at the event threshold",
    "flagged_before_damage_at_event_threshold": "flagged before damage (event threshold)",
    "tag_macro_f1": "tag macro-F1",
    "ece": "ECE (per event)",
}
# The learning curves: metrics.csv column, and what it is
CURVES: dict[str, str] = {
    "episodic_return": "episodic return",
    "attacks_through": "attacks through (of attacked tests)",
    "tests_broken": "tests broken (of benign tests)",
}
# The evaluation columns the terminal summary shows
SUMMARY_COLUMNS: dict[str, str] = {
    "attacks_through": "attacks through",
    "tests_broken": "tests broken",
    "mean_tier": "mean tier",
    "episodic_return": "return",
}
SHOWN_NAMES = 12  # names listed before "... and N more"


# --------------------------------------------------------------------------- the report

def write_report(out_dir: str | Path, *, risk_run: str | Path | None = None, agent_run: str | Path | None = None,
                 eval_dir: str | Path | None = None, live: Mapping[str, Any] | None = None) -> Path:
    """Write `out_dir/report.md` and the PNGs it links (beside it), and return its path.

    `risk_run`: a sandhop-train-risk out= folder (evaluation.json, roc.png, reliability.png).
    `agent_run`: a sandhop-train-agent out= folder (metrics.parquet or metrics.csv, evaluation.json).
    `eval_dir`: a `sandhop evaluate --out` folder (results.parquet, results.md, pareto_<split>.png).
    `live`: what the demo saw live; every key is optional, a missing one reads "not run":

        {"artifact": "path/of/the/exported/artifact",
         "suite": {"name": "click==8.5.1",
                   "outcomes_plain": {"passed": 2434, "failed": 0, ...},     # pytest outcome counts
                   "outcomes_enforced": {...},                              # the same, enforced
                   "broken": ["tests/test_x.py::test_y", ...],              # passed plain, not enforced
                   "plain_s": 15.4, "enforced_s": 16.3,                     # wall time of each run
                   "audit_log": "path/suite.jsonl"},
         "probes": {"attacks": 27,                                          # attack probes run
                    "stopped": ["env-secret-tcp", ...],                     # scenario ids
                    "through": ["child-python-laundering"],
                    "payloads": 1,                       # payloads that reached the attacker (or a list)
                    "hard_negatives": 7, "hard_negatives_broken": [],       # benign look-alikes
                    "audit_log": "path/probes.jsonl",
                    "timeline_test": "test_exfil.py::test_env_secret_tcp"}} # optional: whose tiers to plot

    `suite` or `probes` may instead be `{"skipped": "why"}`, shown as "not run (why)". The tier
    timeline is drawn from the probes' audit log (else the suite's): the attacked probe test where
    the manager acted, preferring one with a denied event and then the longest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    live = dict(live or {})
    sections = [
        ["# sandhop demo report", "",
         "What the demo trained, how it compares with the baselines on held-out tests, and what the exported "
         "artifact did live. Plots are beside this file."],
        _risk_section(_folder(risk_run), out),
        _agent_section(_folder(agent_run), out),
        _evaluation_section(_folder(eval_dir), out),
        _live_section(live),
        _timeline_section(live, out),
    ]
    path = out / REPORT
    path.write_text("\n\n".join("\n".join(s).rstrip() for s in sections) + "\n")
    return path


def summary_lines(*, eval_dir: str | Path | None = None, live: Mapping[str, Any] | None = None) -> list[str]:
    """The report in a few plain-text lines for the terminal: the evaluation table of each split,
    attacks stopped, benign tests broken and the overhead."""
    lines: list[str] = []
    rows = _result_rows(_folder(eval_dir))
    if rows:
        from sandhop.agents.evaluate_agent import summarise
        for split in dict.fromkeys(r["split"] for r in rows):
            summary = summarise(rows, split)
            first = summary[0]
            lines.append(f"evaluation on {split} ({first['episodes']:.0f} tests, {first['attacks']:.0f} attacked; "
                         "means over seeds):")
            table = [["policy", *SUMMARY_COLUMNS.values()]]
            table += [[s["policy"], *(_number(s[m], 3 if m in ("mean_tier", "episodic_return") else 1)
                                      for m in SUMMARY_COLUMNS)] for s in summary]
            lines += ["  " + row for row in _aligned(table)]
    else:
        lines.append(f"evaluation: {NOT_RUN}")
    live = live or {}
    lines.append(f"live probes: {_probes_line(live.get('probes'))}")
    lines.append(f"live suite: {_suite_line(live.get('suite'))}")
    return lines


# --------------------------------------------------------------------------- 1. the risk model

def _risk_section(run: Path | None, out: Path) -> list[str]:
    lines = ["## 1. The risk model", ""]
    evaluation = _json(run, "evaluation.json")
    if evaluation is None:
        return lines + [_missing("the risk model's evaluation", run, "evaluation.json")]
    splits = {name: m for name, m in evaluation.get("splits", {}).items() if isinstance(m, Mapping)}
    lines.append(f"Run: `{run}`. The calibrator and the thresholds were fitted on val; the other splits are "
                 "held out.")
    if splits:
        keys = [k for k in RISK_METRICS if any(k in m for m in splits.values())]
        keys += [k for m in splits.values() for k in m if k not in RISK_METRICS and _is_number(m[k])]
        keys = list(dict.fromkeys(keys))
        heads = [f"{s} (fitted on)" if s == "val" else s for s in splits]
        lines += ["", "| metric | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(splits)]
        for k in keys:
            cells = [_metric_cell(m.get(k)) for m in splits.values()]
            lines.append(f"| {RISK_METRICS.get(k, k)} | " + " | ".join(cells) + " |")
    thresholds = [f"{k.replace('_', ' ')} = {v:.4g}" for k, v in evaluation.items()
                  if k.startswith(("threshold", "event_threshold")) and _is_number(v)]
    if thresholds:
        lines += ["", "Thresholds: " + "; ".join(thresholds) + "."]
    for name, what in (("roc.png", "per-test ROC"), ("reliability.png", "calibration (per event)")):
        copied = _copy_png(run / name, out / name)
        lines += ["", f"![{what}]({copied.name})" if copied else f"No {name} in the run ({what})."]
    return lines


# --------------------------------------------------------------------------- 2. the sandbox manager

def _agent_section(run: Path | None, out: Path) -> list[str]:
    lines = ["## 2. The sandbox manager (PPO)", ""]
    rows = _metric_rows(run)
    if rows is None:
        return lines + [_missing("the sandbox manager's training", run, "metrics.parquet or metrics.csv")]
    members = sorted({(int(r["member"]), int(r["seed"])) for r in rows})
    steps = max((r["timesteps"] for r in rows if _is_number(r.get("timesteps"))), default=float("nan"))
    lines.append(f"Run: `{run}`: members {', '.join(f'{m} (seed {s})' for m, s in members)}, "
                 f"{_number(steps, 0)} timesteps each.")
    plot_learning_curves(rows, out / "learning_curves.png")
    lines += ["", "![learning curves](learning_curves.png)"]
    val = (_json(run, "evaluation.json") or {}).get("val") or []
    if val:
        shown = ["episodic_return", "attacks_through", "tests_broken", "mean_tier", "hops_per_episode"]
        lines += ["", "Greedy policy on the whole val split at the end of training:", "",
                  "| member | seed | " + " | ".join(shown) + " |", "|---:|---:|" + "---:|" * len(shown)]
        for v in val:
            lines.append(f"| {v.get('member', '')} | {v.get('seed', '')} | "
                         + " | ".join(_metric_cell(v.get(k)) for k in shown) + " |")
    return lines


def plot_learning_curves(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Episodic return, attacks through and tests broken against timesteps, one line per member
    (seed); the val split's figures, where the run evaluated, as markers on a dashed line."""
    fig, canvas = _figure(figsize=(13, 3.8))
    axes = fig.subplots(1, len(CURVES))
    members = sorted({(int(r["member"]), int(r["seed"])) for r in rows})
    for k, (member, seed) in enumerate(members):
        mine = sorted((r for r in rows if (int(r["member"]), int(r["seed"])) == (member, seed)),
                      key=lambda r: r["timesteps"])
        x = [r["timesteps"] for r in mine]
        for ax, metric in zip(axes, CURVES):
            ax.plot(x, [_float(r.get(metric)) for r in mine], color=f"C{k % 10}",
                    label=f"member {member} (seed {seed})")
            val = [(r["timesteps"], _float(r.get(f"val_{metric}"))) for r in mine]
            val = [(t, v) for t, v in val if not math.isnan(v)]
            if val:
                ax.plot(*zip(*val), color=f"C{k % 10}", linestyle="--", marker="o", markersize=4,
                        label=f"member {member} on val")
    for ax, title in zip(axes, CURVES.values()):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("timesteps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    canvas.print_png(str(path))
    return path


# --------------------------------------------------------------------------- 3. evaluation

def _evaluation_section(folder: Path | None, out: Path) -> list[str]:
    lines = ["## 3. Evaluation against the baselines", ""]
    rows = _result_rows(folder)
    results_md = folder / "results.md" if folder else None
    if rows is None and not (results_md and results_md.is_file()):
        return lines + [_missing("the evaluation", folder, "results.md or results.parquet")]
    lines.append(f"`sandhop evaluate` in `{folder}`: every policy replayed through the real engine over the "
                 "same tests; attacks through = attacks not stopped before their damaging step, tests broken = "
                 "benign tests with a denied step.")
    if results_md and results_md.is_file():
        text = results_md.read_text()
    else:
        from sandhop.agents.evaluate_agent import markdown
        text = markdown(rows)
    lines += ["", _nest_headings(text, under=2)]
    pictures = sorted(folder.glob("pareto_*.png"))
    if pictures:
        pictures = [p for p in (_copy_png(p, out / p.name) for p in pictures) if p]
    elif rows:
        from sandhop.agents.evaluate_agent import plot_pareto
        for split in dict.fromkeys(r["split"] for r in rows):
            plot_pareto(rows, split, out / f"pareto_{split}.png")
            pictures.append(out / f"pareto_{split}.png")
    for p in pictures:
        lines += ["", f"![Pareto front, {p.stem.removeprefix('pareto_')}]({p.name})"]
    return lines


def _nest_headings(markdown: str, under: int) -> str:
    """results.md under a heading of level `under`: its title dropped, its headings one deeper."""
    out = []
    for line in markdown.strip().splitlines():
        level = len(line) - len(line.lstrip("#"))
        if level and line[level:level + 1] == " ":
            if level == 1:
                continue
            line = "#" * (under + level - 1) + line[level:]
        out.append(line)
    return "\n".join(out).strip()


# --------------------------------------------------------------------------- 4. live

def _live_section(live: Mapping[str, Any]) -> list[str]:
    lines = ["## 4. Live: the artifact enforcing real runs", ""]
    artifact = live.get("artifact")
    lines.append(f"- Artifact: `{artifact}`" if artifact else f"- Artifact: {NOT_RUN}")
    probes, suite = live.get("probes"), live.get("suite")
    if not _ran(probes):
        lines.append(f"- Attack probes: {_not_run(probes)}")
    else:
        lines.append(f"- Attack probes: {_stopped(probes)}")
        through = list(probes.get("through") or [])
        if through:
            lines.append(f"  - through: {_names(through)}")
        count, names = _count(probes.get("payloads"))
        if count is not None:
            lines.append(f"  - payloads that reached the attacker: {count}" + (f" ({_names(names)})" if names else ""))
        broken = list(probes.get("hard_negatives_broken") or [])
        if probes.get("hard_negatives") is not None or broken:
            lines.append(f"  - hard negatives broken: {len(broken)} of {probes.get('hard_negatives', '?')}"
                         + (f" ({_names(broken)})" if broken else ""))
        lines += _audit_lines(probes.get("audit_log"))
    lines.append(f"- Test suite: {_suite_line(suite)}")
    if _ran(suite):
        for key, what in (("outcomes_plain", "plain"), ("outcomes_enforced", "enforced")):
            if suite.get(key):
                lines.append(f"  - {what}: {_outcomes(suite[key])}")
        broken = list(suite.get("broken") or [])
        lines.append(f"  - benign tests broken: {len(broken)}" + (f": {_names(broken, code=True)}" if broken else ""))
        lines += _audit_lines(suite.get("audit_log"))
    return lines


def _ran(part: Any) -> bool:
    return isinstance(part, Mapping) and bool(part) and not part.get("skipped")


def _not_run(part: Any) -> str:
    why = part.get("skipped") if isinstance(part, Mapping) else None
    return f"{NOT_RUN} ({why})" if isinstance(why, str) and why else NOT_RUN


def _probes_line(probes: Any) -> str:
    if not _ran(probes):
        return _not_run(probes)
    text = _stopped(probes)
    through = list(probes.get("through") or [])
    if through:
        text += f" (through: {_names(through)})"
    count, _ = _count(probes.get("payloads"))
    if count is not None:
        text += f"; {_many(count, 'payload')} reached the attacker"
    if probes.get("hard_negatives") is not None:
        text += f"; {len(probes.get('hard_negatives_broken') or [])} of {probes['hard_negatives']} hard negatives broken"
    return text


def _stopped(probes: Mapping[str, Any]) -> str:
    stopped, attacks = len(probes.get("stopped") or []), probes.get("attacks")
    if attacks is None and not probes.get("stopped") and not probes.get("through"):
        return "no attack results given"
    return f"{stopped} of {attacks if attacks is not None else stopped + len(probes.get('through') or [])} attacks stopped"


def _suite_line(suite: Any) -> str:
    if not _ran(suite):
        return _not_run(suite)
    text = str(suite.get("name") or "the suite")
    broken = suite.get("broken")
    if broken is not None:
        passed = (suite.get("outcomes_plain") or {}).get("passed")
        text += f": {_many(len(broken), 'benign test')} broken" + (f" of {passed} passing" if passed is not None else "")
    plain, enforced = suite.get("plain_s"), suite.get("enforced_s")
    if _is_number(plain) and _is_number(enforced) and plain > 0:
        text += f"; overhead {enforced / plain:.2f}x ({enforced:.1f} s enforced, {plain:.1f} s plain)"
    else:
        text += "; overhead: not measured"
    return text


def _outcomes(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests"


def _audit_lines(log: Any) -> list[str]:
    """The audit log's path and whether its hash chain verifies."""
    if not log:
        return []
    from sandhop.enforcement import audit
    try:
        report = audit.verify(log)
    except (OSError, ValueError) as exc:
        return [f"  - audit log `{log}`: cannot be read ({exc})"]
    state = "chain intact" if report.ok else f"{_many(len(report.problems), 'problem')}: run `sandhop audit verify {log}`"
    return [f"  - audit log `{log}`: {report.records} records, {state}{', sealed' if report.sealed else ', not sealed'}"]


# --------------------------------------------------------------------------- 5. tier timeline

@dataclass(frozen=True)
class Timeline:
    """One test's events as the manager and the engine saw them, in order."""
    test_id: str
    attacked: bool                     # a probe of an attack scenario
    start_tier: str
    events: tuple[str, ...]            # "category target"
    tiers: tuple[str, ...]             # the tier each event was decided at (after the manager acted)
    risks: tuple[float | None, ...]    # None: a quiet event, not scored
    decisions: tuple[str, ...]         # allow, deny or redirect
    actions: tuple[tuple[int, str, float | None, str, str], ...]  # (event, action, risk, tier before, after)


def read_audit_log(log: str | Path) -> list[dict]:
    """The records of an audit log, all its segments in chain order (`audit.records`)."""
    from sandhop.enforcement import audit
    return audit.records(log)


def tier_timeline(records: Sequence[Mapping[str, Any]], test_id: str | None = None) -> Timeline | None:
    """The timeline of `test_id`, or of the test the report should show: among the tests where the
    manager acted, an attacked probe first, then one with a denied or redirected event, then the
    one with the most events. Only the log's last run counts. None when the manager never acted
    (or `test_id` has no events)."""
    runs = [r["run_id"] for r in records if r.get("run_id")]
    if runs:  # a log reused by several runs: the last one
        records = [r for r in records if r.get("run_id") in (runs[-1], None)]
    by_test: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get("test_id") and r.get("kind") in ("action", "event", "decision"):
            by_test.setdefault(str(r["test_id"]), []).append(r)
    if test_id is not None:
        timeline = _timeline(test_id, by_test.get(test_id, []))
        return timeline if timeline.events else None
    timelines = [_timeline(t, own) for t, own in by_test.items() if any(r["kind"] == "action" for r in own)]
    if not timelines:
        return None
    return max(timelines, key=lambda t: (t.attacked, any(d != "allow" for d in t.decisions), len(t.events)))


def _timeline(test_id: str, records: Sequence[Mapping[str, Any]]) -> Timeline:
    """From one test's action, event and decision records, in log order."""
    events, tiers, risks, decisions, actions = [], [], [], [], []
    start = None
    for r in records:
        if r["kind"] == "action":  # written before the record of the event it acted on
            actions.append((len(events), str(r.get("action")), r.get("risk"), str(r.get("tier_before")),
                            str(r.get("tier"))))
            start = start or str(r.get("tier_before"))
        else:
            events.append(f"{r.get('category')} {r.get('target')}")
            tiers.append(str(r.get("tier")))
            risks.append(r.get("risk"))
            decisions.append(str(r.get("decision")))
            start = start or str(r.get("tier"))
    return Timeline(test_id, _is_attack_probe(test_id), start or TIERS[0], tuple(events), tuple(tiers),
                    tuple(risks), tuple(decisions), tuple(actions))


def _is_attack_probe(test_id: str) -> bool:
    from sandhop.datasets import scenarios
    from sandhop.datasets.probe import PROBES
    for scenario_id, probe in PROBES.items():
        if any(test_id == node or test_id.endswith("/" + node) for node in {probe.test, probe.events}):
            return scenarios.get(scenario_id).malicious
    return False


def plot_tier_timeline(timeline: Timeline, path: Path) -> Path:
    """The tier each event was decided at (left axis), denied and redirected events marked, the
    manager's actions labelled, and the risk of scored events (right axis)."""
    fig, canvas = _figure(figsize=(9, 4))
    ax = fig.subplots()
    x = list(range(len(timeline.events)))
    levels = [TIER_LEVEL.get(t, math.nan) for t in timeline.tiers]
    # event i holds its tier over [i - 0.5, i + 0.5]; the tier the test started at comes first
    ax.stairs([TIER_LEVEL.get(timeline.start_tier, 0), *levels], [-1, *(i - 0.5 for i in x), len(x) - 0.5],
              baseline=None, color="C0", linewidth=2, label="tier")
    for effect, style in (("deny", dict(marker="X", color="C3", s=80)), ("redirect", dict(marker="o", color="C1", s=50))):
        hit = [i for i, d in enumerate(timeline.decisions) if d == effect]
        if hit:
            ax.scatter(hit, [levels[i] for i in hit], zorder=3, label=f"{effect} ({len(hit)})", **style)
    for i, action, _, _, after in timeline.actions:
        ax.axvline(i - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.annotate(action, (i - 0.5, TIER_LEVEL.get(after, 0)), textcoords="offset points", xytext=(-3, 6),
                    ha="right", fontsize=8)
    ax.set_yticks(range(len(TIERS)), TIERS)
    ax.set_ylim(-0.4, len(TIERS) - 0.4)
    ax.set_xlim(-1, max(len(x) - 0.5, 1))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("event of the test, in order")
    ax.set_ylabel("sandbox tier")
    scored = [(i, r) for i, r in enumerate(timeline.risks) if r is not None]
    risk_ax = ax.twinx()
    if scored:
        risk_ax.plot(*zip(*scored), color="C2", marker=".", linestyle="none", alpha=0.8, label="risk (scored events)")
    risk_ax.set_ylim(-0.05, 1.05)
    risk_ax.set_ylabel("risk")
    handles = [h for a in (ax, risk_ax) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower left", bbox_to_anchor=(0, 1),
              ncol=len(handles), frameon=False)
    fig.suptitle(f"{timeline.test_id}{' (attack probe)' if timeline.attacked else ''}", fontsize=10)
    fig.tight_layout()
    canvas.print_png(str(path))
    return path


def _timeline_section(live: Mapping[str, Any], out: Path) -> list[str]:
    lines = ["## 5. Tier timeline of one attacked test", ""]
    logged = [(part, whose) for part, whose in ((live.get("probes"), "the probes'"), (live.get("suite"), "the suite's"))
              if _ran(part) and part.get("audit_log")]
    if not logged:
        return lines + [f"{NOT_RUN.capitalize()}: no audit log of the live probes or suite."]
    part, whose = logged[0]
    log = part["audit_log"]
    try:
        records = read_audit_log(log)
    except OSError as exc:
        return lines + [f"No timeline: {whose} audit log `{log}` cannot be read ({exc})."]
    timeline = tier_timeline(records, part.get("timeline_test"))
    if timeline is None:
        wanted = f"test {part['timeline_test']} has no events in" if part.get("timeline_test") \
            else "the manager took no action (no hop or grant) in any test of"
        return lines + [f"No timeline: {wanted} {whose} audit log `{log}`."]
    plot_tier_timeline(timeline, out / "tier_timeline.png")
    if whose == "the suite's":
        lines.append("The probes left no audit log, so this is a test of the suite where the manager acted.")
    denied = sum(d == "deny" for d in timeline.decisions)
    scored = [r for r in timeline.risks if r is not None]
    lines.append(f"`{timeline.test_id}`{' (an attack probe)' if timeline.attacked else ''}, from `{log}`: "
                 f"{_many(len(timeline.events), 'event')} ({len(scored)} scored, highest risk "
                 f"{_number(max(scored, default=float('nan')), 3)}), {_many(len(timeline.actions), 'manager action')}, "
                 f"{denied} denied; it started at {timeline.start_tier} and ended at "
                 f"{timeline.tiers[-1] if timeline.tiers else timeline.start_tier}.")
    lines += ["", "![tier timeline](tier_timeline.png)", "", "| event | what | risk | manager | tier | decision |",
              "|---:|---|---:|---|---|---|"]
    acted = {i: (action, before, after) for i, action, _, before, after in timeline.actions}
    notable = [i for i, d in enumerate(timeline.decisions) if i in acted or d != "allow"]
    for i in notable[:SHOWN_NAMES]:
        action, before, after = acted.get(i, ("", "", ""))
        lines.append(f"| {i} | `{timeline.events[i]}` | {_number(_float(timeline.risks[i]), 3)} | "
                     f"{f'{action} ({before} → {after})' if action else ''} | {timeline.tiers[i]} | "
                     f"{timeline.decisions[i]} |")
    if len(notable) > SHOWN_NAMES:
        lines.append(f"| … | {len(notable) - SHOWN_NAMES} more | | | | |")
    return lines


# --------------------------------------------------------------------------- reading run folders

def _folder(path: str | Path | None) -> Path | None:
    return Path(path).expanduser() if path else None


def _json(folder: Path | None, name: str) -> dict | None:
    if folder is None or not (folder / name).is_file():
        return None
    return json.loads((folder / name).read_text())


def _metric_rows(run: Path | None) -> list[dict] | None:
    """metrics.parquet (else metrics.csv) of a training run as rows of floats."""
    if run is None:
        return None
    if (run / "metrics.parquet").is_file():
        import pyarrow.parquet as pq
        rows = pq.read_table(run / "metrics.parquet").to_pylist()
    elif (run / "metrics.csv").is_file():
        with (run / "metrics.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        return None
    rows = [{k: _float(v) for k, v in r.items()} for r in rows]
    return rows or None


def _result_rows(folder: Path | None) -> list[dict] | None:
    if folder is None or not (folder / "results.parquet").is_file():
        return None
    import pyarrow.parquet as pq
    return pq.read_table(folder / "results.parquet").to_pylist() or None


def _missing(what: str, folder: Path | None, files: str) -> str:
    if folder is None:
        return f"{NOT_RUN.capitalize()} (no folder given for {what})."
    return f"{NOT_RUN.capitalize()}: `{folder}` holds no {files}."


def _copy_png(source: Path, target: Path) -> Path | None:
    if not source.is_file() or source.read_bytes()[:8] != PNG_MAGIC:
        return None
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return target


# --------------------------------------------------------------------------- formatting

def _figure(figsize: tuple[float, float]):
    """A figure on its own Agg canvas (pyplot and the global backend stay untouched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the report's plots need matplotlib: pip install 'sandhop[notebooks]'",
                          name="matplotlib") from exc
    fig = Figure(figsize=figsize)
    return fig, FigureCanvasAgg(fig)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _number(value: Any, digits: int) -> str:
    value = _float(value)
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def _metric_cell(value: Any) -> str:
    if not _is_number(value):
        return "—"
    return f"{value:,}" if isinstance(value, int) else _number(value, 3)


def _count(value: Any) -> tuple[int | None, list[str]]:
    """A count given as a number or as the list of what was counted."""
    if isinstance(value, (list, tuple)):
        return len(value), [str(v) for v in value]
    return (int(value), []) if _is_number(value) else (None, [])


def _many(count: int, thing: str) -> str:
    return f"{count} {thing}{'' if count == 1 else 's'}"


def _names(names: Sequence[Any], code: bool = False) -> str:
    shown = [f"`{n}`" if code else str(n) for n in names[:SHOWN_NAMES]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in table]
