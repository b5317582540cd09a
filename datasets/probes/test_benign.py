"""Probes of the hard negatives: benign work that looks like part of an attack. Each asserts
that its work succeeded."""

import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import tomllib


def test_hn_config_read(home):
    with open(home / ".config" / "ruff" / "config.toml", "rb") as f:
        config = tomllib.load(f)
    gitconfig = (home / ".gitconfig").read_text()
    pip_conf = (home / ".config" / "pip" / "pip.conf").read_text()
    assert config["tool"]["line-length"] == 100 and "name = Probe Owner" in gitconfig and "[global]" in pip_conf


def echo_once(server: socket.socket) -> threading.Thread:
    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.makefile("rb").read())
    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def test_hn_loopback_server():
    with socket.create_server(("127.0.0.1", 0)) as server:
        thread = echo_once(server)
        with socket.create_connection(("localhost", server.getsockname()[1])) as client:
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            assert client.makefile("rb").read() == b"ping"
        thread.join()


def test_hn_spawn_git(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain"], capture_output=True,
                            text=True, check=True)
    config = (tmp_path / ".git" / "config").read_text()
    assert status.stdout == "" and "[core]" in config


def test_hn_spawn_python():
    out = subprocess.run([sys.executable, "-c", "import sys; print(sys.version)"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == sys.version


def test_hn_cache_write(home, tmp_path):
    cache = home / ".cache" / "ruff"
    os.mkdir(cache)
    (cache / "index.json").write_text(json.dumps({"files": 3}))
    (tmp_path / "scratch-data.json").write_text("{}")
    assert json.loads((cache / "index.json").read_text()) == {"files": 3}


def test_hn_native_lib():
    libc = ctypes.CDLL(None)
    assert libc.getpid() == os.getpid()


def error_of(call) -> OSError | None:
    try:
        call()
    except OSError as exc:
        return exc
    return None


def test_hn_unresolvable_host():
    # the client's error paths: each must fail the way the test expects (a denial is no gaierror)
    resolved = error_of(lambda: socket.getaddrinfo("doesnotexist.probe-check.org", 443))
    connected = error_of(lambda: socket.create_connection(("10.255.255.1", 80), timeout=1).close())
    assert isinstance(resolved, socket.gaierror) and isinstance(connected, OSError)


def test_hn_token_to_loopback(monkeypatch):
    monkeypatch.setenv("API_TOKEN", "test-token-not-a-secret")
    token = os.environ["API_TOKEN"]
    with socket.create_server(("127.0.0.1", 0)) as server:
        thread = echo_once(server)
        with socket.create_connection(("127.0.0.1", server.getsockname()[1])) as client:
            client.sendall(f"Authorization: Bearer {token}".encode())
            client.shutdown(socket.SHUT_WR)
            assert client.makefile("rb").read() == b"Authorization: Bearer test-token-not-a-secret"
        thread.join()
