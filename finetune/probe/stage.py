"""The stage-probe method: a probe head on every stage's pooled output; keep the best stage.

For data far from ImageNet the early stages (edges, textures) transfer better than the
ImageNet-specific top. One pass over the images reads every stage tap (`features.extract_taps`),
a head is fitted per stage on the training split, and the stage is chosen the way C is: by its
head's cross-validated accuracy on the training split, ties going to the later stage (on a
handful of images many stages tie, and the later ones carry more features that generalize).
The validation split chooses nothing, so its accuracy stays an honest estimate; it is shown
per stage for information. The saved model is the network cut at that stage plus the folded
head — the same artifact as a linear probe, so `predict`, `evaluate` and `export` work unchanged.
"""

from __future__ import annotations

import logging
import time

from finetune.console import text_table
from finetune.errors import DataError
from finetune.features.extract import Features
from finetune.method import Outcome, RunContext
from finetune.probe.linear import (
    evaluate_split,
    extract_all,
    fit_probe_head,
    head_and_timing,
    model_tensors,
    ran_on,
)

log = logging.getLogger(__name__)


def stage_taps(backbone) -> list[str]:
    """Stage outputs and the pooled top: what stage-probe compares (DeCAF's fc6/fc7 included)."""
    return [t for t in backbone.tap_names if t != "stem"]


def choose_stage(rows: list[dict]) -> str:
    """The stage with the best cross-validated accuracy; ties (and no CV at all) go to the later stage."""
    ranked = [
        (round(r["cv_accuracy"] if r["cv_accuracy"] is not None else -1.0, 9), k) for k, r in enumerate(rows)
    ]
    return rows[max(ranked)[1]]["stage"]


def _table(rows: list[dict], best: str) -> str:
    """The per-stage table as aligned text, the chosen stage marked (C, or k for a kNN head)."""
    knob = "k" if "k" in rows[0] else "C"
    cells = [
        [
            r["stage"],
            r["dim"],
            "-" if r["cv_accuracy"] is None else f"{r['cv_accuracy']:.4f}",
            f"{r['accuracy']:.4f}",
            f"{r[knob]:g}",
            "<- chosen" if r["stage"] == best else "",
        ]
        for r in rows
    ]
    return text_table(["stage", "dim", "cv accuracy", "val accuracy", knob, ""], cells, right=(1, 2, 3, 4))


def stage_probe(ctx: RunContext) -> Outcome:
    recipe = ctx.recipe
    candidates = stage_taps(ctx.backbone)
    t0 = time.perf_counter()
    feats = extract_all(ctx, candidates, f"features ({len(candidates)} stages)")
    t1 = time.perf_counter()
    first = feats[candidates[0]]
    if not ctx.positions("val"):
        raise DataError(
            "stage-probe needs a validation split to choose a stage",
            "keep --val-fraction above 0, or add a val/ folder",
        )

    # A one-value C grid is given twice so the head is still cross-validated: that score picks the stage.
    grid = recipe.c_grid if len(recipe.c_grid) > 1 else recipe.c_grid * 2
    rows, fitted = [], {}
    for tap in candidates:
        f: Features = feats[tap]
        train = f.subset(ctx.positions("train"))
        head = fit_probe_head(train.x, train.labels, recipe.head, grid, recipe.seed, ctx.options.cache)
        acc, _ = evaluate_split(ctx, f, "val", head)
        rows.append(
            {
                "stage": tap,
                "dim": int(train.x.shape[1]),
                "cv_accuracy": head.cv_accuracy,
                "accuracy": acc["accuracy"],
                **head.choice,
            }
        )
        fitted[tap] = head
    t2 = time.perf_counter()
    best = choose_stage(rows)
    if all(r["cv_accuracy"] is None for r in rows):
        log.info("too few training images per class for cross-validation: keeping the top stage")
    log.info(
        f"per-stage probe, {recipe.head} head (cross-validated on train; validation for information):\n"
        + _table(rows, best)
    )
    log.info(f"keeping {best}: the network is cut there")

    head = fitted[best]
    metrics: dict = {"stages": rows, "best_stage": best}
    predictions: list[dict] = []
    for split in ("val", "test"):
        if ctx.positions(split):
            metrics[split], preds = evaluate_split(ctx, feats[best], split, head)
            predictions += preds
    metrics.update(head_and_timing(head, first, (t0, t1, t2)))
    tensors = model_tensors(ctx, best, head)
    return Outcome(tensors, best, head.kind, metrics, predictions, {**ran_on(ctx, first), **head.extra})
