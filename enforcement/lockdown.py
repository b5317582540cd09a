"""The OS layer of the `lockdown` tier: Landlock and seccomp in a forked worker per test.

Why: the in-process guard (an audit hook) is a tripwire, not a boundary: native code (ctypes,
C extensions, a child program) goes around it. Lockdown asks the kernel instead: Landlock
refuses writes outside the allowed directories and TCP ports outside the allowed lists, and a
seccomp filter refuses the system calls a test has no business making (ptrace, mount, module
loading, namespaces...). Both restrict a process for the rest of its life and cannot be undone,
so a test that needs lockdown runs in its own forked worker (`run_forked`); the pytest process
itself is never restricted.

Fail closed: `apply_lockdown` raises `LockdownUnavailable` when the kernel cannot enforce all of
it, unless the caller explicitly allows a degraded run, which then lists what is NOT enforced.

What lockdown never restricts, at any ABI: reading and executing files (secrets stay
readable), UDP, connecting to existing Unix sockets, signals to other processes and abstract
Unix sockets (Landlock scopes, ABI 6, are deliberately not used: a test signalling a server
that a fixture started before the fork would break), and file descriptors the test inherits
already open (Landlock checks a file when it is opened).

Testing knob: the environment variable `SANDHOP_LANDLOCK_ABI=N` caps the Landlock ABI that
`landlock_abi()` reports (and so what `apply_landlock` uses), to simulate an older kernel or,
with 0, one without Landlock.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import signal
import stat
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

ABI_CAP_ENV = "SANDHOP_LANDLOCK_ABI"
ALLOW_DEGRADED_FLAG = "--sandhop-allow-degraded"

# Character devices a normal test writes to (subprocess.DEVNULL, discarding output, os.urandom
# fallbacks). Writes only: ioctl on devices opened under lockdown stays refused (TIOCSTI...).
DEFAULT_WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random",
                            "/dev/urandom", "/dev/tty")


@dataclass(frozen=True)
class LockdownSpec:
    """What a locked-down test may still do; everything else that lockdown handles is refused.

    `writable`: directories (or files) where writing, creating, deleting and renaming is allowed.
    `connect_ports` / `bind_ports`: None leaves TCP connect / bind unrestricted; a tuple allows
    only those TCP ports (bind needs port 0 in the tuple for an ephemeral port). Needs ABI 4.
    `writable_devices`: device files that may be opened for writing; missing ones are skipped.
    """

    writable: tuple[str, ...] = ()
    connect_ports: tuple[int, ...] | None = None
    bind_ports: tuple[int, ...] | None = None
    writable_devices: tuple[str, ...] = DEFAULT_WRITABLE_DEVICES

    def __post_init__(self) -> None:
        for name in ("connect_ports", "bind_ports"):
            ports = getattr(self, name)
            if ports is not None and not all(isinstance(p, int) and 0 <= p <= 65535
                                             for p in ports):
                raise ValueError(f"LockdownSpec.{name} must be TCP port numbers (0-65535) or "
                                 f"None, not {ports!r}")
        if isinstance(self.writable, str):
            raise ValueError("LockdownSpec.writable is a tuple of paths, not one string: "
                             f"write writable=({self.writable!r},)")


class LockdownUnavailable(RuntimeError):
    """The kernel cannot enforce the whole lockdown, and a degraded run was not allowed."""

    def __init__(self, missing: list[str]):
        self.missing = list(missing)
        lines = "\n".join(f"  - {m}" for m in self.missing)
        super().__init__(
            "lockdown cannot be enforced on this kernel; these protections are missing:\n"
            f"{lines}\n"
            "Run on a Linux kernel with Landlock ABI >= 5 (Linux 6.10+, `lsm=landlock` enabled) "
            f"and seccomp filters, or pass {ALLOW_DEGRADED_FLAG} to run anyway with the "
            "protections above switched off (every degraded test then warns what was not "
            "enforced).")

    def __reduce__(self):
        return type(self), (self.missing,)


class LockdownDegradedWarning(UserWarning):
    """A test ran under a degraded lockdown: some protections were not enforced."""


# --- Landlock ----------------------------------------------------------------------------------

_LANDLOCK_SYSCALLS = {  # generic syscall numbers, the same on x86_64 and aarch64
    "x86_64": (444, 445, 446),
    "aarch64": (444, 445, 446),
}
_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
_LANDLOCK_RULE_PATH_BENEATH = 1
_LANDLOCK_RULE_NET_PORT = 2

_FS_WRITE_FILE = 1 << 1
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SOCK = 1 << 9
_FS_MAKE_FIFO = 1 << 10
_FS_MAKE_BLOCK = 1 << 11
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13        # ABI 2
_FS_TRUNCATE = 1 << 14     # ABI 3
_FS_IOCTL_DEV = 1 << 15    # ABI 5
_NET_BIND_TCP = 1 << 0     # ABI 4
_NET_CONNECT_TCP = 1 << 1  # ABI 4

# EXECUTE, READ_FILE and READ_DIR are never handled, so reading and executing stay allowed.
_FS_WRITES_ABI1 = (_FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE_CHAR
                   | _FS_MAKE_DIR | _FS_MAKE_REG | _FS_MAKE_SOCK | _FS_MAKE_FIFO
                   | _FS_MAKE_BLOCK | _FS_MAKE_SYM)
# Never granted anywhere: as root, mknod of a block device in a writable directory would
# otherwise give raw disk access, and device ioctls stay closed.
_FS_NEVER_GRANTED = _FS_MAKE_CHAR | _FS_MAKE_BLOCK | _FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel struct is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_PR_SET_NO_NEW_PRIVS = 38


def _machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _syscall(name: str, number: int, *args: Any) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def _abi_cap() -> int | None:
    value = os.environ.get(ABI_CAP_ENV)
    if value is None or value == "":
        return None
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(f"{ABI_CAP_ENV}={value!r} is not an integer; it caps the Landlock ABI "
                         "for testing (0 simulates a kernel without Landlock)") from None


def landlock_abi() -> int:
    """The Landlock ABI version the kernel offers (0: none), capped by SANDHOP_LANDLOCK_ABI."""
    cap = _abi_cap()
    numbers = _LANDLOCK_SYSCALLS.get(_machine())
    if numbers is None or cap == 0:
        return 0
    try:
        abi = _syscall("landlock_create_ruleset", numbers[0], None, ctypes.c_size_t(0),
                       ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise
    return abi if cap is None else min(abi, cap)


def _abi_note(abi: int) -> str:
    cap = _abi_cap()
    return f"running ABI {abi}" + (f", capped by {ABI_CAP_ENV}={cap}" if cap is not None else "")


def handled_fs_access(abi: int) -> int:
    """The filesystem rights lockdown takes over at this ABI (only rights the ABI knows)."""
    if abi < 1:
        return 0
    rights = _FS_WRITES_ABI1
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def handled_net_access(spec: LockdownSpec, abi: int) -> int:
    """The TCP rights lockdown takes over: only those the spec restricts, and only from ABI 4."""
    if abi < 4:
        return 0
    return ((_NET_CONNECT_TCP if spec.connect_ports is not None else 0)
            | (_NET_BIND_TCP if spec.bind_ports is not None else 0))


def _open_path(path: str) -> tuple[int, bool]:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"lockdown: cannot open writable path {path!r}: "
                                 f"{exc.strerror}; create it first or leave it out of "
                                 "LockdownSpec") from exc
    return fd, stat.S_ISDIR(os.fstat(fd).st_mode)


def apply_landlock(spec: LockdownSpec, *, allow_degraded: bool = False) -> None:
    """Restrict this process (and all it starts) to `spec` with Landlock, for life.

    Raises LockdownUnavailable when the ABI cannot enforce all of `spec`, unless
    `allow_degraded`, in which case it enforces what the ABI knows.
    """
    abi = landlock_abi()
    gaps = not_enforced(spec, abi)
    if abi < 1 or (gaps and not allow_degraded):
        raise LockdownUnavailable(gaps)
    create, add_rule, restrict_self = _LANDLOCK_SYSCALLS[_machine()]
    handled_fs = handled_fs_access(abi)
    handled_net = handled_net_access(spec, abi)
    attr = _RulesetAttr(handled_fs, handled_net)
    attr_size = ctypes.sizeof(_RulesetAttr) if abi >= 4 else ctypes.sizeof(ctypes.c_uint64)

    path_fds = [_open_path(p) for p in spec.writable]
    for device in spec.writable_devices:
        try:
            path_fds.append(_open_path(device))
        except OSError:
            continue  # a device this machine lacks cannot be written anyway
    try:
        _set_no_new_privs()
        ruleset = _syscall("landlock_create_ruleset", create, ctypes.byref(attr),
                           ctypes.c_size_t(attr_size), ctypes.c_uint32(0))
        try:
            file_rights = handled_fs & (_FS_WRITE_FILE | _FS_TRUNCATE)
            for fd, is_dir in path_fds:
                allowed = (handled_fs if is_dir else file_rights) & ~_FS_NEVER_GRANTED
                rule = _PathBeneathAttr(allowed, fd)
                _syscall("landlock_add_rule", add_rule, ctypes.c_int(ruleset),
                         ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                         ctypes.c_uint32(0))
            for right, ports in ((_NET_CONNECT_TCP, spec.connect_ports),
                                 (_NET_BIND_TCP, spec.bind_ports)):
                if not handled_net & right:
                    continue
                for port in ports or ():
                    rule = _NetPortAttr(right, port)
                    _syscall("landlock_add_rule", add_rule, ctypes.c_int(ruleset),
                             ctypes.c_int(_LANDLOCK_RULE_NET_PORT), ctypes.byref(rule),
                             ctypes.c_uint32(0))
            _syscall("landlock_restrict_self", restrict_self, ctypes.c_int(ruleset),
                     ctypes.c_uint32(0))
        finally:
            os.close(ruleset)
    finally:
        for fd, _ in path_fds:
            os.close(fd)


def _set_no_new_privs() -> None:
    if _libc.prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


# --- seccomp -----------------------------------------------------------------------------------

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

# System calls refused with EPERM: debugging other processes, kernel and mount manipulation,
# namespaces, kernel keyrings, io_uring (its operations bypass seccomp), clock and host changes.
DENIED_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438,
        "perf_event_open": 298, "bpf": 321, "userfaultfd": 323,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428,
        "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "open_tree_attr": 467,
        "unshare": 272, "setns": 308,
        "init_module": 175, "finit_module": 313, "delete_module": 176,
        "kexec_load": 246, "kexec_file_load": 320, "reboot": 169,
        "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179, "quotactl_fd": 443,
        "vhangup": 153, "iopl": 172, "ioperm": 173,
        "keyctl": 250, "add_key": 248, "request_key": 249,
        "open_by_handle_at": 304, "name_to_handle_at": 303,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
        "sethostname": 170, "setdomainname": 171,
    },
    "aarch64": {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438,
        "perf_event_open": 241, "bpf": 280, "userfaultfd": 282,
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "open_tree": 428,
        "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "open_tree_attr": 467,
        "unshare": 97, "setns": 268,
        "init_module": 105, "finit_module": 273, "delete_module": 106,
        "kexec_load": 104, "kexec_file_load": 294, "reboot": 142,
        "swapon": 224, "swapoff": 225, "acct": 89, "quotactl": 60, "quotactl_fd": 443,
        "vhangup": 58,
        "keyctl": 219, "add_key": 217, "request_key": 218,
        "open_by_handle_at": 265, "name_to_handle_at": 264,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171,
        "sethostname": 161, "setdomainname": 162,
    },
}
# Syscalls the filter looks at more closely: clone (namespace flags), clone3 (its flags sit
# behind a pointer a filter cannot read, so it reports ENOSYS and libc falls back to clone),
# ioctl (terminal input injection), seccomp itself (to install the filter).
_SPECIAL_SYSCALLS = {
    "x86_64": {"clone": 56, "clone3": 435, "ioctl": 16, "seccomp": 317},
    "aarch64": {"clone": 220, "clone3": 435, "ioctl": 29, "seccomp": 277},
}
CLONE_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
DENIED_IOCTLS = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}
_X32_SYSCALL_BIT = 0x40000000

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_GET_ACTION_AVAIL = 2
_SECCOMP_FILTER_FLAG_TSYNC = 1

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06
# offsets in struct seccomp_data: nr, arch, instruction_pointer, args[6] (low words, little-endian)
_NR, _ARCH, _ARG0, _ARG1 = 0, 4, 16, 24


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """The classic-BPF filter as (code, jt, jf, k) instructions for one architecture.

    Foreign architectures (32-bit syscalls on x86_64, x32) kill the process: their syscall
    numbers differ, so they would walk around the table.
    """
    denied = DENIED_SYSCALLS[machine]
    special = _SPECIAL_SYSCALLS[machine]
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    prog = [
        (_BPF_LD_W_ABS, 0, 0, _ARCH),
        (_BPF_JEQ_K, 1, 0, AUDIT_ARCH[machine]),
        (_BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (_BPF_LD_W_ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":
        prog += [(_BPF_JGE_K, 0, 1, _X32_SYSCALL_BIT), (_BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS)]
    for number in sorted(set(denied.values())):
        prog += [(_BPF_JEQ_K, 0, 1, number), (_BPF_RET_K, 0, 0, eperm)]
    prog += [
        (_BPF_JEQ_K, 0, 1, special["clone3"]),
        (_BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
        (_BPF_JEQ_K, 0, 3, special["clone"]),
        (_BPF_LD_W_ABS, 0, 0, _ARG0),
        (_BPF_JSET_K, 0, 1, CLONE_NAMESPACE_FLAGS),
        (_BPF_RET_K, 0, 0, eperm),
    ]
    ioctls = sorted(DENIED_IOCTLS.values())
    prog += [(_BPF_JEQ_K, 0, 1 + 2 * len(ioctls), special["ioctl"]),
             (_BPF_LD_W_ABS, 0, 0, _ARG1)]
    for command in ioctls:
        prog += [(_BPF_JEQ_K, 0, 1, command), (_BPF_RET_K, 0, 0, eperm)]
    prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return prog


def seccomp_missing() -> str | None:
    """Why a seccomp filter cannot be installed here, or None when it can."""
    machine = _machine()
    if machine not in AUDIT_ARCH:
        return f"no syscall table for architecture {machine!r} (known: x86_64, aarch64)"
    action = ctypes.c_uint32(SECCOMP_RET_KILL_PROCESS)
    try:
        _syscall("seccomp", _SPECIAL_SYSCALLS[machine]["seccomp"],
                 ctypes.c_uint(_SECCOMP_GET_ACTION_AVAIL), ctypes.c_uint(0), ctypes.byref(action))
    except OSError as exc:
        return f"seccomp filters unavailable ({exc.strerror})"
    return None


def apply_seccomp() -> None:
    """Install the syscall filter on this process (and all it starts), for life."""
    missing = seccomp_missing()
    if missing is not None:
        raise LockdownUnavailable([f"seccomp: {missing}"])
    machine = _machine()
    instructions = seccomp_program(machine)
    filters = (_SockFilter * len(instructions))(*(_SockFilter(*i) for i in instructions))
    prog = _SockFprog(len(instructions), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    _set_no_new_privs()
    # TSYNC: every thread gets the filter (a nonzero result names a thread that could not).
    failed_thread = _syscall("seccomp", _SPECIAL_SYSCALLS[machine]["seccomp"],
                             ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
                             ctypes.c_uint(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog))
    if failed_thread != 0:
        raise OSError(errno.EBUSY, f"seccomp: thread {failed_thread} could not take the filter")


# --- lockdown = Landlock + seccomp -------------------------------------------------------------

def not_enforced(spec: LockdownSpec, abi: int, seccomp_problem: str | None = None) -> list[str]:
    """What a lockdown of `spec` would leave unenforced at Landlock `abi`; empty when complete."""
    gaps = []
    note = _abi_note(abi)
    if abi < 1:
        where = ", ".join(spec.writable) or "nowhere"
        gaps.append("filesystem: writes, creates, deletes and renames outside the writable "
                    f"paths ({where}) are NOT restricted (needs Landlock; {note})")
    if abi < 3:
        gaps.append("filesystem: truncate() of files outside the writable paths is NOT "
                    f"restricted (needs Landlock ABI 3; {note})")
    if abi < 4:
        for what, ports in (("connect", spec.connect_ports), ("bind", spec.bind_ports)):
            if ports is not None:
                gaps.append(f"network: TCP {what} is NOT limited to ports "
                            f"{list(ports)} (needs Landlock ABI 4; {note})")
    if abi < 5:
        gaps.append("devices: ioctl on devices the test opens is NOT restricted "
                    f"(needs Landlock ABI 5; {note})")
    if seccomp_problem is not None:
        gaps.append("syscalls: ptrace, mount, unshare, setns, bpf, module loading, kexec, "
                    f"keyrings, io_uring and the rest are NOT blocked ({seccomp_problem})")
    return gaps


def _require_single_thread() -> None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
                if threads > 1:
                    raise RuntimeError(
                        f"lockdown must be applied before any thread starts, but this process "
                        f"has {threads} threads: Landlock would restrict only the calling one. "
                        "Apply it right after fork (run_forked does).")
                return


def apply_lockdown(spec: LockdownSpec, *, allow_degraded: bool = False) -> list[str]:
    """Apply Landlock and seccomp to this process for life; return what is NOT enforced.

    Raises LockdownUnavailable, before changing anything, when a protection is missing and
    `allow_degraded` is false. Call it in a fresh, single-threaded child (see run_forked).
    """
    abi = landlock_abi()
    seccomp_problem = seccomp_missing()
    gaps = not_enforced(spec, abi, seccomp_problem)
    if gaps and not allow_degraded:
        raise LockdownUnavailable(gaps)
    _require_single_thread()
    if abi >= 1:
        apply_landlock(spec, allow_degraded=True)  # the gaps were judged above
    if seccomp_problem is None:
        apply_seccomp()
    return gaps


# --- forked workers ----------------------------------------------------------------------------

def _fork_locked(work: Callable[[], dict], spec: LockdownSpec, allow_degraded: bool,
                 before: Callable[[], object] | None) -> tuple[dict | None, int]:
    """Run `work` in a forked child under lockdown; return its JSON payload and exit status.

    The payload is {"error": ...} when `before` or the lockdown failed, else work()'s dict plus
    "not_enforced". The status is the exit code, or -N when signal N killed the child.
    """
    # The child writes into an anonymous file opened before the fork (Landlock only checks
    # opens), and this process reads it once the child has exited: unlike a pipe, processes
    # the test leaves behind cannot keep the read waiting.
    result_fd = os.memfd_create("sandhop-lockdown-result")
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()  # or the child would print this process's buffered output again
        pid = os.fork()
        if pid == 0:
            _child_main(work, spec, allow_degraded, before, result_fd)  # never returns
        try:
            _, status = os.waitpid(pid, 0)
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        os.lseek(result_fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(result_fd), "rb") as result:
            data = result.read()
    finally:
        os.close(result_fd)
    try:
        payload = json.loads(data) if data else None
    except ValueError:
        payload = None  # cut short by a crash
    return payload, os.waitstatus_to_exitcode(status)


def _child_main(work: Callable[[], dict], spec: LockdownSpec, allow_degraded: bool,
                before: Callable[[], object] | None, result_fd: int) -> None:
    code = 0
    try:
        payload: dict[str, Any]
        try:
            if before is not None:
                before()
        except Exception as exc:
            payload = {"error": f"sandhop: the pre-lockdown hook failed: "
                                f"{type(exc).__name__}: {exc}"}
        else:
            try:
                gaps = apply_lockdown(spec, allow_degraded=allow_degraded)
            except LockdownUnavailable as exc:
                payload = {"error": f"sandhop: {exc}"}
            except Exception as exc:
                payload = {"error": f"sandhop: lockdown could not be applied: "
                                    f"{type(exc).__name__}: {exc}"}
            else:
                payload = {"not_enforced": gaps, **work()}
        data = json.dumps(payload, default=repr).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(result_fd, view):]
    except BaseException:
        code = 1
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def _describe_status(status: int) -> str:
    if status < 0:
        name = signal.Signals(-status).name if -status in signal.valid_signals() else "?"
        text = f"was killed by signal {name} ({-status})"
        if -status == signal.SIGSYS:
            text += ("; the seccomp filter kills foreign-architecture system calls "
                     "(e.g. 32-bit or x32)")
        return text
    return f"exited with status {status}"


@dataclass(frozen=True)
class LockedRun:
    """What a function did in a locked-down child (see run_in_lockdown)."""

    exit_status: int              # 0 normally; -N when killed by signal N
    value: Any                    # fn's return value after a JSON round trip; None on error
    error: str | None             # "ExcType: message" when fn raised or lockdown failed
    not_enforced: tuple[str, ...]  # what a degraded lockdown left unenforced


def run_in_lockdown(fn: Callable[[], Any], spec: LockdownSpec, *,
                    allow_degraded: bool = False) -> LockedRun:
    """Call `fn()` in a forked child under lockdown; the caller's process stays unrestricted."""
    def work() -> dict:
        try:
            return {"value": fn()}
        except Exception as exc:
            return {"fn_error": f"{type(exc).__name__}: {exc}"}

    payload, status = _fork_locked(work, spec, allow_degraded, None)
    if payload is None:
        return LockedRun(status, None, f"the locked-down child {_describe_status(status)} "
                                       "before reporting", ())
    error = payload.get("error") or payload.get("fn_error")
    return LockedRun(status, payload.get("value"), error,
                     tuple(payload.get("not_enforced", ())))


