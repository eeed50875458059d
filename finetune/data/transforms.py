"""Pixels in, model inputs out: one decode-and-resize path for training, validation and inference.

    pre = Preprocessing(input_size=224, crop_pct=0.875, mean=..., std=..., interpolation="bicubic")
    read = eval_reader(pre)            # path -> normalized (3, S, S) float32 tensor
    read = train_reader(pre)           # path -> randomly cropped and flipped (3, S, S) tensor
    EvalTransform(pre)(pil_image)      # the same pixels from an image already in memory

Every reader decodes with `decode.get_decoder()` (torchvision for plain JPEG/PNG, Pillow for
the rest, or Pillow for all with FINETUNE_DECODER=pil) into a (3, H, W) uint8 tensor, and every
transform works on that tensor: so a model is validated on exactly the inputs it is later used
on. Resizing is `torchvision.transforms.v2.functional.resize(..., antialias=True)`: its
antialiased bicubic kernel is Pillow's, so the inputs agree with a Pillow resize of the same
image to about one grey level (tests/test_fastio.py holds them to it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.data.decode import get_decoder, pil_to_tensor

if TYPE_CHECKING:
    import torch

MAX_ASPECT = 3  # longer side cut to 3x the shorter one before resizing (panoramas, 1 x 50000 strips)


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone's weights expect pixels: resize, crop, normalize (from weight metadata)."""

    input_size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"

    @property
    def resize_size(self) -> int:
        """Shorter side before the center crop (224 / 0.875 = 256)."""
        return int(math.floor(self.input_size / self.crop_pct))

    def with_size(self, size: int) -> Preprocessing:
        """The same preprocessing at another input size (crop ratio kept)."""
        return Preprocessing(size, self.crop_pct, self.mean, self.std, self.interpolation)

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "crop_pct": self.crop_pct,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The preprocessing a file records (config.json, a backbone card), checked to be usable.

        Raises:
            ValueError: naming the value that cannot work (crop_pct 0, a negative size, an
                unknown interpolation, a mean or std that is not three numbers, std 0).
        """
        size, crop = d["input_size"], d["crop_pct"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"input_size must be a positive integer, got {size!r}")
        if not _number(crop) or not 0 < crop <= 2:
            raise ValueError(f"crop_pct must be a number in (0, 2], got {crop!r}")
        for key in ("mean", "std"):
            v = d[key]
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_number(x) for x in v):
                raise ValueError(f"{key} must be three numbers (R, G, B), got {v!r}")
        if not all(x > 0 for x in d["std"]):
            raise ValueError(f"std must be positive, got {d['std']!r}")
        if d["interpolation"] not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {d['interpolation']!r}"
            )
        return cls(
            size,
            float(crop),
            tuple(float(x) for x in d["mean"]),
            tuple(float(x) for x in d["std"]),
            d["interpolation"],
        )


INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "nearest-exact")  # what a tensor resize can do


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def guard_aspect(x: torch.Tensor) -> torch.Tensor:
    """Center-cut the long side of a (C, H, W) image to MAX_ASPECT x its short side, if longer.

    A 1 x 50000 strip would otherwise be resized to a huge tensor; the cut keeps every pixel
    the later center crop can see.
    """
    h, w = x.shape[-2:]
    short, long = min(w, h), max(w, h)
    if long <= MAX_ASPECT * short:
        return x
    keep = MAX_ASPECT * short
    if w > h:
        left = (w - keep) // 2
        return x[..., :, left : left + keep]
    top = (h - keep) // 2
    return x[..., top : top + keep, :]


class _Normalize:
    """uint8 (3, H, W) -> float32 (x / 255 - mean) / std, as one multiply-add: x * scale - shift."""

    def __init__(self, pre: Preprocessing) -> None:
        import torch

        std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)  # (3, 1, 1)
        self.shift = mean / std  # (3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return x.to(torch.float32).mul_(self.scale).sub_(self.shift)


class EvalTransform:
    """Pixels -> normalized (3, S, S) float32: resize the shorter side, center crop, normalize.

    Takes a (3, H, W) uint8 tensor, or a PIL image (converted to RGB with the decoder's rules).
    A class rather than a closure so DataLoader workers can receive it under any start method.
    """

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre
        self.normalize = _Normalize(pre)

    def __call__(self, x: Any) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        if not hasattr(x, "shape"):
            x = pil_to_tensor(x)  # PIL image -> (3, H, W) uint8
        pre = self.pre
        x = guard_aspect(x)
        x = F.resize(x, [pre.resize_size], interpolation=InterpolationMode(pre.interpolation), antialias=True)
        x = F.center_crop(x, [pre.input_size, pre.input_size])  # (3, S, S) uint8
        return self.normalize(x)


class TrainTransform:
    """Pixels -> augmented (3, S, S): random-resized crop + horizontal flip (ImageNet fine-tuning).

    Random numbers come from torch's global generator, which the training loop seeds per sample.
    `augment=False` is the evaluation transform.
    """

    def __init__(self, pre: Preprocessing, augment: bool = True, scale_min: float = 0.35) -> None:
        from torchvision.transforms import InterpolationMode, v2

        self.eval = EvalTransform(pre)
        self.augment = augment
        self.crop = v2.RandomResizedCrop(
            pre.input_size,
            scale=(scale_min, 1.0),
            interpolation=InterpolationMode(pre.interpolation),
            antialias=True,
        )
        self.flip = v2.RandomHorizontalFlip()
        self.normalize = self.eval.normalize

    def __call__(self, x: Any) -> torch.Tensor:
        if not self.augment:
            return self.eval(x)
        if not hasattr(x, "shape"):
            x = pil_to_tensor(x)
        return self.normalize(self.flip(self.crop(guard_aspect(x))))  # (3, S, S)


class Reader:
    """path -> model input: the decoder's (3, H, W) uint8 pixels through `transform`.

    Raises `decode.ImageError` for a file that cannot be used (the loader skips it).
    """

    def __init__(self, transform: Any, decoder: str | None = None) -> None:
        self.transform = transform
        self.decode = get_decoder(decoder).decode

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        return self.transform(self.decode(path))


def eval_reader(pre: Preprocessing, decoder: str | None = None) -> Reader:
    """path -> normalized (3, S, S) tensor with `pre`, by the named (or default) decoder."""
    return Reader(EvalTransform(pre), decoder)


def train_reader(
    pre: Preprocessing, augment: bool = True, scale_min: float = 0.35, decoder: str | None = None
) -> Reader:
    """path -> augmented (3, S, S) tensor (see `TrainTransform`)."""
    return Reader(TrainTransform(pre, augment, scale_min), decoder)
