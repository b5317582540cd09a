"""Evaluation of a trained risk model on labelled splits: per-event and per-test ROC-AUC and
PR-AUC, detection at 1 % and 5 % FPR, tag macro-F1, the fraction of attacks flagged before
their damaging step, calibration (ECE), and ROC / reliability plots.

The calibrator and the alert threshold are fitted on the validation split only, then applied
unchanged to test and novel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sandhop.agents.features import Encoded
from sandhop.agents.risk_model import Calibrator, expected_calibration_error
from sandhop.datasets.adfa import evaluate as roc_metrics


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """PR-AUC as average precision (ties broken pessimistically)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    if not labels.any():
        return float("nan")
    order = np.lexsort((labels, -scores))  # highest score first; among ties, negatives first
    hits = labels[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / hits.sum())


def flatten(enc: Encoded, outputs: list[dict]) -> dict[str, np.ndarray]:
    return {"risk": np.concatenate([o["risk"] for o in outputs]),
            "surprise": np.concatenate([o["surprise"] for o in outputs]),
            "malicious": np.concatenate(enc.malicious)}


def fit_calibrator(enc: Encoded, outputs: list[dict]) -> Calibrator:
    flat = flatten(enc, outputs)
    return Calibrator.fit(flat["risk"], flat["surprise"], flat["malicious"])


def test_scores(enc: Encoded, probs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per test: the highest event risk, and whether the test holds an attack."""
    return (np.array([p.max() if len(p) else 0.0 for p in probs]),
            np.array([m.any() for m in enc.malicious]))


def threshold_at_fpr(benign_scores: np.ndarray, fpr: float = 0.01) -> float:
    """The lowest threshold that flags at most `fpr` of benign tests (score >= threshold)."""
    s = np.sort(np.asarray(benign_scores, np.float64))[::-1]
    k = int(np.floor(fpr * len(s)))
    return float(np.nextafter(s[k], np.inf)) if k < len(s) else float(s[-1])


def tag_macro_f1(enc: Encoded, outputs: list[dict], threshold: float = 0.5) -> float:
    true = np.concatenate(enc.tags)
    pred = np.concatenate([o["tags"] for o in outputs]) >= threshold
    mal = np.concatenate(enc.malicious) > 0
    true, pred = true[mal] > 0, pred[mal]
    f1 = []
    for k in range(true.shape[1]):
        if not true[:, k].any():
            continue
        tp = np.sum(true[:, k] & pred[:, k])
        fp = np.sum(~true[:, k] & pred[:, k])
        fn = np.sum(true[:, k] & ~pred[:, k])
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f1)) if f1 else float("nan")


def flagged_before_damage(enc: Encoded, probs: list[np.ndarray], threshold: float) -> float:
    """Of the tests with an attack, the fraction whose risk reached `threshold` strictly before
    the attack's damaging event."""
    attacked = [(p, d) for p, d in zip(probs, enc.damaging) if d.any()]
    if not attacked:
        return float("nan")
    early = 0
    for p, d in attacked:
        damage = int(np.argmax(d))
        early += bool(np.any(p[:damage] >= threshold))
    return early / len(attacked)


def episode_probs(enc: Encoded, outputs: list[dict], calibrator: Calibrator) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    """(flat columns, calibrated risk of every event, the same split per episode)."""
    flat = flatten(enc, outputs)
    prob = calibrator(flat["risk"], flat["surprise"])
    bounds = np.cumsum([len(o["risk"]) for o in outputs])[:-1]
    return flat, prob, np.split(prob, bounds)


def evaluate_split(enc: Encoded, outputs: list[dict], calibrator: Calibrator, threshold: float,
                   event_threshold: float | None = None) -> dict:
    """Metrics of one split. `threshold`: per-test alert threshold (1 % FPR on val tests);
    `event_threshold`: per-event threshold (0.1 % FPR on val benign events), at which the
    fraction of attacks flagged before their damaging step is reported too."""
    flat, prob, probs = episode_probs(enc, outputs, calibrator)
    per_test, attacked = test_scores(enc, probs)
    result = {"episodes": len(enc), "attacked_tests": int(attacked.sum()), "events": int(len(prob)),
              "malicious_events": int(flat["malicious"].sum())}
    labels = flat["malicious"] > 0
    if labels.any() and (~labels).any():
        ev = roc_metrics(prob[~labels], prob[labels])
        result.update(event_roc_auc=ev["roc_auc"], event_pr_auc=average_precision(prob, labels))
    if attacked.any() and (~attacked).any():
        te = roc_metrics(per_test[~attacked], per_test[attacked])
        result.update(test_roc_auc=te["roc_auc"], test_pr_auc=average_precision(per_test, attacked),
                      test_detection_at_1pct_fpr=te["detection_at_1pct_fpr"],
                      test_detection_at_5pct_fpr=te["detection_at_5pct_fpr"],
                      test_fpr_at_threshold=float(np.mean(per_test[~attacked] >= threshold)),
                      flagged_before_damage=flagged_before_damage(enc, probs, threshold))
        if event_threshold is not None:
            result.update(event_fpr_at_event_threshold=float(np.mean(prob[~labels] >= event_threshold)),
                          flagged_before_damage_at_event_threshold=flagged_before_damage(enc, probs, event_threshold))
    result.update(tag_macro_f1=tag_macro_f1(enc, outputs), ece=expected_calibration_error(prob, labels))
    result["_curves"] = {"prob": prob, "labels": labels, "per_test": per_test, "attacked": attacked}
    return result


def plot(results: dict[str, dict], out: Path) -> list[Path]:
    """roc.png (per-test ROC of each split) and reliability.png (per-event calibration)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, ax = plt.subplots(figsize=(5, 5))
    for split, r in results.items():
        c = r["_curves"]
        if not (c["attacked"].any() and (~c["attacked"]).any()):
            continue
        fpr, tpr = roc_curve(c["per_test"], c["attacked"])
        ax.plot(fpr, tpr, label=f"{split} (AUC {r.get('test_roc_auc', float('nan')):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false-positive rate (benign tests)", ylabel="detection rate (attacked tests)",
           title="Per-test ROC of the risk score")
    ax.legend(loc="lower right")
    paths.append(out / "roc.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    for split, r in results.items():
        c = r["_curves"]
        edges = np.linspace(0, 1, 11)
        mids, freq = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (c["prob"] >= lo) & (c["prob"] < hi if hi < 1 else c["prob"] <= hi)
            if inside.sum() >= 5:
                mids.append(c["prob"][inside].mean())
                freq.append(c["labels"][inside].mean())
        ax.plot(mids, freq, "o-", label=f"{split} (ECE {r['ece']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="predicted risk", ylabel="observed fraction malicious", title="Reliability (per event)")
    ax.legend(loc="upper left")
    paths.append(out / "reliability.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    labels = np.asarray(labels, bool)[order]
    tpr = np.concatenate([[0], np.cumsum(labels) / max(labels.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(~labels) / max((~labels).sum(), 1)])
    return fpr, tpr


def public(result: dict) -> dict:
    """The JSON-able part of a split's result."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
