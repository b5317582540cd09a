"""Scenario generators and injection into the bundled real traces: valid events, labels on the
right rows, recorded rows untouched, determinism, and clear errors for bad input."""

from __future__ import annotations

import random
import shlex
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sandhop.cli import main
from sandhop.datasets import scenarios as lib
from sandhop.datasets.inject import InjectConfig, inject, inject_dir, inject_run, parse_mix, runs
from sandhop.datasets.traces import TraceError, read_traces
from sandhop.enforcement.events import (
    EVENT_FIELDS, INFERRED_TAGS, format_address, observed_tags, split_address, target_class,
)

TRACES = Path(__file__).resolve().parents[1] / "datasets" / "data" / "traces"


@pytest.fixture(scope="module")
def click_run() -> pa.Table:
    table = read_traces(TRACES, suites="click==8.5.1")
    return next(iter(runs(table)))[2]


@pytest.fixture(scope="module")
def small_traces() -> pa.Table:
    return read_traces(TRACES, suites=["click==8.5.1", "markupsafe==3.0.4", "requests==2.34.2"])


# --------------------------------------------------------------------------- the library

def test_library_is_consistent_and_covers_the_required_behaviour():
    assert lib.check_library() == []
    attacks = [s for s in lib.SCENARIOS if s.malicious]
    assert len(attacks) >= 20
    assert len([s for s in lib.SCENARIOS if not s.malicious]) >= 5
    steps = {(st.category, s.id) for s in lib.SCENARIOS for st in s.steps}
    for category in ("env.read", "fs.read", "fs.write", "net.dns", "net.connect", "net.send",
                     "proc.spawn", "code.native", "code.exec", "code.import", "sys.tamper"):
        assert any(c == category for c, _ in steps), category
    assert {s.id for s in attacks if s.slow} and any("collect" in s.phases for s in attacks)
    assert set(INFERRED_TAGS) <= {t for s in attacks for t in s.tags}  # every behaviour is shown


def _canonical(scenario: lib.Scenario, step: int) -> int:
    """A step's place in the order: the first step of its unordered group, if it is in one."""
    return next((g[0] for g in scenario.unordered if step in g), step)


@pytest.mark.parametrize("scenario", lib.SCENARIOS, ids=lambda s: s.id)
def test_every_scenario_generates_valid_varied_events(scenario):
    draws = [lib.generate(scenario, seed) for seed in range(30)]
    for events in draws:
        assert events, scenario.id
        steps = [_canonical(scenario, e.seq) for e in events]
        assert steps == sorted(steps) and {e.seq for e in events} == set(range(len(scenario.steps)))
        assert len({e.phase for e in events}) == 1 and events[0].phase in scenario.phases
        assert [e.t_ns for e in events] == sorted(e.t_ns for e in events)
        for e in events:
            step = scenario.steps[e.seq]
            assert (e.category, e.op, e.pid) == (step.category, step.op, step.child)
            assert e.target_class == (step.cls or target_class(e.category, e.target, e.detail))
            assert e.malicious is scenario.malicious and e.attack == scenario.id
            inferred = step.tags if scenario.malicious else ()
            assert set(e.tags) == set(observed_tags(e.category, e.target_class)) | set(inferred)
            assert "{" not in e.target.replace("${", ""), e.target  # every variable was drawn
            if e.category in ("net.connect", "net.send"):
                host, port = split_address(e.target)
                assert format_address(host, port) == e.target  # stored canonical, as recorded
            if e.category == "proc.spawn":
                assert shlex.join(shlex.split(e.target)) == e.target
        if scenario.malicious:
            k = lib.damaging_index(events, scenario)
            assert events[k].seq == scenario.damaging_step
    # variation: where the templates name variables, the draws are not all the same attack
    if any("{" in st.target.replace("${", "") for st in scenario.steps):
        assert len({tuple(e.target for e in events) for events in draws}) > 1


def test_ip_spellings_vary_the_input_not_the_stored_address():
    spelled = {lib._spell_ip("45.155.205.233", random.Random(i)) for i in range(60)}
    assert len(spelled) >= 5
    assert {format_address(s, 80) for s in spelled} == {"45.155.205.233:80"}


def test_interchangeable_steps_come_in_varied_order():
    orders = {tuple(e.seq for e in lib.generate("recon-beacon", seed)) for seed in range(40)}
    assert len(orders) > 5 and all(o[-1] == 4 for o in orders)  # the beacon always comes last


