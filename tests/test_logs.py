"""`run --log tensorboard`: event files a TensorBoard reader finds per-step and per-epoch scalars
and the recipe's hparams in; a missing tensorboard package is one line before any run folder."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.train.logs import check_logs
from finetune.train.setup import lr_factor
from tests.conftest import invoke, one_line_error

TINY = ("image_size=32", "batch_size=4", "middle_stages=1", "epochs=2", 'init_head="random"')


def _run_args(data: Path, out: Path, strategy: str, *extra: str) -> list:
    args = ["run", data, "--strategy", strategy, "--backbone", "test_resnet", "--no-pretrained"]
    args += ["--workers", "0", "--device", "cpu", "--out", out, *extra]
    return args + [a for kv in TINY for a in ("--set", kv)]


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def test_check_logs_reads_repeats_and_comma_lists_and_refuses_unknown_kinds():
    assert check_logs([]) == ("csv",)
    assert check_logs(["tensorboard"]) == ("csv", "tensorboard")
    assert check_logs(["csv,tensorboard", "tensorboard"]) == ("csv", "tensorboard")
    assert check_logs("tensorboard") == ("csv", "tensorboard")  # one string, from Python
    with pytest.raises(FinetuneError, match="mlflow.*MLflow is not supported"):
        check_logs(["csv,mlflow"])


def test_tensorboard_gets_step_and_epoch_scalars_and_the_recipe_as_hparams(make_folder, tmp_path):
    data = make_folder({"red": 8, "blue": 8})
    out = tmp_path / "runs"
    result = invoke(*_run_args(data, out, "partial-finetune", "--log", "csv,tensorboard"))
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    acc = _events(run_dir / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    per_step = {
        "step/loss",
        "step/accuracy",
        "step/img_per_s",
        "step/lr/head",
        "step/lr/top",
        "step/lr/middle",
    }
    assert per_step <= tags and "step/lr/bottom" not in tags  # the frozen bottom has no group
    assert {"epoch/train_loss", "epoch/train_accuracy", "epoch/val_loss", "epoch/val_accuracy"} <= tags

    with open(run_dir / "history.csv", newline="") as fh:  # csv: always written, the same numbers
        history = list(csv.DictReader(fh))
    assert len(history) == 2
    val = acc.Scalars("epoch/val_accuracy")
    assert [e.step for e in val] == [1, 2]
    assert [e.value for e in val] == pytest.approx([float(r["val_accuracy"]) for r in history], abs=1e-6)

    loss = acc.Scalars("step/loss")
    steps = [e.step for e in loss]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4  # one per optimizer step
    # after step s the groups hold the schedule's LR of step s + 1 (0-based s): 1 warmup epoch, cosine
    per_epoch = len(steps) // 2
    lr = [0.01 * lr_factor(s, len(steps), per_epoch, "cosine") for s in steps]
    head, top = acc.Scalars("step/lr/head"), acc.Scalars("step/lr/top")
    assert [e.value for e in head] == pytest.approx(lr, rel=1e-5, abs=1e-9)
    assert [e.value for e in top] == pytest.approx([0.1 * v for v in lr], rel=1e-5, abs=1e-9)
    # each epoch's train_loss is the mean of its steps' losses (every batch holds 4 images)
    for epoch, row in enumerate(history):
        losses = [e.value for e in loss[epoch * per_epoch : (epoch + 1) * per_epoch]]
        assert float(row["train_loss"]) == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    config = json.loads((run_dir / "config.json").read_text())

    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(config["recipe"]["lr"])
    assert start.hparams["epochs"].number_value == 2
    assert start.hparams["lr_mult.top"].number_value == pytest.approx(0.1)
    assert start.hparams["optimizer"].string_value == config["recipe"]["optimizer"]
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"epoch/val_accuracy", "epoch/val_loss"}


def test_a_resumed_run_hides_the_steps_logged_after_its_checkpoint(tmp_path):
    """A process killed after step 6 whose last checkpoint holds 3 steps: the resumed run logs
    steps 4.. again, and TensorBoard shows one point per step, the resumed run's."""
    from finetune.recipes import load_recipe
    from finetune.train.logs import open_logs

    recipe = load_recipe("partial-finetune")
    groups = [{"name": "head", "lr": 0.01}]
    first = open_logs(tmp_path, ("csv", "tensorboard"), recipe)
    for step in range(1, 7):
        first.step(step, float(step), 0.5, 4, groups)
    first.epoch({"epoch": 1, "val_accuracy": 0.25})
    first.close()
    resumed = open_logs(tmp_path, ("csv", "tensorboard"), recipe, resumed_at=3)
    for step in range(4, 9):
        resumed.step(step, 100.0 + step, 0.5, 4, groups)
    resumed.epoch({"epoch": 2, "val_accuracy": 0.75})
    resumed.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = _events(tmp_path / "tensorboard")
    loss = acc.Scalars("step/loss")
    assert [e.step for e in loss] == list(range(1, 9))
    assert [e.value for e in loss] == [1.0, 2.0, 3.0, 104.0, 105.0, 106.0, 107.0, 108.0]
    assert [(e.step, e.value) for e in acc.Scalars("epoch/val_accuracy")] == [(1, 0.25), (2, 0.75)]


def test_missing_tensorboard_is_one_line_before_any_run_folder(image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    out = tmp_path / "runs"
    result = invoke(*_run_args(image_folder, out, "partial-finetune", "--log", "tensorboard"))
    one_line_error(result, "--log tensorboard needs tensorboard", 'pip install "finetune[tensorboard]"')
    assert not out.exists()


def test_log_tensorboard_on_a_probe_and_an_unknown_kind_are_refused(image_folder, tmp_path):
    out = tmp_path / "runs"
    args = ["run", image_folder, "--strategy", "linear-probe", "--out", out, "--log", "tensorboard"]
    one_line_error(invoke(*args), "--log tensorboard: not used by the linear-probe recipe")
    args = ["run", image_folder, "--strategy", "partial-finetune", "--out", out, "--log", "mlflow"]
    one_line_error(invoke(*args), "--log mlflow", "csv or tensorboard")
    assert not out.exists()
