"""Layer-wise learning rates as a pure function, checked by hand on a tiny nn.Sequential; recipe mistakes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from finetune.cli import app
from finetune.models.anatomy import Stage
from finetune.recipes import Recipe, load_recipe, stage_roles
from finetune.train.setup import frozen_names, param_groups

runner = CliRunner()


def tiny() -> tuple[nn.Sequential, list[Stage], nn.Linear]:
    """Five conv "stages" of a hand-made network, each its own stage, and a head."""
    net = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 4, 4, 3) for i in range(5)])
    stages = [Stage(f"s{i}", (f"{i}.weight", f"{i}.bias")) for i in range(5)]
    return net, stages, nn.Linear(4, 2)


def test_roles_follow_top_and_middle_counts():
    assert stage_roles(5, Recipe(top_stages=1, middle_stages=2)) == [
        "bottom",
        "bottom",
        "middle",
        "middle",
        "top",
    ]
    assert stage_roles(2, Recipe(top_stages=1, middle_stages=3)) == [
        "middle",
        "top",
    ]  # fewer stages than asked
    assert stage_roles(3, Recipe(top_stages=0, middle_stages=0)) == ["bottom"] * 3


def test_partial_finetune_groups_are_base_tenth_hundredth_and_bottom_is_left_out():
    net, stages, head = tiny()
    recipe = load_recipe("partial-finetune", overrides=["lr=0.05"])
    named = dict(net.named_parameters())
    groups = param_groups(stages, recipe, named, list(head.parameters()))
    # Hand calculation from the recipe: head 0.05, top (stage 4) 0.005, middle (stages 2, 3) 0.0005.
    assert [g["name"] for g in groups] == ["head", "top", "middle"]
    assert [g["lr"] for g in groups] == pytest.approx([0.05, 0.005, 0.0005], rel=1e-12)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups[0]["params"]) == ids(head.parameters())
    assert ids(groups[1]["params"]) == ids(net[4].parameters())
    assert ids(groups[2]["params"]) == ids(list(net[2].parameters()) + list(net[3].parameters()))
    frozen = frozen_names(stages, recipe)
    assert frozen == ["0.weight", "0.bias", "1.weight", "1.bias"]
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert not in_optimizer & {id(named[n]) for n in frozen}
    assert all(p.requires_grad for p in net.parameters())  # pure: the caller freezes, not param_groups
    opt = torch.optim.SGD(groups, lr=1.0)  # torch accepts the dicts as they are
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.005, 0.0005], rel=1e-12)


def test_full_finetune_gives_every_parameter_a_learning_rate():
    net, stages, head = tiny()
    recipe = load_recipe("full-finetune")  # top 2, middle 2, bottom x0.001
    groups = param_groups(stages, recipe, dict(net.named_parameters()), list(head.parameters()))
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("head", pytest.approx(0.01)),
        ("top", pytest.approx(0.001)),
        ("middle", pytest.approx(0.0001)),
        ("bottom", pytest.approx(0.00001)),
    ]
    assert sum(len(g["params"]) for g in groups) == 12  # 10 trunk tensors + 2 head tensors
    assert frozen_names(stages, recipe) == []


def test_a_parameter_outside_every_stage_is_refused():
    net, stages, head = tiny()
    with pytest.raises(ValueError, match="4.bias"):
        param_groups(stages[:-1] + [Stage("s4", ("4.weight",))], Recipe(), dict(net.named_parameters()), [])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "lr_mul.top=0.1"], "lr_mul.top"),
        (["--set", "epochs=two"], "epochs"),
        (["--set", "lr=-0.1"], "'lr'"),
        (["--set", "lr_mult.top=-1"], "lr_mult.top"),
        (["--set", "bn_policy=sometimes"], "bn_policy"),
    ],
)
def test_recipe_mistakes_are_one_line_naming_the_key(image_folder, tmp_path, args, needle):
    res = runner.invoke(
        app,
        ["run", str(image_folder), "--strategy", "partial-finetune", "--out", str(tmp_path / "runs"), *args],
    )
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    assert not (tmp_path / "runs").exists()


def test_unknown_key_in_a_recipe_file_is_named(image_folder, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('method = "finetune"\nepochs = 2\nlearning_rate = 0.1\n')
    res = runner.invoke(
        app, ["run", str(image_folder), "--recipe", str(path), "--out", str(tmp_path / "runs")]
    )
    assert res.exit_code == 2 and "learning_rate" in res.output and len(res.output.strip().splitlines()) == 1
