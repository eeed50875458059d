"""The contract between `finetune run` and its two methods (probe/, train/).

    ctx = RunContext(index, backbone, preprocessing, recipe, run_dir, options)
    outcome = linear_probe(ctx)       # or stage_probe(ctx), run_finetune(ctx)
    outcome.tensors                   # the Classifier's state dict: trunk + linear head

A method gets the data, the network, the recipe and where to write; it returns an `Outcome`
holding the same artifact whichever method made it, so saving, predict, evaluate and export
are shared (`app/pipeline.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.index import DatasetIndex
from finetune.data.transforms import Preprocessing
from finetune.errors import DataError
from finetune.recipes import Recipe


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
    offline: bool = False  # published weights from the caches only (also FINETUNE_OFFLINE / HF_HUB_OFFLINE)
    keep_checkpoints: bool = False  # fine-tuning: keep checkpoint/ in the finished run folder
    log: tuple[str, ...] = ("csv",)  # fine-tuning: "csv" (history.csv, always) and/or "tensorboard"


@dataclass
class RunContext:
    """What a method needs: data, network, recipe, where to write, and how to talk."""

    index: DatasetIndex
    backbone: Any  # backbones.Backbone
    preprocessing: Preprocessing
    recipe: Recipe
    run_dir: Path
    options: RunOptions
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
