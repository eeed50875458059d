"""The run folder: one trained classifier and everything needed to use and judge it.

    runs/20261123-101500-lite0-linear-probe/
        model.safetensors   trunk + head tensors (no pickle)
        config.json         backbone, weights source + sha256, classes, preprocessing, recipe, versions
        run.toml            the resolved run (options + recipe): `finetune run --config` repeats it
        metrics.json        validation (and test) accuracy, per-class table
        split.json          which file went to train / val / test
        problems.json       files skipped or ignored, with reasons

Loading needs no training code and unpickles nothing::

    from finetune import load_run
    model, transform, class_names = load_run("runs/20261123-101500-lite0-linear-probe")

Every file is written through `io.atomic_write`: temp file, fsync, rename.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.transforms import Preprocessing
from finetune.errors import RunError
from finetune.io import save_tensors, write_json

MODEL_FILE = "model.safetensors"


CONFIG_FILE = "config.json"


FORMAT_VERSION = 1


@dataclass(frozen=True)
class RunConfig:
    """config.json: what a run is, enough to rebuild its model without the training code."""

    backbone: str  # the name given (alias or framework name)
    model: str  # the concrete framework model
    tap: str  # where the trunk was cut ("pool" unless stage-probe chose another)
    pool: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    strategy: str
    head_kind: str  # "logreg" | "finetune" (logits) | "svm" (scores) | "knn" (probabilities; extra["knn"])
    weights: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def probabilistic(self) -> bool:
        return self.head_kind != "svm"

    @property
    def outputs(self) -> str:
        """What the model's (B, K) outputs are: "logits" (softmax them), "probabilities" (a kNN
        head's neighbour votes, used as they are) or "scores" (an SVM's, no probabilities)."""
        return {"svm": "scores", "knn": "probabilities"}.get(self.head_kind, "logits")

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "backbone": self.backbone,
            "model": self.model,
            "tap": self.tap,
            "pool": self.pool,
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "strategy": self.strategy,
            "head_kind": self.head_kind,
            "weights": self.weights,
            "recipe": self.recipe,
            "data": self.data,
            "versions": self.versions,
            "created": self.created,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        try:
            return cls(
                backbone=d["backbone"],
                model=d["model"],
                tap=d.get("tap", "pool"),
                pool=d.get("pool", "avg"),
                class_names=tuple(d["class_names"]),
                preprocessing=Preprocessing.from_dict(d["preprocessing"]),
                strategy=d.get("strategy", ""),
                head_kind=d.get("head_kind", "logreg"),
                weights=d.get("weights", {}),
                recipe=d.get("recipe", {}),
                data=d.get("data", {}),
                versions=d.get("versions", {}),
                created=d.get("created", ""),
                extra=d.get("extra", {}),
            )
        except KeyError as err:
            raise RunError(
                f"config.json is incomplete (no {err})", "use a run folder written by `finetune run`"
            ) from None
        except (TypeError, ValueError, AttributeError) as err:
            raise RunError(
                f"config.json holds a value that cannot work ({err})",
                "re-run `finetune run`, or undo the edit to config.json",
            ) from None


def new_run_dir(out: str | os.PathLike, backbone: str, strategy: str) -> Path:
    """runs/<YYYYmmdd-HHMMSS>-<backbone>-<strategy>/, made unique with a counter."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{backbone}-{strategy}".replace(":", "-")).strip(".-")
    base = Path(out) / f"{stamp}-{name}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    try:
        path.mkdir(parents=True)
    except OSError as err:
        raise RunError(
            f"cannot make the run folder {path}: {err.strerror}", "pass -o a folder you can write to"
        ) from None
    return path


def save_run(run_dir: Path, tensors: dict, config: RunConfig) -> None:
    """model.safetensors (the Classifier's state dict) + config.json; the caller writes the rest."""
    save_tensors(run_dir / MODEL_FILE, tensors, metadata={"format": str(FORMAT_VERSION)})
    write_json(run_dir / CONFIG_FILE, config.to_dict())


def is_run(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / MODEL_FILE).is_file()


def latest_run(out: str | os.PathLike = "runs") -> Path | None:
    """The newest run folder under `out` (by the time in its name, then mtime), or None."""
    root = Path(out)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if p.is_dir() and is_run(p)]
    return max(runs, key=lambda p: (p.name[:15], p.stat().st_mtime)) if runs else None


def read_config(run_dir: str | os.PathLike) -> RunConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(
            f"run folder {run_dir} does not exist", "pass a folder under runs/ (see `finetune runs`)"
        )
    if not is_run(run_dir):
        raise RunError(
            f"{run_dir} is not a finetune run (no {CONFIG_FILE} and {MODEL_FILE})",
            "pass a folder written by `finetune run`",
        )
    try:
        raw = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(
            f"{run_dir / CONFIG_FILE} is not valid JSON ({err})", "re-run `finetune run`"
        ) from None
    except OSError as err:
        raise RunError(
            f"cannot read {run_dir / CONFIG_FILE}: {err.strerror}", "check its permissions"
        ) from None
    if not isinstance(raw, dict):
        raise RunError(f"{run_dir / CONFIG_FILE} is not a run's config", "re-run `finetune run`")
    names = raw.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
        raise RunError(
            f"{run_dir / CONFIG_FILE}: class_names must be a list of class names, got {names!r}",
            "re-run `finetune run`, or undo the edit to config.json",
        )
    return RunConfig.from_dict(raw)


