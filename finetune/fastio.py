"""The fast decoder: image bytes -> uint8 tensor in C++ (libjpeg-turbo / libpng), resized on tensors.

It makes the same pixels as the Pillow path of `images.py` + `data.eval_transform`, within
a mean absolute difference of 0.01 after normalization (tested on real photos and digits)::

    from finetune.fastio import decode, fast_eval_transform
    x = decode("cat.jpg")                       # (3, H, W) uint8, RGB, EXIF orientation applied
    read = fast_eval_transform(pre)             # path -> normalized (3, S, S) float32 tensor
    read("cat.jpg")                             # raises images.ImageError for a bad file

Rules shared with `images.load_rgb` (so one file is used or skipped the same way by both):
- the header is read first with `images.read_header`: empty files, non-images, pipes and
  anything over `Image.MAX_IMAGE_PIXELS` are refused before a byte is decoded (torchvision
  has no pixel limit of its own);
- only plain JPEG and PNG (gray, RGB, 16-bit gray, no transparency) take the fast path; CMYK,
  palettes, alpha, GIF and every other format go to Pillow, which composites alpha over white;
- 16-bit PNGs come out of torchvision as uint16 and are scaled by 255/65535, never clipped;
- a file torchvision cannot decode is handed to Pillow, so it is skipped only if Pillow
  cannot read it either (with Pillow's reason).

Resizing is `torchvision.transforms.v2.functional.resize(..., antialias=True)`: its antialiased
bicubic kernel is Pillow's (a = -0.5, support scaled by the downscale factor), so the tensors
agree with the Pillow reference to about one grey level.
"""

from __future__ import annotations

import os

import torch

from finetune.data import Preprocessing
from finetune.images import ImageHeader, load_rgb, read_header

# Pillow modes torchvision decodes to the same RGB as `images.to_rgb` (gray is replicated).
_FAST_MODES = {
    "JPEG": frozenset({"L", "RGB"}),
    "PNG": frozenset({"L", "RGB", "I;16", "I;16B", "I;16L", "I"}),
}
_U16_TO_U8 = 255.0 / 65535.0


def takes_fast_path(header: ImageHeader) -> bool:
    """True when torchvision decodes this file to exactly what Pillow's rules make of it."""
    return header.mode in _FAST_MODES.get(header.format, frozenset()) and not header.transparency


def _pillow(path: str | os.PathLike) -> torch.Tensor:
    import numpy as np

    rgb = np.asarray(load_rgb(path))  # (H, W, 3) uint8
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W)


def decode(path: str | os.PathLike) -> torch.Tensor:
    """Decode `path` into a (3, H, W) uint8 RGB tensor, orientation applied. Raises `ImageError`."""
    from torchvision.io import ImageReadMode, decode_image

    header = read_header(path)  # refuses empty, non-image, pipes and bombs before decoding
    if not takes_fast_path(header):
        return _pillow(path)
    try:
        with open(path, "rb") as fh:
            data = torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8)  # (nbytes,)
        x = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)  # (3, H, W)
    except (RuntimeError, ValueError, OSError):
        return _pillow(path)  # truncated, exotic or unsupported: Pillow decides (and names the reason)
    if x.dtype == torch.uint16:
        x = torch.round(x.to(torch.float32) * _U16_TO_U8).to(torch.uint8)  # scaled, not clipped
    elif x.dtype != torch.uint8:  # pragma: no cover — torchvision returns uint8 or uint16 today
        return _pillow(path)
    return x


def guard_aspect(x: torch.Tensor, resize: int) -> torch.Tensor:
    """`data._GuardAspect` on a (C, H, W) tensor: cut the long side to 3x the short side if longer."""
    h, w = x.shape[-2:]
    short, long = min(w, h), max(w, h)
    if long <= 3 * short:
        return x
    keep = 3 * short
    if w > h:
        left = (w - keep) // 2
        return x[..., :, left : left + keep]
    top = (h - keep) // 2
    return x[..., top : top + keep, :]


class FastEvalTransform:
    """path -> normalized (3, S, S) float32 tensor; the tensor twin of `data.eval_transform`.

    A class rather than a closure so DataLoader workers can receive it under any start method.
    """

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre
        std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add: x * scale - shift
        self.scale = 1.0 / (255.0 * std)  # (3, 1, 1)
        self.shift = mean / std  # (3, 1, 1)

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        pre = self.pre
        x = guard_aspect(decode(path), pre.resize_size)  # (3, H, W) uint8
        x = F.resize(x, [pre.resize_size], interpolation=InterpolationMode(pre.interpolation), antialias=True)
        x = F.center_crop(x, [pre.input_size, pre.input_size])  # (3, S, S) uint8
        return x.to(torch.float32).mul_(self.scale).sub_(self.shift)  # (3, S, S)


def fast_eval_transform(pre: Preprocessing) -> FastEvalTransform:
    """The fast path -> tensor reader for `pre` (see the module docstring for its rules)."""
    return FastEvalTransform(pre)
