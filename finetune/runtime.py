"""Where this process runs: the device, and its place under torchrun with the collectives it joins.

    device = pick_device("auto")      # cuda, then mps, then cpu
    d = start_distributed("auto")     # world 1 without torchrun: nothing imported, nothing joined
    run_dir = shared_path(new_run_dir(...) if d.main else None, d)
    ...
    stop_distributed()

torch is imported only when there is a world to join: a single-process run whose features
are all cached never imports it (training and extraction bring it in themselves). Every
collective of the tool is here; every rank enters each of them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a network runs: a fully cached probe never imports it
    import torch


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


def check_device(device: str) -> str:
    """`device` if this machine has it, normalized; else a FinetuneError naming what it has.

    Called at the start of every command that takes --device, before any work. "auto" and
    "cpu" import nothing (a fully cached probe never imports torch); cuda and mps ask torch.
    """
    import re

    from finetune.errors import FinetuneError

    name = str(device).strip().lower()
    if name in ("auto", "cpu"):
        return name
    cuda = re.fullmatch(r"cuda(?::(\d+))?", name)
    if cuda is None and name != "mps":
        raise FinetuneError(f"unknown --device {device!r}", "choose auto, cpu, cuda, cuda:N or mps")
    import torch

    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise FinetuneError("--device mps: this machine has no Apple GPU", "use --device cpu or auto")
        return name
    if not torch.cuda.is_available():
        raise FinetuneError(f"--device {name}: this machine has no CUDA device", "use --device cpu or auto")
    count, wanted = torch.cuda.device_count(), int(cuda.group(1) or 0)
    if wanted >= count:
        raise FinetuneError(
            f"--device {name}: this machine has {count} CUDA device(s)",
            f"use --device cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''}, cpu or auto",
        )
    return name


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; anything else as given (checked by `check_device`)."""
    import torch

    device = check_device(device) if isinstance(device, str) else device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _shard(todo: list[int]) -> tuple[list[int], int]:
    """This rank's share of the images (every world-th one), and the world size (1 alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return todo, 1
    return todo[dist.get_rank() :: dist.get_world_size()], dist.get_world_size()


def _all_gather_bytes(blob: bytes) -> list[bytes]:
    """Every rank's bytes, in rank order, as uint8 tensors (no pickled objects; gloo and nccl)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(int(t) for t in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else buf[:0]
    parts = [torch.zeros_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    return [bytes(part[: int(n)].cpu().numpy()) for part, n in zip(parts, sizes)]


def _all_sum(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    """Sum of `values` over ranks (metrics are reduced so every rank takes the same decisions)."""
    import torch

    if dist.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()
