"""The lockdown tier's OS layer: Landlock + seccomp, applied only in forked children.

Nothing here restricts the pytest process itself: every lockdown happens in a fork
(run_in_lockdown, _in_fork) or in an inner pytest session run as a subprocess.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from sandhop.enforcement import lockdown
from sandhop.enforcement.lockdown import (
    LockdownSpec,
    LockdownUnavailable,
    apply_lockdown,
    landlock_abi,
    run_in_lockdown,
)

ABI = landlock_abi()
SECCOMP_PROBLEM = lockdown.seccomp_missing()
GAPS = lockdown.not_enforced(LockdownSpec(connect_ports=(1,), bind_ports=(1,)), ABI,
                             SECCOMP_PROBLEM)
needs_full_lockdown = pytest.mark.skipif(
    bool(GAPS), reason=f"this kernel cannot enforce a full lockdown (landlock_abi() == {ABI}): "
                       + "; ".join(GAPS))
needs_landlock_net = pytest.mark.skipif(
    ABI < 4, reason=f"TCP port rules need Landlock ABI >= 4; this kernel has {ABI}")
needs_seccomp = pytest.mark.skipif(
    SECCOMP_PROBLEM is not None, reason=f"seccomp filters unavailable: {SECCOMP_PROBLEM}")
MACHINE = platform.machine()

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _status_field(name: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} missing from /proc/self/status")


def _in_fork(fn):
    """fn() in a forked child (no lockdown applied by this helper); its JSON-able result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            data = json.dumps(fn()).encode()
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(data)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def writable(tmp_path: Path) -> Path:
    path = tmp_path / "writable"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory that is not writable under lockdown, with one existing file in it."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim.txt").write_text("original")
    return path


# --- pure parts: rights per ABI, gaps, the BPF program -----------------------------------------

# Landlock uapi values (include/uapi/linux/landlock.h).
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
READ_RIGHTS = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE, READ_FILE, READ_DIR


def test_only_rights_the_abi_knows_are_handled_and_reads_never_are():
    assert lockdown.handled_fs_access(0) == 0
    abi1 = lockdown.handled_fs_access(1)
    assert abi1 & (REFER | TRUNCATE | IOCTL_DEV) == 0
    assert lockdown.handled_fs_access(2) == abi1 | REFER
    assert lockdown.handled_fs_access(3) == abi1 | REFER | TRUNCATE
    assert lockdown.handled_fs_access(4) == lockdown.handled_fs_access(3)
    assert lockdown.handled_fs_access(5) == abi1 | REFER | TRUNCATE | IOCTL_DEV
    assert lockdown.handled_fs_access(7) == lockdown.handled_fs_access(5)
    assert all(lockdown.handled_fs_access(abi) & READ_RIGHTS == 0 for abi in range(8))

    ports = LockdownSpec(connect_ports=(80,), bind_ports=())
    assert lockdown.handled_net_access(ports, 3) == 0
    assert lockdown.handled_net_access(ports, 4) == 0b11  # BIND_TCP | CONNECT_TCP
    assert lockdown.handled_net_access(LockdownSpec(connect_ports=(80,)), 4) == 0b10
    assert lockdown.handled_net_access(LockdownSpec(), 7) == 0


def test_gaps_name_what_each_abi_leaves_unenforced():
    spec = LockdownSpec(writable=("/w",), connect_ports=(8080,))
    assert lockdown.not_enforced(spec, 7) == []
    assert lockdown.not_enforced(spec, 5) == []
    (ioctl,) = lockdown.not_enforced(spec, 4)
    assert "ioctl" in ioctl and "ABI 5" in ioctl
    abi3 = lockdown.not_enforced(spec, 3)
    assert any("TCP connect" in g and "8080" in g for g in abi3)
    assert not any("TCP bind" in g for g in abi3)  # bind was not asked to be restricted
    assert any("truncate" in g for g in lockdown.not_enforced(spec, 2))
    none = lockdown.not_enforced(spec, 0)
    assert any("writes" in g and "/w" in g for g in none)
    assert any("syscalls" in g and "no seccomp" in g
               for g in lockdown.not_enforced(spec, 7, "no seccomp"))


