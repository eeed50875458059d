"""End to end on the real packaged backbone: run -> run folder -> predict, and the user's mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import invoke, one_line_error, tree_digest, write_images

runner = CliRunner()
SMALL = ["--set", "image_size=64"]  # same network and weights, 12x less compute


def test_packaged_lite0_knows_imagenet():
    """The default backbone's real weights: china.jpg is a palace/temple, flower.jpg a daisy."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from finetune.app.predictor import imagenet_class_names
    from finetune.data.transforms import EvalTransform
    from finetune.models.backbone import build

    bb = build("lite0")
    assert bb.weights.source == "packaged" and len(bb.weights.sha256) == 64
    assert bb.preprocessing.mean == (0.5, 0.5, 0.5) and bb.preprocessing.interpolation == "bicubic"
    names = imagenet_class_names()
    tf = EvalTransform(bb.preprocessing)
    imgs = load_sample_images().images
    x = torch.stack([tf(Image.fromarray(im)) for im in imgs])
    with torch.inference_mode():
        top5 = [[names[i] for i in row] for row in bb.model(x).topk(5, dim=1).indices.tolist()]
    assert top5[0][0] in {"palace", "monastery", "church", "bell cote", "pagoda", "stupa", "dome"}, top5[0]
    assert top5[1][0] == "daisy", top5[1]


def test_run_writes_a_complete_run_folder_and_predict_reproduces_it(make_folder, runs_dir):
    data = make_folder({"red": 6, "blue": 6, "green": 6})
    before = tree_digest(data)
    res = invoke("run", data, "--out", runs_dir, *SMALL)
    assert res.exit_code == 0, res.output
    assert "val accuracy" in res.output
    run = next(runs_dir.iterdir())
    for f in ("model.safetensors", "config.json", "metrics.json", "split.json", "problems.json"):
        assert (run / f).is_file(), f
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["class_names"] == ["blue", "green", "red"]
    assert cfg["weights"]["source"] == "packaged" and len(cfg["weights"]["sha256"]) == 64
    assert cfg["preprocessing"]["input_size"] == 64 and cfg["recipe"]["name"] == "linear-probe"
    assert {"torch", "timm", "scikit-learn"} <= set(cfg["versions"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] == 1.0  # three trivially separable looks

    # predict after run: same labels and scores as the run's own validation predictions
    preds = {p["path"]: p for p in json.loads((run / "predictions.json").read_text())}
    res = invoke("predict", data, "--run", run, "--json")
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]  # one JSON object per image
    rows = {str(Path(r["path"]).relative_to(data).as_posix()): r for r in lines}
    assert len(rows) == len(lines) == 18
    for path, p in preds.items():
        assert rows[path]["label"] == p["pred"]
        assert abs(rows[path]["score"] - p["score"]) < 1e-4
    assert tree_digest(data) == before  # the user's folder is read-only to us


def test_load_run_api_needs_no_pickle(make_folder, runs_dir):
    from PIL import Image

    from finetune import load_run

    data = make_folder({"a": 4, "b": 4})
    assert invoke("run", data, "--out", runs_dir, *SMALL).exit_code == 0
    model, transform, names = load_run(next(runs_dir.iterdir()))
    x = transform(Image.open(next((data / "b").iterdir())).convert("RGB"))[None]
    with torch.inference_mode():
        assert names[int(model(x).argmax())] == "b"


def test_two_images_per_class_runs_and_binary_folds(make_folder, runs_dir):
    data = make_folder({"x": 2, "y": 2})
    res = invoke("run", data, "--out", runs_dir, *SMALL)
    assert res.exit_code == 0, res.output
    assert "C = 1" in res.output  # too few images for cross-validation, said aloud
    split = json.loads((next(runs_dir.iterdir()) / "split.json").read_text())
    assert len(split["train"]) == 2 and len(split["val"]) == 2


def test_svm_head_predicts_scores_not_probabilities(make_folder, runs_dir):
    data = make_folder({"a": 4, "b": 4})
    assert invoke("run", data, "--out", runs_dir, "--head", "svm", *SMALL).exit_code == 0
    res = invoke("predict", data / "a", "--runs", runs_dir)
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[0].split()
    assert header == ["class", "score", "image"] and "probability" not in res.output


def test_unreadable_files_are_skipped_and_reported(make_folder, runs_dir):
    data = make_folder({"a": 4, "b": 4})
    (data / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (data / "b" / "empty.png").write_bytes(b"")
    res = invoke("run", data, "--out", runs_dir, *SMALL)
    assert res.exit_code == 0, res.output
    assert "2 file(s) skipped" in res.output
    problems = json.loads((next(runs_dir.iterdir()) / "problems.json").read_text())
    assert {p["path"] for p in problems["skipped"]} == {"a/broken.jpg", "b/empty.png"}


def test_predict_without_a_run_uses_imagenet_labels(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    Image.fromarray(load_sample_images().images[1]).save(tmp_path / "flower.jpg")
    res = invoke("predict", tmp_path / "flower.jpg", "--runs", tmp_path / "none", "--top-k", "3")
    assert res.exit_code == 0, res.output
    assert "ImageNet-1k" in res.output and "daisy" in res.output


def test_split_is_stratified_seeded_and_reproducible():
    from finetune.data.index import stratified_split

    labels = [0] * 10 + [1] * 5 + [2] * 2
    a = stratified_split(labels, 0.2, seed=3)
    assert a == stratified_split(labels, 0.2, seed=3)
    assert a != stratified_split(labels, 0.2, seed=4)
    val_per_class = [sum(1 for s, y in zip(a, labels) if s == "val" and y == k) for k in range(3)]
    assert val_per_class == [2, 1, 1]  # max(1, round(0.2 n))


def test_split_folders_and_test_split_are_kept_apart(make_folder):
    from finetune.data.index import scan

    data = make_folder({"a": 4, "b": 4}, layout="split", val=2, test=3)
    idx = scan(data)
    assert idx.layout == "split-folders"
    assert [len(idx.indices(s)) for s in ("train", "val", "test")] == [8, 4, 6]
    assert all(idx.paths[i].startswith("test/") for i in idx.indices("test"))


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing", ["does not exist"]),
        ("empty", ["no images found"]),
        ("single", ["only one class", "at least two"]),
        ("one_image", ["lonely", "fewer than 2 images"]),
    ],
)
def test_data_mistakes_exit_2_with_one_line(tmp_path, case, needles):
    data = tmp_path / "d"
    if case == "empty":
        (data / "a").mkdir(parents=True)
        (data / "notes.txt").write_text("hi")
    elif case == "single":
        write_images(data / "only", 0, 3)
    elif case == "one_image":
        write_images(data / "fine", 0, 3)
        write_images(data / "lonely", 1, 1)
    one_line_error(invoke("run", data, "--out", tmp_path / "runs"), *needles)


def test_backbone_strategy_and_run_folder_mistakes(image_folder, tmp_path):
    one_line_error(invoke("run", image_folder, "--backbone", "resnet5O"), "unknown backbone", "did you mean")
    one_line_error(
        invoke("run", image_folder, "--strategy", "linear-prob"), "unknown strategy", "linear-probe"
    )
    one_line_error(invoke("predict", image_folder, "--run", tmp_path), "not a finetune run")
    one_line_error(invoke("run", image_folder, "--no-such-flag"), "No such option")


def test_help_does_not_import_torch():
    code = "import sys; from finetune.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
