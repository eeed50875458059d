"""advise / --strategy auto, compare, export, runs, recipes: the commands that choose and ship."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import invoke, one_line_error, tree_digest

runner = CliRunner()


def _crops(img: np.ndarray, n: int, rng) -> list[Image.Image]:
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = (255 * (img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.uint8)
    h, w, _ = img.shape
    out = []
    for _ in range(n):
        s = rng.uniform(0.6, 1.0)
        ch, cw = int(h * s), int(w * s)
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out.append(Image.fromarray(img[y0 : y0 + ch, x0 : x0 + cw]))
    return out


def _folder(root, sources: dict[str, np.ndarray], n: int = 8):
    rng = np.random.default_rng(0)
    for name, img in sources.items():
        (root / name).mkdir(parents=True)
        for i, im in enumerate(_crops(img, n, rng)):
            im.save(root / name / f"{i}.jpg", quality=92)
    return root


@pytest.fixture(scope="module")
def three_sets(tmp_path_factory):
    """Real photos (near ImageNet), handwritten digits and natural textures (far from it)."""
    skd = pytest.importorskip("skimage.data")
    from sklearn.datasets import load_digits

    base = tmp_path_factory.mktemp("advise")
    photos = _folder(base / "photos", {"cat": skd.chelsea(), "coffee": skd.coffee(), "rocket": skd.rocket()})
    textures = _folder(base / "textures", {"grass": skd.grass(), "gravel": skd.gravel()})
    digits = base / "digits"
    d = load_digits()
    for k in (0, 1, 2):
        (digits / str(k)).mkdir(parents=True)
        for i, img in enumerate(d.images[d.target == k][:8]):
            Image.fromarray((255 - img * 255 / 16).astype(np.uint8)).resize((24, 24)).save(
                digits / str(k) / f"{i}.png"
            )
    return {"photos": photos, "textures": textures, "digits": digits}


def test_advise_puts_photos_and_digits_or_textures_in_different_cells(three_sets):
    from finetune.app.advise import advise
    from finetune.data.index import scan

    got = {name: advise(scan(folder), sample=24, workers=0) for name, folder in three_sets.items()}
    assert got["photos"].near_imagenet and got["photos"].strategy == "linear-probe", got["photos"]
    for far in ("digits", "textures"):
        assert not got[far].near_imagenet and got[far].strategy == "stage-probe", got[far]
        assert got[far].familiarity < got["photos"].familiarity - 0.2
    assert all(a.little_data for a in got.values())  # 8 images per class


def test_familiarity_is_one_minus_the_normalized_entropy(three_sets):
    """Against a hand computation on the full model's ImageNet softmax."""
    from finetune.app.advise import imagenet_familiarity
    from finetune.data.index import scan
    from finetune.data.transforms import eval_reader
    from finetune.models.backbone import build

    bb = build("lite0")
    index = scan(three_sets["photos"])
    read = eval_reader(bb.preprocessing)
    x = torch.stack([read(index.absolute(i)) for i in range(4)])
    with torch.inference_mode():
        p = bb.model(x).softmax(1).double()
    entropy = -(p * p.log()).sum(1) / np.log(1000)
    fam, n = imagenet_familiarity(bb, index, [0, 1, 2, 3])
    assert n == 4 and fam == pytest.approx(1 - entropy.mean().item(), abs=1e-4)


def test_advise_command_and_auto_strategy(three_sets, tmp_path):
    data = three_sets["photos"]
    before = tree_digest(data)
    res = invoke("advise", data, "--sample", "16", "--json")
    assert res.exit_code == 0, res.output
    advice = json.loads(res.output[res.output.index("{") :])  # after the progress line on stderr
    assert advice["strategy"] == "linear-probe" and "familiarity" in advice["reason"]
    res = invoke("run", data, "--strategy", "auto", "--out", tmp_path / "runs", "--set", "image_size=64")
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["strategy"] == "linear-probe" and config["extra"]["advice"]["strategy"] == "linear-probe"
    assert tree_digest(data) == before


def test_advise_refuses_a_backbone_without_weights(three_sets):
    one_line_error(invoke("advise", three_sets["digits"], "--backbone", "lenet5"), "no ImageNet weights")


