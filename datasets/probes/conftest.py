"""Fixtures of the live probes, and the guard that keeps them inside the harness.

The probes really steal (canaries) and really send (to listeners). They may only run where
`python -m sandhop.datasets.probe` put them: a fake HOME, and a network namespace whose only
interface is `lo`, so that an attacker address can only ever be a listener of the harness.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

ROOT, LOOT, SITE = (os.environ.get(k, "") for k in ("SANDHOP_PROBE_ROOT", "SANDHOP_PROBE_LOOT", "SANDHOP_PROBE_SITE"))
# A listener that never answers fails the probe instead of hanging it.
socket.setdefaulttimeout(20)
_outcomes_fd = -1


def _refusal() -> str | None:
    """Why these probes must not run here (None inside the harness)."""
    if not ROOT:
        return "SANDHOP_PROBE_ROOT is not set"
    interfaces = sorted(name for _index, name in socket.if_nameindex())
    if interfaces != ["lo"]:
        return f"this network namespace has interfaces {interfaces}, not only lo"
    if not os.path.realpath(os.path.expanduser("~")).startswith(os.path.realpath(ROOT) + "/"):
        return "HOME is not the harness's fake HOME"
    return None


def pytest_configure(config: pytest.Config) -> None:
    why = _refusal()
    if why:
        pytest.exit("sandhop probes: refusing to run outside the probe harness (" + why + "). These tests "
                    "perform real attacks against canaries; run them with `python -m sandhop.datasets.probe`, "
                    "which gives them a fake HOME and a network namespace where nothing leaves the machine.",
                    returncode=4)
    # One descriptor, opened before any test: the outcomes the harness reports.
    global _outcomes_fd
    _outcomes_fd = os.open(os.environ["SANDHOP_PROBE_OUTCOMES"],
                                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    line = json.dumps({"test": report.nodeid, "when": report.when, "outcome": report.outcome}) + "\n"
    os.write(_outcomes_fd, line.encode())


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module whose import-time payload was stopped never gets a test: report the module.
    if report.failed:
        os.write(_outcomes_fd, (json.dumps({"test": report.nodeid, "when": "collect", "outcome": "failed"}) + "\n").encode())


class Loot:
    """What the attacker's listeners stored (they store before they acknowledge)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def stored(self, receipt: bytes | str) -> bytes:
        """The bytes a listener stored, from its receipt `stored NAME`."""
        text = receipt.decode() if isinstance(receipt, bytes) else receipt
        assert text.startswith("stored "), f"the listener did not store anything: {text!r}"
        return (self.folder / text.split()[1]).read_bytes()

    def marker(self, name: str) -> str:
        """The marker a payload left when it ran ('' when it did not run)."""
        path = self.folder / f"{name}.marker"
        return path.read_text() if path.exists() else ""

    def dns_names(self) -> list[str]:
        """Every name the attacker's DNS server was asked, in order."""
        path = self.folder / "dns.log"
        return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def loot() -> Loot:
    return Loot(Path(LOOT))


@pytest.fixture
def home() -> Path:
    return Path(os.path.expanduser("~"))


@pytest.fixture
def fake_site() -> Path:
    return Path(SITE)


class Attacker:
    """The client side of exfiltration, written as a payload would write it (stdlib only)."""

    def __init__(self, loot: Loot) -> None:
        self.loot = loot

    def send_tcp(self, ip: str, port: int, data: bytes) -> bytes:
        """Raw TCP to the sink (`send` on a connected socket is not audited: only the connect)."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.connect((ip, port))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            receipt = s.makefile("rb").read()
        return self.loot.stored(receipt)

    def post(self, host: str, port: int, body: bytes, path: str = "/collect") -> bytes:
        """HTTP POST by name: a lookup (net.dns), then a connect to the address it gave."""
        import http.client
        conn = http.client.HTTPConnection(host, port)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/octet-stream"})
            receipt = conn.getresponse().read()
        finally:
            conn.close()
        return self.loot.stored(receipt)

    def send_udp(self, ip: str, port: int, data: bytes) -> bytes:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(data, (ip, port))
            receipt, _peer = s.recvfrom(4096)
        return self.loot.stored(receipt)


@pytest.fixture
def attacker(loot: Loot) -> Attacker:
    return Attacker(loot)


@pytest.fixture
def benign_work(tmp_path: Path):
    """The host test's own work that slow attacks hide between: stdlib reads, tmp writes, maths."""
    import fractions
    import json as json_module
    import statistics
    import string
    import textwrap
    modules = iter((json_module, statistics, string, textwrap, fractions))

    def work(step: int) -> int:
        source = Path(next(modules).__file__).read_text()
        total = sum(i * i for i in range(20_000)) + len(source)
        (tmp_path / f"result-{step}.json").write_text(json.dumps({"step": step, "total": total}))
        return total

    return work
