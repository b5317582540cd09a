"""The live guard: decides every operation a test performs, and allows, denies or redirects it.

The guard sits on the recorder's decoder (`tracer.Tracer`): every audit event is decoded and
normalised there, then handed to `Guard.gate`, which asks the one `PolicyEngine`. A denial raises
`SandboxViolation` (a `PermissionError`) out of the audit hook, so the operation never happens.
Every non-allow decision is also written, out of band, as a JSON line to the run's violations
file, so a test that swallows the exception still fails (the plugin reads the file).

Audit hooks can only observe or raise, so redirection intercepts at the narrowest point:
`open`/`io.open`/`os.open` (writes into a per-test overlay, later reads see it), `os.remove`/
`os.unlink` (a whiteout in the overlay), `socket.socket.connect`/`connect_ex` (to a loopback
sinkhole), `socket.socket.sendto` (dropped), DNS lookups (answered "no such name" by raising
`socket.gaierror` from the hook) and `os.environ` reads (a redirected secret looks unset). An
operation whose decision is redirect but which arrives by another route (`_io.open`, `posix`
calls) cannot be redirected, so it is denied: the guard fails closed.

This is a tripwire, not a boundary: native code can do anything. The `lockdown` tier is where the
kernel (Landlock, seccomp) enforces; see `lockdown.py`.
"""

from __future__ import annotations

import _posixsubprocess
import atexit
import builtins
import hashlib
import io
import json
import os
import posix
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field, replace

from sandhop.enforcement import events as ev
from sandhop.enforcement.engine import Decision, PolicyEngine, SandboxConfig
from sandhop.enforcement.tracer import (ENV_GUARD, Blocked, Tracer, _shell_detail, _spawned_commands,
                                        _TracedEnviron, _unguarded_python)

MODES = ("enforce", "audit")
_NET_SEND = ("net.connect", "net.send")
_FS = frozenset({"fs.read", "fs.write", "fs.delete", "fs.meta"})
_IP_CLASSES = frozenset({"loopback", "private_net", "link_local", "metadata_ip", "public_net",
                         "multicast", "unspecified"})


class SandboxViolation(PermissionError):
    """An operation the sandbox denied. The message says what, which rule, and how to allow it."""

    def __init__(self, message: str, record: dict | None = None) -> None:
        super().__init__(message)
        self.record = record or {}


@dataclass(frozen=True)
class GuardSpec:
    """What a child process needs to enforce the same config as its parent (one env variable):
    the config, and under a learned manager the artifact it loads at its first event that is not
    quiet (`events`: the parent keeps an audit log, so allowed scored events are written too)."""

    policy: str
    grants: tuple[str, ...] = ()
    revocations: tuple[str, ...] = ()
    mode: str = "enforce"
    violations: str = ""
    run_id: str = ""
    artifact: str = ""
    events: bool = False

    def to_json(self) -> str:
        return json.dumps({"policy": self.policy, "grants": list(self.grants),
                           "revocations": list(self.revocations), "mode": self.mode,
                           "violations": self.violations, "run_id": self.run_id,
                           **({"artifact": self.artifact, "events": self.events} if self.artifact else {})})

    @classmethod
    def from_json(cls, text: str) -> "GuardSpec":
        d = json.loads(text)
        return cls(policy=d["policy"], grants=tuple(d.get("grants", ())),
                   revocations=tuple(d.get("revocations", ())), mode=d.get("mode", "enforce"),
                   violations=d.get("violations", ""), run_id=d.get("run_id", ""),
                   artifact=d.get("artifact", ""), events=bool(d.get("events", False)))

    def with_config(self, config: SandboxConfig) -> "GuardSpec":
        return replace(self, policy=config.tier, grants=config.grants, revocations=config.revocations)


def own_paths(spec_json: str) -> tuple[str, ...]:
    """Folders whose use is the guard's own footprint (never decided, never recorded)."""
    spec = GuardSpec.from_json(spec_json)
    return (os.path.dirname(spec.violations),) if spec.violations else ()


@dataclass
class _TestState:
    test_id: str = ""
    config: SandboxConfig | None = None
    in_test: bool = False                   # redirects into an overlay need a running test
    redirected: set = field(default_factory=set)   # portable targets written to the overlay
    whiteouts: set = field(default_factory=set)    # portable targets deleted in the overlay
    names: dict = field(default_factory=dict)      # ip -> host names it was looked up as


