"""`--tta`: each image averaged with its mirror image, on `predict` and `evaluate`.

The reference is computed independently: the mirrored copy of each image is saved as a file of
its own (Pillow) and predicted without TTA; TTA's scores must be the mean of the two answers.
TTA mirrors the preprocessed pixels; that equals preprocessing the mirrored file when the centre
crop is symmetric: test_efficientnet's crop_pct is 0.95, so at 38 px images are resized to 40 and
cropped 1 px from each side (at 32 px, 33 -> 32 would crop 0 px left and 1 px right).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from finetune.app.predictor import Predictor
from finetune.data.transforms import Preprocessing
from tests.conftest import invoke, seeded_tiny_weights, write_images

CLASSES = ("blue", "green", "red")


def test_predictor_averages_the_probabilities_of_the_two_views_not_the_logits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    w = rng.normal(size=(3 * 5 * 5, 3)).astype(np.float32)

    def forward(batch: np.ndarray) -> np.ndarray:  # a fixed "network": (B, 3, 5, 5) -> (B, 3) logits
        return 4 * batch.reshape(len(batch), -1) @ w

    def softmax(z):
        return torch.softmax(torch.from_numpy(z), dim=1).numpy()

    pre = Preprocessing(5)
    logits = Predictor("t", ("a", "b", "c"), pre, "logits", forward, "numpy")
    mirror = np.ascontiguousarray(x[..., ::-1])
    want = (softmax(forward(x)) + softmax(forward(mirror))) / 2
    np.testing.assert_allclose(logits.scores(x, tta=True), want, atol=1e-6)
    assert not np.allclose(want, softmax((forward(x) + forward(mirror)) / 2), atol=1e-3)  # not the logits'
    for outputs in ("scores", "probabilities"):  # an SVM's decision scores, a kNN head's votes: as they are
        raw = Predictor("t", ("a", "b", "c"), pre, outputs, forward, "numpy")
        np.testing.assert_allclose(raw.scores(x, tta=True), (forward(x) + forward(mirror)) / 2, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Seeded test_efficientnet weights, a training folder, held-out images and their mirrored copies."""
    base = tmp_path_factory.mktemp("tta")
    args = seeded_tiny_weights(base)
    args += ["--set", "image_size=38", "--workers", "0"]
    for k, name in enumerate(CLASSES):
        write_images(base / "data" / name, k, 8)
        for p in write_images(base / "held" / name, k, 4, start=40):
            (base / "mirrored" / name).mkdir(parents=True, exist_ok=True)
            ImageOps.mirror(Image.open(p)).save(base / "mirrored" / name / p.name)
    return base, args


def _run(tiny, head: str):
    base, args = tiny
    out = base / f"runs-{head}"
    if not out.exists():
        res = invoke("run", base / "data", "--out", out, "--head", head, *args)
        assert res.exit_code == 0, res.output
    (run,) = out.iterdir()
    return run


def _predict_json(run, folder, *extra) -> dict[str, dict[str, float]]:
    """{file name: {class: score}} from `predict --json` with every class shown."""
    res = invoke("predict", folder, "--run", run, "--json", "--top-k", len(CLASSES), *extra)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    return {
        f"{r['path'].split('/')[-2]}/{r['path'].split('/')[-1]}": {t["label"]: t["score"] for t in r["top"]}
        for r in rows
    }


@pytest.mark.parametrize("head", ["logreg", "knn", "svm"])
def test_tta_is_the_mean_of_the_image_and_its_mirrored_file(tiny, head):
    base, _ = tiny
    run = _run(tiny, head)
    plain = _predict_json(run, base / "held")
    mirrored = _predict_json(run, base / "mirrored")
    tta = _predict_json(run, base / "held", "--tta")
    assert set(tta) == set(plain) == set(mirrored) and len(tta) == 12
    for name, scores in tta.items():
        for c in CLASSES:
            assert scores[c] == pytest.approx((plain[name][c] + mirrored[name][c]) / 2, abs=1e-5), (name, c)
    # the two views differ somewhere, so the mean is not the plain answer again (the kNN head votes
    # 1.0 for the same class in both views on these separable looks; the unit test above covers it)
    assert head == "knn" or any(abs(plain[n][c] - mirrored[n][c]) > 1e-3 for n in plain for c in CLASSES)


def test_tta_from_python(tiny):
    import finetune

    base, _ = tiny
    run = _run(tiny, "logreg")
    files = sorted((base / "held").rglob("*.png"))
    mirrored = [base / "mirrored" / p.parent.name / p.name for p in files]
    rows = finetune.predict(run, files, top_k=3, tta=True)
    a, b = finetune.predict(run, files, top_k=3), finetune.predict(run, mirrored, top_k=3)
    for r, ra, rb in zip(rows, a, b, strict=True):
        mean = {t["label"]: t["score"] / 2 for t in ra["top"]}
        for t in rb["top"]:
            mean[t["label"]] += t["score"] / 2
        assert {t["label"]: t["score"] for t in r["top"]} == pytest.approx(mean, abs=1e-5)


def test_evaluate_tta_reports_both_figures(tiny, tmp_path):
    base, _ = tiny
    run = _run(tiny, "logreg")
    res = invoke("evaluate", run, base / "held", "--out", tmp_path / "plain", "--json")
    assert res.exit_code == 0, res.output
    plain = json.loads(res.stdout)["metrics"]
    res = invoke("evaluate", run, base / "held", "--out", tmp_path / "tta", "--tta")
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "tta" / "evaluation.json").read_text())["metrics"]
    assert saved["tta"] == "hflip"
    assert saved["without_tta"]["accuracy"] == pytest.approx(plain["accuracy"])
    assert saved["without_tta"]["macro_f1"] == pytest.approx(plain["macro_f1"])

    # with TTA: the accuracy of predict --tta's answers, computed here from its rows
    tta = _predict_json(run, base / "held", "--tta")
    correct = [max(s, key=s.get) == name.split("/")[0] for name, s in tta.items()]
    assert saved["accuracy"] == pytest.approx(np.mean(correct))
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("with TTA"))
    assert f"accuracy {saved['accuracy']:.4f}, without: {plain['accuracy']:.4f}" in line
    rows = json.loads((tmp_path / "tta" / "predictions.json").read_text())
    for r in rows:
        assert r["score"] == pytest.approx(max(tta[r["path"]].values()), abs=1e-5)


def test_tta_is_in_the_help():
    for command in ("predict", "evaluate"):
        assert "--tta" in invoke(command, "--help").stdout
