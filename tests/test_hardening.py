"""Field hardening (issue 17): impossible settings refused before any work, nothing written where it
must not be, one line instead of a traceback. Every command that runs on a data folder is checked to
leave it byte-for-byte unchanged (`unchanged`)."""

from __future__ import annotations

import errno
import io
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.errors import FinetuneError
from tests.conftest import invoke, one_line_error, unchanged

TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--workers", "0", "--set", "image_size=32"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def truncated_png(path: Path) -> None:
    """A PNG whose header is fine and whose pixels stop half-way: passes `scan`, fails decoding."""
    buf = io.BytesIO()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def ends_in_error(result, *needles: str) -> str:
    """Exit 2, no traceback, the last line `error: ...` with every needle (skipped files may precede it)."""
    assert result.exit_code == 2 and "Traceback" not in result.output, (result.exit_code, result.output)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last
    return last


# --------------------------------------------------------------------------- impossible settings


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "gpu", "foo"])
@pytest.mark.parametrize("command", ["run", "extract-features", "advise", "compare", "evaluate"])
def test_an_impossible_device_is_refused_by_every_command_before_any_work(
    image_folder, tmp_path, command, device
):
    out = tmp_path / "out"
    args = {
        "run": ["run", image_folder, "-o", out],
        "extract-features": ["extract-features", image_folder, "-o", out / "f.npz"],
        "advise": ["advise", image_folder],
        "compare": ["compare", image_folder, "-o", out],
        "evaluate": ["evaluate", tmp_path / "no-run", image_folder, "-o", out],
    }[command]
    with unchanged(image_folder):
        line = one_line_error(invoke(*args, "--device", device), "--device", device)
    assert ("no CUDA" in line) if device.startswith("cuda") else ("choose auto, cpu, cuda" in line)
    assert not out.exists()


@NO_CUDA
def test_the_library_checks_the_device_too(image_folder, tmp_path):
    from finetune.app.evaluate import evaluate_run
    from finetune.app.pipeline import run
    from finetune.method import RunOptions
    from finetune.runtime import check_device

    assert check_device("CPU") == "cpu" and check_device("auto") == "auto"
    with pytest.raises(FinetuneError, match="unknown --device 'gpu'"):
        run(RunOptions(image_folder, device="gpu", out=tmp_path / "o"))
    with pytest.raises(FinetuneError, match="no CUDA"):  # evaluate honours --device: not silently CPU
        evaluate_run(tmp_path / "whatever", image_folder, device="cuda")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("strategy", "setting", "needle"),
    [
        ("partial-finetune", "epochs=0", "'epochs' must be an integer >= 1"),
        ("linear-probe", "image_size=7", "image_size 7 is below what lite0 accepts (32 px)"),
        ("partial-finetune", "lr=nan", "'lr' must be a finite number"),
        ("partial-finetune", "lr=inf", "'lr' must be a finite number"),
        ("partial-finetune", "lr=1e30", "'lr' must be a positive number up to 10"),
        ("partial-finetune", "momentum=nan", "'momentum' must be a finite number"),
        ("partial-finetune", "lr_mult.top=nan", "'lr_mult.top' must be a number >= 0"),
        ("linear-probe", "c_grid=[1.0, nan]", "'c_grid' must be a non-empty list of positive finite"),
        ("linear-probe", "seed=-1", "'seed' must be an integer >= 0"),
        ("linear-probe", "seed=4294967296", "'seed' must be an integer from 0 to 4294967295"),
        ("linear-probe", "name=../../../../x", "cannot name a run folder"),
        ("linear-probe", 'name="a/b"', "cannot name a run folder"),
        ("linear-probe", "epochs=3", "--set epochs: not used by the linear-probe recipe"),
        ("partial-finetune", "head=svm", "--set head / --head: not used by the partial-finetune recipe"),
        ("partial-finetune", "pool=max", "--set pool: not used by the partial-finetune recipe"),
    ],
)
def test_impossible_recipe_values_are_refused_before_any_work(
    image_folder, tmp_path, strategy, setting, needle
):
    out = tmp_path / "out"
    with unchanged(image_folder):
        one_line_error(invoke("run", image_folder, "-s", strategy, "--set", setting, "-o", out), needle)
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--workers", "-1"], "--workers"),
        (["--seed", "-1"], "--seed"),
        (["--val-fraction", "0"], "--val-fraction"),
        (["-s", "partial-finetune", "--head", "svm"], "--head: not used by the partial-finetune recipe"),
        (["--compile"], "--compile: not used by the linear-probe recipe"),
        (["--weights-map", "positional"], "--weights-map applies to a --weights file"),
    ],
)
def test_impossible_or_ignored_options_are_refused(image_folder, tmp_path, extra, needle):
    out = tmp_path / "out"
    with unchanged(image_folder):
        one_line_error(invoke("run", image_folder, "-o", out, *extra), needle)
    assert not out.exists()