def test_generation_is_deterministic_and_phase_can_be_chosen():
    assert lib.generate("dropper", 7) == lib.generate("dropper", random.Random(7))
    assert lib.generate("import-time-payload", 1, phase="setup")[0].phase == "setup"
    with pytest.raises(lib.ScenarioError, match="fires in collect"):
        lib.generate("collection-time-payload", 1, phase="call")


def test_selection_language():
    assert len(lib.select("all")) == len(lib.SCENARIOS)
    assert all(s.malicious for s in lib.select("attacks"))
    assert {s.family for s in lib.select("family:persistence")} == {"persistence"}
    assert "dns-tunnel" not in {s.id for s in lib.select("attacks,-dns-tunnel")}
    assert "dns-tunnel" not in {s.id for s in lib.select("-family:dns-exfil")}
    assert [s.id for s in lib.select(["reverse-shell", "dropper"])] == ["reverse-shell", "dropper"]
    for bad, match in (("nope", "unknown scenario 'nope'"), ("family:nope", "unknown scenario family"),
                       (" , ", "empty scenario selection")):
        with pytest.raises(lib.ScenarioError, match=match):
            lib.select(bad)


# --------------------------------------------------------------------------- injection

def _recorded(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["step"], -1))


def test_injection_keeps_recorded_rows_and_labels_injected_ones(click_run):
    labelled, summary = inject_run(click_run, InjectConfig(seed=5, rate=0.3, hard_negative_rate=0.2))
    assert summary.attacked_units > 20 and summary.hard_negative_units > 10
    assert labelled.num_rows == click_run.num_rows + summary.injected_events
    # recorded rows: every field but seq unchanged, same order
    fields = [f for f in EVENT_FIELDS if f != "seq"]
    assert _recorded(labelled).select(fields).equals(click_run.select(fields))
    assert labelled["seq"].to_pylist() == list(range(labelled.num_rows))
    t = labelled["t_ns"].to_pylist()
    assert t == sorted(t)

    rows = labelled.to_pylist()
    units = defaultdict(list)
    original_pids = set(click_run["pid"].to_pylist())
    test_ids = set(click_run["test_id"].to_pylist())
    for r in (r for r in rows if r["step"] >= 0):
        units[(r["test_id"], r["attack"])].append(r)
        s = lib.get(r["attack"])
        assert r["malicious"] is s.malicious and r["test_id"] in test_ids
        assert set(s.steps[r["step"]].tags if s.malicious else ()) <= set(r["tags"])
        assert r["phase"] in s.phases
        if s.steps[r["step"]].child:
            assert r["pid"] not in original_pids and r["ppid"] in original_pids
        else:
            assert r["pid"] in original_pids
    assert len(units) == summary.attacked_units + summary.hard_negative_units
    for (test_id, attack), events in units.items():
        s = lib.get(attack)
        order = [_canonical(s, e["step"]) for e in events]
        assert order == sorted(order)  # scenario order kept (interchangeable steps in any order)
        assert sum(e["damaging"] for e in events) == (1 if s.malicious else 0)
        if s.phases == ("collect",):
            assert "::" not in test_id  # a collector (test module), not a test
    assert all(not r["malicious"] and not r["damaging"] for r in rows if r["step"] == -1)


def test_slow_scenarios_interleave_with_the_tests_own_work(click_run):
    cfg = InjectConfig(scenarios="slow-cred-drip,slow-dns-drip", rate=1.0, hard_negative_rate=0, seed=2)
    labelled, _ = inject_run(click_run, cfg)
    rows = labelled.to_pylist()
    interleaved = 0
    for unit in {r["test_id"] for r in rows if r["step"] >= 0}:
        seqs = [i for i, r in enumerate(rows) if r["test_id"] == unit and r["step"] >= 0]
        benign_between = [i for i in range(seqs[0], seqs[-1]) if rows[i]["step"] == -1]
        interleaved += bool(benign_between)
    assert interleaved > 10


def test_injection_is_deterministic_and_per_run(small_traces, click_run):
    cfg = InjectConfig(seed=11)
    a, _ = inject(small_traces, cfg)
    b, _ = inject(small_traces, cfg)
    assert all(x[2].equals(y[2]) for x, y in zip(a, b))
    alone, _ = inject_run(click_run, cfg)
    assert dict((s, t) for s, _, t in a)["click==8.5.1"].equals(alone)  # other runs change nothing
    c, _ = inject(small_traces, InjectConfig(seed=12))
    assert not all(x[2].equals(y[2]) for x, y in zip(a, c))


