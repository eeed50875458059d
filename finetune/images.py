"""Turn one image file into RGB pixels, or say precisely why it cannot be done.

Real folders hold CMYK JPEGs, palette PNGs with transparency, 16-bit scans,
EXIF-rotated phone pictures, animated GIFs and the odd decompression bomb. Every
reader in the tool goes through `load_rgb`, so they all agree on what an image is::

    from finetune.images import load_rgb, ImageError
    try:
        im = load_rgb("cat.jpg")          # PIL.Image in mode "RGB", orientation applied
    except ImageError as err:
        print(err.reason)                 # "truncated or corrupt: image file is truncated"

Decisions (the same in the fast tensor decoder of `fastio.py`):
- transparency is composited over white, as a viewer shows it on a page;
- 16-bit samples are scaled to 8 bits (x * 255 / 65535), never clipped;
- animated images give their first frame;
- anything over `Image.MAX_IMAGE_PIXELS` is refused (Pillow only warns between 1x and 2x).
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
