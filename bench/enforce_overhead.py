"""Wall time of a real suite plain vs. enforced (a policy tier, or an exported artifact), as a ratio.

    python bench/enforce_overhead.py [--policy medium | --artifact DIR [--baseline TIER]] [--rounds 5]
                                     [SUITE_DIR] [-- PYTEST_ARGS...]

(options before SUITE_DIR: everything after it goes to pytest.)

SUITE_DIR is a source tree whose tests run with `python -m pytest` from it (PYTHONPATH gets its
`src/` when there is one). Without it, the bundled click sdist is unpacked and run with its
recipe. Enforced runs use `--sandhop-policy POLICY` (default medium), or with `--artifact DIR`
`--sandhop-enforce DIR`: the artifact's risk model and sandbox manager act on every event (make
one with `sandhop export`). Runs alternate plain and enforced (same interpreter, same sources) so
machine noise hits both alike; it also checks that enforcing broke no test (the outcome counts
must be equal; tests whose outcome differs are named, and the script then exits 1). From the
plugin's summary line of the last enforced run it reports the operations denied and redirected,
and in artifact mode the events the manager scored and the actions it took. `--baseline TIER`
(artifact mode) adds a third run per round under that static tier, usually the artifact's base
tier: the artifact's ratio to it is what the learned runtime adds to the guard itself, whose own
cost varies more with the machine. The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sandhop.datasets.record import suite_env
from sandhop.demo import count_outcomes, junit_outcomes


def bundled_click(work: Path) -> tuple[Path, list[str], str]:
    from sandhop.datasets.record import recipe_for, unpack_sdist
    from sandhop.datasets.suites import pytest_argv
    from sandhop.demo import bundled_sdists
    archive = bundled_sdists()["click"]
    recipe = recipe_for(archive.name[: -len(".tar.gz")].replace("-", "==", 1))
    return unpack_sdist(archive, work / "src"), list(pytest_argv(recipe)), recipe.spec


# The plugin's terminal summary line, e.g. "sandhop: artifact /tmp/a (base tier observe; 2892 events
# in 403 tests and collectors, 301 scored and 2591 quiet, 79 manager actions) (enforce): denied 0
# operations, redirected 0"
SUMMARY = re.compile(r"sandhop: (?:policy .*|artifact .*; (?P<events>\d+) events in (?P<episodes>\d+) tests "
                     r"and collectors(?: and \d+ child processes)?, (?P<scored>\d+) scored and (?P<quiet>\d+) quiet, (?P<actions>\d+) manager "
                     r"actions\)) \((?:enforce|audit)\): "
                     r"(?:would have )?denied (?P<denied>\d+) operations, redirected (?P<redirected>\d+)")


def enforcement_summary(stdout: str, artifact: bool) -> dict[str, int]:
    """What the plugin's summary line says the enforced run did."""
    lines = list(SUMMARY.finditer(stdout))
    found = lines[-1] if lines else None
    if found is None or (artifact and found["events"] is None):
        kind = ("artifact (… events in … tests and collectors, … scored and … quiet, … manager actions)" if artifact
                else "policy")
        sys.exit(f"the enforced run printed no sandhop summary line of the form 'sandhop: {kind} (enforce): "
                 f"denied N operations, redirected M'; did the plugin's summary change? Its output ended:\n"
                 f"{stdout[-2000:]}")
    names = (("events", "episodes", "scored", "quiet", "actions", "denied", "redirected") if artifact
             else ("denied", "redirected"))
    return {name: int(found[name]) for name in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite_dir", nargs="?", help="a source tree with tests (default: the bundled click suite)")
    ap.add_argument("--policy", default=None, help="tier or policy file to enforce (default medium)")
    ap.add_argument("--artifact", metavar="DIR", default=None,
                    help="enforce with this exported artifact (--sandhop-enforce DIR) instead of a policy")
    ap.add_argument("--baseline", metavar="TIER", default=None,
                    help="with --artifact: also time each round under this static tier (e.g. observe)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: extra pytest arguments")
    args = ap.parse_args()
    if args.policy and args.artifact:
        ap.error("--policy and --artifact both say what to enforce; pass one")
    if args.baseline and not args.artifact:
        ap.error("--baseline compares an artifact with a static tier; pass --artifact too")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.artifact:
        from sandhop.enforcement.runtime import Artifact, ArtifactError
        artifact = Path(args.artifact).expanduser().resolve()
        try:
            Artifact.load(artifact)  # fail here, not after the first unmeasured run
        except ArtifactError as exc:
            sys.exit(f"--artifact {args.artifact}: {exc}")
        policy, mode, enforce, label = None, "artifact", [f"--sandhop-enforce={artifact}"], f"artifact {artifact.name}"
    else:
        artifact, policy = None, args.policy or "medium"
        mode, enforce, label = "policy", [f"--sandhop-policy={policy}"], policy

    work = Path(tempfile.mkdtemp(prefix="sandhop-bench-"))
    extra = [a for a in args.pytest_args if a != "--"]
    if args.suite_dir:
        src, argv, name = Path(args.suite_dir).resolve(), extra, Path(args.suite_dir).name
    else:
        src, argv, name = bundled_click(work)
        argv += extra
    env = suite_env()
    if (src / "src").is_dir():
        env["PYTHONPATH"] = str(src / "src")
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv]

    def timed(flags: list[str], junit: Path) -> tuple[float, str]:
        start = time.perf_counter()
        proc = subprocess.run(base + flags + [f"--junitxml={junit}"], cwd=src, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode not in (0, 1):
            sys.exit(f"pytest failed to run {name} (exit {proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return elapsed, proc.stdout

    timed([], work / "warm.xml")  # warm the page cache and bytecode caches once, unmeasured
    plain, enforced, baseline = [], [], []
    differing: dict[str, tuple[str | None, str | None]] = {}  # over all rounds: test -> (plain, enforced)
    for i in range(args.rounds):
        plain.append(timed([], work / "plain.xml")[0])
        seconds, stdout = timed(enforce, work / "enforced.xml")
        enforced.append(seconds)
        if args.baseline:
            baseline.append(timed([f"--sandhop-policy={args.baseline}"], work / "baseline.xml")[0])
        plain_results, enforced_results = junit_outcomes(work / "plain.xml"), junit_outcomes(work / "enforced.xml")
        for test in sorted(plain_results.keys() | enforced_results.keys()):
            if plain_results.get(test) != enforced_results.get(test):
                differing[test] = (plain_results.get(test), enforced_results.get(test))
        print(f"round {i + 1}/{args.rounds}: plain {plain[-1]:.2f}s  {label} {enforced[-1]:.2f}s  "
              f"{f'{args.baseline} {baseline[-1]:.2f}s  ' if baseline else ''}"
              f"outcomes plain {count_outcomes(plain_results)} enforced {count_outcomes(enforced_results)}", flush=True)
    summary = enforcement_summary(stdout, artifact is not None)
    shutil.rmtree(work, ignore_errors=True)
    plain_outcomes, enforced_outcomes = count_outcomes(plain_results), count_outcomes(enforced_results)
    equal = plain_outcomes == enforced_outcomes and not differing
    if not equal:
        print(f"OUTCOMES DIFFER between plain and enforced ({label}) runs: {len(differing)} test(s) "
              f"(plain -> enforced, in some round):", flush=True)
        for test, (was, now) in list(differing.items())[:20]:
            print(f"  {test}: {was} -> {now}")
    ratio = statistics.median(enforced) / statistics.median(plain)
    result = {"bench": "enforce_overhead", "suite": name, "mode": mode,
              "policy": policy, "artifact": str(artifact) if artifact else None,
              "rounds": args.rounds,
              "plain_median_s": round(statistics.median(plain), 3),
              "enforced_median_s": round(statistics.median(enforced), 3),
              "ratio": round(ratio, 3), "target_ratio": 1.10,
              "outcomes_equal": equal, "plain_outcomes": plain_outcomes, "enforced_outcomes": enforced_outcomes,
              "differing_tests": sorted(differing)[:20],
              "denied": summary["denied"], "redirected": summary["redirected"]}
    if baseline:
        result.update(baseline=args.baseline, baseline_median_s=round(statistics.median(baseline), 3),
                      baseline_ratio=round(statistics.median(baseline) / statistics.median(plain), 3),
                      ratio_vs_baseline=round(statistics.median(enforced) / statistics.median(baseline), 3))
    if artifact is not None:
        result.update(manager_events=summary["events"], manager_episodes=summary["episodes"],
                      manager_actions=summary["actions"])
    print(json.dumps(result))
    if not equal:
        sys.exit(1)


if __name__ == "__main__":
    main()
