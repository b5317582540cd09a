"""The recorder's tracer: CPython audit events of one process, decoded into trace events.

One `Tracer` per traced process. It decodes the audit events the interpreter raises (file
opens, sockets, spawns, imports, ctypes, ...) into the categories of `events.py`, normalises and
classes their targets there and then (paths must be resolved while they still exist), and spools
them as JSON lines that `sandhop.datasets.traces` turns into Parquet. Child Python processes are
traced through `sitecustomize` (see `boot.py`) and the environment variables below.

Environment reads are not audited by CPython: the tracer swaps the class of `os.environ` (and
`os.environb`) for a subclass that records reads of secret-looking names and whole-environment
reads (iteration, `copy()`). It cannot see reads through `os.environ._data`, `posix.environ` or
C code calling getenv().
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import threading
import time

from sandhop.enforcement import events as ev

ENV_SPOOL = "SANDHOP_SPOOL"
ENV_T0 = "SANDHOP_T0"
ENV_TEST = "SANDHOP_TEST_ID"
ENV_PHASE = "SANDHOP_PHASE"
ENV_BOOT = "SANDHOP_BOOT"
ENV_CWD = "SANDHOP_CWD"
ENV_ROOTS = "SANDHOP_ROOTS"

FLUSH_EVERY = 512
_CONTEXT_OWNERS = frozenset({"sandhop.enforcement.plugin", "sandhop.enforcement.enforcer",
                             "sandhop.enforcement.lockdown", __name__})
# Bookkeeping of the test runner itself, not of the code under test.
_HARNESS_ENV = frozenset({"PYTEST_CURRENT_TEST"})
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "fish"})

_active: "Tracer | None" = None
# Bound at import: what a path *is* must not change when code under test monkeypatches os.
_readlink = os.readlink
_fsdecode = os.fsdecode
_SECRET_NAMES: dict[str, bool] = {}


def active() -> "Tracer | None":
    return _active


class Tracer:
    """Decodes audit events of this process and spools them; see the module docstring."""

    def __init__(self, spool_dir: str | None, t0_ns: int, roots: ev.Roots, *, test_id: str = "",
                 phase: str = "collect", boot_dir: str = "", own: tuple[str, ...] = ()) -> None:
        self.spool_dir = spool_dir or ""
        self.t0_ns = t0_ns
        self.roots = roots
        self.boot_dir = boot_dir
        self.test_id = test_id
        self.phase = phase
        self.enabled = False
        self.decode_failures = 0
        self.lost_events = 0
        self.flush_every = FLUSH_EVERY
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._buf: list[list] = []
        self._lseq = 0
        self._fd = -1
        self._stable: dict[str, tuple[str, str]] = {}
        self.executed: set[int] = set()
        # The enforcement guard: called with every decoded event; may raise `Blocked`.
        self.gate = None
        self.own_files = None
        self._child_context: tuple[str, str] | None = None
        self.extra_env: dict[str, str] = {}
        self._stable_prefixes = tuple(p + "/" for p in (*roots.site, roots.stdlib, roots.python, *roots.other_pythons) if p)
        # The recorder's own folders (its spool, the copy of sandhop it runs from): touching
        # them is the recorder's footprint, not the test's behaviour.
        own = [os.path.realpath(p) for p in (spool_dir, *own) if p]
        copy_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if os.path.isfile(os.path.join(os.path.dirname(copy_root), ".sandhop-boot")):
            own.append(os.path.realpath(os.path.dirname(copy_root)))
        self._own = tuple(own)
        self._open_spool()

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def from_env(cls, own: tuple[str, ...] = ()) -> "Tracer | None":
        spool = os.environ.get(ENV_SPOOL) or None
        roots = ev.Roots.current(cwd=os.environ.get(ENV_CWD) or None)
        parent = os.environ.get(ENV_ROOTS)
        if parent:
            roots = roots.inherit(ev.Roots(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in json.loads(parent).items()}))
        tracer = cls(spool, int(os.environ.get(ENV_T0) or time.monotonic_ns()), roots,
                     test_id=os.environ.get(ENV_TEST, ""), phase=os.environ.get(ENV_PHASE, "session"),
                     boot_dir=os.environ.get(ENV_BOOT, ""), own=own)
        # Children are often ended by a signal (a test's server terminated at teardown), which
        # skips atexit: unbuffered spooling loses nothing.
        tracer.flush_every = 1
        return tracer

    def _open_spool(self) -> None:
        self.pid, self.ppid = os.getpid(), os.getppid()
        if not self.spool_dir:  # enforcing without recording
            return
        name = f"events-{self.pid}-{secrets.token_hex(4)}.jsonl"
        self._fd = os.open(os.path.join(self.spool_dir, name),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def install(self) -> None:
        """Start recording. Audit hooks cannot be removed; `stop()` only silences this one."""
        global _active
        _active = self
        self.enabled = True
        for env in (os.environ, getattr(os, "environb", None)):
            if env is not None and type(env) is os._Environ:
                env.__class__ = _TracedEnviron
        os.register_at_fork(after_in_child=self._after_fork)
        atexit.register(self.flush)
        sys.addaudithook(self._hook)

    def stop(self) -> None:
        self.flush()
        self.enabled = False

    def _after_fork(self) -> None:
        # The child gets a copy of the buffer its parent will also write: drop it, new file.
        # Forked workers often leave through os._exit (no atexit), so write every event at once.
        self._buf = []
        self._lock = threading.Lock()
        self.flush_every = 1
        self._tls.busy = True
        try:
            self._open_spool()
        finally:
            self._tls.busy = False

    def child_environment(self) -> dict[str, str]:
        """The variables a child process needs to be traced and attributed to this test."""
        env = {ENV_T0: str(self.t0_ns), ENV_TEST: self.test_id,
               ENV_PHASE: self.phase, ENV_CWD: self.roots.cwd,
               ENV_ROOTS: json.dumps(dataclasses.asdict(self.roots)), **self.extra_env}
        if self.spool_dir:
            env[ENV_SPOOL] = self.spool_dir
        if self.boot_dir:
            env[ENV_BOOT] = self.boot_dir
        return env

    def set_context(self, test_id: str, phase: str) -> None:
        """Attribute the events that follow (and children spawned from now on) to this test."""
        if self.gate is not None and sys._getframe(1).f_globals.get("__name__") not in _CONTEXT_OWNERS:
            # The session phase is exempt from enforcement: only the plugin may enter it.
            try:
                self.emit("sys.tamper", "sandhop.set_context", "sandhop.set_context", phase, "interpreter")
            except Blocked as blocked:
                raise blocked.exc from None
            raise PermissionError("sandhop: only the sandhop plugin may change the test context "
                                  "(test code cannot borrow the runner's exemption)")
        self.flush()
        self.test_id, self.phase = test_id, phase
        self.executed.clear()

    def sync_child_context(self) -> None:
        """Hand the current test and phase to children about to start (called from the spawn
        decoders, before the child exists: cheaper than on every context change)."""
        context = (self.test_id, self.phase)
        if context == self._child_context:
            return
        self._child_context = context
        was = getattr(self._tls, "busy", False)
        self._tls.busy = True
        try:
            # putenv, not os.environ: children inherit it, tests never see it.
            os.putenv(ENV_TEST, self.test_id)
            os.putenv(ENV_PHASE, self.phase)
        finally:
            self._tls.busy = was

    # ----------------------------------------------------------------- spooling
    def emit(self, category: str, op: str, target: str, detail: str = "", cls: str | None = None) -> None:
        if cls is None:
            cls = ev.target_class(category, target, detail)
        if self.spool_dir:
            self._spool(category, op, target, detail, cls)
        if self.gate is not None:
            self.gate(category, op, target, detail, cls)

    def spool(self, category: str, op: str, target: str, detail: str, cls: str) -> None:
        """Record an event seen outside the audit hook (a browser request, a DOM change) in this
        test's trace, without the guard's gate (its caller decides)."""
        if self.spool_dir:
            self._spool(category, op, target, detail, cls)

    def _spool(self, category: str, op: str, target: str, detail: str, cls: str) -> None:
        with self._lock:
            self._lseq += 1
            self._buf.append([time.monotonic_ns() - self.t0_ns, self.pid, self.ppid, self._lseq,
                              self.test_id, self.phase, category, op, target, detail, cls])
            if len(self._buf) >= self.flush_every:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._buf or self._fd < 0:
            return
        rows, self._buf = self._buf, []
        data = memoryview("".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows).encode())
        busy = getattr(self._tls, "busy", False)
        self._tls.busy = True
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:  # disk full or the spool removed: counted and reported, never raised
            self.lost_events += len(rows)
        finally:
            self._tls.busy = busy

    # ----------------------------------------------------------------- the hook
    def _hook(self, event: str, args: tuple) -> None:
        handler = _HANDLERS.get(event)
        if handler is None or not self.enabled:
            return
        if handler is _exec_code:  # the most frequent event (every eval): settle repeats here
            code = args[0] if args else None
            if id(code) in self.executed or not getattr(code, "co_filename", "").startswith("<"):
                return
        tls = self._tls
        if getattr(tls, "busy", False):
            return
        tls.busy = True
        try:
            handler(self, event, args)
        except _OwnFootprint:
            pass
        except Blocked as blocked:
            raise blocked.exc from None
        except Exception:  # a decoding failure must never break the traced program
            self.decode_failures += 1
        finally:
            tls.busy = False

    # ----------------------------------------------------------------- targets
    def path(self, p, dir_fd=None) -> tuple[str, str]:
        """(portable target, class) of a path argument; fds are resolved through /proc."""
        if isinstance(p, int):
            p = _readlink(f"/proc/self/fd/{p}")
        s = _fsdecode(p)
        if not s.startswith("/") and isinstance(dir_fd, int):
            s = _readlink(f"/proc/self/fd/{dir_fd}") + "/" + s
        hit = self._stable.get(s)
        if hit is not None:
            return hit
        real = ev.normalise_path(s)
        if any(real == d or real.startswith(d + "/") for d in self._own):
            if self.gate is not None and self.own_files is not None:
                # Only the guard itself (which works with `busy` set, so never gets here) may
                # touch its run folder: the violations file and the children's bootstrap.
                self.own_files(real)
            raise _OwnFootprint
        target = ev.portable_path(real, self.roots)
        result = (target, ev.path_class(target))
        # Only paths inside the interpreter's own tree are cached: elsewhere a symlink may change.
        if real.startswith(self._stable_prefixes) and len(self._stable) < 50_000:
            self._stable[s] = result
        return result

    def executable(self, exe) -> str:
        s = os.fsdecode(exe)
        if "/" not in s:
            s = shutil.which(s) or s
        return ev.portable_path(ev.normalise_path(s), self.roots) if "/" in s else s

    def argv_target(self, exe, argv) -> str:
        if isinstance(argv, (str, bytes)):
            argv = [argv]
        argv = [os.fsdecode(a) for a in (argv or [])]
        first = self.executable(exe if exe is not None else (argv[0] if argv else ""))
        return shlex.join([first, *(ev.portable_text(a, self.roots) for a in argv[1:])])

    def address(self, sock, address) -> tuple[str, str]:
        """(target, detail) of a socket address; detail says tcp/udp/unix."""
        family = getattr(sock, "family", None)
        kind = getattr(sock, "type", None)
        proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
        if family == socket.AF_UNIX or isinstance(address, (str, bytes)):
            a = os.fsdecode(address) if address is not None else ""
            if a.startswith("\0") or not a:
                return "@" + a[1:], "unix"
            return self.path(a)[0], "unix"
        if isinstance(address, tuple) and len(address) >= 2:
            return ev.format_address(str(address[0]), address[1]), proto
        return str(address), proto

    def propagate(self, env) -> None:
        """Add the tracing variables to an explicit child environment (a dict the caller passed)."""
        if not isinstance(env, dict):
            return
        as_bytes = any(isinstance(k, bytes) for k in env)
        extra = self.child_environment()
        if self.boot_dir:
            key = b"PYTHONPATH" if as_bytes else "PYTHONPATH"
            old = env.get(key)
            parts = [self.boot_dir] + ([os.fsdecode(old)] if old else [])
            extra["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        for k, v in extra.items():
            env[os.fsencode(k) if as_bytes else k] = os.fsencode(v) if as_bytes else v

    def env_read(self, name, op: str) -> bool:
        """Record (and let the guard decide) a read; True when the variable must look unset."""
        if not self.enabled or getattr(self._tls, "busy", False):
            return False
        key = os.fsdecode(name) if isinstance(name, (str, bytes)) else str(name)
        if key != "*":
            secret = _SECRET_NAMES.get(key)
            if secret is None:
                secret = _SECRET_NAMES[key] = ev.is_secret_env_name(key)
            if not secret:
                return False
        if key.startswith("SANDHOP_") and key != "SANDHOP_AUDIT_KEY":
            return False
        self._tls.busy = True
        self._tls.hide = False
        try:
            self.emit("env.read", op, key)
        except Blocked as blocked:
            raise blocked.exc from None
        finally:
            self._tls.busy = False
        return getattr(self._tls, "hide", False)

    def hide_env(self) -> None:
        """Called by the guard while deciding an env read: the variable is redirected to unset."""
        self._tls.hide = True


class Blocked(Exception):
    """Raised by the guard's gate inside the hook; the hook raises `exc` to the traced code."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc


