"""`finetune evaluate` and the metrics behind it, checked against sklearn and hand calculations.

Pure functions first (milliseconds), then the command on a real run of the packaged lite0 at
64 px (one run per module, shared by the tests).
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from finetune.app.figures import confusion_figure, figure_bytes
from finetune.metrics import (
    classification_metrics,
    expected_calibration_error,
    most_confident_mistakes,
    reliability_bins,
)
from tests.conftest import invoke, one_line_error, tree_digest, write_images
from tests.test_figures import SVG, check_svg, svg_texts

runner = CliRunner()
CLASSES = ("blue", "green", "red")  # sorted: the run's class order


def assert_svg(path: Path) -> ET.Element:
    """A self-contained SVG figure (see check_svg) with marks and text, not a blank canvas."""
    root = check_svg(path.read_bytes())
    assert len(list(root.iter(f"{SVG}path"))) > 10 and svg_texts(path.read_bytes()), f"{path} looks blank"
    return root


# --------------------------------------------------------------------------- pure metrics


def test_metrics_match_sklearn_including_top5():
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    rng = np.random.default_rng(0)
    k, n = 7, 300
    names = [f"c{i}" for i in range(k)]
    y_true = rng.integers(0, k, n)
    scores = rng.random((n, k))
    scores[np.arange(n), y_true] += 0.4  # better than chance, still many mistakes
    y_pred = scores.argmax(1)
    y_pred[y_pred == 6] = 5  # class 6 is never predicted: its precision is undefined (0, as sklearn)
    m = classification_metrics(y_true, y_pred, names, scores)

    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["per_class"]["c6"]["precision"] == 0.0
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(k), zero_division=0)
    for i, name in enumerate(names):
        row = m["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i])
        )
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=range(k)).tolist()
    assert m["top5_accuracy"] == pytest.approx(top_k_accuracy_score(y_true, scores, k=5, labels=range(k)))
    assert m["accuracy"] < m["top5_accuracy"] < 1.0  # the check has teeth: top-5 differs from both bounds


def test_averages_count_only_the_classes_present():
    """A held-out folder holding one of two classes: judged on that class, as sklearn with labels=present."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    perfect = classification_metrics([0, 0, 0], [0, 0, 0], ["cat", "dog"])
    assert perfect["macro_f1"] == 1.0 and perfect["balanced_accuracy"] == 1.0  # not 0.5
    assert perfect["classes_present"] == 1 and perfect["per_class"]["dog"]["support"] == 0

    # one of three cats taken for a dog: cat recall 2/3, precision 1, F1 2 * (2/3) / (5/3) = 0.8
    y_true, y_pred = [0, 0, 0], [0, 1, 0]
    m = classification_metrics(y_true, y_pred, ["cat", "dog"])
    assert m["macro_f1"] == pytest.approx(0.8) == f1_score(y_true, y_pred, labels=[0], average="macro")
    with pytest.warns(UserWarning, match="not in y_true"):  # why metrics.py asks recall_score instead
        reference = balanced_accuracy_score(y_true, y_pred)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3) == reference
    assert m["accuracy"] == pytest.approx(2 / 3) and m["per_class"]["dog"]["precision"] == 0.0
    assert m["confusion_matrix"] == [[2, 1], [0, 0]]


def test_no_top5_with_five_classes_or_fewer():
    scores = np.eye(5)
    m = classification_metrics(range(5), range(5), list("abcde"), scores)
    assert "top5_accuracy" not in m and m["accuracy"] == 1.0


