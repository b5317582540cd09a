"""The sandhop pytest plugin: `--sandhop-record DIR` records a trace of the test run;
`--sandhop-policy TIER_OR_FILE` enforces a policy on it (see `guard.py`); `--sandhop-enforce
ARTIFACT_DIR` enforces with an exported risk model and sandbox manager (see `runtime.py`).

Inert unless one of its options is given. The audit hook goes in before conftest files are
loaded, so import-time and collection-time events are captured (phase `collect`, attributed to
the collector being collected); then every event is attributed to the running test's node id and
phase. The trace is spooled as JSON lines while the tests run and converted to Parquet at the
end (that needs pyarrow; without it the spool is kept and `sandhop trace convert` finishes it).
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path

import pytest

from sandhop.enforcement import events as ev
from sandhop.enforcement.boot import make_boot_dir
from sandhop.enforcement.tracer import Tracer

SPOOL_DIRNAME = ".spool"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandhop", "sandhop: record and sandbox what tests do")
    group.addoption("--sandhop-record", metavar="DIR", default=None,
                    help="record a trace of this run (every file, network, process, import, "
                         "native-code and env event) into the Parquet dataset DIR")
    group.addoption("--sandhop-suite", metavar="NAME==VERSION", default=None,
                    help="suite name stored with the trace and the audit log (default: <rootdir name>==local)")
    group.addoption("--sandhop-policy", metavar="TIER_OR_FILE", default=None,
                    help="enforce a tier (observe, low, medium, high, lockdown) or a policy file")
    group.addoption("--sandhop-enforce", metavar="ARTIFACT_DIR", default=None,
                    help="enforce with an exported artifact (`sandhop export`): its risk model scores every "
                         "event and its sandbox manager hops tiers and grants or revokes categories per test")
    group.addoption("--sandhop-fallback-tier", metavar="TIER", default=None,
                    help="with --sandhop-enforce: if the artifact cannot be used, run this static tier instead "
                         "(and say so); without it such a run does not start")
    group.addoption("--sandhop-mode", choices=("enforce", "audit"), default="enforce",
                    help="enforce: deny and fail the test; audit: allow, record what would be denied")
    group.addoption("--sandhop-audit-log", metavar="PATH", default=None,
                    help="append every non-allow decision and each test's outcome to this "
                         "hash-chained audit log (verify with `sandhop audit verify PATH`)")
    group.addoption("--sandhop-allow-degraded", action="store_true", default=False,
                    help="run lockdown tests even where the kernel cannot enforce it (says what is not enforced)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sandhop(tier=None, allow=(), deny=()): this test's sandbox: "
                            "a tier or policy file, and rules to grant or revoke, e.g. "
                            "allow=['net.connect example.com:443']")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser, args) -> None:
    ns = early_config.known_args_namespace
    out = getattr(ns, "sandhop_record", None)
    policy = getattr(ns, "sandhop_policy", None)
    artifact = getattr(ns, "sandhop_enforce", None)
    fallback = getattr(ns, "sandhop_fallback_tier", None)
    if policy and artifact:
        raise pytest.UsageError("--sandhop-policy and --sandhop-enforce both say what to enforce; pass one")
    if fallback and not artifact:
        raise pytest.UsageError("--sandhop-fallback-tier only applies with --sandhop-enforce ARTIFACT_DIR "
                                "(for a static tier alone, use --sandhop-policy TIER)")
    if not out and not policy and not artifact:
        return
    pm = early_config.pluginmanager
    tracer = None
    if out:
        suite = ns.sandhop_suite or f"{Path(early_config.invocation_params.dir).name}==local"
        recorder = Recorder(Path(out), suite, list(early_config.invocation_params.args))
        pm.register(recorder, "sandhop-recorder")
        tracer = recorder.start()
    if policy or artifact:
        from sandhop.enforcement.enforcer import Enforcer
        enforcer = Enforcer(policy, mode=ns.sandhop_mode, audit_log=ns.sandhop_audit_log,
                            allow_degraded=ns.sandhop_allow_degraded,
                            basetemp=getattr(ns, "basetemp", None), artifact=artifact, fallback_tier=fallback,
                            suite=ns.sandhop_suite or f"{Path(early_config.invocation_params.dir).name}==local")
        pm.register(enforcer, "sandhop-enforcer")
        tracer = enforcer.start(tracer)
    pm.register(Attribution(tracer), "sandhop-attribution")


class Attribution:
    """Attributes events (and children spawned) to the collector or test running, and its phase."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config) -> None:
        # The initial conftests are loaded (their import-time code was `collect`); what plugins
        # do to configure themselves is the runner's own work.
        self.tracer.set_context("", "session")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(self, collector):
        previous = (self.tracer.test_id, self.tracer.phase)
        self.tracer.set_context(collector.nodeid, "collect")
        yield
        self.tracer.set_context(*previous)

    def _during(self, item, phase: str):
        self.tracer.set_context(item.nodeid, phase)
        yield
        self.tracer.set_context("", "session")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item):
        yield from self._during(item, "setup")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        yield from self._during(item, "call")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item):
        yield from self._during(item, "teardown")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_collection(self, session):
        yield
        self.tracer.set_context("", "session")


