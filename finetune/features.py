"""Run a frozen trunk over images and collect its pooled features.

    feats = extract(trunk, index, index.indices("train"), preprocessing)
    feats.x          # (N, D) float32, rows in the order of feats.positions
    feats.bad        # {position: reason} for files that failed to decode (skipped, reported)

The trunk runs in `torch.inference_mode`, channels_last, in batches, while DataLoader
workers decode and resize the next batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from finetune.data import DatasetIndex, ImageDataset, Preprocessing, default_workers, eval_transform, make_loader
from finetune.progress import progress_bar


@dataclass
class Features:
    """Features of some positions of a DatasetIndex."""

    x: np.ndarray  # (N, D) float32
    positions: np.ndarray  # (N,) int64 positions into the index
    labels: np.ndarray  # (N,) int64
    bad: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    def subset(self, positions: Sequence[int]) -> Features:
        """Rows for `positions` (those that decoded), in that order."""
        where = {int(p): r for r, p in enumerate(self.positions)}
        rows = [where[int(p)] for p in positions if int(p) in where]
        return Features(self.x[rows], self.positions[rows], self.labels[rows], {}, 0.0)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; anything else as given."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


@torch.inference_mode()
def extract(
    trunk: nn.Module,
    index: DatasetIndex,
    positions: Sequence[int],
    preprocessing: Preprocessing,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    description: str = "extracting features",
) -> Features:
    """Pooled features of `positions`; undecodable files are skipped and returned in `bad`."""
    import time

    device = torch.device(device)
    trunk = trunk.eval().to(device, memory_format=torch.channels_last)
    dataset = ImageDataset(index, positions, eval_transform(preprocessing))
    workers = default_workers() if workers is None else workers
    loader = make_loader(dataset, batch_size, min(workers, max(0, len(dataset) // batch_size)))
    xs: list[np.ndarray] = []
    pos: list[np.ndarray] = []
    bad: dict[int, str] = {}
    start = time.perf_counter()
    with progress_bar(description, total=len(dataset), unit="img") as bar:
        for x, _, p, failed in loader:
            bad.update(failed)
            if x is not None:
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                xs.append(trunk(x).float().cpu().numpy())  # (B, D)
                pos.append(p.numpy())
            bar.advance(len(failed) + (0 if x is None else len(x)))
    seconds = time.perf_counter() - start
    dim = xs[0].shape[1] if xs else 0
    x_all = np.concatenate(xs) if xs else np.zeros((0, dim), np.float32)
    p_all = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    labels = np.asarray([index.labels[i] for i in p_all], dtype=np.int64)
    return Features(x_all.astype(np.float32, copy=False), p_all.astype(np.int64), labels, bad, seconds)
