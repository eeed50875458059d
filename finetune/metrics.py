"""Metrics of a classifier's predictions: arrays in, numbers out (scikit-learn does the scoring).

m = classification_metrics(y_true, y_pred, class_names, scores)
m["accuracy"], m["per_class"]["cat"]["recall"], m["top5_accuracy"]    # top-5 only when K > 5
ece = expected_calibration_error(confidence, correct)                 # 15 equal-width bins
worst = most_confident_mistakes(y_true, y_pred, confidence, k=16)     # row indices

Averages over classes (balanced accuracy, macro-F1) count only the classes that have images in
`y_true`: a held-out folder holding one of the run's classes is judged on that class alone.
ECE has no scikit-learn function; its bins are the few lines below, tested against a hand calculation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_BINS = 15  # equal-width confidence bins for ECE, as in Guo et al. 2017 ("On Calibration of Modern NNs")


MAX_MISTAKES = 16  # thumbnails in the mistakes grid (4 x 4)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted (sklearn's convention), every class listed."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    return sk_confusion(y_true, y_pred, labels=np.arange(n_classes))


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str], scores: np.ndarray | None = None
) -> dict:
    """Accuracy, balanced accuracy, macro-F1, top-5 (when scores are given and K > 5), per-class P/R/F1.

    `y_true`, `y_pred` are positions in `class_names`; `scores` is (N, K). Balanced accuracy and
    macro-F1 average over the classes present in `y_true` (`classes_present`); the per-class rows
    list every class, an absent one with support 0. Undefined ratios are 0 (zero_division=0).
    """
    from sklearn.metrics import (
        accuracy_score,
        precision_recall_fscore_support,
        recall_score,
        top_k_accuracy_score,
    )

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0:
        return {"n": 0}
    k = len(class_names)
    present = np.unique(y_true)  # classes with at least one image
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=np.arange(k), zero_division=0)
    # balanced_accuracy_score is this macro recall, but warns when y_pred holds a class absent from y_true
    balanced = recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    _, _, macro_f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=present, average="macro", zero_division=0
    )
    out = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(macro_f1),
        "classes_present": int(len(present)),
        "per_class": {
            name: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, k).tolist(),
    }
    if scores is not None and scores.shape[1] > 5:
        out["top5_accuracy"] = float(top_k_accuracy_score(y_true, scores, k=5, labels=np.arange(k)))
    return out


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin (lower, upper]: how many predictions fell in it, how often they were right."""

    lower: float
    upper: float
    count: int
    accuracy: float  # fraction correct; 0 for an empty bin
    confidence: float  # mean confidence; 0 for an empty bin

    @property
    def gap(self) -> float:
        """|accuracy - confidence|: how far this bin is from the diagonal of a calibrated model."""
        return abs(self.accuracy - self.confidence)


def reliability_bins(
    confidence: Sequence[float], correct: Sequence[bool], n_bins: int = N_BINS
) -> list[ReliabilityBin]:
    """Predictions grouped into `n_bins` equal-width bins of confidence over [0, 1].

    Bins are half-open on the left, (lower, upper], as in Guo et al.; a confidence of exactly 0
    goes to the first bin (a top-1 probability is never 0, but a clipped SVM score could be).
    """
    conf = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)  # (N,)
    hit = np.asarray(correct, dtype=bool)  # (N,)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") puts a value equal to an edge into the bin that edge closes
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # (N,)
    bins = []
    for b in range(n_bins):
        members = which == b
        n = int(members.sum())
        bins.append(
            ReliabilityBin(
                lower=float(edges[b]),
                upper=float(edges[b + 1]),
                count=n,
                accuracy=float(hit[members].mean()) if n else 0.0,
                confidence=float(conf[members].mean()) if n else 0.0,
            )
        )
    return bins


def expected_calibration_error(
    confidence: Sequence[float], correct: Sequence[bool], n_bins: int = N_BINS
) -> float:
    """ECE = sum over bins of (bin size / N) * |accuracy(bin) - mean confidence(bin)|; 0 for no data."""
    return _ece(reliability_bins(confidence, correct, n_bins))


def _ece(bins: Sequence[ReliabilityBin]) -> float:
    total = sum(b.count for b in bins)
    return float(sum(b.count / total * b.gap for b in bins)) if total else 0.0


def most_confident_mistakes(
    y_true: Sequence[int], y_pred: Sequence[int], confidence: Sequence[float], k: int = MAX_MISTAKES
) -> list[int]:
    """Row indices of the wrong predictions, most confident first (ties: earlier row first), at most k."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    conf = np.asarray(confidence, dtype=np.float64)
    wrong = np.flatnonzero(y_true != y_pred)
    order = wrong[np.argsort(-conf[wrong], kind="stable")]
    return [int(i) for i in order[:k]]


def calibration_summary(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = N_BINS) -> dict:
    """What evaluation.json stores about calibration: ECE and the non-empty bins."""
    bins = reliability_bins(confidence, correct, n_bins)
    return {
        "ece": _ece(bins),
        "n_bins": n_bins,
        "bins": [
            {
                "lower": b.lower,
                "upper": b.upper,
                "count": b.count,
                "accuracy": b.accuracy,
                "confidence": b.confidence,
            }
            for b in bins
            if b.count
        ],
    }
