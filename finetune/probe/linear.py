"""The probe method: frozen features -> linear head (sklearn's objective) -> folded into the saved model.

`linear-probe` reads one tap (the pooled penultimate layer by default); `stage-probe`
reads the pooled output of every stage, keeps the stage whose head does best on the
validation split, and cuts the network there.

Everything after the features is numpy: with every feature and the cut network's tensors in
the cache (`features.py`), a re-run neither builds the network nor imports torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finetune.errors import DataError
from finetune.features.cache import trunk_tensors
from finetune.features.extract import Features, extract_taps
from finetune.method import Outcome, RunContext
from finetune.metrics import classification_metrics
from finetune.probe.heads import fold, temperature
from finetune.probe.remembered import fit_head_remembered

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeHead:
    """A fitted probe head of any kind: what the saved model's head holds and computes, and what the
    run records about it. `scores` is the numpy twin of the saved head (probabilities, or SVM scores)."""

    kind: str  # "logreg" | "svm" | "knn"
    tensors: dict[str, np.ndarray]  # the Classifier's "head.*" entries
    scores: Callable[[np.ndarray], np.ndarray]  # features (N, D) -> (N, K), as predict reports them
    choice: dict  # what cross-validation chose: {"C": 0.1} or {"k": 5}
    cv_scores: dict  # candidate -> mean CV accuracy ({} without CV)
    n_folds: int  # 0: too few images per class for cross-validation
    extra: dict = field(default_factory=dict)  # config.json's extra (a kNN head's k and bank size)

    @property
    def cv_accuracy(self) -> float | None:
        return max(self.cv_scores.values()) if self.cv_scores else None

    @property
    def setting(self) -> str:
        return ", ".join(f"{k} = {v:g}" for k, v in self.choice.items())


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) scores, in float64."""
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _linear_head(
    x: np.ndarray, y: np.ndarray, kind: str, c_grid: tuple[float, ...], seed: int, remember: bool
) -> ProbeHead:
    """Logistic regression or linear SVM, folded into one nn.Linear (`heads.fold`); `remember`:
    a head fitted before on the same features is read from the cache (`probe.remembered`)."""
    head = fit_head_remembered(x, y, kind=kind, c_grid=c_grid, seed=seed, remember=remember)
    w, b = fold(head)

    def scores(f: np.ndarray) -> np.ndarray:
        z = f @ w.T + b  # (N, K) float32, what the saved nn.Linear computes
        return z if kind == "svm" else softmax(z)

    cv = {f"{c:g}": s for c, s in head.cv_scores.items()}
    return ProbeHead(kind, {"head.weight": w, "head.bias": b}, scores, {"C": head.C}, cv, head.n_folds)


def _knn_head(
    x: np.ndarray, y: np.ndarray, kind: str, c_grid: tuple[float, ...], seed: int, remember: bool
) -> ProbeHead:
    """Cosine k-nearest neighbours on the training features (`probe/knn.py`); c_grid and remember
    are not used (the fit is a GridSearchCV over k, and the head is its training features)."""
    from finetune.probe.knn import fit_knn, knn_proba, knn_tensors

    knn = fit_knn(x, y, seed=seed)
    bank, onehot = knn_tensors(knn)
    extra = {"knn": {"k": knn.k, "bank": int(bank.shape[0])}}
    cv = {str(k): s for k, s in knn.cv_scores.items()}
    return ProbeHead(
        "knn",
        {"head.bank": bank, "head.onehot": onehot},
        lambda f: knn_proba(knn, f),
        {"k": knn.k},
        cv,
        knn.n_folds,
        extra,
    )


# The recipe's `head` -> how it is fitted (recipes.CHOICES["head"] names the same kinds).
PROBE_HEADS: dict[str, Callable[..., ProbeHead]] = {
    "logreg": _linear_head,
    "svm": _linear_head,
    "knn": _knn_head,
}


def fit_probe_head(
    x: np.ndarray, y: np.ndarray, kind: str, c_grid: tuple[float, ...], seed: int, remember: bool = False
) -> ProbeHead:
    """The recipe's head on training features x (N, D), labels y (N,); its choice by stratified CV.

    `remember` (the run's cache is on): a linear head fitted before on the same data is read back.
    """
    return PROBE_HEADS[kind](x, y, kind, c_grid, seed, remember)


def _say_fit(ctx: RunContext, head: ProbeHead) -> None:
    if head.n_folds == 0:
        log.info(f"too few images per class for cross-validation: using {head.setting}")
    else:
        log.info(f"head: {head.kind}, {head.setting} chosen by {head.n_folds}-fold cross-validation")


def evaluate_split(ctx: RunContext, feats: Features, split: str, head: ProbeHead) -> tuple[dict, list[dict]]:
    """Metrics and per-image predictions of the fitted head on one split."""
    sub = feats.subset(ctx.positions(split))
    scores = head.scores(sub.x)  # (N, K)
    pred = scores.argmax(1)
    metrics = classification_metrics(sub.labels, pred, ctx.index.classes, scores)
    rows = [
        {
            "path": ctx.index.paths[int(p)],
            "split": split,
            "label": ctx.index.classes[int(t)],
            "pred": ctx.index.classes[int(k)],
            "score": float(s[k]),
        }
        for p, t, k, s in zip(sub.positions, sub.labels, pred, scores)
    ]
    return metrics, rows


