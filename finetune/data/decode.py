"""Turn one image file into RGB pixels, or say precisely why it cannot be done: the one guarded reader.

Real folders hold CMYK JPEGs, palette PNGs with transparency, 16-bit scans,
EXIF-rotated phone pictures, animated GIFs and the odd decompression bomb. Every
reader in the tool goes through `read_header` first, so they all agree on what an image is::

    x = decode("cat.jpg")             # (3, H, W) uint8 tensor, RGB, orientation applied
    im = load_rgb("cat.jpg")          # PIL.Image in mode "RGB" (the Pillow reference)
    try: ...
    except ImageError as err: err.reason   # "truncated or corrupt: image file is truncated"

Decisions:
- the header is read first: empty files, non-images, pipes and anything over
  `Image.MAX_IMAGE_PIXELS` are refused before a byte is decoded (Pillow only warns between 1x
  and 2x; torchvision has no pixel limit of its own);
- plain JPEG and PNG (gray, RGB, 16-bit gray, no transparency) are decoded in C++ by
  torchvision (libjpeg-turbo / libpng); CMYK, palettes, alpha, GIF and every other format, and
  any file torchvision cannot decode, go to Pillow, which names the reason if it fails too;
- transparency is composited over white, as a viewer shows it on a page;
- 16-bit samples are scaled to 8 bits (x * 255 / 65535), never clipped;
- animated images give their first frame.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where pixels are decoded: scanning a folder never imports it
    import torch

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)


# System litter that is never an image and never worth a warning line each.
SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})


class ImageError(Exception):
    """A file that cannot be used as an image; `reason` is one short phrase."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_litter(name: str) -> bool:
    """Hidden files, macOS `._` resource forks, .DS_Store, Thumbs.db: never data, never worth a line."""
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def is_image_name(path: str | os.PathLike) -> bool:
    """True for a name with an image extension that is not macOS/Windows litter."""
    name = os.path.basename(os.fspath(path))
    if is_litter(name):
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_pixels(width: int, height: int) -> None:
    """Refuse images larger than Pillow's decompression-bomb limit."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageError(f"decompression bomb refused: {width}x{height} pixels is over the limit of {limit}")


def check_file(path: str | os.PathLike) -> None:
    """Refuse what must never be opened: missing, broken or looping links, pipes/devices, empty files.

    A FIFO named `x.jpg` would block `open()` forever, so the type is checked before any read.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        if os.path.islink(path):
            raise ImageError("broken or looping link") from None
        raise ImageError(f"cannot read: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file (a pipe, device or folder)")
    if st.st_size == 0:
        raise ImageError("empty file (0 bytes)")


