"""`finetune compare`: several recipes on one split, one table, one accuracy-vs-time plot.

    rows, plot = compare(CompareOptions(data="mydata", strategies=("linear-probe", "stage-probe")))

Every strategy runs through `pipeline.run` with the same data, backbone, split seed and
validation share, so the numbers differ only by recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.console import text_table
from finetune.recipes import STRATEGIES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareOptions:
    data: str | Path
    strategies: tuple[str, ...] = STRATEGIES
    backbone: str = "lite0"
    overrides: tuple[str, ...] = ()
    out: str | Path = "runs"
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    offline: bool = False  # published weights from the caches only


@dataclass(frozen=True)
class CompareRow:
    strategy: str
    accuracy: float
    seconds: float
    img_per_s: float  # training throughput (fine-tuning) or extraction throughput (probes)
    trainable: int  # parameters the recipe trained (head only for probes)
    run_dir: str


def trainable_parameters(model, metrics: dict) -> int:
    """What the recipe trained: the fine-tuning loop counts it; a probe trains only its linear head."""
    if "trainable_params" in metrics.get("train", {}):
        return int(metrics["train"]["trainable_params"])
    return sum(p.numel() for p in model.head.parameters())


def throughput(metrics: dict) -> float:
    """img/s of the method's own work: training epochs (fine-tuning) or feature extraction (probes)."""
    if "img_per_s" in metrics.get("train", {}):
        return float(metrics["train"]["img_per_s"])
    return float(metrics.get("timing", {}).get("extract_img_per_s", 0.0))


def applicable_overrides(strategy: str, overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The `--set` items `strategy`'s recipe uses (`--set epochs=5` is for the fine-tunes only).

    A bad name or value fails here, before any work.
    """
    from finetune.recipes import load_recipe, parse_override

    recipe = load_recipe(strategy, None, overrides, strict=False)
    return tuple(o for o in overrides if parse_override(o)[0][0] in recipe.keys)


def compare(opts: CompareOptions) -> tuple[list[CompareRow], Path]:
    """Run every strategy; write compare.json and compare.png under `opts.out`; return the rows."""
    from finetune.app.pipeline import run
    from finetune.data.places import outside_data, writable_place
    from finetune.errors import RecipeError
    from finetune.io import write_json
    from finetune.method import RunOptions
    from finetune.recipes import override_keys
    from finetune.runtime import check_device

    check_device(opts.device)
    writable_place(outside_data(opts.out, opts.data))
    overrides = {s: applicable_overrides(s, opts.overrides) for s in opts.strategies}
    for key in override_keys(opts.overrides):
        users = [s for s, items in overrides.items() if key in override_keys(items)]
        if not users:
            raise RecipeError(
                f"--set {key}: not used by any of {', '.join(opts.strategies)}",
                "drop it, or add a recipe that uses it",
            )
        if len(users) < len(opts.strategies):
            log.info(f"--set {key} applies to {', '.join(users)} only")
    rows: list[CompareRow] = []
    for s in opts.strategies:
        log.info(f"compare: {s}")
        t0 = time.perf_counter()
        result = run(
            RunOptions(
                data=opts.data,
                strategy=s,
                backbone=opts.backbone,
                overrides=overrides[s],
                out=opts.out,
                val_fraction=opts.val_fraction,
                seed=opts.seed,
                device=opts.device,
                workers=opts.workers,
                offline=opts.offline,
            ),
        )
        seconds = time.perf_counter() - t0
        from finetune.app.runfolder import load_run

        model, _, _ = load_run(result.run_dir)
        rows.append(
            CompareRow(
                s,
                float(result.metrics["val"]["accuracy"]),
                seconds,
                throughput(result.metrics),
                trainable_parameters(model, result.metrics),
                str(result.run_dir),
            )
        )
    out = Path(opts.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(out / f"compare-{stamp}.json", [dataclasses.asdict(r) for r in rows])
    plot = out / f"compare-{stamp}.png"
    plot_compare(rows, plot)
    return rows, plot


def plot_compare(rows: list[CompareRow], path: Path) -> None:
    """Accuracy against wall time, one marker per strategy (`figures.compare_figure`), as a PNG."""
    from finetune.app.figures import compare_figure, figure_bytes
    from finetune.io import atomic_write

    blob = figure_bytes(compare_figure(rows), "png")
    atomic_write(path, lambda fh: fh.write(blob))


def format_rows(rows: list[CompareRow]) -> str:
    """The compare table: accuracy (0-1), wall time, throughput and trained parameters per strategy."""
    cells = [
        [r.strategy, f"{r.accuracy:.4f}", f"{r.seconds:.1f}", f"{r.img_per_s:.1f}", f"{r.trainable:,}"]
        for r in rows
    ]
    return text_table(["strategy", "val accuracy", "time s", "img/s", "trainable"], cells, right=(1, 2, 3, 4))
