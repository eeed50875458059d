"""`finetune compare`: several recipes on one split, one table, one accuracy-vs-time plot.

    rows, plot = compare(CompareOptions(data="mydata", strategies=("linear-probe", "stage-probe")))

Every strategy runs through `pipeline.run` with the same data, backbone, split seed and
validation share, so the numbers differ only by recipe.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.recipes import STRATEGIES


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


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


@dataclass(frozen=True)
class CompareRow:
    strategy: str
    accuracy: float
    seconds: float
    img_per_s: float  # training images processed per second of the whole run
    trainable: int  # parameters the recipe trained (head only for probes)
    run_dir: str


def trainable_parameters(model, strategy_method: str, metrics: dict) -> int:
    """Probes train only their linear head; fine-tuning reports what it trained."""
    if "trainable_params" in metrics:
        return int(metrics["trainable_params"])
    if strategy_method == "probe":
        return sum(p.numel() for p in model.head.parameters())
    return sum(p.numel() for p in model.parameters())


def compare(opts: CompareOptions, log: Callable[[str], None] = _stderr) -> tuple[list[CompareRow], Path]:
    """Run every strategy; write compare.json and compare.png under `opts.out`; return the rows."""
    from finetune.pipeline import RunOptions, run
    from finetune.recipes import load_recipe
    from finetune.runs import write_json

    for s in opts.strategies:
        load_recipe(s, None, opts.overrides)  # a bad name or --set fails before any work
    rows: list[CompareRow] = []
    for s in opts.strategies:
        log(f"compare: {s}")
        t0 = time.perf_counter()
        result = run(
            RunOptions(
                data=opts.data,
                strategy=s,
                backbone=opts.backbone,
                overrides=opts.overrides,
                out=opts.out,
                val_fraction=opts.val_fraction,
                seed=opts.seed,
                device=opts.device,
                workers=opts.workers,
            ),
            log=log,
        )
        seconds = time.perf_counter() - t0
        from finetune.runs import load_run

        model, _, _ = load_run(result.run_dir)
        method = load_recipe(s, None, opts.overrides).method
        n_train = result.index.counts("train")
        images = sum(n_train.values()) * max(
            1, int(result.config.recipe.get("epochs", 1)) if method != "probe" else 1
        )
        rows.append(
            CompareRow(
                s,
                float(result.metrics["val"]["accuracy"]),
                seconds,
                images / seconds,
                trainable_parameters(model, method, result.metrics),
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
    """Accuracy vs wall time, one labelled point per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from finetune.runs import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for r in rows:
        ax.scatter(r.seconds, 100 * r.accuracy, s=40)
        ax.annotate(r.strategy, (r.seconds, 100 * r.accuracy), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("wall time of the run (s, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("strategies on one split")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)


def format_rows(rows: list[CompareRow]) -> str:
    lines = [f"{'strategy':<18}{'val acc':>9}{'time s':>9}{'img/s':>9}{'trainable':>12}"]
    for r in rows:
        lines.append(
            f"{r.strategy:<18}{r.accuracy:>9.4f}{r.seconds:>9.1f}{r.img_per_s:>9.1f}{r.trainable:>12,}"
        )
    return "\n".join(lines)
