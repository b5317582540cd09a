"""`pytest --sandhop-policy`: the live guard inside a pytest run.

One `Enforcer` per pytest process. It starts the guard before conftest files load (so
import-time and collection-time payloads are decided too), gives each test its own config (the
run's policy plus the test's `@pytest.mark.sandhop(tier=..., allow=[...], deny=[...])`), runs
`lockdown` tests in a forked worker under Landlock and seccomp, and reads the violations file
that the guard in this process and in every child process appends to. In enforce mode a test
with a violation fails even if its code swallowed the `SandboxViolation`. Every non-allow
decision and every test outcome also goes to the audit log when one is asked for.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from sandhop.enforcement import events as ev
from sandhop.enforcement.boot import make_boot_dir
from sandhop.enforcement.engine import PolicyEngine, SandboxConfig, literal_glob
from sandhop.enforcement.guard import Guard, GuardSpec
from sandhop.enforcement.policy import PolicyError
from sandhop.enforcement.tracer import Tracer


class Enforcer:
    def __init__(self, policy: str | None, *, mode: str = "enforce", audit_log: str | None = None,
                 allow_degraded: bool = False, basetemp: str | None = None, artifact: str | None = None,
                 fallback_tier: str | None = None, suite: str = "") -> None:
        self.policy = policy
        self.suite = suite
        self.artifact_path = artifact
        self.fallback_tier = fallback_tier
        self.artifact = None
        self.manager = None
        self.fallback_note: str | None = None
        self.managed = {"actions": 0, "episodes": 0, "children": 0, "events": 0, "quiet": 0}
        self.notices: list[str] = []   # what children said of the manager (could not load it)
        # A --basetemp outside the system temp folder is still the tests' temp folder.
        self.runner_grants = (f"fs.* {literal_glob(os.path.realpath(basetemp))}/**",) if basetemp else ()
        self.mode = mode
        self.audit_path = audit_log
        self.allow_degraded = allow_degraded
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self.run_dir = Path(tempfile.mkdtemp(prefix="sandhop-run-"))
        self.violations_path = self.run_dir / "violations.jsonl"
        self._offset = 0
        self._pending: dict[str, list[dict]] = {}
        self.totals = {"deny": 0, "redirect": 0}
        self.failed_tests: list[str] = []
        self.audit = None
        self._pid = os.getpid()
        self._configs: dict[str, SandboxConfig] = {}

    # ----------------------------------------------------------------- start
    def start(self, tracer: Tracer | None) -> Tracer:
        if tracer is None:
            tracer = Tracer(None, time.monotonic_ns(), ev.Roots.current(), phase="collect",
                            own=(str(self.run_dir),))
            boot = make_boot_dir(self.run_dir / "boot")
            tracer.boot_dir = str(boot)  # explicit env dicts of children get it too
            pythonpath = os.environ.get("PYTHONPATH")
            os.putenv("PYTHONPATH", os.pathsep.join([str(boot)] + ([pythonpath] if pythonpath else [])))
            tracer.install()
        else:
            tracer._own = tracer._own + (os.path.realpath(self.run_dir),)
        self.tracer = tracer
        engine = PolicyEngine(tracer.roots)
        if self.artifact_path:
            self._load_artifact(engine)
        try:
            # children of a managed test run the manager too (loaded when they first need it)
            spec = GuardSpec(policy=self.policy, grants=self.runner_grants, mode=self.mode,
                             violations=str(self.violations_path), run_id=self.run_id,
                             artifact=str(self.artifact.root) if self.artifact is not None else "",
                             events=bool(self.audit_path))
            self.guard = Guard(tracer, engine, spec)
        except PolicyError as exc:
            option = "--sandhop-fallback-tier" if self.fallback_note else "--sandhop-policy"
            raise pytest.UsageError(f"{option} {self.policy}: {exc}") from None
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.engine = engine
        # The audit log (and its key) is opened before the guard decides anything.
        if self.audit_path:
            from sandhop.enforcement.audit import AuditLog
            Path(self.audit_path).parent.mkdir(parents=True, exist_ok=True)
            self.audit = AuditLog(self.audit_path)
            # The key signs the log; the code under test never needs to see it.
            os.environ.pop("SANDHOP_AUDIT_KEY", None)
            self.audit.append({"kind": "session", "event": "start", "run_id": self.run_id,
                               "policy": self.policy, "mode": self.mode, "pid": os.getpid(), "suite": self.suite,
                               "t": time.time(), **self._artifact_summary()})
        if self.artifact is not None:
            from sandhop.enforcement.runtime import Manager
            self.manager = Manager(self.artifact, engine)
            self.guard.use_manager(self.manager, self.guard.set_child_config)
            self.guard.record_events = self.audit is not None
        self.guard.install()
        try:
            self.guard.selftest()
        except RuntimeError as exc:
            raise pytest.UsageError(str(exc)) from None
        for key, value in tracer.child_environment().items():
            os.putenv(key, value)
        # atexit is last-in first-out: registered now, this runs after the tests' own handlers.
        from sandhop.enforcement import guard as guard_module
        guard_module._real_atexit_register(self._at_exit)
        return tracer

    def _load_artifact(self, engine: PolicyEngine) -> None:
        """Verify the artifact before anything is enforced; a problem stops the run unless a
        static fallback tier was asked for explicitly."""
        from sandhop.enforcement.runtime import Artifact, ArtifactError
        try:
            self.artifact = Artifact.load(self.artifact_path, engine)
        except ArtifactError as exc:
            if not self.fallback_tier:
                raise pytest.UsageError(f"--sandhop-enforce {self.artifact_path}: {exc}. The run does not start "
                                        "(fail closed); to run a static tier instead, pass "
                                        "--sandhop-fallback-tier TIER") from None
            self.policy = self.fallback_tier
            self.fallback_note = (f"the artifact {self.artifact_path} cannot be used ({exc}); running the static "
                                  f"tier {self.fallback_tier} instead (--sandhop-fallback-tier)")
            import sys
            sys.stderr.write(f"sandhop: {self.fallback_note}\n")
            return
        self.policy = self.artifact.base_tier

    def _audit(self, record: dict) -> None:
        # The log's writes (a batch flush may come in any hook) are the guard's own footprint,
        # never decided under a test's or collector's config.
        self.guard._busy(self.audit.append, record)

    def _artifact_summary(self) -> dict:
        if self.artifact is not None:
            from sandhop.enforcement.runtime import MANIFEST, sha256_file
            return {"artifact": str(self.artifact.root),
                    "artifact_manifest_sha256": sha256_file(self.artifact.root / MANIFEST)}
        if self.fallback_note:
            return {"artifact": str(self.artifact_path), "fallback": self.fallback_note}
        return {}

    # ----------------------------------------------------------------- per test
    def config_for(self, item: pytest.Item) -> SandboxConfig:
        """The run's policy, then the test's marker (closest marker wins for `tier`)."""
        config = self.guard.base
        marker = item.get_closest_marker("sandhop")
        if marker is None:
            return config
        unknown = set(marker.kwargs) - {"tier", "allow", "deny"}
        if marker.args or unknown:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.sandhop takes only tier=, allow=[...], "
                                    f"deny=[...] (got {marker.args or sorted(unknown)})")
        tier = marker.kwargs.get("tier")
        allow = tuple(_as_list(marker.kwargs.get("allow", ())))
        deny = tuple(_as_list(marker.kwargs.get("deny", ())))
        try:
            return self.engine.config(tier or config.tier, grants=config.grants + allow,
                                      revocations=config.revocations + deny)
        except (PolicyError, ValueError) as exc:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.sandhop: {exc}") from None

    def _begin(self, item: pytest.Item) -> None:
        config = self._configs.pop(item.nodeid, None) or self.config_for(item)
        self.guard.begin_test(item.nodeid, config)
        self.guard.set_child_config(config)  # children of this test enforce its config too

    def _end(self) -> None:
        self.guard.end_test()
        self.guard.set_child_config(self.guard.base)

    @pytest.fixture
    def sandhop_guard(self) -> "Hopper":
        """Hop the running test: `sandhop_guard.hop_to("high")` escalates at once."""
        return Hopper(self.guard.hop_to)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        config = self._configs[item.nodeid] = self.config_for(item)
        if config.tier != "lockdown":
            return None
        from sandhop.enforcement import lockdown
        spec = lockdown.LockdownSpec(writable=self._writable(item),
                                     connect_ports=_granted_ports(config))
        return lockdown.run_forked(item, spec, allow_degraded=self.allow_degraded, nextitem=nextitem)

    def _writable(self, item: pytest.Item) -> tuple[str, ...]:
        # The basetemp is made here, in the parent: the worker may not create it once locked.
        factory = getattr(item.config, "_tmp_path_factory", None)
        base = str(factory.getbasetemp()) if factory is not None else tempfile.gettempdir()
        return (base, str(self.run_dir), os.path.join(self.tracer.roots.tmp, "sandhop-overlay"),
                *((self.tracer.spool_dir,) if self.tracer.spool_dir else ()))

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item):
        self._begin(item)
        yield

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item):
        yield
        self._end()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        self._apply(outcome.get_result(), item.nodeid)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(self, collector):
        outcome = yield
        self._apply(outcome.get_result(), collector.nodeid)

    def _apply(self, report, nodeid: str) -> None:
        """Fail a report whose test (or collector) had a denial, even one its code swallowed."""
        self._read_violations()
        records = self._pending.pop(nodeid, [])
        tampered = self.guard.integrity()
        if tampered:
            self._repair()
            records.append({"decision": "deny", "category": "sys.tamper", "target": "sandhop.guard",
                            "rule": "guard:integrity", "test_id": nodeid,
                            "message": "sandhop: the guard was tampered with: " + "; ".join(tampered)})
            if self.audit is not None and os.getpid() == self._pid:
                self._audit({"kind": "decision", "run_id": self.run_id, "test_id": nodeid,
                                   "category": "sys.tamper", "op": "integrity", "target": "sandhop.guard",
                                   "target_class": "interpreter", "decision": "deny", "rule": "guard:integrity",
                                   "tier": self.guard.config.tier, "mode": self.mode,
                                   "reason": "; ".join(tampered)})
        if not records:
            return
        denies = [r for r in records if r.get("decision") == "deny"]
        lines = [_report_line(r) for r in records]
        report.sections.append((f"sandhop {self.mode}", "\n".join(lines)))
        if self.mode == "enforce" and denies and report.passed:
            report.outcome = "failed"
            report.longrepr = "\n".join(["sandhop: this test performed operations the sandbox denied "
                                         "(its code caught the SandboxViolation):"] +
                                        [r["message"] for r in denies])

    def _repair(self) -> None:
        """Put the guard back for the tests that follow."""
        from sandhop.enforcement import guard as guard_module
        t = self.tracer
        t.gate, t.enabled = self.guard.gate, True
        t._tls.busy = False
        self.guard.mode = self.guard.spec.mode
        guard_module._intercept(self.guard)

    def _read_violations(self) -> None:
        # Called after every phase of every test: a size check keeps the common case cheap.
        try:
            if os.stat(self.violations_path).st_size <= self._offset:
                return
            data = self.guard._busy(_read_from, self.violations_path, self._offset)
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            kind = rec.get("kind", "decision")
            if kind == "event":
                pass  # an allowed scored event: for the audit log only
            elif kind == "notice":
                self.notices.append(rec.get("message", ""))
            elif kind == "episode":
                self.managed["children" if rec.get("child") else "episodes"] += 1
                self.managed["events"] += int(rec.get("events", 0))
                self.managed["quiet"] += int(rec.get("quiet", 0))
            elif kind == "action":
                self.managed["actions"] += 1
                self._pending.setdefault(rec.get("test_id", ""), []).append(rec)
            else:
                self.totals[rec.get("decision", "deny")] = self.totals.get(rec.get("decision", "deny"), 0) + 1
                self._pending.setdefault(rec.get("test_id", ""), []).append(rec)
            if self.audit is not None and os.getpid() == self._pid:  # not in a forked worker
                self._audit(rec)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed and report.nodeid not in self.failed_tests:
            self.failed_tests.append(report.nodeid)
        if self.audit is not None and os.getpid() == self._pid and (report.when == "call" or report.failed or report.skipped):
            self._audit({"kind": "test", "run_id": self.run_id, "test_id": report.nodeid,
                               "phase": report.when, "outcome": report.outcome})

    # ----------------------------------------------------------------- finish
    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.manager is not None:
            self.guard._end_episode()  # a collector's episode has no test end
        self._read_violations()
        # Denials no test report took (session hooks of the suite): the run fails.
        self.unreported = [r for records in self._pending.values() for r in records if r.get("decision") == "deny"]
        self._pending.clear()
        if self.unreported and self.mode == "enforce" and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.audit is not None:
            self._audit({"kind": "session", "event": "finish", "run_id": self.run_id,
                               "exitstatus": int(exitstatus), "denied": self.totals.get("deny", 0),
                               "redirected": self.totals.get("redirect", 0), "t": time.time()})
            self.guard._busy(self.audit.close)

    def _at_exit(self) -> None:
        """Runs after every other exit handler (registered first): denials made by handlers that
        tests registered fail the process, which has no test report left to fail."""
        if os.getpid() != self._pid:  # a forked child of a test leaving normally
            return
        late = []
        try:
            data = self.guard._busy(_read_from, self.violations_path, self._offset)
            late = [json.loads(line) for line in data.splitlines() if line.strip()]
        except (OSError, ValueError):
            pass
        self.guard._busy(shutil.rmtree, self.run_dir, ignore_errors=True)
        denied = [r for r in late if r.get("decision") == "deny"]
        if denied and self.mode == "enforce":
            import sys
            for r in denied:
                sys.stderr.write(r.get("message", "sandhop: an operation was denied") + "\n")
            sys.stderr.write(f"sandhop: {len(denied)} operations were denied after the session ended "
                             "(exit handlers registered by tests); failing the run\n")
            sys.stderr.flush()
            os._exit(1)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        tr = terminalreporter
        verb = "denied" if self.mode == "enforce" else "would have denied"
        if self.fallback_note:
            tr.write_line(f"sandhop: {self.fallback_note}", red=True)
        what = f"policy {self.policy}"
        if self.artifact is not None:
            m = self.managed
            children = f" and {m['children']} child processes" if m["children"] else ""
            what = (f"artifact {self.artifact.root} (base tier {self.policy}; {m['events']} events in "
                    f"{m['episodes']} tests and collectors{children}, {m['events'] - m['quiet']} scored and "
                    f"{m['quiet']} quiet, {m['actions']} manager actions)")
        tr.write_line(f"sandhop: {what} ({self.mode}): {verb} {self.totals.get('deny', 0)} "
                      f"operations, redirected {self.totals.get('redirect', 0)}"
                      + (f"; audit log {self.audit_path}" if self.audit_path else ""),
                      yellow=bool(self.totals.get("deny")))
        for message in dict.fromkeys(self.notices):
            tr.write_line(message, yellow=True)
        for r in getattr(self, "unreported", []):
            tr.write_line(f"sandhop: outside any test: {r.get('message', '')}", red=self.mode == "enforce")


def _report_line(r: dict) -> str:
    if r.get("kind") == "action":
        return (f"{r['action']:8} at {r['category']} {r['target']} (risk {r['risk']:.3f}): "
                f"{r['tier_before']} -> {r['tier']}")
    said = f" (risk {r['risk']:.3f})" if "risk" in r else ""
    return f"{r['decision']:8} {r['category']} {r['target']}  [{r['rule']}]{said}" + (
        f"\n         {r.get('fix')}" if r.get("fix") else "")


class Hopper:
    """What a test may do to its own sandbox: hop (escalation now, de-escalation at the boundary)."""

    __slots__ = ("hop_to",)

    def __init__(self, hop_to) -> None:
        self.hop_to = hop_to


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def _granted_ports(config: SandboxConfig) -> tuple[int, ...]:
    """TCP ports a lockdown test was granted by its marker (Landlock filters ports, not hosts)."""
    ports = []
    for rule in config.grants:
        words = rule.split()
        if len(words) == 2 and words[0] in ("net.connect", "net.*"):
            port = words[1].rpartition(":")[2]
            if port.isdigit():
                ports.append(int(port))
    return tuple(sorted(set(ports)))

