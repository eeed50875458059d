"""Metrics of a classifier's predictions, and `finetune evaluate`: a run judged on a held-out folder.

Pure metrics (arrays in, numbers out)::

    m = classification_metrics(y_true, y_pred, class_names, scores)
    m["accuracy"], m["per_class"]["cat"]["recall"], m["top5_accuracy"]    # top-5 only when K > 5
    ece = expected_calibration_error(confidence, correct)                 # 15 equal-width bins
    worst = most_confident_mistakes(y_true, y_pred, confidence, k=16)     # row indices

A run on a folder (every image of DATA is evaluated, whatever its split folder says)::

    ev = evaluate_run("runs/2026...-lite0-linear-probe", "holdout/")
    ev.metrics["accuracy"], ev.metrics["calibration"]["ece"]
    ev.files      # {"evaluation": ..., "predictions": ..., "confusion_matrix": ..., "reliability": ..., ...}

Results go to `RUN/eval-<data folder name>/` unless `out` says otherwise; never into DATA. When
they land in the run folder, its report.html is re-rendered so it lists this evaluation too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.errors import DataError

N_BINS = 15  # equal-width confidence bins for ECE, as in Guo et al. 2017 ("On Calibration of Modern NNs")
MAX_MISTAKES = 16  # thumbnails in the mistakes grid (4 x 4)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# --------------------------------------------------------------------------- pure metrics


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


# --------------------------------------------------------------------------- a run on a folder


@dataclass
class Evaluation:
    """What `finetune evaluate` produced: metrics, per-image rows, skipped files, written files."""

    run_dir: Path
    data_root: Path
    out_dir: Path
    score_kind: str  # "probability" | "score" (SVM heads: no calibration)
    metrics: dict
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "run": str(self.run_dir),
            "data": str(self.data_root),
            "out": str(self.out_dir),
            "score_kind": self.score_kind,
            "metrics": self.metrics,
            "skipped": self.skipped,
            "files": {k: str(v) for k, v in self.files.items()},
        }


def default_out(run_dir: str | os.PathLike, data: str | os.PathLike) -> Path:
    """RUN/eval-<data folder name>/ (the resolved name, so `.` and `./x/` name the real folder)."""
    name = Path(data).expanduser().resolve().name or "data"
    return Path(run_dir) / f"eval-{name}"


def _check_out(out: Path, data_root: Path) -> None:
    """Evaluation output must never land inside the user's data folder."""
    resolved = out.expanduser().resolve()
    if resolved == data_root or data_root in resolved.parents:
        raise DataError(
            f"output folder {out} is inside the data folder {data_root}",
            "pass --out a folder outside DATA (evaluate never writes into your data)",
        )


def _run_labels(index, run_classes: Sequence[str]) -> list[int]:
    """Each image's class as a position in the run's class list; DATA may hold a subset of them."""
    unknown = [c for c in index.classes if c not in run_classes]
    if unknown:
        shown = ", ".join(run_classes[:20]) + (" ..." if len(run_classes) > 20 else "")
        raise DataError(
            f"class folder(s) {', '.join(unknown)} in {index.root} are not classes of this run "
            f"(it knows {shown})",
            "remove or rename those folders, or evaluate with a run trained on them",
        )
    to_run = {k: run_classes.index(c) for k, c in enumerate(index.classes)}
    return [to_run[lab] for lab in index.labels]


def _feature_identity(config):
    """Cache identity of the run's trunk when it is the untouched pretrained network (probe runs).

    Fine-tuned trunks have new weights that no cache key describes, so they get None (no cache,
    eager PyTorch), which is always correct.
    """
    from finetune.features import FeatureIdentity

    if config.head_kind not in ("logreg", "svm"):
        return None
    sha = config.weights.get("sha256")
    return FeatureIdentity.of_parts(config.model, sha, config.tap, config.pool, config.preprocessing)


