"""Transfer quality: `--strategy auto` beside the linear probe of the same backbone, same folders.

    python transfer.py                                  # fonts (style shift), digits, photos
    python transfer.py --only fonts --set ema=0.99      # try recipe values on auto's fine-tune
    python transfer.py --only fonts --strategy full-finetune   # a fixed strategy instead of auto

Three sets, all built from packaged material (offline), with fixed train/ and val/ folders:

- fonts: a style shift. The letters a-j rendered by Pillow from matplotlib's fonts, 64 px,
  random size, rotation, offset and grey levels; training images in sans-serif faces (DejaVu
  Sans and Sans Mono in four weights, Computer Modern Sans), validation images in serif faces
  (DejaVu Serif, STIX, Computer Modern Roman/Bold/Italic). 240 + 60 images per class.
- digits: sklearn's 1,797 handwritten digits (the demo's folder), our seeded 80/20 split.
- photos: 600 JPEG crops of sklearn's two sample photos (`common.photo_folder`), 80/20.

Each line prints the linear probe's validation accuracy, auto's (which strategy it chose) and
the difference in points. Both run the whole CLI (`finetune run`) at `--set image_size=64`
(`--image-size`), so a CPU finishes the fine-tunes in minutes; each run's folder is kept
under ./transfer-runs for its report, with its console in ./transfer-runs/SET/STRATEGY.log.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import digits_folder, photo_folder

LETTERS = "abcdefghij"
SANS = [
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "cmss10",
]
SERIF = [
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
    "cmr10",
    "cmb10",
    "cmti10",
]


def _glyph(letter: str, font_path: Path, rng: np.random.Generator, size: int = 64):
    """One letter: random point size, grey levels, rotation and offset, as an RGB image."""
    from PIL import Image, ImageDraw, ImageFont

    ink, paper = sorted(rng.integers(0, 256, 2))
    if paper - ink < 90:
        ink, paper = 20, 235
    if rng.random() < 0.5:
        ink, paper = paper, ink
    font = ImageFont.truetype(str(font_path), int(rng.integers(30, 46)))
    canvas = Image.new("L", (size * 2, size * 2), int(paper))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    x = size - (left + right) / 2 + rng.uniform(-5, 5)
    y = size - (top + bottom) / 2 + rng.uniform(-5, 5)
    draw.text((x, y), letter, fill=int(ink), font=font)
    canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, fillcolor=int(paper))
    return canvas.crop((size // 2, size // 2, size * 3 // 2, size * 3 // 2)).convert("RGB")


def fonts_folder(train: int = 240, val: int = 60, seed: int = 0) -> Path:
    """train/ in sans-serif faces, val/ in serif faces: the letters a-j as 64 px PNG files."""
    import matplotlib

    from finetune.io import cache_root

    target = cache_root() / "datasets" / f"fonts-{train}-{val}"
    if (target / ".complete").exists():
        return target
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    rng = np.random.default_rng(seed)
    shutil.rmtree(target, ignore_errors=True)
    for split, faces, n in (("train", SANS, train), ("val", SERIF, val)):
        for letter in LETTERS:
            folder = target / split / letter
            folder.mkdir(parents=True)
            for i in range(n):
                face = ttf / f"{faces[i % len(faces)]}.ttf"
                _glyph(letter, face, rng).save(folder / f"{letter}{i:03d}.png")
    (target / ".complete").touch()
    return target


def split_folder(source: Path, name: str, fraction: float = 0.2, seed: int = 0) -> Path:
    """A fixed train/ + val/ copy of a class folder (seeded stratified split), made once."""
    from finetune.io import cache_root

    target = cache_root() / "datasets" / f"{name}-split"
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for cls in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(cls.iterdir())
        order = rng.permutation(len(files))
        n_val = round(len(files) * fraction)
        for k, i in enumerate(order):
            split = "val" if k < n_val else "train"
            (target / split / cls.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(files[i], target / split / cls.name / files[i].name)
    (target / ".complete").touch()
    return target


def run(data: Path, strategy: str, sets: list[str], image_size: int, out: Path) -> dict:
    """`finetune run` as a user types it; the run's metrics, the chosen strategy and seconds."""
    cmd = [sys.executable, "-m", "finetune", "run", str(data), "--strategy", strategy, "-o", str(out)]
    cmd += ["--set", f"image_size={image_size}"]
    if strategy != "linear-probe":
        for s in sets:
            cmd += ["--set", s]
    out.mkdir(parents=True, exist_ok=True)
    console = out / f"{strategy}.log"  # the run's console, to follow it: tail -f
    t0 = time.perf_counter()
    with console.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{console.read_text()[-3000:]}")
    run_dir = max((p for p in out.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    recipe = config.get("recipe", {})
    chose = recipe.get("name", strategy)
    measured = config.get("extra", {}).get("auto", {}).get("compared", {})  # auto's two candidates
    others = [f"{name} {acc:.4f}" for name, acc in measured.items() if name != chose and acc is not None]
    return {
        "accuracy": metrics["val"]["accuracy"],
        "strategy": chose + (f" (over {', '.join(others)})" if others else ""),
        "seconds": seconds,
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=["fonts", "digits", "photos"])
    parser.add_argument("--strategy", default="auto", help="what to compare with the linear probe")
    parser.add_argument("--set", action="append", default=[], help="recipe values for the compared run")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe (measured before)")
    args = parser.parse_args()
    makers = {
        "fonts": fonts_folder,
        "digits": lambda: split_folder(digits_folder(), "digits"),
        "photos": lambda: split_folder(photo_folder(), "photos"),
    }
    out = Path("transfer-runs")
    out.mkdir(exist_ok=True)
    label = " ".join(args.set) or "packaged recipe"
    compared = f"{args.strategy} ({label})"
    print(f"{'set':<8} {'linear probe':>13} {compared:>40} {'diff':>7}   chose")
    for name in args.only or list(makers):
        data = makers[name]()
        lp = None if args.no_probe else run(data, "linear-probe", [], args.image_size, out / name)
        other = run(data, args.strategy, args.set, args.image_size, out / name)
        lp_acc = f"{lp['accuracy']:.4f}" if lp else "-"
        diff = f"{100 * (other['accuracy'] - lp['accuracy']):+.1f}" if lp else "-"
        print(
            f"{name:<8} {lp_acc:>13} {other['accuracy']:>40.4f} {diff:>7}   {other['strategy']}"
            f"   ({other['seconds']:.0f} s, {other['run_dir']})",
            flush=True,
        )


if __name__ == "__main__":
    main()
