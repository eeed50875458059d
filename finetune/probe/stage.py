"""The stage-probe method: a linear head on every stage's pooled output; keep the best stage.

For data far from ImageNet the early stages (edges, textures) transfer better than the
ImageNet-specific top. One pass over the images reads every stage tap (`features.extract_taps`),
a head is fitted per stage on the training split, and the stage whose head scores best on the
validation split wins (ties go to the earlier, cheaper stage). The saved model is the network
cut at that stage plus the folded head — the same artifact as a linear probe, so `predict`,
`evaluate` and `export` work unchanged.
"""

from __future__ import annotations

import logging
import time

from finetune.console import text_table
from finetune.errors import DataError
from finetune.features.extract import Features
from finetune.method import Outcome, RunContext
from finetune.probe.heads import fit_head, fold
from finetune.probe.linear import evaluate_split, extract_all, head_and_timing, model_tensors, ran_on

log = logging.getLogger(__name__)


def stage_taps(backbone) -> list[str]:
    """Stage outputs and the pooled top: what stage-probe compares (DeCAF's fc6/fc7 included)."""
    return [t for t in backbone.tap_names if t != "stem"]


def _table(rows: list[dict]) -> str:
    """The per-stage table as aligned text, the kept stage marked."""
    best = max(rows, key=lambda r: r["accuracy"])  # the first of equals, as stage_probe keeps
    cells = [
        [r["stage"], r["dim"], f"{r['accuracy']:.4f}", f"{r['C']:g}", "<- kept" if r is best else ""]
        for r in rows
    ]
    return text_table(["stage", "dim", "val accuracy", "C", ""], cells, right=(1, 2, 3))


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

    rows, fitted = [], {}
    for tap in candidates:
        f: Features = feats[tap]
        train = f.subset(ctx.positions("train"))
        head = fit_head(train.x, train.labels, kind=recipe.head, c_grid=recipe.c_grid, seed=recipe.seed)
        folded = fold(head)
        acc, _ = evaluate_split(ctx, f, "val", folded, head.kind)
        rows.append({"stage": tap, "dim": int(train.x.shape[1]), "accuracy": acc["accuracy"], "C": head.C})
        fitted[tap] = (head, folded)
    t2 = time.perf_counter()
    best = max(rows, key=lambda r: r["accuracy"])["stage"]  # max keeps the first of equals: the earlier stage
    log.info("per-stage linear probe (validation accuracy):\n" + _table(rows))
    log.info(f"keeping {best}: the network is cut there")

    head, folded = fitted[best]
    metrics: dict = {"stages": rows, "best_stage": best}
    predictions: list[dict] = []
    for split in ("val", "test"):
        if ctx.positions(split):
            metrics[split], preds = evaluate_split(ctx, feats[best], split, folded, head.kind)
            predictions += preds
    metrics.update(head_and_timing(head, first, (t0, t1, t2)))
    tensors = model_tensors(ctx, best, folded)
    return Outcome(tensors, best, head.kind, metrics, predictions, ran_on(ctx, first))
