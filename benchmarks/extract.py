"""extract: our feature extraction on a real folder vs PyTorch's own forward on random tensors.

Ours: decode + resize + forward of every image of a real folder (digits as PNG by default), through
`finetune.features.extract.extract_taps` with the cache off — exactly what `finetune run` does.
Reference: the bare eager PyTorch forward, channels_last, inference mode, same model, same batch
size, random tensors already in memory (no decoding at all). Goal: ratio >= 1.5.

    python benchmarks/extract.py [FOLDER] [--batch 32] [--images 640]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import digits_folder, row


def bare_forward(model: torch.nn.Module, batch: int, size: int, seconds: float = 15.0) -> float:
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=640, help="images of the folder to extract")
    args = ap.parse_args()

    from finetune.data.index import scan
    from finetune.features.extract import extract_taps
    from finetune.models.anatomy import build_trunk
    from finetune.models.backbone import build

    folder = args.folder or digits_folder()
    bb = build("lite0")
    index = scan(folder)
    positions = range(min(args.images, len(index.paths)))
    extract_taps(
        bb, ["pool"], "avg", index, range(args.batch), bb.preprocessing, batch_size=args.batch, cache=False
    )  # warm-up: engine export/load happens once per machine, not per run
    t0 = time.perf_counter()
    feats = extract_taps(
        bb, ["pool"], "avg", index, positions, bb.preprocessing, batch_size=args.batch, cache=False
    )["pool"]
    ours = len(feats.x) / (time.perf_counter() - t0)
    import copy

    ref = bare_forward(build_trunk(copy.deepcopy(bb.model), "pool"), args.batch, bb.preprocessing.input_size)
    print(
        f"folder {folder} ({len(feats.x)} images), lite0 at {bb.preprocessing.input_size}, "
        f"batch {args.batch}, "
        f"{torch.get_num_threads()} threads, engine {feats.engine}"
    )
    print(row("extract img/s", ours, ref, "img/s"))


if __name__ == "__main__":
    main()
