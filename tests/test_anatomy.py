"""Stages and taps of every catalogue backbone, checked against hand-written hooks and hand counts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from finetune.errors import BackboneError
from finetune.models import anatomy
from finetune.models.backbone import build
from finetune.models.catalogue import ALIASES
from finetune.models.classifier import Classifier


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return build(name, pretrained=False).model


def _cpu(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build(name, pretrained=False).model.eval()


def _check_partition(model: nn.Module) -> list[anatomy.Stage]:
    st = anatomy.stages(model)
    flat = [p for s in st for p in s.params]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())
    assert len(flat) == len(set(flat)), "a parameter in two stages"
    names = [s.name for s in st]
    assert names[0] == "stem" and len(set(names)) == len(names)
    body = [int(n[5:]) for n in names if n.startswith("stage")]
    assert body == list(range(1, len(body) + 1)), names  # bottom -> top
    return st


@pytest.mark.parametrize("name", list(ALIASES))
def test_every_alias_partition_taps_and_new_head(name):
    """On the meta device (no memory, no arithmetic): stages cover all parameters once and in
    order; every tap has a shape; the multi trunk yields each tap's width; a K-class head fits."""
    spec = ALIASES[name]
    model = _meta(name)
    st = _check_partition(model)
    assert st[-1].name == "head"
    shapes = anatomy.tap_shapes(model, spec.min_input)
    assert list(shapes) == anatomy.taps(model) and anatomy.taps(model)[-1] == "pool"
    multi = anatomy.build_multi_trunk(copy.deepcopy(model), list(shapes))
    with torch.no_grad():
        outs = multi(torch.zeros(2, 3, spec.min_input, spec.min_input, device="meta"))
    assert [tuple(o.shape) for o in outs] == [(2, s[0]) for s in shapes.values()]
    trunk = anatomy.build_trunk(model, "pool")
    _check_partition(trunk)
    dim = anatomy.feature_dim(trunk, spec.min_input)
    clf = Classifier(trunk, nn.Linear(dim, 5, device="meta"))
    with torch.no_grad():
        assert tuple(clf(torch.zeros(2, 3, spec.min_input, spec.min_input, device="meta")).shape) == (2, 5)


# Published parameter counts (torchvision model docs / the papers), and our own LeNet by hand:
# C1 3*25*6+6, C3 6*25*16+16, C5 400*120+120, F6 120*84+84, output 84*1000+1000.
PUBLISHED_PARAMS = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "googlenet": 6_624_904,
    "resnet50": 25_557_032,
    "densenet121": 7_978_856,
    "mobilenet_v2": 3_504_872,
    "efficientnet_b0": 5_288_548,
    "lenet5": 456 + 2416 + 48120 + 10164 + 85000,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_parameter_counts_match_published(name):
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


def test_vgg16_and_alexnet_stages_follow_the_paper():
    # VGG16: conv blocks of 2, 2, 3, 3, 3 convolutions (weight + bias each), then fc6, fc7, fc8.
    st = anatomy.stages(_meta("vgg16"))
    assert [(s.name, s.size) for s in st] == [
        ("stem", 4),
        ("stage1", 4),
        ("stage2", 6),
        ("stage3", 6),
        ("stage4", 6),
        ("fc6", 2),
        ("fc7", 2),
        ("head", 2),
    ]
    st = {s.name: s.params for s in anatomy.stages(_meta("alexnet"))}
    assert st["fc6"] == ("classifier.1.weight", "classifier.1.bias")
    assert st["fc7"] == ("classifier.4.weight", "classifier.4.bias")
    assert st["head"] == ("classifier.6.weight", "classifier.6.bias")


def test_tap_shapes_by_hand():
    # AlexNet at 224: conv 11/4 pad 2 -> 55, pool 3/2 -> 27; conv 5 pad 2, pool -> 13; pool -> 6.
    assert anatomy.tap_shapes(_meta("alexnet"), 224) == {
        "stem": (64, 27, 27),
        "stage1": (192, 13, 13),
        "stage2": (256, 6, 6),
        "fc6": (4096,),
        "fc7": (4096,),
        "pool": (4096,),
    }
    # ResNet-50: stride 4 after the stem, then /1, /2, /2, /2; widths 64, 256, 512, 1024, 2048.
    assert anatomy.tap_shapes(_meta("resnet50"), 224) == {
        "stem": (64, 56, 56),
        "stage1": (256, 56, 56),
        "stage2": (512, 28, 28),
        "stage3": (1024, 14, 14),
        "stage4": (2048, 7, 7),
        "pool": (2048,),
    }
    # ZFNet conv1 7/2 pad 1: (224 + 2 - 7) // 2 + 1 = 110, then pool 3/2 pad 1 -> 55.
    assert anatomy.tap_shapes(_meta("zfnet"), 224)["stem"] == (96, 55, 55)


