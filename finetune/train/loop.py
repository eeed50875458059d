"""The fine-tuning loop (partial-finetune, full-finetune) as plain code: one function that takes a RunContext.

`pipeline.run` calls `run_finetune(ctx)` for recipes with method = "finetune"::

    finetune run DATA --strategy partial-finetune            # head x1, top x0.1, middle x0.01, bottom frozen
    finetune run DATA --strategy full-finetune --compile     # everything learns
    finetune run DATA --resume runs/20261123-101500-lite0-partial-finetune

`run_finetune` reads top to bottom: cut the backbone at its pooled layer and put a new
`nn.Linear` head on it, seeded by a linear probe (LP-FT, `probe.linear.lpft_head`) unless
`init_head = "random"`; `prepare` the frozen stages, BatchNorm policy, optimizer groups,
schedule, mixup, loss and weight average (`setup.py`); `fit` epochs of `train_epoch` and
`end_epoch` (validate, keep the best weights, checkpoint, early stop); then the best epoch's
metrics. `Training` holds what a step works on; to add to a step, edit `train_step`.

One optimizer step (`train_step`) takes `accum_steps` loader batches, concatenated: timm's
`Mixup` mixes each batch (seeded by the recipe's seed, the step and the batch), then the
forward and backward run batch by batch (or in smaller micro-batches after an out-of-memory
error), each loss weighted by its share of the step's images, so the gradient is the mean over
all of them; then the gradients are averaged over processes, clipped, the optimizer and the
schedule step, and timm's `ModelEmaV3` (`ema` > 0) takes the new weights into its average.
`end_epoch` validates the raw and the averaged weights; the better is the one kept and saved
(metrics.json `train.weights` and config.json `extra.weights` say which). `--log tensorboard`
gets one call after every step and one after every epoch (`t.logs`, `logs.py`).

Under torchrun every rank runs the same code on its shard (`setup.epoch_plan`), and every
decision that changes control flow is voted once per batch with one all-reduce: a batch in which
some rank could decode no image is skipped by all; a signal on any rank stops all after the same
batch; an out-of-memory error on any rank halves the micro-batch on all; a non-finite or
diverging loss stops all. So every rank takes the same optimizer steps and enters the same
collectives; a rank that dies or hangs stops the others at the process group's timeout.

Checkpoints (`checkpoint.py`) after every epoch and on SIGINT/SIGTERM (`signals.py`): the
state tensors (the weight average's too), then `checkpoint.json` with the progress and what
defines every rank's sample order (epoch, seed, world size). A run stopped between the batches of
one step is saved at the step's first batch (those batches are taken again). A resumed run
rebuilds the order, the per-sample augmentation seeds and the per-step mixup seeds, and skips the
batches done: on CPU with `--workers 0`, interrupted + resumed == uninterrupted, bit for bit,
1 or N processes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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
from finetune.runtime import Dist, all_sum, average_gradients, broadcast_tensors, pick_device
from finetune.train.checkpoint import (
    CHECKPOINT_DIR,
    RECIPE_FILE,
    decode_state,
    encode_state,
    load_checkpoint,
    resume_command,
    save_checkpoint,
    split_digest,
)
from finetune.train.logs import RunLogs, open_logs
from finetune.train.setup import (
    OPTIMIZERS,
    amp_for,
    batchnorm_policy,
    class_weights,
    epoch_plan,
    for_world,
    freeze,
    frozen_names,
    make_ema,
    make_loss,
    make_mixup,
    make_scheduler,
    param_groups,
    set_train_mode,
    steps_per_epoch,
)
from finetune.train.signals import Interrupted, Signals

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.utils import ModelEmaV3

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# Called after every training batch with the run's Progress (tests raise a signal from it).
OnBatch = Callable[["Progress"], None]


@dataclass
class Progress:
    """Where training stands: what a checkpoint's JSON holds besides tensors."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch completed
    step: int = 0  # optimizer steps over the run (the schedule's clock)
    batches_seen: int = 0  # training batches over the run
    best: list[float] = field(default_factory=lambda: [-1.0, -math.inf])  # (val accuracy, -val loss)
    best_epoch: int = 0
    best_kind: str = "raw"  # which weights are the best: "raw" (trained) or "ema" (their average)
    bad_epochs: int = 0
    micro: int = 1  # micro-batches per loader batch: doubled (on every rank) after an out-of-memory error
    saves: int = 0
    loss_start: float | None = None  # the first step's mean loss, and a running average since:
    loss_avg: float | None = None  # divergence is the average rising far above the start
    running: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0})
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    finished: bool = False


