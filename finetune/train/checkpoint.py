"""Checkpoints of a fine-tuning run: a crash never loses the last good one; nothing is unpickled.

    meta, tensors = encode_state(model, optimizer, scheduler, scaler, ema)   # state dicts -> JSON + tensors
    save_checkpoint(run_dir / "checkpoint", meta | progress, tensors, best)   # state-N, then checkpoint.json
    meta, tensors, best = load_checkpoint(run_dir / "checkpoint", dist)   # rank 0 reads, every rank gets it
    decode_state(meta, tensors, model, optimizer, scheduler, scaler, ema)
    opts, recipe = resume_options(opts, dist)                           # what the run started with

Tensors go to safetensors files; everything else (optimizer hyper-parameters, progress, the
world size and seed that define every rank's sample order) to `checkpoint.json`, which is
written last and names the tensor files: it is the commit point. Under torchrun only rank 0
writes and reads them; the other ranks receive rank 0's bytes (their nodes need no copy).
torch is imported inside the functions that handle tensors: `finetune runs` reads the JSON only.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import RunError, TrainingError
from finetune.io import save_tensors, write_json
from finetune.method import RunContext, RunOptions
from finetune.recipes import Recipe
from finetune.runtime import Dist, shared_bytes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


CHECKPOINT_INDEX = "checkpoint.json"  # the commit point: names the tensor file of the last good save


RECIPE_FILE = "recipe.toml"  # the resolved recipe, which `--resume` runs again


def _encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A state dict as JSON, its tensors moved into `tensors` under dotted keys."""
    import torch

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


def encode_state(model, optimizer, scheduler, scaler=None, ema=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able meta, tensors) of everything that moves while training, RNG states included.

    `ema`: timm's `ModelEmaV3`, whose averaged weights are saved beside the model's.
    """
    import torch

    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors |= {f"ema.{k}": v for k, v in ema.module.state_dict().items()}
    meta = {
        "optimizer": _encode(optimizer.state_dict(), "optim", tensors),
        "scheduler": _encode(scheduler.state_dict(), "sched", tensors),
        "scaler": _encode(scaler.state_dict(), "scaler", tensors) if scaler else None,
    }
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return meta, tensors


def decode_state(meta: dict, tensors: dict, model, optimizer, scheduler, scaler=None, ema=None) -> None:
    """Load what `encode_state` saved into the (freshly built) model, optimizer, scheduler, scaler
    and weight average."""
    import torch

    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    optimizer.load_state_dict(_decode(meta["optimizer"], tensors))
    scheduler.load_state_dict(_decode(meta["scheduler"], tensors))
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(_decode(meta["scaler"], tensors))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    folder: Path, meta: dict, tensors: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None = None
) -> None:
    """Write one checkpoint: tensor files first, then `checkpoint.json` naming them (the commit).

    Each file goes through `atomic_write`. Until the JSON is renamed into place the previous
    checkpoint is the valid one; files it does not name are removed afterwards. Without new
    `best` weights, `meta["best_tensors"]` (if given) keeps naming the previous best file.

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


def _read_files(folder: Path) -> tuple[bytes, bytes, bytes]:
    """(checkpoint.json, state tensors, best tensors or b"") as bytes, as committed."""
    index = folder / CHECKPOINT_INDEX
    if not index.is_file():
        raise RunError(
            f"{folder.parent} has no checkpoint to resume from", "start a new run without --resume"
        )
    try:
        raw = index.read_bytes()
        meta = json.loads(raw)
        state = (folder / meta["tensors"]).read_bytes()
        best = (folder / meta["best_tensors"]).read_bytes() if meta.get("best_tensors") else b""
    except (OSError, ValueError, KeyError) as err:
        raise RunError(
            f"the checkpoint in {folder} is damaged ({err})", "start a new run without --resume"
        ) from None
    return raw, state, best