def _scores(model, feats, probabilistic: bool) -> np.ndarray:
    """(N, K) class scores of the run's head on trunk features; softmax for probabilistic heads."""
    import torch

    with torch.inference_mode():
        logits = model.head(torch.from_numpy(feats.x).float())  # (N, K)
        return (torch.softmax(logits, dim=1) if probabilistic else logits).numpy()


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    workers: int | None = None,
    labels_csv: str | os.PathLike | None = None,
    batch_size: int = 64,
    cache: bool = True,
    log: Callable[[str], None] = _stderr,
) -> Evaluation:
    """Predict every image of `data` with a run's model; write metrics and figures to `out`.

    Args:
        run_dir: a folder written by `finetune run`.
        data: class folders (or train/val/test folders, all of which are evaluated; or a CSV via labels_csv).
        out: where evaluation.json, predictions.json and the SVG figures go (default RUN/eval-<data name>/).

    Raises:
        RunError: not a run folder. DataError: no images, classes the run does not know, `out` inside `data`.
    """
    from finetune.data import scan
    from finetune.features import extract, pick_device
    from finetune.runs import load_run, read_config

    config = read_config(run_dir)
    index = scan(data, labels_csv=labels_csv, for_training=False)  # every image, any class count
    out_dir = Path(out) if out is not None else default_out(run_dir, index.root)
    _check_out(out_dir, index.root)
    run_classes = list(config.class_names)
    y_all = _run_labels(index, run_classes)

    model, _, _ = load_run(run_dir)
    feats = extract(
        model.trunk,
        index,
        range(len(index.paths)),
        config.preprocessing,
        batch_size=batch_size,
        workers=workers,
        device=pick_device(device),
        description="evaluating",
        identity=_feature_identity(config),
        cache=cache,
        log=log,
    )
    for pos, reason in sorted(feats.bad.items()):
        log(f"skipped {index.paths[pos]}: {reason}")
    if len(feats.x) == 0:
        raise DataError(f"no image in {index.root} could be read", "see the skipped files listed above")

    probabilistic = config.probabilistic
    scores = _scores(model, feats, probabilistic)  # (N, K)
    y_true = np.asarray([y_all[int(p)] for p in feats.positions])  # (N,)
    y_pred = scores.argmax(1)  # (N,)
    confidence = scores.max(1)  # (N,) top-1 probability (or SVM score)
    metrics = classification_metrics(y_true, y_pred, run_classes, scores)
    metrics["calibration"] = calibration_summary(confidence, y_true == y_pred) if probabilistic else None

    rows = [
        {
            "path": index.paths[int(p)],
            "label": run_classes[int(t)],
            "pred": run_classes[int(k)],
            "score": float(c),
            "correct": bool(t == k),
        }
        for p, t, k, c in zip(feats.positions, y_true, y_pred, confidence, strict=True)
    ]
    skipped = [{"path": p.path, "reason": p.reason} for p in index.problems]
    skipped += [{"path": index.paths[i], "reason": r} for i, r in sorted(feats.bad.items())]
    ev = Evaluation(
        run_dir=Path(run_dir),
        data_root=index.root,
        out_dir=out_dir,
        score_kind="probability" if probabilistic else "score",
        metrics=metrics,
        rows=rows,
        skipped=skipped,
    )
    _write(ev, index, y_true, y_pred, confidence, run_classes)
    if out_dir.resolve().parent == Path(run_dir).resolve():
        _refresh_report(Path(run_dir), log)
    return ev


def _refresh_report(run_dir: Path, log: Callable[[str], None]) -> None:
    """Re-render the run's report.html so it lists this evaluation; a plotting failure is only logged."""
    try:
        from finetune.report import write_report

        write_report(run_dir)
    except Exception as err:  # noqa: BLE001 — the evaluation itself is written; the report is a view
        log(f"report.html not refreshed ({type(err).__name__}: {err})")


def _write(ev: Evaluation, index, y_true, y_pred, confidence, class_names: list[str]) -> None:
    """evaluation.json, predictions.json and the figures, each written atomically into ev.out_dir."""
    from finetune.figures import confusion_svg, mistakes_svg, reliability_svg
    from finetune.runs import atomic_write, write_json

    out = ev.out_dir
    out.mkdir(parents=True, exist_ok=True)

    def figure(name: str, svg: str) -> None:
        blob = svg.encode("utf-8")
        atomic_write(out / f"{name}.svg", lambda fh: fh.write(blob))
        ev.files[name] = out / f"{name}.svg"

    figure(
        "confusion_matrix",
        confusion_svg(
            np.asarray(ev.metrics["confusion_matrix"]),
            class_names,
            f"confusion matrix ({index.root.name}, n={len(y_true)})",
        ),
    )
    if ev.metrics["calibration"] is not None:
        figure(
            "reliability",
            reliability_svg(reliability_bins(confidence, y_true == y_pred), ev.metrics["calibration"]["ece"]),
        )
    worst = most_confident_mistakes(y_true, y_pred, confidence)
    if worst:
        picks = [(index.root / ev.rows[i]["path"], ev.rows[i]) for i in worst]
        figure("mistakes", mistakes_svg(picks, ev.score_kind))
    ev.files["evaluation"] = out / "evaluation.json"
    ev.files["predictions"] = out / "predictions.json"
    write_json(out / "predictions.json", ev.rows)
    write_json(out / "evaluation.json", ev.to_dict())
