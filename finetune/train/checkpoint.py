"""Checkpoints of a fine-tuning run: a crash never loses the last good one; nothing is unpickled.

    save_checkpoint(run_dir / "checkpoint", meta, tensors, best)   # state-N.safetensors, then checkpoint.json
    meta, tensors, best = load_checkpoint(run_dir / "checkpoint")
    opts = resume_options(opts)                                    # the options the run started with

Tensors go to safetensors files; everything else (optimizer hyper-parameters, RNG states,
progress) to `checkpoint.json`, which is written last and names the tensor files: it is the
commit point.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shlex
from pathlib import Path
from typing import Any

import torch

from finetune.errors import RunError, TrainingError
from finetune.io import save_tensors, write_json
from finetune.method import RunContext, RunOptions

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


CHECKPOINT_INDEX = "checkpoint.json"  # the commit point: names the tensor file of the last good save


RECIPE_FILE = "recipe.toml"  # the resolved recipe, which `--resume` runs again


def _encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A state dict as JSON, its tensors moved into `tensors` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"$t": prefix}
    if isinstance(obj, dict):
        return {"$d": [[k, _encode(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}  # keeps int keys
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "$t" in obj:
            return tensors[obj["$t"]]
        return {k: _decode(v, tensors) for k, v in obj["$d"]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_checkpoint(
    folder: Path, meta: dict, tensors: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None = None
) -> None:
    """Write one checkpoint: tensor files first, then `checkpoint.json` naming them (the commit).

    Each file goes through `atomic_write`. Until the JSON is renamed into place the previous
    checkpoint is the valid one; files it does not name are removed afterwards.

    Raises:
        TrainingError: the disk is full (or another write error); the previous checkpoint is kept.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = int(meta["saves"])
    meta = dict(meta)
    meta["tensors"] = f"state-{n:06d}.safetensors"
    written = [folder / meta["tensors"]]
    try:
        save_tensors(written[0], tensors)
        if best is not None:
            meta["best_tensors"] = f"best-{n:06d}.safetensors"
            written.append(folder / meta["best_tensors"])
            save_tensors(written[1], best)
        write_json(folder / CHECKPOINT_INDEX, meta)
    except OSError as err:
        for path in written:
            path.unlink(missing_ok=True)
        what = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        last = _last_good(folder)
        raise TrainingError(
            f"cannot write the checkpoint in {folder}: {what}",
            f"free space and resume with --resume {shlex.quote(str(folder.parent))}; {last}",
        ) from None
    keep = {CHECKPOINT_INDEX, RECIPE_FILE, meta["tensors"], meta.get("best_tensors", "")}
    for path in folder.iterdir():
        if path.name not in keep and (path.suffix == ".safetensors" or path.name.endswith(".tmp")):
            path.unlink(missing_ok=True)  # superseded saves, and temp files of a killed save


def _last_good(folder: Path) -> str:
    try:
        meta = json.loads((folder / CHECKPOINT_INDEX).read_text())
        return f"the last good checkpoint (epoch {meta['epoch']}, batch {meta['batch']}) is kept"
    except (OSError, ValueError, KeyError):
        return "no earlier checkpoint exists"


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(meta, tensors, best weights or None) of the last committed checkpoint; nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / CHECKPOINT_INDEX
    if not index.is_file():
        raise RunError(
            f"{folder.parent} has no checkpoint to resume from", "start a new run without --resume"
        )
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        tensors = load_file(str(folder / meta["tensors"]))
        best = load_file(str(folder / meta["best_tensors"])) if meta.get("best_tensors") else None
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise RunError(
            f"the checkpoint in {folder} is damaged ({err})", "start a new run without --resume"
        ) from None
    return meta, tensors, best


def resume_options(opts: RunOptions) -> RunOptions:
    """The options an interrupted run started with (backbone, weights, split, recipe), for `--resume RUN`."""
    run_dir = Path(opts.resume)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist", "pass the folder printed when the run stopped")
    meta, _, _ = load_checkpoint(run_dir / CHECKPOINT_DIR)
    if meta.get("finished"):
        raise RunError(
            f"run {run_dir} already finished (epoch {meta['epoch']})", "start a new run without --resume"
        )
    if opts.overrides or opts.recipe_file:
        raise RunError(
            "--resume runs the recipe the run started with", "drop --set/--recipe, or start a new run"
        )
    saved = meta["options"]
    epoch, batch = meta["epoch"] + 1, meta["batch"]
    log.info(f"resuming {run_dir}: {meta['recipe']['name']}, epoch {epoch}, batch {batch}")
    return dataclasses.replace(
        opts,
        strategy=meta["recipe"]["name"],
        recipe_file=run_dir / CHECKPOINT_DIR / RECIPE_FILE,
        backbone=saved["backbone"],
        weights=saved["weights"],
        weights_map=saved["weights_map"],
        pretrained=saved["pretrained"],
        val_fraction=saved["val_fraction"],
        seed=saved["seed"],
        labels_csv=saved["labels_csv"],
    )


def _split_digest(ctx: RunContext) -> str:
    import hashlib

    text = json.dumps([ctx.index.classes, [ctx.index.paths[i] for i in ctx.index.indices("train")]])
    return hashlib.sha256(text.encode()).hexdigest()
