"""`--head knn`: cosine k-nearest neighbours, checked against scikit-learn's KNeighborsClassifier.

The pure head first (numpy, torch and ONNX Runtime against sklearn on the same features), then
one run of timm's tiny test_efficientnet (32 px) with `--head knn` through predict, evaluate
and export, against the run's own PyTorch model and sklearn fitted on the saved bank.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from finetune.probe.knn import K_GRID, fit_knn, knn_proba, knn_tensors
from tests.conftest import invoke, one_line_error, seeded_tiny_weights, write_images


def _blobs(n: int, d: int, k: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) continuous features of k overlapping classes (no two distances tie), labels (n,)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.normal(size=(k, d))
    return (centres[y] + noise * rng.normal(size=(n, d))).astype(np.float32), y


def _sklearn(x: np.ndarray, y: np.ndarray, k: int) -> KNeighborsClassifier:
    return KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x, y)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_probabilities_and_predictions_equal_sklearns(k):
    from finetune.models.classifier import KNNHead

    x, y = _blobs(120, 16, 4, noise=1.5, seed=k)
    q, _ = _blobs(50, 16, 4, noise=1.5, seed=100 + k)
    q *= np.random.default_rng(0).uniform(0.5, 3.0, size=(50, 1)).astype(np.float32)  # cosine: scale-free
    knn = fit_knn(x, y, k_grid=(k,))
    assert knn.k == k
    ref = _sklearn(x, y, k)
    want = ref.predict_proba(q)  # (50, 4) shares of the k neighbours
    assert 0 < (want.max(1) < 1).sum() < 50 or k == 1  # mixed neighbourhoods: the check has teeth

    np.testing.assert_allclose(knn_proba(knn, q), want, atol=1e-6)
    head = KNNHead(*knn_tensors(knn), knn.k)
    with torch.inference_mode():
        got = head(torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (got.argmax(1) == ref.predict(q)).all()


def test_k_is_the_one_cross_validation_picks_on_the_same_folds():
    """k and every CV score equal sklearn's cross_val_score per k on StratifiedKFold; ties: smaller k."""
    x, y = _blobs(150, 8, 3, noise=2.5, seed=1)
    knn = fit_knn(x, y, seed=7)
    folds = StratifiedKFold(3, shuffle=True, random_state=7)
    means = {k: cross_val_score(_sklearn(x, y, k), x, y, cv=folds).mean() for k in K_GRID}
    best = max(means.values())
    assert knn.n_folds == 3
    assert knn.cv_scores == pytest.approx(means)
    assert knn.k == min(k for k, s in means.items() if s == best)
    assert len(set(np.round(list(means.values()), 6))) > 1  # the grid's k are told apart


def test_small_data_caps_k_and_skips_cross_validation():
    x, y = _blobs(9, 4, 3, noise=0.5, seed=2)  # 3 per class: folds train on 6 images
    knn = fit_knn(x, y)
    assert knn.n_folds == 3 and set(knn.cv_scores) == {1, 3, 5}
    single = fit_knn(x[[0, 1, 2, 3]], np.array([0, 1, 2, 0]))  # one image of class 1: no CV
    assert single.n_folds == 0 and single.k == 1 and single.cv_scores == {}


def test_knn_classifier_exports_to_onnx_and_runs_in_onnxruntime():
    """TopK and Gather in the exported file: ONNX Runtime gives the torch model's (and sklearn's) votes."""
    from torch import nn

    from finetune.features.engine import OrtEngine, export_onnx
    from finetune.models.classifier import Classifier, KNNHead

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten())  # (B, 24)
    images = torch.randn(60, 3, 8, 8)
    with torch.inference_mode():
        feats = trunk(images).numpy()
    y = np.arange(60) % 3
    knn = fit_knn(feats, y, k_grid=(5,))
    model = Classifier(trunk, KNNHead(*knn_tensors(knn), knn.k)).eval()
    blob = export_onnx(model, 8, output_name="scores")
    queries = torch.randn(7, 3, 8, 8)
    got = OrtEngine(blob).run(queries.numpy())
    with torch.inference_mode():
        want = model(queries).numpy()
        qf = trunk(queries).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, _sklearn(feats, y, 5).predict_proba(qf), atol=1e-6)


# --------------------------------------------------------------------------- one run, end to end


CLASSES = ("blue", "green", "red")


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory):
    """A `--head knn` linear probe of tiny test_efficientnet (seeded weights, 32 px) on 3 x 10 images."""
    base = tmp_path_factory.mktemp("knn")
    tiny = seeded_tiny_weights(base)
    tiny += ["--set", "image_size=32", "--workers", "0"]
    for k, name in enumerate(CLASSES):
        write_images(base / "data" / name, k, 10)
        write_images(base / "held" / name, k, 3, start=50)
    res = invoke("run", base / "data", "--out", base / "runs", "--head", "knn", *tiny)
    assert res.exit_code == 0, res.output
    assert "head: knn, k = " in res.output
    (run,) = (base / "runs").iterdir()
    return run, base, tiny


def _torch_model(run: Path):
    from finetune.app.runfolder import load_run, read_config
    from finetune.data.transforms import eval_reader

    model, _, names = load_run(run)
    return model, eval_reader(read_config(run).preprocessing), names


