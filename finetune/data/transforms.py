"""Pixels in, model inputs out: one decode-and-resize path for training, validation and inference.

    pre = Preprocessing(input_size=224, crop_pct=0.875, mean=..., std=..., interpolation="bicubic")
    read = eval_reader(pre)            # path -> normalized (3, S, S) float32 tensor
    read = train_reader(pre)           # path -> randomly cropped and flipped (3, S, S) tensor
    read = train_reader(pre, "randaugment", random_erasing=0.25)   # + timm's RandAugment and RandomErasing
    EvalTransform(pre)(pil_image)      # the same pixels from an image already in memory
    eval_array(pre, load_rgb(path))    # the same numbers as a numpy array, torch never imported

Every reader decodes with `decode.get_decoder()` (torchvision for plain JPEG/PNG, Pillow for
the rest, or Pillow for all with FINETUNE_DECODER=pil; both give the same pixels for JPEG/PNG,
tests/test_predict_fast.py), and every transform works on uint8 RGB with Pillow: the aspect
guard, one `resize` (Pillow's `Image.resize`), the crop, then `Normalize` in numpy. So a model is
validated on exactly the inputs it is later used on, `finetune predict` computes those same
inputs without torch, and they are bit for bit those of timm's and torchvision's PIL eval
pipeline (tests/test_fastio.py).

Why Pillow rather than torchvision's tensor resize: the torch-free predict path has only numpy
and Pillow, and torchvision's antialiased uint8 kernels differ from Pillow's by 1-2 grey levels
on ~0.4% of pixels, which moves ImageNet probabilities by up to 6e-3. The cost: a photo crop
resizes in ~2.3 ms instead of ~0.8 ms (one thread), in the decode workers, beside the forward.
(Pillow's `resize(box=...)` of the cropped region alone is 3x faster but differs from resize-then-
crop by up to 7 grey levels on 20% of pixels of some images, so it is not used.)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from finetune.data.decode import get_decoder, load_rgb, to_rgb

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
        if d["interpolation"] not in FILTERS:
            raise ValueError(f"interpolation must be one of {', '.join(FILTERS)}, got {d['interpolation']!r}")
        return cls(
            size,
            float(crop),
            tuple(float(x) for x in d["mean"]),
            tuple(float(x) for x in d["std"]),
            d["interpolation"],
        )


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# Pillow's resampling filters by the names weight metadata uses (timm, torchvision).
FILTERS: dict[str, int] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resample_filter(name: str) -> int:
    """Pillow's filter for an interpolation name; a DataError naming the valid ones otherwise."""
    if name not in FILTERS:
        from finetune.errors import DataError

        raise DataError(f"unknown interpolation {name!r}", f"use one of: {', '.join(FILTERS)}")
    return FILTERS[name]


def guard_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The region (left, top, right, bottom) kept of a W x H image: the long side cut to MAX_ASPECT x
    the short one, centered.

    A 1 x 50000 strip would otherwise be resized to a huge image; the cut keeps every pixel
    the later center crop can see.
    """
    short, long = min(width, height), max(width, height)
    if long <= MAX_ASPECT * short:
        return 0, 0, width, height
    keep = MAX_ASPECT * short
    if width > height:
        left = (width - keep) // 2
        return left, 0, left + keep, height
    top = (height - keep) // 2
    return 0, top, width, top + keep


def guard(im: Image.Image) -> Image.Image:
    """`im` cut to `guard_box` (the same image when nothing is cut)."""
    box = guard_box(*im.size)
    return im if box == (0, 0, *im.size) else im.crop(box)


def resize(im: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    """The one resize: Pillow's `Image.resize` of an RGB image to (W, H) with the named filter.

    Antialiased when shrinking; exactly what timm's and torchvision's PIL eval pipelines compute.
    """
    return im.resize(size, resample_filter(interpolation))


def shorter_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(W, H) with the shorter side `short` and the longer one truncated, as torchvision's resize."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def center_crop(im: Image.Image, size: int) -> Image.Image:
    """The centered size x size region (offsets rounded as torchvision's center_crop); a crop larger
    than the image is zero-padded, as torchvision pads."""

    def start(side: int) -> int:
        return int(round((side - size) / 2.0)) if side >= size else -((size - side) // 2)

    left, top = start(im.width), start(im.height)
    return im.crop((left, top, left + size, top + size))


class Normalize:
    """uint8 (S, S, 3) RGB -> float32 (3, S, S): (x / 255 - mean) / std as x * scale - shift."""

    def __init__(self, pre: Preprocessing) -> None:
        std = np.asarray(pre.std, dtype=np.float32)
        mean = np.asarray(pre.mean, dtype=np.float32)
        self.scale = (np.float32(1.0) / (np.float32(255.0) * std)).reshape(3, 1, 1)  # (3, 1, 1)
        self.shift = (mean / std).reshape(3, 1, 1)  # (3, 1, 1)

    def __call__(self, im: Image.Image) -> np.ndarray:
        x = np.asarray(im).transpose(2, 0, 1).astype(np.float32, order="C")  # (3, S, S)
        x *= self.scale
        x -= self.shift
        return x


def as_image(x: Any) -> Image.Image:
    """A decoder's (3, H, W) uint8 tensor or array, or any PIL image, as an RGB PIL image."""
    if isinstance(x, Image.Image):
        return to_rgb(x)
    arr = np.asarray(x)  # a CPU tensor converts without a copy
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[0] != 3:
        raise TypeError(f"expected a PIL image or a (3, H, W) uint8 array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), mode="RGB")  # (H, W, 3)


class EvalTransform:
    """Pixels -> normalized (3, S, S) float32: aspect guard, shorter side resized, center crop, normalize.

    Takes a decoder's (3, H, W) uint8 tensor, or a PIL image (converted to RGB with the decoder's
    rules). `array(x)` gives the numbers as numpy (no torch), calling it gives a tensor.
    A class rather than a closure so DataLoader workers can receive it under any start method.
    """

    def __init__(self, pre: Preprocessing) -> None:
        resample_filter(pre.interpolation)  # an unknown name fails here, not on every image
        self.pre = pre
        self.normalize = Normalize(pre)

    def array(self, x: Any) -> np.ndarray:
        pre = self.pre
        im = guard(as_image(x))
        im = resize(im, shorter_side_size(*im.size, pre.resize_size), pre.interpolation)
        return self.normalize(center_crop(im, pre.input_size))

    def __call__(self, x: Any) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.array(x))  # (3, S, S)


def _randaugment(pre: Preprocessing) -> Any:
    """timm's RandAugment `rand-m9-mstd0.5-inc1` (2 ops of magnitude ~9, increasing severity), with
    the hyper-parameters timm's `create_transform` gives it: translation 45% of the image, fill the
    dataset mean, and the weights' own interpolation.

    The magnitude (drawn around 9 with std 0.5) is clipped at 9.999 instead of timm's 10: at 10
    timm's increasing posterize keeps 0 bits, which Pillow >= 10 refuses (`ValueError: bits must
    be between or equal to 1 and 8`, about one training image in a few hundred); at 9.999 it keeps
    1 bit, and every other op moves by 0.01 %."""
    from timm.data.auto_augment import rand_augment_transform

    hparams = {
        "translate_const": int(pre.input_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in pre.mean),
        "interpolation": FILTERS[pre.interpolation],
        "magnitude_max": 9.999,
    }
    return rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)


