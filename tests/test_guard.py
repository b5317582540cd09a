"""The live guard in real inner pytest sessions: deny, redirect, out-of-band violations, audit
mode, markers and per-test isolation, children, collection-time payloads, the audit log.

Each inner session runs in its own subprocess (audit hooks cannot be removed) with a fake HOME.
The bypass classes are in test_bypass.py; Landlock in test_lockdown.py.
"""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("CANARY-KEY")
    (home / ".cache").mkdir()
    (home / ".cache" / "settings.txt").write_text("original\n")
    monkeypatch.setenv("HOME", str(home))
    return home


def run(pytester: pytest.Pytester, source: str, *args: str, log: Path | None = None):
    pytester.makepyfile(test_inner=textwrap.dedent(source))
    extra = ["--sandhop-audit-log", str(log)] if log else []
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *extra, *args)


def records(log: Path, kind: str = "decision") -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == kind]


def test_denied_operation_raises_a_violation_that_names_rule_and_fix(pytester, home, tmp_path):
    log = tmp_path / "audit.jsonl"
    result = run(pytester, """
        import os, pytest
        from sandhop.enforcement.guard import SandboxViolation

        def test_read_key():
            with pytest.raises(SandboxViolation) as info:
                open(os.path.expanduser("~/.ssh/id_rsa")).read()
            assert isinstance(info.value, PermissionError)
            message = str(info.value)
            assert "fs.read ${home}/.ssh/id_rsa" in message
            assert "deny fs.* @home.secret" in message and "low:" in message
            assert "tier='observe'" in message   # the tier that would allow it
    """, "--sandhop-policy", "medium", log=log)
    # pytest.raises swallowed it; the out-of-band record still fails the test
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*caught the SandboxViolation*", "*deny*fs.read*id_rsa*"])
    (rec,) = [r for r in records(log) if r["category"] == "fs.read"]
    assert rec["decision"] == "deny" and rec["tier"] == "medium" and rec["test_id"].endswith("test_read_key")


def test_default_deny_suggests_the_exact_allow_line(pytester, home):
    result = run(pytester, """
        import socket
        def test_dns():
            socket.getaddrinfo("files.pythonhosted.example.org", 443)
    """, "--sandhop-policy", "medium")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*SandboxViolation*net.dns files.pythonhosted.example.org*",
                                 "*allow net.dns files.pythonhosted.example.org*"])


def test_swallowed_violation_fails_in_enforce_and_passes_in_audit(pytester, home, tmp_path):
    source = """
        def test_swallow():
            try:
                open("/etc/sandhop-canary", "w")
            except PermissionError:
                pass
    """
    enforce_log, audit_log = tmp_path / "enforce.jsonl", tmp_path / "audit.jsonl"
    run(pytester, source, "--sandhop-policy", "medium", log=enforce_log).assert_outcomes(failed=1)
    assert not Path("/etc/sandhop-canary").exists()
    result = run(pytester, source, "--sandhop-policy", "medium", "--sandhop-mode", "audit", log=audit_log)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*would have denied 1 operations*"])
    assert Path("/etc/sandhop-canary").exists()  # audit mode really allowed it
    Path("/etc/sandhop-canary").unlink()
    seen = {(r["category"], r["target"], r["decision"]) for r in records(enforce_log)}
    assert seen == {(r["category"], r["target"], r["decision"]) for r in records(audit_log)}
    assert {r["mode"] for r in records(audit_log)} == {"audit"}


def test_home_write_is_redirected_to_a_per_test_overlay(pytester, home):
    result = run(pytester, """
        import os
        from pathlib import Path

        def test_write_then_read():
            p = Path.home() / ".cache" / "settings.txt"
            with open(p, "a") as f:           # copy on write: the original content is kept
                f.write("changed\\n")
            assert p.read_text() == "original\\nchanged\\n"
            (Path.home() / ".cache" / "new.txt").write_text("new")
            assert open(os.path.join(os.environ["HOME"], ".cache", "new.txt")).read() == "new"
            fd = os.open(str(Path.home() / ".cache" / "fd.txt"), os.O_WRONLY | os.O_CREAT)
            os.write(fd, b"fd"); os.close(fd)
            assert (Path.home() / ".cache" / "fd.txt").read_bytes() == b"fd"
            os.remove(Path.home() / ".cache" / "new.txt")
            assert not os.path.exists(Path.home() / ".cache" / "new.txt") or True
            try:
                open(Path.home() / ".cache" / "new.txt")
                raise AssertionError("a deleted overlay file must be gone")
            except FileNotFoundError:
                pass

        def test_next_test_sees_the_real_home():
            p = Path.home() / ".cache" / "settings.txt"
            assert p.read_text() == "original\\n"
            assert not (Path.home() / ".cache" / "fd.txt").exists()
    """, "--sandhop-policy", "medium")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*redirected*"])
    assert (home / ".cache" / "settings.txt").read_text() == "original\n"
    assert sorted(p.name for p in (home / ".cache").iterdir()) == ["settings.txt"]


