"""The catalogue: names, weights resolution in order, offline errors, and the `backbones` command."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import BackboneError, WeightsError
from finetune.models.backbone import build
from finetune.models.catalogue import ALIASES, resolve
from finetune.models.fetch import status as weights_status

runner = CliRunner()


@pytest.fixture
def empty_hubs(tmp_path, monkeypatch):
    """No network weights anywhere: empty TORCH_HOME and HF_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_aliases_never_shadow_timm_names():
    import timm

    for name, spec in ALIASES.items():
        assert resolve(name) is spec
        if timm.is_model(name):  # an alias that is a timm name means exactly that timm model
            assert spec.source == "timm" and spec.arch == name, name
    assert resolve("resnet50d").model == "resnet50d"
    assert resolve("tv:alexnet").source == "torchvision"


def test_unknown_names_get_suggestions():
    with pytest.raises(BackboneError, match="did you mean.*resnet18"):
        resolve("resnt18")
    with pytest.raises(BackboneError, match="tv:alexnet"):
        resolve("tv:alexnt")
    line = _one_error_line(runner.invoke(app, ["backbones", "resnt18"]))
    assert "did you mean" in line and line.split("did you mean ")[1].split(", ").count("resnet18") == 1


def test_backbones_table_lists_every_alias():
    result = runner.invoke(app, ["backbones"])
    assert result.exit_code == 0, result.output
    rows = {ln.split()[0]: ln for ln in result.output.splitlines() if ln.strip()}
    for name in ALIASES:
        assert name in rows
    assert "packaged" in rows["lite0"]
    assert "61.1M" in rows["alexnet"] and "138.4M" in rows["vgg16"]  # published counts, in millions
    assert "none published" in rows["zfnet"]


