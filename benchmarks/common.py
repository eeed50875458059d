"""Real image folders for the benchmarks, built from packaged data (offline).

digits_folder()          # sklearn's 1,797 digits as PNG (the demo's folder)
photo_folder(n=600)      # crops of sklearn's two sample photos as JPEG files, 2 classes
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference" / "naive_probe.py"


def digits_folder() -> Path:
    from finetune.app.demo import digits_folder as make

    return make()


def photo_folder(n: int = 600, seed: int = 0) -> Path:
    """n JPEG crops (150..420 px, random aspect) of china.jpg / flower.jpg, as two class folders."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from finetune.io import cache_root

    target = cache_root() / "datasets" / f"sample-crops-{n}"
    if (target / ".complete").exists():
        return target
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # two (427, 640, 3) uint8 photos
    for name, img in zip(("china", "flower"), photos):
        folder = target / name
        folder.mkdir(parents=True, exist_ok=True)
        h, w, _ = img.shape
        for i in range(n // 2):
            ch, cw = int(rng.integers(150, h)), int(rng.integers(150, min(w, 420)))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            Image.fromarray(img[y0 : y0 + ch, x0 : x0 + cw]).save(folder / f"{i:04d}.jpg", quality=90)
    (target / ".complete").write_text("ok\n")
    return target


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    """Wall time of a whole process, and its stdout+stderr."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"command failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return dt, out.stdout + out.stderr


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def row(name: str, ours: float, ref: float, unit: str, better: str = "higher") -> str:
    ratio = ours / ref if ref else float("nan")
    # a tiny ratio reads better as its inverse: "0.003x" -> "(345x faster)"
    speedup = f", {ref / ours:.0f}x faster" if better == "lower" and ours > 0 and ratio < 0.1 else ""
    return (
        f"{name:<28} ours {ours:10.2f} {unit:<6} reference {ref:10.2f} {unit:<6} "
        f"ratio {ratio:6.3f}x ({better} is better{speedup})"
    )


def split_folder(source: Path, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """A train/ val/ copy of a class-folder dataset, so that both tools see the very same split."""
    import shutil

    from finetune.data.index import scan

    target = source.with_name(source.name + "-split")
    if (target / ".complete").exists():
        return target
    index = scan(source, val_fraction=val_fraction, seed=seed)
    for rel, split in zip(index.paths, index.splits):
        dst = target / split / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, dst)
    (target / ".complete").write_text("ok\n")
    return target


def finetune_cmd(*args: str) -> list[str]:
    """The installed CLI, run by this interpreter (the same environment as the benchmark)."""
    return [sys.executable, "-m", "finetune", *args]


def parse_kv(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)
