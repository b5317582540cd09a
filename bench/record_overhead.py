"""Wall time of a real suite with and without `--sandhop-record`, interleaved, as a ratio.

    python bench/record_overhead.py [--suite click] [--rounds 5]

Runs the bundled suite's tests alternately plain and recorded (same interpreter, same sources),
so machine noise hits both sides alike. The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sandhop.datasets.record import recipe_for, suite_env, unpack_sdist
from sandhop.datasets.suites import pytest_argv
from sandhop.demo import bundled_sdists


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="click")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    archive = bundled_sdists()[args.suite]
    recipe = recipe_for(archive.name[: -len(".tar.gz")].replace("-", "==", 1))
    work = Path(tempfile.mkdtemp(prefix="sandhop-bench-"))
    src = unpack_sdist(archive, work / "src")
    env = suite_env({"PYTHONPATH": str(src / "src")})
    base = [sys.executable, "-m", "pytest", *pytest_argv(recipe)]

    def timed(extra: list[str]) -> float:
        start = time.perf_counter()
        proc = subprocess.run(base + extra, cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        if proc.returncode not in (0, 1):
            sys.exit(f"pytest failed to run the {recipe.spec} suite (exit {proc.returncode})")
        return elapsed

    timed([])  # warm the page cache and bytecode caches once, unmeasured
    plain, recorded = [], []
    for i in range(args.rounds):
        out = work / f"trace-{i}"
        plain.append(timed([]))
        recorded.append(timed([f"--sandhop-record={out}", f"--sandhop-suite={recipe.spec}"]))
        shutil.rmtree(out, ignore_errors=True)
        print(f"round {i + 1}/{args.rounds}: plain {plain[-1]:.2f}s  recorded {recorded[-1]:.2f}s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(recorded) / statistics.median(plain)
    print(json.dumps({"bench": "record_overhead", "suite": recipe.spec, "rounds": args.rounds,
                      "plain_median_s": round(statistics.median(plain), 3),
                      "recorded_median_s": round(statistics.median(recorded), 3),
                      "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