def _run_bpf(prog, *, arch: int, nr: int, args=(0, 0, 0, 0, 0, 0)) -> int:
    """A tiny classic-BPF interpreter for the opcodes the filter uses."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35, 0x45):  # jeq, jge, jset
            hit = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if hit else jf)
        elif code == 0x06:  # ret k
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


REQUIRED_DENIALS = (
    "ptrace bpf mount umount2 unshare setns init_module finit_module delete_module kexec_load "
    "kexec_file_load pivot_root chroot swapon swapoff reboot process_vm_writev perf_event_open "
    "keyctl add_key request_key userfaultfd open_by_handle_at name_to_handle_at").split()


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_program_decisions(machine):
    prog = lockdown.seccomp_program(machine)
    arch = lockdown.AUDIT_ARCH[machine]
    table = lockdown.DENIED_SYSCALLS[machine]
    eperm = lockdown.SECCOMP_RET_ERRNO | errno.EPERM
    assert set(REQUIRED_DENIALS) <= set(table)
    for name, nr in table.items():
        assert _run_bpf(prog, arch=arch, nr=nr) == eperm, name

    getpid, clone, clone3, ioctl = {"x86_64": (39, 56, 435, 16),
                                    "aarch64": (172, 220, 435, 29)}[machine]
    allow = lockdown.SECCOMP_RET_ALLOW
    assert _run_bpf(prog, arch=arch, nr=getpid) == allow
    thread_flags = 0x3D0F00  # what pthread_create passes to clone
    assert _run_bpf(prog, arch=arch, nr=clone, args=(thread_flags, 0, 0, 0, 0, 0)) == allow
    assert _run_bpf(prog, arch=arch, nr=clone, args=(0x10000000, 0, 0, 0, 0, 0)) == eperm
    assert _run_bpf(prog, arch=arch, nr=clone3) == lockdown.SECCOMP_RET_ERRNO | errno.ENOSYS
    assert _run_bpf(prog, arch=arch, nr=ioctl, args=(1, 0x5412, 0, 0, 0, 0)) == eperm  # TIOCSTI
    assert _run_bpf(prog, arch=arch, nr=ioctl, args=(1, 0x5401, 0, 0, 0, 0)) == allow  # TCGETS
    foreign = 0x40000003  # AUDIT_ARCH_I386
    assert _run_bpf(prog, arch=foreign, nr=getpid) == lockdown.SECCOMP_RET_KILL_PROCESS
    if machine == "x86_64":
        x32_getpid = 0x40000000 | 39
        assert _run_bpf(prog, arch=arch, nr=x32_getpid) == lockdown.SECCOMP_RET_KILL_PROCESS


# --- the kernel enforces it (each in a forked child) -------------------------------------------

@needs_full_lockdown
def test_python_open_outside_the_writable_dir_is_refused(writable, outside):
    def attempt():
        results = []
        for path, mode in ((outside / "victim.txt", "w"), (outside / "new.txt", "x"),
                           (outside / "victim.txt", "a")):
            try:
                with open(path, mode) as f:
                    f.write("tampered")
                results.append("written")
            except PermissionError as exc:
                results.append(exc.errno)
        return results

    run = run_in_lockdown(attempt, LockdownSpec(writable=(str(writable),)))
    assert run.error is None
    assert run.value == [errno.EACCES] * 3
    assert (outside / "victim.txt").read_text() == "original"
    assert not (outside / "new.txt").exists()


@needs_full_lockdown
def test_native_libc_open_and_write_outside_are_refused(writable, outside):
    """The proof an audit hook cannot give: ctypes calls libc directly; the kernel still refuses."""
    def attempt():
        results = {}
        for label, path, flags in (
                ("existing", outside / "victim.txt", os.O_WRONLY | os.O_TRUNC),
                ("create", outside / "native.txt", os.O_WRONLY | os.O_CREAT),
                ("inside", writable / "native.txt", os.O_WRONLY | os.O_CREAT)):
            fd = libc.open(str(path).encode(), flags, 0o644)
            if fd < 0:
                results[label] = ctypes.get_errno()
                continue
            written = libc.write(fd, b"native bytes", 12)
            libc.close(fd)
            results[label] = f"wrote {written}"
        return results

    run = run_in_lockdown(attempt, LockdownSpec(writable=(str(writable),)))
    assert run.value == {"existing": errno.EACCES, "create": errno.EACCES,
                         "inside": "wrote 12"}
    assert (outside / "victim.txt").read_text() == "original"
    assert not (outside / "native.txt").exists()
    assert (writable / "native.txt").read_bytes() == b"native bytes"


@needs_full_lockdown
def test_writable_dir_allows_create_rename_delete_and_devices_stay_writable(writable):
    def work():
        (writable / "sub").mkdir()
        (writable / "sub" / "a.txt").write_text("x")
        os.rename(writable / "sub" / "a.txt", writable / "b.txt")
        os.truncate(writable / "b.txt", 0)
        os.unlink(writable / "b.txt")
        os.rmdir(writable / "sub")
        with open(os.devnull, "w") as devnull:
            devnull.write("discarded")
        return sorted(os.listdir(writable))

    run = run_in_lockdown(work, LockdownSpec(writable=(str(writable),)))
    assert (run.error, run.value) == (None, [])


@needs_full_lockdown
def test_reading_spawning_and_threads_still_work(writable):
    def work():
        passwd = Path("/etc/passwd").read_text()
        true = subprocess.run(["/bin/true"]).returncode  # clone/exec under the filter
        seen = []
        thread = threading.Thread(target=seen.append, args=("ran",))  # clone3 -> ENOSYS -> clone
        thread.start()
        thread.join()
        return ["root" in passwd, true, seen]

    run = run_in_lockdown(work, LockdownSpec(writable=(str(writable),)))
    assert (run.error, run.value) == (None, [True, 0, ["ran"]])


@pytest.fixture
def loopback_listeners():
    listeners = []
    for _ in range(2):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listeners.append(listener)
    yield [listener.getsockname()[1] for listener in listeners]
    for listener in listeners:
        listener.close()


@needs_full_lockdown
def test_tcp_connect_only_to_allowed_ports(loopback_listeners):
    allowed, denied = loopback_listeners

    def attempt():
        results = []
        for port in (allowed, denied):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    results.append("connected")
            except OSError as exc:
                results.append(exc.errno)
        return results

    run = run_in_lockdown(attempt, LockdownSpec(connect_ports=(allowed,)))
    assert run.value == ["connected", errno.EACCES]


@needs_full_lockdown
def test_tcp_bind_only_to_allowed_ports():
    def attempt():
        results = []
        for port in (0, 1):  # 0: an ephemeral port; 1: any other port
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                    results.append("bound")
                except OSError as exc:
                    results.append(exc.errno)
        return results

    assert run_in_lockdown(attempt, LockdownSpec(bind_ports=(0,))).value == ["bound", errno.EACCES]
    assert run_in_lockdown(attempt, LockdownSpec(bind_ports=())).value == [errno.EACCES] * 2


SYSCALLS = {"x86_64": {"ptrace": 101, "unshare": 272, "mount": 165, "clone": 56},
            "aarch64": {"ptrace": 117, "unshare": 97, "mount": 40, "clone": 220}}


@needs_seccomp
def test_dangerous_syscalls_fail_with_eperm_and_seccomp_is_on(monkeypatch, tmp_path):
    # Landlock off, so every EPERM below is the seccomp filter's alone. Each call is harmless
    # if it were allowed (ESRCH, ENODEV, a private namespace), so a broken filter fails the test
    # instead of damaging the machine.
    monkeypatch.setenv(lockdown.ABI_CAP_ENV, "0")
    numbers = SYSCALLS[MACHINE]
    target = str(tmp_path).encode()

    def attempt():
        def call(nr, *args):
            result = libc.syscall(ctypes.c_long(nr), *args)
            return ctypes.get_errno() if result == -1 else f"returned {result}"

        long = ctypes.c_long
        results = {
            "ptrace": call(numbers["ptrace"], long(3), long(1), long(0), long(0)),  # PEEKUSER 1
            "unshare": call(numbers["unshare"], long(0x00020000)),  # CLONE_NEWNS
            "mount": call(numbers["mount"], b"none", target, b"sandhop-no-such-fs", long(0),
                          None),
        }
        child = libc.syscall(ctypes.c_long(numbers["clone"]), long(0x10000000 | signal.SIGCHLD),
                             long(0), long(0), long(0), long(0))  # CLONE_NEWUSER
        if child == 0:
            os._exit(0)  # only reached if the filter failed
        results["clone(NEWUSER)"] = ctypes.get_errno() if child == -1 else "forked"
        if child > 0:
            os.waitpid(child, 0)
        results["status"] = [_status_field("Seccomp"), _status_field("NoNewPrivs")]
        return results

    run = run_in_lockdown(attempt, LockdownSpec(writable=(str(tmp_path),)), allow_degraded=True)
    assert run.value == {"ptrace": errno.EPERM, "unshare": errno.EPERM, "mount": errno.EPERM,
                         "clone(NEWUSER)": errno.EPERM, "status": ["2", "1"]}


@needs_seccomp
@pytest.mark.skipif(MACHINE != "x86_64", reason="x32 system calls exist only on x86_64")
def test_foreign_abi_syscall_kills_the_worker(monkeypatch, tmp_path):
    monkeypatch.setenv(lockdown.ABI_CAP_ENV, "0")  # seccomp alone
    run = run_in_lockdown(lambda: libc.syscall(ctypes.c_long(0x40000000 | 39)),  # x32 getpid
                          LockdownSpec(writable=(str(tmp_path),)), allow_degraded=True)
    assert run.exit_status == -signal.SIGSYS
    assert "SIGSYS" in run.error and "foreign-architecture" in run.error


@needs_full_lockdown
def test_the_calling_process_is_never_restricted(writable, outside):
    run = run_in_lockdown(lambda: "done", LockdownSpec(writable=(str(writable),)))
    assert run.value == "done"
    (outside / "victim.txt").write_text("parent may write")
    assert _status_field("Seccomp") == "0"


# --- fail closed, or degrade loudly --------------------------------------------------------------

def _apply_and_report(spec: LockdownSpec, **kwargs):
    try:
        result = {"not_enforced": apply_lockdown(spec, **kwargs)}
    except LockdownUnavailable as exc:
        result = {"raised": str(exc), "missing": exc.missing}
    result["status"] = [_status_field("Seccomp"), _status_field("NoNewPrivs")]
    return result


def test_without_landlock_lockdown_refuses_before_changing_anything(monkeypatch, tmp_path):
    monkeypatch.setenv(lockdown.ABI_CAP_ENV, "0")
    result = _in_fork(lambda: _apply_and_report(LockdownSpec(writable=(str(tmp_path),))))
    assert "not_enforced" not in result
    assert any("writes" in m and "needs Landlock" in m for m in result["missing"])
    assert "--sandhop-allow-degraded" in result["raised"]
    assert f"{lockdown.ABI_CAP_ENV}=0" in result["raised"]
    assert result["status"] == ["0", "0"]  # nothing was applied


@needs_seccomp
def test_allow_degraded_lists_what_is_not_enforced_and_applies_the_rest(monkeypatch, writable,
                                                                         outside):
    monkeypatch.setenv(lockdown.ABI_CAP_ENV, "0")

    def work():
        (outside / "victim.txt").write_text("not enforced")  # honest: Landlock is off
        return _status_field("Seccomp")

    run = run_in_lockdown(work, LockdownSpec(writable=(str(writable),)), allow_degraded=True)
    assert run.error is None
    assert run.value == "2"  # seccomp still applied
    assert any("writes" in g and "NOT restricted" in g for g in run.not_enforced)
    assert (outside / "victim.txt").read_text() == "not enforced"


@needs_landlock_net
def test_abi_cap_simulates_a_kernel_without_port_rules(monkeypatch, writable, outside,
                                                        loopback_listeners):
    monkeypatch.setenv(lockdown.ABI_CAP_ENV, "3")
    allowed, other = loopback_listeners
    spec = LockdownSpec(writable=(str(writable),), connect_ports=(allowed,))

    refused = _in_fork(lambda: _apply_and_report(spec))
    assert any("TCP connect" in m for m in refused["missing"])

    def attempt():
        with socket.create_connection(("127.0.0.1", other), timeout=5):
            pass
        try:
            (outside / "victim.txt").write_text("x")
        except PermissionError as exc:
            return exc.errno

    run = run_in_lockdown(attempt, spec, allow_degraded=True)
    assert run.value == errno.EACCES  # files still enforced at ABI 3 ...
    assert any("TCP connect is NOT limited" in g for g in run.not_enforced)  # ... ports not


@needs_full_lockdown
def test_lockdown_refuses_a_multithreaded_process(tmp_path):
    def attempt():
        release = threading.Event()
        thread = threading.Thread(target=release.wait)
        thread.start()
        try:
            apply_lockdown(LockdownSpec(writable=(str(tmp_path),)))
            return "applied"
        except RuntimeError as exc:
            return str(exc)
        finally:
            release.set()
            thread.join()

    assert "before any thread starts" in _in_fork(attempt)


# --- run_forked through a real inner pytest session --------------------------------------------

INNER_CONFTEST = """
import os
import pathlib

