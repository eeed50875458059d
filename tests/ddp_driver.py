"""Several `finetune` commands in one torchrun launch, each with its own caches and faults (tests only).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_driver.py SPEC RESULT

SPEC (JSON) is a list of {"args": [...], "cache": [rank 0's FINETUNE_CACHE, rank 1's],
"faults": {...}, "go_on": bool}; rank 0 writes RESULT (JSON): each command's exit code. A
command that fails ends the launch with its exit code, as the CLI would, unless "go_on" (a
failure every rank took together). Each rank's FINETUNE_CACHE is its own, as on two machines
with node-local caches. One process group serves every command: torch does not reliably create
a second one in the same process, so `runtime.stop_distributed` only waits for the others here.

Faults (what a cluster does to a run), by the rank they hit:
    "sigterm_at": N          rank 0 gets SIGTERM after training batch N (a scheduler's preemption)
    "oom_rank": r            rank r runs out of memory on any batch as large as the recipe's
    "empty_rank": r          rank r decodes no image of its first training batch
    "raise_at": [r, N]       rank r raises a TrainingError after batch N
    "hang_at": [r, N]        rank r hangs after batch N
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

import finetune.runtime as runtime
from finetune.app import pipeline
from finetune.cli import app
from finetune.data.decode import ImageError
from finetune.errors import TrainingError
from finetune.train import loop

RANK = int(os.environ["RANK"])


class _SmallMemory(torch.nn.Module):
    """A forward that raises CUDA's out-of-memory error for more than `limit` images."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit = model, limit

    def forward(self, x):
        if len(x) > self.limit:
            raise loop._OOM("CUDA out of memory (injected)")
        return self.model(x)


def install(faults: dict) -> None:
    """Patch the loop for one command (undone by `reset`)."""

    def on_batch(p: loop.Progress) -> None:
        n = p.batches_seen
        if faults.get("sigterm_at") == n and RANK == 0:
            signal.raise_signal(signal.SIGTERM)
        if faults.get("raise_at") == [RANK, n]:
            raise TrainingError(f"injected failure on rank {RANK}", "none: a test")
        if faults.get("hang_at") == [RANK, n]:
            time.sleep(3600)

    pipeline.METHODS["finetune"] = lambda ctx: loop.run_finetune(ctx, on_batch=on_batch)

    def prepare(ctx, model, device, dist):
        t = _prepare(ctx, model, device, dist)
        if faults.get("oom_rank") == RANK:
            t.forward = _SmallMemory(t.model, t.recipe.batch_size - 1)
        if faults.get("empty_rank") == RANK:
            read, calls = t.dataset.read, [0]

            def failing(path):
                calls[0] += 1
                if calls[0] <= t.recipe.batch_size:
                    raise ImageError("injected decode failure")
                return read(path)

            t.dataset.read = failing
        return t

    loop.prepare = prepare


_prepare, _finetune = loop.prepare, pipeline.METHODS["finetune"]


def reset() -> None:
    loop.prepare = _prepare
    pipeline.METHODS["finetune"] = _finetune


def main(spec_file: str, result_file: str) -> None:
    stop = runtime.stop_distributed
    runtime.stop_distributed = lambda: torch.distributed.barrier()
    codes = []
    for spec in json.loads(Path(spec_file).read_text()):
        os.environ["FINETUNE_CACHE"] = spec["cache"][RANK]
        install(spec.get("faults", {}))
        try:
            app([str(a) for a in spec["args"]])
        except SystemExit as exit_:
            codes.append(exit_.code if isinstance(exit_.code, int) else 1)
        finally:
            reset()
        if codes[-1] != 0 and not spec.get("go_on"):
            sys.exit(codes[-1])
    if RANK == 0:
        Path(result_file).write_text(json.dumps(codes))
    stop()


if __name__ == "__main__":
    main(*sys.argv[1:3])
