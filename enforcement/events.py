"""The event record of a trace, its closed vocabularies, and target normalisation.

Everything that decides what an operation *is* lives here, once: the category vocabulary, how a
path, host or address is normalised, the one `target_class` function, the portable spelling of
machine-specific prefixes, and the observed-tag rule table. Pure Python (stdlib only), because
the recorder loads it into every traced child process.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import socket
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase

SCHEMA_VERSION = 1

CATEGORIES: tuple[str, ...] = (
    "fs.read", "fs.write", "fs.delete", "fs.meta",
    "net.dns", "net.connect", "net.bind", "net.send",
    "proc.spawn", "proc.signal",
    "env.read", "env.write",
    "code.import", "code.native", "code.exec",
    "sys.tamper",
    "browser.request", "dom.mutation",
    "syscall",  # a kernel system call from a syscall-level dataset (ADFA-LD); op and target name it
)

PHASES: tuple[str, ...] = ("collect", "setup", "call", "teardown", "session")

OUTCOMES: tuple[str, ...] = ("passed", "failed", "error", "skipped", "")

TARGET_CLASSES: tuple[str, ...] = (
    # filesystem (also executables and native libraries, classed by where they live)
    "tmp", "cwd", "site", "stdlib", "python", "home", "home.secret",
    "system", "system.secret", "proc", "proc.secret", "dev", "other",
    # network
    "loopback", "private_net", "link_local", "metadata_ip", "public_net", "multicast",
    "unspecified", "domain", "unix",
    # environment variables
    "env", "env.secret",
    # code and processes
    "stdlib_module", "module", "string", "interpreter", "self", "process",
    # browser
    "dom",
    # system calls (ADFA-LD): one class, the target is the syscall's name
    "syscall",
)

OBSERVED_TAGS: tuple[str, ...] = (
    "network_access", "external_api_call", "dns_lookup", "file_read", "file_write",
    "file_delete", "sensitive_data_access", "process_spawn", "native_code", "env_access",
    "dom_mutation",
)

INFERRED_TAGS: tuple[str, ...] = (
    "credential_access", "exfiltration", "persistence", "reconnaissance", "execution",
    "defense_evasion", "resource_abuse", "tampering",
)

ALL_TAGS: tuple[str, ...] = OBSERVED_TAGS + INFERRED_TAGS


@dataclass(frozen=True)
class Event:
    """One row of a trace (DESIGN 3.1). Targets are stored normalised and portable."""

    category: str
    op: str
    target: str
    target_class: str
    detail: str = ""
    run_id: str = ""
    suite: str = ""
    test_id: str = ""
    phase: str = "session"
    seq: int = 0
    t_ns: int = 0
    pid: int = 0
    ppid: int = 0
    count: int = 1
    decision: str = ""
    tier: str = ""
    risk: float | None = None
    malicious: bool = False
    attack: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    test_outcome: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.category not in CATEGORIES:
            problems.append(f"category {self.category!r} is not one of {', '.join(CATEGORIES)}")
        if self.phase not in PHASES:
            problems.append(f"phase {self.phase!r} is not one of {', '.join(PHASES)}")
        if self.target_class not in TARGET_CLASSES:
            problems.append(f"target_class {self.target_class!r} is not in TARGET_CLASSES")
        if self.test_outcome not in OUTCOMES:
            problems.append(f"test_outcome {self.test_outcome!r} is not one of {OUTCOMES}")
        unknown = [t for t in self.tags if t not in ALL_TAGS]
        if unknown:
            problems.append(f"unknown tags {unknown}")
        if self.count < 1:
            problems.append(f"count must be >= 1, got {self.count}")
        if problems:
            raise ValueError("invalid event: " + "; ".join(problems))

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["tags"] = list(self.tags)
        return d


EVENT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Event))


# --------------------------------------------------------------------------- machine roots

@dataclass(frozen=True)
class Roots:
    """The machine-specific prefixes that are replaced by variables in stored targets."""

    tmp: str
    home: str
    cwd: str
    site: tuple[str, ...]
    stdlib: str
    python: str
    other_pythons: tuple[str, ...] = ()  # a venv's base interpreter, a parent's venv: also ${python}

    @classmethod
    def current(cls, home: str | None = None, cwd: str | None = None) -> "Roots":
        paths = sysconfig.get_paths()
        site = {os.path.realpath(paths[k]) for k in ("purelib", "platlib") if k in paths}
        site.update(os.path.realpath(p) for p in sys.path if p.endswith(("site-packages", "dist-packages")))
        return cls(
            tmp=os.path.realpath(tempfile.gettempdir()),
            home=os.path.realpath(home or os.path.expanduser("~")),
            cwd=os.path.realpath(cwd or os.getcwd()),
            site=tuple(sorted(site)),
            stdlib=os.path.realpath(paths["stdlib"]),
            python=os.path.realpath(sys.prefix),
            other_pythons=(os.path.realpath(sys.base_prefix),),
        )

    def inherit(self, parent: "Roots") -> "Roots":
        """These roots, also knowing a parent process's interpreter and site folders (a test that
        runs a freshly made venv still reads the recording venv's files)."""
        from dataclasses import replace
        site = tuple(sorted(set(self.site) | set(parent.site)))
        pythons = tuple(p for p in dict.fromkeys((*self.other_pythons, parent.python, *parent.other_pythons))
                        if p != self.python)
        return replace(self, site=site, other_pythons=pythons)

    def prefixes(self) -> list[tuple[str, str]]:
        """(prefix, variable) pairs, longest prefix first, so the most specific one wins."""
        # On equal prefixes the earlier wins: a project checked out in HOME is still ${cwd}.
        pairs = [(self.cwd, "${cwd}"), (self.home, "${home}"), (self.tmp, "${tmp}"),
                 (self.stdlib, "${stdlib}"), (self.python, "${python}")]
        pairs += [(p, "${python}") for p in self.other_pythons]
        pairs += [(s, "${site}") for s in self.site]
        pairs = [(p.rstrip("/") or "/", v) for p, v in pairs if p and p != "/"]
        return sorted(pairs, key=lambda pv: len(pv[0]), reverse=True)