class Recorder:
    """Owns one recording: the tracer of the pytest process, the spool and the outcomes."""

    def __init__(self, out: Path, suite: str, argv: list[str]) -> None:
        self.out = out.resolve()
        self.suite = suite
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self.spool = self.out / SPOOL_DIRNAME / self.run_id
        self.argv = argv
        self.outcomes: dict[str, str] = {}
        self.result_path: Path | None = None
        self.error: str | None = None
        self.started = time.time()

    def start(self) -> Tracer:
        self.spool.mkdir(parents=True, exist_ok=True)
        boot = make_boot_dir(self.spool / "boot")
        self._write_run_json(status="recording")
        self._outcomes_fd = os.open(self.spool / "outcomes.jsonl",
                                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.tracer = Tracer(str(self.spool), time.monotonic_ns(), ev.Roots.current(),
                             phase="collect", boot_dir=str(boot))
        # Children inherit these through the C environment; os.environ (what tests see) is untouched.
        for key, value in self.tracer.child_environment().items():
            os.putenv(key, value)
        pythonpath = os.environ.get("PYTHONPATH")
        os.putenv("PYTHONPATH", os.pathsep.join([str(boot)] + ([pythonpath] if pythonpath else [])))
        self.tracer.install()
        return self.tracer

    def _write_run_json(self, **extra) -> None:
        info = {"run_id": self.run_id, "suite": self.suite, "argv": self.argv,
                "python": platform.python_version(), "implementation": sys.implementation.name,
                "platform": platform.platform(), "started": self.started,
                "schema_version": ev.SCHEMA_VERSION, **extra}
        (self.spool / "run.json").write_text(json.dumps(info, indent=1))

    # ----------------------------------------------------------------- outcomes
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = _outcome(report)
        if outcome is None:
            return
        self.outcomes[report.nodeid] = outcome
        line = json.dumps({"test_id": report.nodeid, "outcome": outcome}) + "\n"
        busy = getattr(self.tracer._tls, "busy", False)
        self.tracer._tls.busy = True
        try:
            os.write(self._outcomes_fd, line.encode())
        finally:
            self.tracer._tls.busy = busy

    # ----------------------------------------------------------------- finish
    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        self.tracer.set_context("", "session")
        self.tracer.stop()
        os.close(self._outcomes_fd)
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        self._write_run_json(status="finished", exitstatus=int(exitstatus), outcomes=counts,
                             wall_s=round(time.time() - self.started, 3),
                             decode_failures=self.tracer.decode_failures,
                             lost_events=self.tracer.lost_events)
        try:
            from sandhop.datasets import traces
        except ImportError as exc:  # base install (no pyarrow) or a throwaway venv
            self.error = (f"the trace stays spooled in {self.spool} because Parquet support is not "
                          f"importable here ({exc}); finish it with: sandhop trace convert {self.spool} {self.out}")
            return
        try:
            # The suite's own warning filters (often "error") must not turn ours into failures.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.result_path = traces.convert_spool(self.spool, self.out)
        except Exception as exc:  # keep the spool: nothing recorded is lost
            self.error = f"could not convert the spool {self.spool}: {exc}"
            return
        self.notes = [str(w.message) for w in caught]
        shutil.rmtree(self.spool, ignore_errors=True)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        tr = terminalreporter
        if self.tracer.lost_events:
            tr.write_line(f"sandhop: {self.tracer.lost_events} events of this process could not be "
                          f"written to {self.spool} (disk full?); the trace is incomplete", red=True)
        for note in getattr(self, "notes", []):
            tr.write_line(f"sandhop: {note}", yellow=True)
        if self.result_path is not None:
            tr.write_line(f"sandhop: recorded {self.suite} ({len(self.outcomes)} tests) into {self.result_path}")
        elif self.error:
            tr.write_line(f"sandhop: {self.error}", yellow=True)


def _outcome(report: pytest.TestReport) -> str | None:
    """The test's outcome as far as this report tells (None: this report changes nothing)."""
    if report.when == "setup":
        if report.skipped:
            return "skipped"
        return "error" if report.failed else None
    if report.when == "call":
        if report.failed:
            return "failed"
        return "skipped" if report.skipped else "passed"
    return "error" if report.failed else None