import pytest

from sandhop.enforcement.lockdown import LockdownSpec, run_forked

HERE = pathlib.Path(__file__).parent
WRITABLE = HERE / "writable"
WRITABLE.mkdir(exist_ok=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "locked: run in a locked-down forked worker")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("locked") is None:
        return None
    basetemp = item.config._tmp_path_factory.getbasetemp()  # made here, before the fork
    spec = LockdownSpec(writable=(str(WRITABLE), str(basetemp)))
    return run_forked(item, spec, nextitem=nextitem, before=_before_lockdown,
                      allow_degraded=os.environ.get("INNER_ALLOW_DEGRADED") == "1")


def _before_lockdown():
    # Runs in the worker before lockdown, so this write outside WRITABLE is still allowed.
    with open(HERE / "before.txt", "a") as f:
        f.write(f"{os.getpid()}\\n")


def pytest_sessionfinish(session):
    status = pathlib.Path("/proc/self/status").read_text()
    (HERE / "after_session.txt").write_text(f"pid {os.getpid()}\\n{status}")
"""


@pytest.fixture
def inner(pytester):
    pytester.makeconftest(INNER_CONFTEST)
    return pytester


def _parent_pid(pytester) -> str:
    text = (pytester.path / "after_session.txt").read_text()
    return text.splitlines()[0].split()[1]


@needs_full_lockdown
def test_run_forked_reports_locked_tests_in_the_parent(inner):
    inner.makepyfile(test_inner="""
        import os, pathlib, signal, warnings
        import pytest

        HERE = pathlib.Path(__file__).parent

        @pytest.mark.locked
        def test_locked_write_outside():
            (HERE / "outside.txt").write_text("escaped")

        @pytest.mark.locked
        def test_locked_write_inside():
            (HERE / "writable" / "inside.txt").write_text("ok")

        @pytest.mark.locked
        def test_locked_tmp_path(tmp_path):
            (tmp_path / "f.txt").write_text("ok")

        @pytest.mark.locked
        def test_locked_crash():
            print("about to crash")
            os.kill(os.getpid(), signal.SIGKILL)

        @pytest.mark.locked
        def test_locked_warns():
            warnings.warn("hello from the locked child")

        def test_unlocked_write_outside():
            (HERE / "unlocked.txt").write_text("fine")
    """)
    result = inner.runpytest_subprocess()
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines(["*test_locked_write_outside*PermissionError*"])
    result.stdout.fnmatch_lines(["*worker for test_inner.py::test_locked_crash was killed by "
                                 "signal SIGKILL*"])
    result.stdout.fnmatch_lines(["*Captured stdout before the crash*", "about to crash"])
    result.stdout.fnmatch_lines(["*hello from the locked child*"])
    assert not (inner.path / "outside.txt").exists()
    assert (inner.path / "writable" / "inside.txt").read_text() == "ok"
    assert (inner.path / "unlocked.txt").read_text() == "fine"
    after = (inner.path / "after_session.txt").read_text()  # written by the parent at the end
    assert "Seccomp:\t0" in after and "NoNewPrivs:\t0" in after
    workers = (inner.path / "before.txt").read_text().split()
    assert len(set(workers)) == 5 and _parent_pid(inner) not in workers


@needs_full_lockdown
def test_run_forked_keeps_fixture_teardown_in_the_process_that_set_it_up(inner):
    log_helpers = """
        import os, pathlib
        import pytest

        LOG = pathlib.Path(__file__).parent / "writable" / "log.txt"

        def log(line):
            with LOG.open("a") as f:
                f.write(f"{line} {os.getpid()}\\n")
    """
    inner.makepyfile(test_a=log_helpers + """
        @pytest.fixture(scope="module")
        def parent_resource():
            log("setup parent_resource")
            yield
            log("teardown parent_resource")

        def test_a1(parent_resource):
            pass

        @pytest.mark.locked
        def test_a2(parent_resource):
            pass
    """, test_b=log_helpers + """
        @pytest.fixture(scope="module")
        def child_resource():
            log("setup child_resource")
            yield
            log("teardown child_resource")

        @pytest.mark.locked
        def test_b1(child_resource):
            pass

        def test_b2():
            pass
    """)
    result = inner.runpytest_subprocess()
    result.assert_outcomes(passed=4)
    parent = _parent_pid(inner)
    log = [line.rsplit(" ", 1) for line in
           (inner.path / "writable" / "log.txt").read_text().splitlines()]
    assert [event for event, _ in log] == ["setup parent_resource", "teardown parent_resource",
                                           "setup child_resource", "teardown child_resource"]
    assert log[0][1] == log[1][1] == parent  # set up and torn down once, in the parent
    assert log[2][1] == log[3][1] != parent  # set up and torn down in the locked worker


LOCKED_AND_UNLOCKED = """
    import pathlib
    import pytest

    HERE = pathlib.Path(__file__).parent

    @pytest.mark.locked
    def test_locked():
        (HERE / "writable" / "inside.txt").write_text("ok")

    def test_unlocked():
        pass