class Guard:
    """Enforces one `SandboxConfig` per test in this process (and, through the environment, in
    its child Python processes)."""

    def __init__(self, tracer: Tracer, engine: PolicyEngine, spec: GuardSpec) -> None:
        if spec.mode not in MODES:
            raise ValueError(f"--sandhop-mode must be one of {', '.join(MODES)}, not {spec.mode!r}")
        self.tracer = tracer
        self.engine = engine
        self.spec = spec
        self.base = engine.config(spec.policy, grants=spec.grants, revocations=spec.revocations)
        self.roots = tracer.roots          # as the run started (HOME may be faked later)
        self.home = tracer.roots.home
        self.mode = spec.mode
        self.state = _TestState(test_id=tracer.test_id, config=self.base)
        self.sinkhole: _Sinkhole | None = None
        self._suite_root = tracer.roots.cwd.rstrip("/") + "/"
        self._runner_roots = tuple(p.rstrip("/") + "/" for p in (*tracer.roots.site, tracer.roots.python,
                                                                 tracer.roots.stdlib, *tracer.roots.other_pythons)
                                   if p) + (os.path.dirname(os.path.abspath(__file__)) + "/",)
        self._vfd = -1
        self._withheld: dict = {}
        self._lock = threading.Lock()
        # The learned sandbox manager (`runtime.Manager`) when enforcing an artifact: it sets each
        # event's config before the engine decides it. `on_config` hears of every change it makes.
        self.manager = self._expected_manager = None
        self.on_config = None
        self.record_events = False   # also write allowed scored events (an audit log is kept)
        self._manager_lock = threading.Lock()
        # A child process of a managed test: the artifact its manager is loaded from at the first
        # event that is not quiet (most children never meet one), and the quiet events before it.
        self.child = False
        self._child_config: SandboxConfig | None = None   # what children started now enforce
        self._child_artifact = ""
        self._early: list[tuple] = []

    @classmethod
    def from_env(cls, tracer: Tracer, spec_json: str) -> "Guard":
        spec = GuardSpec.from_json(spec_json)
        guard = cls(tracer, PolicyEngine(tracer.roots), spec)
        guard.child = True
        if spec.artifact:
            guard._child_artifact = spec.artifact
            guard.record_events = spec.events
        guard.install()
        return guard

    # ----------------------------------------------------------------- lifecycle
    def install(self) -> None:
        """Attach to the tracer and intercept what must be redirected. Idempotent per process."""
        self.tracer.gate = self.gate
        self.tracer.own_files = self._own_file
        self.tracer.extra_env[ENV_GUARD] = self.spec.to_json()
        self._child_config = self.base
        self._open_violations()
        os.register_at_fork(after_in_child=self._after_fork)
        _intercept(self)
        # Secrets the config hides from this process must not reach programs it starts either
        # (a non-Python child reads the C environment, which os.environ's redirect cannot filter).
        data = os.environ._data
        self._withheld = {k: data[k] for k in list(data)
                          if ev.is_secret_env_name(os.fsdecode(k)) and not os.fsdecode(k).startswith("SANDHOP_")}
        self._apply_withheld(self.base)

    def _apply_withheld(self, config: SandboxConfig) -> None:
        for key, value in self._withheld.items():
            name = os.fsdecode(key)
            if self.engine.decide_target("env.read", name, "env.secret", config).effect == "allow":
                self._busy(os.putenv, key, value)
            else:
                self._busy(os.unsetenv, key)

    def selftest(self) -> None:
        """Prove the audit hook is live: code that ran earlier can stop `sys.addaudithook` from
        adding it (CPython then skips the hook silently)."""
        import sys
        self.tracer.selftest_ok = False
        sys.audit("sandhop.selftest")
        if not self.tracer.selftest_ok:
            raise RuntimeError("sandhop: the guard's audit hook is not installed (code that ran before "
                               "sandhop blocked sys.addaudithook); refusing to run unguarded")

    def _open_violations(self) -> None:
        if self.spec.violations:
            self._vfd = self._busy(os.open, self.spec.violations,
                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def use_manager(self, manager, on_config=None) -> None:
        """Enforce with a learned manager (`runtime.Manager`) from now on."""
        self.manager = self._expected_manager = manager
        self.on_config = on_config

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._manager_lock = threading.Lock()
        self.sinkhole = None  # its thread did not survive the fork

    def begin_test(self, test_id: str, config: SandboxConfig | None = None) -> None:
        """A new test: its own config (base + marker), overlay and DNS memory; nothing carries over."""
        self.state = _TestState(test_id=test_id, config=config or self.base, in_test=True)
        if config is not None and config is not self.base and self._withheld:
            self._apply_withheld(config)

    def end_test(self) -> None:
        if self.manager is not None:
            self._end_episode()
        st = self.state
        self.state = _TestState(test_id="", config=self.base)
        if st.config is not self.base and self._withheld:
            self._apply_withheld(self.base)
        if st.redirected or st.whiteouts:
            self._busy(shutil.rmtree, self._overlay_root(st), ignore_errors=True)

    @property
    def config(self) -> SandboxConfig:
        return self.state.config or self.base

    def integrity(self) -> list[str]:
        """What test code changed in the guard's wiring (checked by the plugin after each phase:
        a tripwire for tampering that the hook itself cannot see)."""
        t = self.tracer
        problems = []
        if getattr(t.gate, "__func__", None) is not Guard.gate or getattr(t.gate, "__self__", None) is not self:
            problems.append("the tracer's gate was replaced")
        if not t.enabled:
            problems.append("the tracer was disabled")
        if getattr(t._tls, "busy", False):
            problems.append("the guard's own-footprint flag was left set")
        if self.mode != self.spec.mode:
            problems.append(f"the mode was changed to {self.mode!r}")
        if _installed and _installed[0] is not self:
            problems.append("the interceptors were pointed at another guard")
        if type(os.environ) is not _TracedEnviron:
            problems.append("os.environ is no longer traced (its class was changed back)")
        if self.manager is not self._expected_manager:
            problems.append("the learned sandbox manager was replaced or removed")
        if "decide" in vars(self) or "gate" in vars(self):
            problems.append("the guard's decision method was replaced")
        return problems

    def hop_to(self, tier: str) -> SandboxConfig:
        """Escalate now, or queue a de-escalation for the test boundary (DESIGN 3.2)."""
        self.state.config = self.engine.hop(self.config, tier)
        return self.state.config

    def _overlay_root(self, st: _TestState) -> str:
        return os.path.join(self.tracer.roots.tmp, "sandhop-overlay", self.spec.run_id or str(os.getpid()),
                            hashlib.sha1(st.test_id.encode()).hexdigest()[:16])

    # ----------------------------------------------------------------- deciding
    def enforcing(self) -> bool:
        # Outside tests and collection (the session phase) the runner does its own work; what
        # the suite's own code does there (conftest hooks, atexit handlers) is still decided.
        return (self.tracer.phase != "session" or getattr(self.tracer._tls, "from_test", False)
                or self._suite_code_running())

    def _suite_code_running(self) -> bool:
        import sys
        frame = sys._getframe(2)
        depth = 0
        while frame is not None and depth < 64:
            filename = frame.f_code.co_filename
            if filename.startswith(self._suite_root) and not filename.startswith(self._runner_roots):
                return True
            frame = frame.f_back
            depth += 1
        return False

    def decide(self, category: str, target: str, cls: str) -> Decision:
        config = self.config
        if category in _NET_SEND and cls != "unix":
            views = self._address_views(target, cls)
            if len(views) > 1:
                return self.engine.decide_all(views, config)
        return self.engine.decide_target(category, target, cls, config)

    def _address_views(self, target: str, cls: str) -> list:
        """The address as given, plus the names it was looked up as (allow-lists name hosts)."""
        host, port = ev.split_address(target)
        views = [_View("net.connect", target, cls)]
        for name in sorted(self.state.names.get(host, ())):
            views.append(_View("net.connect", ev.format_address(name, port), ev.host_class(name)))
        return views

    def gate(self, category: str, op: str, target: str, detail: str, cls: str) -> None:
        """Called by the tracer with every decoded event; raises `Blocked` to stop it."""
        if not self.enforcing():
            return
        d, said = self.decide_event(category, op, target, cls, self._decision)
        self._act(category, op, target, detail, cls, d, said)

    def decide_event(self, category: str, op: str, target: str, cls: str, decide=None) -> tuple[Decision, dict | None]:
        """Decide one event of the running test, letting the learned manager (if any) act on the
        test's config first: (decision, what the manager said or None). For events that arrive
        outside the audit hook too (browser requests and DOM changes)."""
        said = None
        if self._child_artifact and self.manager is None and self.tracer.test_id:
            self._child_manager(category, op, target, cls)
        if self.manager is not None and self.tracer.test_id:
            said = self._manage(category, op, target, cls)
        d = (decide or self.decide)(category, target, cls)
        if said is not None:
            self._busy(self.manager.decided, d.effect)
            if self.record_events and d.effect == "allow":
                # every scored event reaches the audit log (non-allow ones as decisions), so a
                # log becomes a whole trace for the learning loop (`sandhop audit export`)
                self._write({"kind": "event", "run_id": self.spec.run_id, "test_id": self.tracer.test_id,
                             "phase": self.tracer.phase, "pid": os.getpid(),
                             "t_ns": time.monotonic_ns() - self.tracer.t0_ns, "category": category, "op": op,
                             "target": target, "target_class": cls, "decision": "allow",
                             "tier": self.config.tier, "risk": _rounded(said["risk"]), "action": said["action"]})
        return d, said

    def _decision(self, category: str, target: str, cls: str) -> Decision:
        if category in _FS and self.tracer.roots.home != self.home:
            # HOME was changed (a fake home): the real one's secrets stay what they were.
            original = self._original_view(category, target)
            if original is not None:
                return self.engine.decide_all([_View(category, target, cls), original], self.config)
        if (category in _NET_SEND and cls != "unix"
                and ev.canonical_ip(ev.split_address(target)[0]) is None):
            # The interceptors hand connect()/sendto() a resolved address (the lookup is decided
            # there, once); a name arriving here came around them (raw `_socket`, `localhost`
            # included) and was resolved in C where no lookup was decided.
            return Decision("deny", "guard:unresolved-name", f"{category} to a host name that did not go "
                            "through the guard's resolver (raw _socket); connect through socket.socket")
        return self.decide(category, target, cls)

    # ----------------------------------------------------------------- the learned manager
    def _manage(self, category: str, op: str, target: str, cls: str) -> dict:
        """Let the manager score the event and act on the test's config before it is decided."""
        m = self.manager
        test_id = self.tracer.test_id
        with self._manager_lock:
            if m.episode is None or m.episode.test_id != test_id:
                self._end_episode()
                # a test starts from its own config (marker included); a collector from the base
                start = self.state.config if self.state.test_id == test_id and self.state.config else self.base
                m.begin(test_id, start)
            before = m.episode.config
            config, said = self._busy(m.event, category, op, target, cls, self.tracer.phase, time.monotonic_ns())
        if config is not before:
            self.state.config = config
            rec = {"kind": "action", "run_id": self.spec.run_id, "test_id": test_id, "phase": self.tracer.phase,
                   "pid": os.getpid(), "t_ns": time.monotonic_ns() - self.tracer.t0_ns, "category": category,
                   "op": op, "target": target, "target_class": cls, "risk": _rounded(said["risk"]),
                   "action": said["action"], "tier_before": before.tier, "tier": config.tier,
                   "grants": list(config.grants), "revocations": list(config.revocations), "event": m.episode.events - 1}
            self._write(rec)
            if self.on_config is not None:
                self._busy(self.on_config, config)
        elif self.state.config is not config:
            self.state.config = config
        return said

    def _child_manager(self, category: str, op: str, target: str, cls: str) -> None:
        """In a child process of a managed test: keep quiet events aside until the first one that
        is not quiet, then load the artifact's manager (numpy) and start an episode of the test
        from the config the child began with, those quiet events first. Without it, a child would
        run whatever the parent's config was at the spawn, unscored (a `python -c` that steals is
        a spawn the parent scored, then events only the child sees)."""
        with self._manager_lock:
            if self._child_artifact and self.manager is None:
                self._load_child_manager(category, op, target, cls)

    def _load_child_manager(self, category: str, op: str, target: str, cls: str) -> None:
        if (self._busy(self.engine.quiet, category, target, cls)
                and category not in self.config.revocations):
            self._early.append((category, op, target, cls, self.tracer.phase, time.monotonic_ns()))
            return
        path, self._child_artifact = self._child_artifact, ""
        try:
            from sandhop.enforcement.runtime import Artifact, Manager
        except ImportError as exc:
            # another interpreter (the boot folder's stdlib-only copy, no numpy): its config stays
            self._notice(f"a child process cannot run the learned manager ({exc}); it enforces the config "
                         f"it started with ({self.config.tier})")
            return
        try:
            manager = Manager(self._busy(Artifact.load, path, self.engine), self.engine)
        except Exception as exc:  # noqa: BLE001 - fail closed, whatever went wrong
            self.state.config = self.engine.hop(self.config, "lockdown")
            self.set_child_config(self.state.config)
            self._notice(f"a child process could not load the artifact {path} ({exc}); it runs under "
                         "lockdown's rules (fail closed)")
            return
        self.use_manager(manager, self.set_child_config)
        manager.begin(self.tracer.test_id, self.config)
        for early in self._early:
            self._busy(manager.event, *early)
        self._early = []
        _real_atexit_register(self._end_episode)

    def _notice(self, message: str) -> None:
        """What a child says of its manager (the parent prints it in the summary)."""
        self._write({"kind": "notice", "run_id": self.spec.run_id, "test_id": self.tracer.test_id,
                     "pid": os.getpid(), "message": "sandhop: " + message})

    def set_child_config(self, config: SandboxConfig) -> None:
        """Children started from now on enforce `config` (the base as the run's spec names it: a
        policy file's path, not its name)."""
        if config is self._child_config:   # most tests begin and end at the base config
            return
        self._child_config = config
        text = (self.spec if config is self.base else self.spec.with_config(config)).to_json()
        if self.tracer.extra_env.get(ENV_GUARD) != text:
            self.tracer.extra_env[ENV_GUARD] = text
            os.putenv(ENV_GUARD, text)

    def _end_episode(self) -> None:
        m = self.manager
        ep = m.episode
        if ep is None:
            return
        m.episode = None
        self._write({"kind": "episode", "run_id": self.spec.run_id, "test_id": ep.test_id, "pid": os.getpid(),
                     "events": ep.events, "quiet": ep.quiet, "actions": ep.actions,
                     "max_risk": round(ep.max_risk, 6), "tier": ep.config.tier,
                     **({"child": True} if self.child else {})})
        if self.state.test_id != ep.test_id and self.state.config is not self.base:
            self.state.config = self.base  # a collector's escalation ends with it
            if self.on_config is not None:
                self._busy(self.on_config, self.base)

    def _act(self, category: str, op: str, target: str, detail: str, cls: str, d: Decision,
             said: dict | None = None) -> None:
        if d.effect == "allow":
            return
        if d.effect == "redirect" and self.mode == "audit":
            self.record(category, op, target, detail, cls, d, said)
            return
        if d.effect == "redirect":
            handled = self._redirect_in_hook(category, d)
            if handled is not None:
                self.record(category, op, target, detail, cls, d, said)
                if isinstance(handled, BaseException):
                    raise Blocked(handled)
                return
            d = Decision("deny", d.rule_id, f"{d.reason}; `{op}` cannot be redirected, so it is denied "
                         "(use open(), os.open() or socket.connect(), which the guard intercepts)",
                         rule_text=d.rule_text)
        record = self.record(category, op, target, detail, cls, d, said)
        if self.mode == "enforce":
            raise Blocked(SandboxViolation(record["message"], record))

    def _original_view(self, category: str, target: str):
        if not target.startswith("${"):
            return None
        var, _, rest = target[2:].partition("}")
        real = {"home": self.tracer.roots.home, "tmp": self.tracer.roots.tmp,
                "cwd": self.tracer.roots.cwd}.get(var)
        if real is None:
            return None
        again = ev.portable_path(real + rest, self.roots)
        return _View(category, again, ev.path_class(again)) if again != target else None

    def _own_file(self, real: str) -> None:
        """Test code touched the guard's run folder (violations file, children's bootstrap)."""
        if not self.enforcing():
            return
        d = Decision("deny", "guard:own-files", "the guard's run folder (its violations file and the "
                     "bootstrap of child processes) is not for the code under test")
        record = self.record("fs.write", "guard.own-files", real, "", "other", d)
        if self.mode == "enforce":
            raise Blocked(SandboxViolation(record["message"], record))

    def _redirect_in_hook(self, category: str, d: Decision):
        """Redirects an audit hook can carry out itself. None: not here (deny instead);
        True: done; an exception: raise it in place of the operation."""
        if category == "net.dns" and d.redirect_to == "nxdomain":
            return socket.gaierror(socket.EAI_NONAME, "Name or service not known (sandhop: nxdomain)")
        if category == "env.read" and d.redirect_to == "unset":
            self.tracer.hide_env()
            return True
        if getattr(self.tracer._tls, "redirecting", False):
            return True  # an interceptor below is carrying it out
        return None

    def record(self, category: str, op: str, target: str, detail: str, cls: str, d: Decision,
               said: dict | None = None) -> dict:
        config = self.config
        rec = {"kind": "decision", "run_id": self.spec.run_id, "test_id": self.state.test_id or self.tracer.test_id,
               "phase": self.tracer.phase, "pid": os.getpid(), "t_ns": time.monotonic_ns() - self.tracer.t0_ns,
               "category": category, "op": op, "target": target, "target_class": cls, "detail": detail,
               "decision": d.effect, "rule": d.rule_id, "rule_text": d.rule_text, "tier": config.tier,
               "mode": self.mode, "reason": d.reason, "redirect_to": d.redirect_to}
        if said is not None:  # what the learned manager said of this event
            rec["risk"], rec["action"] = _rounded(said["risk"]), said["action"]
        if d.effect == "deny":
            # Loading another tier's file to say which would allow it is the guard's own work.
            rec["fix"] = ("no policy allows it (the guard protects itself)" if d.rule_id.startswith("guard:")
                          else self._busy(self.engine.how_to_allow, category, target, cls, config, d))
            rec["message"] = (f"sandhop {'denied' if self.mode == 'enforce' else 'would deny'} "
                              f"{category} {target} (op {op}, tier {_short(config.tier)}"
                              f"{', test ' + rec['test_id'] if rec['test_id'] else ''}): {d.reason}. "
                              f"To allow it: {rec['fix']}")
        else:
            rec["message"] = f"sandhop redirected {category} {target} -> {d.redirect_to}: {d.reason}"
        self._write(rec)
        return rec

    def _write(self, rec: dict) -> None:
        if self._vfd < 0:
            return
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")
        tls = self.tracer._tls
        was = getattr(tls, "busy", False)
        tls.busy = True
        try:
            with self._lock:
                os.write(self._vfd, line)
        except OSError:
            pass  # the run folder is gone; the exception still reaches the test
        finally:
            tls.busy = was

    def _busy(self, fn, *args, **kwargs):
        tls = self.tracer._tls
        was = getattr(tls, "busy", False)
        tls.busy = True
        try:
            return fn(*args, **kwargs)
        finally:
            tls.busy = was

    # ----------------------------------------------------------------- redirect helpers
    def redirect_path(self, path, writing: bool, deleting: bool = False) -> str | None:
        """The overlay path this access must use instead of `path`, or None (use `path`)."""
        if isinstance(path, int) or self.mode != "enforce" or not self.enforcing():
            return None
        tls = self.tracer._tls
        if getattr(tls, "busy", False):
            return None
        st = self.state
        if not writing and not st.redirected and not st.whiteouts:
            return None
        try:
            target, cls = self._busy(self.tracer.path, path)
        except Exception:
            return None  # the hook will see it and decide
        if not writing:
            if target in st.whiteouts:
                return self._overlay_path(target) + ".sandhop-whiteout"  # does not exist: ENOENT
            return self._overlay_path(target) if target in st.redirected else None
        category = "fs.delete" if deleting else "fs.write"
        d = self.decide(category, target, cls)
        if d.effect != "redirect" or not st.in_test:
            return None
        new = self._overlay_path(target)
        self._busy(self._prepare_overlay, path, new, target, deleting)
        self.record(category, "redirect", target, new, cls, d)
        return new

    def _prepare_overlay(self, original, new: str, target: str, deleting: bool) -> None:
        st = self.state
        os.makedirs(os.path.dirname(new), exist_ok=True)
        if deleting:
            st.whiteouts.add(target)
            st.redirected.discard(target)
            return
        if target not in st.redirected and target not in st.whiteouts and os.path.isfile(original):
            shutil.copy2(original, new)  # copy on write: appends and `r+` see the original content
        st.whiteouts.discard(target)
        st.redirected.add(target)

    def _overlay_path(self, target: str) -> str:
        rel = target.replace("${", "").replace("}", "", 1).lstrip("/")
        return os.path.join(self._overlay_root(self.state), rel)

    def redirect_address(self, sock, address, category: str = "net.connect"):
        """The address a connect/sendto must use instead (the sinkhole), or None; `False` for a
        sendto that must be dropped."""
        if self.mode != "enforce" or not self.enforcing() or getattr(self.tracer._tls, "busy", False):
            return None
        try:
            target, detail = self._busy(self.tracer.address, sock, address)
        except Exception:
            return None
        cls = ev.target_class(category, target, detail)
        d = self.decide(category, target, cls)
        if d.effect != "redirect":
            return None
        self.record(category, "redirect", target, d.redirect_to, cls, d)
        if category == "net.send":
            return False
        if self.sinkhole is None:
            self.sinkhole = self._busy(_Sinkhole, self.tracer)
        host, port = self.sinkhole.address
        return ("::ffff:" + host, port) if getattr(sock, "family", None) == socket.AF_INET6 else (host, port)

    def check_write(self, op: str, path, dir_fd=None) -> None:
        """Decide a write the interpreter does not audit (mkfifo, mknod)."""
        if getattr(self.tracer._tls, "busy", False) or not self.tracer.enabled:
            return
        try:
            target, cls = self._busy(self.tracer.path, path, dir_fd)
        except Exception:
            target, cls = os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path), "other"
        try:
            self.gate("fs.write", op, target, "", cls)
        except Blocked as blocked:
            raise blocked.exc from None

    def check_spawn(self, op: str, executable, argv, env):
        """Decide a spawn the interpreter does not audit (`_posixsubprocess.fork_exec`, used by
        multiprocessing); returns the child's environment with the guard's variables added."""
        t = self.tracer
        if getattr(t._tls, "busy", False) or not t.enabled:
            return env
        t._tls.busy = True
        try:
            t.sync_child_context()
            if isinstance(env, list):
                present = {bytes(e).split(b"=", 1)[0] for e in env}
                extra = dict(t.child_environment())
                if t.boot_dir:
                    extra["PYTHONPATH"] = t.boot_dir
                env = env + [f"{k}={v}".encode() for k, v in extra.items() if k.encode() not in present]
            argv = [os.fsdecode(a) for a in argv]
            t.emit("proc.spawn", op, t.argv_target(executable, argv), _shell_detail(argv))
            _unguarded_python(t, op, executable, argv, None)
            _spawned_commands(t, op, argv)
        except Blocked as blocked:
            raise blocked.exc from None
        finally:
            t._tls.busy = False
        return env

    def remember_lookup(self, host, infos) -> None:
        name = ev.normalise_host(host) if isinstance(host, (str, bytes)) else ""
        if not name or ev.canonical_ip(name) is not None:
            return
        for info in infos:
            ip = ev.canonical_ip(str(info[4][0]))
            if ip:
                self.state.names.setdefault(ip, set()).add(name)