def test_compare_applies_a_setting_to_the_recipes_that_use_it_and_refuses_one_none_uses(image_folder):
    from finetune.app.compare import applicable_overrides

    assert applicable_overrides("linear-probe", ("epochs=3", "image_size=64")) == ("image_size=64",)
    assert applicable_overrides("full-finetune", ("epochs=3", "image_size=64")) == (
        "epochs=3",
        "image_size=64",
    )
    with unchanged(image_folder):
        one_line_error(
            invoke("compare", image_folder, "-s", "linear-probe", "-s", "stage-probe", "--set", "epochs=3"),
            "--set epochs: not used by any of linear-probe, stage-probe",
        )


def test_a_recipe_file_name_becomes_a_safe_run_folder_name_and_an_unsafe_name_is_refused(
    image_folder, tmp_path
):
    from finetune.recipes import load_recipe

    spaced = tmp_path / "my probe (v2).toml"
    spaced.write_text('method = "probe"\n', encoding="utf-8")
    assert load_recipe(recipe_file=spaced).name == "my-probe-v2"
    evil = tmp_path / "evil.toml"
    evil.write_text('method = "probe"\nname = "../../escape"\n', encoding="utf-8")
    out = tmp_path / "out"
    with unchanged(image_folder):
        one_line_error(invoke("run", image_folder, "--recipe", evil, "-o", out), "cannot name a run folder")
    assert not out.exists() and not (tmp_path / "escape").exists()


def test_a_failed_run_leaves_no_run_folder(make_folder, tmp_path):
    """Every training image of one class fails to decode: the run stops after it made its folder."""
    data = make_folder({"red": 4, "blue": 4})
    for p in sorted((data / "blue").iterdir()):
        truncated_png(p)
    out = tmp_path / "runs"
    with unchanged(data):
        ends_in_error(invoke("run", data, *TINY, "-o", out), "has no readable training image left")
    assert not out.exists()  # made by this run alone, so removed with its empty run folder
    out.mkdir()
    with unchanged(data):
        ends_in_error(invoke("run", data, *TINY, "-o", out), "has no readable training image left")
    assert out.is_dir() and not any(out.iterdir())  # the user's folder is kept, empty as it was


def test_a_disk_that_fills_during_a_probe_is_one_line_and_leaves_no_run_folder(
    image_folder, tmp_path, monkeypatch
):
    import finetune.io

    real = finetune.io.atomic_write
    out = tmp_path / "runs"

    def full(path, write, mode="wb"):
        if out in Path(path).parents:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write, mode)

    monkeypatch.setattr(finetune.io, "atomic_write", full)
    with unchanged(image_folder):
        ends_in_error(invoke("run", image_folder, *TINY, "-o", out), "No space left on device", "-o")
    assert not out.exists()


# --------------------------------------------------------------------------- where finetune writes


def test_an_output_folder_inside_data_is_refused_with_a_place_that_works(image_folder, tmp_path, monkeypatch):
    with unchanged(image_folder):
        line = one_line_error(
            invoke("run", image_folder, "-o", image_folder / "runs"), "inside the data folder"
        )
        assert f"-o {image_folder.parent / 'data-runs'}" in line
        one_line_error(invoke("compare", image_folder, "-o", image_folder / "x"), "inside the data folder")
        monkeypatch.chdir(image_folder)  # cd mydata && finetune run .
        one_line_error(invoke("run", "."), "inside the data folder")
    assert not (image_folder / "runs").exists()


@pytest.mark.parametrize("where", ["a-file/runs", "/proc/finetune-runs"])
def test_an_output_folder_that_cannot_be_written_is_one_line(image_folder, tmp_path, where):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / where if not where.startswith("/") else Path(where)
    with unchanged(image_folder):
        one_line_error(invoke("run", image_folder, "-o", out), "cannot write under -o")


def test_suggested_commands_are_shell_quoted(make_folder, tiny_weights):
    from finetune.app.advise import advise
    from finetune.data.index import scan

    data = make_folder({"red": 4, "blue": 4}, name="my data; $(touch x) 'q'")
    with unchanged(data):
        advice = advise(
            scan(data),
            backbone="test_efficientnet",
            weights_file=tiny_weights,
            sample=8,
            workers=0,
            device="cpu",
        )
    words = shlex.split(advice.command)
    assert words[:3] == ["finetune", "run", str(data)] and words[-2:] == ["--strategy", advice.strategy]


