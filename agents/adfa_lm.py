"""ADFA-LD with the risk model's language-model head: anomaly scores of system-call traces.

The model is trained on Training_Data_Master alone (LM loss only); a trace's anomaly score is
built from its per-call surprise (negative log-likelihood of each call given the ones before
it). STIDE runs on the same traces in the same run, so the two are compared side by side.

    sandhop adfa score --checkpoint RUN_DIR --data PATH --out scores.csv
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from sandhop.agents.features import Encoded
from sandhop.agents.risk_model import RiskModel


def trace_scores(model: RiskModel, enc: Encoded, cap: float | None = None) -> np.ndarray:
    """Mean per-call surprise of each trace (the first call has no prediction and is skipped);
    with `cap`, each call's surprise is clipped at it first (one never-seen call id must not
    outweigh a whole trace that is ordinary)."""
    from sandhop.agents.train_risk import score_episodes
    outputs = score_episodes(model, enc.features)
    scores = []
    for o in outputs:
        s = o["surprise"][1:]
        if cap is not None:
            s = np.minimum(s, cap)
        scores.append(float(s.mean()) if len(s) else 0.0)
    return np.asarray(scores)


def fit_cap(model: RiskModel, enc: Encoded, quantile: float) -> float:
    """The per-call surprise at `quantile` over held-out *training* traces."""
    from sandhop.agents.train_risk import score_episodes
    values = np.concatenate([o["surprise"][1:] for o in score_episodes(model, enc.features)])
    return float(np.quantile(values, quantile))


def evaluate_adfa(model: RiskModel, data: dict, cfg: Any, out: Path) -> dict:
    from sandhop.datasets.adfa import evaluate, run_stide
    quantile = cfg.dataset.get("cap_quantile")
    cap = fit_cap(model, data["val"], float(quantile)) if quantile is not None else None
    normal = trace_scores(model, data["normal"], cap)
    attack = trace_scores(model, data["attack"], cap)
    lm = evaluate(normal, attack)
    families = sorted(set(data["attack"].attack))
    lm["roc_auc_by_family"] = {f: evaluate(normal, attack[np.array(data["attack"].attack) == f])["roc_auc"]
                               for f in families}
    lm["cap"] = cap
    stide = run_stide(data["_traces"], int(cfg.dataset.get("stide_n", 6)))
    write_scores(out / "adfa_scores.csv", [k[2] for k in data["normal"].keys] + [k[2] for k in data["attack"].keys],
                 np.concatenate([normal, attack]))
    return {"adfa_ld": {"lm": lm, "stide": stide}}


def write_scores(path: Path, files: list[str], scores: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "score"])
        for name, score in zip(files, scores):
            writer.writerow([name, f"{score:.6f}"])


def score_folder(run_dir: str | Path, data: str | Path, out: str | Path) -> int:
    """Score every trace of an ADFA-LD-layout folder or zip with a trained run: `file,score`."""
    from sandhop.agents.train_risk import TrainError, adfa_episodes, load_run
    from sandhop.datasets.adfa import load_adfa
    model, spec, cfg = load_run(run_dir)
    if cfg.dataset.get("kind") != "adfa_ld":
        raise TrainError(f"{run_dir} was trained on {cfg.dataset.get('name')!r}, not ADFA-LD; train with "
                         "experiment=adfa_ld")
    traces = load_adfa(data)
    enc, _ = adfa_episodes(traces, spec)
    import json
    evaluation = Path(run_dir) / "evaluation.json"
    cap = None
    if evaluation.exists():
        cap = json.loads(evaluation.read_text()).get("adfa_ld", {}).get("lm", {}).get("cap")
    scores = trace_scores(model, enc, cap)
    write_scores(Path(out), [f"{t.split}/{t.run + '/' if t.run else ''}{t.name}" for t in traces], scores)
    return len(traces)