def test_zero_rates_inject_nothing(click_run):
    labelled, summary = inject_run(click_run, InjectConfig(rate=0, hard_negative_rate=0))
    assert summary.injected_events == 0 and labelled.num_rows == click_run.num_rows
    assert labelled["step"].to_pylist() == [-1] * labelled.num_rows


def test_mix_weights_steer_the_scenarios(click_run):
    _, summary = inject_run(click_run, InjectConfig(rate=0.5, hard_negative_rate=0, seed=1,
                                                    mix={"family:persistence": 50}))
    persistence = sum(n for sid, n in summary.by_scenario.items() if lib.get(sid).family == "persistence")
    assert persistence > 0.6 * summary.attacked_units


def test_inject_dir_writes_a_labelled_dataset_with_manifest(tmp_path):
    manifest = inject_dir(TRACES, tmp_path / "out", InjectConfig(seed=3), suites=["markupsafe==3.0.4", "click==8.5.1"])
    back = read_traces(tmp_path / "out")
    assert {"step", "damaging"} <= set(back.column_names)
    assert pc.sum(back["malicious"]).as_py() == manifest["summary"]["malicious_events"]
    assert (tmp_path / "out" / "inject.json").exists() and len(manifest["files"]) == 2
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        inject_dir(TRACES, tmp_path / "out", InjectConfig())


# --------------------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error(tmp_path, click_run):
    with pytest.raises(TraceError, match="is empty"):
        inject_run(click_run.slice(0, 0), InjectConfig())
    with pytest.raises(lib.ScenarioError, match="unknown scenario 'nope'"):
        InjectConfig(scenarios="dropper,nope")
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\]"):
        InjectConfig(rate=1.5)
    with pytest.raises(ValueError, match="must be <= 1"):
        InjectConfig(rate=0.7, hard_negative_rate=0.5)
    with pytest.raises(lib.ScenarioError, match="names no scenario of the selection"):
        InjectConfig(scenarios="dropper", mix={"reverse-shell": 2})
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_mix("dropper:2")
    # a trace of another schema version
    bad = tmp_path / "bad" / "suite=x%3D%3D1"
    bad.mkdir(parents=True)
    table = click_run.slice(0, 5).replace_schema_metadata({b"sandhop.schema_version": b"99"})
    pq.write_table(table, bad / "run-1.parquet")
    with pytest.raises(TraceError, match="schema"):
        inject_dir(tmp_path / "bad", tmp_path / "out", InjectConfig())
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_inject_and_its_errors(tmp_path, capsys):
    assert main(["inject", "--traces", str(TRACES), "--suite", "markupsafe==3.0.4", "--out",
                 str(tmp_path / "o"), "--rate", "0.5", "--seed", "1"]) == 0
    assert "injected" in capsys.readouterr().out
    assert main(["inject", "--list-scenarios", "--scenarios", "family:persistence"]) == 0
    out = capsys.readouterr().out
    assert "`pth-persistence`" in out and "`dropper`" not in out
    assert main(["inject", "--traces", str(TRACES), "--out", str(tmp_path / "p"), "--scenarios", "nope"]) == 1
    assert "unknown scenario 'nope'" in capsys.readouterr().err
    assert main(["inject", "--traces", str(tmp_path / "missing"), "--out", str(tmp_path / "q")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_browser_scenarios_go_only_into_tests_that_drive_a_browser():
    table = read_traces(TRACES, suites=["click==8.5.1", "webshop==1"])
    out, summary = inject(table, InjectConfig(scenarios="family:browser-exfil", rate=1.0, hard_negative_rate=0.0))
    injected = pa.concat_tables([t for _, _, t in out]).filter(pc.field("malicious"))
    suites = set(injected["suite"].to_pylist())
    assert suites == {"webshop==1"}, suites
    browser_tests = {t for t, c in zip(table["test_id"].to_pylist(), table["category"].to_pylist())
                     if c == "browser.request"}
    assert set(injected["test_id"].to_pylist()) <= browser_tests
    assert summary.attacked_units == len(browser_tests) and set(summary.by_scenario) <= {
        "browser-token-exfil", "form-jacking", "beacon-exfil"}
