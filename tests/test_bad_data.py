"""The bad-data catalogue (tests/badfiles.py): every case has its stated outcome, with both decoders.

Outcomes are checked where a user sees them: the scan's index (used / skipped / ignored /
warned), the decoded pixels against hand-computed values, `finetune check`'s report, and a
real `finetune run` on a folder that mixes every case with good images.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from finetune.app.doctor import check
from finetune.cli import app
from finetune.data.decode import DECODERS, ImageError, is_image_name
from finetune.data.index import scan
from finetune.data.transforms import Preprocessing, eval_reader
from tests.badfiles import CATALOGUE, IGNORED, SILENT, SKIPPED, USED, WARNED, build_mixed_folder, good_paths
from tests.conftest import write_images

runner = CliRunner()
DECODER_NAMES = sorted(DECODERS)  # ["fast", "pil"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return build_mixed_folder(tmp_path_factory.mktemp("bad") / "data")


@pytest.fixture(scope="module")
def index(mixed):
    return scan(mixed)


def as_array(pixels) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image or a (3, H, W) uint8 tensor."""
    if isinstance(pixels, torch.Tensor):
        assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3, (pixels.dtype, pixels.shape)
        return pixels.permute(1, 2, 0).numpy()
    assert pixels.mode == "RGB", pixels.mode
    return np.asarray(pixels)


def outcome_of(case, index, decoder: str) -> tuple[str, str]:
    """(outcome, reported reason) of one case as the scan + the decoder see it."""
    skipped = {p.path: p.reason for p in index.problems}
    ignored = {p.path: p.reason for p in index.ignored}
    if case.path in skipped:
        return SKIPPED, skipped[case.path]
    if case.path in ignored:
        return IGNORED, ignored[case.path]
    warned = [w for w in index.warnings if case.path in w]
    if warned:
        return WARNED, warned[0]
    if case.path in index.paths:
        try:
            DECODERS[decoder].decode(index.root / case.path)
        except ImageError as err:
            return SKIPPED, err.reason
        return USED, ""
    return SILENT, ""


@pytest.mark.parametrize("decoder", DECODER_NAMES)
@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_case_has_its_outcome(case, decoder, index, mixed):
    outcome, reason = outcome_of(case, index, decoder)
    assert outcome == case.outcome, (case.path, outcome, reason)
    assert case.reason.lower() in reason.lower(), (case.path, reason)
    if case.pixels is not None:
        case.pixels(as_array(DECODERS[decoder].decode(mixed / case.path)))