def test_redirected_connection_reaches_the_sinkhole_not_the_target(pytester, home, tmp_path):
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(8)
    target.setblocking(False)
    port = target.getsockname()[1]
    policy = tmp_path / "sinkhole.policy"
    policy.write_text(f"extends medium\nredirect net.connect 127.0.0.1:{port} sinkhole\n")
    result = run(pytester, f"""
        import socket
        def test_connect():
            c = socket.create_connection(("127.0.0.1", {port}))
            c.sendall(b"secret payload")
            assert c.getpeername()[1] != {port}
            c.close()
    """, "--sandhop-policy", str(policy))
    result.assert_outcomes(passed=1)
    with pytest.raises(BlockingIOError):
        target.accept()  # nothing ever connected to the real target
    target.close()


def test_dns_redirect_answers_no_such_name(pytester, home):
    run(pytester, """
        import socket, pytest
        def test_lookup():
            with pytest.raises(socket.gaierror):
                socket.getaddrinfo("anything.invalid", 80)
    """, "--sandhop-policy", "medium").assert_outcomes(passed=1)


def test_secret_environment_variables_look_unset(pytester, home, monkeypatch):
    monkeypatch.setenv("SERVICE_API_TOKEN", "CANARY-TOKEN")
    result = run(pytester, """
        import os, subprocess, sys
        def test_env():
            assert os.environ.get("SERVICE_API_TOKEN") is None
            assert "SERVICE_API_TOKEN" not in os.environ
            assert "CANARY-TOKEN" not in repr(os.environ.copy()) and "CANARY-TOKEN" not in repr(dict(os.environ))
            assert os.environ["HOME"]   # ordinary names are untouched
            out = subprocess.run([sys.executable, "-c", "import os; print(os.getenv('SERVICE_API_TOKEN'))"],
                                 capture_output=True, text=True).stdout
            assert out.strip() == "None"   # the child's guard hides it too
    """, "--sandhop-policy", "medium")
    result.assert_outcomes(passed=1)


def test_children_inherit_the_guard_and_the_tests_config(pytester, home):
    result = run(pytester, """
        import subprocess, sys, pytest
        CHILD = "import subprocess; subprocess.run(['true'])"

        def test_child_denied():
            r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
            assert r.returncode != 0 and "SandboxViolation" in r.stderr

        @pytest.mark.sandhop(allow=["proc.spawn true"])
        def test_child_granted():
            r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
    """, "--sandhop-policy", "high")
    # the denial inside the child is recorded out of band, so the first test fails even though
    # its own assertion held
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*FAILED*test_child_denied*"])


def test_grants_and_hops_do_not_leak_across_tests(pytester, home):
    source = """
        import subprocess, pytest
        from sandhop.enforcement.guard import SandboxViolation

        @pytest.mark.sandhop(allow=["proc.spawn true"])
        def test_a_granted():
            subprocess.run(["true"], check=True)

        def test_b_not_granted():
            with pytest.raises(SandboxViolation):
                subprocess.run(["true"])

        def test_c_hops_up(sandhop_guard):
            subprocess.run(["bash", "-c", "true"], check=True)
            sandhop_guard.hop_to("high")
            with pytest.raises(SandboxViolation):
                subprocess.run(["bash", "-c", "true"])
            sandhop_guard.hop_to("medium")   # de-escalation waits for the test boundary
            with pytest.raises(SandboxViolation):
                subprocess.run(["bash", "-c", "true"])

        def test_d_back_at_base():
            subprocess.run(["bash", "-c", "true"], check=True)
    """
    result = run(pytester, source, "--sandhop-policy", "medium")
    # b swallows via pytest.raises and so fails by design; c as well; a and d pass
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*PASSED*test_a_granted*", "*PASSED*test_d_back_at_base*"])
    xdist = pytest.importorskip("xdist")
    assert xdist
    result = run(pytester, source, "--sandhop-policy", "medium", "-n", "2")
    result.assert_outcomes(passed=2, failed=2)


def test_collection_time_payload_is_denied(pytester, home):
    pytester.makeconftest("""
        open("/etc/sandhop-conftest-canary", "w").write("x")
    """)
    result = run(pytester, "def test_x(): pass", "--sandhop-policy", "medium")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*SandboxViolation*fs.write /etc/sandhop-conftest-canary*"])
    assert not Path("/etc/sandhop-conftest-canary").exists()


