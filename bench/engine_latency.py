"""Latency of `PolicyEngine.decide` over the recorded dataset's events, per tier, cold and cached.

    python bench/engine_latency.py [--limit 50000] [--data datasets/data/traces] [--repeat 3]

For each tier a fresh engine (matchers compiled, decision cache empty) decides every distinct
event of the sample once: the cold pass, rules only. A second pass over the same events hits the
cache. Both passes run `--repeat` times, each on a fresh engine, and every figure is the median
over the repeats (the machine may be shared). Each call is timed alone with `time.perf_counter_ns`; nothing is subtracted, so the timer's
own cost is measured beside it (the same loop around an empty function of the same signature).
DESIGN 5 targets a cold (rules only) p50 of at most 5 us. The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from sandhop.datasets.traces import read_traces
from sandhop.enforcement.engine import TIERS, PolicyEngine, SandboxConfig

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "datasets" / "data" / "traces"
TARGET_P50_US = 5


class Target(NamedTuple):
    """What `decide` reads of an event."""

    category: str
    target: str
    target_class: str


def load_events(data: Path, limit: int, seed: int = 0) -> tuple[list[Target], int]:
    """A deterministic sample of `limit` events (all when limit <= 0), in trace order."""
    table = read_traces(data).select(["category", "target", "target_class"])
    n = table.num_rows
    if 0 < limit < n:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
        table = table.take(keep)
    cols = [table.column(c).to_pylist() for c in ("category", "target", "target_class")]
    return [Target(*row) for row in zip(*cols)], n


def time_calls(fn: Callable[[Target, SandboxConfig], object], events: Sequence[Target],
               config: SandboxConfig) -> np.ndarray:
    """Nanoseconds of each call, timed one by one (garbage collection paused while timing)."""
    out = np.empty(len(events), dtype=np.int64)
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for i, e in enumerate(events):
            t0 = clock()
            fn(e, config)
            out[i] = clock() - t0
    finally:
        gc.enable()
    return out


def _empty(event: Target, config: SandboxConfig) -> None:
    return None


def percentiles_us(ns: np.ndarray) -> tuple[float, float]:
    p50, p99 = np.percentile(ns, [50, 99])
    return round(float(p50) / 1000, 3), round(float(p99) / 1000, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=50_000,
                    help="events sampled deterministically from the dataset (0: all)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="trace root (suite=... folders)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh engines per tier; medians are reported")
    args = ap.parse_args()

    start = time.perf_counter()
    events, total = load_events(args.data, args.limit)
    distinct = list(dict.fromkeys(events))
    # Big enough that the cached pass never sees the cache cleared mid-pass.
    cache_size = max(1 << 16, 2 * len(distinct))
    print(f"{len(events)} events sampled of {total} in {args.data}; {len(distinct)} distinct "
          f"(category, target, class); cache_size {cache_size}")

    overhead = percentiles_us(time_calls(_empty, distinct, SandboxConfig("medium")))
    results: dict[str, dict[str, float]] = {}
    effects: dict[str, dict[str, int]] = {}
    runs: dict[str, list[tuple[float, ...]]] = {tier: [] for tier in TIERS}
    for _ in range(max(args.repeat, 1)):
        for tier in TIERS:  # tiers interleaved, so a slow spell of the machine hits them alike
            engine = PolicyEngine(cache_size=cache_size)
            config = engine.config(tier)         # compiles the tier's matchers, untimed
            engine.cache_clear()
            cold = time_calls(engine.decide, distinct, config)
            cached = time_calls(engine.decide, distinct, config)
            runs[tier].append(percentiles_us(cold) + percentiles_us(cached))
            counts: dict[str, int] = {}
            for e in distinct:
                effect = engine.decide(e, config).effect
                counts[effect] = counts.get(effect, 0) + 1
            effects[tier] = counts
    for tier, tier_runs in runs.items():
        c50, c99, h50, h99 = (round(float(np.median(col)), 3) for col in zip(*tier_runs))
        results[tier] = {"cold_p50_us": c50, "cold_p99_us": c99, "cached_p50_us": h50, "cached_p99_us": h99}

    print()
    print(f"{'tier':<10}{'cold p50':>11}{'cold p99':>11}{'cached p50':>12}{'cached p99':>12}   decisions (distinct)")
    for tier, r in results.items():
        mix = ", ".join(f"{k} {v}" for k, v in sorted(effects[tier].items()))
        print(f"{tier:<10}{r['cold_p50_us']:>9.2f}us{r['cold_p99_us']:>9.2f}us"
              f"{r['cached_p50_us']:>10.2f}us{r['cached_p99_us']:>10.2f}us   {mix}")
    print(f"{'(timer)':<10}{overhead[0]:>9.2f}us{overhead[1]:>9.2f}us   perf_counter_ns around an empty "
          f"call; included in every figure above")
    worst = max(r["cold_p50_us"] for r in results.values())
    print(f"target: cold p50 <= {TARGET_P50_US} us (DESIGN 5); worst tier {worst:.2f} us "
          f"({'met' if worst <= TARGET_P50_US else 'missed'}); {time.perf_counter() - start:.1f}s")
    print(json.dumps({"bench": "engine_latency", "events": len(events), "distinct": len(distinct), "repeat": args.repeat,
                      "dataset_events": total, "cache_size": cache_size,
                      "timer_overhead_p50_us": overhead[0], "timer_overhead_p99_us": overhead[1],
                      "tiers": results, "target_p50_us": TARGET_P50_US}))


if __name__ == "__main__":
    main()