def test_ece_by_hand():
    """Four predictions; bins of width 1/15.

    0.90, 0.90 -> bin (0.8667, 0.9333]: accuracy 1/2, confidence 0.90, gap 0.40, weight 2/4 -> 0.2000
    0.65       -> bin (0.6000, 0.6667]: accuracy 1,   confidence 0.65, gap 0.35, weight 1/4 -> 0.0875
    0.30       -> bin (0.2667, 0.3333]: accuracy 0,   confidence 0.30, gap 0.30, weight 1/4 -> 0.0750
    ECE = 0.3625
    """
    conf = [0.9, 0.9, 0.65, 0.3]
    correct = [True, False, True, False]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.3625)
    bins = reliability_bins(conf, correct)
    assert len(bins) == 15
    filled = {b_i: (b.count, b.accuracy) for b_i, b in enumerate(bins) if b.count}
    assert filled == {13: (2, 0.5), 9: (1, 1.0), 4: (1, 0.0)}
    assert bins[0].lower == 0.0 and bins[-1].upper == 1.0


def test_ece_is_zero_when_confidence_matches_accuracy_and_one_goes_to_the_last_bin():
    # 10 predictions at 0.8 with 8 right: perfectly calibrated
    assert expected_calibration_error([0.8] * 10, [True] * 8 + [False] * 2) == pytest.approx(0.0)
    # a confidence of exactly 1.0 belongs to the last bin (bins are (lower, upper])
    bins = reliability_bins([1.0, 1.0], [True, False])
    assert bins[-1].count == 2 and bins[-1].accuracy == 0.5
    assert expected_calibration_error([1.0, 1.0], [True, False]) == pytest.approx(0.5)
    assert expected_calibration_error([], []) == 0.0


def test_most_confident_mistakes_by_hand():
    y_true = [0, 1, 2, 0, 1, 2]
    y_pred = [1, 1, 0, 2, 0, 2]  # wrong at rows 0, 2, 3, 4
    conf = [0.6, 0.99, 0.9, 0.6, 0.7, 0.95]
    assert most_confident_mistakes(y_true, y_pred, conf) == [2, 4, 0, 3]  # tie 0.6: earlier row first
    assert most_confident_mistakes(y_true, y_pred, conf, k=2) == [2, 4]
    assert most_confident_mistakes([0, 1], [0, 1], [0.5, 0.5]) == []


# --------------------------------------------------------------------------- the command on a real run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A linear-probe run of lite0 at 64 px on three trivially separable classes; its data folder."""
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "data"
    for k, name in enumerate(CLASSES):
        write_images(data / name, k, 6)
    res = invoke("run", data, "--out", root / "runs", "--set", "image_size=64")
    assert res.exit_code == 0, res.output
    return next((root / "runs").iterdir()), data


def _holdout(folder: Path, swap: bool = False) -> Path:
    """Unseen images of the three looks; with swap, red and blue images sit in each other's folders."""
    looks = {"blue": 0, "green": 1, "red": 2}
    if swap:
        looks = {"blue": 2, "green": 1, "red": 0}
    for name, k in looks.items():
        write_images(folder / name, k, 4, start=50)
    return folder