def test_names_with_escape_sequences_reach_the_terminal_escaped(make_folder, tmp_path):
    data = make_folder({"red": 4, "blue\x1b[2J\rfoo": 4})
    with unchanged(data):
        res = invoke("run", data, *TINY, "-o", tmp_path / "runs")
        assert res.exit_code == 0, res.output
        assert "\x1b" not in res.output and "\r" not in res.output
        assert "blue\\x1b[2J\\rfoo" in res.output
        res = invoke("check", data)
        assert res.exit_code == 0 and "\x1b" not in res.output


# --------------------------------------------------------------------------- what the headline means


def test_a_headline_chosen_on_validation_says_so_everywhere(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6})
    out = tmp_path / "runs"
    args = ["run", data, "-s", "partial-finetune", "--backbone", "test_resnet", "--no-pretrained"]
    args += ["--workers", "0", "-o", out]
    args += [
        a for kv in ("image_size=32", "batch_size=4", "middle_stages=1", "epochs=1") for a in ("--set", kv)
    ]
    with unchanged(data):
        res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert "val (used for selection) accuracy:" in res.output
    run_dir = next(out.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["headline"] == "val" and metrics["headline_label"] == "val (used for selection)"
    assert "val (used for selection)" in (run_dir / "report.html").read_text()


def test_a_probe_headline_is_plain_val_and_a_test_folder_is_the_headline(make_folder, tmp_path):
    for layout, test, expected in (("class", 0, "val"), ("split", 2, "test")):
        data = make_folder({"red": 4, "blue": 4}, layout=layout, test=test, name=f"d-{layout}")
        out = tmp_path / f"runs-{layout}"
        with unchanged(data):
            res = invoke("run", data, *TINY, "-o", out)
        assert res.exit_code == 0, res.output
        metrics = json.loads((next(out.iterdir()) / "metrics.json").read_text())
        assert metrics["headline"] == metrics["headline_label"] == expected


def test_stage_probe_chooses_by_cross_validation_and_ties_go_to_the_later_stage():
    from finetune.probe.stage import choose_stage

    def rows(cv, val):
        return [{"stage": f"s{i}", "cv_accuracy": c, "accuracy": v} for i, (c, v) in enumerate(zip(cv, val))]

    # stage 1 wins on validation, stage 2 on cross-validation: validation chooses nothing
    assert choose_stage(rows([0.8, 0.9, 0.95], [0.7, 1.0, 0.6])) == "s2"
    assert choose_stage(rows([1.0, 1.0, 0.9], [1.0, 1.0, 1.0])) == "s1"  # a tie: the later stage
    assert choose_stage(rows([None, None, None], [1.0, 0.5, 0.5])) == "s2"  # no CV possible: the top


def test_the_resume_hint_is_shell_quoted(tmp_path):
    import signal
    from types import SimpleNamespace

    from finetune.train.loop import Progress, _interrupted

    root, run_dir = tmp_path / "my data; rm -rf ~", tmp_path / "runs/it's $HOME"
    fake = SimpleNamespace(
        progress=Progress(epoch=0, batch=3),
        folder=run_dir / "checkpoint",
        dist=SimpleNamespace(main=True, world=1),
        ctx=SimpleNamespace(index=SimpleNamespace(root=root), run_dir=run_dir),
    )
    command = _interrupted(fake, signal.SIGTERM).todo.removeprefix("continue with: ")
    assert shlex.split(command) == ["finetune", "run", str(root), "--resume", str(run_dir)]


def test_a_path_listed_twice_in_a_csv_counts_once(make_folder, tmp_path):
    from finetune.data.index import scan

    data = make_folder({"red": 3, "blue": 3})
    rows = [f"{c}/img_{i:03d}.png,{c}" for c in ("red", "blue") for i in range(3)] + ["red/img_000.png,blue"]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with unchanged(data):
        index = scan(data, labels_csv=labels)
    assert len(index.paths) == 6 and index.counts() == {"blue": 3, "red": 3}
    assert [p.reason for p in index.ignored] == ["listed again on line 7: the row on line 1 counts"]


def test_a_probe_layer_the_backbone_lacks_is_refused_before_a_run_folder_exists(image_folder, tmp_path):
    out = tmp_path / "out"
    with unchanged(image_folder):
        one_line_error(invoke("run", image_folder, *TINY, "--set", "layer=fc9", "-o", out), "has no such tap")
    assert not out.exists()