@pytest.mark.parametrize("decoder", DECODER_NAMES)
def test_every_used_case_becomes_a_model_input(decoder, index):
    """1x1, 3000x3, 16-bit, palette...: the full eval transform gives a finite (3, 32, 32) tensor."""
    pre = Preprocessing(32, 0.875, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    read = eval_reader(pre, decoder)
    for case in CATALOGUE:
        if case.outcome == USED:
            x = read(index.root / case.path)
            assert x.shape == (3, 32, 32) and torch.isfinite(x).all(), case.name


def test_numeric_class_names_map_by_name(index):
    """Folder `2` is class '2' even though '10' sorts first as text."""
    assert index.classes == ("10", "2")
    for path, label in zip(index.paths, index.labels, strict=True):
        assert index.classes[label] == path.split("/")[0], path


def test_the_scan_keeps_good_files_and_only_those_a_header_cannot_reject(index):
    """The scan reads headers only: the truncated JPEG's header is fine, so decoding must reject it."""
    assert set(index.paths) == good_paths() | {"2/truncated.jpg"}


def test_a_single_class_is_an_error_of_one_line(tmp_path):
    write_images(tmp_path / "only" / "cats", 0, 4, 16)
    result = runner.invoke(app, ["check", str(tmp_path / "only")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "two" in lines[0], result.output


def test_bomb_limit_follows_pillow_setting(tmp_path, monkeypatch):
    """The limit is Image.MAX_IMAGE_PIXELS itself: 64x64 passes at 4096, fails at 4095 (both decoders)."""
    path = write_images(tmp_path, 0, 1, 64)[0]
    for name in DECODER_NAMES:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
        DECODERS[name].decode(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
        with pytest.raises(ImageError, match="decompression bomb"):
            DECODERS[name].decode(path)


def test_a_fifo_named_jpg_never_blocks(tmp_path):
    """A named pipe would block open() forever; it is refused from its stat, in a bounded time."""
    (tmp_path / "a").mkdir()
    fifo = tmp_path / "a" / "pipe.jpg"
    os.mkfifo(fifo)
    results: list[str] = []

    def decode_all():
        for name in DECODER_NAMES:
            try:
                DECODERS[name].decode(fifo)
                results.append("decoded")
            except ImageError as err:
                results.append(err.reason)

    t = threading.Thread(target=decode_all, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "decoding a FIFO blocked"
    assert all("not a regular file" in r for r in results) and len(results) == 2, results


def test_litter_is_never_an_image_name():
    for name in ("._photo.jpg", ".DS_Store", "Thumbs.db", ".hidden.png", "desktop.ini"):
        assert not is_image_name(name), name
    assert is_image_name("photo.JPG") and is_image_name("my photo.png")


@pytest.mark.parametrize("decoder", DECODER_NAMES)
def test_check_reports_every_bad_case_by_path(decoder, mixed):
    report = check(mixed, decoder=decoder)
    skipped = {p.path: p.reason for p in report.skipped}
    ignored = {p.path: p.reason for p in report.ignored}
    assert set(skipped) == {c.path for c in CATALOGUE if c.outcome == SKIPPED}
    assert set(ignored) == {c.path for c in CATALOGUE if c.outcome == IGNORED}
    assert len(report.warnings) == 1 and "empty_class" in report.warnings[0]
    assert report.usable == len(good_paths())
    assert report.duplicates == ()


def test_check_command_prints_the_report(mixed):
    result = runner.invoke(app, ["check", str(mixed)])
    assert result.exit_code == 0, result.output
    out = result.output
    for case in CATALOGUE:
        if case.outcome in (SKIPPED, IGNORED):
            assert re.search(rf"^(skipped|ignored) {re.escape(case.path)}: ", out, re.M), case.path
    assert "warning: class folder empty_class/" in out
    assert f"{len(good_paths())} usable images" in out
    assert "caf" not in out  # the non-UTF-8 file is usable, so it is not listed ...
    as_json = json.loads(runner.invoke(app, ["check", str(mixed), "--json"]).output)
    assert as_json["usable"] == len(good_paths())  # ... and counted


def test_check_flags_duplicates_across_splits(make_folder):
    data = make_folder({"cat": 3, "dog": 3}, size=16, layout="split", val=2, test=1)
    # train/cat/img_000.png copied into val/cat and test/dog (a leak and a label conflict)
    src = data / "train" / "cat" / "img_000.png"
    (data / "val" / "cat" / "copy.png").write_bytes(src.read_bytes())
    (data / "test" / "dog" / "copy2.png").write_bytes(src.read_bytes())
    (data / "train" / "dog" / "twin.png").write_bytes((data / "train" / "dog" / "img_001.png").read_bytes())
    report = check(data)
    groups = {d.paths: d for d in report.duplicates}
    leak = groups[("test/dog/copy2.png", "train/cat/img_000.png", "val/cat/copy.png")]
    assert leak.crosses_splits and leak.conflicting_labels
    twin = groups[("train/dog/img_001.png", "train/dog/twin.png")]
    assert not twin.crosses_splits and not twin.conflicting_labels
    assert len(report.duplicates) == 2 and report.leaks == (leak,)
    result = runner.invoke(app, ["check", str(data)])
    assert (
        "duplicate (across splits test/train/val with different classes): test/dog/copy2.png" in result.output
    )


@pytest.mark.parametrize("decoder", DECODER_NAMES)
def test_run_on_the_mixed_folder_trains_on_exactly_the_good_files(decoder, mixed, tmp_path, monkeypatch):
    """A real run completes; split.json holds exactly the good files; problems.json lists the rest."""
    monkeypatch.setenv("FINETUNE_DECODER", decoder)
    runs = tmp_path / "runs"
    result = runner.invoke(
        app,
        [
            "run",
            str(mixed),
            "--backbone",
            "test_efficientnet",
            "--no-pretrained",
            "--out",
            str(runs),
            "--set",
            "image_size=32",
            "--workers",
            "0",
            "--no-cache",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "problems.json" in result.output
    run = next(runs.iterdir())
    split = json.loads((run / "split.json").read_text())
    used = set(split["train"]) | set(split["val"])
    assert used - {c.path for c in CATALOGUE if c.outcome == SKIPPED} == good_paths()
    predicted = {p["path"] for p in json.loads((run / "predictions.json").read_text())}
    assert predicted == set(split["val"]) - {c.path for c in CATALOGUE if c.outcome == SKIPPED}
    problems = json.loads((run / "problems.json").read_text())
    assert {p["path"] for p in problems["skipped"]} == {c.path for c in CATALOGUE if c.outcome == SKIPPED}
    assert {p["path"] for p in problems["ignored"]} == {c.path for c in CATALOGUE if c.outcome == IGNORED}
    assert any("empty_class" in w for w in problems["warnings"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["class_names"] == ["10", "2"]
    assert cfg["data"]["skipped"] == sum(c.outcome == SKIPPED for c in CATALOGUE)