def run_forked(item, spec: LockdownSpec, *, allow_degraded: bool = False,
               before: Callable[[], object] | None = None, nextitem=None) -> bool:
    """Run one pytest item in a forked, locked-down worker and report it in this process.

    For a `pytest_runtest_protocol` hook: pass its `nextitem` (with None, this process tears
    down all its fixtures after the test: correct, only slower), and return the result.
    `before` runs in the child after the fork and before lockdown. Fixtures the child sets up
    run under lockdown too, so `spec.writable` must cover what they write (e.g. the basetemp
    for tmp_path). If lockdown cannot be applied the test fails (fail closed).
    """
    from _pytest.runner import runtestprotocol
    from pytest import CallInfo

    ihook = item.ihook
    config = item.config
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)

    def work() -> dict:
        _forget_inherited_finalizers(item.session)
        with warnings.catch_warnings(record=True) as caught:
            reports = runtestprotocol(item, log=False, nextitem=None)
        return {
            "reports": [config.hook.pytest_report_to_serializable(config=config, report=r)
                        for r in reports],
            "warnings": [_warning_to_json(w) for w in caught],
        }

    payload, status = _fork_locked(work, spec, allow_degraded, before)
    reports = _reports_from_payload(item, payload, status)

    # The child's fixtures died with it; this process's own fixtures end as pytest's would.
    if item.session.shouldfail or item.session.shouldstop:
        nextitem = None
    teardown = CallInfo.from_call(lambda: item.session._setupstate.teardown_exact(nextitem),
                                  when="teardown")
    if teardown.excinfo is not None:
        reports.append(ihook.pytest_runtest_makereport(item=item, call=teardown))

    for report in reports:
        ihook.pytest_runtest_logreport(report=report)
    for message in (payload or {}).get("warnings", ()):
        _record_warning(item, _warning_from_json(message))
    gaps = (payload or {}).get("not_enforced") or []
    if gaps:
        text = ("lockdown was DEGRADED for this test; NOT enforced:\n"
                + "\n".join(f"  - {g}" for g in gaps))
        _record_warning(item, warnings.WarningMessage(
            LockdownDegradedWarning(text), LockdownDegradedWarning, str(item.path),
            (item.location[1] or 0) + 1))
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _forget_inherited_finalizers(session) -> None:
    # Fixtures on the inherited setup stack belong to the parent, which tears them down itself;
    # the child only finalizes what it sets up, never the parent's resources a second time.
    stack = session._setupstate.stack
    for node, (_, exc) in list(stack.items()):
        stack[node] = ([], exc)


