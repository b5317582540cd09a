"""ADFA-LD with the risk model's language-model head: anomaly scores of system-call traces.

The model is trained on Training_Data_Master alone (LM loss only), forward or, with
`dataset.direction=backward` (the adfa_ld experiment), on each trace reversed. A trace's anomaly
score is built from the model's view of it (`Scorer`): how much more surprising the calls of its
least surprising stretch were than the model expected, and how far its pooled hidden state lies
from those of the training programs. Plain mean NLL is reported beside it, and STIDE runs on the
same traces in the same run. Scoring a folder reads the direction from the run's config.yaml.

    sandhop adfa score --checkpoint RUN_DIR --data PATH --out scores.csv
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sandhop.agents.risk_model import RiskModel


def min_window_mean(values: np.ndarray, window: int | None) -> float:
    """The smallest mean of `values` over any `window` consecutive entries: the whole mean when
    there are `window` entries or fewer, or when `window` is None; 0.0 when there are none."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return 0.0
    if window is None or len(values) <= window:
        return float(values.mean())
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return float((sums[window:] - sums[:-window]).min() / window)


@dataclass
class Scorer:
    """A trace's anomaly score from the language model, two parts on one scale:
    - `surprise`: per call, NLL minus the entropy of the prediction (how much more surprising the
      call was than the model expected any call there to be); a trace's value is the smallest
      mean of it over `window` consecutive calls (the whole-trace mean for shorter traces, or
      when `window` is None): how surprising the trace's *most ordinary* stretch is. Attacks are
      surprising throughout; normal traces, even of unusual programs, mostly have a stretch the
      model predicts well;
    - `novelty`: log Mahalanobis distance of the trace's mean final hidden state from those of
      the training traces (is this program like any the model was trained on).
    Each is standardised by its mean and spread over held-out *training* traces, then summed
    (`mode="surprise"` uses the first alone). Fitted on normal data only; stored as JSON.
    Both statistics ignore the order of the calls' values, so outputs of a backward model
    (`dataset.direction=backward`) need no flipping back."""

    mean: list[float]
    precision: list[list[float]]
    z: dict[str, list[float]]
    mode: str = "surprise+novelty"
    window: int | None = 64

    def __post_init__(self) -> None:
        if self.mode not in ("surprise+novelty", "surprise"):
            raise ValueError(f"score mode {self.mode!r}: use surprise+novelty or surprise")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"score window {self.window!r}: use a positive number of calls, or null")

    @classmethod
    def from_json(cls, text: str) -> "Scorer":
        fields = json.loads(text)
        # files written before `window` existed were fitted on the whole-trace mean
        fields.setdefault("window", None)
        return cls(**fields)

    def parts(self, outputs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        # [1:]: the first call has no prediction before it
        surprise = np.array([min_window_mean(o["surprise"][1:] - o["entropy"][1:], self.window) for o in outputs])
        pooled = np.stack([o["hidden"].mean(axis=0) for o in outputs])
        return surprise, pooled

    @classmethod
    def fit(cls, train: list[dict], held_out: list[dict], shrink: float = 1e-3, mode: str = "surprise+novelty",
            window: int | None = 64) -> "Scorer":
        pooled = np.stack([o["hidden"].mean(axis=0) for o in train])
        mean = pooled.mean(axis=0)
        cov = np.cov((pooled - mean).T)
        cov = cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))  # shrinkage keeps it invertible
        scorer = cls(mean.tolist(), np.linalg.inv(cov).tolist(), {}, mode, window)
        surprise, novelty = scorer.raw(held_out)
        scorer.z = {"surprise": [float(surprise.mean()), float(surprise.std() or 1.0)],
                    "novelty": [float(novelty.mean()), float(novelty.std() or 1.0)]}
        return scorer

    def raw(self, outputs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        surprise, pooled = self.parts(outputs)
        d = pooled - np.asarray(self.mean)
        novelty = np.log(np.einsum("ij,jk,ik->i", d, np.asarray(self.precision), d) + 1e-12)
        return surprise, novelty

    def __call__(self, outputs: list[dict]) -> np.ndarray:
        surprise, novelty = self.raw(outputs)
        (ms, ss), (mn, sn) = self.z["surprise"], self.z["novelty"]
        score = (surprise - ms) / ss
        if self.mode == "surprise+novelty":
            score = score + (novelty - mn) / sn
        return score


def evaluate_adfa(model: RiskModel, data: dict, cfg: Any, out: Path) -> dict:
    """Fit the scorer on the training traces (held-out ones for the scale), score validation and
    attack traces, evaluate beside plain mean NLL and STIDE; the scorer goes to `adfa_scorer.json`."""
    from sandhop.agents.train_risk import score_episodes
    from sandhop.datasets.adfa import evaluate, run_stide
    outputs = {name: score_episodes(model, data[name].features) for name in ("train", "val", "normal", "attack")}
    window = cfg.dataset.get("score_window", 64)
    scorer = Scorer.fit(outputs["train"], outputs["val"], mode=str(cfg.dataset.get("score", "surprise+novelty")),
                        window=None if window is None else int(window))
    (out / "adfa_scorer.json").write_text(json.dumps(asdict(scorer)))
    normal, attack = scorer(outputs["normal"]), scorer(outputs["attack"])
    result = {}
    for name, (n, a) in {"lm": (normal, attack),
                         "lm_surprise_only": (scorer.parts(outputs["normal"])[0], scorer.parts(outputs["attack"])[0]),
                         "lm_mean_nll": (_mean_nll(outputs["normal"]), _mean_nll(outputs["attack"]))}.items():
        r = evaluate(n, a)
        families = np.array(data["attack"].attack)
        r["roc_auc_by_family"] = {f: evaluate(n, a[families == f])["roc_auc"] for f in sorted(set(families))}
        result[name] = r
    result["stide"] = run_stide(data["_traces"], int(cfg.dataset.get("stide_n", 6)))
    result["settings"] = {"direction": str(cfg.dataset.get("direction", "forward")), "window": scorer.window,
                          "mode": scorer.mode}
    write_scores(out / "adfa_scores.csv", [k[2] for k in data["normal"].keys] + [k[2] for k in data["attack"].keys],
                 np.concatenate([normal, attack]))
    return {"adfa_ld": result}


def _mean_nll(outputs: list[dict]) -> np.ndarray:
    return np.array([float(o["surprise"][1:].mean()) if len(o["surprise"]) > 1 else 0.0 for o in outputs])


def write_scores(path: Path, files: list[str], scores: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "score"])
        for name, score in zip(files, scores):
            writer.writerow([name, f"{score:.6f}"])


