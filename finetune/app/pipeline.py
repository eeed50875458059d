"""`finetune run`, as a library call: scan, build, apply the recipe's method, write the run folder.

    result = run(RunOptions(data="mydata", strategy="linear-probe"))
    result.run_dir, result.metrics["val"]["accuracy"]
    found = lr_find(RunOptions(data="mydata", strategy="partial-finetune"))   # `finetune lr-find`
    found.test.suggested, found.folder                                       # lr-find.csv, lr-find.png

`--set lr=auto` runs the range test (`train/lrfind.py`) on the same data, backbone and recipe
before training and trains with its suggestion, which the run folder records as the recipe's lr
(config.json, and run.toml: the resolved run, which `finetune run --config RUN/run.toml` repeats).

A recipe's `method` picks the function that trains (`METHODS`: the probes of `probe/`, the
fine-tuning loop of `train/`); each returns a `method.Outcome`, so everything after training
(saving, predict, evaluate, export) is shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.index import DatasetIndex, scan
from finetune.errors import BackboneError, FinetuneError, RecipeError, RunError
from finetune.method import Outcome, RunContext, RunOptions
from finetune.recipes import load_recipe, override_keys

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

# auto's cells where the rule of thumb is measured rather than trusted: the chosen recipe runs, a
# cheaper one runs beside it on the same split, and the better on validation is kept (`_versus`).
RIVALS = {"full-finetune": "stage-probe"}


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
        offline=opts.offline,
    )
    log.info(f"auto: {advice.strategy} — {advice.reason}")
    return advice.strategy, advice.to_dict()


def check_options(opts: RunOptions) -> RunOptions:
    """Refuse impossible settings before any work: the device, numbers out of range, options the
    recipe would ignore, an output folder inside DATA or not writable, an image size the backbone
    cannot take. Returns `opts` with the cache turned off when it cannot be written (said once).
    """
    from finetune.data.places import outside_data, writable_place
    from finetune.io import cache_writable
    from finetune.models.catalogue import ALIASES
    from finetune.recipes import MAX_SEED
    from finetune.runtime import check_device
    from finetune.train.logs import check_logs

    device = check_device(opts.device)
    if opts.workers is not None and opts.workers < 0:
        raise FinetuneError(f"--workers {opts.workers} is negative", "use 0 (decode in this process) or more")
    if not 0 <= opts.seed <= MAX_SEED:
        raise FinetuneError(f"--seed {opts.seed} is out of range", f"use an integer from 0 to {MAX_SEED}")
    if opts.weights is None and opts.weights_map != "name":
        raise FinetuneError("--weights-map applies to a --weights file, and none was given", "drop it")
    spec = ALIASES.get(opts.backbone.strip())  # (framework names are checked once opened, importing timm)
    auto = opts.strategy == "auto"  # its recipe is known after `advise`: values are checked now, use then
    recipe = load_recipe(
        "linear-probe" if auto else opts.strategy, opts.recipe_file, opts.overrides, not auto
    )
    logs = check_logs(opts.log)
    if not auto and "tensorboard" in logs and recipe.is_probe:
        raise FinetuneError(
            f"--log tensorboard: not used by the {recipe.name} recipe, which takes no training steps",
            "drop it, or choose partial-finetune or full-finetune",
        )
    if spec is not None:
        check_image_size(recipe, spec)
    if not auto and opts.compile and recipe.is_probe:
        raise FinetuneError(
            f"--compile: not used by the {recipe.name} recipe, which runs the network only to extract "
            "features",
            "drop --compile, or choose partial-finetune or full-finetune",
        )
    if opts.resume is None:
        outside_data(opts.out, opts.data)
        writable_place(opts.out)
    cache = opts.cache and cache_writable()
    return dataclasses.replace(opts, device=device, cache=cache, log=logs)


def scan_data(opts: RunOptions, dist) -> DatasetIndex:
    """The index of `opts.data` as the run sees it (headers that passed before are not read again),
    its warnings said once (by the main process).

    A --val-fraction other than the default, where the data brings its own validation split, has
    no effect: that is said among the warnings rather than ignored.
    """
    index = scan(opts.data, opts.val_fraction, opts.seed, opts.labels_csv, remember=opts.cache)
    default = next(f.default for f in dataclasses.fields(RunOptions) if f.name == "val_fraction")
    if index.val_fraction is None and opts.val_fraction != default:
        where, instead = (
            ("the labels CSV's split column", "leave that column empty")
            if index.layout == "csv"
            else ("its val/ folder", "put those images in train/")
        )
        unused = (
            f"--val-fraction {opts.val_fraction:g} is not used: {index.root.name} has its own validation "
            f"split ({where}); drop the option, or {instead} to have a split made"
        )
        index = dataclasses.replace(index, warnings=(*index.warnings, unused))
    if dist.main:
        for warning in index.warnings:
            log.warning(warning)
    return index


def check_image_size(recipe, spec) -> None:
    """A recipe's `image_size` must be one the backbone accepts (0: the weights' own size)."""
    if recipe.image_size and recipe.image_size < spec.min_input:
        raise RecipeError(
            f"image_size {recipe.image_size} is below what {spec.name} accepts ({spec.min_input} px)",
            f"use --set image_size={spec.min_input} or more, or 0 for the weights' own size",
        )


def run(opts: RunOptions) -> RunResult:
    """Train and evaluate one model as `opts` say; write and return its run folder.

    torch is imported by whatever runs a network: a probe whose features and trunk are all in
    the cache (a re-run) fits its head with numpy/scipy and writes the folder without it.
    A run that fails leaves no run folder behind (unless it holds a checkpoint to resume).
    """
    from finetune.runtime import check_device, collective_errors, start_distributed

    started = time.perf_counter()
    dist = start_distributed(check_device(opts.device))  # world 1 unless launched by torchrun
    with collective_errors(dist):  # a peer that died or hung: one line on this rank too
        return _run(opts, dist, started)


def _run(opts: RunOptions, dist, started: float) -> RunResult:
    resumed = None
    if opts.resume is not None:
        from finetune.app.runfolder import is_run
        from finetune.train.checkpoint import resume_options

        # the interrupted run's own options and recipe; "already finished" once its folder is complete
        opts, resumed = resume_options(opts, dist, complete=is_run)
    opts = check_options(opts)
    index = scan_data(opts, dist)
    strategy, advice = resolve_strategy(opts, index)
    if resumed is not None:
        recipe = resumed
    else:
        recipe = load_recipe(strategy, opts.recipe_file, opts.overrides, strict=opts.strategy != "auto")
        unused = [k for k in override_keys(opts.overrides) if k not in recipe.keys]
        unused += ["--compile"] if opts.compile and recipe.is_probe else []
        unused += ["--log tensorboard"] if "tensorboard" in opts.log and recipe.is_probe else []
        if unused:  # auto chose a recipe the user could not know: say what it leaves out, once
            log.warning(f"auto chose {recipe.name}, which does not use {', '.join(unused)}: ignored")
    return _train_and_save(opts, index, recipe, advice, started, dist)


def open_network(opts: RunOptions, recipe):
    """(the backbone `opts` names, opened, and its preprocessing at the recipe's image size)."""
    from finetune.models.backbone import open_backbone

    bb = open_backbone(
        opts.backbone,
        pretrained=opts.pretrained,
        weights_file=opts.weights,
        weights_map=opts.weights_map,
        cards=opts.cache,
        seed=recipe.seed,
        offline=opts.offline,
    )
    check_image_size(recipe, bb.spec)
    pre = bb.preprocessing if not recipe.image_size else bb.preprocessing.with_size(recipe.image_size)
    return bb, pre


def _train_and_save(opts, index: DatasetIndex, recipe, advice: dict, started: float, dist) -> RunResult:
    from finetune.app.runfolder import RunConfig, new_run_dir, save_run
    from finetune.io import versions, write_json
    from finetune.runconfig import write_run_toml
    from finetune.runtime import all_gather_json, shared_path, stop_distributed

    bb, pre = open_network(opts, recipe)
    if recipe.is_probe and recipe.layer != "all" and recipe.layer not in bb.tap_names:
        raise BackboneError(
            f"--set layer={recipe.layer}: {opts.backbone} has no such tap",
            f"choose one of {', '.join(bb.tap_names)}, or all (stage-probe)",
        )
    # Under torchrun, probes shard the extraction (features/extract.py) and every rank fits the same
    # head; fine-tuning trains data-parallel (train/loop.py). Rank 0 alone writes the run folder.
    out_existed = Path(opts.out).exists()
    if opts.resume is not None:
        run_dir = Path(opts.resume)
    else:
        run_dir = shared_path(new_run_dir(opts.out, opts.backbone, recipe.name) if dist.main else None, dist)
    try:
        ctx = RunContext(index, bb, pre, recipe, run_dir, opts)
        found = {}
        if recipe.lr == "auto":  # before anything reads the lr (for_world multiplies it)
            ctx, found = _auto_lr(ctx, dist)
            recipe = ctx.recipe
        outcome = METHODS[recipe.method](ctx)
        rival = RIVALS.get(recipe.name) if advice and opts.resume is None else None
        if rival:  # every rank: the rival's extraction is a collective under torchrun
            outcome, ctx = _versus(ctx, outcome, rival, dist.main)
            recipe = ctx.recipe
        # each rank decoded its own shard of the training images: the folder names every file skipped
        for bad in all_gather_json({str(pos): why for pos, why in ctx.bad.items()}, dist):
            ctx.bad.update({int(pos): why for pos, why in bad.items()})
        if not dist.main:
            stop_distributed()
            return RunResult(run_dir, outcome.metrics, index, None, dict(ctx.bad), main=False)

        final = index.without(ctx.bad)  # what was used: split.json, counts and report agree with `check`
        metrics = dict(outcome.metrics)
        metrics["headline"] = "test" if "test" in metrics else "val"
        metrics["headline_label"] = metrics["headline"]
        if metrics["headline"] == "val" and (recipe.selects_on_val or rival):
            metrics["headline_label"] = "val (used for selection)"
        metrics["seconds"] = round(time.perf_counter() - started, 3)
        report = final.report_dict()
        if final.leaks:
            line = _leak_warning(final)
            log.warning(line)
            report["warnings"].append(line)
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
                "counts": {s: final.counts(s) for s in ("train", "val", "test") if final.has(s)},
                "skipped": len(final.problems),
                "ignored": len(final.ignored),
            },
            versions=versions(),
            created=time.strftime("%Y-%m-%dT%H:%M:%S"),
            extra={**outcome.extra, **({"advice": advice} if advice else {}), **found},
        )
        if rival and recipe.name == rival:  # auto kept the rival
            run_dir = _renamed(run_dir, opts, recipe.name)  # named after the model it holds
        save_run(run_dir, outcome.tensors, config)
        write_run_toml(run_dir, opts, recipe)  # `run --config RUN/run.toml` trains it again
        write_json(run_dir / "metrics.json", metrics)
        write_json(run_dir / "split.json", final.split_dict())
        write_json(run_dir / "problems.json", report)
        if outcome.predictions:
            write_json(run_dir / "predictions.json", outcome.predictions)
    except BaseException as err:
        if dist.main and opts.resume is None:
            _discard(run_dir, Path(opts.out), out_existed)
        if isinstance(err, OSError) and err.errno in _CANNOT_WRITE:
            raise RunError(
                f"cannot write the run folder {run_dir}: {err.strerror}",
                "free some space, or pass -o a folder on another disk",
            ) from None
        raise
    stop_distributed()
    _write_report(run_dir)
    if not opts.keep_checkpoints:
        _drop_checkpoint(run_dir)  # a fine-tune's folder is complete: nothing left to resume
    return RunResult(run_dir, metrics, final, config, dict(ctx.bad))


