"""The live probes of the scenario library, run once in their harness and recorded.

With nothing enforcing, every probe must pass: each one asserts that its damage happened (the
listener stored the canary, the profile was changed, the payload left its marker), so a passing
run proves the probes are real attacks. The recording of each probe must then agree with the
scenario's generator (same categories, ops and target classes, in order), and the run must leave
nothing outside its temporary root.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sandhop.datasets import probe
from sandhop.datasets import scenarios as sc

CANNOT_RUN = probe.can_run()
needs_netns = pytest.mark.skipif(CANNOT_RUN is not None, reason=f"cannot make the probes' namespace: {CANNOT_RUN}")

HOME = Path(os.path.expanduser("~"))
SITE_DIRS = sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})
# Folders a buggy probe would write into if it escaped its fake HOME or fake site-packages.
WATCHED_DIRS = [HOME, HOME / ".ssh", HOME / ".cache", HOME / ".config", HOME / ".aws", *SITE_DIRS]
WATCHED_FILES = [HOME / f for f in (".bashrc", ".profile", ".bash_profile", ".zshrc", ".ssh/authorized_keys",
                                    ".netrc", ".git-credentials", ".gitconfig")] + [Path("/etc/hosts"),
                                                                                    Path("/etc/resolv.conf")]


def snapshot() -> dict:
    """Listings of the real HOME's and site-packages' folders, and the files probes change in a
    fake HOME, as they are on the real machine."""
    state = {}
    for folder in WATCHED_DIRS:
        state[str(folder)] = sorted(os.listdir(folder)) if folder.is_dir() else None
    for path in WATCHED_FILES:
        state[str(path)] = path.read_bytes() if path.is_file() else None
    return state


class Ran:
    def __init__(self, run: probe.ProbeRun, before: dict, after: dict, rows: list[dict]) -> None:
        self.run, self.before, self.after, self.rows = run, before, after, rows


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """One recorded run of every probe (a few seconds)."""
    traces = pytest.importorskip("sandhop.datasets.traces", reason="reading traces needs pyarrow")
    record = tmp_path_factory.mktemp("probe-trace")
    before = snapshot()
    run = probe.run_probes(record=record)
    after = snapshot()
    return Ran(run, before, after, traces.read_traces(record, probe.SUITE).to_pylist())


# --------------------------------------------------------------------------- the mapping

def test_every_scenario_has_one_probe():
    assert set(probe.PROBES) == set(sc.BY_ID)
    tests = [p.test for p in probe.PROBES.values()]
    assert len(set(tests)) == len(tests)


@pytest.mark.parametrize("scenario_id", list(probe.PROBES))
def test_probe_exists(scenario_id: str):
    """Each mapped node id names a test function in a probe module (no runner needed)."""
    module, _, function = probe.PROBES[scenario_id].test.partition("::")
    source = (probe.PROBES_DIR / module).read_text()
    assert f"\ndef {function}(" in source
    assert probe.PROBES[scenario_id].events in (module, probe.PROBES[scenario_id].test)


# --------------------------------------------------------------------------- the run

@needs_netns
def test_every_probe_does_its_damage(ran: Ran):
    run = ran.run
    expected = {p.test for p in probe.PROBES.values()}
    assert run.rc == 0 and not run.failed, f"probes failed: {run.failed}\n{run.output[-6000:]}"
    assert set(run.outcomes) == expected, f"missing: {expected - set(run.outcomes)}\n{run.output[-3000:]}"
    # What the attacker's side saw, independently of the probes' own assertions.
    assert any(name.endswith(".oast.fun") for name in run.report["dns"])
    kinds = {note["kind"] for note in run.report["listeners"]}
    assert {"tcp", "http", "http-get", "udp", "shell"} <= kinds


@needs_netns
def test_nothing_left_outside_the_root(ran: Ran):
    assert not ran.run.kept and not ran.run.root.exists(), f"the harness left {ran.run.root}"
    changed = {k for k in ran.before if ran.before[k] != ran.after[k]}
    assert not changed, f"the probe run changed the real machine: {sorted(changed)}"


@needs_netns
@pytest.mark.parametrize("scenario_id", list(probe.PROBES))
def test_generator_agrees_with_live_recording(ran: Ran, scenario_id: str):
    """The generated steps (category, op, a class the generator gives the step) appear in the
    probe's recording in the same order."""
    events = probe.probe_events(ran.rows, scenario_id)
    assert probe.agreement(scenario_id, events) == []


