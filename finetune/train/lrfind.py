"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's `lr_find`).

    test = range_test(ctx)            # a throwaway copy of the model, trained as `finetune run` would
    test.suggested                    # the valley rule on the smoothed losses, below the divergence
    write_points(path, test)          # lr-find.csv: one row per step

A copy of the network is built exactly as `run_finetune` builds it (the LP-FT head if the recipe
seeds one, then `prepare`: frozen stages, BatchNorm policy, parameter groups) and trained with
`train_step` for a short run while the base LR grows exponentially from `start` to `end`; every
group keeps its `lr_mult` ratio to the base. The loss of each step is smoothed (an exponential
moving average with bias correction, as fastai's recorder: beta 0.98 over its 100 steps, and
0.98^(100/steps) over fewer, so the curve is smoothed over the same span of LRs) and the test
stops when the smoothed loss exceeds 4x its minimum or is not finite (fastai's `stop_div`).

The suggestion rule is fastai's "valley" (its default since 2.5): the longest strictly decreasing
subsequence of the smoothed losses ends where the descent bottoms out and has L points; the
valley is the L steps up to that end, and the suggestion is its middle (on the log-LR axis, as
the steps are exponential). Counting only the points that go down, L measures how long the
descent really is: a noisy plateau before it adds few points. Steepest descent (where the
smoothed loss falls fastest) differentiates a noisy curve and lands on the flat start of a
curve like the one below; the minimum's LR / 10 depends on where the loss happens to blow up.
The valley ends before the divergence, so its middle is always below the divergence point.

Measured on sklearn's digits as images (lite0, partial-finetune, 96 px, 100 steps): the loss
stays flat to 1e-4, falls to lr 0.05 and blows up past 0.3; valley suggests 0.0123 (the packaged
recipe's measured lr is 0.01), steepest descent 1e-7, the minimum / 10 0.035.

Under torchrun every rank runs the same steps: the losses are all-reduced in `train_step`, so
every rank sees the same curve, stops at the same step and suggests the same LR. LRs here are
the recipe's `lr` (per process); `prepare` scales the groups by the number of processes.

The pure parts (`lr_schedule`, `smooth_losses`, `divergence`, `valley`, `suggest`) take arrays.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.console import progress_bar
from finetune.data.loader import make_loader
from finetune.errors import TrainingError
from finetune.io import atomic_write
from finetune.method import RunContext
from finetune.recipes import MAX_LR
from finetune.runtime import Dist
from finetune.train.loop import (
    Training,
    _note_bad,
    device_for,
    new_classifier,
    prepare,
    train_step,
    vote,
)
from finetune.train.setup import batches_per_epoch, epoch_plan, set_train_mode
from finetune.train.signals import Signals

log = logging.getLogger(__name__)

START_LR, END_LR = 1e-7, 10.0
MAX_STEPS = 100  # fastai's num_it
MIN_STEPS = 30  # below this the curve has too few points per decade to show a valley
EPOCHS = 5  # passes over a small set at most (MIN_STEPS permitting): memorizing flattens the curve
BETA = 0.98  # fastai's smoothing, for MAX_STEPS steps
DIVERGE = 4.0  # stop once the smoothed loss exceeds this times its minimum
RULE = "valley"
POINTS_FILE = "lr-find.csv"
FIGURE_FILE = "lr-find.png"


# --------------------------------------------------------------------------- pure functions


def lr_schedule(start: float, end: float, steps: int) -> np.ndarray:
    """(steps,) base LRs growing exponentially from `start` to `end`, both included."""
    return np.geomspace(start, end, steps)


def smooth_losses(losses: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Exponential moving average with bias correction (Adam's, fastai's): avg_i / (1 - beta^(i+1)).

    Without the correction the first points would be pulled towards 0 by the average's zero start.
    A non-finite loss makes every later point non-finite: the test stops there anyway.
    """
    out = np.empty(len(losses))
    avg = 0.0
    for i, loss in enumerate(np.asarray(losses, dtype=np.float64)):
        avg = beta * avg + (1 - beta) * loss
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def divergence(smoothed: np.ndarray, factor: float = DIVERGE) -> int | None:
    """Index of the first point that is not finite or above `factor` x the minimum before it, else None."""
    best = np.inf
    for i, s in enumerate(smoothed):
        if not np.isfinite(s) or s > factor * best:
            return i
        best = min(best, s)
    return None


def valley(losses: np.ndarray) -> tuple[int, int]:
    """(first, last) step of fastai's valley: the L steps ending where the longest strictly
    decreasing subsequence of `losses` (L points, gaps allowed) ends.

    O(n^2) for n of about a hundred. Ties: the earliest end.
    """
    n = len(losses)
    length = np.ones(n, dtype=np.int64)  # longest decreasing subsequence ending at i
    for i in range(n):
        for j in range(i):
            if losses[j] > losses[i]:
                length[i] = max(length[i], length[j] + 1)
    end = int(np.argmax(length))
    return end - int(length[end]) + 1, end


def suggest(lrs: np.ndarray, smoothed: np.ndarray, diverged: int | None) -> float:
    """The valley rule: the LR halfway (in steps, so on the log axis) along the `valley` of the
    smoothed loss before `diverged`; rounded to 3 significant digits.

    A curve that never goes down gets the lowest LR tried (the test's start is too high).
    """
    stop = len(smoothed) if diverged is None else diverged
    first, last = valley(np.asarray(smoothed[:stop]))
    return float(f"{lrs[(first + last) // 2]:.3g}")


# --------------------------------------------------------------------------- the test


@dataclass(frozen=True)
class RangeTest:
    """What the range test measured: one entry per step taken, and what it suggests."""

    lrs: np.ndarray  # (steps,) base LR of each step: the recipe's `lr`, per process
    losses: np.ndarray  # (steps,) mean training loss of each step over all processes
    smoothed: np.ndarray  # (steps,) `smooth_losses(losses, beta)`
    beta: float
    group_lrs: dict[str, np.ndarray]  # each parameter group's LR at each step (x processes)
    diverged: int | None  # the step at which the test stopped on divergence (None: it ran to the end)
    suggested: float
    rule: str = RULE

    @property
    def divergence_lr(self) -> float | None:
        return None if self.diverged is None else float(self.lrs[self.diverged])

    def summary(self) -> dict:
        """What config.json and the console say about it."""
        return {
            "suggested_lr": self.suggested,
            "rule": self.rule,
            "steps": len(self.lrs),
            "smoothing_beta": round(self.beta, 6),
            "lr_range": [float(self.lrs[0]), float(self.lrs[-1])],
            "diverged_at_lr": self.divergence_lr,
            "points": POINTS_FILE,
            "figure": FIGURE_FILE,
        }


def range_test(
    ctx: RunContext,
    steps: int | None = None,
    start: float = START_LR,
    end: float = END_LR,
    beta: float | None = None,
) -> RangeTest:
    """Train a copy of `ctx`'s model while the LR grows from `start` to `end` (capped at MAX_LR).

    Args:
        steps: optimizer steps; default MAX_STEPS, or fewer on a small set (EPOCHS passes over
            the training images, at least MIN_STEPS); epochs repeat as needed.
        beta: the loss smoothing; default BETA ** (MAX_STEPS / steps).

    Nothing of `ctx` changes: the network is copied, the recipe's `lr` (a number or "auto") is
    replaced by the schedule, and the copy runs eagerly (no --compile). Every rank calls it
    (`train_step` and the LP-FT head are collectives).

    Raises:
        TrainingError: no training image, start >= end, or what `train_step` raises (out of memory
            with a batch of 1); a diverging loss is not an error here.
    """
    dist = Dist.from_env()
    device = device_for(ctx.options, dist)
    end = min(end, MAX_LR)
    if not 0 < start < end:
        raise TrainingError(
            f"the range test needs 0 < start < end, got {start:g} .. {end:g}",
            f"pick a start below {end:g}",
        )
    train = ctx.positions("train")
    if not train:
        raise TrainingError("no training images", "run `finetune check DATA` to see why")
    if steps is None:
        per_epoch = batches_per_epoch(len(train), ctx.recipe.batch_size, dist.world)
        steps = min(MAX_STEPS, max(MIN_STEPS, EPOCHS * per_epoch))
    lrs = lr_schedule(start, end, steps)
    beta = BETA ** (MAX_STEPS / steps) if beta is None else beta
    # The groups start at lrs[0] x lr_mult (x processes); a constant schedule without warmup
    # leaves them there, and the LambdaLR below walks them along `lrs`.
    recipe = dataclasses.replace(ctx.recipe, lr=float(lrs[0]), schedule="constant", warmup_epochs=0)
    # The run's list of bad files stays its own; --compile would compile a model used for 100 steps.
    options = dataclasses.replace(ctx.options, compile=False)
    test_ctx = dataclasses.replace(ctx, recipe=recipe, options=options, bad={})
    network = copy.deepcopy(ctx.backbone.model)  # the run trains the original
    model, _ = new_classifier(test_ctx, network, device, recipe.init_head == "probe")
    t = prepare(test_ctx, model, device, dist)
    t.guard_loss = False
    t.scheduler = torch.optim.lr_scheduler.LambdaLR(t.optimizer, lambda s: lrs[min(s, steps - 1)] / lrs[0])
    return _run(t, lrs, beta)


def _run(t: Training, lrs: np.ndarray, beta: float) -> RangeTest:
    """Steps of `train_step` along `lrs` until the end or the smoothed loss diverges."""
    losses: list[float] = []
    group_lrs: dict[str, list[float]] = {g["name"]: [] for g in t.optimizer.param_groups}
    diverged = None
    set_train_mode(t.model, t.frozen_norms)
    with progress_bar("lr-find", total=len(lrs), unit="step") as bar:
        for x, y in _batches(t):
            for g in t.optimizer.param_groups:
                group_lrs[g["name"]].append(g["lr"])
            total, _, n = train_step(t, x, y)  # n and the loss are summed over every rank
            losses.append(total / n)
            bar.advance()
            diverged = divergence(smooth_losses(np.asarray(losses), beta))
            if diverged is not None or len(losses) == len(lrs):
                break
    taken = lrs[: len(losses)]
    smoothed = smooth_losses(np.asarray(losses), beta)
    if diverged == 0:
        raise TrainingError(
            f"the training loss was {losses[0]} at the first step (lr {taken[0]:.3g}), before any update",
            "check the images with `finetune check DATA` and the --weights file",
        )
    if diverged is None:
        log.info(f"lr-find: no divergence up to lr {taken[-1]:.3g}")
    else:
        log.info(f"lr-find: the smoothed loss diverged at lr {taken[diverged]:.3g}")
    suggested = suggest(taken, smoothed, diverged)
    return RangeTest(
        lrs=taken,
        losses=np.asarray(losses),
        smoothed=smoothed,
        beta=beta,
        group_lrs={k: np.asarray(v) for k, v in group_lrs.items()},
        diverged=diverged,
        suggested=suggested,
    )


def _batches(t: Training) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's training batches, epoch after epoch in `fit`'s sample order, without end.

    A batch in which some rank could decode no image is skipped by every rank (`vote`).
    """
    recipe, dist, signals = t.recipe, t.dist, Signals()
    epoch = 0
    while True:
        order, _ = epoch_plan(len(t.train_pos), epoch, recipe, dist.world, dist.rank, t.sample_weights)
        workers = min(t.workers, max(0, len(order) // recipe.batch_size))
        loader = make_loader(
            t.dataset, recipe.batch_size, workers, sampler=order.tolist(), seed=recipe.seed + epoch
        )
        for x, y, _, bad in loader:
            _note_bad(t, bad)
            if vote(t, signals, empty=x is None)[1]:
                continue
            yield x.to(t.device).contiguous(memory_format=t.fmt), y.to(t.device)
        epoch += 1


def write_points(path: Path, test: RangeTest) -> None:
    """One CSV row per step: step, lr, loss, smoothed_loss, then lr_<group> for every group."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    names = list(test.group_lrs)
    writer.writerow(["step", "lr", "loss", "smoothed_loss", *(f"lr_{n}" for n in names)])
    for i, lr in enumerate(test.lrs):
        row = [lr, test.losses[i], test.smoothed[i], *(test.group_lrs[n][i] for n in names)]
        writer.writerow([i + 1, *(f"{v:.6g}" for v in row)])
    data = buf.getvalue().encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))