class _OwnFootprint(Exception):
    """Raised while decoding an event on the recorder's own files: the event is not recorded."""


class _TracedEnviron(os._Environ):
    """os.environ that reports reads to the active tracer (CPython does not audit them)."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if _active is not None and _active.env_read(key, "environ.get"):
            raise KeyError(key)
        return value

    def __iter__(self):
        if _active is not None and _active.env_read("*", "environ.iter"):
            return (k for k in super().__iter__() if not _hidden(k))
        return super().__iter__()

    def __repr__(self):
        return f"environ({self.copy()!r})"

    def copy(self):
        items = {self.decodekey(k): self.decodevalue(v) for k, v in self._data.items()}
        if _active is not None and _active.env_read("*", "environ.copy"):
            return {k: v for k, v in items.items() if not _hidden(k)}
        return items


    # Whole-environment writes (a fixture that clears and restores the environment around every
    # test) are one event, not one per variable.
    def clear(self):
        with _bulk_write("environ.clear", len(self._data)):
            super().clear()

    def update(self, other=(), /, **kwds):
        size = (len(other) if hasattr(other, "__len__") else 0) + len(kwds)
        with _bulk_write("environ.update", size):
            super().update(other, **kwds)


def _hidden(key) -> bool:
    """A secret-looking name under a redirected whole-environment read: left out."""
    name = os.fsdecode(key) if isinstance(key, bytes) else str(key)
    return not name.startswith("SANDHOP_") and ev.is_secret_env_name(name)


class _bulk_write:
    def __init__(self, op: str, size: int) -> None:
        self.op, self.size, self.tracer, self.was_busy = op, size, _active, False

    def __enter__(self) -> None:
        t = self.tracer
        if t is None or not t.enabled:
            return
        self.was_busy = getattr(t._tls, "busy", False)
        if not self.was_busy:
            t._tls.busy = True
            t.emit("env.write", self.op, "*", f"{self.size} names")

    def __exit__(self, *exc) -> None:
        if self.tracer is not None and not self.was_busy:
            self.tracer._tls.busy = False


# --------------------------------------------------------------------------- decoders
# Each takes (tracer, audit event name, args) and emits zero or more events.

def _open(t: Tracer, name: str, args: tuple) -> None:
    path, mode, flags = (tuple(args) + (None, None))[:3]
    if isinstance(path, int):  # wrapping an already open descriptor is not a new access
        return
    if isinstance(mode, str):
        write = any(c in mode for c in "wax+")
        detail = mode
    else:
        flags = flags or 0
        write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & (os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        detail = _flag_names(flags)
    target, cls = t.path(path)
    t.emit("fs.write" if write else "fs.read", name, target, detail, cls)


def _flag_names(flags: int) -> str:
    acc = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}.get(flags & os.O_ACCMODE, "")
    extra = [n for n in ("O_CREAT", "O_TRUNC", "O_APPEND", "O_EXCL", "O_DIRECTORY", "O_NOFOLLOW")
             if flags & getattr(os, n, 0)]
    return "|".join([acc, *extra])


def _path_event(category: str, index: int = 0, dir_fd_index: int | None = None, detail=None):
    def decode(t: Tracer, name: str, args: tuple) -> None:
        dir_fd = args[dir_fd_index] if dir_fd_index is not None and len(args) > dir_fd_index else None
        target, cls = t.path(args[index], dir_fd)
        t.emit(category, name, target, detail(args) if detail else "", cls)
    return decode


def _two_paths(src_category: str | None, dst_category: str, dir_fds: tuple[int, int] | None = None):
    """rename/link/symlink/copy: the destination is written; the source read, deleted or named."""
    def decode(t: Tracer, name: str, args: tuple) -> None:
        src, dst = args[0], args[1]
        src_fd = args[dir_fds[0]] if dir_fds and len(args) > dir_fds[0] else None
        dst_fd = args[dir_fds[1]] if dir_fds and len(args) > dir_fds[1] else None
        if name == "os.symlink":  # the link text is not opened: record what it points at
            dst_fd = args[2] if len(args) > 2 else None
            points_at = t.path(src)[0]
            target, cls = t.path(dst, dst_fd)
            t.emit(dst_category, name, target, "-> " + points_at, cls)
            return
        s_target, s_cls = t.path(src, src_fd)
        target, cls = t.path(dst, dst_fd)
        t.emit(dst_category, name, target, "from " + s_target, cls)
        if src_category:
            t.emit(src_category, name, s_target, "to " + target, s_cls)
    return decode


def _mode_detail(args: tuple) -> str:
    return oct(args[1]) if len(args) > 1 and isinstance(args[1], int) else ""


def _dns(t: Tracer, name: str, args: tuple) -> None:
    host = args[0] if args else None
    if name == "socket.getnameinfo":
        host = host[0] if isinstance(host, tuple) and host else host
    if host is None:
        return
    h = os.fsdecode(host) if isinstance(host, bytes) else str(host)
    if name == "socket.getaddrinfo" and ev.canonical_ip(h) is not None:
        return  # a numeric address needs no lookup
    op_detail = "reverse" if name in ("socket.gethostbyaddr", "socket.getnameinfo") else ""
    t.emit("net.dns", name, ev.normalise_host(h), op_detail)


def _sock(category: str):
    def decode(t: Tracer, name: str, args: tuple) -> None:
        sock, address = args[0], args[1] if len(args) > 1 else None
        if address is None and category == "net.send":
            try:
                address = sock.getpeername()
            except OSError:
                return
        target, detail = t.address(sock, address)
        t.emit(category, name, target, detail)
    return decode


def _popen(t: Tracer, name: str, args: tuple) -> None:
    t.sync_child_context()
    executable, argv, _cwd, env = (tuple(args) + (None,) * 4)[:4]
    target = t.argv_target(executable, argv)
    _loader_env(t, name, env)
    t.propagate(env)
    t.emit("proc.spawn", name, target, _shell_detail(argv))
    _unguarded_python(t, name, executable, argv, env)
    _spawned_commands(t, name, argv)


def _spawned_commands(t: Tracer, name: str, argv) -> None:
    if not isinstance(argv, (list, tuple)) or not argv:
        return
    words = [os.fsdecode(a) for a in argv]
    if _shell_detail(argv) == "shell" and len(words) > 2:
        _inner_commands(t, name, words[2])
    elif os.path.basename(words[0]) in ("env", "nohup", "nice", "timeout", "stdbuf", "setsid"):
        _wrapped_program(t, name, words)


def _unguarded_python(t: Tracer, name: str, executable, argv, env) -> None:
    """A Python child that skips sitecustomize (-I, -E, -S) or gets an environment the guard
    cannot extend runs untraced and unguarded: that is an event of its own, which strict tiers
    deny."""
    if not isinstance(argv, (list, tuple)) or not argv:
        return
    exe = os.fsdecode(executable) if executable is not None else os.fsdecode(argv[0])
    names = {os.path.basename(exe), os.path.basename(os.fsdecode(argv[0]))}
    try:
        names.add(os.path.basename(os.path.realpath(shutil.which(exe) or exe)))
    except (OSError, ValueError):
        pass
    if not any(n.startswith("python") for n in names):
        return
    if env is not None and not isinstance(env, dict):
        t.emit("sys.tamper", name, "unguarded-child", "env is not a dict", "interpreter")
        return
    args = [os.fsdecode(a) for a in argv[1:]]
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-") or a.startswith("--") or a == "-":
            break
        letters = a[1:]
        for j, ch in enumerate(letters):
            if ch in "IES":
                t.emit("sys.tamper", name, "unguarded-child", a, "interpreter")
                return
            if ch in "cm":
                return
            if ch in "XWQ":
                if j == len(letters) - 1:
                    i += 1  # the option's value is the next word
                break
        i += 1


# Variables that make the dynamic loader run code in the child before its main program.
_LOADER_ENV = ("LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH")


def _loader_env(t: Tracer, name: str, env) -> None:
    if isinstance(env, dict):
        for key in env:
            k = os.fsdecode(key)
            if k in _LOADER_ENV:
                t.emit("env.write", name + ".env", k)


def _shell_detail(argv) -> str:
    if isinstance(argv, (list, tuple)) and len(argv) >= 2:
        if os.path.basename(os.fsdecode(argv[0])) in _SHELLS and os.fsdecode(argv[1]) == "-c":
            return "shell"
    return ""


def _system(t: Tracer, name: str, args: tuple) -> None:
    t.sync_child_context()
    command = os.fsdecode(args[0])
    t.emit("proc.spawn", name, t.argv_target("/bin/sh", ["/bin/sh", "-c", command]), "shell")
    _inner_commands(t, name, command)


def _inner_commands(t: Tracer, name: str, command: str) -> None:
    """The programs a shell command line runs (first word of each pipeline part), so that an
    allowed shell is not a way around a denied program."""
    for part in re.split(r"[|;&()`\n]|\$\(", command):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        _wrapped_program(t, name, words, top=False)


_WRAPPERS = frozenset({"env", "nohup", "nice", "timeout", "stdbuf", "setsid", "exec", "command", "builtin"})


def _wrapped_program(t: Tracer, name: str, words: list[str], top: bool = True) -> None:
    """`env A=1 prog`, `nohup prog`, `timeout 5 prog`: decide `prog` (and `A`). With `top`, the
    words are a spawn already decided; otherwise (a shell line) the program itself is new."""
    words = list(words)
    while words and "=" in words[0] and not words[0].startswith(("-", "=")):
        t.emit("env.write", name + ".env", words.pop(0).split("=", 1)[0])
    if not words:
        return
    exe = os.path.basename(words[0])
    if exe in _WRAPPERS:
        rest = words[1:]
        clears = False
        while rest and rest[0].startswith("-"):
            clears = clears or (exe == "env" and rest[0] in ("-i", "--ignore-environment", "-u", "--unset", "-"))
            if exe == "env" and rest[0] in ("-u", "--unset") and len(rest) > 1:
                rest = rest[1:]
            rest = rest[1:]
        if clears and rest and os.path.basename(rest[0]).startswith("python"):
            # `env -i python`: the child loses the variables that would guard it
            t.emit("sys.tamper", name, "unguarded-child", "env " + words[1], "interpreter")
        if exe == "timeout" and rest:
            rest = rest[1:]
        if rest:
            _wrapped_program(t, name, rest, top=False)
        return
    if not top:
        t.emit("proc.spawn", name + ".inner", t.argv_target(None, words), "")


def _exec(t: Tracer, name: str, args: tuple) -> None:
    t.sync_child_context()
    if name == "os.spawn":
        _mode, path, argv, env = (tuple(args) + (None,) * 4)[:4]
    else:
        path, argv, env = (tuple(args) + (None,) * 3)[:3]
    _loader_env(t, name, env)
    t.propagate(env)
    t.emit("proc.spawn", name, t.argv_target(path, argv), _shell_detail(argv))
    _unguarded_python(t, name, path, argv, env)
    _spawned_commands(t, name, argv)
    if name == "os.exec":
        t.flush()  # the process image is replaced: nothing buffered would survive


def _fork(t: Tracer, name: str, args: tuple) -> None:
    t.sync_child_context()
    t.emit("proc.spawn", name, t.executable(sys.executable), "fork")


def _kill(t: Tracer, name: str, args: tuple) -> None:
    pid, sig = (tuple(args) + (None, None))[:2]
    try:
        sig_name = signal.Signals(sig).name
    except (ValueError, TypeError):
        sig_name = str(sig)
    own = pid in (0, os.getpid()) or (name == "os.killpg" and pid == os.getpgid(0))
    if name == "signal.pthread_kill":
        own = True
    t.emit("proc.signal", name, sig_name, "self" if own else "other")


def _import(t: Tracer, name: str, args: tuple) -> None:
    module, filename = args[0], args[1] if len(args) > 1 else None
    if filename is not None and (len(args) < 3 or args[2] is None):
        # The second `import` event of an extension module names the shared object being loaded.
        target, cls = t.path(filename)
        t.emit("code.native", "import.extension", target, str(module), cls)
        return
    t.emit("code.import", name, str(module))


def _dlopen(t: Tracer, name: str, args: tuple) -> None:
    lib = args[0] if args else None
    if lib is None:
        t.emit("code.native", name, "<self>", "", "self")
    elif "/" in os.fsdecode(lib):
        target, cls = t.path(lib)
        t.emit("code.native", name, target, "", cls)
    else:
        t.emit("code.native", name, os.fsdecode(lib), "", "system")


def _dlsym(t: Tracer, name: str, args: tuple) -> None:
    symbol = args[1] if len(args) > 1 else ""
    t.emit("code.native", name, str(symbol), "", "system")


def _memory(t: Tracer, name: str, args: tuple) -> None:
    t.emit("code.native", name, "<self>", "", "self")


def _compile(t: Tracer, name: str, args: tuple) -> None:
    filename = os.fsdecode(args[1]) if len(args) > 1 and isinstance(args[1], (str, bytes)) else ""
    if filename.startswith("<"):  # source from a string, not a module file
        t.emit("code.exec", name, filename, "", "string")


def _exec_code(t: Tracer, name: str, args: tuple) -> None:
    code = args[0] if args else None
    filename = getattr(code, "co_filename", "")
    # One event per code object and test: a runner may evaluate one expression thousands of times.
    if filename.startswith("<") and id(code) not in t.executed:
        t.executed.add(id(code))
        t.emit("code.exec", name, filename, "", "string")


def _find_class(t: Tracer, name: str, args: tuple) -> None:
    t.emit("code.exec", name, f"{args[0]}.{args[1]}", "", "module")


def _putenv(t: Tracer, name: str, args: tuple) -> None:
    key = os.fsdecode(args[0])
    if key in _HARNESS_ENV or key.startswith("SANDHOP_"):
        return
    t.emit("env.write", name, key)
    if key == "HOME":  # fake homes are common in tests: classify against the live HOME
        home = os.fsdecode(args[1]) if name == "os.putenv" and len(args) > 1 else ""
        if home:
            t.roots = _with_home(t.roots, home)
            t._stable.clear()


def _with_home(roots: ev.Roots, home: str) -> ev.Roots:
    from dataclasses import replace
    return replace(roots, home=os.path.realpath(home))


def _tamper(t: Tracer, name: str, args: tuple) -> None:
    t.emit("sys.tamper", name, name.split(".", 1)[-1] if not name.startswith("gc.") else name, "", "interpreter")


def _sqlite(t: Tracer, name: str, args: tuple) -> None:
    db = args[0] if args else None
    if db is None or db in (":memory:", b":memory:", ""):
        return
    target, cls = t.path(db)
    t.emit("fs.write", name, target, "sqlite", cls)


_HANDLERS = {
    "open": _open,
    "os.remove": _path_event("fs.delete", 0, 1),
    "os.rmdir": _path_event("fs.delete", 0, 1),
    "shutil.rmtree": _path_event("fs.delete", 0, 1),
    "os.mkdir": _path_event("fs.write", 0, 2, _mode_detail),
    "os.truncate": _path_event("fs.write", 0, None, lambda a: f"length={a[1]}" if len(a) > 1 else ""),
    "os.chmod": _path_event("fs.meta", 0, 2, _mode_detail),
    "os.chown": _path_event("fs.meta", 0, 3),
    "os.utime": _path_event("fs.meta", 0),
    "os.chflags": _path_event("fs.meta", 0),
    "os.lchflags": _path_event("fs.meta", 0),
    "os.setxattr": _path_event("fs.meta", 0),
    "os.removexattr": _path_event("fs.meta", 0),
    "os.getxattr": _path_event("fs.meta", 0),
    "os.listxattr": _path_event("fs.meta", 0),
    "os.listdir": _path_event("fs.meta", 0),
    "os.scandir": _path_event("fs.meta", 0),
    "os.chdir": _path_event("fs.meta", 0),
    "shutil.chown": _path_event("fs.meta", 0),
    "shutil.make_archive": _path_event("fs.write", 0),
    "shutil.unpack_archive": lambda t, n, a: _path_event("fs.write", 1)(t, n, a) if len(a) > 1 and a[1] else None,
    "os.rename": _two_paths("fs.delete", "fs.write", (2, 3)),
    # a hard link is write access to its source's inode, wherever the link lives
    "os.link": _two_paths("fs.write", "fs.write", (2, 3)),
    "os.symlink": _two_paths(None, "fs.write"),
    "shutil.copyfile": _two_paths("fs.read", "fs.write"),
    "shutil.copymode": _two_paths(None, "fs.meta"),
    "shutil.copystat": _two_paths(None, "fs.meta"),
    "shutil.copytree": _two_paths("fs.read", "fs.write"),
    "shutil.move": _two_paths("fs.delete", "fs.write"),
    "sqlite3.connect": _sqlite,
    "socket.getaddrinfo": _dns,
    "socket.gethostbyname": _dns,
    "socket.gethostbyname_ex": _dns,
    "socket.gethostbyaddr": _dns,
    "socket.getnameinfo": _dns,
    "socket.connect": _sock("net.connect"),
    "socket.bind": _sock("net.bind"),
    "socket.sendto": _sock("net.send"),
    "socket.sendmsg": _sock("net.send"),
    "subprocess.Popen": _popen,
    "os.system": _system,
    "os.exec": _exec,
    "os.posix_spawn": _exec,
    "os.spawn": _exec,
    "os.fork": _fork,
    "os.forkpty": _fork,
    "os.kill": _kill,
    "os.killpg": _kill,
    "signal.pthread_kill": _kill,
    "import": _import,
    "ctypes.dlopen": _dlopen,
    "ctypes.dlsym": _dlsym,
    "ctypes.string_at": _memory,
    "ctypes.wstring_at": _memory,
    "ctypes.PyObj_FromPtr": _memory,
    "ctypes.cdata": _memory,
    "sqlite3.load_extension": _dlopen,
    "compile": _compile,
    "exec": _exec_code,
    "pickle.find_class": _find_class,
    "os.putenv": _putenv,
    "os.unsetenv": _putenv,
    "sys.addaudithook": _tamper,
    "sys.settrace": _tamper,
    "sys.setprofile": _tamper,
    "resource.setrlimit": _tamper,
    "resource.prlimit": _tamper,
    "socket.sethostname": _tamper,
    # Reaching into the interpreter's object graph is how code finds the guard to disarm it.
    "gc.get_objects": _tamper,
    "gc.get_referrers": _tamper,
    "gc.get_referents": _tamper,
    "sandhop.selftest": lambda t, n, a: setattr(t, "selftest_ok", True),
}

AUDIT_EVENTS: frozenset[str] = frozenset(_HANDLERS)


ENV_GUARD = "SANDHOP_GUARD"


def install_from_env() -> "Tracer | None":
    """Entry point for child processes (called from the boot `sitecustomize`): record when the
    parent records, enforce the parent's config when the parent enforces."""
    if _active is not None:
        return _active
    if not (os.environ.get(ENV_SPOOL) or os.environ.get(ENV_GUARD)):
        return None
    guard_spec = os.environ.get(ENV_GUARD)
    own: tuple[str, ...] = ()
    if guard_spec:
        from sandhop.enforcement import guard as guard_module
        own = guard_module.own_paths(guard_spec)
    tracer = Tracer.from_env(own=own)
    guard = guard_module.Guard.from_env(tracer, guard_spec) if guard_spec else None
    tracer.install()
    if guard is not None:
        guard.selftest()  # a child whose hook is not live must not run (boot exits with 126)
    return tracer
