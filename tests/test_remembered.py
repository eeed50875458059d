"""Fitted heads remembered in the cache (`finetune.probe.remembered`): a repeated fit is read back
bit for bit, anything it depends on changing fits afresh, and a damaged entry is fitted again."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging

import numpy as np
import pytest
from safetensors.numpy import load_file

import finetune.io
import finetune.probe.heads as heads
import finetune.probe.remembered as remembered
from finetune.probe.heads import fit_head
from finetune.probe.remembered import fit_head_remembered
from tests.conftest import invoke


@pytest.fixture
def fits(monkeypatch) -> list[str]:
    """The head kinds actually fitted (not read back), in order."""
    calls: list[str] = []
    real = remembered.fit_head

    @functools.wraps(real)  # the same signature: the key is read from it
    def counting(x, y, **kw):
        calls.append(kw.get("kind", "logreg"))
        return real(x, y, **kw)

    monkeypatch.setattr(remembered, "fit_head", counting)
    return calls


def _data(seed: int = 0, n: int = 60, d: int = 12, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.normal(size=(n, d)).astype(np.float32) + y[:, None].astype(np.float32)
    return x, y


def _same(a, b) -> None:
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, np.ndarray):
            np.testing.assert_array_equal(va, vb, err_msg=f.name)
            assert va.dtype == vb.dtype, f.name
        else:
            assert va == vb, f.name


@pytest.mark.parametrize("kind", ["logreg", "svm"])
@pytest.mark.parametrize("standardize", [True, False])
def test_a_head_fitted_before_is_read_back_bit_for_bit(own_cache, fits, kind, standardize):
    x, y = _data()
    direct = fit_head(x, y, kind=kind, seed=3, standardize=standardize)
    first = fit_head_remembered(x, y, kind=kind, seed=3, standardize=standardize)
    again = fit_head_remembered(x, y, kind=kind, seed=3, standardize=standardize)
    assert fits == [kind]  # the second came from the cache
    _same(first, direct)
    _same(again, direct)
    assert len(list((own_cache / "heads").glob("*.npz"))) == 1


def test_whatever_the_fit_depends_on_changing_fits_afresh(own_cache, fits):
    x, y = _data()
    fit_head_remembered(x, y)
    x2 = x.copy()
    x2[7, 3] = np.nextafter(x2[7, 3], np.float32(np.inf))  # one feature, one ulp
    y2 = y.copy()
    y2[[0, 1]] = y2[[1, 0]]
    variants = [
        dict(x=x2, y=y),
        dict(x=x, y=y2),
        dict(x=x, y=y, kind="svm"),
        dict(x=x, y=y, c_grid=(0.1, 1.0)),
        dict(x=x, y=y, seed=1),
        dict(x=x, y=y, standardize=False),
    ]
    for v in variants:
        fit_head_remembered(**v)
    assert len(fits) == 1 + len(variants)
    assert len(list((own_cache / "heads").glob("*.npz"))) == 1 + len(variants)
    for v in variants:  # and each of them is now remembered
        fit_head_remembered(**v)
    assert len(fits) == 1 + len(variants)


def test_without_remember_nothing_is_read_or_written(own_cache, fits):
    x, y = _data()
    fit_head_remembered(x, y, remember=False)
    fit_head_remembered(x, y, remember=False)
    assert fits == ["logreg", "logreg"] and not (own_cache / "heads").exists()


def test_a_damaged_entry_is_fitted_again_and_rewritten(own_cache, fits):
    x, y = _data()
    good = fit_head_remembered(x, y)
    (entry,) = (own_cache / "heads").glob("*.npz")
    blob = entry.read_bytes()
    nan_coef = dataclasses.replace(good, coef=np.full_like(good.coef, np.nan))
    other_kind = dataclasses.replace(good, kind="svm")
    narrow = dataclasses.replace(good, coef=good.coef[:, :5], mean=good.mean[:5], scale=good.scale[:5])
    damaged = [b"", b"PK\x03\x04 not a zip", blob[: len(blob) // 2]]
    damaged += [remembered._encode(h) for h in (nan_coef, other_kind, narrow)]
    for junk in damaged:
        entry.write_bytes(junk)
        _same(fit_head_remembered(x, y), good)
    assert len(fits) == 1 + len(damaged)
    assert entry.read_bytes() == blob  # rewritten by the last fit
    fit_head_remembered(x, y)
    assert len(fits) == 1 + len(damaged)


def test_only_the_most_recently_used_heads_are_kept(own_cache, fits, monkeypatch):
    monkeypatch.setattr(remembered, "KEEP", 3)
    data = [_data(seed) for seed in range(5)]
    for x, y in data[:3]:
        fit_head_remembered(x, y)
    fit_head_remembered(*data[0])  # read back: now the most recently used
    assert len(fits) == 3
    for x, y in data[3:]:  # two more: the two least recently used (seeds 1 and 2) go
        fit_head_remembered(x, y)
    assert len(list((own_cache / "heads").glob("*.npz"))) == 3
    for seed in (0, 3, 4):
        fit_head_remembered(*data[seed])
    assert len(fits) == 5  # all three still remembered
    fit_head_remembered(*data[1])
    assert len(fits) == 6  # evicted: fitted again


def test_a_head_that_did_not_converge_is_said_again_when_read_back(own_cache, monkeypatch, caplog):
    real = heads._lbfgs

    def stopped(*a, **kw):
        w, b, _ = real(*a, **kw)
        return w, b, False

    monkeypatch.setattr(heads, "_lbfgs", stopped)
    x, y = _data()
    with caplog.at_level(logging.WARNING):
        fit_head_remembered(x, y)
        monkeypatch.setattr(heads, "_lbfgs", real)
        head = fit_head_remembered(x, y)
    assert not head.converged
    said = [r.getMessage() for r in caplog.records if "did not converge" in r.getMessage()]
    assert len(said) == 2, said


def test_an_unwritable_cache_fits_every_time_and_says_so_once(tmp_path, monkeypatch, fits, caplog):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    monkeypatch.setenv("FINETUNE_CACHE", str(blocker))
    monkeypatch.setattr(finetune.io, "_UNWRITABLE", set())
    x, y = _data()
    a, b = fit_head_remembered(x, y), fit_head_remembered(x, y)
    _same(a, b)
    assert fits == ["logreg", "logreg"]
    said = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(said) == 1


def test_a_repeated_run_reads_its_head_and_a_new_head_kind_fits(
    make_folder, tiny_weights, tmp_path, own_cache, fits
):
    data = make_folder({"a": 6, "b": 6, "c": 6}, size=40)
    out = tmp_path / "runs"
    args = ["run", data, "--backbone", "test_efficientnet", "--weights", tiny_weights, "--out", out]
    args += ["--set", "image_size=48", "--workers", "0"]
    runs = []
    for extra in ([], [], ["--set", "head='svm'"], ["--no-cache"]):
        res = invoke(*args, *extra)
        assert res.exit_code == 0, res.output
        runs.append(max(out.iterdir()))
    assert fits == ["logreg", "svm", "logreg"]  # the second run read the first's head; --no-cache fits
    first, again, _, uncached = (load_file(str(r / "model.safetensors")) for r in runs)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k], err_msg=k)
        np.testing.assert_array_equal(first[k], uncached[k], err_msg=k)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in runs[:2])
    for m in (m1, m2):
        del m["timing"], m["seconds"]
    assert m1 == m2
