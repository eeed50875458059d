"""`finetune evaluate`: a run judged on a held-out folder.

    ev = evaluate_run("runs/2026...-lite0-linear-probe", "holdout/")
    ev.metrics["accuracy"], ev.metrics["calibration"]["ece"]
    ev.files      # {"evaluation": ..., "predictions": ..., "confusion_matrix": ..., "reliability": ..., ...}
    ev = evaluate_run(run, "holdout/", tta=True)    # each image averaged with its mirror image
    ev.metrics["accuracy"], ev.metrics["without_tta"]["accuracy"]    # both figures

With `tta`, the trunk also runs on the mirrored images (`models.classifier.Mirrored`, cached as
features of their own) and each image's probabilities are the mean of the two views' (an SVM
head's decision scores, which are no probabilities, are averaged likewise). The metrics,
figures and predictions.json are those with TTA; `metrics["without_tta"]` keeps accuracy,
balanced accuracy, macro-F1 (and top-5) of the first view alone.

Every image of DATA is evaluated, whatever its split folder says. Results go to
`RUN/eval-<data folder name>/` unless `out` says otherwise; never into DATA. When they land in
the run folder, its report.html is re-rendered so it lists this evaluation too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.errors import DataError
from finetune.metrics import (
    calibration_summary,
    classification_metrics,
    most_confident_mistakes,
    reliability_bins,
)

log = logging.getLogger(__name__)


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
    from finetune.features.cache import FeatureIdentity

    if config.head_kind not in ("logreg", "svm", "knn"):
        return None
    sha = config.weights.get("sha256")
    return FeatureIdentity.of_parts(config.model, sha, config.tap, config.pool, config.preprocessing)


def _scores(model, x: np.ndarray, outputs: str) -> np.ndarray:
    """(N, K) class scores of the run's head on trunk features x (N, D); softmax when they are logits."""
    import torch

    with torch.inference_mode():
        z = model.head(torch.from_numpy(x).float())  # (N, K)
        return (torch.softmax(z, dim=1) if outputs == "logits" else z).numpy()


def _mirrored_identity(identity):
    """The cache identity of features of the mirrored images: another preprocessing of the same files."""
    import dataclasses

    if identity is None:
        return None
    return dataclasses.replace(identity, preprocessing=(*identity.preprocessing, ("tta", '"hflip"')))


HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy")  # kept of the view without TTA


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    workers: int | None = None,
    labels_csv: str | os.PathLike | None = None,
    batch_size: int = 64,
    cache: bool = True,
    tta: bool = False,
) -> Evaluation:
    """Predict every image of `data` with a run's model; write metrics and figures to `out`.

    Args:
        run_dir: a folder written by `finetune run`.
        data: class folders (or train/val/test folders, all of which are evaluated; or a CSV via labels_csv).
        out: where evaluation.json, predictions.json and the SVG figures go (default RUN/eval-<data name>/).
        tta: average each image with its mirror image; the figures without it stay in
            metrics["without_tta"].

    Raises:
        RunError: not a run folder. DataError: no images, classes the run does not know, `out` inside `data`.
    """
    from finetune.app.runfolder import load_run, read_config
    from finetune.data.index import scan
    from finetune.features.extract import extract
    from finetune.runtime import check_device, pick_device

    device = check_device(device)  # before any work: a device this machine lacks is one line
    config = read_config(run_dir)
    index = scan(data, labels_csv=labels_csv, for_training=False, remember=cache)  # every image, any class
    out_dir = Path(out) if out is not None else default_out(run_dir, index.root)
    _check_out(out_dir, index.root)
    run_classes = list(config.class_names)
    y_all = _run_labels(index, run_classes)

    model, _, _ = load_run(run_dir)
    identity = _feature_identity(config)

    def features(trunk, positions, description, ident):
        return extract(
            trunk,
            index,
            positions,
            config.preprocessing,
            batch_size=batch_size,
            workers=workers,
            device=pick_device(device),
            description=description,
            identity=ident,
            cache=cache,
        )

    feats = features(model.trunk, range(len(index.paths)), "evaluating", identity)
    for pos, reason in sorted(feats.bad.items()):
        log.info(f"skipped {index.paths[pos]}: {reason}")
    if len(feats.x) == 0:
        raise DataError(f"no image in {index.root} could be read", "see the skipped files listed above")

    probabilistic = config.probabilistic
    scores = _scores(model, feats.x, config.outputs)  # (N, K)
    y_true = np.asarray([y_all[int(p)] for p in feats.positions])  # (N,)
    plain = None
    if tta:
        from finetune.models.classifier import Mirrored

        plain = classification_metrics(y_true, scores.argmax(1), run_classes, scores)
        mirrored = features(
            Mirrored(model.trunk), feats.positions, "evaluating (mirrored)", _mirrored_identity(identity)
        )
        if not np.array_equal(mirrored.positions, feats.positions):  # a file changed between the passes
            raise DataError(f"the images in {index.root} changed while being evaluated", "evaluate again")
        scores = (scores + _scores(model, mirrored.x, config.outputs)) / 2  # (N, K) mean of the two views
    y_pred = scores.argmax(1)  # (N,)
    confidence = scores.max(1)  # (N,) top-1 probability (or SVM score)
    metrics = classification_metrics(y_true, y_pred, run_classes, scores)
    metrics["calibration"] = calibration_summary(confidence, y_true == y_pred) if probabilistic else None
    if plain is not None:
        metrics["tta"] = "hflip"
        metrics["without_tta"] = {k: plain[k] for k in HEADLINE if k in plain}

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
        _refresh_report(Path(run_dir))
    return ev


def _refresh_report(run_dir: Path) -> None:
    """Re-render the run's report.html so it lists this evaluation; a plotting failure is only logged."""
    try:
        from finetune.app.report import write_report

        write_report(run_dir)
    except Exception as err:  # noqa: BLE001 — the evaluation itself is written; the report is a view
        log.warning(f"report.html not refreshed ({type(err).__name__}: {err})")


def _write(ev: Evaluation, index, y_true, y_pred, confidence, class_names: list[str]) -> None:
    """evaluation.json, predictions.json and the figures, each written atomically into ev.out_dir."""
    from finetune.app.figures import confusion_figure, figure_bytes, mistakes_figure, reliability_figure
    from finetune.io import atomic_write, write_json

    out = ev.out_dir
    out.mkdir(parents=True, exist_ok=True)

    def figure(name: str, fig) -> None:
        blob = figure_bytes(fig, "svg")
        atomic_write(out / f"{name}.svg", lambda fh: fh.write(blob))
        ev.files[name] = out / f"{name}.svg"

    cm = np.asarray(ev.metrics["confusion_matrix"])  # (K, K)
    figure(
        "confusion_matrix",
        confusion_figure(cm, class_names, f"confusion matrix ({index.root.name}, n={len(y_true)})"),
    )
    if ev.metrics["calibration"] is not None:
        bins = reliability_bins(confidence, y_true == y_pred)
        figure("reliability", reliability_figure(bins, ev.metrics["calibration"]["ece"]))
    worst = most_confident_mistakes(y_true, y_pred, confidence)
    if worst:
        picks = [(index.root / ev.rows[i]["path"], ev.rows[i]) for i in worst]
        figure("mistakes", mistakes_figure(picks, ev.score_kind))
    ev.files["evaluation"] = out / "evaluation.json"
    ev.files["predictions"] = out / "predictions.json"
    write_json(out / "predictions.json", ev.rows)
    write_json(out / "evaluation.json", ev.to_dict())
