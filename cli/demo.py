"""`sandhop demo`: the main job, end to end, on the bundled data.

    sandhop demo [--out sandhop-demo] [--suite click] [--force]

Steps, each reused on the next run when its result exists (unless `--force`):

1. record    the bundled real suite (an sdist shipped in `datasets/data/suites/`) under the recorder
2. dataset   the labelled splits of the bundled traces (`dataset=live`: attack scenarios and hard
             negatives injected into real traces of real suites, every attack family in training)
3. risk      the risk transformer (`sandhop-train-risk`, small settings)
4. agent     the PPO sandbox manager on the risk model's scores (`sandhop-train-agent`, small settings)
5. evaluate  the manager against the static tiers, the tuned threshold rule and the oracle on the
             held-out test split (`sandhop evaluate`)
6. export    the artifact the runtime enforcer loads (`sandhop export`)
7. live      the bundled suite plain and under the artifact (benign tests broken, overhead), and
             the live attack probes under it (attacks stopped; needs root for their namespace)
8. report    `report.md` with plots (`sandhop.report`), and its summary printed

Everything runs in this process or in pytest subprocesses of this interpreter; nothing is
downloaded. A step that cannot run stops the demo, saying why and what to do; the steps finished
before it are reused by the next run. A step that runs (again) makes every later step run again,
so the report never mixes two runs; live results made without the probes are not reused when the
probes are asked for.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Callable

BUNDLED_SUITES = "suites"
DATASET = "live"
# Short training: the whole demo fits in ten minutes on two cores. (On the small dataset the
# manager learned to lock every test down at its first event; the full one teaches it better.)
# Five folds, not the default two: after two epochs, models on half the tests scored benign events
# too high, and the manager trained on them broke 24 test-split tests (2 with five folds).
RISK_OVERRIDES = (f"dataset={DATASET}", "model=small", "train.epochs=2", "out_of_fold=5")
AGENT_OVERRIDES = (f"dataset={DATASET}", "env.risk.source=model", "agent.total_timesteps=20_000_000",
                   "agent.eval_every_chunks=0")
STEPS = ("record", "dataset", "risk", "agent", "evaluate", "export", "live", "report")


class DemoError(RuntimeError):
    """A demo step that cannot run here (says what to do)."""


def bundled_sdists() -> dict[str, Path]:
    """name -> sdist archive shipped with sandhop."""
    folder = Path(str(resources.files("sandhop.datasets") / "data" / BUNDLED_SUITES))
    return {p.name.split("-", 1)[0].lower(): p for p in sorted(folder.glob("*.tar.gz"))}


def junit_outcomes(junit: Path) -> dict[str, str]:
    """Each test case's outcome (passed, failed, error or skipped) in a junit XML, by its id."""
    import xml.etree.ElementTree as ET
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        key = "failed" if "failure" in kinds else "error" if "error" in kinds else "skipped" if "skipped" in kinds else "passed"
        out[f"{case.get('classname')}::{case.get('name')}"] = key
    return out


def count_outcomes(results: dict[str, str]) -> dict[str, int]:
    totals = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for key in results.values():
        totals[key] += 1
    return totals


def fresh_log(log: Path) -> Path:
    """`log` with no earlier run in it (an audit log goes on where a previous one stopped)."""
    from sandhop.enforcement import audit
    for stale in [*audit.segments(log), audit.head_path(log)]:
        Path(stale).unlink(missing_ok=True)
    return log


