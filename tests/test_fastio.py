"""The one preprocessing path (fast decode, Pillow resize) against the PIL eval pipeline, on real images.

Reference, written here with torchvision's PIL transforms: Pillow decode (`load_rgb`), the same
aspect guard, PIL resize, center crop, ToTensor, Normalize. Real images: crops of sklearn's two
sample photos written as JPEG and PNG at many sizes and aspect ratios, and sklearn's handwritten
digits as small gray PNGs.
Goals: the same pixels (differences of float rounding only, <= 1e-5 after normalization), so the
default backbone's top-1 ImageNet class is equal on every image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.decode import DECODERS, decode, load_rgb, read_header, takes_fast_path
from finetune.data.index import DatasetIndex
from finetune.data.loader import ImageDataset, make_loader
from finetune.data.transforms import EvalTransform, Preprocessing, eval_reader, guard_box

LITE0 = Preprocessing(224, 0.875, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")  # tf_efficientnet_lite0's
IMAGENET_BILINEAR = Preprocessing(224, 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")


@pytest.fixture(autouse=True)
def _one_thread():
    """Per-image tensor ops are tiny: on a shared 2-core machine extra threads only spin and wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real_images(tmp_path_factory) -> list[Path]:
    """48 crops of the sample photos (JPEG and PNG, 24..420 px sides) and 40 digits (12x12 gray PNG)."""
    from sklearn.datasets import load_digits, load_sample_images

    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    paths = []
    for k, photo in enumerate(load_sample_images().images):  # (427, 640, 3) each
        for j in range(24):
            h, w = int(rng.integers(24, 420)), int(rng.integers(24, 630))
            y, x = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
            path = root / f"photo{k}_{j:02d}.{'jpg' if j % 2 else 'png'}"
            Image.fromarray(photo[y : y + h, x : x + w]).save(path, quality=90)
            paths.append(path)
    digits = load_digits()
    for i in range(40):
        ink = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)
        path = root / f"digit{i:02d}.png"
        Image.fromarray(np.pad(255 - ink, 2, constant_values=255), mode="L").save(path)
        paths.append(path)
    return paths


def pil_guard(im: Image.Image) -> Image.Image:
    """The aspect guard on a PIL image: the long side cut to 3x the short one, centered."""
    w, h = im.size
    short, long = min(w, h), max(w, h)
    if long <= 3 * short:
        return im
    keep = 3 * short
    if w > h:
        return im.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
    return im.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))