def portable_text(text: str, roots: Roots) -> str:
    """Replace machine-specific prefixes wherever they start a path inside free text (argv)."""
    for prefix, var in roots.prefixes():
        if prefix in text:
            text = re.sub(r"(?<![\w./-])" + re.escape(prefix) + r"(?![\w.-])", lambda _m: var, text)
    return text


def portable_path(path: str, roots: Roots) -> str:
    """Replace the longest machine-specific prefix of an absolute path by its variable."""
    for prefix, var in roots.prefixes():
        if path == prefix:
            return var
        if path.startswith(prefix) and path[len(prefix)] == "/":
            return var + path[len(prefix):]
    return path


# --------------------------------------------------------------------------- normalisation

# Bound at import: code under test that monkeypatches os.path.realpath must not change what a
# path is (the guard decides on this).
_realpath = os.path.realpath
_getcwd = os.getcwd
_fsdecode = os.fsdecode


def normalise_path(path: str | bytes | os.PathLike, cwd: str | None = None) -> str:
    """Absolute real path: relative paths join `cwd`, `..` and symlinks are resolved."""
    p = _fsdecode(path)
    if not p.startswith("/"):
        p = (cwd or _getcwd()) + "/" + p
    return _realpath(p)


_IPV4_LEGACY = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)(\.(0[xX][0-9a-fA-F]+|[0-9]+)){0,3}$")