def extract_all(ctx: RunContext, taps: list[str], description: str) -> dict[str, Features]:
    """Features of `taps` for every image of the index, one pass; decode failures recorded in ctx.bad."""
    index = ctx.index
    feats = extract_taps(
        ctx.backbone,
        taps,
        ctx.recipe.pool,
        index,
        range(len(index.paths)),
        ctx.preprocessing,
        batch_size=ctx.recipe.batch_size,
        workers=ctx.options.workers,
        device=ctx.options.device,
        cache=ctx.options.cache,
        description=description,
    )
    first = feats[taps[0]]  # every tap has the same images and failures
    if first.hits:
        log.info(f"feature cache: {first.hits} of {len(index.paths)} images reused")
    ctx.bad.update(first.bad)
    for pos, reason in sorted(first.bad.items()):
        log.info(f"skipped {index.paths[pos]}: {reason}")
    ctx.check_classes()
    return feats


def linear_probe(ctx: RunContext) -> Outcome:
    recipe = ctx.recipe
    t0 = time.perf_counter()
    feats = extract_all(ctx, [recipe.layer], f"features ({recipe.layer})")[recipe.layer]
    t1 = time.perf_counter()
    train = feats.subset(ctx.positions("train"))
    if len(train.x) == 0:
        raise DataError("no training images could be read", "run `finetune check DATA` to see why")
    head = fit_probe_head(
        train.x, train.labels, recipe.head, recipe.c_grid, recipe.seed, remember=ctx.options.cache
    )
    t2 = time.perf_counter()
    _say_fit(ctx, head)
    metrics: dict = {}
    predictions: list[dict] = []
    for split in ("val", "test"):
        if ctx.positions(split):
            metrics[split], rows = evaluate_split(ctx, feats, split, head)
            predictions += rows
    metrics.update(head_and_timing(head, feats, (t0, t1, t2)))
    return Outcome(
        model_tensors(ctx, recipe.layer, head),
        recipe.layer,
        head.kind,
        metrics,
        predictions,
        {**ran_on(ctx, feats), **head.extra},
    )


def model_tensors(ctx: RunContext, tap: str, head: ProbeHead) -> dict:
    """The saved Classifier's tensors: the network cut at `tap` (cached) and the fitted head."""
    trunk = trunk_tensors(ctx.backbone, tap, ctx.recipe.pool, ctx.preprocessing, cache=ctx.options.cache)
    return {**trunk, **head.tensors}


def ran_on(ctx: RunContext, feats: Features) -> dict:
    """config.json's "device": where the network ran, or that it did not run at all."""
    if feats.engine == "cache":
        return {"device": "none (every feature from the cache)"}
    from finetune.runtime import pick_device

    return {"device": str(pick_device(ctx.options.device))}


def head_and_timing(head: ProbeHead, feats: Features, marks: tuple[float, float, float]) -> dict:
    """metrics.json's "head" and "timing" entries; marks = (start, features done, head fitted)."""
    t0, t1, t2 = marks
    n = len(feats.x)
    return {
        "head": {"kind": head.kind, **head.choice, "folds": head.n_folds, "cv_accuracy": head.cv_scores},
        "timing": {
            "extract_s": round(t1 - t0, 3),
            "extract_img_per_s": round(n / max(t1 - t0, 1e-9), 2),
            "cache_hits": feats.hits,
            "engine": feats.engine,
            "fit_s": round(t2 - t1, 3),
            "images": n,
        },
    }


def lpft_head(ctx: RunContext, trunk: Any, device: Any) -> tuple[np.ndarray, np.ndarray, dict]:
    """LP-FT's starting head: a logistic regression on the frozen trunk's training features.

    Fitted on the raw features (`standardize=False`), not folded from standardized ones: folding
    divides by each feature's std, and features that barely vary on eval images get weights in
    the hundreds; once fine-tuning moves them (batch statistics, augmentation) the logits explode
    (measured: loss 150+ on digits). Raw-feature weights stay O(1). The head is then divided by
    the temperature that minimizes fine-tuning's own loss (label smoothing included) on these
    features (`heads.temperature`): the same predictions, without the near-certain logits whose
    loss would push the trunk hardest in the first steps.

    Under torchrun every rank calls it: the extraction is a collective (images sharded, rows
    gathered on every rank, what to extract decided by rank 0), so every rank fits this head on
    the same features and takes the same decisions (`check_classes`); the fine-tuning loop then
    starts every rank from rank 0's weights.

    Returns:
        (W (K, D), b (K,)) float32 for the head's nn.Linear, and what config.json records.
    """
    from finetune.features.cache import FeatureIdentity
    from finetune.features.extract import extract

    recipe = ctx.recipe
    feats = extract(
        trunk,
        ctx.index,
        ctx.positions("train"),
        ctx.preprocessing,
        batch_size=recipe.batch_size,
        workers=ctx.options.workers,
        device=device,
        description="features for the probe head",
        identity=FeatureIdentity.of(ctx.backbone, "pool", recipe.pool, ctx.preprocessing),
        cache=ctx.options.cache,
    )
    ctx.bad.update(feats.bad)
    for pos, reason in sorted(feats.bad.items()):
        log.info(f"skipped {ctx.index.paths[pos]}: {reason}")
    ctx.check_classes()
    head = fit_head_remembered(
        feats.x,
        feats.labels,
        kind="logreg",
        c_grid=recipe.c_grid,
        seed=recipe.seed,
        standardize=False,
        remember=ctx.options.cache,
    )
    w, b = fold(head)
    t = temperature(feats.x @ w.T + b, feats.labels, recipe.label_smoothing)
    w, b = (w / t).astype(np.float32), (b / t).astype(np.float32)
    log.info(f"head seeded by a linear probe (C = {head.C:g}, logits / {t:.3g}) before fine-tuning")
    return w, b, {"C": head.C, "folds": head.n_folds, "temperature": round(t, 4)}