def test_backbones_taps_and_stages():
    result = runner.invoke(app, ["backbones", "resnet18", "--taps", "--stages", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    out = result.output
    # 64 px: stem /4 -> 16, then 16, 8, 4, 2; widths 64, 64, 128, 256, 512.
    for line in ("stem    64 x 16 x 16", "stage2  128 x 8 x 8", "stage4  512 x 2 x 2", "pool    512"):
        assert line in out
    # stem: 7x7x3x64 conv + 64-channel batch norm (weight, bias) = 9408 + 128.
    assert "9,536" in out and "513,000" in out  # head: 512 * 1000 + 1000


def test_state_dict_and_safetensors_load_through_weights(tmp_path):
    torch.manual_seed(0)
    src = build("test_resnet", pretrained=False).model
    state = {k: v.clone() for k, v in src.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        bb = build("test_resnet", weights_file=tmp_path / f)
        assert bb.weights.source == "file" and len(bb.weights.sha256) == 64
        for k, v in bb.model.state_dict().items():
            torch.testing.assert_close(v, state[k])
    # Other names, same order and shapes: refused by name, accepted when positional is asked for.
    # (A torch file keeps the dict order; safetensors reorders tensors by dtype, so no position there.)
    torch.save({f"x{i}": v for i, v in enumerate(state.values())}, tmp_path / "renamed.pt")
    with pytest.raises(WeightsError, match="positional"):
        build("test_resnet", weights_file=tmp_path / "renamed.pt")
    bb = build("test_resnet", weights_file=tmp_path / "renamed.pt", weights_map="positional")
    torch.testing.assert_close(bb.model.conv1[0].weight, state["conv1.0.weight"])


def test_mismatched_shapes_and_pickles_are_refused_in_one_line(tmp_path, make_folder):
    data = make_folder({"a": 3, "b": 3}, size=32)
    state = build("test_resnet", pretrained=False).model.state_dict()
    state["fc.weight"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    bad = str(tmp_path / "bad.safetensors")
    args = ["run", str(data), "--backbone", "test_resnet", "--weights", bad, "-o", str(tmp_path / "runs")]
    line = _one_error_line(runner.invoke(app, args))
    assert "fc.weight" in line and "do not fit" in line

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Evil()}))
    line = _one_error_line(
        runner.invoke(
            app,
            [
                "run",
                str(data),
                "--backbone",
                "test_resnet",
                "--weights",
                str(tmp_path / "evil.pt"),
                "-o",
                str(tmp_path / "runs"),
            ],
        )
    )
    assert "refused" in line
    assert not marker.exists()


def test_no_offline_weights_names_every_remedy(empty_hubs, make_folder):
    data = make_folder({"a": 3, "b": 3}, size=32)
    assert weights_status(resolve("vgg16")) == "downloadable"
    line = _one_error_line(
        runner.invoke(app, ["run", str(data), "--backbone", "vgg16", "-o", str(empty_hubs / "runs")])
    )
    assert "--weights FILE" in line and "--no-pretrained" in line and "`finetune fetch vgg16`" in line
    assert str(empty_hubs / "hf") in line and "timm/vgg16.tv_in1k model.safetensors" in line
    line = _one_error_line(
        runner.invoke(app, ["run", str(data), "--backbone", "tv:alexnet", "-o", str(empty_hubs / "runs")])
    )
    assert str(empty_hubs / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in line
    assert "`finetune fetch tv:alexnet`" in line


def test_weights_found_in_the_hugging_face_cache_by_file_lookup(empty_hubs):
    """A file placed where the hub would cache it is found and loaded, with no network call."""
    import timm

    cfg = timm.models.get_pretrained_cfg("resnet18").to_dict()
    torch.manual_seed(1)
    state = build("resnet18", pretrained=False).model.state_dict()
    repo = empty_hubs / "hf" / "hub" / f"models--{cfg['hf_hub_id'].replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    target = repo / "snapshots" / "abc123" / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    assert weights_status(resolve("resnet18")) == f"cached ({target.stat().st_size / 1e6:.1f} MB)"
    bb = build("resnet18")
    assert bb.weights.source == "hub"
    torch.testing.assert_close(bb.model.fc.weight, state["fc.weight"])


def test_run_with_a_weights_file_works_offline(empty_hubs, make_folder, tmp_path):
    data = make_folder({"a": 4, "b": 4}, size=32)
    torch.manual_seed(2)
    save_file(build("resnet18", pretrained=False).model.state_dict(), str(tmp_path / "r18.safetensors"))
    result = runner.invoke(
        app,
        [
            "run",
            str(data),
            "--backbone",
            "resnet18",
            "--weights",
            str(tmp_path / "r18.safetensors"),
            "--set",
            "image_size=64",
            "-o",
            str(tmp_path / "runs"),
            "--no-cache",
        ],
    )
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- published layouts


def _published_layouts(spec) -> list[dict]:
    """The tensor names and shapes (meta tensors) of the files each catalogue entry's library publishes.

    torchvision: its builder's model with what its weights need (GoogLeNet: aux heads on);
    timm: its own state dict (Inception v3's torchvision-derived file keeps the aux head), and
    for VGG also torchvision's layout, which timm's filter maps (its weights came from there).
    """
    import timm
    import torchvision

    if spec.source == "torchvision":
        kwargs = {"aux_logits": True, "init_weights": False} if spec.arch == "googlenet" else {}
        return [torchvision.models.get_model(spec.arch, **kwargs).state_dict()]
    layouts = [timm.create_model(spec.model).state_dict()]
    if spec.arch == "inception_v3":
        layouts.append(timm.create_model(spec.model, aux_logits=True).state_dict())
    if spec.arch in ("vgg16", "vgg19"):
        layouts.append(torchvision.models.get_model(spec.arch).state_dict())
    return layouts


@pytest.mark.parametrize("name", [n for n, s in ALIASES.items() if s.has_weights])
def test_every_catalogue_entry_loads_its_published_layout(name):
    """Names and shapes only (the meta device holds no values): loading maps every published tensor
    onto the network, and the result is the transfer architecture (no auxiliary heads left)."""
    from finetune.models.backbone import bare_model, load_state

    spec = ALIASES[name]
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in bare_model(spec).state_dict().items()}
        for layout in _published_layouts(spec):
            model = load_state(spec, layout)
            assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want, name
            assert not any(k.split(".")[0] in ("aux1", "aux2", "AuxLogits") for k in want)


def test_googlenet_file_with_aux_heads_loads_through_weights_and_values_arrive(tmp_path):
    """torchvision's GoogLeNet file (20 aux* tensors) through --weights: aux built, loaded, dropped."""
    import torchvision

    torch.manual_seed(11)
    published = torchvision.models.googlenet(aux_logits=True, init_weights=False, transform_input=True)
    torch.save(published.state_dict(), tmp_path / "googlenet.pth")
    bb = build("googlenet", weights_file=tmp_path / "googlenet.pth")
    assert bb.model.aux1 is None and bb.model.transform_input
    torch.testing.assert_close(
        bb.model.inception5b.branch1.conv.weight, published.inception5b.branch1.conv.weight
    )
    # A transfer-trained GoogLeNet saved without its aux heads loads too.
    torch.save(bb.model.state_dict(), tmp_path / "mine.pth")
    again = build("tv:googlenet", weights_file=tmp_path / "mine.pth")
    torch.testing.assert_close(again.model.fc.weight, published.fc.weight)


def test_old_densenet_names_and_inception_aux_load_with_their_values(tmp_path):
    """torchvision's DenseNet files use pre-0.4 names ("norm.1") and no BatchNorm counters."""
    import re

    import timm
    import torchvision

    torch.manual_seed(12)
    dense = torchvision.models.densenet121()
    old = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in dense.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "densenet121-a639ec97.pth")
    bb = build("tv:densenet121", weights_file=tmp_path / "densenet121-a639ec97.pth")
    torch.testing.assert_close(
        bb.model.features.denseblock1.denselayer1.norm1.weight,
        dense.features.denseblock1.denselayer1.norm1.weight,
    )
    inception = timm.create_model("inception_v3", aux_logits=True)
    save_file(
        {k: v.contiguous() for k, v in inception.state_dict().items()}, str(tmp_path / "inc.safetensors")
    )
    bb = build("inception_v3", weights_file=tmp_path / "inc.safetensors")
    assert bb.model.AuxLogits is None
    torch.testing.assert_close(bb.model.fc.weight, inception.fc.weight)


