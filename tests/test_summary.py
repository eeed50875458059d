"""`finetune summary`: per-layer numbers checked against hand calculations and published tables.

References are independent of the code: the lecture formula for a conv layer
(out_C·out_H·out_W · in_C·k·k MACs, in_C·k·k·out_C + out_C params), in·out for a linear layer,
torchvision's published parameter counts / GFLOPS / accuracies (its model documentation), and
the recipe definitions (which stages train under partial-finetune) written out by hand.
"""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
from torch import nn
from typer.testing import CliRunner

from finetune.cli import app
from finetune.models.summary import fold, published_accuracy, stage_multipliers, summarize, summarize_model

runner = CliRunner()


def _row(layers, name):
    (row,) = [r for r in layers if r.name == name]
    return row


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def alexnet227():
    return summarize("tv:alexnet", input_size=227)


def test_alexnet_conv1_at_227_matches_the_lecture_table(alexnet227):
    conv1 = _row(alexnet227.layers, "features.0")  # 64 filters 11x11, stride 4, pad 2
    assert conv1.kind == "Conv2d"
    assert conv1.output_shape == (64, 56, 56)  # floor((227 + 2*2 - 11) / 4) + 1 = 56
    assert conv1.activation_kb == 784  # 64*56*56*4 / 1024
    assert conv1.params == 23_296  # 11*11*3*64 + 64
    assert conv1.macs == 72_855_552 == 64 * 56 * 56 * 3 * 11 * 11


def test_alexnet_pool_and_fc_rows_by_hand(alexnet227):
    pool1 = _row(alexnet227.layers, "features.2")  # 3x3 stride 2 on 56x56 -> 27x27
    assert (pool1.output_shape, pool1.params, pool1.macs) == ((64, 27, 27), 0, 0)
    assert pool1.activation_bytes == 64 * 27 * 27 * 4
    fc6 = _row(alexnet227.layers, "classifier.1")
    assert (fc6.output_shape, fc6.params, fc6.macs) == ((4096,), 9216 * 4096 + 4096, 9216 * 4096)
    relu1 = _row(alexnet227.layers, "features.1")  # in place: no new memory
    assert relu1.activation_bytes == 0 and relu1.macs == 0
    # The input image is the first row, as in the lectures: 3*227*227 floats.
    assert alexnet227.layers[0].activation_bytes == 3 * 227 * 227 * 4


def test_alexnet_totals_match_torchvision_published_numbers(alexnet227):
    # torchvision AlexNet_Weights.IMAGENET1K_V1: num_params 61,100,840; 0.714 GFLOPS (MACs) at 224.
    assert alexnet227.params == 61_100_840
    assert alexnet227.weight_kb == 61_100_840 * 4 / 1024
    at224 = summarize("tv:alexnet")  # the weights' own size
    assert at224.input_size == 224
    assert round(at224.macs / 1e9, 3) == 0.714
    # linear-probe: the backbone is frozen, only the new head (replacing fc8) trains.
    assert alexnet227.trainable_params == 4096 * 1000 + 1000
    assert _row(alexnet227.layers, "classifier.6").train == "head"
    assert _row(alexnet227.layers, "features.0").train == "frozen"


def test_tiny_net_conv_relu_pool_linear_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )
    rows = summarize_model(net, 16)
    conv, relu, pool, flat, fc = (_row(rows, str(i)) for i in range(5))
    assert (conv.output_shape, conv.params, conv.macs) == ((8, 16, 16), 3 * 9 * 8 + 8, 8 * 16 * 16 * 3 * 9)
    assert relu.activation_bytes == 8 * 16 * 16 * 4  # not in place: a new tensor
    assert (pool.output_shape, pool.params, pool.macs, pool.activation_kb) == ((8, 8, 8), 0, 0, 2.0)
    assert flat.activation_bytes == 0 and flat.output_shape == (512,)  # a view of the pool output
    assert (fc.output_shape, fc.params, fc.macs) == ((10,), 512 * 10 + 10, 512 * 10)
    assert fc.activation_bytes == 40
    assert sum(r.params for r in rows) == sum(p.numel() for p in net.parameters())


def test_shared_module_counted_per_call_params_once():
    act = nn.ReLU()
    lin = nn.Linear(3 * 4 * 4, 5)
    net = nn.Sequential(act, nn.Flatten(), lin, act)
    rows = summarize_model(net, 4)
    shared = _row(rows, "0")
    assert shared.calls == 2
    assert shared.activation_bytes == (48 + 5) * 4  # two new tensors, one per call
    assert sum(r.params for r in rows) == 48 * 5 + 5


