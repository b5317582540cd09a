"""ADFA-LD loader, event conversion, STIDE and the evaluation protocol."""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sandhop.datasets import adfa
from sandhop.datasets.adfa import AdfaError, evaluate, fit_stide, load_adfa, stide_score
from sandhop.enforcement import events as ev

pa = pytest.importorskip("pyarrow")
from sandhop.datasets.traces import events_to_table, table_to_events, validate_trace  # noqa: E402

DEV_ZIP = adfa.DEFAULT_PATH

# A small source in ADFA-LD layout: (relative path, file text).
MINI = {
    "Training_Data_Master/UTD-0001.txt": "3 4 5 6 3 4 ",
    "Training_Data_Master/UTD-0002.txt": "192 240 3\n",
    "Validation_Data_Master/UVD-0001.txt": "3 4 5 6 ",
    "Validation_Data_Master/UVD-0002.txt": "5 6 7",
    "Attack_Data_Master/Adduser_1/UAD-Adduser-1-100.txt": "11 3 4 ",
    "Attack_Data_Master/Adduser_2/UAD-Adduser-2-200.txt": "11 11 4",
    "Attack_Data_Master/Hydra_FTP_1/UAD-Hydra-FTP-1-300.txt": "102 102 3 999",
}
NAMES = {3: "read", 4: "write", 5: "open", 6: "close", 7: "waitpid", 11: "execve",
         102: "socketcall", 192: "mmap2", 240: "futex"}


