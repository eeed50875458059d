"""tta: test-time augmentation against none, on a held-out split: mirror image, five-crop, ten-crop.

For each folder (the photo crops of `photo_folder()` and the digits), a linear probe of
EfficientNet-Lite0 (packaged weights, 224 px) is trained on a train/ val/ copy
(`split_folder`, our seeded split), and its val/ images are judged:

- ours: `finetune evaluate RUN val/ --tta` (mirror image), whose evaluation.json keeps both
  figures: with TTA, and without (the reference);
- the multi-crop candidates, on the run's PyTorch model: after the same resize, torchvision's
  `five_crop` (centre + 4 corners, probabilities averaged) and the five crops with their mirror
  images (ten-crop). The centre crop alone is the no-TTA figure again (printed as a check).

    python benchmarks/tta.py [FOLDER ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import digits_folder, finetune_cmd, photo_folder, split_folder, timed


def views(run: Path, folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Softmax probabilities (10, N, K) of the ten crops (tl, tr, bl, br, centre, then their
    mirrors) of every image under `folder`, the labels (N,) and the class names."""
    import torch
    from torchvision.transforms.functional import five_crop, hflip

    from finetune.app.runfolder import load_run, read_config
    from finetune.data.decode import load_rgb
    from finetune.data.transforms import EvalTransform, resize, shorter_side_size

    model, _, names = load_run(run)
    pre = read_config(run).preprocessing
    norm = EvalTransform(pre).normalize
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    out, labels = [], []
    with torch.inference_mode():
        for start in range(0, len(files), 16):
            batch = []
            for path in files[start : start + 16]:
                im = load_rgb(path)
                im = resize(im, shorter_side_size(*im.size, pre.resize_size), pre.interpolation)
                crops = list(five_crop(im, [pre.input_size, pre.input_size]))
                batch.append(np.stack([norm(c) for c in crops + [hflip(c) for c in crops]]))  # (10, 3, S, S)
                labels.append(names.index(path.parent.name))
            x = torch.from_numpy(np.stack(batch, axis=1))  # (10, B, 3, S, S)
            out.append(torch.softmax(model(x.flatten(0, 1)), 1).unflatten(0, x.shape[:2]).numpy())
    return np.concatenate(out, axis=1), np.asarray(labels), names


def accuracy(p: np.ndarray, y: np.ndarray) -> float:
    return float((p.argmax(1) == y).mean())


def one(data: Path, tmp: Path) -> None:
    split = split_folder(data)
    timed(finetune_cmd("run", str(split), "-o", str(tmp / "runs")))
    (run,) = (tmp / "runs").iterdir()
    _, text = timed(finetune_cmd("evaluate", str(run), str(split / "val"), "--tta", "--out", str(tmp / "ev")))
    m = json.loads((tmp / "ev" / "evaluation.json").read_text())["metrics"]
    none, flip = m["without_tta"]["accuracy"], m["accuracy"]
    p, y, _ = views(run, split / "val")
    centre = accuracy(p[4], y)
    five = accuracy(p[:5].mean(0), y)
    ten = accuracy(p.mean(0), y)
    print(f"{data.name}: {m['n']} val images; centre crop in PyTorch {centre:.4f} (check: = no TTA)")
    for name, acc in (("flip (ours, --tta)", flip), ("five-crop", five), ("ten-crop (five + flips)", ten)):
        print(f"  {name:<24} ours {acc:.4f}   reference (no TTA) {none:.4f}   difference {acc - none:+.4f}")


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]] or [photo_folder(), digits_folder()]
    for data in folders:
        with tempfile.TemporaryDirectory() as tmp:
            one(data, Path(tmp))


if __name__ == "__main__":
    main()