def _versus(ctx: RunContext, outcome: Outcome, rival: str, main: bool) -> tuple[Outcome, RunContext]:
    """auto, a lot of data unlike ImageNet: the fine-tune beside a stage-probe of the same split;
    the better validation accuracy is kept (ties: the fine-tune), and `extra.auto` records both.

    The rule of thumb says fine-tune; measured on the style-shift set of `benchmarks/transfer.py`
    (letters a-j, trained in sans-serif faces, validated in serif faces, lite0 at 64 px), the
    full fine-tune reached 0.75 and a stage-probe 0.855 (stage5), the linear probe 0.73. The
    stage-probe costs one extraction of every stage, little beside a fine-tune, so auto measures
    both instead of trusting the table. With the same `--set` values where the rival uses them.
    The headline then reads "val (used for selection)": validation chose between them.
    """
    rival_recipe = load_recipe(rival, None, ctx.options.overrides, strict=False)
    rival_ctx = dataclasses.replace(ctx, recipe=rival_recipe)
    log.info(f"auto: measuring {rival} beside {ctx.recipe.name} on the same split")
    challenger = METHODS[rival_recipe.method](rival_ctx)
    scores = {
        ctx.recipe.name: outcome.metrics.get("val", {}).get("accuracy"),
        rival: challenger.metrics.get("val", {}).get("accuracy"),
    }
    if scores[rival] is None or scores[ctx.recipe.name] is None or scores[rival] <= scores[ctx.recipe.name]:
        kept, result, kept_ctx = ctx.recipe.name, outcome, ctx
    else:
        kept, result, kept_ctx = rival, challenger, rival_ctx
        if "device" in outcome.extra:  # the run trained there, even if the rival read every feature
            result.extra["device"] = outcome.extra["device"]
        if main:  # rank 0 writes the run folder
            _set_aside(ctx.run_dir, ctx.recipe.name)
    said = ", ".join(f"{name} {acc:.4f}" for name, acc in scores.items() if acc is not None)
    log.info(f"auto: kept {kept} (validation accuracy: {said})")
    result.extra["auto"] = {"compared": scores, "kept": kept}
    return result, kept_ctx