def _reports_from_payload(item, payload: dict | None, status: int) -> list:
    from pytest import TestReport

    config = item.config
    if payload is not None and "reports" in payload:
        reports = []
        for data in payload["reports"]:
            if isinstance(data.get("longrepr"), list):
                data["longrepr"] = tuple(data["longrepr"])  # skip location; JSON made it a list
            reports.append(config.hook.pytest_report_from_serializable(config=config, data=data))
        return reports
    sections = []
    if payload is not None and "error" in payload:
        message = payload["error"]
    else:
        message = (f"sandhop: the locked-down worker for {item.nodeid} "
                   f"{_describe_status(status)} before reporting a result")
        sections = _leftover_capture(config)
    return [TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed",
                       message, "call", sections=sections,
                       user_properties=list(item.user_properties))]


def _leftover_capture(config) -> list[tuple[str, str]]:
    """Output a crashed child left in the shared capture files, as report sections."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None or not capman.is_globally_capturing():
        return []
    try:
        out, err = capman.read_global_capture()
    except Exception:
        return []
    return [(f"Captured {name} before the crash", text)
            for name, text in (("stdout", out), ("stderr", err)) if text]


def _warning_to_json(message: warnings.WarningMessage) -> dict:
    category = message.category
    return {"text": str(message.message), "module": category.__module__,
            "qualname": category.__qualname__, "filename": message.filename,
            "lineno": message.lineno}


def _warning_from_json(data: dict) -> warnings.WarningMessage:
    category: Any = sys.modules.get(data["module"])
    for part in data["qualname"].split("."):
        category = getattr(category, part, None)
    if not (isinstance(category, type) and issubclass(category, Warning)):
        category = UserWarning
    try:
        instance = category(data["text"])
    except Exception:
        instance = UserWarning(data["text"])
    return warnings.WarningMessage(instance, category, data["filename"], data["lineno"])


def _record_warning(item, message: warnings.WarningMessage) -> None:
    # Straight to the hook pytest's own warning capture calls: shown in the warnings summary,
    # and never turned into an exception by an "error" filter in this (reporting) process.
    item.ihook.pytest_warning_recorded.call_historic(
        kwargs=dict(warning_message=message, nodeid=item.nodeid, when="runtest",
                    location=None))