@pytest.fixture(scope="module")
def a_run(tmp_path_factory):
    from tests.conftest import write_images

    base = tmp_path_factory.mktemp("run")
    for k, name in enumerate(("red", "blue", "green")):
        write_images(base / "data" / name, k, 6, 32)
    res = invoke("run", base / "data", "--out", base / "runs", "--set", "image_size=64")
    assert res.exit_code == 0, res.output
    (run_dir,) = (base / "runs").iterdir()
    return run_dir


def test_export_onnx_runs_in_onnx_runtime_like_pytorch(a_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from finetune.app.runfolder import load_run

    out = tmp_path / "m.onnx"
    res = invoke("export", a_run, "--format", "onnx", "-o", out)
    assert res.exit_code == 0, res.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["class_names"] == ["blue", "green", "red"] and meta["preprocessing"]["input_size"] == 64
    model, _, _ = load_run(a_run)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_export_pt2_loads_with_torch_export(a_run, tmp_path):
    from finetune.app.runfolder import load_run

    out = tmp_path / "m.pt2"
    assert invoke("export", a_run, "-f", "pt2", "-o", out).exit_code == 0
    program = torch.export.load(str(out))
    model, _, _ = load_run(a_run)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_export_mistakes_are_one_line(tmp_path):
    one_line_error(invoke("export", tmp_path / "nope"), "does not exist")
    one_line_error(invoke("export", tmp_path, "--format", "torchscript"), "torchscript")


def test_runs_lists_past_runs_with_their_accuracy(a_run):
    res = invoke("runs", "--runs", a_run.parent, "--json")
    rows = json.loads(res.output)
    metrics = json.loads((a_run / "metrics.json").read_text())
    assert [r["run"] for r in rows] == [a_run.name]
    assert rows[0]["accuracy"] == metrics["val"]["accuracy"] and rows[0]["strategy"] == "linear-probe"
    assert a_run.name in invoke("runs", "--runs", a_run.parent).output


def test_recipes_lists_the_four_cells_with_the_lecture_multipliers():
    res = invoke("recipes", "--json")
    recipes = {r["name"]: r for r in json.loads(res.output)}
    assert list(recipes) == ["linear-probe", "stage-probe", "partial-finetune", "full-finetune"]
    partial = recipes["partial-finetune"]["lr_mult"]
    assert (partial["head"], partial["top"], partial["middle"], partial["bottom"]) == (1.0, 0.1, 0.01, 0.0)
    assert "1/0.1/0.01/0" in invoke("recipes").output


def test_compare_prints_one_row_per_strategy_and_a_plot(a_run, tmp_path):
    data = a_run.parent.parent / "data"
    res = invoke(
        "compare",
        data,
        "-s",
        "linear-probe",
        "-s",
        "stage-probe",
        "--out",
        tmp_path / "cmp",
        "--set",
        "image_size=64",
    )
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    table = [ln for ln in lines if ln.split() and ln.split()[0] in ("linear-probe", "stage-probe")]
    assert len(table) == 2
    plot = next(p for p in (tmp_path / "cmp").glob("compare-*.png"))
    assert Image.open(plot).format == "PNG"
    one_line_error(invoke("compare", data, "-s", "no-such-recipe"), "no-such-recipe")


def test_compare_counts_what_each_recipe_trains(a_run, tmp_path):
    """Probe: its head only. Partial fine-tune: head + top + middle stages, by hand from the stages."""
    from finetune.app.compare import CompareOptions, compare
    from finetune.models.anatomy import build_trunk, stages
    from finetune.models.backbone import build
    from finetune.recipes import load_recipe, stage_roles

    data = a_run.parent.parent / "data"
    sets = ("image_size=64", "epochs=1", "warmup_epochs=0")
    rows, _ = compare(
        CompareOptions(
            data=data,
            strategies=("linear-probe", "partial-finetune"),
            overrides=sets,
            out=tmp_path / "cmp",
            workers=0,
        ),
    )
    trunk = build_trunk(build("lite0", pretrained=False).model, "pool")
    dim, k = 1280, 3
    named = dict(trunk.named_parameters())
    st = stages(trunk)
    roles = stage_roles(len(st), load_recipe("partial-finetune"))
    learned = sum(named[n].numel() for s, r in zip(st, roles) if r != "bottom" for n in s.params)
    assert [r.trainable for r in rows] == [dim * k + k, learned + dim * k + k]
