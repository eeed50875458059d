"""Metrics of a classifier's predictions: arrays in, numbers out.

m = classification_metrics(y_true, y_pred, class_names, scores)
m["accuracy"], m["per_class"]["cat"]["recall"], m["top5_accuracy"]    # top-5 only when K > 5
ece = expected_calibration_error(confidence, correct)                 # 15 equal-width bins
worst = most_confident_mistakes(y_true, y_pred, confidence, k=16)     # row indices
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_BINS = 15  # equal-width confidence bins for ECE, as in Guo et al. 2017 ("On Calibration of Modern NNs")


MAX_MISTAKES = 16  # thumbnails in the mistakes grid (4 x 4)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted (sklearn's convention)."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str], scores: np.ndarray | None = None
) -> dict:
    """Accuracy, balanced accuracy, macro-F1, top-5 (when scores are given and K > 5), per-class P/R/F1.

    All of it follows from the confusion matrix, computed here with numpy: importing
    sklearn.metrics costs about 2 s, most of a cached re-run (tests hold these to sklearn).
    Undefined ratios (no prediction of a class, no image of it) are 0, as sklearn's zero_division=0.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if len(y_true) == 0:
        return {"n": 0}
    cm = confusion_matrix(y_true, y_pred, len(class_names))  # (K, K)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    p = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    r = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    present = support > 0  # balanced accuracy averages recall over the classes that occur
    out = {
        "n": int(len(y_true)),
        "accuracy": float(tp.sum() / len(y_true)),
        "balanced_accuracy": float(r[present].mean()),
        "macro_f1": float(f.mean()),
        "per_class": {
            name: {
                "precision": float(p[k]),
                "recall": float(r[k]),
                "f1": float(f[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
    }
    if scores is not None and scores.shape[1] > 5:
        top5 = np.argsort(-scores, axis=1)[:, :5]
        out["top5_accuracy"] = float(np.mean([t in row for t, row in zip(y_true, top5, strict=True)]))
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