def canonical_ip(text: str) -> str | None:
    """The canonical spelling of an IP address, or None if `text` is not one.

    Accepts every spelling the C resolver accepts for IPv4 (`2130706433`, `0x7f000001`, `127.1`,
    `0177.0.0.1`) and unwraps IPv4-mapped IPv6 (`::ffff:127.0.0.1` -> `127.0.0.1`).
    """
    s = text.strip().strip("[]")
    if _IPV4_LEGACY.match(s):
        try:
            return socket.inet_ntoa(socket.inet_aton(s))
        except OSError:
            return None
    try:
        ip = ipaddress.ip_address(s.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def normalise_host(host: str | bytes) -> str:
    """Lower-case host without trailing dot, IDNA-encoded; IP addresses in canonical form."""
    h = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
    h = h.strip().rstrip(".")
    ip = canonical_ip(h)
    if ip is not None:
        return ip
    h = h.lower()
    if h.isascii():
        return h
    labels = []
    for label in h.split("."):
        try:
            labels.append(label.encode("idna").decode("ascii") if not label.isascii() else label)
        except UnicodeError:
            labels.append(label)
    return ".".join(labels).lower()


def format_address(host: str, port: int | str | None) -> str:
    """`host:port` with a normalised host; IPv6 in brackets; `*` for an unknown port."""
    h = normalise_host(host)
    if ":" in h:
        h = f"[{h}]"
    return f"{h}:{'*' if port in (None, '') else port}"


def split_address(target: str) -> tuple[str, str]:
    """Inverse of `format_address`: (host, port)."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        return host, rest.lstrip(":")
    host, _, port = target.rpartition(":")
    return (host, port) if host else (target, "")


# --------------------------------------------------------------------------- target classes

_METADATA_IPS = frozenset({"169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254"})
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data.ec2.internal"})

# Paths relative to a home directory that hold credentials or keys.
HOME_SECRETS: tuple[str, ...] = (
    ".ssh/*", ".ssh", ".aws/*", ".gnupg/*", ".netrc", ".pgpass", ".git-credentials",
    ".docker/config.json", ".kube/*", ".config/gcloud/*", ".azure/*", ".npmrc", ".pypirc",
    ".config/gh/hosts.yml", ".bash_history", ".zsh_history", ".python_history",
    ".local/share/keyrings/*", ".password-store/*", ".vault-token", ".terraformrc",
    ".cargo/credentials*", ".config/pip/pip.conf", ".env",
)
SYSTEM_SECRETS: tuple[str, ...] = (
    "/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/sudoers.d/*", "/etc/ssh/ssh_host_*",
    "/root/.ssh/*", "/var/run/secrets/*",
)
PROC_SECRETS: tuple[str, ...] = ("/proc/*/environ", "/proc/*/mem", "/proc/*/maps", "/proc/*/auxv")

_SECRET_ENV = re.compile(
    r"(^|_)(API_?KEY|KEYS?|TOKEN|SECRET|PASSWORD|PASSWD|PASS|PWD|CREDENTIALS?|COOKIE|AUTH|DSN|PRIVATE)(_|$)"
    r"|ACCESS_KEY|PASSWORD|PASSWD|JWT|^DATABASE_URL$",
    re.IGNORECASE,
)
_NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})


def is_secret_env_name(name: str) -> bool:
    """Names that by convention hold credentials (token boundaries: KEYBOARD is not a key)."""
    return name.upper() not in _NOT_SECRET_ENV and bool(_SECRET_ENV.search(name))


def path_class(path: str) -> str:
    """Class of a portable absolute path (variables already substituted)."""
    if path.startswith("${"):
        var, _, rest = path[2:].partition("}")
        if var == "home":
            rel = rest.lstrip("/")
            if rel and any(fnmatchcase(rel, pat) or fnmatchcase(rel, pat + "/*") for pat in HOME_SECRETS):
                return "home.secret"
            return "home"
        if var in ("tmp", "cwd", "site", "stdlib", "python"):
            return var
        return "other"
    if any(fnmatchcase(path, pat) for pat in SYSTEM_SECRETS):
        return "system.secret"
    if path == "/proc" or path.startswith("/proc/"):
        return "proc.secret" if any(fnmatchcase(path, p) for p in PROC_SECRETS) else "proc"
    if path == "/dev" or path.startswith("/dev/"):
        return "dev"
    if path.startswith(("/etc", "/usr", "/bin", "/sbin", "/lib", "/var", "/sys", "/opt", "/boot",
                        "/run", "/srv", "/root")):
        return "system"
    return "other"


def ip_class(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    if ip in _METADATA_IPS:
        return "metadata_ip"
    if addr.is_loopback:
        return "loopback"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_multicast:
        return "multicast"
    if addr.is_link_local:
        return "link_local"
    if addr.is_private or (isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT):
        return "private_net"
    return "public_net"


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def host_class(host: str) -> str:
    """Class of a normalised host: an IP class, `domain` for names (`loopback` for localhost)."""
    ip = canonical_ip(host)
    if ip is not None:
        return ip_class(ip)
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return "loopback"
    if host in _METADATA_HOSTS:
        return "metadata_ip"
    return "domain"


def target_class(category: str, target: str, detail: str = "") -> str:
    """The one function that classes a normalised, portable target. `detail` helps where the
    category alone is ambiguous (a unix socket path, a dlopen of the running binary)."""
    family = category.split(".", 1)[0]
    if family == "fs":
        return path_class(target)
    if category in ("net.connect", "net.bind", "net.send", "browser.request"):
        if detail.startswith("unix") or target.startswith(("/", "${")):
            return "unix"
        if category == "browser.request":
            host = _url_host(target)
            return host_class(host) if host else "other"
        return host_class(split_address(target)[0])
    if category == "net.dns":
        return host_class(target)
    if family == "env":
        return "env.secret" if target == "*" or is_secret_env_name(target) else "env"
    if category == "proc.spawn":
        try:
            exe = shlex.split(target)[0]
        except (ValueError, IndexError):
            exe = target.split(" ", 1)[0]
        return path_class(exe) if exe.startswith(("/", "${")) else "other"
    if category == "proc.signal":
        return "self" if detail == "self" else "process"
    if category == "code.import":
        return "stdlib_module" if target.split(".", 1)[0] in _STDLIB_MODULES else "module"
    if category == "code.native":
        if target in ("", "<self>"):
            return "self"
        return path_class(target) if target.startswith(("/", "${")) else "system"
    if category == "code.exec":
        return path_class(target) if target.startswith(("/", "${")) else "string"
    if category == "sys.tamper":
        return "interpreter"
    if category == "dom.mutation":
        return "dom"
    if category == "syscall":
        return "syscall"
    raise ValueError(f"unknown category {category!r}")


_STDLIB_MODULES = frozenset(getattr(sys, "stdlib_module_names", ())) | {"__main__"}


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return ""
    return normalise_host(host) if host else ""


# --------------------------------------------------------------------------- observed tags

# (category pattern, target classes or None for any, tags). Every matching row contributes.
OBSERVED_TAG_RULES: tuple[tuple[str, frozenset[str] | None, tuple[str, ...]], ...] = (
    ("net.*", None, ("network_access",)),
    ("net.dns", None, ("dns_lookup",)),
    ("net.connect", frozenset({"public_net", "private_net", "domain", "metadata_ip", "link_local"}), ("external_api_call",)),
    ("net.send", frozenset({"public_net", "private_net", "domain", "metadata_ip", "link_local"}), ("external_api_call",)),
    ("browser.request", None, ("network_access",)),
    ("browser.request", frozenset({"public_net", "private_net", "domain", "metadata_ip", "link_local"}), ("external_api_call",)),
    ("fs.read", None, ("file_read",)),
    ("fs.meta", None, ("file_read",)),
    ("fs.write", None, ("file_write",)),
    ("fs.delete", None, ("file_delete",)),
    ("fs.*", frozenset({"home.secret", "system.secret", "proc.secret"}), ("sensitive_data_access",)),
    ("net.connect", frozenset({"metadata_ip"}), ("sensitive_data_access",)),
    ("proc.spawn", None, ("process_spawn",)),
    ("code.native", None, ("native_code",)),
    ("env.*", None, ("env_access",)),
    ("env.read", frozenset({"env.secret"}), ("sensitive_data_access",)),
    ("dom.mutation", None, ("dom_mutation",)),
)


def observed_tags(category: str, target_class_: str) -> tuple[str, ...]:
    """Tags that follow from category and target class alone, in vocabulary order."""
    tags = set()
    for pattern, classes, add in OBSERVED_TAG_RULES:
        if fnmatchcase(category, pattern) and (classes is None or target_class_ in classes):
            tags.update(add)
    return tuple(t for t in OBSERVED_TAGS if t in tags)


# --------------------------------------------------------------------------- spool format

# The recorder spools one JSON array per line, fields in this order, into
# `<spool>/events-<pid>-<nonce>.jsonl` (one file per traced process). `t_ns` counts from the
# run's start on the shared monotonic clock; `lseq` orders events within one process.
SPOOL_FIELDS: tuple[str, ...] = (
    "t_ns", "pid", "ppid", "lseq", "test_id", "phase", "category", "op", "target", "detail",
    "target_class",
)