@dataclass
class Training:
    """What one fine-tuning run works on, built by `prepare`; the functions below read and advance it."""

    ctx: RunContext
    model: Classifier  # what is saved
    forward: nn.Module  # what a step calls: the model, or torch.compile(model)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    recipe: Recipe  # the LR scaled for the number of processes
    device: torch.device
    dist: Dist
    frozen_norms: list[nn.Module]
    amp_dtype: torch.dtype | None
    fmt: torch.memory_format
    train_pos: list[int]
    dataset: ImageDataset
    sample_weights: np.ndarray | None
    workers: int
    mixup: Mixup | None = None  # recipe mixup / cutmix > 0: loss_fn then takes soft targets
    ema: ModelEmaV3 | None = None  # recipe ema > 0: the weight average
    progress: Progress = field(default_factory=Progress)
    best_weights: dict[str, torch.Tensor] | None = None
    best_file: str | None = None
    reported: set[int] = field(default_factory=set)
    guard_loss: bool = True  # stop on a diverging loss; lr-find turns it off (it measures the rise)
    logs: RunLogs = field(default_factory=RunLogs)  # `--log tensorboard` (rank 0); nothing by default

    @property
    def folder(self) -> Path:
        return self.ctx.run_dir / CHECKPOINT_DIR

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- the run


def run_finetune(ctx: RunContext, on_batch: OnBatch | None = None) -> Outcome:
    """Fine-tune `ctx.backbone` with a new head as `ctx.recipe` says; the best epoch's model.

    Args:
        on_batch: called after every training batch with the Progress (tests stop runs with it).

    Raises:
        TrainingError: non-finite or diverging loss, out of memory at batch 1, a full disk, a
            crashed worker.
        Interrupted: SIGINT/SIGTERM (a checkpoint was saved; `--resume` continues).
    """
    recipe, opts = ctx.recipe, ctx.options
    dist = Dist.from_env()
    device = device_for(opts, dist)
    if not ctx.positions("train"):
        raise TrainingError("no training images", "run `finetune check DATA` to see why")
    lpft = opts.resume is None and recipe.init_head == "probe"
    model, probe = new_classifier(ctx, ctx.backbone.model, device, lpft)
    t = prepare(ctx, model, device, dist)
    if opts.resume is not None:
        restore(t)
    _log_groups(t)
    if lpft:
        keep_start(t)
    resumed_at = t.progress.step if opts.resume is not None else None
    t.logs = open_logs(ctx.run_dir, opts.log, recipe, resumed_at) if dist.main else RunLogs()
    try:
        fit(t, on_batch)
    finally:
        t.logs.close()
    metrics, predictions = final_metrics(t)
    p = t.progress
    metrics["train"] = {
        "epochs": p.epoch,
        "best_epoch": p.best_epoch,
        "stopped_early": p.stopped_early,
        "img_per_s": round(float(np.mean([r["img_per_s"] for r in p.history])), 2) if p.history else 0.0,
        "device": str(device),
        "amp": str(t.amp_dtype).replace("torch.", "") if t.amp_dtype else "off",
        "world_size": dist.world,
        "accum_steps": t.recipe.accum_steps,
        "effective_batch": t.recipe.batch_size * t.recipe.accum_steps * dist.world,
        "micro_batches": p.micro,
        "weights": p.best_kind,
        "groups": [
            {"name": g["name"], "lr": g.get("initial_lr", g["lr"]), "params": len(g["params"])}
            for g in t.optimizer.param_groups
        ],
        "frozen_params": sum(1 for q in t.model.parameters() if not q.requires_grad),
        "trainable_params": sum(q.numel() for q in t.trainable),
    }
    extra = {"probe_head": probe} if probe else {}
    extra["device"] = str(device)
    extra["weights"] = p.best_kind  # "ema" when the weight average validated better than the raw weights
    return Outcome(t.model.state_dict(), "pool", "finetune", metrics, predictions, extra)


def new_classifier(
    ctx: RunContext, network: nn.Module, device: torch.device, lpft: bool
) -> tuple[Classifier, dict]:
    """`network` cut at its pooled layer under a new linear head; (the Classifier, the probe's info).

    lpft: the head starts as a linear probe of the frozen trunk (`seed_head`; every rank calls
    it, its extraction is a collective); else seeded random, and the info is {}.
    """
    trunk = build_trunk(network, "pool")
    dim = feature_dim(trunk, ctx.preprocessing.input_size)
    # Seeded after the network is built (which may or may not draw random init numbers,
    # depending on whether a backbone card deferred the build), so the new head is reproducible.
    torch.manual_seed(ctx.recipe.seed)
    head = nn.Linear(dim, len(ctx.index.classes))
    probe = seed_head(ctx, trunk, head, device) if lpft else {}
    return Classifier(trunk, head), probe


