"""The bad-data catalogue: every kind of messy file real image folders hold, made in code.

Each `Case` writes its file(s) into a data folder and states what must happen to them:

    USED     decoded and trained on; `pixels` checks the RGB array (H, W, 3) against a hand value
    SKIPPED  an image name that cannot be read: left out and listed with `reason` (problems)
    IGNORED  not data (not in a class folder, a link loop): left out and listed with `reason`
    SILENT   system litter and hidden folders: never data, never listed
    WARNED   an empty class folder: not a class, a warning naming it

    root = build_mixed_folder(tmp_path / "data")   # classes "2" and "10" + every case
    for case in CATALOGUE: ...

The good classes are named `2` and `10` on purpose: sorted as text "10" comes first, so a
tool that maps labels by sort position instead of by name would show it.
Expected pixels are worked out by hand in the comments, never by calling the code under test.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import write_images

USED, SKIPPED, IGNORED, SILENT, WARNED = "used", "skipped", "ignored", "silent", "warned"
GOOD_CLASSES = {"2": 0, "10": 1}  # folder name -> look in conftest.class_image
GOOD_PER_CLASS = 6


@dataclass(frozen=True)
class Case:
    """One catalogue entry: what to write, where, and the outcome it must have."""

    name: str
    path: str  # relative to the data root (POSIX); the file (or folder) the outcome is about
    make: Callable[[Path], None]  # writes the file at this absolute path
    outcome: str
    reason: str = ""  # a phrase the report must contain (SKIPPED / IGNORED / WARNED)
    pixels: Callable[[np.ndarray], None] | None = None  # check of the decoded (H, W, 3) uint8 array


# --------------------------------------------------------------------------- raw file writers


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes | None) -> bytes:
    """A PNG written by hand (signature, IHDR, IDAT, IEND), so a header can claim any size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(raw_rows if raw_rows is not None else b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _save(im: Image.Image, fmt: str, **kw) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, fmt, **kw)

    return make