def reference(pre: Preprocessing, path: Path) -> torch.Tensor:
    """Pillow all the way: decode, resize (PIL's antialiased kernels), crop, normalize."""
    from torchvision import transforms as T

    interp = T.InterpolationMode(pre.interpolation)
    pipeline = T.Compose(
        [
            pil_guard,
            T.Resize(pre.resize_size, interpolation=interp),
            T.CenterCrop(pre.input_size),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )
    return pipeline(load_rgb(path))


def fast_eval_transform(pre: Preprocessing):
    return eval_reader(pre, "fast")


PADDED = Preprocessing(64, 1.15, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")  # crop > resized: zero pad


@pytest.mark.parametrize(
    "pre",
    [LITE0, IMAGENET_BILINEAR, LITE0.with_size(64), PADDED],
    ids=["lite0", "bilinear", "64px", "padded"],
)
def test_fast_tensors_match_the_pillow_reference(pre, real_images):
    fast = fast_eval_transform(pre)
    diffs = []
    for path in real_images:
        a, b = reference(pre, path), fast(path)
        assert a.shape == b.shape == (3, pre.input_size, pre.input_size), path.name
        diffs.append(float((a - b).abs().max()))
    worst = int(np.argmax(diffs))
    # one grey level is 1 / (255 std) >= 0.0078 here: anything above float rounding is a real pixel
    assert diffs[worst] <= 1e-5, (real_images[worst].name, diffs[worst])


def test_same_top1_of_the_default_backbone(real_images):
    from finetune.models.backbone import build
    from finetune.models.catalogue import DEFAULT_BACKBONE

    bb = build(DEFAULT_BACKBONE)
    pre = bb.preprocessing
    assert pre == LITE0  # the reference above is the real default preprocessing
    fast = fast_eval_transform(pre)
    model = bb.model.eval()
    x_ref = torch.stack([reference(pre, p) for p in real_images])  # (N, 3, 224, 224)
    x_fast = torch.stack([fast(p) for p in real_images])  # (N, 3, 224, 224)
    torch.set_num_threads(2)  # one batched forward does use both cores
    with torch.inference_mode():
        ref = model(x_ref).argmax(1)  # (N,)
        got = model(x_fast).argmax(1)  # (N,)
    assert torch.equal(ref, got)
    assert len(set(ref.tolist())) > 5  # a varied set, not one class everywhere


def test_plain_files_decode_to_pillows_pixels(real_images):
    """JPEG and PNG: torchvision and Pillow (both libjpeg-turbo / libpng) give identical pixels.

    The torch-free predict path decodes with Pillow and relies on this (tests/test_predict_fast.py
    adds progressive, 4:4:4 and EXIF-rotated JPEGs).
    """
    for path in real_images:
        assert takes_fast_path(read_header(path)), path.name
        a = np.asarray(load_rgb(path))  # (H, W, 3)
        b = decode(path).permute(1, 2, 0).numpy()  # (H, W, 3)
        assert a.shape == b.shape and (a == b).all(), path.name


def _write(path: Path, im: Image.Image, fmt: str, **kw) -> Path:
    im.save(path, fmt, **kw)
    return path


def test_routing_table(tmp_path):
    """Which files torchvision decodes, and which go to Pillow's rules (hand-made table)."""
    rgb = Image.new("RGB", (8, 8), (1, 2, 3))
    cases = {
        "rgb.jpg": (_write(tmp_path / "rgb.jpg", rgb, "JPEG"), True),
        "gray.jpg": (_write(tmp_path / "gray.jpg", rgb.convert("L"), "JPEG"), True),
        "rgb.png": (_write(tmp_path / "rgb.png", rgb, "PNG"), True),
        "gray16.png": (
            _write(tmp_path / "g16.png", Image.fromarray(np.zeros((4, 4), np.uint16)), "PNG"),
            True,
        ),
        "cmyk.jpg": (_write(tmp_path / "cmyk.jpg", rgb.convert("CMYK"), "JPEG"), False),
        "rgba.png": (_write(tmp_path / "rgba.png", rgb.convert("RGBA"), "PNG"), False),
        "palette.png": (_write(tmp_path / "p.png", rgb.convert("P"), "PNG"), False),
        "rgb+tRNS.png": (_write(tmp_path / "trns.png", rgb, "PNG", transparency=(1, 2, 3)), False),
        "gif": (_write(tmp_path / "a.gif", rgb, "GIF"), False),
        "bmp": (_write(tmp_path / "a.bmp", rgb, "BMP"), False),
        "webp": (_write(tmp_path / "a.webp", rgb, "WEBP"), False),
    }
    for name, (path, fast) in cases.items():
        assert takes_fast_path(read_header(path)) is fast, name
        # either way the pixels are Pillow's
        assert (
            decode(path).permute(1, 2, 0).numpy().astype(int) - np.asarray(load_rgb(path))
        ).__abs__().max() <= 2


def test_a_file_torchvision_refuses_falls_back_to_pillow(tmp_path, monkeypatch):
    import torchvision.io

    path = _write(tmp_path / "x.png", Image.new("RGB", (5, 3), (9, 8, 7)), "PNG")

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported by this build")

    monkeypatch.setattr(torchvision.io, "decode_image", refuse)
    assert decode(path).permute(1, 2, 0).numpy().tolist() == [[[9, 8, 7]] * 5] * 3


@pytest.mark.parametrize("size", [(900, 100), (100, 900), (301, 100), (300, 100)])
def test_guard_box_cuts_like_the_pil_guard(size):
    """The crop box of the aspect guard (long side cut to 3x short, centered), here by hand."""
    w, h = size
    short, long = min(w, h), max(w, h)
    keep = long if long <= 3 * short else 3 * short
    off = (long - keep) // 2
    expected = (off, 0, off + keep, h) if w >= h else (0, off, w, off + keep)
    assert guard_box(w, h) == expected
    im = Image.new("RGB", size)
    assert pil_guard(im).size == (expected[2] - expected[0], expected[3] - expected[1])


def test_fast_reader_works_in_decode_worker_processes(tmp_path):
    from tests.conftest import write_images

    files = write_images(tmp_path / "a", 0, 3, 24) + write_images(tmp_path / "b", 1, 3, 24)
    (tmp_path / "b" / "bad.png").write_bytes(b"not a png")
    paths = tuple(p.relative_to(tmp_path).as_posix() for p in files) + ("b/bad.png",)
    index = DatasetIndex(tmp_path, ("a", "b"), paths, (0, 0, 0, 1, 1, 1, 1), ("train",) * 7, "class-folders")
    pre = LITE0.with_size(32)
    ds = ImageDataset(index, range(7), read=eval_reader(pre, "fast"))
    x, y, pos, bad = next(iter(make_loader(ds, batch_size=8, workers=1)))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert list(bad) == [6] and "not an image" in bad[6]
    ref = torch.stack([reference(pre, tmp_path / p) for p in paths[:6]])
    assert float((ref - x).abs().mean()) <= 0.01


def test_decoder_choice(monkeypatch):
    from finetune.data.decode import DEFAULT_DECODER, get_decoder
    from finetune.errors import DataError

    assert set(DECODERS) == {"fast", "pil"} and DEFAULT_DECODER == "fast"
    monkeypatch.setenv("FINETUNE_DECODER", "pil")
    assert get_decoder().name == "pil" and get_decoder("fast").name == "fast"
    with pytest.raises(DataError, match="unknown decoder"):
        get_decoder("turbo")


def test_a_pil_image_in_memory_gets_the_pixels_of_its_file(real_images):
    """load_run's transform (PIL image -> tensor) and the file reader give the same input."""
    pre = LITE0.with_size(64)
    for path in real_images[::7]:
        from_file = eval_reader(pre, "pil")(path)
        in_memory = EvalTransform(pre)(Image.open(path).convert("RGB"))
        assert torch.equal(from_file, in_memory), path.name
