"""The analysis notebooks (notebooks/*.ipynb): committed without outputs, documented, and each one
runs top to bottom with nbclient on outputs of small real runs of this session (the tiny risk
model and PPO manager of `trained`, a sweep-shaped folder of that run, a `sandhop evaluate` of
it, a tiny ADFA-LD folder; the audit notebook enforces and logs a suite of its own), drawing every
figure it promises."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import IN_SAMPLE

WHY = "the notebooks extra is not installed (pip install 'sandhop[notebooks]')"
nbformat = pytest.importorskip("nbformat", reason=WHY)
nbclient = pytest.importorskip("nbclient", reason=WHY)
pytest.importorskip("ipykernel", reason=WHY)
pytest.importorskip("matplotlib", reason=WHY)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_traces", "02_risk_model", "03_sandbox_manager", "04_audit")
VARIABLE = re.compile(r"SANDHOP_NB_[A-Z_]+")

# A tiny source in ADFA-LD layout (as tests/test_adfa.py writes one): two attack families made of
# calls the normal traces never make, one normal validation trace that is unusual too.
ADFA = {
    **{f"Training_Data_Master/UTD-{i:04d}.txt": " ".join(["3 4 5 6"] * (3 + i % 3)) for i in range(6)},
    **{f"Validation_Data_Master/UVD-{i:04d}.txt": " ".join(["3 4 5 6"] * 4) for i in range(4)},
    "Validation_Data_Master/UVD-0004.txt": "3 4 5 6 192 240 3 4",
    **{f"Attack_Data_Master/Adduser_{i}/UAD-Adduser-{i}-1.txt": "11 102 11 102 3 6 11 102" for i in (1, 2)},
    "Attack_Data_Master/Hydra_FTP_1/UAD-Hydra-FTP-1-1.txt": "102 102 3 4 5 6 102 102",
}


def read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def execute(name: str, workdir: Path):
    """The notebook run top to bottom in a fresh python3 kernel started in `workdir` (it gets this
    process's environment); a failing cell raises CellExecutionError with its traceback."""
    nb = read(name)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def figureless(nb) -> list[int]:
    """Indices of cells tagged `figure` that displayed no PNG."""
    return [i for i, cell in enumerate(nb.cells) if "figure" in cell.metadata.get("tags", [])
            and not any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in cell.outputs)]


def text(nb) -> str:
    """Everything the notebook printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A clean slate for the kernel: no notebook inputs from the caller's environment, temporary
    files under tmp_path."""
    for name in {v for n in NAMES for v in VARIABLE.findall(json.dumps(read(n)))} | {"SANDHOP_RUNS", "SANDHOP_ADFA_LD"}:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return monkeypatch


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory):
    """The inputs the sweep and ADFA-LD parts read, made from the session's runs: a Hydra-multirun-
    shaped folder whose two jobs are copies of the trained agent run, a `sandhop evaluate` of that
    run with the baselines on its val split (whose risk scores the training cached), and an
    ADFA-LD folder."""
    from sandhop.agents.evaluate_agent import evaluate_command
    base = tmp_path_factory.mktemp("notebook-inputs")
    sweep = base / "agent-multirun" / "20261130-120000"
    overrides = ["experiment=smoke", "env.risk.source=model", f"env.risk.checkpoint={trained.risk}", IN_SAMPLE,
                 "agent.num_seeds=2", "agent.eval_every_chunks=4"]   # as conftest trained it
    for job in ("0", "1"):
        (sweep / job / ".hydra").mkdir(parents=True)
        for name in ("config.yaml", "metrics.csv", "metrics.parquet", "evaluation.json"):
            shutil.copy(trained.agent / name, sweep / job / name)
        (sweep / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n  overrides:\n    task:\n"
                                         + "".join(f"    - {o}\n" for o in overrides))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SANDHOP_CACHE", str(trained.cache))
        evaluate_command(f"ppo:{trained.agent},static,threshold,oracle", "val", base / "eval")
    adfa = base / "adfa"
    for rel, calls in ADFA.items():
        (adfa / rel).parent.mkdir(parents=True, exist_ok=True)
        (adfa / rel).write_text(calls)
    return SimpleNamespace(sweep=sweep, eval=base / "eval", adfa=adfa)