"""


def test_run_forked_fails_closed_without_landlock(inner, monkeypatch):
    monkeypatch.setenv(lockdown.ABI_CAP_ENV, "0")
    inner.makepyfile(test_inner=LOCKED_AND_UNLOCKED)
    result = inner.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*lockdown cannot be enforced on this kernel*",
                                 "*writes, creates, deletes and renames*NOT restricted*"])
    result.stdout.fnmatch_lines(["*--sandhop-allow-degraded*"])
    assert not (inner.path / "writable" / "inside.txt").exists()  # the test never ran


def test_run_forked_degraded_runs_the_test_and_warns_what_is_not_enforced(inner, monkeypatch):
    monkeypatch.setenv(lockdown.ABI_CAP_ENV, "0")
    monkeypatch.setenv("INNER_ALLOW_DEGRADED", "1")
    inner.makepyfile(test_inner=LOCKED_AND_UNLOCKED)
    result = inner.runpytest_subprocess()
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(["*LockdownDegradedWarning: lockdown was DEGRADED*",
                                 "*writes, creates, deletes and renames*NOT restricted*"])
    assert (inner.path / "writable" / "inside.txt").read_text() == "ok"


def test_spec_rejects_values_that_would_silently_mean_something_else():
    with pytest.raises(ValueError, match="writable=\\('/tmp/x',\\)"):
        LockdownSpec(writable="/tmp/x")
    with pytest.raises(ValueError, match="TCP port numbers"):
        LockdownSpec(connect_ports=(70000,))
    assert LockdownSpec(connect_ports=(), bind_ports=None).connect_ports == ()