def _empty_head(config: RunConfig, dim: int):
    """The head's module with placeholder weights: nn.Linear, or a KNNHead sized by config.json."""
    from torch import nn

    from finetune.models.classifier import KNNHead

    if config.head_kind != "knn":
        return nn.Linear(dim, len(config.class_names))
    knn = config.extra.get("knn")
    if not isinstance(knn, dict) or not all(
        isinstance(knn.get(k), int) and knn[k] >= 1 for k in ("k", "bank")
    ):
        raise RunError(
            "config.json of a kNN run lacks extra.knn {k, bank} (neighbours, training images)",
            "re-run `finetune run`, or undo the edit to config.json",
        )
    if knn["k"] > knn["bank"]:
        raise RunError(
            f"config.json: k = {knn['k']} neighbours of {knn['bank']} training images",
            "re-run `finetune run`, or undo the edit to config.json",
        )
    return KNNHead.empty(knn["bank"], dim, len(config.class_names), knn["k"])


def build_model(config: RunConfig):
    """The run's architecture with placeholder weights: backbone cut at its tap + its head."""
    from finetune.models.anatomy import build_trunk, feature_dim
    from finetune.models.backbone import build
    from finetune.models.catalogue import resolve
    from finetune.models.classifier import Classifier

    spec = resolve(config.backbone)
    bb = build(spec, pretrained=False)
    trunk = build_trunk(bb.model, config.tap, config.pool)
    dim = feature_dim(trunk, max(config.preprocessing.input_size, spec.min_input))
    return Classifier(trunk, _empty_head(config, dim))


def load_run(run_dir: str | os.PathLike):
    """(model in eval mode, transform: PIL image -> tensor, class names) of a run folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from finetune.data.transforms import EvalTransform

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    model = build_model(config)
    try:
        state = load_file(str(run_dir / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise RunError(
            f"{run_dir / MODEL_FILE} is not a valid safetensors file ({err})", "re-run `finetune run`"
        ) from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [  # a scalar saved as (1,) (BatchNorm's num_batches_tracked from numpy) is the same tensor
        k
        for k in own
        if k in state
        and tuple(state[k].shape) != tuple(own[k].shape)
        and not state[k].numel() == own[k].numel() == 1
    ]
    if missing or unexpected or wrong:
        detail = (
            f"{wrong[0]} is {tuple(state[wrong[0]].shape)} in the file, {tuple(own[wrong[0]].shape)} "
            f"for {len(config.class_names)} classes of {config.backbone} cut at {config.tap}"
            if wrong
            else f"{len(missing)} tensors missing, {len(unexpected)} unexpected for {config.backbone}"
        )
        raise RunError(
            f"{run_dir / MODEL_FILE} does not match its config.json ({detail})",
            "re-run `finetune run`, or undo the edit to config.json",
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, EvalTransform(config.preprocessing), list(config.class_names)


def _interrupted_row(p: Path) -> dict | None:
    """A fine-tune that stopped before its folder was complete: where, and the command that continues it."""
    from finetune.train.checkpoint import read_meta, resume_command

    meta = read_meta(p)
    if meta is None or not isinstance(meta.get("recipe"), dict):
        return None
    epochs = meta["recipe"].get("epochs", "?")
    where = (
        "the end (the run folder was not written)"
        if meta.get("finished")
        else f"epoch {meta.get('epoch', 0) + 1}/{epochs}, batch {meta.get('batch', 0)}"
    )
    return {
        "run": p.name,
        "path": str(p),
        "status": "interrupted",
        "strategy": meta["recipe"].get("name", "?"),
        "backbone": meta.get("options", {}).get("backbone", "?"),
        "where": where,
        "resume": resume_command(meta.get("data"), p, int(meta.get("world", 1))),
    }


def list_runs(out: str | os.PathLike = "runs") -> list[dict]:
    """One row per run folder under `out`, newest first: name, backbone, strategy, headline metric.

    Every row has `status`: "finished", or "interrupted" for a fine-tune that stopped before its
    folder was complete (a checkpoint, no model yet), with where it stopped (`where`) and the
    `--resume` command that continues it (`resume`). A run whose config.json or metrics.json is
    damaged is listed too, with `damaged` saying what is wrong (the others are listed as usual).
    """
    root = Path(out)
    rows = []
    if not root.is_dir():
        return rows
    for p in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
        row: dict = {
            "run": p.name,
            "path": str(p),
            "status": "finished",
            "backbone": "?",
            "strategy": "?",
            "tap": "?",
            "classes": None,
            "split": None,
            "accuracy": None,
            "seconds": None,
            "created": "",
            "damaged": None,
        }
        if not is_run(p):
            interrupted = _interrupted_row(p)
            if interrupted is not None:
                rows.append({**row, **interrupted})
            continue
        try:
            config = read_config(p)
            row.update(
                backbone=config.backbone,
                strategy=config.strategy,
                tap=config.tap,
                classes=len(config.class_names),
                created=config.created,
            )
        except RunError as err:
            row["damaged"] = err.what
        metrics = _read_metrics(p / "metrics.json")
        if isinstance(metrics, str):
            row["damaged"] = row["damaged"] or metrics
        else:
            split = metrics.get("headline", "val")
            block = metrics.get(split) if isinstance(split, str) else None
            acc = block.get("accuracy") if isinstance(block, dict) else None
            secs = metrics.get("seconds")
            row.update(
                split=split if isinstance(split, str) else None,
                accuracy=float(acc) if _is_number(acc) else None,
                seconds=float(secs) if _is_number(secs) else None,
            )
        rows.append(row)
    return rows


def _read_metrics(path: Path) -> dict | str:
    """metrics.json as a dict ({} when absent), or what is wrong with it."""
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"metrics.json unreadable ({type(err).__name__})"
    return metrics if isinstance(metrics, dict) else "metrics.json is not a table of metrics"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