def test_knn_run_saves_the_training_features_and_predict_matches_sklearn(knn_run):
    from safetensors.numpy import load_file

    run, base, _ = knn_run
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    k = config["extra"]["knn"]["k"]
    train = json.loads((run / "split.json").read_text())["train"]
    assert config["head_kind"] == "knn" and k == metrics["head"]["k"] and k in K_GRID
    assert config["extra"]["knn"]["bank"] == len(train) == 24
    state = load_file(str(run / "model.safetensors"))
    bank, onehot = state["head.bank"], state["head.onehot"]
    assert bank.shape[0] == onehot.shape[0] == 24 and onehot.shape[1] == 3
    assert "head.weight" not in state

    # the bank is the normalized features of the training images, by the run's own trunk in PyTorch
    model, read, names = _torch_model(run)
    paths = [base / "data" / p for p in train]
    with torch.inference_mode():
        train_feats = model.trunk(torch.stack([read(p) for p in paths])).numpy()  # (24, D)
    unit = train_feats / np.linalg.norm(train_feats, axis=1, keepdims=True)
    np.testing.assert_allclose(bank, unit, atol=1e-4)
    assert [names[i] for i in onehot.argmax(1)] == [Path(p).parent.name for p in train]

    # predict (ONNX Runtime, no torch) = sklearn's KNeighborsClassifier on the same features
    files = sorted((base / "held").rglob("*.png"))
    res = invoke("predict", *files, "--run", run, "--json", "--top-k", 3)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    got = np.array([[next(t["score"] for t in r["top"] if t["label"] == c) for c in names] for r in rows])
    with torch.inference_mode():
        queries = model.trunk(torch.stack([read(p) for p in files])).numpy()
        np.testing.assert_allclose(got, model(torch.stack([read(p) for p in files])).numpy(), atol=1e-5)
    ref = _sklearn(bank, onehot.argmax(1), k)
    np.testing.assert_allclose(got, ref.predict_proba(queries), atol=1e-5)
    assert "probability" in invoke("predict", files[0], "--run", run).stdout  # votes, not softmaxed again


def test_knn_run_evaluates_and_exports(knn_run, tmp_path):
    from finetune.features.engine import OrtEngine

    run, base, _ = knn_run
    res = invoke("evaluate", run, base / "held", "--out", tmp_path / "ev", "--json")
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["score_kind"] == "probability" and ev["metrics"]["calibration"] is not None
    model, read, names = _torch_model(run)
    files = sorted((base / "held").rglob("*.png"))
    with torch.inference_mode():
        probs = model(torch.stack([read(p) for p in files])).numpy()  # (9, 3)
    truth = np.array([names.index(p.parent.name) for p in files])
    assert ev["metrics"]["accuracy"] == pytest.approx(float((probs.argmax(1) == truth).mean()))

    res = invoke("export", run, "--out", tmp_path / "m.onnx")
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["outputs"].startswith("probabilities")
    x = np.stack([read(p).numpy() for p in files])
    np.testing.assert_allclose(OrtEngine(tmp_path / "m.onnx").run(x), probs, atol=1e-5)


def test_stage_probe_with_a_knn_head(knn_run, tmp_path):
    from finetune import load_run

    _, base, tiny = knn_run
    res = invoke(
        "run", base / "data", "--out", tmp_path / "runs", "-s", "stage-probe", "--set", "head=knn", *tiny
    )
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if line.startswith("stage "))
    assert header.split()[-1] == "k"  # the table shows k, not C
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["head"]["kind"] == "knn" and all("k" in r for r in metrics["stages"])
    model, _, _ = load_run(run)
    assert model.head.bank.shape[0] == 24


def test_knn_from_a_recipe_file_and_set(tmp_path):
    from finetune.recipes import key_table, load_recipe

    mine = tmp_path / "knn.toml"
    mine.write_text('name = "knn-probe"\nmethod = "probe"\nhead = "knn"\n')
    assert load_recipe("linear-probe", mine).head == "knn"
    assert load_recipe("linear-probe", overrides=["head=knn"]).head == "knn"
    assert "knn" in next(r for r in key_table() if r["key"] == "head")["type"]
    assert "knn" in invoke("recipes", "--keys").stdout
    assert "knn" in invoke("run", "--help").stdout


def test_knn_on_a_fine_tune_is_refused_in_one_line(image_folder, tmp_path):
    out = tmp_path / "out"
    one_line_error(
        invoke("run", image_folder, "-o", out, "-s", "partial-finetune", "--head", "knn"),
        "--head: not used by the partial-finetune recipe",
    )
    one_line_error(
        invoke("run", image_folder, "-o", out, "-s", "full-finetune", "--set", "head=knn"),
        "not used by the full-finetune recipe",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"k": 1000}, "k = 1000 neighbours of 24 training images"),
        ({"k": 3, "bank": 20}, "does not match its config.json"),
        (None, "lacks extra.knn"),
    ],
)
def test_an_edited_knn_config_is_one_line(knn_run, tmp_path, edit, needle):
    import shutil

    run, base, _ = knn_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("engine.*"))
    config = json.loads((copy / "config.json").read_text())
    if edit is None:
        del config["extra"]["knn"]
    else:
        config["extra"]["knn"].update(edit)
    (copy / "config.json").write_text(json.dumps(config))
    one_line_error(invoke("predict", base / "held", "--run", copy), needle)