def _set_aside(run_dir: Path, name: str) -> None:
    """The losing fine-tune's history.csv as `<name>-history.csv`: the report draws history.csv
    as the saved model's curves, and these are not."""
    from finetune.train.loop import HISTORY_FILE

    with contextlib.suppress(FileNotFoundError):
        (run_dir / HISTORY_FILE).rename(run_dir / f"{name}-{HISTORY_FILE}")


def _renamed(run_dir: Path, opts: RunOptions, strategy: str) -> Path:
    """The run folder renamed after the strategy whose model it holds (a fresh unique name)."""
    from finetune.app.runfolder import new_run_dir

    target = new_run_dir(opts.out, opts.backbone, strategy)  # made empty, so the name is ours
    run_dir.replace(target)
    return target


_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _leak_warning(index: DatasetIndex) -> str:
    """One line for identical files that sit in more than one of the user's train/val/test."""
    first = index.leaks[0]
    example = " = ".join(f"{s}:{p}" for s, p in zip(first.splits, first.paths))
    return (
        f"{len(index.leaks)} group(s) of identical files are in more than one split (e.g. {example}): "
        "validation scores images the model was trained on; list in problems.json"
    )


def _discard(run_dir: Path, out: Path, out_existed: bool) -> None:
    """Remove the folder of a run that failed, unless it holds a checkpoint `--resume` can use."""
    if (run_dir / "checkpoint").exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    if not out_existed:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if empty: made by this run alone


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