@dataclass(frozen=True)
class _View:
    category: str
    target: str
    target_class: str


def _short(name: str) -> str:
    return os.path.basename(name) if "/" in name else name


# --------------------------------------------------------------------------- sinkhole

class _Sinkhole:
    """A loopback TCP listener that accepts redirected connections, reads and discards."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = self.sock.getsockname()
        threading.Thread(target=self._serve, name="sandhop-sinkhole", daemon=True).start()

    def _serve(self) -> None:
        self.tracer._tls.busy = True  # the sinkhole's own sockets are the guard's footprint
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        self.tracer._tls.busy = True
        with conn:
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass


# --------------------------------------------------------------------------- interception

_real_open = io.open
_real_os_open = os.open
_real_remove = os.remove
_real_unlink = os.unlink
_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_real_mkfifo = os.mkfifo
_real_atexit_register = atexit.register
_real_fork_exec = _posixsubprocess.fork_exec
_real_mknod = os.mknod
_readlink = os.readlink
_installed: list[Guard] = []


def _writes(mode) -> bool:
    return isinstance(mode, str) and any(c in mode for c in "wax+")


def _intercept(guard: Guard) -> None:
    """Wrap the narrow points where a redirect must change an argument. Once per process; the
    wrappers consult whichever guard is current."""
    if _installed:
        _installed[0] = guard
        return
    _installed.append(guard)

    def current() -> Guard:
        return _installed[0]

    def _redirecting(fn, *args, **kwargs):
        tls = current().tracer._tls
        tls.redirecting = True
        try:
            return fn(*args, **kwargs)
        finally:
            tls.redirecting = False

    def open_(file, mode="r", *args, **kwargs):
        new = current().redirect_path(file, _writes(mode))
        if new is None:
            return _real_open(file, mode, *args, **kwargs)
        return _redirecting(_real_open, new, mode, *args, **kwargs)

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None and not isinstance(path, int):
            # The audit event of open() carries no dir_fd: open by the full path instead, so
            # what is decided is what is opened.
            p = os.fsdecode(path)
            if not p.startswith("/"):
                path, dir_fd = _readlink(f"/proc/self/fd/{dir_fd}") + "/" + p, None
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & (os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        new = current().redirect_path(path, writing) if dir_fd is None else None
        if new is None:
            return _real_os_open(path, flags, mode, dir_fd=dir_fd)
        return _redirecting(_real_os_open, new, flags, mode)

    def make_remove(real):
        def remove(path, *, dir_fd=None):
            new = current().redirect_path(path, True, deleting=True) if dir_fd is None else None
            if new is None:
                return real(path, dir_fd=dir_fd)
            try:
                _redirecting(real, new.removesuffix(".sandhop-whiteout"))
            except FileNotFoundError:
                pass  # the original stays; the overlay records it as deleted
        remove.__name__ = real.__name__
        return remove

    def getaddrinfo(host, *args, **kwargs):
        infos = _real_getaddrinfo(host, *args, **kwargs)
        try:
            current().remember_lookup(host, infos)
        except Exception:
            pass
        return infos

    def resolved(sock, address):
        """A host name resolved once, here, where the lookup is decided (net.dns) and remembered:
        C would resolve it before the audit event, and again later (DNS rebinding)."""
        if (isinstance(address, tuple) and len(address) >= 2 and isinstance(address[0], (str, bytes))
                and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6)
                and ev.canonical_ip(os.fsdecode(address[0])) is None):
            infos = socket.getaddrinfo(address[0], address[1], sock.family, sock.type)
            if infos:
                return (infos[0][4][0], *address[1:])
        return address

    def make_connect(real):
        def connect(self, address):
            address = resolved(self, address)
            new = current().redirect_address(self, address)
            if new:
                return _redirecting(real, self, new)
            return real(self, address)
        connect.__name__ = real.__name__
        return connect

    def sendto(self, data, *args):
        if args:
            args = (*args[:-1], resolved(self, args[-1]))
        address = args[-1] if args else None
        if current().redirect_address(self, address, "net.send") is False:
            return len(data)
        return _real_sendto(self, data, *args)

    def make_node(real, op):
        # mkfifo and mknod raise no audit event: decide them as writes here.
        def node(path, *args, dir_fd=None, **kwargs):
            current().check_write(op, path, dir_fd)
            return real(path, *args, dir_fd=dir_fd, **kwargs)
        node.__name__ = real.__name__
        return node

    open_.__doc__ = _real_open.__doc__
    builtins.open = io.open = open_
    os.open = os_open
    os.remove = make_remove(_real_remove)
    os.unlink = make_remove(_real_unlink)
    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = make_connect(_real_connect)
    socket.socket.connect_ex = make_connect(_real_connect_ex)
    socket.socket.sendto = sendto
    def atexit_register(func, *args, **kwargs):
        # A handler registered while a test runs is that test's code, however late it runs
        # (the session phase is otherwise the runner's).
        if current().tracer.phase == "session":
            return _real_atexit_register(func, *args, **kwargs)
        tls = current().tracer._tls

        def as_test_code(*a, **k):
            tls.from_test = True
            try:
                return func(*a, **k)
            finally:
                tls.from_test = False
        _real_atexit_register(as_test_code, *args, **kwargs)
        return func

    def fork_exec(args, executable_list, close_fds, pass_fds, cwd, env, *rest):
        exe = executable_list[0] if executable_list else (args[0] if args else b"")
        env = current().check_spawn("_posixsubprocess.fork_exec", os.fsdecode(exe), list(args or ()), env)
        return _real_fork_exec(args, executable_list, close_fds, pass_fds, cwd, env, *rest)

    _posixsubprocess.fork_exec = fork_exec  # subprocess binds its own copy (and is audited)
    atexit.register = atexit_register
    posix.open = os_open  # the same function under its other name
    os.mkfifo = make_node(_real_mkfifo, "os.mkfifo")
    os.mknod = make_node(_real_mknod, "os.mknod")


def _rounded(risk: float | None) -> float | None:
    """A risk for the audit log (None: a quiet event the manager did not score)."""
    return None if risk is None else round(risk, 6)