# (backbone, tap, the submodule a reader would hook by hand, input size)
HAND_HOOKS = [
    ("test_resnet", "stage2", lambda m: m.layer2, 48),
    ("test_resnet", "stem", lambda m: m.maxpool, 48),
    ("test_efficientnet", "stage3", lambda m: m.blocks[2], 48),
    ("resnet18", "stage3", lambda m: m.layer3, 64),
    ("alexnet", "fc6", lambda m: m.classifier[2], 64),  # the ReLU after fc6, as in DeCAF
    ("alexnet", "stage1", lambda m: m.features[5], 64),
    ("vgg11", "fc7", lambda m: m.pre_logits.act2, 64),
    ("vgg11", "stage2", lambda m: m.features[10], 64),
]


def _hand_hook(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    got = []
    h = module.register_forward_hook(lambda mod, args, out: got.append(out.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0]


@pytest.mark.parametrize(("name", "tap", "pick", "size"), HAND_HOOKS)
def test_trunk_tap_equals_a_hand_written_hook(name, tap, pick, size):
    model = _cpu(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ref = _hand_hook(model, pick(model), x)  # the hook leaves the model as it was
    ref = ref.flatten(1) if ref.dim() == 2 or ref.shape[-1] * ref.shape[-2] == 1 else ref
    modes = [("avg", lambda t: t.mean((2, 3))), ("max", lambda t: t.amax((2, 3)))]
    if ref.dim() == 4:
        modes.append(("none", lambda t: t))
    for i, (pool, reduce) in enumerate(modes):
        net = model if i == len(modes) - 1 else copy.deepcopy(model)  # big nets: one copy fewer
        with torch.no_grad():
            out = anatomy.build_trunk(net, tap, pool).eval()(x)
        torch.testing.assert_close(out, ref if ref.dim() == 2 else reduce(ref), atol=1e-5, rtol=1e-5)


def test_pool_tap_is_the_input_of_the_classifier():
    model = _cpu("alexnet")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    got = []
    h = model.classifier[6].register_forward_pre_hook(lambda mod, args: got.append(args[0].clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    with torch.no_grad():
        out = anatomy.build_trunk(copy.deepcopy(model), "pool")(x)
    torch.testing.assert_close(out, got[0])


def test_truncated_trunk_drops_upper_layers_and_is_deterministic():
    model = _cpu("resnet18")
    trunk = anatomy.build_trunk(model, "stage2")
    names = [n for n, _ in trunk.named_parameters()]
    assert not any(n.startswith(("net.layer3", "net.layer4", "net.fc")) for n in names)
    assert sum(p.numel() for p in trunk.parameters()) == 9536 + 147968 + 525568  # stem + stage1 + stage2
    st = _check_partition(trunk)
    assert [s.name for s in st] == ["stem", "stage1", "stage2"]
    # A fresh build cut at the same tap has the same keys, and takes the saved tensors exactly.
    torch.manual_seed(5)
    other = anatomy.build_trunk(build("resnet18", pretrained=False).model.eval(), "stage2")
    assert list(other.state_dict()) == list(trunk.state_dict())
    other.load_state_dict(trunk.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), trunk(x))


def test_multi_trunk_equals_single_trunks_and_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _cpu("test_efficientnet")
    names = anatomy.taps(model)
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    multi = anatomy.build_multi_trunk(copy.deepcopy(model), names, "avg").eval()
    with torch.inference_mode():
        outs = multi(x)
    assert len(outs) == len(names)
    for tap, out in zip(names, outs, strict=True):
        with torch.no_grad():
            single = anatomy.build_trunk(copy.deepcopy(model), tap, "avg").eval()(x)
        torch.testing.assert_close(out, single, atol=1e-5, rtol=1e-5)
    path = tmp_path / "multi.onnx"
    torch.onnx.export(
        multi, (x,), str(path), input_names=["images"], dynamo=False, dynamic_axes={"images": {0: "batch"}}
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})
    assert len(got) == len(names)
    for a, b in zip(got, outs, strict=True):
        torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-4, rtol=1e-4)


def test_torchvision_rules_cover_the_lecture_families():
    import torchvision

    for arch in (
        "resnet18",
        "vgg11",
        "densenet121",
        "mobilenet_v2",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "googlenet",
        "inception_v3",
        "alexnet",
    ):
        kw = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, **kw)
        st = _check_partition(model)
        assert st[-1].name == "head", arch
        assert len(st) >= 4, arch


def test_classic_networks_forward_at_their_minimum_input():
    for name in ("lenet5", "zfnet"):
        spec = ALIASES[name]
        model = build(name, pretrained=False).model
        with torch.no_grad():
            assert model(torch.zeros(1, 3, spec.min_input, spec.min_input)).shape == (1, 1000)
        assert build(name).weights.source == "random"  # nothing published: random init, said so


def test_unknown_tap_lists_the_known_ones():
    with pytest.raises(BackboneError, match="stage4"):
        anatomy.build_trunk(_meta("resnet18"), "conv9")