def seed_head(ctx: RunContext, trunk: nn.Module, head: nn.Linear, device: torch.device) -> dict:
    """LP-FT: copy a linear probe of the frozen trunk (`probe.linear.lpft_head`) into `head`.

    Every rank calls it (the extraction shards the images and gathers them on every rank, so
    every rank fits the same head; `prepare` then gives all ranks rank 0's weights regardless).
    """
    from finetune.probe.linear import lpft_head

    w, b, info = lpft_head(ctx, trunk, device)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    return info


def prepare(ctx: RunContext, model: Classifier, device: torch.device, dist: Dist) -> Training:
    """Freeze, BatchNorm policy, rank 0's weights on every rank, optimizer groups, schedule, mixup,
    loss, weight average, data."""
    recipe = for_world(ctx.recipe, dist.world)
    freeze(model, frozen_names(stages(model.trunk), recipe))
    model, frozen_norms = batchnorm_policy(model, recipe, device, dist.world)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(device, memory_format=fmt)
    broadcast_tensors([*model.parameters(), *model.buffers()], dist)  # every rank starts from rank 0's
    groups = param_groups(
        stages(model.trunk), recipe, dict(model.trunk.named_parameters()), list(model.head.parameters())
    )
    optimizer = OPTIMIZERS[recipe.optimizer](groups, recipe)
    amp_dtype, needs_scaler = amp_for(device)
    train_pos = ctx.positions("train")
    per_epoch = steps_per_epoch(len(train_pos), recipe, dist.world)
    scheduler = make_scheduler(
        optimizer, recipe.epochs * per_epoch, recipe.warmup_epochs * per_epoch, recipe.schedule
    )
    labels = np.asarray([ctx.index.labels[p] for p in train_pos])
    class_w = class_weights(labels, len(ctx.index.classes))
    weight = (
        torch.tensor(class_w, dtype=torch.float32, device=device) if recipe.balance == "weights" else None
    )
    return Training(
        ctx=ctx,
        model=model,
        forward=torch.compile(model) if ctx.options.compile else model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda") if needs_scaler else None,
        loss_fn=make_loss(recipe, weight),
        recipe=recipe,
        device=device,
        dist=dist,
        frozen_norms=frozen_norms,
        amp_dtype=amp_dtype,
        fmt=fmt,
        train_pos=train_pos,
        dataset=ImageDataset(
            ctx.index,
            train_pos,
            train_reader(ctx.preprocessing, recipe.augment, recipe.augment_scale, recipe.random_erasing),
        ),
        sample_weights=class_w[labels] if recipe.balance == "sampler" else None,
        workers=default_workers() if ctx.options.workers is None else ctx.options.workers,
        mixup=make_mixup(recipe, len(ctx.index.classes)),
        ema=make_ema(model, recipe),  # a copy of rank 0's weights, as every rank's
    )


def fit(t: Training, on_batch: OnBatch | None = None) -> None:
    """Epochs until the recipe's count or early stop; SIGINT/SIGTERM -> checkpoint + Interrupted."""
    signals = Signals()
    p = t.progress
    with signals.installed():
        while not p.finished:
            stop = train_epoch(t, signals, on_batch)
            if stop is not None:
                save(t, best_changed=False)
                raise _interrupted(t, stop)
            end_epoch(t)
            stop = vote(t, signals)[0] if not p.finished else None
            if stop is not None:  # it arrived while validating: the epoch's checkpoint is saved
                raise _interrupted(t, stop)
    if t.best_weights is not None:
        t.model.load_state_dict(t.best_weights)


def keep_start(t: Training) -> None:
    """LP-FT's start, the pretrained trunk with the linear probe's head, is epoch 0 of the choice
    of the best epoch: validated like every epoch, so fine-tuning never returns a model that
    validates worse than the probe it started from (on a style shift it can: measured on the
    fonts of benchmarks/transfer.py). Every rank validates its shard; no history row is written.
    """
    acc, loss = validate(t)
    if not math.isfinite(loss):
        return
    p = t.progress
    p.best, p.best_epoch, p.best_kind = [acc, -loss], 0, "raw"
    t.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in t.model.state_dict().items()}
    log.info(f"epoch 0 (the linear probe's head on the pretrained trunk): val loss {loss:.4f} acc {acc:.3f}")


# --------------------------------------------------------------------------- one step


