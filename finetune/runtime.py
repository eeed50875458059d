"""Where this process runs: the device, and its place under torchrun with the collectives it joins.

    device = pick_device("auto")      # cuda, then mps, then cpu
    d = start_distributed("auto")     # world 1 without torchrun: nothing imported, nothing joined
    run_dir = shared_path(new_run_dir(...) if d.main else None, d)
    todo = shared_bytes(lambda: (decide(),), d)   # rank 0 decides, every rank gets its answer
    with collective_errors(d):        # a lost peer or a timeout: one line, not a traceback
        ...
    stop_distributed()

torch is imported only when there is a world to join: a single-process run whose features
are all cached never imports it (training and extraction bring it in themselves). Every
collective of the tool is here; every rank enters each of them, and a decision that changes
control flow (what to extract, whether to skip a batch or stop) is made once and shared.

A process group waits at most FINETUNE_DIST_TIMEOUT seconds (default 600) for a peer in a
collective: a rank that fails or hangs makes the others stop with one line within that time.
"""

from __future__ import annotations

import json
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
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=dist_timeout())
    if not d.main:
        os.environ["FINETUNE_PROGRESS"] = "0"
    return d


def dist_timeout():
    """How long a collective waits for a peer: FINETUNE_DIST_TIMEOUT seconds (default 600)."""
    from datetime import timedelta

    raw = os.environ.get("FINETUNE_DIST_TIMEOUT", "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 600.0
    return timedelta(seconds=seconds if seconds > 0 else 600.0)


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
    """Leave the process group, if one was joined (none can be without torch.distributed loaded).

    Every rank leaves together (a barrier first): a rank that tore down its connections while
    rank 0 still wrote the run folder left rank 0's gloo transport to find a closed peer.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
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


def all_gather_json(obj, d: Dist) -> list:
    """Every rank's JSON-able `obj`, in rank order ([obj] in a single process)."""
    if d.world == 1:
        return [obj]
    return [json.loads(blob) for blob in _all_gather_bytes(json.dumps(obj).encode())]


def all_sum(values: list[float], dist: Dist, device: torch.device | str = "cpu") -> list[float]:
    """Sum of `values` over ranks, float64: every rank gets the same numbers, so takes the same decisions."""
    import torch

    if dist.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def broadcast_bytes(blob: bytes | None, d: Dist) -> bytes:
    """Rank 0's `blob` on every rank (others pass None), as uint8 tensors: no pickle, gloo and nccl."""
    import torch
    import torch.distributed as dist

    if d.world == 1:
        return blob or b""
    device = _device()
    size = torch.tensor([len(blob) if d.main else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    n = int(size.item())
    buf = torch.zeros(n, dtype=torch.uint8, device=device)
    if d.main and n:
        buf.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    if n:
        dist.broadcast(buf, 0)
    return bytes(buf.cpu().numpy()) if not d.main else blob


def shared_bytes(make, d: Dist) -> tuple[bytes, ...]:
    """Rank 0 runs `make()` (a tuple of bytes) and every rank gets its result, or the same error.

    For decisions that must be taken once: what a checkpoint says, which images to extract. A
    `FinetuneError` raised on rank 0 is raised on every rank (one line each, no rank left waiting).
    """
    import json

    from finetune.errors import FinetuneError, RunError

    if d.world == 1:
        return tuple(make())
    parts: tuple[bytes, ...] = ()
    header = b""
    if d.main:
        try:
            parts = tuple(make())
            header = json.dumps({"sizes": [len(p) for p in parts]}).encode()
        except FinetuneError as err:
            header = json.dumps({"error": [err.what, err.todo]}).encode()
            raised = err
    header = broadcast_bytes(header if d.main else None, d)
    info = json.loads(header)
    if "error" in info:
        if d.main:
            raise raised
        raise RunError(*info["error"])
    out = []
    for i in range(len(info["sizes"])):
        out.append(broadcast_bytes(parts[i] if d.main else None, d))
    return tuple(out)


def broadcast_tensors(tensors, d: Dist) -> None:
    """Overwrite every rank's `tensors` (in place, same order and shapes) with rank 0's."""
    import torch.distributed as dist

    if d.world == 1:
        return
    for t in tensors:
        dist.broadcast(t.data, 0)


def average_gradients(params, d: Dist, bucket_bytes: int = 25 * 2**20) -> None:
    """Each parameter's gradient replaced by its mean over ranks: ~25 MB flat buckets, one all_reduce each.

    What DistributedDataParallel does inside backward, done after it: every rank first says
    (`all_sum`) whether its backward succeeded, so a rank that ran out of memory makes all of
    them retry the batch instead of leaving the others waiting inside a gradient all-reduce.
    """
    import torch
    import torch.distributed as dist

    if d.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list = []
    size = 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= d.world
            for old, new in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                old.copy_(new)
            bucket, size = [], 0


def _short(err: BaseException) -> str:
    """The gist of a torch.distributed error: its first sentence, without the C++ source location."""
    import re

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(cpp|cc|h):\d+\]\s*", "", text)
    return text.split(". ")[0][:160]


def is_collective_failure(err: BaseException) -> bool:
    """A lost peer or a timeout in torch.distributed (not a mistake of this rank)."""
    import torch

    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(err, dist_error):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Timed out", "timed out")
    )


class collective_errors:
    """Under torchrun, a collective that fails because a peer died or hung becomes one RunError line."""

    def __init__(self, d: Dist) -> None:
        self.d = d

    def __enter__(self) -> collective_errors:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        from finetune.errors import FinetuneError, RunError

        if (
            self.d.world == 1
            or err is None
            or isinstance(err, FinetuneError)
            or not isinstance(err, Exception)
        ):
            return False
        if not is_collective_failure(err):
            return False
        first = _short(err)
        raise RunError(
            f"process {self.d.rank} of {self.d.world} lost the others ({first})",
            "another process stopped first: its error is above; with no error, one hung for "
            f"FINETUNE_DIST_TIMEOUT={dist_timeout().total_seconds():g} s",
        ) from None