def load_checkpoint(
    folder: Path, dist: Dist | None = None
) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(meta, tensors, best weights or None) of the last committed checkpoint; nothing is unpickled.

    Under torchrun rank 0 reads the files and every rank receives the same bytes (or the same error).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    raw, state, best = shared_bytes(lambda: _read_files(folder), dist or Dist())
    try:
        meta = json.loads(raw)
        return meta, load(state), (load(best) if best else None)
    except (ValueError, SafetensorError) as err:
        raise RunError(
            f"the checkpoint in {folder} is damaged ({err})", "start a new run without --resume"
        ) from None


def read_meta(run_dir: Path) -> dict | None:
    """checkpoint.json of a run folder (no tensors, no torch), or None when it has none readable."""
    try:
        return json.loads((Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def resume_command(data: str | None, run_dir: str | Path, world: int = 1) -> str:
    """The command that continues an interrupted run, shell-quoted (paths may hold spaces or quotes)."""
    args = f"run {shlex.quote(str(data)) if data else 'DATA'} --resume {shlex.quote(str(run_dir))}"
    if world > 1:
        return f"torchrun --nproc-per-node {world} -m finetune {args} (the same torchrun options as before)"
    return f"finetune {args}"


def resume_options(
    opts: RunOptions, dist: Dist | None = None, complete: Callable[[Path], bool] = lambda p: False
) -> tuple[RunOptions, Recipe]:
    """(the options, the resolved recipe) an interrupted run started with, for `--resume RUN`.

    Rank 0 reads the checkpoint; under torchrun the other ranks get its bytes, so other nodes
    need no copy of the run folder. A checkpoint marked finished whose run folder was never
    completed (killed while writing model.safetensors or config.json) is resumed too: the loop
    has nothing left to train and the pipeline writes the folder from the best weights.

    Args:
        complete: whether a run folder holds a finished model (`runfolder.is_run`): then there is
            nothing to resume.

    Raises:
        RunError: no such folder, an already complete one, no or a damaged checkpoint, --set or
            --recipe given, or another number of processes than the run was trained with.
    """
    from finetune.recipes import recipe_from_dict

    run_dir = Path(opts.resume)
    dist = dist or Dist()

    def read() -> tuple[bytes]:
        if not run_dir.is_dir():
            raise RunError(
                f"run folder {run_dir} does not exist", "pass the folder printed when the run stopped"
            )
        if complete(run_dir):
            raise RunError(f"run {run_dir} already finished", "start a new run without --resume")
        return (_read_files(run_dir / CHECKPOINT_DIR)[0],)

    (raw,) = shared_bytes(read, dist)
    meta = json.loads(raw)
    if opts.overrides or opts.recipe_file:
        raise RunError(
            "--resume runs the recipe the run started with", "drop --set/--recipe, or start a new run"
        )
    world = int(meta.get("world", 1))
    if world != dist.world:
        many = lambda n: f"{n} process{'es' if n > 1 else ''}"  # noqa: E731
        raise RunError(
            f"{run_dir} was trained by {many(world)} and this is {many(dist.world)}: its batches, "
            "learning rate and sample order depend on that number",
            f"resume with {many(world)}: " + resume_command(meta.get("data"), run_dir, world),
        )
    saved = meta["options"]
    if meta.get("finished"):
        log.info(f"{run_dir}: training had finished; writing its run folder from the checkpoint")
    else:
        log.info(
            f"resuming {run_dir}: {meta['recipe']['name']}, epoch {meta['epoch'] + 1}, batch {meta['batch']}"
        )
    opts = dataclasses.replace(
        opts,
        strategy=meta["recipe"]["name"],
        backbone=saved["backbone"],
        weights=saved["weights"],
        weights_map=saved["weights_map"],
        pretrained=saved["pretrained"],
        val_fraction=saved["val_fraction"],
        seed=saved["seed"],
        labels_csv=saved["labels_csv"],
        log=tuple(dict.fromkeys([*saved.get("log", ()), *opts.log])),  # the run's logs, and any asked for now
    )
    return opts, recipe_from_dict(meta["recipe"])


def split_digest(ctx: RunContext) -> str:
    """What a resumed run must find again: the classes and the training files, hashed."""
    import hashlib

    text = json.dumps([ctx.index.classes, [ctx.index.paths[i] for i in ctx.index.indices("train")]])
    return hashlib.sha256(text.encode()).hexdigest()
