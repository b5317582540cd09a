"""The recorder end to end: inner pytest sessions run under `--sandhop-record`, read back from
Parquet. Each inner session is its own process (audit hooks cannot be removed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sandhop.datasets import traces
from sandhop.datasets.record import suite_env

def record(root: Path, files: dict[str, str], *args: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    """Run an inner pytest session in `root` under the recorder; return the trace rows."""
    root.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))
    out = root / "traces"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--sandhop-record", str(out), "--sandhop-suite", "inner==1.0",
         "-p", "no:cacheprovider", "-q", *args],
        cwd=root, capture_output=True, text=True, env=suite_env())
    assert "sandhop: recorded inner==1.0" in proc.stdout, proc.stdout + proc.stderr
    return traces.read_traces(out).to_pylist(), proc


def where(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


OPERATIONS = """
    import ctypes, os, socket, subprocess, sys

    def test_write_tmp(tmp_path):
        (tmp_path / "out.txt").write_text("x")

    def test_loopback_server():
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        client = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        for s in (conn, client, srv):
            s.close()

    def test_resolve():
        socket.getaddrinfo("LocalHost", 80)

    def test_spawn(tmp_path):
        data = tmp_path / "data.txt"
        data.write_text("child reads me")
        subprocess.run(["true"], check=True)
        code = f"print(open({str(data)!r}).read())"
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        assert out.stdout.strip() == "child reads me"
        # The child is traced, yet its sys.path holds none of the recorder's folders.
        shown = subprocess.run([sys.executable, "-c", "import sys; print(repr(sys.path))"],
                               check=True, capture_output=True, text=True).stdout
        marked = [p for p in eval(shown) if any(os.path.exists(os.path.join(d, ".sandhop-boot"))
                                                for d in (p or ".", os.path.dirname(p or ".")))]
        assert not marked, marked

    def test_server_child():
        code = ("import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
                "print(s.getsockname()[1], flush=True); s.accept()")
        server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        port = int(server.stdout.readline())
        socket.create_connection(("127.0.0.1", port)).close()
        server.terminate()  # SIGTERM: the child gets no chance to run atexit
        server.wait()

    def test_native():
        ctypes.CDLL("libc.so.6")
        assert "_sqlite3" not in sys.modules
        import _sqlite3

    def test_secret_env(monkeypatch):
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary")
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == "canary"
        os.environ.get("HARMLESS_SETTING")
        saved = os.environ.copy()
        os.environ.clear()
        os.environ.update(saved)
