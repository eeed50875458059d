"""`finetune run`, as a library call: scan, build, apply the recipe's method, write the run folder.

    result = run(RunOptions(data="mydata", strategy="linear-probe"))
    result.run_dir, result.metrics["val"]["accuracy"]

A recipe's `method` picks the function that trains ("probe" or "finetune"); each returns an
`Outcome` holding the same artifact — the tensors of a `model.Classifier` (trunk + linear head)
— so everything after training (saving, predict, evaluate, export) is shared.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data import DatasetIndex, Preprocessing, scan
from finetune.errors import DataError
from finetune.recipes import Recipe, load_recipe


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _quiet(msg: str) -> None:
    """The log of torchrun ranks other than 0."""


@dataclass(frozen=True)
class RunOptions:
    """Everything `finetune run` takes; recipe settings live in the recipe and `overrides`."""

    data: str | Path
    strategy: str = "linear-probe"
    recipe_file: str | Path | None = None
    overrides: tuple[str, ...] = ()
    backbone: str = "lite0"
    weights: str | Path | None = None
    weights_map: str = "name"
    pretrained: bool = True
    out: str | Path = "runs"
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    labels_csv: str | Path | None = None
    resume: str | Path | None = None
    compile: bool = False
    cache: bool = True


@dataclass
class RunContext:
    """What a method needs: data, network, recipe, where to write, and how to talk."""

    index: DatasetIndex
    backbone: Any  # backbones.Backbone
    preprocessing: Preprocessing
    recipe: Recipe
    run_dir: Path
    options: RunOptions
    log: Callable[[str], None] = _stderr
    bad: dict[int, str] = field(default_factory=dict)  # files that failed to decode, by position

    def positions(self, split: str) -> list[int]:
        """Positions of `split` that decoded."""
        return [i for i in self.index.indices(split) if i not in self.bad]

    def check_classes(self) -> None:
        """After decode failures, every class still needs a training image."""
        have = {self.index.labels[i] for i in self.positions("train")}
        lost = [c for k, c in enumerate(self.index.classes) if k not in have]
        if lost:
            raise DataError(
                f"class {', '.join(lost)} has no readable training image left",
                "see the skipped files listed above and replace them",
            )


@dataclass
class Outcome:
    """What a method produced: the model's tensors and how to describe it."""

    tensors: dict  # the Classifier's state dict ("trunk.*", "head.weight", "head.bias"): torch or numpy
    tap: str
    head_kind: str
    metrics: dict
    predictions: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    index: DatasetIndex
    config: Any  # runs.RunConfig
    bad: dict[int, str]
    main: bool = True  # False on torchrun ranks other than 0: they write and print nothing


def _probe(ctx: RunContext) -> Outcome:
    from finetune.probe import run_probe

    return run_probe(ctx)


def _finetune(ctx: RunContext) -> Outcome:
    from finetune.train import run_finetune  # torch and the training loop: only when training

    return run_finetune(ctx)


METHODS: dict[str, Callable[[RunContext], Outcome]] = {"probe": _probe, "finetune": _finetune}


def resolve_strategy(opts: RunOptions, index: DatasetIndex, log: Callable[[str], None]) -> tuple[str, dict]:
    """'auto' -> the cell `advise` picks (with its reasons); anything else unchanged."""
    if opts.strategy != "auto":
        return opts.strategy, {}
    from finetune.advise import advise

    advice = advise(
        index,
        backbone=opts.backbone,
        device=opts.device,
        workers=opts.workers,
        cache=opts.cache,
        weights_file=opts.weights,
        weights_map=opts.weights_map,
    )
    log(f"auto: {advice.strategy} — {advice.reason}")
    return advice.strategy, advice.to_dict()


def run(opts: RunOptions, log: Callable[[str], None] = _stderr) -> RunResult:
    """Train and evaluate one model as `opts` say; write and return its run folder.

    torch is imported by whatever runs a network: a probe whose features and trunk are all in
    the cache (a re-run) fits its head with numpy/scipy and writes the folder without it.
    """
    from finetune.backbones import open_backbone
    from finetune.dist import shared_path, start_distributed, stop_distributed
    from finetune.runs import RunConfig, new_run_dir, save_run, versions, write_json

    started = time.perf_counter()
    dist = start_distributed(opts.device)  # world 1 unless launched by torchrun
    if not dist.main:
        log = _quiet
    if opts.resume is not None:
        from finetune.train import resume_options

        opts = resume_options(opts, log)  # the interrupted run's own backbone, split and recipe
    load_recipe(
        opts.strategy if opts.strategy != "auto" else "linear-probe", opts.recipe_file, opts.overrides
    )
    index = scan(opts.data, val_fraction=opts.val_fraction, seed=opts.seed, labels_csv=opts.labels_csv)
    strategy, advice = resolve_strategy(opts, index, log)
    recipe = load_recipe(strategy, opts.recipe_file, opts.overrides)
    bb = open_backbone(
        opts.backbone,
        pretrained=opts.pretrained,
        weights_file=opts.weights,
        weights_map=opts.weights_map,
        cards=opts.cache,
        seed=recipe.seed,
    )
    pre = bb.preprocessing if not recipe.image_size else bb.preprocessing.with_size(recipe.image_size)
    # Under torchrun, probes shard the extraction (features.py) and every rank fits the same head;
    # fine-tuning runs DistributedDataParallel (train.py). Rank 0 alone writes the run folder.
    if opts.resume is not None:
        run_dir = Path(opts.resume)
    else:
        run_dir = shared_path(new_run_dir(opts.out, opts.backbone, recipe.name) if dist.main else None, dist)
    ctx = RunContext(index, bb, pre, recipe, run_dir, opts, log)
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
    _write_report(run_dir, log)
    return RunResult(run_dir, metrics, index, config, dict(ctx.bad))


def _write_report(run_dir: Path, log: Callable[[str], None]) -> None:
    """report.html + figures/ from the files just written; a plotting failure never loses the run."""
    try:
        from finetune.report import write_report

        write_report(run_dir)
    except Exception as err:  # noqa: BLE001 — the model and metrics are saved; the report is a view of them
        log(f"report.html not written ({type(err).__name__}: {err}); the run folder is complete without it")