# --------------------------------------------------------------------------- the learning-rate range test


@dataclass
class LRFindResult:
    folder: Path  # lr-find.csv and lr-find.png
    test: Any  # train.lrfind.RangeTest
    main: bool = True  # False on torchrun ranks other than 0: they write and print nothing


def lr_find(
    opts: RunOptions, steps: int | None = None, start: float = 1e-7, end: float = 10.0
) -> LRFindResult:
    """`finetune lr-find`: the range test of `opts`' fine-tuning recipe, in a folder under `opts.out`.

    The data, split, backbone and recipe are read as `run` reads them; the folder is
    `<out>/<time>-<backbone>-<recipe>-lr-find/` (never inside DATA), removed if the test fails.

    Raises:
        RecipeError: a probe recipe (it has no learning rate) or --strategy auto.
    """
    from finetune.runtime import check_device, collective_errors, start_distributed

    if opts.strategy == "auto":
        raise RecipeError(
            "lr-find needs a fine-tuning recipe, and auto may choose a probe",
            "use --strategy partial-finetune or full-finetune",
        )
    recipe = load_recipe(opts.strategy, opts.recipe_file, opts.overrides, strict=False)
    if recipe.is_probe:
        raise RecipeError(
            f"lr-find is for fine-tuning: the {recipe.name} recipe fits a head on frozen features, "
            "which has no learning rate",
            "use --strategy partial-finetune or full-finetune",
        )
    dist = start_distributed(check_device(opts.device))
    with collective_errors(dist):
        return _lr_find(check_options(opts), recipe, dist, steps, start, end)


