"""The demo's report (`sandhop.report`): report.md and its plots, written from real runs of this
session (the tiny risk model and PPO manager of `trained`, a `sandhop evaluate` of them on val, an
audit log of a suite enforced by their artifact), and "not run" for every part a demo skipped."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the notebooks extra is not installed (pip install 'sandhop[notebooks]')")

from conftest import KEY_SUITE  # noqa: E402

from sandhop.report import NOT_RUN, PNG_MAGIC, read_audit_log, summary_lines, tier_timeline, write_report  # noqa: E402

SECTIONS = ("## 1. The risk model", "## 2. The sandbox manager (PPO)", "## 3. Evaluation against the baselines",
            "## 4. Live: the artifact enforcing real runs", "## 5. Tier timeline of one attacked test")


@pytest.fixture(scope="module")
def evaluation(trained, tmp_path_factory) -> Path:
    """`sandhop evaluate` of the trained manager and the baselines on val (whose risk scores the
    training cached)."""
    from sandhop.agents.evaluate_agent import evaluate_command
    out = tmp_path_factory.mktemp("report-eval") / "eval"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SANDHOP_CACHE", str(trained.cache))
        assert evaluate_command(f"ppo:{trained.agent},static:medium,threshold,oracle", "val", out) == 0
    return out


def enforce(pytester, artifact: Path, log: Path):
    """The key suite under the artifact, with an audit log (test_reads_key reads a key from HOME)."""
    pytester.makepyfile(test_inner=textwrap.dedent(KEY_SUITE))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--sandhop-enforce={artifact}",
                                         f"--sandhop-audit-log={log}")


def linked_images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_the_report_covers_every_part_and_plots_the_test_the_manager_stopped(trained, evaluation, artifact_tools,
                                                                               pytester, home, tmp_path, capsys):
    log = tmp_path / "suite.jsonl"
    enforce(pytester, artifact_tools.with_policy(tmp_path, "hop:high"), log).assert_outcomes(passed=1, failed=1)
    # both tests hop to high; only the one that reads the key has an operation denied after it
    timeline = tier_timeline(read_audit_log(log))
    assert timeline.test_id.endswith("test_reads_key") and timeline.start_tier == "observe"
    assert [a[1:2] + a[3:] for a in timeline.actions] == [("hop:high", "observe", "high")]
    denied = [e for e, d in zip(timeline.events, timeline.decisions) if d == "deny"]
    assert len(denied) == 1 and denied[0].endswith("id_rsa")

    live = {"artifact": str(trained.artifact),
            "suite": {"name": "inner==1", "outcomes_plain": {"passed": 2}, "outcomes_enforced": {"passed": 1, "failed": 1},
                      "broken": ["test_inner.py::test_reads_key"], "plain_s": 2.0, "enforced_s": 2.5,
                      "audit_log": str(log)},
            "probes": {"attacks": 3, "stopped": ["env-secret-tcp", "dropper"], "through": ["child-python-laundering"],
                       "payloads": 1, "hard_negatives": 7, "hard_negatives_broken": [], "audit_log": str(log)}}
    out = tmp_path / "demo"
    md_path = write_report(out, risk_run=trained.risk, agent_run=trained.agent, eval_dir=evaluation, live=live)
    assert md_path == out / "report.md"
    md = md_path.read_text()
    assert [md.index(s) for s in SECTIONS] == sorted(md.index(s) for s in SECTIONS)
    assert NOT_RUN not in md.lower()
    images = linked_images(md)
    assert set(images) == {"roc.png", "reliability.png", "learning_curves.png", "pareto_val.png", "tier_timeline.png"}
    for name in images:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    risk, agent, evaluated, live_part, timeline_part = (md.split(s, 1)[1] for s in SECTIONS)
    assert "| metric | val (fitted on) |" in risk and "ECE (per event)" in risk
    assert "members 0 (seed 0), 1 (seed 1)" in agent and "| 1 | 1 | -" in agent  # and the final val table
    assert "### val:" in evaluated and "| oracle | 1 |" in evaluated and "| ppo" in evaluated
    assert "2 of 3 attacks stopped" in live_part and "through: child-python-laundering" in live_part
    assert "benign tests broken: 1: `test_inner.py::test_reads_key`" in live_part
    assert "overhead 1.25x" in live_part and "chain intact, sealed" in live_part
    assert "`test_inner.py::test_reads_key`" in timeline_part and "test_writes_tmp" not in timeline_part
    assert "hop:high (observe → high) | high | deny" in timeline_part

    lines = "\n".join(summary_lines(eval_dir=evaluation, live=live))
    assert "evaluation on val" in lines and "oracle" in lines and "static:medium" in lines
    assert "2 of 3 attacks stopped (through: child-python-laundering)" in lines
    assert "1 benign test broken of 2 passing; overhead 1.25x" in lines


def test_every_missing_part_reads_not_run(tmp_path):
    md = write_report(tmp_path / "demo", live={"probes": {"skipped": "the probes need root"}}).read_text()
    for section in SECTIONS:
        body = md.split(section, 1)[1].split("\n## ", 1)[0]
        assert NOT_RUN in body.lower(), section
    assert "- Attack probes: not run (the probes need root)" in md and "- Test suite: not run" in md
    assert not linked_images(md) and not list((tmp_path / "demo").glob("*.png"))
    assert summary_lines() == ["evaluation: not run", "live probes: not run", "live suite: not run"]


def test_learning_curves_fall_back_to_metrics_csv_and_a_log_without_actions_has_no_timeline(
        trained, artifact_tools, pytester, home, tmp_path):
    agent = tmp_path / "agent"
    agent.mkdir()
    shutil.copy(trained.agent / "metrics.csv", agent)
    log = tmp_path / "stay.jsonl"
    enforce(pytester, artifact_tools.with_policy(tmp_path, "stay"), log).assert_outcomes(passed=2)
    assert tier_timeline(read_audit_log(log)) is None
    md = write_report(tmp_path / "demo", agent_run=agent, live={"probes": {"audit_log": str(log)}}).read_text()
    assert linked_images(md) == ["learning_curves.png"]
    assert (tmp_path / "demo" / "learning_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "No timeline: the manager took no action" in md
