"""Classify image files: paths in, one row per file out, in the files' order, as they come.

    result = stream(["img.jpg", "folder/"], run_dir=None, top_k=3, csv_file="out.csv")
    result.source        # "runs/2026...-lite0-linear-probe" or "ImageNet-1k labels (lite0; ...)"
    for row in result.rows:  # {"path", "label", "score", "top": [{"label", "score"}, ...]}
        ...                   # or {"path", "error"} for a file that cannot be read
    predict(paths, run_dir).rows         # the same rows in a list (a handful of files)
    predict(paths, run_dir, tta=True)    # each image averaged with its mirror image
    predict_rows(predictor, files)       # the loop itself: (predictor, paths) -> rows

The classifier is `predictor.open_predictor`'s (ONNX Runtime on the run's cached export; torch
only on request). Files are read by `data.transforms.ArrayReader` (Pillow and numpy: the numbers
training and evaluation feed the network) in as many threads as there are cores, at most two
batches ahead of the network, so a folder of a million files never sits in memory.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.app.predictor import Predictor, open_predictor
from finetune.console import progress_bar
from finetune.data.decode import ImageError, is_image_name
from finetune.data.transforms import ArrayReader
from finetune.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    source: str  # which model answered
    score_kind: str  # "probability" | "score"
    rows: Iterable[dict]  # a list from `predict`, rows as they come from `stream`
    class_names: tuple[str, ...] = ()  # every class the model knows (for aligned columns)


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
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


def _read_ahead(read: ArrayReader, files: Sequence[Path], workers: int, depth: int) -> Iterator:
    """(path, (3, S, S) array or the reason it failed) for each file in order, read in `workers`
    threads (Pillow and numpy release the GIL) and never more than `depth` files ahead."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: Path) -> np.ndarray | str:
        try:
            return read(path)
        except ImageError as err:
            return err.reason

    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        for path in files:
            pending.append((path, pool.submit(one, path)))
            if len(pending) >= depth:
                done, fut = pending.popleft()
                yield done, fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, fut.result()


def _rows(predictor: Predictor, batch: list, k: int, tta: bool = False) -> list[dict]:
    """One row per (path, array | reason) of `batch`, in order; the arrays in one forward."""
    good = [x for _, x in batch if not isinstance(x, str)]
    scores = predictor.scores(np.stack(good), tta) if good else np.zeros((0, 0), np.float32)  # (B, K)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (B, k)
    names = predictor.class_names
    rows, g = [], 0
    for path, x in batch:
        if isinstance(x, str):
            rows.append({"path": str(path), "error": x})
            continue
        best = [{"label": names[i], "score": float(scores[g, i])} for i in top[g]]
        rows.append({"path": str(path), "label": best[0]["label"], "score": best[0]["score"], "top": best})
        g += 1
    return rows


def predict_rows(
    predictor: Predictor,
    files: Sequence[Path],
    top_k: int = 1,
    batch_size: int = 32,
    workers: int | None = None,
    tta: bool = False,
) -> Iterator[dict]:
    """Top-k classes of each file, one row per file as it comes; unreadable files get an `error` row.

    `tta`: each image's scores are the mean over it and its mirror image (`Predictor.scores`).
    """
    from finetune.data.loader import default_workers

    read = ArrayReader(predictor.preprocessing)
    k = max(1, min(top_k, len(predictor.class_names)))
    workers = default_workers() if workers is None else workers
    shown = len(files) if len(files) > batch_size else 0  # a bar only when there are many
    with progress_bar("predicting", total=shown, unit="img") as bar:
        batch: list = []
        for item in _read_ahead(read, files, workers, depth=2 * batch_size):
            batch.append(item)
            if len(batch) == batch_size:
                yield from _rows(predictor, batch, k, tta)
                bar.advance(len(batch))
                batch = []
        if batch:
            yield from _rows(predictor, batch, k, tta)
            bar.advance(len(batch))


class CsvRows:
    """Rows to a CSV file as they come: path, label, score (then label_2, score_2, ... for top-k), error."""

    def __init__(self, path: str | os.PathLike, top_k: int) -> None:
        try:
            self.fh = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 — closed by close()
        except OSError as err:
            raise DataError(f"cannot write {path} ({err.strerror})", "give --csv a writable place") from None
        self.writer = csv.writer(self.fh)
        extra = [c for n in range(2, top_k + 1) for c in (f"label_{n}", f"score_{n}")]
        self.writer.writerow(["path", "label", "score", *extra, "error"])
        self.top_k = top_k

    def write(self, row: dict) -> None:
        if "error" in row:
            self.writer.writerow([row["path"], *[""] * (2 * self.top_k), row["error"]])
            return
        cells = [c for t in row["top"] for c in (t["label"], f"{t['score']:.6g}")]
        cells += [""] * (2 * self.top_k - len(cells))
        self.writer.writerow([row["path"], *cells, ""])

    def close(self) -> None:
        self.fh.close()


def stream(
    paths: Sequence[str | os.PathLike],
    run_dir: str | os.PathLike | None = None,
    top_k: int = 1,
    runs_root: str | os.PathLike = "runs",
    device: str = "auto",
    csv_file: str | os.PathLike | None = None,
    batch_size: int = 32,
    tta: bool = False,
) -> Prediction:
    """`finetune predict`: rows as they come (also to `csv_file`); a DataError after the last row
    when no file at all could be classified. `tta`: average each image with its mirror image."""
    files = expand_paths(paths)
    predictor = open_predictor(run_dir, runs_root, device)
    writer = CsvRows(csv_file, max(1, min(top_k, len(predictor.class_names)))) if csv_file else None

    def rows() -> Iterator[dict]:
        classified = 0
        try:
            for row in predict_rows(predictor, files, top_k, batch_size, tta=tta):
                classified += "error" not in row
                if writer is not None:
                    writer.write(row)
                yield row
        finally:
            if writer is not None:
                writer.close()
        if classified == 0:
            raise DataError(
                f"none of the {len(files)} file(s) could be classified", "see the reasons above each path"
            )

    return Prediction(predictor.source, predictor.score_kind, rows(), predictor.class_names)


def predict(
    paths: Sequence[str | os.PathLike],
    run_dir: str | os.PathLike | None = None,
    top_k: int = 1,
    runs_root: str | os.PathLike = "runs",
    batch_size: int = 32,
    device: str = "auto",
    tta: bool = False,
) -> Prediction:
    """Top-k classes of each image, all rows in a list; unreadable files get a row with an `error`.

    `tta`: each image's scores are the mean over it and its mirror image.
    """
    files = expand_paths(paths)
    predictor = open_predictor(run_dir, runs_root, device)
    rows = list(predict_rows(predictor, files, top_k, batch_size, tta=tta))
    return Prediction(predictor.source, predictor.score_kind, rows, predictor.class_names)