def test_runner_exemption_cannot_be_borrowed(pytester, home):
    result = run(pytester, """
        import os, pytest
        from sandhop.enforcement import tracer

        def test_borrow():
            with pytest.raises(PermissionError):
                tracer.active().set_context("", "session")
            with pytest.raises(PermissionError):
                open(os.path.expanduser("~/.ssh/id_rsa"))

        def test_disarm():
            tracer.active().gate = None     # works in-process (a tripwire, not a boundary) ...
    """, "--sandhop-policy", "medium", "--junitxml", "report.xml")
    # ... but the plugin notices and fails the test; the runner's own junit write is exempt
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*the tracer's gate was replaced*"])
    assert (pytester.path / "report.xml").exists()


def test_audit_log_verifies_and_holds_outcomes(pytester, home, tmp_path):
    log = tmp_path / "audit.jsonl"
    run(pytester, """
        import os
        def test_denied():
            open(os.path.expanduser("~/.ssh/id_rsa"))
        def test_fine(tmp_path):
            (tmp_path / "x").write_text("x")
    """, "--sandhop-policy", "medium", log=log).assert_outcomes(failed=1, passed=1)
    from sandhop.enforcement.audit import verify
    report = verify(log)
    assert report.ok and report.sealed, report.format()
    outcomes = {r["test_id"].split("::")[-1]: r["outcome"] for r in records(log, "test") if r["phase"] == "call"}
    assert outcomes == {"test_denied": "failed", "test_fine": "passed"}
    assert [r["event"] for r in records(log, "session")] == ["start", "finish"]


def test_bad_policy_and_marker_are_usage_errors(pytester, home, tmp_path):
    bad = tmp_path / "bad.policy"
    bad.write_text("default deny\nallow fs.write ${tmpp}/**\n")
    result = run(pytester, "def test_x(): pass", "--sandhop-policy", str(bad))
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*bad.policy:2:*unknown variable ${tmpp}*"])
    result = run(pytester, """
        import pytest
        @pytest.mark.sandhop(allow=["net.connect example.com:http"])
        def test_x(): pass
    """, "--sandhop-policy", "medium")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*test_x: @pytest.mark.sandhop*expected a port*"])


def test_lockdown_tier_confines_native_code_the_hook_cannot_see(pytester, home, tmp_path):
    from sandhop.enforcement.lockdown import landlock_abi
    if landlock_abi() < 1:
        pytest.skip("this kernel has no Landlock")
    outside = tmp_path / "outside.txt"
    result = run(pytester, f"""
        import ctypes, os, pytest

        def write_with_libc(path):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            fd = libc.open(path.encode(), os.O_WRONLY | os.O_CREAT, 0o644)
            return fd, ctypes.get_errno()

        @pytest.mark.sandhop(tier="lockdown", allow=["code.native"])
        def test_locked(tmp_path):
            fd, err = write_with_libc({str(outside)!r})
            assert fd == -1 and err == 13          # EACCES from Landlock, not from the hook
            inside, _ = write_with_libc(str(tmp_path / "inside.txt"))
            assert inside >= 0
            assert "Seccomp:\\t2" in open("/proc/self/status").read()

        @pytest.mark.sandhop(allow=["code.native"])
        def test_medium_is_only_a_tripwire():
            fd, err = write_with_libc({str(outside)!r})
            assert fd >= 0                       # the in-process guard cannot see libc calls
            os.close(fd)

        def test_after_lockdown_the_runner_is_unconfined():
            assert "Seccomp:\\t0" in open("/proc/self/status").read()
    """, "--sandhop-policy", "medium")
    result.assert_outcomes(passed=3)
    assert outside.exists()  # written by the medium test only


def test_lockdown_fails_closed_without_landlock(pytester, home, monkeypatch):
    monkeypatch.setenv("SANDHOP_LANDLOCK_ABI", "0")
    source = """
        import pytest
        @pytest.mark.sandhop(tier="lockdown")
        def test_locked():
            pass
    """
    result = run(pytester, source, "--sandhop-policy", "medium")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Landlock*", "*--sandhop-allow-degraded*"])
    result = run(pytester, source, "--sandhop-policy", "medium", "--sandhop-allow-degraded")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*DEGRADED*", "*NOT restricted*"])


def test_audit_log_writes_are_the_guards_own_even_during_collection(pytester, home):
    """A batch of audit records can be flushed while a collector is being collected (under its
    config); the log's own writes must never be decided, even where the tier denies writing."""
    log = home / "logs" / "audit.jsonl"
    result = run(pytester, """
        import os
        for _ in range(80):  # more denials than one batch of the audit log, at import time
            try:
                open(os.path.expanduser("~/.ssh/id_rsa")).read()
            except PermissionError:
                pass

        def test_ok():
            pass
    """, "--sandhop-policy", "medium", log=log)
    assert "an earlier write failed" not in result.stdout.str() + result.stderr.str()
    assert len([r for r in records(log) if r["category"] == "fs.read"]) == 80
    from sandhop.enforcement.audit import verify
    assert verify(log).ok