def write_folder(root: Path, files: dict[str, str] = MINI) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def write_zip(path: Path, files: dict[str, str] = MINI, top: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as z:  # file entries only, as many zip tools write them
        for rel, text in files.items():
            z.writestr(top + rel, text)
    return path


def key(traces):
    return [(t.split, t.family, t.run, t.name, t.syscalls.tolist()) for t in traces]


# --------------------------------------------------------------------------- real dev split

@pytest.fixture(scope="module")
def dev():
    if not DEV_ZIP.exists():
        pytest.skip(f"ADFA-LD dev zip not found at {DEV_ZIP} (set up ../shared/data/adfa-ld/)")
    return load_adfa(DEV_ZIP)


def test_dev_counts_match_readme(dev):
    assert Counter(t.split for t in dev) == {"training": 833, "validation": 2186, "attack": 377}
    attack = [t for t in dev if t.split == "attack"]
    # README: families Adduser, Hydra_FTP, Java_Meterpreter, 10 runs each; the per-family trace
    # counts are those of the original ADFA-LD release.
    assert Counter(t.family for t in attack) == {"Adduser": 91, "Hydra_FTP": 162, "Java_Meterpreter": 124}
    runs = {(t.family, t.run) for t in attack}
    assert Counter(f for f, _ in runs) == {"Adduser": 10, "Hydra_FTP": 10, "Java_Meterpreter": 10}
    assert all(t.family == "" and t.run == "" for t in dev if t.split != "attack")
    lengths = [len(t.syscalls) for t in dev]
    assert (min(lengths), max(lengths)) == (75, 4494)  # README: 75 to 4,494 calls


def test_dev_stide_reproduces_the_notes_figure(dev):
    metrics = adfa.run_stide(dev, n=6)
    assert metrics["roc_auc"] == pytest.approx(0.838, abs=0.001)
    assert (metrics["n_normal"], metrics["n_attack"]) == (2186, 377)


def test_dev_events_name_i386_syscalls(dev):
    table = adfa.to_table(dev[:3])
    assert table.num_rows == sum(len(t.syscalls) for t in dev[:3])
    numbers = dev[0].syscalls.tolist()
    names = adfa.syscall_names()
    assert names[3] == "read" and names[192] == "mmap2" and names[240] == "futex"
    assert table["op"].to_pylist()[: len(numbers)] == [names[n] for n in numbers]


# --------------------------------------------------------------------------- loading

@pytest.mark.parametrize("top", ["", "ADFA-LD/"])
def test_zip_and_folder_load_the_same(tmp_path, top):
    folder = write_folder(tmp_path / "folder" / top) if top else write_folder(tmp_path / "folder")
    archive = write_zip(tmp_path / "mini.zip", top=top)
    from_folder, from_zip = load_adfa(tmp_path / "folder"), load_adfa(archive)
    assert key(from_folder) == key(from_zip)
    assert [(t.split, t.family, t.run) for t in from_zip] == [
        ("training", "", ""), ("training", "", ""), ("validation", "", ""), ("validation", "", ""),
        ("attack", "Adduser", "Adduser_1"), ("attack", "Adduser", "Adduser_2"),
        ("attack", "Hydra_FTP", "Hydra_FTP_1")]
    assert from_zip[0].syscalls.dtype.kind == "i"
    assert from_zip[0].syscalls.tolist() == [3, 4, 5, 6, 3, 4]
    assert folder.exists()


def test_env_var_chooses_the_source(tmp_path, monkeypatch):
    write_folder(tmp_path)
    monkeypatch.setenv(adfa.ENV_VAR, str(tmp_path))
    assert len(load_adfa()) == len(MINI)


def test_missing_path_names_it_and_the_fix(tmp_path):
    missing = tmp_path / "nope.zip"
    with pytest.raises(AdfaError, match="SANDHOP_ADFA_LD") as info:
        load_adfa(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("files, problem", [
    ({"README.txt": "hello"}, "not in ADFA-LD layout"),
    ({k: v for k, v in MINI.items() if k.startswith("Training")}, "no Validation_Data_Master, Attack_Data_Master"),
    ({**MINI, "Attack_Data_Master/UAD-loose.txt": "1 2"}, "outside an attack-family folder"),
    ({**MINI, "Validation_Data_Master/UVD-0003.txt": "3 4 x5"}, "token 'x5' is not a syscall number"),
    ({**MINI, "Training_Data_Master/UTD-0003.txt": "  \n"}, "the file is empty"),
])
@pytest.mark.parametrize("as_zip", [False, True])
def test_bad_layout_or_trace_is_an_adfa_error(tmp_path, files, problem, as_zip):
    source = write_zip(tmp_path / "bad.zip", files) if as_zip else write_folder(tmp_path / "bad", files)
    with pytest.raises(AdfaError, match=problem) as info:
        load_adfa(source)
    assert str(source) in str(info.value)
    if "token" in problem or "empty" in problem:
        assert ("UVD-0003.txt" in str(info.value)) or ("UTD-0003.txt" in str(info.value))


def test_a_file_that_is_not_a_zip_is_an_adfa_error(tmp_path):
    bogus = tmp_path / "ADFA-LD.zip"
    bogus.write_text("not a zip")
    with pytest.raises(AdfaError, match="neither a folder nor a readable zip") as info:
        load_adfa(bogus)
    assert str(bogus) in str(info.value)


# --------------------------------------------------------------------------- events

def test_events_are_valid_and_match_the_table(tmp_path):
    traces = load_adfa(write_folder(tmp_path))
    events = list(adfa.to_events(traces, NAMES))
    assert len(events) == sum(len(t.syscalls) for t in traces)
    first = events[0]
    assert (first.category, first.op, first.target, first.target_class, first.detail) == (
        "syscall", "read", "read", "syscall", "3")
    assert (first.suite, first.test_id, first.run_id, first.seq, first.malicious) == (
        "adfa-ld", "UTD-0001.txt", "training", 0, False)
    hydra = [e for e in events if e.test_id == "UAD-Hydra-FTP-1-300.txt"]
    assert [e.op for e in hydra] == ["socketcall", "socketcall", "read", "syscall_999"]
    assert all(e.malicious and e.attack == "Hydra_FTP" for e in hydra)
    assert [e.seq for e in hydra] == [0, 1, 2, 3]

    from_events = validate_trace(events_to_table(events), require_version=False)
    table = adfa.to_table(traces, NAMES)
    assert table.to_pylist() == from_events.to_pylist()
    assert table_to_events(table) == events


def test_syscall_is_a_category_with_its_own_class():
    assert "syscall" in ev.CATEGORIES and "syscall" in ev.TARGET_CLASSES
    assert ev.target_class("syscall", "read") == "syscall"


# --------------------------------------------------------------------------- STIDE

def test_stide_toy_rates():
    model = fit_stide([[1, 2, 3, 4], [7]], n=2)
    assert model.grams == {(1, 2), (2, 3), (3, 4), (7,)}
    assert stide_score(model, [1, 2, 3, 5]) == pytest.approx(1 / 3)   # (3,5) unseen
    assert stide_score(model, [3, 4, 3, 4]) == pytest.approx(1 / 3)   # (4,3) unseen, repeats count
    assert stide_score(model, [2, 3]) == 0.0
    assert stide_score(model, [7]) == 0.0        # shorter than n: the whole trace is one gram
    assert stide_score(model, [8]) == 1.0
    assert stide_score(model, np.array([9, 9, 9])) == 1.0


def test_stide_fits_traces_and_arrays_alike(tmp_path):
    traces = load_adfa(write_folder(tmp_path))
    training = [t for t in traces if t.split == "training"]
    assert fit_stide(training, 3) == fit_stide([t.syscalls for t in training], 3)
    with pytest.raises(ValueError, match="n >= 1"):
        fit_stide(training, 0)


# --------------------------------------------------------------------------- evaluation

def test_evaluate_toy_with_a_tie():
    # attack 0.3 beats two normals and ties one (2.5 of 4), attack 0.5 beats all: 6.5 / 8
    metrics = evaluate([0.1, 0.2, 0.3, 0.4], [0.3, 0.5])
    assert metrics["roc_auc"] == pytest.approx(0.8125)
    assert metrics["detection_at_1pct_fpr"] == 0.5   # only t = 0.5 flags no normal
    assert metrics["detection_at_5pct_fpr"] == 0.5
    assert metrics["fpr_at_90pct_detection"] == 0.5  # t = 0.3 flags 0.3 and 0.4
    assert (metrics["n_normal"], metrics["n_attack"]) == (4, 2)


def test_evaluate_budget_boundary_is_inclusive():
    # one normal of 20 at the attack's score: exactly 5% FPR is within the 5% budget
    metrics = evaluate(np.arange(20.0), [19.0, 25.0])
    assert metrics["roc_auc"] == pytest.approx(39.5 / 40)
    assert metrics["detection_at_5pct_fpr"] == 1.0
    assert metrics["detection_at_1pct_fpr"] == 0.5
    assert metrics["fpr_at_90pct_detection"] == pytest.approx(0.05)


def test_evaluate_extremes_and_bad_input():
    assert evaluate([0, 0], [1, 1])["roc_auc"] == 1.0
    assert evaluate([1, 1], [0, 0])["roc_auc"] == 0.0
    assert evaluate([1, 1], [1, 1])["roc_auc"] == 0.5
    with pytest.raises(ValueError, match="needs normal and attack"):
        evaluate([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        evaluate([float("nan")], [1.0])


# --------------------------------------------------------------------------- CLI

def test_cli_prints_protocol_metrics_and_json_last(tmp_path, capsys):
    assert adfa.main(["--path", str(write_folder(tmp_path)), "--n", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("ROC-AUC" in line for line in lines[:-1])
    result = json.loads(lines[-1])
    assert result["n"] == 2 and result["traces"] == {"training": 2, "validation": 2, "attack": 3}
    assert {"roc_auc", "detection_at_1pct_fpr", "detection_at_5pct_fpr",
            "fpr_at_90pct_detection"} <= set(result)


def test_cli_missing_path_exits_2_naming_it(tmp_path, capsys):
    assert adfa.main(["--path", str(tmp_path / "absent")]) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err
