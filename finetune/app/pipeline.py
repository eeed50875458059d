"""`finetune run`, as a library call: scan, build, apply the recipe's method, write the run folder.

    result = run(RunOptions(data="mydata", strategy="linear-probe"))
    result.run_dir, result.metrics["val"]["accuracy"]

A recipe's `method` picks the function that trains (`METHODS`: the probes of `probe/`, the
fine-tuning loop of `train/`); each returns a `method.Outcome`, so everything after training
(saving, predict, evaluate, export) is shared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.index import DatasetIndex, scan
from finetune.method import Outcome, RunContext, RunOptions
from finetune.recipes import load_recipe

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    index: DatasetIndex
    config: Any  # runs.RunConfig
    bad: dict[int, str]
    main: bool = True  # False on torchrun ranks other than 0: they write and print nothing


def _probe(ctx: RunContext) -> Outcome:
    """One tap (linear-probe), or every stage when the recipe's layer is "all" (stage-probe)."""
    if ctx.recipe.layer == "all":
        from finetune.probe.stage import stage_probe

        return stage_probe(ctx)
    from finetune.probe.linear import linear_probe

    return linear_probe(ctx)


def _finetune(ctx: RunContext) -> Outcome:
    from finetune.train.loop import run_finetune

    return run_finetune(ctx)


METHODS: dict[str, Callable[[RunContext], Outcome]] = {"probe": _probe, "finetune": _finetune}


def resolve_strategy(opts: RunOptions, index: DatasetIndex) -> tuple[str, dict]:
    """'auto' -> the cell `advise` picks (with its reasons); anything else unchanged."""
    if opts.strategy != "auto":
        return opts.strategy, {}
    from finetune.app.advise import advise

    advice = advise(
        index,
        backbone=opts.backbone,
        device=opts.device,
        workers=opts.workers,
        cache=opts.cache,
        weights_file=opts.weights,
        weights_map=opts.weights_map,
    )
    log.info(f"auto: {advice.strategy} — {advice.reason}")
    return advice.strategy, advice.to_dict()


def run(opts: RunOptions) -> RunResult:
    """Train and evaluate one model as `opts` say; write and return its run folder.

    torch is imported by whatever runs a network: a probe whose features and trunk are all in
    the cache (a re-run) fits its head with numpy/scipy and writes the folder without it.
    """
    from finetune.runtime import collective_errors, start_distributed

    dist = start_distributed(opts.device)  # world 1 unless launched by torchrun
    with collective_errors(dist):  # a peer that died or hung: one line on this rank too
        return _run(opts, dist)


def _run(opts: RunOptions, dist) -> RunResult:
    from finetune.app.runfolder import RunConfig, is_run, new_run_dir, save_run
    from finetune.io import versions, write_json
    from finetune.models.backbone import open_backbone
    from finetune.runtime import shared_path, stop_distributed

    started = time.perf_counter()
    resumed = None
    if opts.resume is not None:
        from finetune.train.checkpoint import resume_options

        # the interrupted run's own backbone, split and recipe; "already finished" once its folder is complete
        opts, resumed = resume_options(opts, dist, complete=is_run)
    else:
        load_recipe(
            opts.strategy if opts.strategy != "auto" else "linear-probe", opts.recipe_file, opts.overrides
        )
    index = scan(opts.data, val_fraction=opts.val_fraction, seed=opts.seed, labels_csv=opts.labels_csv)
    strategy, advice = resolve_strategy(opts, index)
    recipe = resumed or load_recipe(strategy, opts.recipe_file, opts.overrides)
    bb = open_backbone(
        opts.backbone,
        pretrained=opts.pretrained,
        weights_file=opts.weights,
        weights_map=opts.weights_map,
        cards=opts.cache,
        seed=recipe.seed,
    )
    pre = bb.preprocessing if not recipe.image_size else bb.preprocessing.with_size(recipe.image_size)
    # Under torchrun, probes shard the extraction (features/extract.py) and every rank fits the same
    # head; fine-tuning trains data-parallel (train/loop.py). Rank 0 alone writes the run folder.
    if opts.resume is not None:
        run_dir = Path(opts.resume)
    else:
        run_dir = shared_path(new_run_dir(opts.out, opts.backbone, recipe.name) if dist.main else None, dist)
    ctx = RunContext(index, bb, pre, recipe, run_dir, opts)
    outcome = METHODS[recipe.method](ctx)
    if not dist.main:
        stop_distributed()
        return RunResult(run_dir, outcome.metrics, index, None, dict(ctx.bad), main=False)

    metrics = dict(outcome.metrics)
    metrics["headline"] = "test" if "test" in metrics else "val"
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    config = RunConfig(
        backbone=opts.backbone,
        model=bb.spec.model,
        tap=outcome.tap,
        pool=recipe.pool,
        class_names=index.classes,
        preprocessing=pre,
        strategy=recipe.name,
        head_kind=outcome.head_kind,
        weights=bb.weights.to_dict(),
        recipe=recipe.to_dict(),
        data={
            "root": str(index.root),
            "layout": index.layout,
            "counts": {s: index.counts(s) for s in ("train", "val", "test") if index.has(s)},
            "skipped": len(index.problems) + len(ctx.bad),
            "ignored": len(index.ignored),
        },
        versions=versions(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        extra={**outcome.extra, **({"advice": advice} if advice else {})},
    )
    save_run(run_dir, outcome.tensors, config)
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "split.json", index.split_dict())
    report = index.report_dict()
    report["skipped"] += [{"path": index.paths[i], "reason": r} for i, r in sorted(ctx.bad.items())]
    write_json(run_dir / "problems.json", report)
    if outcome.predictions:
        write_json(run_dir / "predictions.json", outcome.predictions)
    stop_distributed()
    _write_report(run_dir)
    if recipe.method == "finetune" and not opts.keep_checkpoints:
        _drop_checkpoint(run_dir)  # the folder is complete: nothing left to resume
    return RunResult(run_dir, metrics, index, config, dict(ctx.bad))


def _drop_checkpoint(run_dir: Path) -> None:
    """Remove a finished fine-tune's checkpoint/ (tens of MB); `--keep-checkpoints` keeps it."""
    import shutil

    from finetune.train.checkpoint import CHECKPOINT_DIR

    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)


def _write_report(run_dir: Path) -> None:
    """report.html + figures/ from the files just written; a plotting failure never loses the run."""
    try:
        from finetune.app.report import write_report

        write_report(run_dir)
    except Exception as err:  # noqa: BLE001 — the model and metrics are saved; the report is a view of them
        log.warning(
            f"report.html not written ({type(err).__name__}: {err}); the run folder is complete without it"
        )