def train_step(t: Training, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
    """One optimizer step on this rank's images of the step (x (N, 3, H, W), y (N,) class indices).

    N is up to batch_size x accum_steps: the step's loader batches, concatenated. Each batch of
    `batch_size` is mixed (`mix`), then forward and backward run batch by batch, in
    `progress.micro` pieces each, the losses weighted to the mean over the N images. Returns
    (summed loss, correct, images) over every rank; correct compares the argmax with the hard
    labels, also under mixup. Collectives: one all-reduce of what each rank's backward gave (out
    of memory? loss, correct, count), then the gradient average.
    """
    p, dist = t.progress, t.dist
    target = mix(t, x, y)  # once: a retry after an out-of-memory error trains on the same mixed images
    while True:
        t.optimizer.zero_grad(set_to_none=True)
        piece = _piece_size(t)
        try:
            loss_sum, correct = _forward_backward(t, x, y, target, piece)
            oom = 0.0
        except _OOM:
            t.optimizer.zero_grad(set_to_none=True)
            if t.device.type == "cuda":
                torch.cuda.empty_cache()
            loss_sum, correct, oom = torch.zeros(()), torch.zeros(()), 1.0
        at_one = float(oom > 0 and piece == 1)
        votes = all_sum([oom, at_one, float(loss_sum), float(correct), float(len(y))], dist, t.device)
        if votes[1] > 0:
            raise TrainingError(
                f"out of memory with a batch of 1 image at size {t.ctx.preprocessing.input_size}",
                "use a smaller --set image_size, a smaller backbone, or another device",
            )
        if votes[0] > 0:  # some rank ran out of memory: every rank retries in halves
            p.micro *= 2
            log.info(
                f"out of GPU memory: retrying with batches of {_piece_size(t)} images "
                f"({p.micro} per batch, so the effective batch stays {len(y)})"
            )
            continue
        total, n_correct, n = votes[2], votes[3], votes[4]
        _check_loss(t, total / n)
        average_gradients(t.trainable, dist)
        if t.scaler:
            t.scaler.unscale_(t.optimizer)
        if t.recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(t.trainable, t.recipe.grad_clip)
        if t.scaler:
            t.scaler.step(t.optimizer)
            t.scaler.update()
        else:
            t.optimizer.step()
        t.scheduler.step()
        p.step += 1
        if t.ema is not None:
            t.ema.update(t.model, step=p.step)  # every rank has the same weights, so the same average
        return total, int(n_correct), int(n)


def mix(t: Training, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The step's targets: y itself without mixup; else x mixed in place by timm's `Mixup`, in
    chunks of `batch_size` images (the loader batches, unless one lost an undecodable image), and
    the (N, K) soft targets.

    timm mixes image i with image B-1-i of a chunk, so an odd chunk (an epoch's last batch, say)
    is not mixed: its targets are the label-smoothed one-hot rows, and every image is still
    trained on. Mixup draws from numpy's global generator, seeded here by (recipe seed, step,
    chunk of the step, rank): a resumed run mixes exactly as before.
    """
    if t.mixup is None:
        return y
    from timm.data.mixup import mixup_target

    size, rank, k = t.recipe.batch_size, t.dist.rank, t.mixup.num_classes
    targets = []
    for i, (xs, ys) in enumerate(zip(x.split(size), y.split(size), strict=True)):
        if len(ys) % 2:
            targets.append(mixup_target(ys, k, 1.0, t.mixup.label_smoothing))  # (b, K)
            continue
        seed = np.random.SeedSequence([t.recipe.seed, t.progress.step, i, rank]).generate_state(1)[0]
        with seeded_rngs(int(seed)):
            targets.append(t.mixup(xs, ys)[1])  # xs is a view: x is mixed in place; (b, K)
    return torch.cat(targets)


def _piece_size(t: Training) -> int:
    """Images per forward: a loader batch, halved `log2(progress.micro)` times after running out of memory."""
    return math.ceil(t.recipe.batch_size / t.progress.micro)


def _forward_backward(
    t: Training, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, piece: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of this rank's mean loss over x, `piece` images per forward; no collective.

    `target` is what the loss takes (y, or mixup's (N, K) soft targets); accuracy counts against y.
    Returns (loss sum, correct).
    """
    amp = torch.autocast(t.device.type, dtype=t.amp_dtype) if t.amp_dtype else nullcontext()
    total = torch.zeros((), device=t.device)
    correct = torch.zeros((), dtype=torch.long, device=t.device)
    pieces = list(zip(x.split(piece), y.split(piece), target.split(piece), strict=True))
    for xs, ys, ts in pieces:
        with amp:
            logits = t.forward(xs)  # (b, K)
        loss = t.loss_fn(logits.float(), ts)
        scaled = loss * (len(ys) / len(y)) if len(pieces) > 1 else loss  # the sum is the mean over x
        (t.scaler.scale(scaled) if t.scaler else scaled).backward()
        total += loss.detach() * len(ys)
        correct += (logits.detach().argmax(1) == ys).sum()
    return total, correct


def diverged(start: float, average: float, n_classes: int) -> bool:
    """Whether a running loss average has risen far above the first step's loss.

    "Far": by more than twice the larger of the start and the loss of guessing (ln K). A network
    that learns never gets there; one whose learning rate is too high does within a few steps.
    """
    return average > start + 2 * max(start, math.log(max(n_classes, 2)))


def _check_loss(t: Training, mean: float) -> None:
    """Stop on a non-finite loss or a diverging one (every rank sees the same all-reduced mean)."""
    p = t.progress
    if not t.guard_loss:
        return
    if math.isfinite(mean):
        if p.loss_start is None:
            p.loss_start = p.loss_avg = mean
        p.loss_avg = 0.9 * p.loss_avg + 0.1 * mean
        if not diverged(p.loss_start, p.loss_avg, len(t.ctx.index.classes)):
            return
        what = f"training diverged: the loss rose from {p.loss_start:.3g} to {p.loss_avg:.3g}"
    else:
        what = f"the training loss became {mean}"
    raise _too_high(t, f"{what} at epoch {p.epoch + 1}, batch {p.batch + 1}")


def _too_high(t: Training, what: str) -> TrainingError:
    lr, now = t.ctx.recipe.lr, t.optimizer.param_groups[0]["lr"]
    factor = t.dist.world * t.recipe.accum_steps
    scaled = f", x {factor} for the effective batch" if factor > 1 else ""
    return TrainingError(
        f"{what}: the learning rate is likely too high (lr = {lr:g}{scaled}, now {now:g})",
        f"lower it, e.g. --set lr={lr / 10:g}",
    )


# --------------------------------------------------------------------------- epochs


def train_epoch(t: Training, signals: Signals, on_batch: OnBatch | None = None) -> int | None:
    """Train the rest of the current epoch; the signal that stopped it (nothing saved yet), or None.

    Every `accum_steps` loader batches (and the epoch's last ones) make one `train_step`. A signal
    between the batches of a step stops before that step: `progress.batch` goes back to its first
    batch, so a checkpoint (and a resume) never holds half a step.
    """
    p, recipe, dist = t.progress, t.recipe, t.dist
    order, seeds = epoch_plan(len(t.train_pos), p.epoch, recipe, dist.world, dist.rank, t.sample_weights)
    set_train_mode(t.model, t.frozen_norms)
    start = p.batch * recipe.batch_size
    rest = order[start:]
    n_batches = math.ceil(len(order) / recipe.batch_size)  # the same on every rank
    slots = _worker_slots(t.workers)
    dataset = _SeededDataset(t.dataset, seeds, slots)
    loader = make_loader(
        dataset,
        recipe.batch_size,
        min(t.workers, max(0, len(rest) // recipe.batch_size)),
        sampler=rest.tolist(),
        seed=recipe.seed,
    )
    with _workers_born_deaf():
        it = iter(loader)  # forks the decode workers
    group: list[tuple[torch.Tensor, torch.Tensor]] = []  # the (x, y) batches of the step so far
    with (
        progress_bar(f"epoch {p.epoch + 1}/{recipe.epochs}", total=len(order), unit="img") as bar,
        _worker_crash_names_the_file(t, it, slots),
    ):
        bar.advance(start)
        t0 = time.perf_counter()
        for x, y, _, bad in it:
            _note_bad(t, bad)
            # Decided by every rank together before the step: a signal anywhere stops all (this
            # batch is not counted; a resume takes it again); no image anywhere skips it for all.
            stop, skip = vote(t, signals, empty=x is None)
            if stop is not None:
                undone = p.batch % recipe.accum_steps  # batches of a step not taken: taken again
                p.batch -= undone
                p.batches_seen -= undone
                p.running["seconds"] += time.perf_counter() - t0
                return stop
            if not skip:
                group.append((x, y))
            p.batch += 1
            p.batches_seen += 1
            if p.batch % recipe.accum_steps == 0 or p.batch == n_batches:
                if group:  # (empty when every batch of the step was skipped, on every rank alike)
                    _step(t, group)
                group = []
            bar.advance(len(bad) + (0 if x is None else len(x)))
            if on_batch is not None:
                on_batch(p)
        p.running["seconds"] += time.perf_counter() - t0
    return vote(t, signals)[0]  # a signal during the last batch: no validation pass after it


def _step(t: Training, group: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """`train_step` on a step's loader batches, concatenated; its loss and accuracy into the running sums."""
    x = group[0][0] if len(group) == 1 else torch.cat([b[0] for b in group])  # (N, 3, H, W)
    y = group[0][1] if len(group) == 1 else torch.cat([b[1] for b in group])  # (N,)
    x = x.to(t.device, non_blocking=True).contiguous(memory_format=t.fmt)
    y = y.to(t.device, non_blocking=True)
    loss, correct, n = train_step(t, x, y)
    t.logs.step(t.progress.step, loss / n, correct / n, n, t.optimizer.param_groups)
    t.progress.running["loss"] += loss
    t.progress.running["correct"] += correct
    t.progress.running["seen"] += n


def vote(t: Training, signals: Signals, empty: bool = False) -> tuple[int | None, bool]:
    """What every rank decides together, in one all-reduce: (the signal any rank received, SIGTERM
    over SIGINT, or None; whether some rank has no decodable image in this batch, so all skip it)."""
    got = signals.received
    votes = all_sum(
        [float(got == signal.SIGINT), float(got == signal.SIGTERM), float(empty)], t.dist, t.device
    )
    stop = signal.SIGTERM if votes[1] > 0 else signal.SIGINT if votes[0] > 0 else None
    return stop, votes[2] > 0


@torch.inference_mode()
def predict(
    t: Training, positions: list[int], batch_size: int, model: nn.Module | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, labels, softmax (N, K)) of the decodable images by `model` (default: the trained
    one; or the weight average), in eval mode, this rank alone."""
    model = t.model if model is None else model
    model.eval()
    ds = ImageDataset(t.ctx.index, positions, eval_reader(t.ctx.preprocessing))
    loader = make_loader(ds, batch_size, min(t.workers, max(0, len(ds) // batch_size)))
    pos, ys, probs = [], [], []
    amp = torch.autocast(t.device.type, dtype=t.amp_dtype) if t.amp_dtype else nullcontext()
    for x, y, p, bad in loader:
        _note_bad(t, bad)
        if x is None:
            continue
        with amp:
            out = model(x.to(t.device).contiguous(memory_format=t.fmt))  # (B, K)
        probs.append(torch.softmax(out.float(), 1).cpu().numpy())
        ys.append(y.numpy())
        pos.append(p.numpy())
    k = len(t.ctx.index.classes)
    if not probs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(pos), np.concatenate(ys), np.concatenate(probs)


def validate(t: Training, model: nn.Module | None = None) -> tuple[float, float]:
    """(accuracy, mean loss) of `model` (default: the trained one) on the validation split; under
    torchrun each rank takes a shard."""
    val = t.ctx.positions("val")[t.dist.rank :: t.dist.world]
    _, y, p = predict(t, val, t.recipe.batch_size, model)
    nll = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).sum() if len(y) else 0.0
    correct = float((p.argmax(1) == y).sum()) if len(y) else 0.0
    n, correct, nll = all_sum([float(len(y)), correct, float(nll)], t.dist, t.device)
    return (correct / n, nll / n) if n else (0.0, 0.0)


def end_epoch(t: Training) -> None:
    """Validate (the raw weights, and their average with `ema`), keep the best weights, log,
    checkpoint; sets `finished` at the last epoch or early stop.

    The better of raw and average (validation accuracy, then loss) is this epoch's score; the best
    epoch's better weights are what the run saves (`progress.best_kind` says which).

    Raises:
        TrainingError: the validation loss is not finite (such a model is never kept as the best).
    """
    p, recipe = t.progress, t.recipe
    # BatchNorm statistics that train on gloo (no SyncBatchNorm on CPU) drift apart per rank:
    # everyone validates and saves rank 0's, as DistributedDataParallel's buffer broadcast would.
    broadcast_tensors(list(t.model.buffers()), t.dist)
    acc, vloss = validate(t)
    if not math.isfinite(vloss):
        raise _too_high(t, f"the validation loss became {vloss} after epoch {p.epoch + 1}")
    run = p.running
    row = {
        "epoch": p.epoch + 1,
        "train_loss": run["loss"] / max(run["seen"], 1),
        "train_accuracy": run["correct"] / max(run["seen"], 1),
        "val_loss": vloss,
        "val_accuracy": acc,
        "lr": t.optimizer.param_groups[0]["lr"],
        "img_per_s": run["seen"] / max(run["seconds"], 1e-9),
        "seconds": run["seconds"],
    }
    kind, score, model = "raw", [acc, -vloss], t.model
    if t.ema is not None:
        broadcast_tensors(list(t.ema.module.buffers()), t.dist)
        ema_acc, ema_loss = validate(t, t.ema.module)
        row |= {"ema_val_loss": ema_loss, "ema_val_accuracy": ema_acc}
        if math.isfinite(ema_loss) and [ema_acc, -ema_loss] > score:
            kind, score, model = "ema", [ema_acc, -ema_loss], t.ema.module
    p.history.append(row)
    t.logs.epoch(row)
    improved = score > p.best
    if improved:
        p.best, p.best_epoch, p.best_kind, p.bad_epochs = score, p.epoch + 1, kind, 0
        t.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    else:
        p.bad_epochs += 1
    ema = f" (ema loss {row['ema_val_loss']:.4f} acc {row['ema_val_accuracy']:.3f})" if t.ema else ""
    best = (f" | best ({kind})" if t.ema else " | best") if improved else ""
    log.info(
        f"epoch {row['epoch']}/{recipe.epochs}: train loss {row['train_loss']:.4f} "
        f"acc {row['train_accuracy']:.3f} | val loss {vloss:.4f} acc {acc:.3f}{ema} | "
        f"{row['img_per_s']:.1f} img/s{best}"
    )
    p.epoch += 1
    p.batch = 0
    p.running = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    go_on = p.epoch < recipe.epochs
    if go_on and recipe.patience and p.bad_epochs >= recipe.patience:
        log.info(f"early stop: no better validation accuracy for {recipe.patience} epochs")
        p.stopped_early, go_on = True, False
    p.finished = not go_on
    save(t, best_changed=improved)
    if t.dist.main:
        write_history(t.ctx.run_dir / HISTORY_FILE, p.history)


# --------------------------------------------------------------------------- checkpoints


def save(t: Training, best_changed: bool) -> None:
    """Rank 0 writes a checkpoint of `t` (see `checkpoint.save_checkpoint`); the others do nothing."""
    if not t.dist.main:
        return
    ctx, opts, p = t.ctx, t.ctx.options, t.progress
    p.saves += 1  # a fresh file name: the committed checkpoint is never overwritten
    best_changed = best_changed or (t.best_weights is not None and t.best_file is None)  # epoch 0's
    meta, tensors = encode_state(t.model, t.optimizer, t.scheduler, t.scaler, t.ema)
    meta |= {
        **dataclasses.asdict(p),
        "recipe": ctx.recipe.to_dict(),  # as written (unscaled), for --resume
        "classes": list(ctx.index.classes),
        "split_sha256": split_digest(ctx),
        "world": t.dist.world,  # with recipe.seed and the epoch: every rank's sample order
        "data": str(ctx.index.root),
        "options": {
            "backbone": opts.backbone,
            "weights": str(opts.weights) if opts.weights else None,
            "weights_map": opts.weights_map,
            "pretrained": opts.pretrained,
            "val_fraction": opts.val_fraction,
            "seed": opts.seed,
            "labels_csv": str(opts.labels_csv) if opts.labels_csv else None,
            "log": list(opts.log),  # the resumed run goes on writing the same logs
        },
    }
    if not best_changed and t.best_file:
        meta["best_tensors"] = t.best_file  # unchanged: keep pointing at the file we have
    if not (t.folder / RECIPE_FILE).exists():
        text = ctx.recipe.to_toml()
        atomic_write(t.folder / RECIPE_FILE, lambda fh: fh.write(text.encode("utf-8")))
    save_checkpoint(t.folder, meta, tensors, t.best_weights if best_changed else None)
    if best_changed:
        t.best_file = f"best-{p.saves:06d}.safetensors"


def restore(t: Training) -> None:
    """Continue from the run folder's checkpoint (rank 0 reads it; every rank gets the same state)."""
    meta, tensors, best = load_checkpoint(t.folder, t.dist)
    if meta["classes"] != list(t.ctx.index.classes) or meta["split_sha256"] != split_digest(t.ctx):
        raise RunError(
            "the data changed since this run started (other classes or training files)",
            "resume on the same folder, or start a new run",
        )
    decode_state(meta, tensors, t.model, t.optimizer, t.scheduler, t.scaler, t.ema)
    fields = {f.name for f in dataclasses.fields(Progress)}
    t.progress = Progress(**{k: v for k, v in meta.items() if k in fields})
    t.best_weights = best
    t.best_file = meta.get("best_tensors")


def _interrupted(t: Training, signum: int) -> Interrupted:
    p = t.progress
    where = t.folder if t.dist.main else "the run folder of rank 0"
    return Interrupted(
        f"{signal.Signals(signum).name}: stopped at epoch {p.epoch + 1}, batch {p.batch}; "
        f"checkpoint saved in {where}",
        "continue with: " + resume_command(str(t.ctx.index.root), t.ctx.run_dir, t.dist.world),
        128 + int(signum),
    )


# --------------------------------------------------------------------------- after training


def final_metrics(t: Training) -> tuple[dict, list[dict]]:
    """Metrics and per-image predictions of the best weights on val (and test); rank 0 alone."""
    ctx = t.ctx
    metrics: dict = {}
    predictions: list[dict] = []
    if not t.dist.main:
        return metrics, predictions
    for split in ("val", "test"):
        positions = ctx.positions(split)
        if not positions:
            continue
        pos, y, probs = predict(t, positions, t.recipe.batch_size)
        pred = probs.argmax(1)
        metrics[split] = classification_metrics(y, pred, ctx.index.classes, probs)
        predictions += [
            {
                "path": ctx.index.paths[int(p)],
                "split": split,
                "label": ctx.index.classes[int(k)],
                "pred": ctx.index.classes[int(j)],
                "score": float(s[j]),
            }
            for p, k, j, s in zip(pos, y, pred, probs, strict=True)
        ]
    return metrics, predictions


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


def _log_groups(t: Training) -> None:
    parts = [
        f"{g['name']} lr {g.get('initial_lr', g['lr']):g} ({len(g['params'])} tensors)"
        for g in t.optimizer.param_groups
    ]
    frozen = sum(1 for q in t.model.parameters() if not q.requires_grad)
    log.info("groups: " + ", ".join(parts) + (f"; {frozen} tensors frozen" if frozen else ""))


def device_for(opts: RunOptions, dist: Dist) -> torch.device:
    """`--device` resolved; under torchrun on CUDA, this rank's own GPU."""
    device = pick_device(opts.device)
    if device.type == "cuda" and dist.world > 1:
        return torch.device("cuda", dist.local_rank)  # one GPU per rank
    return device


# --------------------------------------------------------------------------- data faults


def _note_bad(t: Training, bad: dict[int, str]) -> None:
    for pos, reason in bad.items():
        if pos not in t.reported:
            t.reported.add(pos)
            t.ctx.bad[pos] = reason
            log.info(f"skipped {t.ctx.index.paths[pos]}: {reason}")


class _SeededDataset:
    """ImageDataset whose random augmentation of item i is seeded by seeds[i] (`seeded_rngs`), not by
    the global generators.

    That makes a sample's crop independent of worker count, batch position and resumes.
    Decode workers ignore SIGINT and SIGTERM: Ctrl-C reaches the terminal's whole process group,
    and schedulers (Slurm, torchrun's agent) signal every process of a job; the main process
    handles the signal and saves a checkpoint, which needs its workers alive until then.
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
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if info is not None and self.slots is not None:
            self.slots[info.id] = i  # which file this worker reads now: named if the worker dies
        with seeded_rngs(int(self.seeds[i])):
            return self.base[i]


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """torch's CPU generator, Python's `random` and numpy's global generator seeded with `seed`
    inside, and given back their states after: augmentation draws from all three (torchvision
    from torch; timm's RandAugment, RandomErasing and Mixup from `random` and numpy)."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextmanager
def _workers_born_deaf() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread while decode workers are forked, then given back.

    A worker inherits the mask, so a signal sent to the whole job (Ctrl-C, Slurm, torchrun's
    agent) can never kill one in the moment before it ignores them (`_SeededDataset`): with short
    epochs that moment came every epoch, and such a run ended "an image decode worker crashed"
    instead of saving a checkpoint. A signal that reaches this process meanwhile stays pending and
    is handled when the mask is given back, so none is lost.
    """
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def _worker_crash_names_the_file(t: Training, it, slots) -> Iterator[None]:
    """A dead decode worker (torch raises a RuntimeError at the next SIGCHLD or fetch) becomes a
    TrainingError naming the file that worker was reading.

    Whatever ends the epoch, the surviving workers are stopped here: an exception keeps the
    iterator alive in its traceback, and a worker left waiting on its queue would keep the
    process from exiting (multiprocessing joins its children at exit).
    """
    try:
        yield
    except RuntimeError as err:
        if "DataLoader worker" not in str(err):
            raise
        names = sorted({t.ctx.index.paths[t.train_pos[i]] for i in _dead_worker_items(it, slots)})
        where = f" while reading {', '.join(names)}" if names else ""
        raise TrainingError(
            f"an image decode worker crashed{where}",
            "move that file out of the data folder (or run with --workers 0 to see the error)",
        ) from None
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own clean-up of the workers
        if shutdown is not None:
            shutdown()


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
