"""The learning-rate range test: its pure parts against hand calculations, then real tiny runs
(`range_test`, `finetune lr-find`, `finetune run --set lr=auto`) on a random test_resnet."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.data.index import scan
from finetune.method import RunContext, RunOptions
from finetune.models.backbone import build
from finetune.recipes import load_recipe, read_toml
from finetune.train.lrfind import (
    divergence,
    lr_schedule,
    range_test,
    smooth_losses,
    suggest,
    valley,
)
from tests.conftest import invoke, one_line_error, unchanged

TINY = ("image_size=32", "batch_size=4", "middle_stages=1")  # test_resnet: 5 stages, top 1, middle 1
# A range test that must reach divergence: no clipping, every stage learning fast, a fresh head.
WILD = ("grad_clip=0.0", 'init_head="random"', "lr_mult.top=0.5", "lr_mult.middle=0.2", "lr_mult.bottom=0.1")


# --------------------------------------------------------------------------- pure parts, by hand


def test_the_schedule_is_exponential_between_the_bounds():
    lrs = lr_schedule(1e-7, 10.0, 9)
    by_hand = [1e-7 * (10.0 / 1e-7) ** (i / 8) for i in range(9)]  # one decade per step
    assert np.allclose(lrs, by_hand, rtol=1e-12)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10.0)
    assert np.allclose(lrs[1:] / lrs[:-1], 10.0)


def test_the_smoothing_is_a_bias_corrected_moving_average():
    # beta 0.5 by hand: avg 0.5, 1.25, 2.125; corrections 1 - 0.5, 1 - 0.25, 1 - 0.125
    assert np.allclose(smooth_losses(np.array([1.0, 2.0, 3.0]), beta=0.5), [1.0, 1.25 / 0.75, 2.125 / 0.875])
    # a constant loss stays itself from the first point (no pull towards the average's zero start)
    assert np.allclose(smooth_losses(np.full(20, 2.3)), 2.3)


def test_divergence_is_four_times_the_minimum_so_far_or_not_finite():
    assert divergence(np.array([1.0, 0.5, 1.9, 2.1])) == 3  # 2.1 > 4 x 0.5
    assert divergence(np.array([1.0, 0.5, 1.9, 2.0])) is None  # equal is not above
    assert divergence(np.array([8.0, 0.9, 3.0, 9.0])) == 3  # the start's height is not the reference
    assert divergence(np.array([1.0, math.nan])) == 1
    assert divergence(np.array([1.0, math.inf])) == 1


def test_the_valley_is_as_long_as_the_longest_decreasing_subsequence_and_ends_with_it():
    # 5 4 3 (3.5) 2 1: 5 points going down, ending at step 5: the valley is steps 1..5
    assert valley(np.array([5.0, 4.0, 3.0, 3.5, 2.0, 1.0, 6.0])) == (1, 5)
    # 3.0 (3.1) 2.9 2.5 2.0 1.2 0.8: 6 points ending at step 6
    assert valley(np.array([3.0, 3.1, 2.9, 2.5, 2.0, 1.2, 0.8, 0.9, 2.0, 9.0])) == (1, 6)
    # two descents: the longer one (3.0 .. 1.5) wins even when it starts later
    assert valley(np.array([2.0, 1.0, 3.0, 2.5, 2.2, 1.8, 1.5, 4.0])) == (2, 6)
    # a noisy plateau before the descent counts only the points that go down:
    # 2.0 1.99 1.98 then 1.5 1.0 0.5 -> 6 points, so the valley starts 6 steps before the end
    plateau = np.array([2.0, 2.05, 1.99, 2.06, 2.02, 2.07, 1.98, 2.04, 1.5, 1.0, 0.5, 3.0])
    assert valley(plateau) == (5, 10)
    assert valley(np.array([1.0, 2.0, 3.0])) == (0, 0)  # never going down: the first step


def test_the_suggestion_is_the_middle_of_the_valley_in_log_lr():
    lrs = 10.0 ** np.arange(-6, 4)  # one decade per step
    losses = np.array([3.0, 3.1, 2.9, 2.5, 2.0, 1.2, 0.8, 0.9, 2.0, 9.0])
    assert suggest(lrs, losses, diverged=9) == pytest.approx(1e-3)  # steps 1..6: the middle is 3
    assert suggest(lrs, np.array([1.0, 2.0, 3.0]), diverged=None) == lrs[0]  # never goes down
    assert suggest(np.array([0.123456, 1.0]), np.array([2.0, 3.0]), None) == 0.123  # 3 digits


def test_the_suggestion_ignores_what_comes_after_the_divergence():
    lrs = lr_schedule(1e-4, 1.0, 12)
    smoothed = np.array([2.0, 1.9, 1.8, 1.7, 1.6, 50.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    d = divergence(smoothed)
    assert d == 5
    assert suggest(lrs, smoothed, d) == float(f"{lrs[2]:.3g}") < lrs[d]


def test_the_figure_has_a_log_lr_axis_the_suggestion_marked_and_ignores_the_blow_up():
    from finetune.app.figures import figure_bytes, lr_find_figure

    lrs = 10.0 ** np.arange(-6, 4)
    losses = np.array([3.0, 3.1, 2.9, 2.5, 2.0, 1.2, 0.8, 0.9, 2.0, 1e6])
    smoothed = smooth_losses(losses, 0.5)
    fig = lr_find_figure(lrs, losses, smoothed, suggested=1e-3, diverged_at=1e3)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert "suggested lr 0.001 (valley)" in labels and "diverged at lr 1e+03" in labels
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [1e-3]
    assert ax.get_ylim()[1] < 10  # the 1e6 of the last step would flatten the curve
    assert figure_bytes(fig, "png")[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- real tiny runs


def _ctx(data: Path, tmp: Path, strategy: str, *overrides: str) -> RunContext:
    recipe = load_recipe(strategy, overrides=[*TINY, *overrides])
    opts = RunOptions(data=data, strategy=strategy, backbone="test_resnet", pretrained=False, workers=0)
    bb = build("test_resnet", pretrained=False)
    return RunContext(scan(data), bb, bb.preprocessing.with_size(32), recipe, tmp, opts)


def test_a_real_range_test_diverges_and_suggests_below_it_with_every_group_at_its_ratio(
    make_folder, tmp_path
):
    data = make_folder({"red": 8, "blue": 8, "green": 8})
    ctx = _ctx(data, tmp_path, "full-finetune", *WILD)
    before = {k: v.clone() for k, v in ctx.backbone.model.state_dict().items()}
    test = range_test(ctx, steps=20, start=1e-3)

    assert test.diverged is not None, test.smoothed  # lr of several units without clipping blows up
    assert test.suggested < test.divergence_lr
    assert test.lrs[0] <= test.suggested
    n = len(test.losses)
    assert n == test.diverged + 1 < 20  # it stopped at the divergence
    assert np.allclose(test.lrs, lr_schedule(1e-3, 10.0, 20)[:n])
    assert test.beta == pytest.approx(0.98**5)  # fastai's 0.98 over 100 steps: 20 steps smooth 5x less
    assert np.allclose(test.smoothed, smooth_losses(test.losses, test.beta))
    # every group at its lr_mult ratio of the base, at every step (one process: no scaling)
    mult = {"head": 1.0, "top": 0.5, "middle": 0.2, "bottom": 0.1}
    assert set(test.group_lrs) == set(mult)
    for name, lrs in test.group_lrs.items():
        assert np.allclose(lrs, test.lrs * mult[name], rtol=1e-9), name
    # a throwaway copy: the backbone the run goes on with is untouched, and so is the recipe
    after = ctx.backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ctx.recipe.lr == 0.01 and not ctx.bad


def test_lr_find_cli_writes_the_figure_and_the_points_under_out_and_prints_the_suggestion(
    make_folder, tmp_path, monkeypatch
):
    monkeypatch.setenv("FINETUNE_ENGINE", "torch")  # the LP-FT head's features without an ONNX export
    data = make_folder({"red": 8, "blue": 8})
    out = tmp_path / "out"
    args = ["lr-find", data, "--backbone", "test_resnet", "--no-pretrained", "--workers", "0"]
    args += ["--out", out, "--steps", "24", "--device", "cpu"]  # the recipe's LP-FT head included
    with unchanged(data):
        result = invoke(*args, *[a for kv in TINY for a in ("--set", kv)])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("suggested lr: ")
    suggested = float(last.removeprefix("suggested lr: "))
    (folder,) = out.iterdir()
    assert folder.name.endswith("test_resnet-partial-finetune-lr-find")
    assert (folder / "lr-find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(folder / "lr-find.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 24 or "diverged" in result.output
    lrs = np.array([float(r["lr"]) for r in rows])
    smoothed = np.array([float(r["smoothed_loss"]) for r in rows])
    # the printed number is the valley rule applied to the written points
    assert suggested == pytest.approx(suggest(lrs, smoothed, divergence(smoothed)), rel=1e-3)
    losses = np.array([float(r["loss"]) for r in rows])
    assert np.allclose(smoothed, smooth_losses(losses, 0.98 ** (100 / 24)), rtol=1e-4)
    assert [float(r["lr_top"]) / float(r["lr_head"]) for r in rows] == pytest.approx([0.1] * len(rows))


def test_lr_find_refuses_a_probe_recipe_and_writes_nothing(image_folder, tmp_path):
    out = tmp_path / "out"
    result = invoke("lr-find", image_folder, "--strategy", "linear-probe", "--out", out)
    one_line_error(result, "lr-find is for fine-tuning", "--strategy partial-finetune")
    assert not out.exists()
    result = invoke("lr-find", image_folder, "--strategy", "auto", "--out", out)
    one_line_error(result, "--strategy partial-finetune")


def test_lr_find_refuses_an_output_folder_inside_data(image_folder):
    result = invoke("lr-find", image_folder, "--backbone", "test_resnet", "--out", image_folder / "runs")
    one_line_error(result, "inside the data folder")
    assert not (image_folder / "runs").exists()


def test_run_with_lr_auto_trains_with_the_suggestion_and_records_it(make_folder, tmp_path):
    data = make_folder({"red": 8, "blue": 8})
    out = tmp_path / "runs"
    args = ["run", data, "--strategy", "partial-finetune", "--backbone", "test_resnet", "--no-pretrained"]
    args += ["--workers", "0", "--device", "cpu", "--out", out, "--keep-checkpoints"]
    sets = [*TINY, "lr=auto", "epochs=1", 'init_head="random"']
    result = invoke(*args, *[a for kv in sets for a in ("--set", kv)])
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    found = config["extra"]["lr_find"]
    lr = config["recipe"]["lr"]
    assert isinstance(lr, float) and lr == found["suggested_lr"] and found["rule"] == "valley"
    assert 1e-7 <= lr <= 10.0
    assert (run_dir / found["points"]).is_file() and (run_dir / found["figure"]).is_file()
    # what --resume reads: the number, not "auto"
    recipe = read_toml(run_dir / "checkpoint" / "recipe.toml")
    assert recipe["lr"] == lr
    assert not (run_dir / "tensorboard").exists()  # --log csv, the default: history.csv alone
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["groups"][0] == {"name": "head", "lr": lr, "params": 2}

    # the range test leaves no trace: the same run with the number typed in gives the same weights
    again = tmp_path / "again"
    typed = [*TINY, f"lr={lr!r}", "epochs=1", 'init_head="random"']
    result = invoke(*args[:-3], "--out", again, *[a for kv in typed for a in ("--set", kv)])
    assert result.exit_code == 0, result.output
    (other,) = again.iterdir()
    a, b = load_file(str(run_dir / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lr_auto_under_torchrun_every_rank_tests_and_rank_0_records_one_run(make_folder, tmp_path):
    """2 gloo processes: the range test's steps are collectives, so a rank that stopped or suggested
    differently would hang or fail the run; the groups run at lr x 2 (the global batch)."""
    from tests.conftest import torchrun

    data = make_folder({"a": 8, "b": 8, "c": 8})
    out = tmp_path / "runs"
    sets = ["image_size=32", "batch_size=3", "epochs=1", 'init_head="random"', "lr=auto"]
    args = ["run", data, "--strategy", "partial-finetune", "--backbone", "test_resnet", "--no-pretrained"]
    args += ["--workers", "0", "--device", "cpu", "--out", out, *[a for kv in sets for a in ("--set", kv)]]
    proc = torchrun(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    lr = config["recipe"]["lr"]
    assert lr == config["extra"]["lr_find"]["suggested_lr"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2
    assert metrics["train"]["groups"][0]["lr"] == pytest.approx(2 * lr)
    with open(run_dir / "lr-find.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["lr_head"]) for r in rows] == pytest.approx([2 * float(r["lr"]) for r in rows], rel=1e-5)
