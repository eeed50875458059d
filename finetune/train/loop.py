"""The fine-tuning loop (partial-finetune, full-finetune): layer-wise LRs, AMP, checkpoints, exact resume.

`pipeline.run` calls `run_finetune(ctx)` for recipes with method = "finetune"::

    finetune run DATA --strategy partial-finetune            # head x1, top x0.1, middle x0.01, bottom frozen
    finetune run DATA --strategy full-finetune --compile     # everything learns
    finetune run DATA --strategy partial-finetune --resume runs/20261123-101500-lite0-partial-finetune

What one run does, in order:

1. cut the backbone at its pooled layer, put a new `nn.Linear` head on it, seeded by a linear
   probe (LP-FT) unless `init_head = "random"`;
2. freeze the stages whose multiplier is 0 (`requires_grad=False`, so autograd records nothing
   for them, and they are not given to the optimizer), keep their BatchNorm in eval mode when
   `bn_policy = "eval"`; the optimizer gets `recipes.param_groups(stages, recipe, ...)`;
3. train with warmup + cosine, gradient clipping, AMP on CUDA (bf16 where supported, else fp16
   with a GradScaler) and channels_last; validate each epoch, keep the best weights by
   validation accuracy, stop early after `patience` epochs without improvement;
4. after every epoch (and on SIGINT/SIGTERM, mid-epoch) write `run_dir/checkpoint/`:
   `state-N.safetensors` (weights, optimizer and scaler tensors, RNG states, the epoch's sample
   order and augmentation seeds) committed by `checkpoint.json` (everything else, as JSON),
   each through `runs.atomic_write`. Nothing is pickled; a SIGKILL mid-save leaves the previous
   checkpoint, a full disk a clear error and the previous checkpoint.

Exact resume: the epoch's sample order and per-sample augmentation seeds come from a numpy
Generator (its `bit_generator.state` is saved as JSON) and are saved with the batch index,
so a resumed run skips the consumed batches and sees the same images with the same crops.
Augmentation is seeded per sample, so it does not depend on the number of decode workers.
With `num_workers=0` and a fixed thread count, interrupted + resumed == uninterrupted, bit for bit.

Faults: a non-finite loss stops the run naming the learning rate; CUDA out-of-memory retries
the batch in halves (gradient accumulation keeps the effective batch and so the recipe's
meaning); a crashed decode worker is reported with the file it was reading.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import shlex
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.console import progress_bar
from finetune.data.loader import ImageDataset, default_workers, make_loader
from finetune.data.transforms import eval_reader, train_reader
from finetune.errors import RunError, TrainingError
from finetune.io import atomic_write
from finetune.method import Outcome, RunContext, RunOptions
from finetune.metrics import classification_metrics
from finetune.models.anatomy import build_trunk, feature_dim, stages
from finetune.models.classifier import Classifier
from finetune.recipes import Recipe
from finetune.runtime import Dist, _all_sum, pick_device
from finetune.train.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_INDEX,
    RECIPE_FILE,
    _decode,
    _encode,
    _split_digest,
    load_checkpoint,
    save_checkpoint,
)
from finetune.train.setup import (
    BN_POLICIES,
    OPTIMIZERS,
    amp_for,
    freeze,
    frozen_names,
    lr_factor,
    param_groups,
    set_train_mode,
)
from finetune.train.signals import Interrupted, _Signals

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"


# Tests only: behave as if SIGINT arrived after this many training batches (counted over the run).
STOP_AFTER_ENV = "FINETUNE_STOP_AFTER_BATCHES"


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class _SeededDataset:
    """ImageDataset whose random augmentation of item i is seeded by seeds[i] (not by the global RNG).

    That makes a sample's crop independent of worker count, batch position and resumes.
    Decode workers ignore SIGINT: the main process handles it and saves a checkpoint.
    """

    def __init__(self, base: ImageDataset, seeds: np.ndarray, slots=None) -> None:
        self.base, self.seeds, self.slots = base, seeds, slots
        self._in_worker = False

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        info = torch.utils.data.get_worker_info()
        if info is not None and not self._in_worker:
            self._in_worker = True
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if info is not None and self.slots is not None:
            self.slots[info.id] = i  # which file this worker reads now: named if the worker dies
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seeds[i]))
            return self.base[i]


def epoch_plan(
    n: int,
    epoch: int,
    recipe: Recipe,
    rng: np.random.Generator,
    world: int = 1,
    rank: int = 0,
    sample_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(this rank's sample order, augmentation seed per sample) for one epoch.

    The order is torch's `DistributedSampler` with the recipe's seed (so 1 process and N
    processes walk the same global order); class-balanced sampling draws with replacement from
    `rng`. Augmentation seeds are drawn from `rng` for every sample, the same on every rank.
    """
    from torch.utils.data import DistributedSampler

    if sample_weights is not None:
        order = rng.choice(n, size=n, replace=True, p=sample_weights / sample_weights.sum())
    else:
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=recipe.seed)
        sampler.set_epoch(epoch)
        order = np.fromiter(iter(sampler), dtype=np.int64)
    seeds = rng.integers(0, 2**31 - 1, size=n, dtype=np.int64)
    if len(order) % recipe.batch_size == 1 and len(order) > 1:
        order = order[:-1]  # a last batch of one image breaks BatchNorm in training mode
    return order.astype(np.int64), seeds