def test_stage_multipliers_follow_the_recipe_definition():
    recipe = SimpleNamespace(
        is_probe=False,
        top_stages=1,
        middle_stages=2,
        lr_mult=SimpleNamespace(top=0.1, middle=0.01, bottom=0.0),
    )
    got = stage_multipliers(["stem", "s1", "s2", "s3", "s4"], recipe)
    assert got == {"stem": 0.0, "s1": 0.0, "s2": 0.01, "s3": 0.01, "s4": 0.1}
    probe = SimpleNamespace(is_probe=True)
    assert set(stage_multipliers(["a", "b"], probe).values()) == {0.0}


def test_partial_finetune_trains_top_three_stages_and_head():
    import timm

    s = summarize("test_resnet", input_size=32, strategy="partial-finetune")
    # By hand from recipes/partial-finetune.toml: top 1 stage (layer4) x0.1, middle 2 (layer2, layer3) x0.01,
    # bottom (stem, layer1) frozen; the head (fc) trains. Parameter names from a separately built model.
    ref = timm.create_model("test_resnet", pretrained=False)
    trains = ("layer2", "layer3", "layer4", "fc")
    expected = sum(p.numel() for n, p in ref.named_parameters() if n.startswith(trains))
    assert s.trainable_params == expected
    assert s.params == sum(p.numel() for p in ref.parameters())
    assert _row(s.layers, "conv1.0").train == "frozen"  # deep stem
    assert _row(s.layers, "layer4.0.conv1").train == "lr×0.1"
    assert _row(s.layers, "layer2.0.conv1").train == "lr×0.01"


def test_fold_by_depth_and_by_stage_keeps_totals():
    s = summarize("test_resnet", input_size=32, strategy="full-finetune")
    top = summarize("test_resnet", input_size=32, strategy="full-finetune", depth=1)
    names = [r.name for r in top.layers]
    assert "layer1" in names and not any(n.startswith("layer1.") for n in names)
    assert _row(top.layers, "layer3").kind == "Sequential"
    by_stage = fold(s.layers, 0)
    for folded in (top.layers, by_stage):
        assert sum(r.params for r in folded) == s.params
        assert sum(r.macs for r in folded) == s.macs
        assert sum(r.activation_bytes for r in folded) == sum(r.activation_bytes for r in s.layers)


def test_published_accuracy_from_weight_metadata():
    # torchvision's model table: AlexNet 56.522 / 79.066;
    # VGG16 (timm's vgg16.tv_in1k are torchvision's weights) 71.592 / 90.382.
    assert published_accuracy("tv:alexnet") == (56.522, 79.066)
    assert published_accuracy("vgg16") == (71.592, 90.382)
    assert published_accuracy("test_resnet") == (None, None)  # timm publishes none in its config


def test_cli_summary_prints_table_and_writes_csv(tmp_path):
    out = tmp_path / "alexnet.csv"
    result = runner.invoke(app, ["summary", "tv:alexnet", "--input-size", "227", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    assert "23,296" in result.output and "72.86M" in result.output and "TOTAL" in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100
    rows = {r["name"]: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert rows["features.0"]["macs"] == "72855552" and rows["features.0"]["output_shape"] == "64x56x56"
    assert rows["TOTAL"]["params"] == "61100840"


def test_cli_compare_one_line_per_model():
    result = runner.invoke(app, ["summary", "--compare", "tv:alexnet", "test_resnet", "-i", "64"])
    assert result.exit_code == 0, result.output
    alex = [ln for ln in result.output.splitlines() if ln.startswith("tv:alexnet")]
    tiny = [ln for ln in result.output.splitlines() if ln.startswith("test_resnet")]
    assert len(alex) == 1 and "56.52" in alex[0] and "79.07" in alex[0]
    assert len(tiny) == 1 and "n/a" in tiny[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["summary", "alexnett"], "did you mean"),
        (["summary", "tv:alexnet", "--input-size", "8"], "input size 8"),
        (["summary", "test_resnet", "--strategy", "partial-finetun"], "partial-finetune"),
        (["summary", "test_resnet", "tv:alexnet"], "--compare"),
        (["summary", "test_resnet", "--depth", "-1"], "depth"),
    ],
)
def test_cli_mistakes_are_one_line(args, needle):
    line = _one_error_line(runner.invoke(app, args))
    assert needle in line


def test_cli_csv_into_a_folder_is_one_line(tmp_path):
    line = _one_error_line(runner.invoke(app, ["summary", "test_resnet", "-i", "32", "--csv", str(tmp_path)]))
    assert "folder" in line