# --------------------------------------------------------------------------- as committed

@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_are_valid_and_stripped(name):
    nb = read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), \
        f"{name}.ipynb has outputs: clear them (jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)"
    assert nb.metadata.kernelspec.name == "python3"
    assert any("figure" in c.metadata.get("tags", []) for c in code)


@pytest.mark.parametrize("name", NAMES)
def test_every_input_variable_is_documented(name):
    nb = read(name)
    used = set(VARIABLE.findall("\n".join(c.source for c in nb.cells if c.cell_type == "code")))
    assert used, f"{name} reads no SANDHOP_NB_ variable"
    first_markdown = next(c.source for c in nb.cells if c.cell_type == "markdown")
    readme = (NOTEBOOKS / "README.md").read_text()
    assert {v for v in used if v not in first_markdown} == set(), "document them in the notebook's first cell"
    assert {v for v in used if v not in readme} == set(), "document them in notebooks/README.md"


# --------------------------------------------------------------------------- executed

def test_traces_notebook_runs(trained, kernel_env, tmp_path):
    kernel_env.setenv("SANDHOP_CACHE", str(trained.cache))   # the small dataset is built there already
    nb = execute("01_traces", tmp_path)
    assert figureless(nb) == []
    out = text(nb)
    assert "attack step" in out and "hard negative step" in out and "recorded" in out
    assert "werkzeug" in out   # a bundled suite in the overview


def test_risk_model_notebook_runs(trained, runs, kernel_env, tmp_path):
    kernel_env.setenv("SANDHOP_NB_RISK_RUN", str(trained.risk))
    kernel_env.setenv("SANDHOP_NB_ADFA_RUN", str(tmp_path / "no-adfa-run"))
    kernel_env.setenv("SANDHOP_ADFA_LD", str(runs.adfa))
    nb = execute("02_risk_model", tmp_path)
    assert figureless(nb) == []
    out = text(nb)
    evaluation = json.loads((trained.risk / "evaluation.json").read_text())
    assert f"{evaluation['threshold_at_1pct_val_fpr']:.4f}" in out   # read from the run, not recomputed
    assert "STIDE n=6" in out and f"{len(ADFA)} traces" in out
    # without a language-model run, the ADFA-LD cells say how to make one
    assert "sandhop-train-risk experiment=adfa_ld" in out and "STIDE is shown alone" in out


def test_sandbox_manager_notebook_runs(trained, runs, kernel_env, tmp_path):
    kernel_env.setenv("SANDHOP_CACHE", str(trained.cache))
    kernel_env.setenv("SANDHOP_NB_MULTIRUN", str(runs.sweep))
    kernel_env.setenv("SANDHOP_NB_EVAL", str(runs.eval))
    kernel_env.setenv("SANDHOP_NB_AGENT", str(trained.agent))
    kernel_env.setenv("SANDHOP_NB_SPLIT", "val")   # its model risk scores were cached while training
    nb = execute("03_sandbox_manager", tmp_path)
    assert figureless(nb) == []
    out = text(nb)
    assert "2 job(s)" in out
    assert "static:medium" in out and "oracle" in out   # the evaluate results
    assert "ppo (seed 0)" in out and "ppo (seed 1)" in out and "threshold" in out   # the timelines


def test_audit_notebook_runs(kernel_env, tmp_path):
    nb = execute("04_audit", tmp_path)
    assert figureless(nb) == []
    out = text(nb)
    assert "3 failed, 3 passed" in out   # its suite under medium: key read, outside connect, curl denied
    assert ": ok, " in out and "sealed" in out
    assert "BROKEN" in out and "edited" in out   # the edited copy fails verification
    assert "test_suite.py::test_reads_ssh_key" in out and "${home}/.ssh/id_rsa" in out
    # its work folder went with the kernel
    assert not list(tmp_path.glob("sandhop-audit-notebook-*"))