def judge_probes(report: dict, log: Path) -> dict:
    """What the enforced probes came to: an attack probe counts as stopped when the sandbox
    denied or redirected one of its operations (in its own test, or its module for import- and
    collection-time payloads); payloads are what the fake attacker's listeners received; a hard
    negative is broken when its test did not pass."""
    from sandhop.datasets import scenarios as sc
    from sandhop.datasets.probe import PROBES
    from sandhop.report import read_audit_log
    blocked = {r.get("test_id") for r in read_audit_log(log)
               if r.get("kind", "decision") == "decision" and r.get("decision") in ("deny", "redirect")}
    attacks = [sid for sid in PROBES if sc.get(sid).family != "benign"]
    negatives = [sid for sid in PROBES if sc.get(sid).family == "benign"]
    outcomes = report.get("outcomes", {})
    stopped = [sid for sid in attacks if {PROBES[sid].events, PROBES[sid].test} & blocked]
    return {"attacks": len(attacks), "stopped": stopped, "through": [s for s in attacks if s not in stopped],
            "payloads": len(report.get("listeners", [])),
            "payload_targets": [p.get("host") or p.get("address") for p in report.get("listeners", [])],
            "hard_negatives": len(negatives),
            "hard_negatives_broken": [s for s in negatives if outcomes.get(PROBES[s].test) != "passed"],
            "audit_log": str(log)}


