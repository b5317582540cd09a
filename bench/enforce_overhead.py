"""Wall time of a real suite plain vs. under `--sandhop-policy medium`, interleaved, as a ratio.

    python bench/enforce_overhead.py [SUITE_DIR] [--policy medium] [--rounds 5] [-- PYTEST_ARGS...]

SUITE_DIR is a source tree whose tests run with `python -m pytest` from it (PYTHONPATH gets its
`src/` when there is one). Without it, the bundled click sdist is unpacked and run with its
recipe. Runs alternate plain and enforced (same interpreter, same sources) so machine noise hits
both alike; it also checks that the policy broke no test (the outcome counts must be equal). The
last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def bundled_click(work: Path) -> tuple[Path, list[str], str]:
    from sandhop.datasets.record import recipe_for, unpack_sdist
    from sandhop.datasets.suites import pytest_argv
    from sandhop.demo import bundled_sdists
    archive = bundled_sdists()["click"]
    recipe = recipe_for(archive.name[: -len(".tar.gz")].replace("-", "==", 1))
    return unpack_sdist(archive, work / "src"), list(pytest_argv(recipe)), recipe.spec


def outcomes(junit: Path) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        key = "failed" if "failure" in kinds else "error" if "error" in kinds else "skipped" if "skipped" in kinds else "passed"
        counts[key] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite_dir", nargs="?", help="a source tree with tests (default: the bundled click suite)")
    ap.add_argument("--policy", default="medium")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: extra pytest arguments")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sandhop-bench-"))
    extra = [a for a in args.pytest_args if a != "--"]
    if args.suite_dir:
        src, argv, name = Path(args.suite_dir).resolve(), extra, Path(args.suite_dir).name
    else:
        src, argv, name = bundled_click(work)
        argv += extra
    env = {**os.environ, "PYTEST_ADDOPTS": ""}
    if (src / "src").is_dir():
        env["PYTHONPATH"] = str(src / "src")
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv]

    def timed(flags: list[str], junit: Path) -> float:
        start = time.perf_counter()
        proc = subprocess.run(base + flags + [f"--junitxml={junit}"], cwd=src, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode not in (0, 1):
            sys.exit(f"pytest failed to run {name} (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return elapsed

    timed([], work / "warm.xml")  # warm the page cache and bytecode caches once, unmeasured
    plain, enforced = [], []
    plain_outcomes = enforced_outcomes = None
    for i in range(args.rounds):
        plain.append(timed([], work / "plain.xml"))
        enforced.append(timed([f"--sandhop-policy={args.policy}"], work / "enforced.xml"))
        plain_outcomes, enforced_outcomes = outcomes(work / "plain.xml"), outcomes(work / "enforced.xml")
        print(f"round {i + 1}/{args.rounds}: plain {plain[-1]:.2f}s  {args.policy} {enforced[-1]:.2f}s  "
              f"outcomes plain {plain_outcomes} enforced {enforced_outcomes}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(enforced) / statistics.median(plain)
    print(json.dumps({"bench": "enforce_overhead", "suite": name, "policy": args.policy, "rounds": args.rounds,
                      "plain_median_s": round(statistics.median(plain), 3),
                      "enforced_median_s": round(statistics.median(enforced), 3),
                      "ratio": round(ratio, 3), "target_ratio": 1.10,
                      "outcomes_equal": plain_outcomes == enforced_outcomes,
                      "plain_outcomes": plain_outcomes, "enforced_outcomes": enforced_outcomes}))


if __name__ == "__main__":
    main()