def _bomb_reason(err: Exception) -> str:
    # Pillow says "exceeds limit of <2x MAX>" for errors; name the real limit instead.
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)):,} pixels" if found else "the image"
    return f"decompression bomb refused: {size} is over the limit of {Image.MAX_IMAGE_PIXELS:,}"


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding pixels."""

    width: int
    height: int
    format: str  # Pillow's name: "JPEG", "PNG", "GIF", ...
    mode: str  # Pillow's mode: "RGB", "L", "CMYK", "P", "RGBA", "I;16", ...
    transparency: bool  # a tRNS chunk or GIF transparency (composited over white on decode)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _open_checked(path: str | os.PathLike, decode: bool) -> ImageHeader | Image.Image:
    """The one guarded path into Pillow: header (decode=False) or full RGB decode (decode=True)."""
    check_file(path)
    try:
        # Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; make that warning an error.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_pixels(*im.size)
                if not decode:
                    # (n_frames is not asked for: it walks every frame of an animation)
                    w, h = im.size
                    return ImageHeader(w, h, str(im.format), im.mode, "transparency" in im.info)
                im.seek(0)  # animated GIF/WebP/APNG: the first frame
                im.load()
                im = ImageOps.exif_transpose(im) or im
                return to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(_bomb_reason(err)) from None
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognized file format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(f"{'truncated or corrupt' if decode else 'unreadable'}: {err}") from None
    except Exception as err:  # noqa: BLE001 — a malformed file must never crash an epoch
        raise ImageError(f"cannot decode ({type(err).__name__}: {err})") from None


def probe(path: str | os.PathLike) -> tuple[int, int]:
    """Read only the header: (width, height). Cheap; catches empty, non-image and bomb files."""
    return read_header(path).size


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Read only the header: size, format, mode. Raises `ImageError` like `probe`."""
    return _open_checked(path, decode=False)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode `path` fully into an RGB image, orientation applied. Raises `ImageError`."""
    return _open_checked(path, decode=True)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB with the module's rules (see docstring)."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        # (H, W) integers in 0..65535; "I" is how Pillow opens 16-bit PNGs on some versions.
        arr = np.asarray(im, dtype=np.float64)
        eight = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        span = max(float(arr.max() - arr.min()), 1e-12)
        eight = np.rint((arr - arr.min()) * (255.0 / span)).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def relative_name(path: Path, root: Path) -> str:
    """`path` relative to `root`, as a POSIX string (what reports and split.json store)."""
    return path.relative_to(root).as_posix()


# Pillow modes torchvision decodes to the same RGB as `to_rgb` (gray is replicated).
_FAST_MODES = {
    "JPEG": frozenset({"L", "RGB"}),
    "PNG": frozenset({"L", "RGB", "I;16", "I;16B", "I;16L", "I"}),
}
_U16_TO_U8 = 255.0 / 65535.0


def takes_fast_path(header: ImageHeader) -> bool:
    """True when torchvision decodes this file to exactly what Pillow's rules make of it."""
    return header.mode in _FAST_MODES.get(header.format, frozenset()) and not header.transparency


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor."""
    import torch

    rgb = np.asarray(to_rgb(im))  # (H, W, 3) uint8
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W)


def decode_pil(path: str | os.PathLike) -> torch.Tensor:
    """Decode `path` with Pillow (the reference): (3, H, W) uint8 RGB tensor. Raises `ImageError`."""
    return pil_to_tensor(load_rgb(path))


def decode(path: str | os.PathLike) -> torch.Tensor:
    """Decode `path` into a (3, H, W) uint8 RGB tensor, orientation applied. Raises `ImageError`.

    torchvision (libjpeg-turbo / libpng) for plain JPEG and PNG; Pillow for every other format
    and for any file torchvision cannot decode, so a file is skipped only if Pillow fails too.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_image

    header = read_header(path)  # refuses empty, non-image, pipes and bombs before decoding
    if not takes_fast_path(header):
        return decode_pil(path)
    try:
        with open(path, "rb") as fh:
            data = torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8)  # (nbytes,)
        x = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)  # (3, H, W)
    except (RuntimeError, ValueError, OSError):
        return decode_pil(path)  # truncated, exotic or unsupported: Pillow decides (and names the reason)
    if x.dtype == torch.uint16:
        x = torch.round(x.to(torch.float32) * _U16_TO_U8).to(torch.uint8)  # scaled, not clipped
    elif x.dtype != torch.uint8:  # pragma: no cover — torchvision returns uint8 or uint16 today
        return decode_pil(path)
    return x


@dataclass(frozen=True)
class Decoder:
    """One way of turning a file into pixels; every decoder obeys the rules above."""

    name: str
    summary: str
    decode: Callable[[str | os.PathLike], torch.Tensor]  # path -> (3, H, W) uint8; raises ImageError


DECODERS: dict[str, Decoder] = {
    "fast": Decoder("fast", "torchvision (libjpeg-turbo / libpng), Pillow for the rest", decode),
    "pil": Decoder("pil", "Pillow for every file (the reference)", decode_pil),
}
# tests/test_fastio.py holds "fast" to the Pillow reference (mean |diff| <= 0.01 after
# normalization, same top-1 on >= 99% of real images).
DEFAULT_DECODER = "fast"


def get_decoder(name: str | None = None) -> Decoder:
    """The named decoder; None -> $FINETUNE_DECODER, else DEFAULT_DECODER."""
    from finetune.errors import DataError

    name = name or os.environ.get("FINETUNE_DECODER") or DEFAULT_DECODER
    if name not in DECODERS:
        raise DataError(f"unknown decoder {name!r}", f"use one of: {', '.join(DECODERS)}")
    return DECODERS[name]
