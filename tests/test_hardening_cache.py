"""The feature cache under stress (issue 17): stale rows after an in-place rewrite, damaged shards, a
cache that cannot be written, `cache clear` during a run, and run folders edited or damaged by hand.
Every command on a data folder leaves it unchanged (`unchanged`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

import finetune.io
from finetune.features.cache import SCHEMA, FeatureCache, FeatureIdentity
from finetune.io import file_key
from tests.conftest import invoke, one_line_error, unchanged, write_images
from tests.test_hardening import TINY


def features(data: Path, weights: Path, cache: bool = True) -> np.ndarray:
    """(N, D) pooled features of every image of `data` with the tiny fingerprinted backbone."""
    from finetune.data.index import scan
    from finetune.features.extract import extract_taps
    from finetune.models.backbone import build

    bb = build("test_efficientnet", weights_file=weights)
    index = scan(data)
    pre = bb.preprocessing.with_size(32)
    f = extract_taps(bb, ["pool"], "avg", index, range(len(index.paths)), pre, workers=0, cache=cache)["pool"]
    return f.x, f.hits


def shards(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("features/*/*.json") if p.name != "identity.json")


def test_an_in_place_rewrite_with_the_same_size_and_mtime_is_extracted_again(
    make_folder, tiny_weights, own_cache
):
    data = make_folder({"red": 3, "blue": 3})
    target = data / "red" / "img_001.png"
    first, _ = features(data, tiny_weights)
    st = os.stat(target)
    other = (data / "blue" / "img_000.png").read_bytes()
    blob = other[: st.st_size] + b"\0" * max(0, st.st_size - len(other))  # same size, other picture
    with open(target, "r+b") as fh:  # same inode
        fh.write(blob)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only the ctime tells
    assert os.stat(target).st_ino == st.st_ino and os.stat(target).st_mtime_ns == st.st_mtime_ns
    again, hits = features(data, tiny_weights)
    fresh, _ = features(data, tiny_weights, cache=False)
    assert hits == 5  # the other five rows are reused
    np.testing.assert_allclose(again, fresh, atol=1e-5)
    assert not np.allclose(again, first)


def test_the_identity_carries_the_extraction_schema():
    from finetune.data.transforms import Preprocessing

    ident = FeatureIdentity.of_parts("m", "sha", "pool", "avg", Preprocessing())
    assert ident.schema == SCHEMA
    assert dataclasses.replace(ident, schema=SCHEMA + 1).digest != ident.digest
    assert file_key("/no/such/file") is None


def _damage(kind: str, meta: Path) -> None:
    npy = meta.with_suffix(".npy")
    record = json.loads(meta.read_text())
    x = np.load(npy)
    if kind == "wrong width":
        np.save(npy, np.zeros((x.shape[0], x.shape[1] + 3), np.float32))
    elif kind == "nan rows":
        x[1] = np.nan
        np.save(npy, x)
    elif kind == "fewer rows than keys":
        np.save(npy, x[:-2])
    elif kind == "bad json":
        meta.write_text('{"width": 4, "keys": ["a", ')
    elif kind == "keys not a list":
        meta.write_text(json.dumps({"width": record["width"], "keys": "abc"}))


@pytest.mark.parametrize(
    "kind", ["wrong width", "nan rows", "fewer rows than keys", "bad json", "keys not a list"]
)
def test_a_damaged_shard_is_discarded_and_extracted_again(make_folder, tiny_weights, own_cache, kind):
    data = make_folder({"red": 3, "blue": 3})
    fresh, _ = features(data, tiny_weights, cache=False)
    features(data, tiny_weights)
    (meta,) = shards(own_cache)
    _damage(kind, meta)
    res = invoke("cache", "info")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    again, hits = features(data, tiny_weights)
    assert hits == 0  # nothing of the damaged shard was used
    np.testing.assert_allclose(again, fresh, atol=1e-5)
    third, hits = features(data, tiny_weights)  # the re-extracted rows are cached again
    assert hits == 6 and np.isfinite(third).all()


@pytest.mark.parametrize("where", ["a file", "/proc"])
def test_a_cache_that_cannot_be_written_is_one_line_and_the_run_works(
    image_folder, tmp_path, monkeypatch, where
):

    monkeypatch.setattr(finetune.io, "_UNWRITABLE", set())
    if where == "a file":
        target = tmp_path / "cache-file"
        target.write_text("I am not a folder")
    else:
        target = Path("/proc/finetune-cache")
    monkeypatch.setenv("FINETUNE_CACHE", str(target))
    with unchanged(image_folder):
        res = invoke("run", image_folder, *TINY, "-o", tmp_path / "runs")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    said = [ln for ln in res.output.splitlines() if "cannot be written" in ln]
    assert len(said) == 1 and "going on without it" in said[0], res.output


def test_a_full_cache_is_one_line_the_run_works_and_nothing_partial_is_left(
    image_folder, tmp_path, tiny_weights, own_cache, monkeypatch
):
    import errno

    real = finetune.io.atomic_write

    def full(path, write, mode="wb"):
        if own_cache in Path(path).parents and "features" in Path(path).parts:
            return real(
                path, lambda fh: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
            )
        return real(path, write, mode)

    monkeypatch.setattr(finetune.io, "atomic_write", full)
    args = [
        "run",
        image_folder,
        "--backbone",
        "test_efficientnet",
        "--weights",
        tiny_weights,
        "--workers",
        "0",
    ]
    with unchanged(image_folder):
        res = invoke(*args, "--set", "image_size=32", "-o", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    said = [ln for ln in res.output.splitlines() if "cannot be written" in ln]
    assert len(said) == 1 and "No space left on device" in said[0], res.output
    leftovers = [p for p in own_cache.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert leftovers == []


def test_cache_clear_during_a_run(image_folder, tmp_path, tiny_weights, own_cache, monkeypatch):
    from finetune.features.cache import cache_clear

    real = FeatureCache.store

    def clear_then_store(self, keys, x):
        cache_clear()  # the user runs `finetune cache clear` in another terminal, mid-extraction
        return real(self, keys, x)

    monkeypatch.setattr(FeatureCache, "store", clear_then_store)
    args = [
        "run",
        image_folder,
        "--backbone",
        "test_efficientnet",
        "--weights",
        tiny_weights,
        "--workers",
        "0",
    ]
    with unchanged(image_folder):
        res = invoke(*args, "--set", "image_size=32", "-o", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert invoke("cache", "clear").exit_code == 0 and not (own_cache / "features").exists()


# --------------------------------------------------------------------------- weights files and run folders


@pytest.mark.parametrize(
    "blob",
    [b"", b"garbage that is not a tensor file" * 4, (1000).to_bytes(8, "little") + b'{"a": {"dtype"'],
    ids=["empty", "garbage", "truncated header"],
)
def test_a_malformed_safetensors_weights_file_is_one_line(image_folder, tmp_path, blob):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(blob)
    with unchanged(image_folder):
        one_line_error(
            invoke(
                "run", image_folder, "--backbone", "test_efficientnet", "--weights", bad, "-o", tmp_path / "o"
            ),
            "refused to load x.safetensors",
        )
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("edit") / "data"
    for k, c in enumerate(("red", "blue")):
        write_images(data / c, k, 5)
    out = tmp_path_factory.mktemp("edit-runs")
    assert invoke("run", data, *TINY, "-o", out).exit_code == 0
    return next(out.iterdir())


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c["class_names"].append("green"), "does not match its config.json"),
        (lambda c: c.update(backbone="test_resnet", model="test_resnet"), "does not match its config.json"),
        (lambda c: c.update(class_names="red"), "class_names must be a list"),
        (lambda c: c["preprocessing"].update(crop_pct=0), "crop_pct must be a number in (0, 2]"),
        (lambda c: c["preprocessing"].update(input_size=-32), "input_size must be a positive integer"),
        (lambda c: c["preprocessing"].update(interpolation="cubic"), "interpolation must be one of"),
        (lambda c: c["preprocessing"].update(mean=[0.5]), "mean must be three numbers"),
        (lambda c: c["preprocessing"].update(std=[0, 0, 0]), "std must be positive"),
        (lambda c: c.pop("backbone"), "config.json is incomplete (no 'backbone')"),
    ],
)
def test_an_edited_config_is_one_line_of_the_runs_own(probe_run, tmp_path, edit, needle):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(probe_run, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    edit(config)
    (run_dir / "config.json").write_text(json.dumps(config))
    image = write_images(tmp_path / "img", 0, 1)[0]
    one_line_error(invoke("predict", image, "--run", run_dir), needle)


def test_runs_lists_every_run_and_marks_a_damaged_one(probe_run, tmp_path):
    import shutil

    for name, metrics in (
        ("20260101-000000-a", "[1, 2"),
        ("20260101-000001-b", "[]"),
        ("20260101-000002-c", None),
    ):
        shutil.copytree(probe_run, tmp_path / name)
        if metrics is not None:
            (tmp_path / name / "metrics.json").write_text(metrics)
    res = invoke("runs", "--runs", tmp_path)
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln for ln in res.output.splitlines()[2:] if ln.strip()}  # under the header rule
    assert set(lines) == {"20260101-000000-a", "20260101-000001-b", "20260101-000002-c"}
    assert "damaged: metrics.json unreadable" in lines["20260101-000000-a"]
    assert "damaged: metrics.json is not a table" in lines["20260101-000001-b"]
    assert "damaged" not in lines["20260101-000002-c"] and "1.0000" in lines["20260101-000002-c"]
