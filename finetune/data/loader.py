"""Batches of images from an index, where one bad file never stops an epoch.

ds = ImageDataset(index, positions, read=eval_reader(pre))
for x, y, positions, bad in make_loader(ds, batch_size=64, workers=2):
    ...   # x (B, 3, S, S) of the files that decoded; bad = {position: reason}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from finetune.data.decode import ImageError
from finetune.data.index import DatasetIndex


class ImageDataset:
    """Map-style dataset over a `DatasetIndex`; a file that fails to decode yields `None` and its reason.

    Items are `(tensor | None, label, position, reason)`; `collate_skipping` drops the `None`s
    so one bad file never crashes an epoch, and the caller learns which position failed.
    `read` is a path -> tensor function (`transforms.eval_reader(pre)`, `train_reader(pre)`).
    """

    def __init__(self, index: DatasetIndex, positions: Sequence[int], read: Callable) -> None:
        self.index = index
        self.positions = list(positions)
        self.read = read

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        pos = self.positions[i]
        try:
            x = self.read(self.index.absolute(pos))
        except ImageError as err:
            return None, self.index.labels[pos], pos, err.reason
        return x, self.index.labels[pos], pos, ""


def collate_skipping(batch):
    """Stack the good items: (x (B, 3, H, W), y (B,), positions (B,), {bad position: reason})."""
    import torch

    good = [b for b in batch if b[0] is not None]
    bad = {b[2]: b[3] for b in batch if b[0] is None}
    if not good:
        return None, None, None, bad
    x = torch.stack([b[0] for b in good])
    y = torch.tensor([b[1] for b in good], dtype=torch.long)
    pos = torch.tensor([b[2] for b in good], dtype=torch.long)
    return x, y, pos, bad


def default_workers() -> int:
    """Decode workers: the cores we may use, minus nothing on small machines (decoding is I/O + C)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(8, cores))


def make_loader(dataset, batch_size: int, workers: int, shuffle: bool = False, sampler=None, seed: int = 0):
    """A DataLoader that skips undecodable files; persistent workers off (short jobs dominate)."""
    import torch
    from torch.utils.data import DataLoader

    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=torch.cuda.is_available(),
        generator=gen,
    )
