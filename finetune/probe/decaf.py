"""DeCAF-style experiments (Donahue et al. 2014): features of named layers, and linear heads on them.

    summary = extract_to_file(ExtractOptions(data="mydata", backbone="alexnet", layers=("fc6", "fc7"),
                                             out="feats.npz"))
    table = probe_file("feats.npz", heads=("logreg", "svm"), repeats=5)
    table.rows   # [ProbeCell(layer="fc6", head="logreg", accs=[...]), ...]; mean and std per cell

The probe table is what the paper reports: rows are layers, columns are heads, and each cell
is the validation accuracy over `repeats` seeded stratified splits, as mean ± std.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.console import text_table
from finetune.errors import BackboneError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractOptions:
    """Everything `finetune extract-features` takes."""

    data: str | os.PathLike
    out: str | os.PathLike = "features.npz"
    backbone: str = "lite0"
    layers: tuple[str, ...] = ("pool",)
    pool: str = "avg"
    weights: str | os.PathLike | None = None
    weights_map: str = "name"
    pretrained: bool = True
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    cache: bool = True
    val_fraction: float = 0.2
    seed: int = 0
    labels_csv: str | os.PathLike | None = None
    offline: bool = False  # published weights from the caches only


@dataclass
class ExtractSummary:
    out: Path
    shapes: dict[str, tuple[int, ...]]  # per tap, the shape of one row
    images: int
    skipped: dict[str, str]  # relative path -> reason
    seconds: float
    cache_hits: int
    engine: str
    main: bool = True  # False on torchrun ranks other than 0: they write and print nothing


def check_layers(model, layers: Sequence[str]) -> list[str]:
    """The requested taps, or a BackboneError naming the ones that exist."""
    from finetune.models.anatomy import taps

    known = taps(model)
    wrong = [t for t in layers if t not in known]
    if wrong:
        raise BackboneError(
            f"unknown layer {', '.join(map(repr, wrong))} for this backbone",
            f"choose from {', '.join(known)}",
        )
    return list(dict.fromkeys(layers))


def extract_to_file(opts: ExtractOptions) -> ExtractSummary:
    """Extract the features of `opts.layers` for every image of `opts.data` and write one file."""
    from finetune.data.index import scan
    from finetune.features.extract import extract_taps
    from finetune.features.files import check_output, write_features
    from finetune.models.backbone import build
    from finetune.runtime import pick_device, start_distributed, stop_distributed

    if opts.pool not in ("avg", "max", "none"):
        raise DataError(f"unknown pooling {opts.pool!r}", "choose --pool avg, max or none")
    out = check_output(opts.out, opts.data)
    # Under torchrun the images are sharded across ranks and gathered on every rank; rank 0 writes.
    dist = start_distributed(opts.device)
    index = scan(opts.data, opts.val_fraction, opts.seed, opts.labels_csv, remember=opts.cache)
    for problem in index.problems:
        log.info(f"skipped {problem.path}: {problem.reason}")
    bb = build(
        opts.backbone,
        pretrained=opts.pretrained,
        weights_file=opts.weights,
        weights_map=opts.weights_map,
        offline=opts.offline,
    )
    layers = check_layers(bb.model, opts.layers or ("pool",))
    feats = extract_taps(
        bb,
        layers,
        opts.pool,
        index,
        range(len(index.paths)),
        bb.preprocessing,
        batch_size=opts.batch_size,
        workers=opts.workers,
        device=pick_device(opts.device),
        cache=opts.cache,
        description=f"features ({', '.join(layers)})",
    )
    first = feats[layers[0]]
    for pos, reason in sorted(first.bad.items()):
        log.info(f"skipped {index.paths[pos]}: {reason}")
    if len(first.positions) == 0:
        raise DataError(f"no image of {opts.data} could be read", "run `finetune check DATA` to see why")
    rows = [int(p) for p in first.positions]
    arrays = {t: f.x.reshape((len(f.x), *f.shape)) for t, f in feats.items()}
    meta = {
        "backbone": opts.backbone,
        "model": bb.spec.model,
        "weights": bb.weights.to_dict(),
        "pool": opts.pool,
        "preprocessing": bb.preprocessing.to_dict(),
        "data": str(index.root),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if dist.main:
        write_features(
            out,
            arrays,
            first.labels,
            list(index.classes),
            [index.paths[p] for p in rows],
            [index.splits[p] for p in rows],
            meta,
        )
    stop_distributed()
    skipped = {index.paths[p]: r for p, r in first.bad.items()}
    skipped.update({str(p.path): p.reason for p in index.problems})
    return ExtractSummary(
        out,
        {t: f.shape for t, f in feats.items()},
        len(rows),
        skipped,
        first.seconds,
        first.hits,
        first.engine,
        dist.main,
    )


# --------------------------------------------------------------------------- probe on saved features


@dataclass
class ProbeCell:
    layer: str
    head: str
    accs: list[float] = field(default_factory=list)
    Cs: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accs))

    @property
    def std(self) -> float:
        return float(np.std(self.accs))

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "head": self.head,
            "mean": self.mean,
            "std": self.std,
            "accuracies": self.accs,
            "C": self.Cs,
        }


@dataclass
class ProbeTable:
    layers: list[str]
    heads: list[str]
    cells: list[ProbeCell]
    repeats: int
    val_fraction: float
    n_images: int
    n_classes: int

    def cell(self, layer: str, head: str) -> ProbeCell:
        return next(c for c in self.cells if c.layer == layer and c.head == head)

    def format(self) -> str:
        """The DeCAF table as text: rows = layers, columns = heads, cells = accuracy (0-1) mean ± std."""
        rows = [
            [layer] + [f"{c.mean:.4f} ± {c.std:.4f}" for c in (self.cell(layer, h) for h in self.heads)]
            for layer in self.layers
        ]
        title = (
            f"validation accuracy, mean ± std over {self.repeats} stratified splits "
            f"({self.n_images} images, {self.n_classes} classes, {self.val_fraction:.0%} held out)"
        )
        return text_table(["layer", *self.heads], rows, right=range(1, len(self.heads) + 1), title=title)

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "heads": self.heads,
            "repeats": self.repeats,
            "val_fraction": self.val_fraction,
            "images": self.n_images,
            "classes": self.n_classes,
            "cells": [c.to_dict() for c in self.cells],
        }


def probe_features(
    taps: dict[str, np.ndarray],
    labels: np.ndarray,
    layers: Sequence[str],
    heads: Sequence[str] = ("logreg", "svm"),
    repeats: int = 5,
    val_fraction: float = 0.2,
    c_grid: Sequence[float] = (0.001, 0.01, 0.1, 1.0, 10.0),
    seed: int = 0,
) -> ProbeTable:
    """Per layer and head: validation accuracy over `repeats` seeded stratified splits.

    Split r uses seed `seed + r`, the same for every layer and head, so the cells compare
    like with like. C is chosen by cross-validation inside each training split.
    """
    from finetune.data.index import stratified_split
    from finetune.probe.heads import fit_head, scores_numpy

    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any() or (counts > 0).sum() < 2:
        raise DataError(
            "probing needs at least two classes with two images each",
            "extract features from a folder with more images",
        )
    cells = [ProbeCell(layer, head) for layer in layers for head in heads]
    for r in range(repeats):
        split = np.asarray(stratified_split(labels, val_fraction, seed + r))
        tr, va = split == "train", split == "val"
        for cell in cells:
            x = taps[cell.layer].reshape(len(labels), -1)
            head = fit_head(x[tr], labels[tr], kind=cell.head, c_grid=tuple(c_grid), seed=seed + r)
            pred = scores_numpy(head, x[va]).argmax(1)
            cell.accs.append(float((pred == labels[va]).mean()))
            cell.Cs.append(head.C)
        log.info(f"split {r + 1}/{repeats} done")
    return ProbeTable(
        list(layers), list(heads), cells, repeats, val_fraction, len(labels), int((counts > 0).sum())
    )


def probe_file(
    path: str | os.PathLike,
    layers: Sequence[str] = (),
    heads: Sequence[str] = ("logreg", "svm"),
    repeats: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> ProbeTable:
    """`probe_features` on a file of `extract-features`; a file's test split is left out."""
    from finetune.features.files import read_features

    ff = read_features(path)
    layers = list(layers) or list(ff.taps)
    wrong = [t for t in layers if t not in ff.taps]
    if wrong:
        raise DataError(
            f"{path} has no layer {', '.join(map(repr, wrong))}", f"choose from {', '.join(ff.taps)}"
        )
    if repeats < 1:
        raise DataError(f"--repeats must be at least 1, got {repeats}", "e.g. --repeats 5")
    keep = np.asarray([s != "test" for s in ff.splits])
    taps = {t: ff.taps[t][keep] for t in layers}
    return probe_features(taps, ff.labels[keep], layers, heads, repeats, val_fraction, seed=seed)