"""


@pytest.fixture(scope="module")
def operations(tmp_path_factory) -> tuple[list[dict], subprocess.CompletedProcess]:
    # One inner session serves every assertion below (each inner pytest costs a second or two).
    return record(tmp_path_factory.mktemp("ops"), {"test_ops": OPERATIONS, "conftest": "open(__file__).read()\n"})


def test_inner_session_passes(operations):
    rows, proc = operations
    assert proc.returncode == 0 and "7 passed" in proc.stdout
    assert {r["suite"] for r in rows} == {"inner==1.0"}


def test_tmp_write(operations):
    rows, _ = operations
    hit = where(rows, test_id="test_ops.py::test_write_tmp", phase="call", category="fs.write")
    assert hit and hit[0]["target"].startswith("${tmp}/") and hit[0]["target"].endswith("/out.txt")
    assert hit[0]["target_class"] == "tmp" and "file_write" in hit[0]["tags"]
    assert hit[0]["test_outcome"] == "passed"


def test_loopback_bind_connect_send(operations):
    rows, _ = operations
    tid = "test_ops.py::test_loopback_server"
    bind = where(rows, test_id=tid, category="net.bind")
    connect = where(rows, test_id=tid, category="net.connect")
    assert bind and bind[0]["target"] == "127.0.0.1:0" and bind[0]["target_class"] == "loopback"
    assert connect and connect[0]["target"].startswith("127.0.0.1:") and connect[0]["detail"] == "tcp"
    assert connect[0]["target_class"] == "loopback" and "network_access" in connect[0]["tags"]


def test_dns_lookup_normalised(operations):
    rows, _ = operations
    dns = where(rows, test_id="test_ops.py::test_resolve", category="net.dns")
    assert [(d["target"], d["target_class"]) for d in dns] == [("localhost", "loopback")]
    assert "dns_lookup" in dns[0]["tags"]


def test_spawn_and_child_python_traced(operations):
    rows, _ = operations
    tid = "test_ops.py::test_spawn"
    spawns = where(rows, test_id=tid, category="proc.spawn")
    assert any(s["target"].endswith("/true") for s in spawns)
    parent_pid = spawns[0]["pid"]
    child_reads = [r for r in where(rows, test_id=tid, category="fs.read", phase="call")
                   if r["target"].endswith("/data.txt")]
    assert child_reads, "the child Python's open() was not traced"
    assert child_reads[0]["pid"] != parent_pid and child_reads[0]["ppid"] == parent_pid
    assert child_reads[0]["target_class"] == "tmp"


def test_child_killed_by_a_signal_keeps_its_events(operations):
    rows, _ = operations
    tid = "test_ops.py::test_server_child"
    (spawn,) = where(rows, test_id=tid, category="proc.spawn")
    binds = [r for r in where(rows, test_id=tid, category="net.bind") if r["pid"] != spawn["pid"]]
    assert binds and binds[0]["target"] == "127.0.0.1:0" and binds[0]["ppid"] == spawn["pid"]


def test_native_code(operations):
    rows, _ = operations
    native = where(rows, test_id="test_ops.py::test_native", category="code.native")
    ops = {(n["op"], n["target"] if n["op"] == "ctypes.dlopen" else n["detail"]) for n in native}
    assert ("ctypes.dlopen", "libc.so.6") in ops
    assert ("import.extension", "_sqlite3") in ops
    ext = next(n for n in native if n["detail"] == "_sqlite3")
    assert ext["target"].startswith("${stdlib}/") and ext["target_class"] == "stdlib"
    assert "native_code" in ext["tags"]


def test_secret_env_read_recorded_and_harmless_one_not(operations):
    rows, _ = operations
    env = where(rows, test_id="test_ops.py::test_secret_env")
    reads = {(r["target"], r["target_class"]) for r in env if r["category"] == "env.read"}
    writes = {r["target"] for r in env if r["category"] == "env.write"}
    assert ("AWS_SECRET_ACCESS_KEY", "env.secret") in reads
    assert not any(t == "HARMLESS_SETTING" for t, _ in reads)
    assert "AWS_SECRET_ACCESS_KEY" in writes
    # Clearing and restoring the whole environment is one event each, not one per variable.
    bulk = {(r["op"], r["target"]) for r in env if r["category"] == "env.write" and r["target"] == "*"}
    assert bulk == {("environ.clear", "*"), ("environ.update", "*")}
    assert "PATH" not in writes and ("*", "env.secret") in reads


def test_conftest_events_are_captured_at_collection(operations):
    rows, _ = operations
    conftest = [r for r in rows if r["category"] == "fs.read" and r["target"] == "${cwd}/conftest.py"
                and r["op"] == "open" and r["detail"] == "r"]
    assert conftest and all(r["phase"] == "collect" for r in conftest)


def test_import_time_and_outcomes(tmp_path):
    rows, proc = record(tmp_path, {"test_imp": """
        import socket
        socket.getaddrinfo("localhost", 0)   # runs at import, i.e. during collection

        def test_fails():
            open("/etc/hostname").read()
            assert False

        def test_skipped():
            import pytest
            pytest.skip("not here")
    """})
    assert "1 failed, 1 skipped" in proc.stdout
    dns = where(rows, category="net.dns", target="localhost")
    assert dns and dns[0]["phase"] == "collect" and dns[0]["test_id"] == "test_imp.py"
    read = where(rows, test_id="test_imp.py::test_fails", category="fs.read", target="/etc/hostname")
    assert read and read[0]["target_class"] == "system" and read[0]["test_outcome"] == "failed"
    assert all(r["test_outcome"] == "skipped" for r in where(rows, test_id="test_imp.py::test_skipped"))


DECODING = """
    import os, shutil, signal, socket, subprocess, sys

    def test_decoding(tmp_path):
        a = tmp_path / "a"
        fd = os.open(a, os.O_WRONLY | os.O_CREAT)
        os.close(fd)
        os.close(os.open(a, os.O_RDONLY))
        os.chmod(a, 0o600)
        os.truncate(a, 0)
        os.rename(a, tmp_path / "b")
        os.link(tmp_path / "b", tmp_path / "c")
        os.symlink(tmp_path / "b", tmp_path / "link")
        shutil.copyfile(tmp_path / "b", tmp_path / "d")
        os.mkdir(tmp_path / "sub")
        os.rmdir(tmp_path / "sub")
        os.remove(tmp_path / "c")
        os.listdir(tmp_path)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.sendto(b"x", ("0x7f000001", 9))
        udp.close()
        socket.gethostbyname("localhost")
        os.system("true")
        pid = os.posix_spawn("/bin/true", ["true"], dict(os.environ))
        os.waitpid(pid, 0)
        os.kill(os.getpid(), 0)
        os.putenv("SOME_VAR", "1")
        os.unsetenv("SOME_VAR")
        exec("x = 1")
        sys.addaudithook(lambda *a: None)
        sys.setprofile(None)
        open(os.path.expanduser("~/.ssh/id_rsa_sandhop_canary"), "a").close()
        os.chown(tmp_path / "b", -1, -1)
        (tmp_path / "tree").mkdir()
        shutil.move(tmp_path / "d", tmp_path / "tree" / "d")
        shutil.rmtree(tmp_path / "tree")
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(str(tmp_path / "sock"))
        unix.close()
        pair = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        pair.sendmsg([b"x"], [], 0, ("127.0.0.1", 9))
        pair.close()
        socket.gethostbyaddr("127.0.0.1")
        pid = os.fork()
        if pid == 0:
            os.execv("/bin/true", ["true"])
        os.waitpid(pid, 0)
