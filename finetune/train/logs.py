"""What `--log` writes while a fine-tune trains, beyond `history.csv` (which is always written).

    kinds = check_logs(["csv,tensorboard"])          # ("csv", "tensorboard"); refused before any work
    logs = open_logs(run_dir, kinds, recipe)         # rank 0; RunLogs() writes nothing
    logs.step(step, loss, accuracy, images, optimizer.param_groups)   # after every optimizer step
    logs.epoch(row)                                  # history.csv's row, after validation
    logs.close()

`tensorboard` writes event files under RUN_DIR/tensorboard/ (`torch.utils.tensorboard`):
per step `step/loss`, `step/accuracy`, `step/lr/<group>` (head, top, middle, bottom) and
`step/img_per_s`; per epoch `epoch/<column>` of history.csv (train and val loss and accuracy,
lr, img/s); and the resolved recipe as hparams, with `epoch/val_accuracy` and `epoch/val_loss`
as its metrics. See them with `tensorboard --logdir runs`. MLflow is not offered.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.recipes import Recipe

LOG_KINDS = ("csv", "tensorboard")  # csv: history.csv, written by every fine-tune anyway
TENSORBOARD_DIR = "tensorboard"
INSTALL = 'pip install "finetune[tensorboard]"'


def check_logs(values: str | Iterable[str]) -> tuple[str, ...]:
    """`--log` values (repeated or comma lists) as known kinds, csv always first.

    Raises:
        FinetuneError: an unknown kind, or tensorboard asked for and not installed.
    """
    kinds = ["csv"]
    for value in [values] if isinstance(values, str) else values:
        for kind in (k.strip().lower() for k in str(value).split(",")):
            if kind not in LOG_KINDS:
                raise FinetuneError(
                    f"--log {kind or repr(value)} is not a kind of log",
                    f"choose {' or '.join(LOG_KINDS)} (MLflow is not supported)",
                )
            if kind not in kinds:
                kinds.append(kind)
    if "tensorboard" in kinds:
        try:
            import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
        except ImportError:
            raise FinetuneError("--log tensorboard needs tensorboard, not installed here", INSTALL) from None
    return tuple(kinds)


def hparams_of(recipe: Recipe) -> dict[str, Any]:
    """The recipe as TensorBoard hparams: numbers, text and booleans only (lr_mult.head, ...)."""
    out: dict[str, Any] = {}
    for key, value in recipe.to_dict().items():
        if isinstance(value, dict):
            out |= {f"{key}.{k}": v for k, v in value.items()}
        elif isinstance(value, (list, tuple)):
            out[key] = ", ".join(f"{v:g}" for v in value)
        else:
            out[key] = value
    return out


class RunLogs:
    """One writer for the run's `--log` outputs; without a SummaryWriter every method does nothing."""

    def __init__(self, writer: Any = None) -> None:
        self.writer = writer  # torch.utils.tensorboard.SummaryWriter, or None
        self._clock = time.perf_counter()

    def step(
        self, step: int, loss: float, accuracy: float, images: int, groups: Sequence[dict[str, Any]]
    ) -> None:
        """Scalars of optimizer step `step` (1-based): loss, accuracy, every group's LR, img/s.

        img/s counts the wall time since the previous step (or epoch end): decoding included.
        The LRs are the groups' after the step, i.e. what the schedule gives step `step + 1`.
        """
        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now
        if self.writer is None:
            return
        w = self.writer
        w.add_scalar("step/loss", loss, step)
        w.add_scalar("step/accuracy", accuracy, step)
        for g in groups:
            w.add_scalar(f"step/lr/{g['name']}", g["lr"], step)
        w.add_scalar("step/img_per_s", images / max(seconds, 1e-9), step)

    def epoch(self, row: dict[str, Any]) -> None:
        """history.csv's row of an epoch as `epoch/<column>` scalars at x = the epoch number."""
        self._clock = time.perf_counter()  # the next step's img/s leaves validation out
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_logs(run_dir: Path, kinds: Sequence[str], recipe: Recipe, resumed_at: int | None = None) -> RunLogs:
    """The logs `kinds` ask for, in `run_dir`; the recipe goes in as hparams (call on rank 0 only).

    `resumed_at`: the optimizer steps the resumed checkpoint holds. Steps after it that an earlier
    process logged before it died (a kill after the last checkpoint) are logged again now; the
    writer's `purge_step` tells TensorBoard to hide the earlier ones, so each curve has one point
    per step. (Epoch scalars sit at x = epoch, below that step: they are kept.)
    """
    if "tensorboard" not in kinds:
        return RunLogs()
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    purge = None if resumed_at is None else resumed_at + 1  # steps are logged 1-based
    writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge)
    # In the run's own event file (add_hparams would open a sub-run): TensorBoard's HParams tab
    # reads the metrics from this run's scalars of the same names.
    metrics = {"epoch/val_accuracy": 0.0, "epoch/val_loss": 0.0}
    for summary in hparams(hparams_of(recipe), metrics):
        writer.file_writer.add_summary(summary)
    return RunLogs(writer)