def test_a_typo_gets_the_alias_it_meant():
    line = _one_error_line(runner.invoke(app, ["backbones", "efficientnet-lite0"]))
    meant = line.split("did you mean ")[1]
    assert meant.startswith("lite0 (tf_efficientnet_lite0)") and "tf_efficientnet_lite0" in meant
    with pytest.raises(BackboneError, match=r"did you mean googlenet \(tv:googlenet\)"):
        resolve("googlenet_v1")


# --------------------------------------------------------------------------- any timm CNN: its feature levels


def _level_hooks(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: every feature_info module's output on the untouched network (forward hooks),
    globally averaged by hand: over H, W of (B, C, H, W), or of (B, H, W, C) for NHWC blocks."""
    seen = {}

    def keep(out, info):
        nhwc = out.shape[-1] == info["num_chs"] and out.shape[1] != info["num_chs"]
        seen[info["module"]] = out.mean(dim=(1, 2) if nhwc else (2, 3)).detach().clone()  # (B, C)

    handles = [
        model.get_submodule(f["module"]).register_forward_hook(lambda m, a, out, info=f: keep(out, info))
        for f in model.feature_info
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name", ["test_convnext", "test_byobnet", "test_nfnet", "test_mambaout"])
def test_a_timm_cnn_without_a_rule_is_cut_at_timm_s_feature_levels(name):
    """Stage taps equal a hook on the module timm names for that level (pooled by hand, NHWC blocks
    included); the cut network keeps only what lies below; stages cover every parameter once."""
    import timm

    from finetune.models import anatomy

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    assert type(model).__module__ + "." + type(model).__qualname__ not in anatomy.RULES
    state = model.state_dict()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))  # no level has H == C
    hooks = _level_hooks(model, x)
    names = anatomy.taps(model)
    levels = [f["module"] for f in model.feature_info]
    assert names[-1] == "pool" and len(names) - 1 == len(levels)
    stage_taps = [t for t in names if t.startswith("stage")]
    assert stage_taps == [f"stage{i}" for i in range(1, len(stage_taps) + 1)]
    owned = [p for s in anatomy.stages(model) for p in s.params]
    assert sorted(owned) == sorted(n for n, _ in model.named_parameters())

    with torch.no_grad():
        for tap, module in zip(names, levels):
            trunk = anatomy.build_trunk(copy.deepcopy(model), tap)
            torch.testing.assert_close(trunk(x), hooks[module])  # (B, C_i)
            assert set(trunk.state_dict()) <= {f"net.{k}" for k in state}
        top = anatomy.build_trunk(copy.deepcopy(model), names[0])
        assert len(top.state_dict()) < len(state) / 2  # the levels above are gone, not just unused
        multi = anatomy.build_multi_trunk(copy.deepcopy(model), names)(x)
        pool = model.forward_head(model.forward_features(x), pre_logits=True)
        for tap, out, module in zip(names, multi, [*levels, None]):
            torch.testing.assert_close(out, pool if tap == "pool" else hooks[module])


@pytest.mark.parametrize(
    ("name", "stem_tap", "levels"),
    [
        ("convnext_tiny", False, 4),
        ("regnety_016", True, 4),
        ("efficientnetv2_rw_s", True, 6),
        ("resnet50d", True, 4),
    ],
)
def test_real_timm_architectures_get_stages_and_a_stage2_cut(name, stem_tap, levels):
    """Built without weights: the architectures the README names, each cut at stage2 and read
    (only shapes are checked: every value is zero)."""
    from finetune.models import anatomy

    with torch.device("meta"):  # the architecture without its init (seconds on CPU); values unused
        model = build(name, pretrained=False).model
    model = model.to_empty(device="cpu")
    for t in model.state_dict().values():
        t.zero_()  # not uninitialised memory: denormals there make a CPU forward crawl
    names = anatomy.taps(model)
    assert names == ["stem"] * stem_tap + [f"stage{i}" for i in range(1, levels + 1)] + ["pool"]
    assert [s.name for s in anatomy.stages(model)][:2] == ["stem", "stage1"]
    shapes = anatomy.tap_shapes(model, 64)
    trunk = anatomy.build_trunk(model, "stage2")
    with torch.no_grad():
        out = trunk(torch.randn(1, 3, 64, 64))
    assert tuple(out.shape) == (1, shapes["stage2"][0])


def test_a_timm_net_timm_cannot_cut_keeps_its_stages_and_refuses_stage_taps():
    import timm

    from finetune.models import anatomy

    base = type(timm.create_model("test_convnext"))
    uncuttable = type("NoIntermediates", (base,), {"forward_intermediates": None})
    model = uncuttable(**{"depths": (1, 2, 4, 2), "dims": (24, 32, 48, 64), "conv_mlp": False})
    model.pretrained_cfg = timm.models.get_pretrained_cfg("test_convnext").to_dict()
    assert anatomy.taps(model) == ["pool"]
    assert [s.name for s in anatomy.stages(model)][:2] == ["stem", "stage1"]
    with pytest.raises(BackboneError, match="cannot be cut at stage2.*forward_intermediates"):
        anatomy.build_trunk(model, "stage2")


def test_stage_probe_extract_features_and_partial_finetune_on_a_timm_cnn(make_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_ENGINE", "torch")
    data = make_folder({"a": 6, "b": 6}, size=32)
    common = ["--backbone", "test_convnext", "--no-pretrained", "--workers", "0"]
    res = runner.invoke(app, ["extract-features", str(data), *common, "--layer", "stage2", "--layer", "pool",
                              "-o", str(tmp_path / "f.npz"), "--no-cache"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "stage2 32" in res.output  # test_convnext's second level has 32 channels
    for strategy in ("stage-probe", "partial-finetune"):
        args = ["run", str(data), *common, "--strategy", strategy, "--set", "image_size=32", "--no-cache",
                "-o", str(tmp_path / "runs")]  # fmt: skip
        if strategy == "partial-finetune":
            args += ["--set", "epochs=1"]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    line = _one_error_line(
        runner.invoke(
            app, ["extract-features", str(data), *common, "--layer", "stem", "-o", str(tmp_path / "g.npz")]
        )
    )
    assert "stage1" in line  # test_convnext's first level is already a stage: no stem tap, the choices named