class Demo:
    """The demo's steps over one output folder (see the module docstring)."""

    def __init__(self, out: Path, *, suite: str = "click", force: bool = False, probes: bool = True,
                 progress: Callable = print) -> None:
        self.out = out.resolve()
        self.force = force
        self.probes = probes
        self.say = progress
        self.bars = sys.stderr.isatty()
        sdists = bundled_sdists()
        if suite not in sdists:
            raise DemoError(f"no bundled suite {suite!r}; bundled: {', '.join(sdists) or 'none'}")
        self.archive = sdists[suite]
        from sandhop.datasets.record import recipe_for
        self.recipe = recipe_for(self.archive.name[: -len(".tar.gz")].replace("-", "==", 1))
        self.risk, self.agent = self.out / "risk", self.out / "agent"
        self.eval, self.artifact, self.live_dir = self.out / "eval", self.out / "artifact", self.out / "live"
        self.timings: dict[str, float] = {}
        self.redone = False   # a step ran: every later one runs too

    def step(self, n: int, name: str, done: bool, what: str, run: Callable[[], None]) -> None:
        label = f"[{n}/{len(STEPS)}] {name}"
        if done and not self.force and not self.redone:
            self.say(f"{label}: reusing {what} (--force redoes it)")
            return
        self.say(f"{label}: {what}")
        started = time.perf_counter()
        run()
        # the later steps read what this one made: reusing their older results would mix two runs
        self.redone = self.redone or name != "record"
        self.timings[name] = round(time.perf_counter() - started, 1)
        self.say(f"{label}: done in {self.timings[name]:.0f} s")

    # ----------------------------------------------------------------- the steps
    def source(self) -> Path:
        """The suite's unpacked sources (for the recording and the live runs)."""
        from sandhop.datasets.record import unpack_sdist
        work = self.out / "work" / "src"
        found = [p for p in work.glob("*") if p.is_dir()] if work.is_dir() else []
        if found:
            return found[0]
        shutil.rmtree(work, ignore_errors=True)
        return unpack_sdist(self.archive, work)

    def record(self) -> None:
        from sandhop.datasets.record import run_suite
        trace_root = self.out / "traces"
        if trace_root.exists():
            shutil.rmtree(trace_root)
        src = self.source()
        log = self.out / "work" / "record.log"
        result = run_suite(self.recipe, src, sys.executable, trace_root, log, isolated=False,
                           extra_env={"PYTHONPATH": str(src / "src")})
        tests = result.manifest_row["tests"]
        self.say(f"    {self.recipe.spec}: {sum(tests.values())} tests "
                 f"({', '.join(f'{k} {v}' for k, v in sorted(tests.items()))}), {result.manifest_row['events']} "
                 f"events, {result.manifest_row['wall_s']} s under the recorder; trace {result.trace}")

    def dataset(self) -> None:
        from sandhop.datasets import splits
        cfg = splits.SplitConfig.from_config(splits.compose([f"dataset={DATASET}"]).dataset)
        root = splits.build(cfg, force=self.force, progress=self.bars)
        (self.out / "dataset.txt").write_text(f"{root}\n")
        print(splits.format_stats(splits.read_manifest(root)))

    def train_risk(self) -> None:
        from sandhop.agents import train_risk
        from sandhop.datasets.splits import compose
        if self.force:
            shutil.rmtree(self.risk, ignore_errors=True)
        train_risk.run(compose([*RISK_OVERRIDES, f"out={self.risk}", f"progress={self.bars}"], "train_risk"))

    def train_agent(self) -> None:
        from sandhop.agents import train_agent
        from sandhop.datasets.splits import compose
        if self.force:
            shutil.rmtree(self.agent, ignore_errors=True)
        cfg = compose([*AGENT_OVERRIDES, f"env.risk.checkpoint={self.risk}", f"out={self.agent}",
                       f"progress={self.bars}"], "train_agent")
        train_agent.run(cfg, self.agent)

    def evaluate(self) -> None:
        from sandhop.agents.evaluate_agent import evaluate_command
        shutil.rmtree(self.eval, ignore_errors=True)
        rc = evaluate_command(policies=f"ppo:{self.agent},static,threshold,oracle", splits="test", out=self.eval,
                              progress=self.bars)
        if rc:
            raise DemoError(f"sandhop evaluate failed (exit {rc}); see above")

    def export(self) -> None:
        from sandhop.agents.export import export
        export(self.risk, self.agent, self.artifact, force=True)

    def live(self) -> None:
        self.live_dir.mkdir(parents=True, exist_ok=True)
        result = {"artifact": str(self.artifact), "suite": self.live_suite()}
        if not self.probes:
            result["probes"] = {"skipped": "--no-probes"}
            return self._save_live(result)
        try:
            result["probes"] = self.live_probes()
        except DemoError as exc:
            self.say(f"    the live attack probes did not run: {exc}")
            result["probes"] = {"skipped": str(exc)}
        self._save_live(result)

    def _save_live(self, result: dict) -> None:
        (self.live_dir / "live.json").write_text(json.dumps(result, indent=1))

    def live_suite(self) -> dict:
        """The suite plain, then under the artifact: wall times and which tests it broke."""
        from sandhop.datasets.record import suite_env
        from sandhop.datasets.suites import pytest_argv
        src = self.source()
        env = suite_env({"PYTHONPATH": str(src / "src")})
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_argv(self.recipe)]
        log = fresh_log(self.live_dir / "suite-audit.jsonl")
        runs = {}
        for name, flags in (("plain", []), ("enforced", [f"--sandhop-enforce={self.artifact}",
                                                          f"--sandhop-audit-log={log}"])):
            junit = self.live_dir / f"suite-{name}.xml"
            started = time.perf_counter()
            proc = subprocess.run(base + flags + [f"--junitxml={junit}"], cwd=src, env=env, capture_output=True,
                                  text=True)
            seconds = time.perf_counter() - started
            if proc.returncode not in (0, 1) or not junit.exists():
                raise DemoError(f"pytest could not run {self.recipe.spec} {name} (exit {proc.returncode}):\n"
                                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            runs[name] = (seconds, junit_outcomes(junit), proc.stdout.strip().splitlines()[-1:])
            self.say(f"    {name}: {runs[name][2][0] if runs[name][2] else ''} ({seconds:.1f} s)")
        (plain_s, plain, _), (enforced_s, enforced, _) = runs["plain"], runs["enforced"]
        broken = sorted(t for t, o in plain.items() if o == "passed" and enforced.get(t) != "passed")
        return {"name": self.recipe.spec, "outcomes_plain": count_outcomes(plain),
                "outcomes_enforced": count_outcomes(enforced), "broken": broken, "plain_s": round(plain_s, 2),
                "enforced_s": round(enforced_s, 2), "overhead": round(enforced_s / plain_s, 3),
                "audit_log": str(log)}

    def live_probes(self) -> dict:
        from sandhop.datasets.probe import ProbeError, can_run, run_probes
        why = can_run()
        if why:
            raise DemoError(f"{why} (the probes run in their own network namespace, as root)")
        log = fresh_log(self.live_dir / "probes-audit.jsonl")
        try:
            run = run_probes(pytest_args=[f"--sandhop-enforce={self.artifact}", f"--sandhop-audit-log={log}",
                                          "--continue-on-collection-errors"],
                             report=self.live_dir / "probes.json")
        except ProbeError as exc:
            raise DemoError(str(exc)) from None
        judged = judge_probes(run.report, log)
        self.say(f"    probes: {len(judged['stopped'])} of {judged['attacks']} attacks stopped, "
                 f"{judged['payloads']} payloads at the attacker, {len(judged['hard_negatives_broken'])} of "
                 f"{judged['hard_negatives']} hard negatives broken")
        return judged

    def report(self) -> Path:
        from sandhop.report import summary_lines, write_report
        live = json.loads((self.live_dir / "live.json").read_text()) if (self.live_dir / "live.json").exists() else {}
        path = write_report(self.out, risk_run=self.risk, agent_run=self.agent, eval_dir=self.eval, live=live)
        print()
        for line in summary_lines(eval_dir=self.eval, live=live):
            print(line)
        return path

    def _live_done(self) -> bool:
        """The live results exist, and hold the probes unless they were not asked for (a run that
        skipped them, e.g. without root, does not stand in for one that can run them)."""
        path = self.live_dir / "live.json"
        if not path.exists():
            return False
        probes = json.loads(path.read_text()).get("probes") or {}
        return not (self.probes and probes.get("skipped"))

    # ----------------------------------------------------------------- all of it
    def run(self) -> int:
        self.say(f"sandhop demo -> {self.out}")
        self.out.mkdir(parents=True, exist_ok=True)
        from sandhop.datasets.record import read_manifest
        recorded = any(r["suite"] == self.recipe.spec and (self.out / "traces" / r["trace"]).exists()
                       for r in read_manifest(self.out / "traces"))
        self.step(1, "record", recorded, f"the real test suite of {self.recipe.spec} (bundled sdist) under "
                  "pytest --sandhop-record", self.record)
        self.step(2, "dataset", (self.out / "dataset.txt").exists(), f"the labelled splits (dataset={DATASET}: "
                  "attack scenarios injected into the bundled traces of real suites)", self.dataset)
        self.step(3, "risk", (self.risk / "evaluation.json").exists(),
                  f"training the risk model ({' '.join(RISK_OVERRIDES)})", self.train_risk)
        self.step(4, "agent", (self.agent / "evaluation.json").exists(),
                  f"training the PPO sandbox manager on its scores ({' '.join(AGENT_OVERRIDES)})", self.train_agent)
        self.step(5, "evaluate", (self.eval / "results.parquet").exists(),
                  "the manager against static tiers, the threshold rule and the oracle (test split)", self.evaluate)
        self.step(6, "export", (self.artifact / "manifest.json").exists(), f"the artifact -> {self.artifact}",
                  self.export)
        self.step(7, "live", self._live_done(),
                  f"{self.recipe.spec} plain and under the artifact, and the live attack probes", self.live)
        self.say(f"[8/{len(STEPS)}] report")
        path = self.report()
        self.say(f"\nreport: {path}")
        return 0


def run_demo(out: Path, *, suite: str = "click", force: bool = False, probes: bool = True, progress=print) -> int:
    if importlib.util.find_spec("pytest") is None:
        raise ImportError("the demo runs a test suite and needs pytest", name="pytest")
    missing = [m for m in ("jax", "flax", "optax", "orbax", "gymnasium", "hydra", "pyarrow")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoError(f"the demo trains models and needs the train extra (missing: {', '.join(missing)}); "
                        "install it with: pip install 'sandhop[all]'")
    return Demo(out, suite=suite, force=force, probes=probes, progress=progress).run()