def _lr_find(opts: RunOptions, recipe, dist, steps: int | None, start: float, end: float) -> LRFindResult:
    from finetune.app.runfolder import new_run_dir
    from finetune.runtime import shared_path, stop_distributed
    from finetune.train.lrfind import range_test

    index = scan_data(opts, dist)
    bb, pre = open_network(opts, recipe)
    out_existed = Path(opts.out).exists()
    name = f"{recipe.name}-lr-find"
    folder = shared_path(new_run_dir(opts.out, opts.backbone, name) if dist.main else None, dist)
    try:
        test = range_test(RunContext(index, bb, pre, recipe, folder, opts), steps, start, end)
        if dist.main:
            _write_lr_find(folder, test)
    except BaseException:
        if dist.main:
            _discard(folder, Path(opts.out), out_existed)
        raise
    stop_distributed()
    return LRFindResult(folder, test, dist.main)


def _auto_lr(ctx: RunContext, dist) -> tuple[RunContext, dict]:
    """`--set lr=auto`: the range test on the run's own data, backbone and recipe; the context with
    its suggestion as the recipe's lr, and {"lr_find": summary} for config.json (rank 0 writes the
    points and the figure in the run folder). Every rank runs it and gets the same number."""
    from finetune.train.lrfind import range_test

    test = range_test(ctx)
    if dist.main:
        _write_lr_find(ctx.run_dir, test)
    log.info(f"lr=auto: {test.suggested:g} (lr-find, {test.rule} rule)")
    recipe = dataclasses.replace(ctx.recipe, lr=test.suggested)
    return dataclasses.replace(ctx, recipe=recipe), {"lr_find": test.summary()}


def _write_lr_find(folder: Path, test) -> None:
    """lr-find.csv (every step) and lr-find.png (the curve, the suggestion marked) in `folder`."""
    from finetune.app.figures import figure_bytes, lr_find_figure
    from finetune.io import atomic_write
    from finetune.train.lrfind import FIGURE_FILE, POINTS_FILE, write_points

    write_points(folder / POINTS_FILE, test)
    fig = lr_find_figure(test.lrs, test.losses, test.smoothed, test.suggested, test.divergence_lr, test.rule)
    blob = figure_bytes(fig, "png")
    atomic_write(folder / FIGURE_FILE, lambda fh: fh.write(blob))