"""


def test_audit_event_decoding(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    rows, proc = record(tmp_path / "project", {"test_dec": DECODING})
    assert "1 passed" in proc.stdout, proc.stdout
    got = {(r["category"], r["op"], r["target_class"]) for r in where(rows, test_id="test_dec.py::test_decoding")}
    expected = {
        ("fs.write", "open", "tmp"), ("fs.read", "open", "tmp"), ("fs.meta", "os.chmod", "tmp"),
        ("fs.write", "os.truncate", "tmp"), ("fs.write", "os.rename", "tmp"), ("fs.delete", "os.rename", "tmp"),
        ("fs.write", "os.link", "tmp"), ("fs.write", "os.link", "tmp"), ("fs.write", "os.symlink", "tmp"),
        ("fs.read", "shutil.copyfile", "tmp"), ("fs.write", "shutil.copyfile", "tmp"),
        ("fs.write", "os.mkdir", "tmp"), ("fs.delete", "os.rmdir", "tmp"), ("fs.delete", "os.remove", "tmp"),
        ("fs.meta", "os.listdir", "tmp"), ("net.send", "socket.sendto", "loopback"),
        ("net.dns", "socket.gethostbyname", "loopback"), ("proc.spawn", "os.system", "system"),
        ("proc.spawn", "os.posix_spawn", "system"), ("proc.signal", "os.kill", "self"),
        ("env.write", "os.putenv", "env"), ("env.write", "os.unsetenv", "env"),
        ("code.exec", "compile", "string"), ("code.exec", "exec", "string"),
        ("sys.tamper", "sys.addaudithook", "interpreter"), ("sys.tamper", "sys.setprofile", "interpreter"),
        ("fs.write", "open", "home.secret"), ("fs.meta", "os.chown", "tmp"),
        ("fs.write", "shutil.move", "tmp"), ("fs.delete", "shutil.move", "tmp"),
        ("fs.delete", "shutil.rmtree", "tmp"), ("net.bind", "socket.bind", "unix"),
        ("net.send", "socket.sendmsg", "loopback"), ("net.dns", "socket.gethostbyaddr", "loopback"),
        ("proc.spawn", "os.fork", "python"), ("proc.spawn", "os.exec", "system"),
    }
    assert expected <= got, sorted(expected - got)
    sendto = where(rows, category="net.send", op="socket.sendto")[0]
    assert sendto["target"] == "127.0.0.1:9" and sendto["detail"] == "udp"
    (execed,) = where(rows, category="proc.spawn", op="os.exec")
    (forked,) = where(rows, category="proc.spawn", op="os.fork")
    assert execed["ppid"] == forked["pid"] and execed["target"].endswith("/true")
    secret = where(rows, category="fs.write", target_class="home.secret")[0]
    assert secret["target"] == "${home}/.ssh/id_rsa_sandhop_canary"
    assert "sensitive_data_access" in secret["tags"]


def test_repeated_events_coalesce_with_count(tmp_path):
    rows, _ = record(tmp_path, {"test_rep": """
        def test_many_reads():
            for _ in range(25):
                open("/etc/hostname").read()
    """})
    reads = where(rows, test_id="test_rep.py::test_many_reads", category="fs.read", target="/etc/hostname")
    assert len(reads) == 1 and reads[0]["count"] == 25


def test_plugin_is_inert_without_options(pytester):
    pytester.makepyfile(test_x="def test_x():\n    import sys\n    assert not any(h for h in [sys.modules.get('sandhop.enforcement.tracer')] if h and h.active())\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not list(pytester.path.rglob("*.parquet"))


def test_without_parquet_support_the_spool_is_kept_and_converted_later(tmp_path):
    blocker = tmp_path / "blocker" / "pyarrow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pyarrow is blocked in this test')\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_w.py").write_text("def test_w(tmp_path):\n    (tmp_path / 'f').write_text('x')\n")
    out = project / "traces"
    env = suite_env({"PYTHONPATH": str(blocker.parent)})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--sandhop-record", str(out)], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "trace stays spooled" in proc.stdout, proc.stdout
    (spool,) = (out / ".spool").iterdir()
    assert not list(out.rglob("*.parquet"))
    converted = subprocess.run([sys.executable, "-m", "sandhop", "trace", "convert", str(spool), str(out)],
                               capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    rows = traces.read_traces(out).to_pylist()
    assert where(rows, test_id="test_w.py::test_w", category="fs.write", target_class="tmp")
    assert {r["suite"] for r in rows} == {"project==local"} and not spool.exists()