@dataclass
class Progress:
    """Where training stands: what a checkpoint's JSON holds besides tensors and RNG states."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch completed
    step: int = 0  # optimizer steps over the run (the schedule's clock)
    batches_seen: int = 0  # training batches over the run (FINETUNE_STOP_AFTER_BATCHES counts these)
    best: list[float] = field(default_factory=lambda: [-1.0, -math.inf])  # (val accuracy, -val loss)
    best_epoch: int = 0
    bad_epochs: int = 0
    micro: int = 1  # micro-batches per batch: doubled after a CUDA OOM
    saves: int = 0
    running: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0})
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    finished: bool = False


class Trainer:
    """One fine-tuning run: the model, optimizer and data of a RunContext, and the loop over them."""

    def __init__(self, ctx: RunContext, model: Classifier, device: torch.device, dist: Dist) -> None:
        self.ctx, self.device, self.dist = ctx, device, dist
        self.net = model
        # The recipe's batch is per process; its LR is for one process, so under torchrun it is
        # scaled linearly with the global batch (lr x world size), as the recipes say.
        recipe = dataclasses.replace(ctx.recipe, lr=ctx.recipe.lr * dist.world)
        self.recipe = recipe
        if dist.world > 1:
            log.info(
                f"torchrun: {dist.world} processes, global batch {recipe.batch_size * dist.world}, "
                f"lr {ctx.recipe.lr:g} x {dist.world} = {recipe.lr:g}"
            )
        if recipe.balance == "sampler" and dist.world > 1:
            raise TrainingError(
                'balance = "sampler" is not supported under torchrun',
                "use --set balance=weights (a class-weighted loss) with several processes",
            )
        self.stages = stages(model.trunk)
        freeze(model, frozen_names(self.stages, recipe))
        if dist.world > 1 and device.type == "cuda":
            # Batch statistics over the global batch; SyncBatchNorm refuses CPU tensors, so not on gloo.
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.frozen_norms = BN_POLICIES[recipe.bn_policy](model.trunk)
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        model.to(device, memory_format=fmt)
        self.fmt = fmt
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.groups = param_groups(
            self.stages, recipe, dict(model.trunk.named_parameters()), list(model.head.parameters())
        )
        self.optimizer = OPTIMIZERS[recipe.optimizer](self.groups, recipe)
        self.amp_dtype, needs_scaler = amp_for(device)
        self.scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
        self.fwd: nn.Module = model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.fwd = DistributedDataParallel(model, device_ids=ids)
        if ctx.options.compile:
            self.fwd = torch.compile(self.fwd)

        self.train_pos = ctx.positions("train")
        self.dataset = ImageDataset(
            ctx.index,
            self.train_pos,
            train_reader(ctx.preprocessing, recipe.augment, recipe.augment_scale),
        )
        self.batches_per_epoch = math.ceil(self._epoch_len() / recipe.batch_size)
        self.total_steps = recipe.epochs * self.batches_per_epoch
        warmup = recipe.warmup_epochs * self.batches_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, recipe.schedule)
        )
        labels = np.asarray([ctx.index.labels[p] for p in self.train_pos])
        counts = np.bincount(labels, minlength=len(ctx.index.classes)).astype(np.float64)
        class_w = len(labels) / (len(counts) * np.maximum(counts, 1))  # sklearn's "balanced"
        weight = (
            torch.tensor(class_w, dtype=torch.float32, device=device) if recipe.balance == "weights" else None
        )
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.label_smoothing)
        self.sample_weights = class_w[labels] if recipe.balance == "sampler" else None
        self.rng = np.random.default_rng(recipe.seed)
        self.state = Progress()
        self.order = np.zeros(0, np.int64)
        self.seeds = np.zeros(0, np.int64)
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._best_file: str | None = None
        self.folder = ctx.run_dir / CHECKPOINT_DIR
        self.reported: set[int] = set()
        stop = os.environ.get(STOP_AFTER_ENV, "")
        self.stop_after = int(stop) if stop.isdigit() else 0
        self.workers = default_workers() if ctx.options.workers is None else ctx.options.workers

    def _epoch_len(self) -> int:
        n = len(self.train_pos)
        per_rank = math.ceil(n / self.dist.world)
        return per_rank - 1 if per_rank % self.recipe.batch_size == 1 and per_rank > 1 else per_rank

    # ----------------------------------------------------------------- checkpoint state

    def _tensors(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.net.state_dict().items():
            tensors[f"model.{k}"] = v
        meta = {
            "optimizer": _encode(self.optimizer.state_dict(), "optim", tensors),
            "scheduler": _encode(self.scheduler.state_dict(), "sched", tensors),
            "scaler": _encode(self.scaler.state_dict(), "scaler", tensors) if self.scaler else None,
            "numpy_rng": self.rng.bit_generator.state,
        }
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        tensors["epoch.order"] = torch.from_numpy(self.order)
        tensors["epoch.seeds"] = torch.from_numpy(self.seeds)
        return meta, tensors

    def save(self, best_changed: bool) -> None:
        if not self.dist.main:
            return
        self.state.saves += 1  # a fresh file name: the committed checkpoint is never overwritten
        meta, tensors = self._tensors()
        opts = self.ctx.options
        meta |= {
            **dataclasses.asdict(self.state),
            "recipe": self.ctx.recipe.to_dict(),  # as written (unscaled), for --resume
            "classes": list(self.ctx.index.classes),
            "split_sha256": _split_digest(self.ctx),
            "options": {
                "backbone": opts.backbone,
                "weights": str(opts.weights) if opts.weights else None,
                "weights_map": opts.weights_map,
                "pretrained": opts.pretrained,
                "val_fraction": opts.val_fraction,
                "seed": opts.seed,
                "labels_csv": str(opts.labels_csv) if opts.labels_csv else None,
            },
        }
        if not best_changed and self._best_file:
            meta["best_tensors"] = self._best_file  # unchanged: keep pointing at the file we have
        if not (self.folder / RECIPE_FILE).exists():
            text = self.ctx.recipe.to_toml()
            atomic_write(self.folder / RECIPE_FILE, lambda fh: fh.write(text.encode("utf-8")))
        best = self.best_weights if best_changed else None
        save_checkpoint(self.folder, meta, tensors, best)
        self._best_file = json.loads((self.folder / CHECKPOINT_INDEX).read_text()).get("best_tensors")

    def restore(self) -> None:
        meta, tensors, best = load_checkpoint(self.folder)
        if meta["classes"] != list(self.ctx.index.classes) or meta["split_sha256"] != _split_digest(self.ctx):
            raise RunError(
                "the data changed since this run started (other classes or training files)",
                "resume on the same folder, or start a new run",
            )
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.net.load_state_dict(model_state)
        self.optimizer.load_state_dict(_decode(meta["optimizer"], tensors))
        self.scheduler.load_state_dict(_decode(meta["scheduler"], tensors))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(_decode(meta["scaler"], tensors))
        self.rng.bit_generator.state = meta["numpy_rng"]
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [
            tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors
        ]
        if cuda and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(cuda)
        self.order = tensors["epoch.order"].numpy().copy()
        self.seeds = tensors["epoch.seeds"].numpy().copy()
        fields = {f.name for f in dataclasses.fields(Progress)}
        self.state = Progress(**{k: v for k, v in meta.items() if k in fields})
        self.best_weights = best
        self._best_file = meta.get("best_tensors")

    # ----------------------------------------------------------------- one batch

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """One optimizer step on batch (x (B, 3, H, W), y (B,)); returns (summed loss, correct)."""
        while True:
            try:
                return self._try_step(x, y)
            except _OOM:
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.state.micro * 2 > len(y):
                    raise TrainingError(
                        f"out of memory with a batch of 1 image at size {self.ctx.preprocessing.input_size}",
                        "use a smaller --set image_size, a smaller backbone, or another device",
                    ) from None
                self.state.micro *= 2
                size = math.ceil(len(y) / self.state.micro)
                log.info(
                    f"out of GPU memory: retrying with batches of {size} images "
                    f"({self.state.micro} per step, so the effective batch stays {len(y)})"
                )

    def _try_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        self.optimizer.zero_grad(set_to_none=True)
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        total = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for xs, ys in zip(x.chunk(self.state.micro), y.chunk(self.state.micro), strict=True):
            with amp:
                logits = self.fwd(xs)  # (b, K)
            loss = self.loss_fn(logits.float(), ys)
            scaled = loss * (len(ys) / len(y)) if self.state.micro > 1 else loss
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach() * len(ys)
            correct += (logits.detach().argmax(1) == ys).sum()
        if not torch.isfinite(total):  # one sync per step; checked before the weights move
            lr = self.optimizer.param_groups[0]["lr"]
            e, b = self.state.epoch + 1, self.state.batch + 1
            raise TrainingError(
                f"the training loss became {float(total / len(y))} at epoch {e}, batch {b}: "
                f"the learning rate is likely too high (lr = {self.recipe.lr:g}, now {lr:g})",
                f"lower it, e.g. --set lr={self.recipe.lr / 10:g}",
            )
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.recipe.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        return float(total), int(correct)

    # ----------------------------------------------------------------- epochs

    def _loader(self, order: np.ndarray, dataset, batch_size: int, workers: int):
        return make_loader(
            dataset,
            batch_size,
            min(workers, max(0, len(order) // batch_size)),
            sampler=order.tolist(),
            seed=self.recipe.seed,
        )

    def _note_bad(self, bad: dict[int, str]) -> None:
        for pos, reason in bad.items():
            if pos not in self.reported:
                self.reported.add(pos)
                self.ctx.bad[pos] = reason
                log.info(f"skipped {self.ctx.index.paths[pos]}: {reason}")

    @contextmanager
    def _worker_crash_names_the_file(self, it, slots) -> Iterator[None]:
        """A dead decode worker (torch raises a RuntimeError at the next SIGCHLD or fetch) becomes a
        TrainingError naming the file that worker was reading."""
        try:
            yield
        except RuntimeError as err:
            if "DataLoader worker" not in str(err):
                raise
            names = sorted({self.ctx.index.paths[self.train_pos[i]] for i in _dead_worker_items(it, slots)})
            where = f" while reading {', '.join(names)}" if names else ""
            raise TrainingError(
                f"an image decode worker crashed{where}",
                "move that file out of the data folder (or run with --workers 0 to see the error)",
            ) from None

    def train_epoch(self, signals: _Signals) -> bool:
        """Train the rest of the current epoch; False when interrupted (after saving)."""
        st, recipe = self.state, self.recipe
        if st.batch == 0:
            self.order, self.seeds = epoch_plan(
                len(self.train_pos),
                st.epoch,
                recipe,
                self.rng,
                self.dist.world,
                self.dist.rank,
                self.sample_weights,
            )
        set_train_mode(self.net, self.frozen_norms)
        start = st.batch * recipe.batch_size
        rest = self.order[start:]
        slots = _worker_slots(self.workers)
        dataset = _SeededDataset(self.dataset, self.seeds, slots)
        loader = self._loader(rest, dataset, recipe.batch_size, self.workers)
        total = len(self.order)
        desc = f"epoch {st.epoch + 1}/{recipe.epochs}"
        it = iter(loader)
        with progress_bar(desc, total=total, unit="img") as bar, self._worker_crash_names_the_file(it, slots):
            bar.advance(start)
            t0 = time.perf_counter()
            for x, y, _, bad in it:
                self._note_bad(bad)
                if x is not None:
                    x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
                    y = y.to(self.device, non_blocking=True)
                    loss, correct = self._step(x, y)
                    st.running["loss"] += loss
                    st.running["correct"] += correct
                    st.running["seen"] += len(y)
                st.batch += 1
                st.batches_seen += 1
                bar.advance(len(bad) + (0 if x is None else len(x)))
                if self.stop_after and st.batches_seen == self.stop_after and signals.received is None:
                    signals.received = signal.SIGINT
                stop = _all_sum([float(signals.received is not None)], self.dist, self.device)[0] > 0
                if stop:
                    st.running["seconds"] += time.perf_counter() - t0
                    return False
            st.running["seconds"] += time.perf_counter() - t0
        return True

    @torch.inference_mode()
    def predict(self, positions: list[int], batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, labels, softmax (N, K)) of the decodable images, in eval mode, single process."""
        self.net.eval()
        ds = ImageDataset(self.ctx.index, positions, eval_reader(self.ctx.preprocessing))
        loader = make_loader(ds, batch_size, min(self.workers, max(0, len(ds) // batch_size)))
        pos, ys, probs = [], [], []
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        for x, y, p, bad in loader:
            self._note_bad(bad)
            if x is None:
                continue
            with amp:
                out = self.net(x.to(self.device).contiguous(memory_format=self.fmt))  # (B, K)
            probs.append(torch.softmax(out.float(), 1).cpu().numpy())
            ys.append(y.numpy())
            pos.append(p.numpy())
        k = len(self.ctx.index.classes)
        if not probs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, k), np.float32)
        return np.concatenate(pos), np.concatenate(ys), np.concatenate(probs)

    def validate(self) -> tuple[float, float]:
        """(accuracy, mean loss) on the validation split; under torchrun each rank takes a shard."""
        val = self.ctx.positions("val")[self.dist.rank :: self.dist.world]
        _, y, p = self.predict(val, self.recipe.batch_size)
        nll = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).sum() if len(y) else 0.0
        correct = float((p.argmax(1) == y).sum()) if len(y) else 0.0
        n, correct, nll = _all_sum([float(len(y)), correct, float(nll)], self.dist, self.device)
        return (correct / n, nll / n) if n else (0.0, 0.0)

    def end_epoch(self) -> bool:
        """Validate, keep the best weights, log, checkpoint; False when early stopping says stop."""
        st, recipe = self.state, self.recipe
        acc, vloss = self.validate()
        run = st.running
        seen = _all_sum([run["seen"], run["loss"], run["correct"]], self.dist, self.device)
        row = {
            "epoch": st.epoch + 1,
            "train_loss": seen[1] / max(seen[0], 1),
            "train_accuracy": seen[2] / max(seen[0], 1),
            "val_loss": vloss,
            "val_accuracy": acc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": seen[0] / max(run["seconds"], 1e-9),
            "seconds": run["seconds"],
        }
        st.history.append(row)
        improved = [acc, -vloss] > st.best
        if improved:
            st.best, st.best_epoch, st.bad_epochs = [acc, -vloss], st.epoch + 1, 0
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
        else:
            st.bad_epochs += 1
        log.info(
            f"epoch {row['epoch']}/{recipe.epochs}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:.3f} | val loss {vloss:.4f} acc {acc:.3f} | "
            f"{row['img_per_s']:.1f} img/s{' | best' if improved else ''}"
        )
        st.epoch += 1
        st.batch = 0
        st.running = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        go_on = st.epoch < recipe.epochs
        if go_on and recipe.patience and st.bad_epochs >= recipe.patience:
            log.info(f"early stop: no better validation accuracy for {recipe.patience} epochs")
            st.stopped_early, go_on = True, False
        st.finished = not go_on
        self.save(best_changed=improved)
        if self.dist.main:
            write_history(self.ctx.run_dir / HISTORY_FILE, st.history)
        return go_on

    def fit(self) -> None:
        """Epochs until the recipe's count or early stop; SIGINT/SIGTERM -> checkpoint + Interrupted."""
        signals = _Signals()
        with signals.installed():
            while not self.state.finished and self.state.epoch < self.recipe.epochs:
                if not self.train_epoch(signals):
                    self.save(best_changed=False)
                    self._raise_interrupted(signals.received)
                if not self.end_epoch():
                    break
        if self.best_weights is not None:
            self.net.load_state_dict(self.best_weights)

    def _raise_interrupted(self, signum: int) -> None:
        name = signal.Signals(signum).name
        st = self.state
        raise Interrupted(
            f"{name}: stopped at epoch {st.epoch + 1}, batch {st.batch}; checkpoint saved in {self.folder}",
            "continue with: "
            + shlex.join(["finetune", "run", str(self.ctx.index.root), "--resume", str(self.ctx.run_dir)]),
            128 + int(signum),
        )


