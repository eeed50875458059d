"""The header check is remembered by file identity (`finetune.data.checked`): a re-scan of an
unchanged folder opens no image, and any change to a file, a damaged memo or an unwritable cache
falls back to checking it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import finetune.data.checked as checked
import finetune.io
from finetune.data.index import scan
from finetune.errors import DataError
from tests.conftest import invoke, tree_digest


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The files whose header the scan opened, in order."""
    calls: list[str] = []
    real = checked.probe

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(checked, "probe", counting)
    return calls


def test_a_rescan_of_an_unchanged_folder_opens_no_image_and_gives_the_same_index(
    make_folder, own_cache, opened
):
    data = make_folder({"red": 6, "blue": 6})
    before = tree_digest(data)
    first = scan(data, remember=True)
    assert len(opened) == 12
    opened.clear()
    again = scan(data, remember=True)
    assert opened == []
    assert again == first
    assert tree_digest(data) == before  # the memo lives in the cache, never in the data folder
    assert len(list((own_cache / "checked").glob("*.json"))) == 1


def test_without_remember_every_header_is_opened_and_nothing_is_written(make_folder, own_cache, opened):
    data = make_folder({"red": 3, "blue": 3})
    scan(data, remember=True)
    opened.clear()
    scan(data)  # the default: doctor, advise and check open every file
    assert len(opened) == 6
    cache = own_cache / "checked"
    memo = next(cache.glob("*.json")).read_bytes()
    scan(data, remember=False)
    assert [p.read_bytes() for p in cache.glob("*.json")] == [memo]


def test_an_image_rewritten_in_place_with_its_size_and_mtime_restored_is_checked_again(
    make_folder, own_cache, opened
):
    data = make_folder({"red": 3, "blue": 3})
    scan(data, remember=True)
    victim = data / "red" / "img_001.png"
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)  # same size, not an image any more
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as before; the ctime moved
    opened.clear()
    index = scan(data, remember=True)
    assert opened == ["img_001.png"]
    assert [p.path for p in index.problems] == ["red/img_001.png"]
    assert "red/img_001.png" not in index.paths


def test_a_file_that_failed_is_checked_every_time_and_keeps_its_reason(make_folder, own_cache, opened):
    data = make_folder({"red": 3, "blue": 3})
    (data / "blue" / "broken.png").write_bytes(b"not a png at all")
    reasons = []
    for expected in (7, 1):  # every file, then only the one that failed
        opened.clear()
        index = scan(data, remember=True)
        assert len(opened) == expected and "broken.png" in opened, opened
        reasons.append([(p.path, p.reason) for p in index.problems])
    assert reasons[0] == reasons[1] == [("blue/broken.png", "not an image (unrecognized file format)")]


def test_a_damaged_memo_is_ignored_and_rewritten(make_folder, own_cache, opened):
    data = make_folder({"red": 3, "blue": 3})
    first = scan(data, remember=True)
    (memo,) = (own_cache / "checked").glob("*.json")
    for junk in (b"{not json", b'{"passed": 7}', b'["a list"]', b'{"passed": [1, null]}'):
        memo.write_bytes(junk)
        opened.clear()
        assert scan(data, remember=True) == first
        assert len(opened) == 6  # nothing trusted from a memo that does not parse
    opened.clear()
    scan(data, remember=True)
    assert opened == []  # rewritten by the scans above


def test_the_memo_is_keyed_by_the_pixel_limit_that_decides_what_passes(
    make_folder, own_cache, opened, monkeypatch
):
    from PIL import Image

    data = make_folder({"red": 3, "blue": 3}, size=32)
    scan(data, remember=True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32 - 1)  # every image is now a "bomb"
    with pytest.raises(DataError, match="no images"):
        scan(data, remember=True)


def test_an_unwritable_cache_is_one_warning_and_the_scan_works(make_folder, tmp_path, monkeypatch, caplog):
    data = make_folder({"red": 3, "blue": 3})
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    monkeypatch.setenv("FINETUNE_CACHE", str(blocker))
    monkeypatch.setattr(finetune.io, "_UNWRITABLE", set())
    index = scan(data, remember=True)
    assert len(index.paths) == 6
    scan(data, remember=True)
    said = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(said) == 1 and str(blocker) in said[0]


def test_run_no_cache_writes_no_memo(image_folder, tmp_path, tiny_weights, own_cache):
    result = invoke("run", image_folder, "--backbone", "test_efficientnet", "--weights", tiny_weights,
                    "--out", tmp_path / "runs", "--no-cache", "--set", "image_size=32")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (own_cache / "checked").exists()
