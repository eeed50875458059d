"""Where a process stands under torchrun, and the few collective steps `run` needs itself.

    d = start_distributed("auto")     # world 1 without torchrun: nothing imported, nothing joined
    run_dir = shared_path(new_run_dir(...) if d.main else None, d)
    ...
    stop_distributed()

torch is imported only when there is a world to join: a single-process run whose features
are all cached never imports it (training and extraction bring it in themselves).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Dist:
    """Where this process stands under torchrun (world 1 without it)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )


def start_distributed(device: str = "auto") -> Dist:
    """Under torchrun, join the process group (nccl on CUDA, gloo on CPU); without it, world 1.

    Only rank 0 prints progress bars; the caller silences the other ranks' logs.
    """
    d = Dist.from_env()
    if d.world == 1:
        return d
    import torch

    if torch.distributed.is_initialized():
        return d
    cuda = torch.cuda.is_available() and not device.startswith(("cpu", "mps"))
    if cuda:
        torch.cuda.set_device(d.local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if not d.main:
        os.environ["FINETUNE_PROGRESS"] = "0"
    return d


def shared_path(path: Path | None, d: Dist) -> Path:
    """Rank 0's `path` on every rank (the run folder is created once, by rank 0)."""
    if d.world == 1:
        return path
    import torch

    buf = torch.zeros(4096, dtype=torch.uint8)  # a tensor, not a pickled object: works on gloo and nccl
    if d.main:
        raw = os.fsencode(str(path))
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    nccl = torch.distributed.get_backend() == "nccl"
    buf = buf.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    torch.distributed.broadcast(buf, 0)
    raw = bytes(buf.cpu().tolist()).rstrip(b"\0")
    return Path(os.fsdecode(raw))


def stop_distributed() -> None:
    """Leave the process group, if one was joined (none can be without torch.distributed loaded)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