def _raw(data: bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return make


def _solid(rgb: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def _is(rgb: tuple[int, int, int], tol: int = 0, shape: tuple[int, int] | None = None):
    """Check: every pixel within `tol` of `rgb` (and the array has `shape` (H, W) if given)."""

    def check(a: np.ndarray) -> None:
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, a.shape
        if shape is not None:
            assert a.shape[:2] == shape, (a.shape, shape)
        err = np.abs(a.astype(int) - np.asarray(rgb)).max()
        assert err <= tol, (a.reshape(-1, 3)[:3].tolist(), rgb, err)

    return check


# --------------------------------------------------------------------------- makers with logic


def _truncated_jpeg(path: Path) -> None:
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    _raw(buf.getvalue()[: len(buf.getvalue()) // 2])(path)


def _palette_transparent(path: Path) -> None:
    # 8x8 palette image: index 0 = red but fully transparent (tRNS), index 1 = opaque blue.
    # Left half index 0, right half index 1.
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    for x in range(4, 8):
        for y in range(8):
            im.putpixel((x, y), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "PNG", transparency=0)


def _palette_check(a: np.ndarray) -> None:
    # transparent red over white paper is white; opaque blue stays blue
    assert a.shape == (8, 8, 3)
    assert (a[:, :4] == 255).all(), a[0, :4].tolist()
    assert (a[:, 4:] == [0, 0, 255]).all(), a[0, 4:].tolist()


def _exif_rotated(path: Path) -> None:
    # Stored 32 wide x 16 high: left half red, right half blue, EXIF Orientation 6
    # ("rotate 90 degrees clockwise to display").
    im = Image.new("RGB", (32, 16), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=95, exif=exif.tobytes())


def _exif_check(a: np.ndarray) -> None:
    # Turned clockwise, the stored left column becomes the top row: 16 wide x 32 high,
    # red on top, blue below. (Ignoring the orientation would leave it 32 wide x 16 high.)
    assert a.shape == (32, 16, 3), a.shape
    top, bottom = a[2:14, 2:14].reshape(-1, 3).mean(0), a[18:30, 2:14].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def _gray16(path: Path) -> None:
    # One row of 16-bit samples 0, 1000, 32768, 65535 (mode I;16 -> a 16-bit grayscale PNG).
    arr = np.array([[0, 1000, 32768, 65535]] * 2, dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "PNG")


def _gray16_check(a: np.ndarray) -> None:
    # Scaled by 255/65535 and rounded: 0 -> 0, 1000 -> 3.89 -> 4, 32768 -> 127.50 -> 128, 65535 -> 255.
    # Clipping to 0..255 instead would give 0, 255, 255, 255.
    assert a.shape == (2, 4, 3)
    assert a[0, :, 0].tolist() == [0, 4, 128, 255], a[0, :, 0].tolist()
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def _rgb16(path: Path) -> None:
    # A 48-bit RGB PNG written by hand: every pixel (65535, 32768, 1000), big-endian samples.
    width, height = 4, 2
    row = b"\x00" + struct.pack(">HHH", 65535, 32768, 1000) * width  # filter byte 0 + samples
    _raw(png_bytes(width, height, 16, 2, row * height))(path)


def _rgba_check(a: np.ndarray) -> None:
    # (0, 0, 200) at alpha 128 over white: c * 128/255 + 255 * 127/255
    # R = G = 127.0, B = 100.4 + 127.0 = 227.4 (Pillow's integer compositing may round by 1).
    _is((127, 127, 227), tol=1, shape=(16, 16))(a)


def _gif(path: Path) -> None:
    frames = [_solid((255, 0, 0)), _solid((0, 0, 255)), _solid((0, 255, 0))]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _looping_link(path: Path) -> None:
    # a.jpg -> b.jpg -> a.jpg: stat() fails with ELOOP; must not hang or crash.
    path.parent.mkdir(parents=True, exist_ok=True)
    other = path.with_name("loop_b.jpg")
    os.symlink(other.name, path)
    os.symlink(path.name, other)


def _folder_link_loop(path: Path) -> None:
    # A folder link pointing back at the data root: it would list every image twice.
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(".", path)


def _empty_folder(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _hidden_class(path: Path) -> None:
    write_images(path.parent, 3, 2, 16)


# macOS resource fork: AppleDouble magic + junk, with an image extension.
_APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64
NON_UTF8_NAME = os.fsdecode(b"2/caf\xe9 \xff.png")  # Latin-1 bytes: not valid UTF-8

CATALOGUE: tuple[Case, ...] = (
    Case("truncated JPEG", "2/truncated.jpg", _truncated_jpeg, SKIPPED, "truncated"),
    Case("zero-byte file", "2/empty.jpg", _raw(b""), SKIPPED, "empty file"),
    Case(
        "text named .jpg", "2/notes.jpg", _raw(b"just some notes, not pixels\n" * 4), SKIPPED, "not an image"
    ),
    Case(
        "PNG named .jpg",
        "2/png_named.jpg",
        _save(_solid((10, 200, 30)), "PNG"),
        USED,
        pixels=_is((10, 200, 30)),
    ),
    Case("macOS ._ fork", "2/._img_000.png", _raw(_APPLE_DOUBLE), SILENT),
    Case(".DS_Store", "2/.DS_Store", _raw(b"\x00\x00\x00\x01Bud1" + b"\x00" * 32), SILENT),
    Case("Thumbs.db", "10/Thumbs.db", _raw(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 32), SILENT),
    Case("root .DS_Store", ".DS_Store", _raw(b"\x00\x00\x00\x01Bud1"), SILENT),
    Case("hidden folder", ".thumbnails/x/img_000.png", _hidden_class, SILENT),
    Case("hidden folder in a class", "2/.cache/img_000.png", _hidden_class, SILENT),
    Case("empty class folder", "empty_class", _empty_folder, WARNED, "no usable images"),
    Case(
        "image at the root", "stray.png", _save(_solid((1, 2, 3)), "PNG"), IGNORED, "outside any class folder"
    ),
    Case("text at the root", "labels.txt", _raw(b"2\n10\n"), IGNORED, "not in a class folder"),
    Case("folder link loop", "loop", _folder_link_loop, IGNORED, "link loop"),
    Case(
        "CMYK JPEG",
        "2/cmyk.jpg",
        _save(_solid((200, 60, 40)).convert("CMYK"), "JPEG", quality=95),
        USED,
        # Pillow's RGB->CMYK is C = 255 - R etc. with K = 0, so the round trip is exact up to JPEG error.
        pixels=_is((200, 60, 40), tol=4),
    ),
    Case(
        "palette PNG with transparency", "10/palette.png", _palette_transparent, USED, pixels=_palette_check
    ),
    Case(
        "RGBA PNG",
        "10/rgba.png",
        _save(Image.new("RGBA", (16, 16), (0, 0, 200, 128)), "PNG"),
        USED,
        pixels=_rgba_check,
    ),
    Case("16-bit grayscale PNG", "10/gray16.png", _gray16, USED, pixels=_gray16_check),
    # 65535 -> 255, 32768 -> 127.5 -> 128 (Pillow keeps the high byte: 128), 1000 -> 3.9 -> 4 (high byte: 3).
    Case("16-bit RGB PNG", "10/rgb16.png", _rgb16, USED, pixels=_is((255, 128, 4), tol=1, shape=(2, 4))),
    Case("EXIF-rotated JPEG", "2/rotated.jpg", _exif_rotated, USED, pixels=_exif_check),
    Case("animated GIF", "10/animated.gif", _gif, USED, pixels=_is((255, 0, 0), shape=(16, 16))),
    Case(
        "decompression bomb",
        "2/bomb.png",
        _raw(png_bytes(12000, 12000, 8, 0, None)),
        SKIPPED,
        "decompression bomb",
    ),
    Case("symlink loop", "2/loop_a.jpg", _looping_link, SKIPPED, "link"),
    Case("symlink loop (other end)", "2/loop_b.jpg", lambda p: None, SKIPPED, "link"),
    Case(
        "non-UTF-8 name", NON_UTF8_NAME, _save(_solid((90, 90, 200)), "PNG"), USED, pixels=_is((90, 90, 200))
    ),
    Case(
        "name with spaces",
        "10/my holiday photo.png",
        _save(_solid((30, 30, 30)), "PNG"),
        USED,
        pixels=_is((30, 30, 30)),
    ),
    Case(
        "1x1 image",
        "2/tiny.png",
        _save(_solid((250, 120, 0), (1, 1)), "PNG"),
        USED,
        pixels=_is((250, 120, 0), shape=(1, 1)),
    ),
    Case(
        "huge aspect ratio",
        "10/panorama.png",
        _save(_solid((60, 160, 220), (3000, 3)), "PNG"),
        USED,
        pixels=_is((60, 160, 220), shape=(3, 3000)),
    ),
)


def build_mixed_folder(root: Path) -> Path:
    """Good images in classes `2` and `10`, plus every catalogue case."""
    for cname, look in GOOD_CLASSES.items():
        write_images(root / cname, look, GOOD_PER_CLASS, 32)
    for case in CATALOGUE:
        case.make(root / case.path)
    return root


def good_paths() -> set[str]:
    """Every path a run on the mixed folder must train or validate on."""
    good = {f"{c}/img_{i:03d}.png" for c in GOOD_CLASSES for i in range(GOOD_PER_CLASS)}
    return good | {c.path for c in CATALOGUE if c.outcome == USED}