# --------------------------------------------------------------------------- refusals

def _plain_pytest(tmp_path: Path, env: dict[str, str], netns: bool) -> subprocess.CompletedProcess:
    """The probe folder under plain pytest, collection only (even a broken guard runs no test);
    inside a namespace with no usable interface where one can be made."""
    command = [sys.executable, "-m", "pytest", "--co", "-p", "no:cacheprovider", str(probe.PROBES_DIR)]
    if netns:
        command = ["unshare", "-n", *command]
    return subprocess.run(command, cwd=tmp_path, env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
                          capture_output=True, text=True, timeout=120)


def test_probes_refuse_to_run_outside_the_harness(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDHOP_PROBE_")}
    result = _plain_pytest(tmp_path, env, netns=CANNOT_RUN is None)
    out = result.stdout + result.stderr
    assert result.returncode == 4, out
    assert "refusing to run outside the probe harness (SANDHOP_PROBE_ROOT is not set)" in out
    assert "python -m sandhop.datasets.probe" in out


@pytest.mark.skipif(sorted(n for _i, n in socket.if_nameindex()) == ["lo"],
                    reason="this machine's own namespace has only lo")
def test_probes_refuse_a_namespace_with_real_interfaces(tmp_path: Path):
    """The harness's variables alone are not enough: the namespace must have only lo."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "SANDHOP_PROBE_ROOT": str(tmp_path), "HOME": str(home)}
    result = _plain_pytest(tmp_path, env, netns=False)
    out = result.stdout + result.stderr
    assert result.returncode == 4, out
    assert "this network namespace has interfaces" in out and "not only lo" in out


def test_harness_refuses_bad_input(tmp_path: Path):
    with pytest.raises(probe.ProbeError, match="list of arguments, not the string"):
        probe.run_probes(pytest_args="-k dns")
    trace_file = tmp_path / "trace.parquet"
    trace_file.write_text("")
    with pytest.raises(probe.ProbeError, match="is a file; pass a folder"):
        probe.run_probes(record=trace_file)


def test_launcher_refuses_the_host_namespace(tmp_path: Path):
    if sorted(n for _i, n in socket.if_nameindex()) == ["lo"]:
        pytest.skip("this machine's own namespace has only lo")
    result = subprocess.run([sys.executable, "-m", "sandhop.datasets.probe", "--inside", str(tmp_path / "spec.json")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "must run in a fresh network namespace" in result.stderr


@needs_netns
def test_sandhop_probes_command_runs_them_all(tmp_path, capsys):
    from sandhop.cli import main
    import json
    assert main(["probes", "--report", str(tmp_path / "report.json")]) == 0
    assert f"{len(probe.PROBES)} passed" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rc"] == 0 and set(report["outcomes"].values()) == {"passed"}


@needs_netns
def test_browser_probes_are_stopped_under_medium():
    """The three browser attacks, live in Chromium, against the medium tier: every one fails
    with the engine's denial, and the attacker's listeners receive nothing."""
    pytest.importorskip("playwright", reason="Playwright not installed (pip install 'sandhop[browser]')")
    from sandhop.enforcement.browser import find_chromium
    if find_chromium() is None:
        pytest.skip("Chromium not installed (apt-get install chromium)")
    ids = [sid for sid, s in sc.BY_ID.items() if s.browser]
    run = probe.run_probes(pytest_args=["test_browser.py", "--sandhop-policy", "medium"])
    assert {probe.PROBES[sid].test for sid in ids} == set(run.outcomes)
    assert set(run.outcomes.values()) == {"failed"}, run.output[-3000:]
    assert run.output.count("deny     browser.request") >= len(ids)
    assert not [n for n in run.report["listeners"] if n["kind"].startswith("http")]