def test_evaluate_writes_metrics_and_figures_without_touching_data(trained, tmp_path):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    run, _ = trained
    hold = _holdout(tmp_path / "hold", swap=True)
    before = tree_digest(hold)
    res = invoke("evaluate", run, hold, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert tree_digest(hold) == before  # nothing written into DATA
    ev_dir = run / "eval-hold"  # the default output folder
    assert Path(out["out"]) == ev_dir
    figures = {
        name: assert_svg(ev_dir / f"{name}.svg") for name in ("confusion_matrix", "reliability", "mistakes")
    }
    for name in figures:
        assert out["files"][name] == str(ev_dir / f"{name}.svg")
    saved = json.loads((ev_dir / "evaluation.json").read_text())
    assert saved["metrics"] == out["metrics"]
    report = (run / "report.html").read_text(encoding="utf-8")  # re-rendered: lists this evaluation
    assert "Other folders (finetune evaluate)" in report and ">eval-hold<" in report

    # every metric recomputed by sklearn from the per-image rows
    rows = json.loads((ev_dir / "predictions.json").read_text())
    assert len(rows) == 12
    pos = {c: i for i, c in enumerate(CLASSES)}
    y_true = [pos[r["label"]] for r in rows]
    y_pred = [pos[r["pred"]] for r in rows]
    m = out["metrics"]
    assert m["n"] == 12
    assert m["accuracy"] == pytest.approx(np.mean(np.equal(y_true, y_pred)))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    cm = confusion_matrix(y_true, y_pred, labels=[0, 1, 2])
    title = "confusion matrix (hold, n=12)"
    drawn = figure_bytes(confusion_figure(cm, list(CLASSES), title), "svg")
    assert (ev_dir / "confusion_matrix.svg").read_bytes() == drawn  # sklearn's matrix, drawn
    # every mistake (8 here; the grid holds up to 16) with its thumbnail
    n_wrong = sum(a != b for a, b in zip(y_true, y_pred, strict=True))
    assert len(list(figures["mistakes"].iter(f"{SVG}image"))) == n_wrong == 8
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    assert [m["per_class"][c]["f1"] for c in CLASSES] == pytest.approx(list(f))
    # the swapped folders are exactly the mistakes: red images filed as blue and vice versa
    wrong = {(r["label"], r["pred"]) for r in rows if r["label"] != r["pred"]}
    assert wrong == {("blue", "red"), ("red", "blue")} and m["accuracy"] == pytest.approx(4 / 12)

    # ECE from the rows with an explicit loop over 15 bins (independent of reliability_bins)
    conf = np.array([r["score"] for r in rows])
    hit = np.array([r["label"] == r["pred"] for r in rows])
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        members = (conf > lo) & (conf <= hi)
        if members.any():
            ece += members.mean() * abs(hit[members].mean() - conf[members].mean())
    assert m["calibration"]["ece"] == pytest.approx(ece, abs=1e-9)
    assert ece > 0.5  # confidently wrong on a third of the images


def test_evaluate_agrees_with_predict(trained, tmp_path):
    """Batched evaluation (fast decoder, cached engine) labels each image as `finetune predict` does."""
    run, _ = trained
    hold = _holdout(tmp_path / "hold2")
    res = invoke("evaluate", run, hold, "--json", "--out", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    rows = {r["path"]: r for r in json.loads((tmp_path / "ev" / "predictions.json").read_text())}
    pred = invoke("predict", hold, "--run", run, "--json")
    assert pred.exit_code == 0, pred.output
    for row in map(json.loads, pred.stdout.splitlines()):  # one JSON object per image
        mine = rows[Path(row["path"]).relative_to(hold).as_posix()]
        assert mine["pred"] == row["label"]
        assert mine["score"] == pytest.approx(row["score"], abs=0.02)
    assert not (tmp_path / "hold2" / "eval-hold2").exists()


def test_evaluate_reproduces_the_runs_own_validation_predictions(trained):
    run, data = trained
    res = invoke("evaluate", run, data, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["metrics"]["n"] == 18  # every image, train and val alike
    rows = {r["path"]: r for r in json.loads((run / "eval-data" / "predictions.json").read_text())}
    val = json.loads((run / "predictions.json").read_text())
    assert len(val) == 3
    for r in val:
        assert rows[r["path"]]["pred"] == r["pred"]
        assert rows[r["path"]]["score"] == pytest.approx(r["score"], abs=1e-4)


def test_every_split_folder_is_evaluated_with_a_subset_of_classes_and_broken_files_skipped(trained, tmp_path):
    run, _ = trained
    split = tmp_path / "split"
    for k, name in ((1, "green"), (2, "red")):  # blue absent: a subset of the run's classes
        write_images(split / "train" / name, k, 2, start=70)
        write_images(split / "val" / name, k, 1, start=80)
    (split / "val" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    res = invoke("evaluate", run, split, "--out", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    assert "6 images evaluated, 1 skipped" in res.stdout and "accuracy: 1.0000" in res.stdout
    assert "mistakes" not in res.stdout  # no mistakes, no grid
    assert not (tmp_path / "ev" / "mistakes.svg").exists()
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert saved["metrics"]["n"] == 6
    assert saved["metrics"]["per_class"]["blue"]["support"] == 0  # the run's class list, blue absent
    assert saved["metrics"]["per_class"]["red"]["support"] == 3  # train/ and val/ alike
    assert [s["path"] for s in saved["skipped"]] == ["val/red/broken.png"]


def test_svm_run_has_no_calibration(trained, tmp_path):
    _, data = trained
    res = invoke("run", data, "--out", tmp_path / "runs", "--set", "image_size=64", "--head", "svm")
    assert res.exit_code == 0, res.output
    run = next((tmp_path / "runs").iterdir())
    hold = _holdout(tmp_path / "hold", swap=True)
    res = invoke("evaluate", run, hold, "--out", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    assert "not applicable" in res.stdout
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert saved["metrics"]["calibration"] is None and saved["score_kind"] == "score"
    assert not (tmp_path / "ev" / "reliability.svg").exists()
    assert_svg(tmp_path / "ev" / "mistakes.svg")
    captions = [
        t for t in svg_texts((tmp_path / "ev" / "mistakes.svg").read_bytes()) if t.startswith("pred ")
    ]
    assert captions and all(" (score " in t for t in captions)  # no probabilities


# --------------------------------------------------------------------------- the user's mistakes


def test_not_a_run_folder(tmp_path, image_folder):
    one_line_error(invoke("evaluate", tmp_path / "nope", image_folder), "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(invoke("evaluate", tmp_path / "empty", image_folder), "not a finetune run")


def test_missing_data_folder(trained, tmp_path):
    run, _ = trained
    one_line_error(invoke("evaluate", run, tmp_path / "nothing"), "does not exist")


def test_class_the_run_does_not_know(trained, tmp_path):
    run, _ = trained
    hold = _holdout(tmp_path / "unknown")
    write_images(hold / "purple", 4, 2)
    one_line_error(invoke("evaluate", run, hold), "purple", "not classes of this run")
    assert not (run / "eval-unknown").exists()  # refused before anything is written


def test_out_inside_data_is_refused(trained, tmp_path):
    run, _ = trained
    hold = _holdout(tmp_path / "hold")
    before = tree_digest(hold)
    one_line_error(invoke("evaluate", run, hold, "--out", hold / "results"), "inside the data folder")
    one_line_error(invoke("evaluate", run, hold, "--out", hold), "inside the data folder")
    assert tree_digest(hold) == before


def test_default_output_inside_data_is_refused(trained, tmp_path):
    """A run folder kept inside the data folder would put eval-*/ into DATA: refused too."""
    run, _ = trained
    hold = _holdout(tmp_path / "hold")
    inner = hold / "red" / "run"
    shutil.copytree(run, inner, ignore=shutil.ignore_patterns("eval-*"))
    before = tree_digest(hold)
    one_line_error(invoke("evaluate", inner, hold), "inside the data folder")
    assert tree_digest(hold) == before


def test_evaluate_a_folder_with_one_class_of_one_image(trained, tmp_path):
    """A held-out folder is judged, not learned from: one class, one image, is a valid question."""
    run, _ = trained
    hold = tmp_path / "one"
    write_images(hold / "green", 1, 1, start=70)
    before = tree_digest(hold)
    res = invoke("evaluate", run, hold, "--json", "--out", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)["metrics"]
    assert m["n"] == 1 and m["accuracy"] == 1.0  # the look the run learned as green
    assert m["per_class"]["green"]["support"] == 1 and m["per_class"]["red"]["support"] == 0
    assert tree_digest(hold) == before


def test_scan_for_evaluation_keeps_every_image_and_split(tmp_path):
    """for_training=False: no minimum per class, val/test folders kept, classes only in val allowed."""
    from finetune.data.index import scan
    from finetune.errors import DataError

    write_images(tmp_path / "train" / "cat", 0, 1)
    write_images(tmp_path / "val" / "dog", 1, 2)
    index = scan(tmp_path, for_training=False)
    assert index.classes == ("cat", "dog") and sorted(index.splits) == ["train", "val", "val"]
    with pytest.raises(DataError, match="only one class"):  # training still refuses it
        scan(tmp_path)