def score_folder(run_dir: str | Path, data: str | Path, out: str | Path) -> int:
    """Score every trace of an ADFA-LD-layout folder or zip with a trained run: `file,score`."""
    from sandhop.agents.train_risk import TrainError, adfa_episodes, load_run, score_episodes
    from sandhop.datasets.adfa import load_adfa
    model, spec, cfg = load_run(run_dir)
    if cfg.dataset.get("kind") != "adfa_ld":
        raise TrainError(f"{run_dir} was trained on {cfg.dataset.get('name')!r}, not ADFA-LD; train with "
                         "experiment=adfa_ld")
    path = Path(run_dir) / "adfa_scorer.json"
    try:
        scorer = Scorer.from_json(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise TrainError(f"{path}: missing or unreadable ({exc}); it is written when the run finishes: "
                         f"run sandhop-train-risk out={run_dir} again to finish it") from None
    traces = load_adfa(data)
    # the direction the model was trained in (runs from before the option read forward)
    enc, _ = adfa_episodes(traces, spec, str(cfg.dataset.get("direction", "forward")))
    scores = scorer(score_episodes(model, enc.features))
    write_scores(Path(out), [f"{t.split}/{t.run + '/' if t.run else ''}{t.name}" for t in traces], scores)
    return len(traces)
