"""The figures, read back from the matplotlib `Figure` objects: what is drawn, against sklearn and hand sums.

No pixels are compared: each test reads the artists (image arrays, bar heights, line data, texts,
tick positions, axis limits) and checks them against an independent reference.
"""

from __future__ import annotations

import html
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from finetune.app.figures import (
    compare_figure,
    confusion_figure,
    curves_figure,
    figure_bytes,
    figure_size_px,
    mistakes_figure,
    read_history,
    reliability_figure,
    smoothing_floor,
)
from finetune.metrics import reliability_bins

SVG = "{http://www.w3.org/2000/svg}"


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def ticklabels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels()]


def visible_ticks(ax, which: str = "x") -> list[float]:
    """Tick positions inside the axis' view (matplotlib keeps ticks outside it, undrawn)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    return [t for t in axis.get_ticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


def drawn(fig) -> None:
    """Lay the figure out as saving does, so tick locations and text extents are final.

    TeX is off (class names are shown as typed), so no label may carry TeX markup either.
    """
    from matplotlib.text import Text

    fig.canvas.draw()
    shown = [t.get_text() for t in fig.findobj(Text) if t.get_visible()]
    assert not [t for t in shown if "\\math" in t or t.startswith("$")], shown


def svg_texts(blob: bytes) -> list[str]:
    """The texts of a matplotlib SVG: drawn as glyph paths, each line is written beside them as a comment."""
    return [html.unescape(t) for t in re.findall(r"<!-- (.*?) -->", blob.decode("utf-8"), flags=re.S)]


def check_svg(blob: bytes) -> ET.Element:
    """A standalone SVG document: no script, no foreign objects, no links out of the file."""
    root = ET.fromstring(blob)
    assert root.tag == f"{SVG}svg"
    for el in root.iter():
        assert el.tag.rpartition("}")[2] not in ("script", "foreignObject", "a"), el.tag
        for name, value in el.attrib.items():
            assert not name.startswith("on"), name
            if name.endswith("href"):
                assert value.startswith(("#", "data:image/png;base64,")), value[:60]
    return root


# --------------------------------------------------------------------------- confusion matrix


def test_confusion_figure_shows_sklearn_counts_and_row_shares():
    from sklearn.metrics import confusion_matrix

    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    y_pred = [0, 1, 0, 1, 1, 2, 0, 2, 2, 1]
    cm = confusion_matrix(y_true, y_pred)
    fig = confusion_figure(cm, ["a", "b", "c", "d"], "confusion (val)")
    ax = fig.axes[0]
    (image,) = ax.get_images()
    share = cm / cm.sum(axis=1, keepdims=True)  # rows are the true classes
    np.testing.assert_allclose(image.get_array(), share)
    assert image.get_clim() == (0.0, 1.0) and image.get_cmap().name == "Blues"
    # the count in each cell, read in row order (text at x = column, y = row)
    cells = sorted(ax.texts, key=lambda t: (t.get_position()[1], t.get_position()[0]))
    assert [int(t.get_text()) for t in cells] == cm.ravel().tolist()
    white = {k for k, t in enumerate(cells) if t.get_color() == "white"}
    assert white == set(np.flatnonzero(share.ravel() > 0.5))  # dark cells get white text
    assert ticklabels(ax.yaxis) == ["a", "b", "c", "d"] and ticklabels(ax.xaxis) == ["a", "b", "c", "d"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted", "true", "confusion (val)")
    # the same figure gives the same bytes (no date, seeded ids), another matrix other bytes
    svg = figure_bytes(fig, "svg")
    assert svg == figure_bytes(confusion_figure(cm, ["a", "b", "c", "d"], "confusion (val)"), "svg")
    assert svg != figure_bytes(confusion_figure(cm[::-1], ["a", "b", "c", "d"], "confusion (val)"), "svg")
    check_svg(svg)


def test_confusion_figure_with_long_names_keeps_them_apart_and_their_labels_do_not_overlap():
    names = [f"handwritten digit {w} in cobalt blue ink, scanned at 300 dpi" for w in ("three", "eight")]
    fig = confusion_figure(np.array([[5, 1], [0, 6]]), names)
    drawn(fig)
    ax = fig.axes[0]
    labels = ticklabels(ax.xaxis)
    assert len(set(labels)) == 2 and all(len(s) <= 36 for s in labels)  # cut in the middle, still distinct
    assert "three" in labels[0] and "eight" in labels[1] and "\u2026" in labels[0]  # the part that differs
    # too long to stand under their columns, the labels are turned; parallel turned lines clear
    # each other when the tick spacing across them exceeds the line height
    (angle,) = {t.get_rotation() for t in ax.get_xticklabels()}
    assert angle in (45, 90)
    spacing = np.diff(ax.transData.transform([(0, 0), (1, 0)])[:, 0])[0]  # pixels between ticks
    height = ax.get_xticklabels()[0].get_fontsize() * fig.dpi / 72
    assert spacing * math.sin(math.radians(angle)) > 1.5 * height
    short = confusion_figure(np.array([[5, 1], [0, 6]]), ["cat", "dog"])
    drawn(short)
    flat = short.axes[0].get_xticklabels()
    assert {t.get_rotation() for t in flat} == {0} and not flat[0].get_window_extent().overlaps(
        flat[1].get_window_extent()
    )
    # names that differ in one character far inside still get distinct labels
    same = ["x" * 30 + f" {i} " + "y" * 30 for i in range(3)]
    assert len(set(ticklabels(confusion_figure(np.eye(3, dtype=int), same).axes[0].yaxis))) == 3


def test_confusion_figure_of_many_classes_lists_the_top_confusions():
    rng = np.random.default_rng(0)
    k = 100
    cm = rng.poisson(0.05, (k, k)) + np.diag(rng.integers(5, 12, k))  # (K, K)
    cm[7, 42] = 9  # the largest confusion
    cm[3, 5] = 6
    names = [f"class number {i} with a long descriptive name" for i in range(k)]
    fig = confusion_figure(cm, names, "confusion matrix (val)")
    matrix, bars = fig.axes[0], fig.axes[1]
    (image,) = matrix.get_images()
    np.testing.assert_allclose(image.get_array(), cm / cm.sum(axis=1, keepdims=True))
    assert len(matrix.texts) == 0  # no count per cell
    drawn(fig)
    ticks = visible_ticks(matrix, "x")
    assert 4 <= len(ticks) <= 12 and all(t == int(t) for t in ticks)  # class indices, not 100 names
    # the bars: the 20 largest off-diagonal cells, largest first, by a plain loop over the matrix
    cells = sorted(
        ((cm[i, j], i, j) for i in range(k) for j in range(k) if i != j and cm[i, j]),
        key=lambda c: (-c[0], c[1], c[2]),
    )
    top = cells[:20]
    heights = [p.get_width() for p in bars.patches]
    assert heights == [c[0] for c in top] and heights[0] == 9
    labels = ticklabels(bars.yaxis)
    assert labels[0].startswith("class number 7 ") and "\u2192 class number 42" in labels[0]
    assert all(f"[{i}]" in lab and f"[{j}]" in lab for lab, (_, i, j) in zip(labels, top, strict=True))
    boxes = [t.get_window_extent() for t in bars.get_yticklabels()]
    assert not any(a.overlaps(b) for a, b in combinations(boxes, 2))  # readable: no label overlaps another


# --------------------------------------------------------------------------- reliability


def test_reliability_figure_bars_are_the_bin_accuracies():
    conf = [0.9, 0.9, 0.65, 0.3]  # the example of test_evaluate.test_ece_by_hand
    correct = [True, False, True, False]
    fig = reliability_figure(reliability_bins(conf, correct), 0.3625, "reliability (val)")
    top, low = fig.axes
    heights = [p.get_height() for p in top.patches]
    expected = np.zeros(15)
    expected[13], expected[9] = 0.5, 1.0  # bin 4 holds one wrong prediction: accuracy 0
    np.testing.assert_allclose(heights, expected)
    middles = [p.get_x() + p.get_width() / 2 for p in top.patches]
    np.testing.assert_allclose(middles, (np.arange(15) + 0.5) / 15)  # equal-width bins across [0, 1]
    assert all(0.9 / 15 < p.get_width() < 1 / 15 for p in top.patches)  # with a gap between neighbours
    (diagonal,) = top.get_lines()
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
    counts = np.zeros(15)
    counts[13], counts[9], counts[4] = 2, 1, 1
    np.testing.assert_allclose([p.get_height() for p in low.patches], counts)
    assert top.get_title() == "reliability (val): ECE 0.3625"
    assert top.get_xlim() == (0, 1) and top.get_ylim() == (0, 1)
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["perfect calibration", "accuracy"]


# --------------------------------------------------------------------------- mistakes


def test_mistakes_figure_thumbnails_and_captions(tmp_path):
    wide = tmp_path / "ünï-日本 €.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(wide)
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (30, 30, 200)).save(small)
    odd = 'a<b&"c"$x$'  # XML specials and a TeX-looking name, shown as typed
    rows = [
        {"path": f"x/{wide.name}", "label": odd, "pred": "green", "score": 0.93},
        {"path": "x/small.png", "label": "green", "pred": odd, "score": 0.5},
        {"path": "x/gone.png", "label": "red", "pred": "green", "score": 0.4},  # deleted since the run
        {"path": "x/bad\x01name\udcff.png", "label": "red", "pred": "blue", "score": 0.3},
        {"path": "x/small.png", "label": "red", "pred": "blue", "score": 0.2},
        {"path": "x/small.png", "label": "red", "pred": "blue", "score": 0.1},
    ]
    paths = [wide, small, tmp_path / "gone.png", tmp_path / "missing", small, small]
    fig = mistakes_figure(list(zip(paths, rows, strict=True)), "probability")
    axes = fig.axes
    assert len(axes) == 8 and sum(ax.axison for ax in axes) == 6  # a 4 x 2 grid, two cells left empty
    shown = [ax.get_images() for ax in axes[:6]]
    assert [len(s) for s in shown] == [1, 1, 0, 0, 1, 1]
    assert [texts(ax) for ax in axes[2:4]] == [["image unavailable"]] * 2
    big = shown[0][0].get_array()
    assert big.shape == (85, 128, 3)  # longest side 128 px: 300 x 200 -> 128 x 85
    assert np.abs(big.reshape(-1, 3).mean(0) - (200, 30, 30)).max() < 2  # the wide file
    assert shown[1][0].get_array().shape == (32, 32, 3)  # a small image is not enlarged
    titles = [ax.get_title().split("\n") for ax in axes[:6]]
    assert titles[0] == [wide.name, f"true {odd}", "pred green (p 0.93)"]
    assert titles[1][2] == f"pred {odd} (p 0.50)"
    assert titles[3][0] == "bad\\x01name\\xff.png"  # a control character and an undecodable byte, escaped
    grid = [(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in axes[:6]]
    assert grid == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]  # at most 4 columns, in reading order
    svg = check_svg(figure_bytes(fig, "svg"))
    assert len(list(svg.iter(f"{SVG}image"))) == 4  # one embedded PNG per readable thumbnail

    svm = mistakes_figure([(wide, {**rows[0], "score": 1.2})], "score")  # an SVM's decision score
    assert svm.axes[0].get_title().endswith("pred green (score 1.20)")


# --------------------------------------------------------------------------- training curves

HISTORY = (
    "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,img_per_s,seconds\n"
    "1,1.20,0.40,1.10,0.50,0.01,50,2.0\n"
    "2,0.80,0.70,0.90,0.60,0.005,51,2.1\n"
    "3,0.50,0.85,,1.00,0.001,52,2.0\n"  # a blank cell (no val pass that epoch); accuracy 1.0 on the edge
)


def history(n: int) -> dict[str, np.ndarray]:
    ep = np.arange(1, n + 1, dtype=float)
    return {
        "epoch": ep,
        "train_loss": 0.5 + 1 / ep,
        "train_accuracy": 1 - 0.5 / ep,
        "val_loss": 0.01 + 1 / ep**2,
        "val_accuracy": np.minimum(1.0, 1.02 - 0.4 / ep),
        "lr": 0.01 * (0.5 + 0.5 * np.cos(np.pi * (ep - 1) / n)),
    }


def test_curves_figure_plots_the_history_columns(tmp_path):
    (tmp_path / "history.csv").write_text(HISTORY)
    fig = curves_figure(read_history(tmp_path / "history.csv"))
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "learning rate"]
    lines = {(ax.get_title(), ln.get_label()): ln for ax in fig.axes for ln in ax.get_lines()}
    assert list(lines["loss", "train (batch mean)"].get_ydata()) == [1.2, 0.8, 0.5]
    val_loss = list(lines["loss", "validation (cross-entropy)"].get_ydata())
    assert val_loss[:2] == [1.1, 0.9] and math.isnan(val_loss[2])
    assert list(lines["accuracy", "validation"].get_xdata()) == [1, 2, 3]
    assert list(lines["learning rate", "head"].get_ydata()) == [0.01, 0.005, 0.001]
    assert fig.axes[2].get_yscale() == "log"  # a 10x decay
    assert not any("img" in label for _, label in lines)

    (tmp_path / "history.csv").write_text("epoch,train_loss,val_loss\n1,0.9,1.0\n2,0.7,0.8\n")
    fig = curves_figure(read_history(tmp_path / "history.csv"))
    assert [ax.get_title() for ax in fig.axes] == ["loss"]  # no accuracy, no lr: one panel
    (tmp_path / "history.csv").write_text("epoch,train_loss\n")
    assert read_history(tmp_path / "history.csv") is None  # header only: no curves
    assert read_history(tmp_path / "absent.csv") is None


@pytest.mark.parametrize("epochs", [1, 3, 50])
def test_curves_have_whole_epoch_ticks_and_accuracy_within_0_1(epochs):
    fig = curves_figure(history(epochs), label_smoothing=0.1, n_classes=10)
    drawn(fig)
    for ax in fig.axes:
        ticks = visible_ticks(ax, "x")
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
        assert min(ticks) >= 1 and max(ticks) <= epochs
    acc = fig.axes[1]
    assert acc.get_ylim() == (0.0, 1.0)
    assert all(0 <= t <= 1 for t in visible_ticks(acc, "y"))


def test_train_and_validation_loss_differ_by_label_smoothing_and_the_figure_says_so():
    import torch
    import torch.nn.functional as F

    # the least training loss label smoothing allows: cross-entropy of the best possible logits
    # (log of the smoothed target) against smoothed targets, computed by PyTorch itself
    for eps, k in ((0.1, 2), (0.1, 10), (0.2, 100)):
        target = torch.full((1, k), eps / k)
        target[0, 0] += 1 - eps
        floor = F.cross_entropy(target.log(), torch.tensor([0]), label_smoothing=eps).item()
        assert smoothing_floor(eps, k) == pytest.approx(floor, rel=1e-5)
    assert smoothing_floor(0.1, 2) == pytest.approx(-0.95 * math.log(0.95) - 0.05 * math.log(0.05))
    assert smoothing_floor(0.0, 10) == 0.0

    fig = curves_figure(history(5), label_smoothing=0.1, n_classes=10)
    loss = fig.axes[0]
    labels = [t.get_text() for t in loss.get_legend().get_texts()]
    assert (
        labels[0] == "train (batch mean, label smoothing 0.1)" and labels[1] == "validation (cross-entropy)"
    )
    floor_line = loss.get_lines()[2]
    assert list(floor_line.get_ydata()) == pytest.approx([smoothing_floor(0.1, 10)] * 2)
    assert "0.500" in labels[2]  # the floor, written out: eps 0.1, 10 classes
    plain = curves_figure(history(5))  # no smoothing: no floor, no mention
    assert (
        len(plain.axes[0].get_lines()) == 2
        and "smoothing" not in plain.axes[0].get_legend().get_texts()[0].get_text()
    )


# --------------------------------------------------------------------------- compare


@dataclass
class Row:
    strategy: str
    accuracy: float
    seconds: float


def test_compare_figure_names_strategies_in_a_legend_and_keeps_accuracy_at_most_1():
    rows = [
        Row("linear-probe", 0.981, 12.0),
        Row("stage-probe", 0.985, 13.0),  # close to the first: labels beside points would collide
        Row("partial-finetune", 1.0, 300.0),
        Row("full-finetune", 0.62, 900.0),
    ]
    fig = compare_figure(rows)
    drawn(fig)
    (ax,) = fig.axes
    assert len(ax.texts) == 0  # no labels beside the points
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [
        "linear-probe: 0.981 in 12 s",
        "stage-probe: 0.985 in 13 s",
        "partial-finetune: 1.000 in 300 s",
        "full-finetune: 0.620 in 900 s",
    ]
    low, high = ax.get_ylim()
    assert high == 1.0 and 0 <= low <= 0.62 and all(t <= 1 for t in visible_ticks(ax, "y"))
    assert ax.get_ylabel() == "validation accuracy" and ax.get_xscale() == "log"
    offsets = [c.get_offsets()[0].tolist() for c in ax.collections]
    assert offsets == [[r.seconds, r.accuracy] for r in rows]
    # the legend sits below the axes, over none of the points
    assert fig.legends[0].get_window_extent().y1 <= ax.get_window_extent().y0
    boxes = [t.get_window_extent() for t in fig.legends[0].get_texts()]
    assert not any(a.overlaps(b) for a, b in combinations(boxes, 2))


def test_figure_bytes_and_size():
    fig = compare_figure([Row("linear-probe", 0.9, 10.0)])
    png = figure_bytes(fig, "png")
    with Image.open(__import__("io").BytesIO(png)) as im:
        assert im.size == figure_size_px(fig) == (640, 460)
    assert png == figure_bytes(compare_figure([Row("linear-probe", 0.9, 10.0)]), "png")
