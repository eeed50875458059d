"""Data the way users have it (issue 17): split folders without train/, an empty val/, CSVs with a split
column, a BOM or another encoding, files that fail to decode or vanish, duplicates, deep trees and names
that are not UTF-8. DATA is hashed before and after every command (`unchanged`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.data.index import scan, stratified_split
from finetune.errors import DataError
from tests.conftest import invoke, one_line_error, unchanged, write_images
from tests.test_hardening import TINY, truncated_png


def run_ok(data: Path, out: Path, *extra) -> Path:
    res = invoke("run", data, *TINY, "-o", out, *extra)
    assert res.exit_code == 0, res.output
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def read(run_dir: Path, name: str):
    return json.loads((run_dir / name).read_text())


# --------------------------------------------------------------------------- layouts


def test_val_and_test_without_train_are_refused_but_a_class_named_valid_is_a_class(tmp_path):
    data = tmp_path / "data"
    for split in ("val", "test"):
        for k, c in enumerate(("cat", "dog")):
            write_images(data / split / c, k, 3)
    with unchanged(data):
        one_line_error(invoke("run", data, "-o", tmp_path / "out"), "has val/ and test/ but no train/ folder")
        one_line_error(invoke("check", data), "no train/ folder")
    assert not (tmp_path / "out").exists()
    # "valid" and "invalid" as classes (images directly inside): a normal class-folder layout
    classes = tmp_path / "classes"
    write_images(classes / "valid", 0, 4)
    write_images(classes / "invalid", 1, 4)
    assert scan(classes).classes == ("invalid", "valid")


def test_an_empty_val_folder_falls_back_to_a_split_of_train_and_says_so(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6}, layout="split", val=0)
    (data / "val").mkdir(exist_ok=True)
    with unchanged(data):
        res = invoke("run", data, *TINY, "-o", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert "val/ has no usable images: a seeded split of train/ is used instead" in res.output
    run_dir = next((tmp_path / "runs").iterdir())
    split = read(run_dir, "split.json")
    assert len(split["val"]) == 2 and all(p.startswith("train/") for p in split["val"])
    assert "val/ has no usable images" in " ".join(read(run_dir, "problems.json")["warnings"])


def test_a_val_fraction_the_data_does_not_use_is_said_in_one_line(make_folder, tmp_path):
    data = make_folder({"red": 4, "blue": 4}, layout="split", val=2)
    said = "--val-fraction 0.3 is not used: data has its own validation split (its val/ folder)"
    with unchanged(data):
        res = invoke("run", data, *TINY, "-o", tmp_path / "runs", "--val-fraction", "0.3")
        assert res.exit_code == 0, res.output
        assert [ln for ln in res.output.splitlines() if "--val-fraction" in ln] == [
            f"warning: {said}; drop the option, or put those images in train/ to have a split made"
        ]
        run_dir = next((tmp_path / "runs").iterdir())
        assert any(said in w for w in read(run_dir, "problems.json")["warnings"])
        res = invoke("run", data, *TINY, "-o", tmp_path / "more")  # the default: nothing to say
        assert res.exit_code == 0 and "--val-fraction" not in res.output, res.output
    plain = make_folder({"red": 5, "blue": 5}, name="plain")  # a split is made: the fraction is used
    res = invoke("run", plain, *TINY, "-o", tmp_path / "plain-runs", "--val-fraction", "0.4")
    assert res.exit_code == 0 and "--val-fraction" not in res.output, res.output
    assert len(read(next((tmp_path / "plain-runs").iterdir()), "split.json")["val"]) == 4


# --------------------------------------------------------------------------- CSV labels


def _csv_folder(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for k, c in enumerate(("cat", "dog")):
        write_images(data / "img" / c, k, 5)
    return data


def test_a_csv_where_every_row_has_a_split_is_used_as_given(tmp_path):
    data = _csv_folder(tmp_path)
    rows = ["path,label,split"]
    for c in ("cat", "dog"):
        rows += [f"img/{c}/img_{i:03d}.png,{c},{'val' if i >= 3 else 'train'}" for i in range(5)]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with unchanged(data):
        index = scan(data, labels_csv=labels)
    assert index.counts("train") == {"cat": 3, "dog": 3} and index.counts("val") == {"cat": 2, "dog": 2}
    res = invoke("run", data, "--labels", labels, *TINY, "-o", tmp_path / "runs", "--val-fraction", "0.5")
    assert res.exit_code == 0, res.output
    assert (
        "--val-fraction 0.5 is not used: data has its own validation split (the labels CSV's split "
        "column); drop the option, or leave that column empty to have a split made" in res.output
    )
    assert index.split_seed is None  # nothing was split by the tool


def test_mixed_csv_rows_never_move_explicit_train_rows_into_val(tmp_path):
    data = _csv_folder(tmp_path)
    rows = []
    for c in ("cat", "dog"):
        rows += [f"img/{c}/img_{i:03d}.png,{c},train" for i in range(2)]
        rows += [f"img/{c}/img_{i:03d}.png,{c}," for i in range(2, 5)]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n", encoding="utf-8")
    for seed in range(5):
        index = scan(data, labels_csv=labels, seed=seed)
        explicit = {f"img/{c}/img_{i:03d}.png" for c in ("cat", "dog") for i in range(2)}
        assert all(index.splits[index.paths.index(p)] == "train" for p in explicit)
        assert index.counts("val") == {"cat": 1, "dog": 1}  # round(0.2 * 3) of the unassigned rows


def test_a_csv_with_a_bom_keeps_its_header_and_a_wrong_split_word_is_one_line(tmp_path):
    data = _csv_folder(tmp_path)
    rows = ["path,label"] + [f"img/{c}/img_{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(5)]
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(rows) + "\r\n").encode("utf-8"))
    index = scan(data, labels_csv=labels)
    assert len(index.paths) == 10 and not index.problems  # the header is not read as a file
    labels.write_text("img/cat/img_000.png,cat,training\n", encoding="utf-8")
    with unchanged(data):
        one_line_error(
            invoke("run", data, "--labels", labels, "-o", tmp_path / "o"), "split 'training' is not train"
        )


def test_a_csv_or_recipe_that_is_not_utf8_is_one_line(tmp_path):
    data = _csv_folder(tmp_path)
    labels = tmp_path / "latin1.csv"
    labels.write_bytes("img/cat/img_000.png,chat é\n".encode("latin-1"))
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes('method = "probe"\ndescription = "é"\n'.encode("latin-1"))
    with unchanged(data):
        one_line_error(
            invoke("check", data, "--labels", labels), "is not UTF-8 text (byte 0xe9", "save it as UTF-8"
        )
        one_line_error(invoke("run", data, "--recipe", recipe, "-o", tmp_path / "o"), "is not UTF-8 text")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b'\xef\xbb\xbfmethod = "probe"\n')
    from finetune.recipes import load_recipe

    assert load_recipe(recipe_file=bom).method == "probe"


# --------------------------------------------------------------------------- what a run used


def test_check_and_run_agree_about_a_file_that_fails_to_decode(make_folder, tmp_path):
    from finetune.app.doctor import check

    data = make_folder({"red": 6, "blue": 6})
    truncated_png(data / "red" / "img_002.png")
    with unchanged(data):
        report = check(data)
        run_dir = run_ok(data, tmp_path / "runs")
    split, config = read(run_dir, "split.json"), read(run_dir, "config.json")
    assert "red/img_002.png" not in split["train"] + split["val"]
    assert config["data"]["counts"] == report.counts  # the same numbers, file for file
    assert config["data"]["skipped"] == len(report.skipped) == 1
    assert [p["path"] for p in read(run_dir, "problems.json")["skipped"]] == ["red/img_002.png"]


def test_run_finds_the_duplicates_check_finds_and_keeps_them_in_one_split(make_folder, tmp_path):
    from finetune.app.doctor import check

    data = make_folder({"red": 8, "blue": 8})
    for i in range(4):  # four copies of red/img_000.png under other names
        shutil.copy(data / "red" / "img_000.png", data / "red" / f"copy_{i}.png")
    with unchanged(data):
        report = check(data)
        for seed in range(4):
            index = scan(data, seed=seed)
            group = [index.splits[index.paths.index(p)] for p in report.duplicates[0].paths]
            assert len(set(group)) == 1, (seed, group)  # never split across train and val
        run_dir = run_ok(data, tmp_path / "runs")
    assert [d["paths"] for d in read(run_dir, "problems.json")["duplicates"]] == [
        list(d.paths) for d in report.duplicates
    ]


def test_a_duplicate_across_the_users_split_is_a_warning_on_the_console_and_in_problems(
    make_folder, tmp_path
):
    data = make_folder({"red": 4, "blue": 4}, layout="split")
    shutil.copy(data / "train" / "red" / "img_000.png", data / "val" / "red" / "leak.png")
    with unchanged(data):
        res = invoke("run", data, *TINY, "-o", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert "warning: 1 group(s) of identical files are in more than one split" in res.output
    run_dir = next((tmp_path / "runs").iterdir())
    problems = read(run_dir, "problems.json")
    assert any("identical files" in w for w in problems["warnings"])
    assert problems["duplicates"][0]["crosses_splits"] is True


def test_grouped_split_equals_the_plain_split_without_duplicates():
    labels = [0] * 7 + [1] * 9
    assert stratified_split(labels, 0.3, 4) == stratified_split(labels, 0.3, 4, list(range(16)))
    groups = list(range(16))
    groups[1] = groups[2] = 0  # samples 0, 1, 2 identical
    out = stratified_split(labels, 0.3, 4, groups)
    assert out[0] == out[1] == out[2]


def test_a_file_that_vanishes_between_scan_and_extraction_is_skipped_and_listed(
    make_folder, tmp_path, monkeypatch, tiny_weights
):
    import finetune.app.pipeline as pipeline
    from tests.conftest import tree_digest

    data = make_folder({"red": 6, "blue": 6})
    gone = data / "blue" / "img_004.png"
    before = tree_digest(data)

    def scan_then_delete(*args, **kwargs):
        index = scan(*args, **kwargs)
        gone.unlink()  # a sync client, or the user, removes a file while the run starts
        return index

    monkeypatch.setattr(pipeline, "scan", scan_then_delete)
    res = invoke("run", data, "--backbone", "test_efficientnet", "--weights", tiny_weights, "--workers", "0",
                 "--set", "image_size=32", "-o", tmp_path / "runs")  # fmt: skip
    assert res.exit_code == 0, res.output
    run_dir = next((tmp_path / "runs").iterdir())
    assert [p["path"] for p in read(run_dir, "problems.json")["skipped"]] == ["blue/img_004.png"]
    after = tree_digest(data)
    del before["file:blue/img_004.png"]
    before["dir:blue"] = before["dir:blue"].replace("img_004.png|", "")
    assert after == before  # nothing else changed


def test_a_folder_tree_1200_levels_deep_is_scanned_without_recursion_error(make_folder):
    data = make_folder({"red": 3, "blue": 3})
    deep = data / "red"
    for _ in range(1200):  # (os.makedirs recurses too)
        deep = deep / "d"
        deep.mkdir()
    write_images(deep, 0, 1)
    try:
        with unchanged(data):
            index = scan(data)
            assert index.counts() == {"blue": 3, "red": 4}
            res = invoke("check", data)
            assert res.exit_code == 0 and "RecursionError" not in res.output, res.output
    finally:  # shutil.rmtree recurses too (before Python 3.12): remove the chain bottom-up
        while deep != data / "red":
            for f in deep.iterdir():
                f.unlink()
            deep.rmdir()
            deep = deep.parent


# --------------------------------------------------------------------------- names that are not UTF-8


@pytest.mark.parametrize("charset", ["utf-8", "ascii", "latin-1"])
def test_non_utf8_class_and_root_names_never_crash_the_report_or_the_console(tmp_path, charset):
    from finetune.cli import app

    root = tmp_path / os.fsdecode(b"d\xe9j\xe0-vu\xff")
    write_images(root / os.fsdecode(b"bl\xffue"), 0, 5)
    write_images(root / "r\u00e9d \u65e5\u672c", 1, 5)
    with unchanged(root):
        res = CliRunner(charset=charset).invoke(app, ["run", str(root), *TINY, "-o", str(tmp_path / "runs")])
        assert res.exit_code == 0, res.output
        res = CliRunner(charset=charset).invoke(app, ["check", str(root)])
        assert res.exit_code == 0, res.output
    run_dir = next((tmp_path / "runs").iterdir())
    html = (run_dir / "report.html").read_bytes().decode("utf-8")  # written, and valid UTF-8
    assert "bl?ue" in html and "\u65e5\u672c" in html
    assert not (run_dir / "run.toml").exists()  # TOML cannot hold the raw bytes: said, not crashed


def test_scan_refuses_a_missing_csv_with_one_line(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path, labels_csv=tmp_path / "nope.csv")
