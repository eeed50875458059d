"""predict: one image as a whole process against importing torch; many images against extraction.

1. `finetune predict IMG --run RUN`, a fresh process each time, median of 3 after a warm-up (the
   warm-up exports and caches the run's engine), against `python -c "import torch"` (median of 3).
   Goal: ratio <= 0.5. The same for `finetune predict IMG` with no run (ImageNet labels).
2. Throughput over sklearn's 1,797 digits as PNG files: `predict_rows` with the run's cached
   classifier (lite0 at 224 + its head) against `extract_taps` of the same files with the same
   lite0 at 224, cache off, on the same engine (ONNX Runtime on CPU), both batch 32, both after
   a warm-up, alternated over 3 rounds (the median round is reported). Goal: ratio >= 0.9.

The run is a linear probe of lite0 at 224 px on 100 of the digits, made once under
$FINETUNE_CACHE/bench-predict/. `--device cuda` adds the GPU path (PyTorch) beside them.

    python benchmarks/predict.py [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import digits_folder, finetune_cmd, median, row, timed


def bench_run(digits: Path) -> Path:
    """A linear-probe run of lite0 at 224 px on 100 digit images (the classifier predict uses)."""
    import shutil

    from finetune.io import cache_root

    base = cache_root() / "bench-predict"
    runs = base / "runs"
    if runs.is_dir() and any(runs.iterdir()):
        return max(runs.iterdir())
    small = base / "data"
    for cls in sorted(p for p in digits.iterdir() if p.is_dir()):
        (small / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:10]:
            shutil.copyfile(f, small / cls.name / f.name)
    timed(finetune_cmd("run", str(small), "--out", str(runs)))
    return max(runs.iterdir())


def whole_process(cmd: list[str], repeats: int = 3) -> float:
    timed(cmd)  # warm-up: caches (engine, card), page cache
    return median([timed(cmd)[0] for _ in range(repeats)])


def throughput(run: Path, files: list[Path], device: str = "auto") -> tuple[float, str]:
    """img/s of `predict_rows` over `files` with the run's cached classifier (after a warm-up)."""
    from finetune.app.predict import predict_rows
    from finetune.app.predictor import open_run

    predictor = open_run(run, device)
    list(predict_rows(predictor, files[:64]))  # warm-up
    t0 = time.perf_counter()
    n = sum("error" not in r for r in predict_rows(predictor, files, batch_size=32))
    return n / (time.perf_counter() - t0), predictor.engine


def extraction(digits: Path) -> tuple[float, str]:
    """img/s of `extract_taps` (what `extract-features` runs) over the same files (after a warm-up)."""
    from finetune.data.index import scan
    from finetune.features.extract import extract_taps
    from finetune.models.backbone import build

    bb = build("lite0")
    index = scan(digits)
    extract_taps(bb, ["pool"], "avg", index, range(64), bb.preprocessing, batch_size=32, cache=False)
    t0 = time.perf_counter()
    feats = extract_taps(
        bb, ["pool"], "avg", index, range(len(index.paths)), bb.preprocessing, batch_size=32, cache=False
    )["pool"]
    return len(feats.x) / (time.perf_counter() - t0), feats.engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", help="also time this PyTorch device (e.g. cuda)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated throughput rounds (median reported)")
    args = ap.parse_args()

    digits = digits_folder()
    run = bench_run(digits)
    image = next(iter(sorted((digits / "3").iterdir())))
    files = sorted(p for d in sorted(digits.iterdir()) if d.is_dir() for p in sorted(d.iterdir()))

    torch_import = whole_process([sys.executable, "-c", "import torch"])
    one = whole_process(finetune_cmd("predict", str(image), "--run", str(run)))
    imagenet = whole_process(finetune_cmd("predict", str(image), "--runs", str(run.parent / "none")))
    print(f"run {run.name} (lite0 at 224), image {image.name}; reference: python -c 'import torch'")
    print(row("predict 1 image (run) s", one, torch_import, "s", better="lower"))
    print(row("predict 1 image (ImageNet) s", imagenet, torch_import, "s", better="lower"))

    # alternated, so that a change of machine load hits both sides; the median round is reported
    rounds = [(throughput(run, files), extraction(digits)) for _ in range(args.rounds)]
    (ours, engine), (ref, ref_engine) = sorted(rounds, key=lambda r: r[0][0] / r[1][0])[len(rounds) // 2]
    print(f"{len(files)} digits as PNG, batch 32; engines: predict {engine}, extract-features {ref_engine}")
    print(f"rounds (ours/reference img/s): {', '.join(f'{a[0]:.1f}/{b[0]:.1f}' for a, b in rounds)}")
    print(row("predict img/s", ours, ref, "img/s"))

    if args.device != "cpu":
        cmd = finetune_cmd("predict", str(image), "--run", str(run), "--device", args.device)
        gpu_one = whole_process(cmd)
        print(row(f"predict 1 image {args.device} s", gpu_one, torch_import, "s", better="lower"))
        gpu, engine = throughput(run, files, args.device)
        print(row(f"predict img/s {args.device}", gpu, ours, "img/s") + " (reference: the CPU engine)")


if __name__ == "__main__":
    main()
