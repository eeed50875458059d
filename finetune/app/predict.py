"""Classify image files with a run's model, or with ImageNet labels when there is no run.

result = predict(["img.jpg", "folder/"], run_dir=None, top_k=3)
result.source            # "runs/2026...-lite0-linear-probe" or "ImageNet-1k (lite0, no run found)"
result.rows[0]           # {"path": ..., "label": ..., "score": ..., "top": [...]}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from finetune.data.decode import ImageError, is_image_name
from finetune.errors import DataError


@dataclass
class Prediction:
    source: str  # which model answered
    score_kind: str  # "probability" | "score"
    rows: list[dict] = field(default_factory=list)


def imagenet_class_names() -> list[str]:
    text = resources.files("finetune").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def expand_paths(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their image files (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(Path(d) / f for d, _, fs in os.walk(p) for f in fs if is_image_name(f))
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p} does not exist", "pass image files or folders of images")
    if not out:
        raise DataError("no image files to predict", "pass image files or folders of images")
    return out


def _load_model(run_dir: str | os.PathLike | None, runs_root: str | os.PathLike):
    """(model, read: path -> tensor, class names, source text, score kind).

    Files are read by the same decoder as feature extraction (`data.eval_reader`), so a run's
    own predictions and `predict` agree.
    """
    from finetune.app.runfolder import latest_run, load_run, read_config
    from finetune.data.transforms import eval_reader

    chosen = Path(run_dir) if run_dir is not None else latest_run(runs_root)
    if chosen is not None:
        model, _, names = load_run(chosen)
        config = read_config(chosen)
        kind = "probability" if config.probabilistic else "score"
        return model, eval_reader(config.preprocessing), names, str(chosen), kind
    from finetune.models.backbone import build
    from finetune.models.catalogue import DEFAULT_BACKBONE

    bb = build(DEFAULT_BACKBONE)
    return (
        bb.model,
        eval_reader(bb.preprocessing),
        imagenet_class_names(),
        f"ImageNet-1k labels ({DEFAULT_BACKBONE}; no run found under {runs_root})",
        "probability",
    )


@torch.inference_mode()
def predict(
    paths: list[str | os.PathLike],
    run_dir: str | os.PathLike | None = None,
    top_k: int = 1,
    runs_root: str | os.PathLike = "runs",
    batch_size: int = 32,
) -> Prediction:
    """Top-k classes of each image; unreadable files get a row with an `error` instead."""
    files = expand_paths(paths)
    model, read, names, source, kind = _load_model(run_dir, runs_root)
    model = model.eval().to(memory_format=torch.channels_last)
    result = Prediction(source=source, score_kind=kind)
    k = max(1, min(top_k, len(names)))
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        tensors, good = [], []
        for path in chunk:
            try:
                tensors.append(read(path))
                good.append(path)
            except ImageError as err:
                result.rows.append({"path": str(path), "error": err.reason})
        if not tensors:
            continue
        x = torch.stack(tensors).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        out = model(x)  # (B, K)
        scores = torch.softmax(out, dim=1) if kind == "probability" else out
        top = torch.topk(scores, k, dim=1)
        for path, vals, idxs in zip(good, top.values.tolist(), top.indices.tolist()):
            result.rows.append(
                {
                    "path": str(path),
                    "label": names[idxs[0]],
                    "score": float(vals[0]),
                    "top": [{"label": names[i], "score": float(v)} for v, i in zip(vals, idxs)],
                }
            )
    order = {str(p): n for n, p in enumerate(files)}
    result.rows.sort(key=lambda r: order[r["path"]])
    return result
