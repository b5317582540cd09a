"""The tables of the dataset card, rendered from the data itself.

    python -m sandhop.datasets.card datasets/data/traces   # per-suite table
    python -m sandhop.datasets.card --scenarios            # the scenario library
    python -m sandhop.datasets.card --splits [dataset=NAME] # split statistics (builds if needed)
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from sandhop.datasets import traces
from sandhop.datasets.record import read_manifest

SHORT = {"fs.read": "fs.r", "fs.write": "fs.w", "fs.delete": "fs.d", "fs.meta": "fs.m",
         "net.dns": "dns", "net.connect": "conn", "net.bind": "bind", "net.send": "send",
         "proc.spawn": "spawn", "proc.signal": "sig", "env.read": "env.r", "env.write": "env.w",
         "code.import": "import", "code.native": "native", "code.exec": "exec", "sys.tamper": "tamper",
         "browser.request": "browser", "dom.mutation": "dom"}


def render_table(root: Path) -> str:
    rows = read_manifest(root)
    cats = [c for c in SHORT if any(r["events_by_category"].get(c) for r in rows)]
    head = ["suite", "tests (pass/fail/skip/err)", "deselected", "tests with events", "events",
            "wall s", *(SHORT[c] for c in cats)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    totals = Counter()
    for r in sorted(rows, key=lambda r: r["suite"]):
        table = traces.read_traces(root / r["trace"])
        with_events = len({t for t, p in zip(table.column("test_id").to_pylist(), table.column("phase").to_pylist())
                           if t and p in ("setup", "call", "teardown")})
        t = r["tests"]
        n = sum(t.values())
        totals.update(tests=n, events=r["events"], with_events=with_events)
        totals.update({c: r["events_by_category"].get(c, 0) for c in cats})
        outcome = f"{n:,} ({t.get('passed', 0)}/{t.get('failed', 0)}/{t.get('skipped', 0)}/{t.get('error', 0)})"
        lines.append("| " + " | ".join([r["suite"], outcome, str(len(r["deselected"])), f"{with_events:,}",
                                         f"{r['events']:,}", f"{r['wall_s']:.0f}",
                                         *(f"{r['events_by_category'].get(c, 0):,}" for c in cats)]) + " |")
    lines.append("| " + " | ".join([f"**{len(rows)} suites**", f"**{totals['tests']:,}**", "",
                                     f"**{totals['with_events']:,}**", f"**{totals['events']:,}**", "",
                                     *(f"{totals[c]:,}" for c in cats)]) + " |")
    return "\n".join(lines)


def scenario_table(scenarios=None) -> str:
    """Markdown: id, family, inferred tags, damaging step (as the generator spells it), source."""
    from sandhop.datasets import scenarios as lib
    lines = ["| id | family | tags | damaging step | source |", "|---|---|---|---|---|"]
    for s in scenarios if scenarios is not None else lib.SCENARIOS:
        k = s.damaging_step
        damage = "— (benign)" if k is None else f"{k + 1}/{len(s.steps)}: `{s.steps[k].category} {s.steps[k].target}`"
        source = s.source.replace("|", "\\|")
        lines.append(f"| `{s.id}` | {s.family} | {', '.join(s.tags) or '—'} | {damage} | {source} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--scenarios"]:
        print(scenario_table())
    elif argv[:1] == ["--splits"]:
        from sandhop.datasets import splits
        cfg = splits.compose(argv[1:])
        print(splits.format_stats(splits.read_manifest(splits.build(cfg.dataset))))
    else:
        print(render_table(Path(argv[0] if argv else "datasets/data/traces")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