def _worker_slots(workers: int):
    """Shared memory where each decode worker notes the item it reads (None without workers)."""
    if workers <= 0:
        return None
    import multiprocessing

    return multiprocessing.Array("q", [-1] * workers, lock=False)


def _dead_worker_items(it, slots) -> list[int]:
    """Dataset items the dead workers of DataLoader iterator `it` were reading."""
    if slots is None:
        return []
    workers = getattr(it, "_workers", [])
    return [slots[i] for i, w in enumerate(workers) if w.exitcode not in (None, 0) and slots[i] >= 0]


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv, one row per epoch, atomically."""
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    data = buf.getvalue().encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))


def seed_head(ctx: RunContext, trunk: nn.Module, head: nn.Linear, device: torch.device) -> dict:
    """LP-FT: copy a linear probe of the frozen trunk (`probe.linear.lpft_head`) into `head`."""
    from finetune.probe.linear import lpft_head

    w, b, info = lpft_head(ctx, trunk, device)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    return info


def _device_for(opts: RunOptions, dist: Dist) -> torch.device:
    device = pick_device(opts.device)
    if device.type == "cuda" and dist.world > 1:
        return torch.device("cuda", dist.local_rank)  # one GPU per rank
    return device


def run_finetune(ctx: RunContext) -> Outcome:
    """Fine-tune `ctx.backbone` with a new head as `ctx.recipe` says; the best epoch's model.

    Raises:
        TrainingError: non-finite loss, out of memory at batch 1, a full disk, a crashed worker.
        Interrupted: SIGINT/SIGTERM (a checkpoint was saved; `--resume` continues).
    """
    recipe, opts = ctx.recipe, ctx.options
    dist = Dist.from_env()
    device = _device_for(opts, dist)
    trunk = build_trunk(ctx.backbone.model, "pool")
    dim = feature_dim(trunk, ctx.preprocessing.input_size)
    # Seeded after the network is built (which may or may not draw random init numbers,
    # depending on whether a backbone card deferred the build), so the new head is reproducible.
    torch.manual_seed(recipe.seed)
    head = nn.Linear(dim, len(ctx.index.classes))
    probe = {}
    if not ctx.positions("train"):
        raise TrainingError("no training images", "run `finetune check DATA` to see why")
    if opts.resume is None and recipe.init_head == "probe" and dist.main:
        probe = seed_head(ctx, trunk, head, device)  # DDP copies rank 0's weights to the other ranks
    model = Classifier(trunk, head)
    trainer = Trainer(ctx, model, device, dist)
    if opts.resume is not None:
        trainer.restore()
    _log_groups(ctx, trainer)
    trainer.fit()
    metrics, predictions = _final_metrics(trainer)
    st = trainer.state
    metrics["train"] = {
        "epochs": st.epoch,
        "best_epoch": st.best_epoch,
        "stopped_early": st.stopped_early,
        "img_per_s": round(float(np.mean([r["img_per_s"] for r in st.history])), 2) if st.history else 0.0,
        "device": str(device),
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
        "world_size": dist.world,
        "micro_batches": st.micro,
        "groups": [
            {
                "name": g["name"],
                "lr": g["lr"] if "initial_lr" not in g else g["initial_lr"],
                "params": len(g["params"]),
            }
            for g in trainer.optimizer.param_groups
        ],
        "frozen_params": sum(1 for p in model.parameters() if not p.requires_grad),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    extra = {"probe_head": probe} if probe else {}
    extra["device"] = str(device)
    return Outcome(model.state_dict(), "pool", "finetune", metrics, predictions, extra)


def _log_groups(ctx: RunContext, trainer: Trainer) -> None:
    parts = [
        f"{g['name']} lr {g.get('initial_lr', g['lr']):g} ({len(g['params'])} tensors)"
        for g in trainer.optimizer.param_groups
    ]
    frozen = sum(1 for p in trainer.net.parameters() if not p.requires_grad)
    log.info("groups: " + ", ".join(parts) + (f"; {frozen} tensors frozen" if frozen else ""))


def _final_metrics(trainer: Trainer) -> tuple[dict, list[dict]]:
    """Metrics and per-image predictions of the best weights on val (and test)."""
    ctx = trainer.ctx
    metrics: dict = {}
    predictions: list[dict] = []
    if not trainer.dist.main:
        return metrics, predictions
    for split in ("val", "test"):
        positions = ctx.positions(split)
        if not positions:
            continue
        pos, y, probs = trainer.predict(positions, trainer.recipe.batch_size)
        pred = probs.argmax(1)
        metrics[split] = classification_metrics(y, pred, ctx.index.classes, probs)
        predictions += [
            {
                "path": ctx.index.paths[int(p)],
                "split": split,
                "label": ctx.index.classes[int(t)],
                "pred": ctx.index.classes[int(k)],
                "score": float(s[k]),
            }
            for p, t, k, s in zip(pos, y, pred, probs, strict=True)
        ]
    return metrics, predictions