def _trivialaugment(pre: Preprocessing) -> Any:
    """torchvision's TrivialAugmentWide (one op of uniformly drawn magnitude), its defaults."""
    from torchvision.transforms import TrivialAugmentWide

    return TrivialAugmentWide()


# What each `augment` policy adds to the random-resized crop + flip, on the PIL image (None: nothing).
POLICIES: dict[str, Any] = {
    "light": lambda pre: None,
    "randaugment": _randaugment,
    "trivialaugment": _trivialaugment,
}


class TrainTransform:
    """Pixels -> augmented (3, S, S): random-resized crop + horizontal flip, then the policy's ops.

    `augment` names the policy (`POLICIES`): "light" is the crop + flip alone (ImageNet
    fine-tuning), "randaugment" adds timm's RandAugment, "trivialaugment" torchvision's
    TrivialAugmentWide, both on the PIL image as timm's and torchvision's pipelines apply them;
    "none" is the eval transform. `random_erasing` > 0 adds timm's `RandomErasing` (per-pixel
    normal noise in a random box, with that probability) on the normalized tensor, after any policy.

    The crop is drawn inside the aspect guard by torchvision's `RandomResizedCrop.get_params`, cut
    and resampled by the one resize (as torchvision's PIL `resized_crop`). Random numbers come
    from torch's generator (crop, flip, TrivialAugment, erasing's noise), Python's `random` and
    numpy's global generator (RandAugment, erasing's box): the training loop seeds all three per
    sample, so an image's augmentation depends on its seed alone.
    """

    def __init__(
        self, pre: Preprocessing, augment: str = "light", scale_min: float = 0.35, random_erasing: float = 0.0
    ) -> None:
        if augment != "none" and augment not in POLICIES:
            raise ValueError(f"augment must be none or one of {', '.join(POLICIES)}, got {augment!r}")
        self.eval = EvalTransform(pre)
        self.pre = pre
        self.augment = augment
        self.policy = POLICIES[augment](pre) if augment != "none" else None
        self.scale = [scale_min, 1.0]
        self.ratio = [3.0 / 4.0, 4.0 / 3.0]
        self.normalize = self.eval.normalize
        self.erase = None
        if random_erasing > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(random_erasing, mode="pixel", device="cpu")

    def __call__(self, x: Any) -> torch.Tensor:
        x = self.eval(x) if self.augment == "none" else self._augmented(x)  # (3, S, S)
        return self.erase(x) if self.erase is not None else x

    def _augmented(self, x: Any) -> torch.Tensor:
        import torch
        from torchvision.transforms import RandomResizedCrop

        im = guard(as_image(x))
        top, left, h, w = RandomResizedCrop.get_params(im, self.scale, self.ratio)
        im = im.crop((left, top, left + w, top + h))
        im = resize(im, (self.pre.input_size, self.pre.input_size), self.pre.interpolation)
        if torch.rand(1).item() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.policy is not None:
            im = self.policy(im)
        return torch.from_numpy(self.normalize(im))  # (3, S, S)


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
    pre: Preprocessing,
    augment: str = "light",
    scale_min: float = 0.35,
    random_erasing: float = 0.0,
    decoder: str | None = None,
) -> Reader:
    """path -> augmented (3, S, S) tensor with the named policy (see `TrainTransform`)."""
    return Reader(TrainTransform(pre, augment, scale_min, random_erasing), decoder)


class ArrayReader:
    """path -> (3, S, S) float32 numpy array, without torch: Pillow's decode (`decode.load_rgb`: the
    same pixels as the fast decoder for JPEG/PNG, and the very decoder for every other format)
    through `EvalTransform.array`. What `finetune predict` feeds ONNX Runtime. Raises `decode.ImageError`.
    """

    def __init__(self, pre: Preprocessing) -> None:
        self.transform = EvalTransform(pre)

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        return self.transform.array(load_rgb(path))
