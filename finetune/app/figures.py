"""The figures people look at, drawn by matplotlib: one function per plot, each returning a `Figure`.

    fig = confusion_figure(cm, class_names, "confusion matrix (val)")   # rows true, columns predicted
    fig = reliability_figure(bins, ece, "reliability (val)")           # accuracy per confidence bin
    fig = mistakes_figure(picks, "probability")                         # the most confident mistakes
    fig = curves_figure(read_history(path), label_smoothing=0.1, n_classes=10)
    fig = compare_figure(rows)                                          # accuracy against wall time
    fig = lr_find_figure(lrs, losses, smoothed, suggested=3e-3, diverged_at=0.5)   # the range test
    blob = figure_bytes(fig, "svg")                                     # or "png"; same figure, same bytes

`report.py` (report.html, figures/, curves.png), `evaluate.py` (RUN/eval-*/), `compare.py` and
`pipeline.py` (lr-find.png) use them. Each is a `matplotlib.figure.Figure` on the Agg canvas,
never pyplot: no global backend or figure state is touched and no display is needed. matplotlib
is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.console import printable

DPI = 100  # PNG pixels per inch; an SVG's size is the same figure in points
FULL_MATRIX_MAX_K = 30  # every class named on both axes up to this many classes
COUNTS_MAX_K = 15  # the count written in each cell up to this many classes
TOP_CONFUSIONS = 20  # beyond FULL_MATRIX_MAX_K: the largest off-diagonal cells, named, beside the matrix
LABEL_CHARS = 36  # a class name longer than this is cut (with an ellipsis in the middle) on an axis
THUMB = 128  # longest side of a mistake thumbnail, in pixels
BAR = {"color": "#4c72b0", "edgecolor": "#223355"}  # accuracy bars
# Class and file names are text, never TeX ("$1$" stays as typed); SVG ids are seeded so equal
# figures give equal bytes; text is drawn as paths, so the page looks the same without the fonts.
RC = {"text.parse_math": False, "svg.hashsalt": "finetune", "svg.fonttype": "path", "font.size": 9}


def _styled(draw: Callable[..., Any]) -> Callable[..., Any]:
    """Run a figure function inside matplotlib's rc_context(RC): the settings reach every text made."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(RC):
            return draw(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float, layout: str | None = "constrained"):
    """A matplotlib Figure (inches) on the Agg canvas: no pyplot, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def figure_bytes(fig, fmt: str = "svg") -> bytes:
    """The figure as SVG or PNG bytes, without a date or software stamp: equal figures, equal bytes."""
    import warnings

    import matplotlib

    buf = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    with matplotlib.rc_context(RC), warnings.catch_warnings():
        # a name in a script DejaVu Sans lacks (CJK, ...) is drawn as boxes; a warning per glyph is noise
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(buf, format=fmt, dpi=DPI, metadata=metadata)
    return buf.getvalue()


def _log_axis(axis) -> None:
    """A log axis labelled in plain numbers (10, 100; 0.01): matplotlib's default writes TeX, off in RC."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def figure_size_px(fig) -> tuple[int, int]:
    """(width, height) of the figure's PNG in pixels; its SVG shows at 96 px per inch, 4 % smaller."""
    w, h = fig.get_size_inches()
    return round(w * DPI), round(h * DPI)


def _clip(text: Any, n: int = LABEL_CHARS, middle: bool = False) -> str:
    """Printable text of at most n characters; a cut shows an ellipsis (middle: keeps an extension)."""
    text = printable(str(text))
    if len(text) <= n:
        return text
    if middle:
        tail = (n - 1) // 2
        return text[: n - 1 - tail] + "\u2026" + text[len(text) - tail :]
    return text[: n - 1] + "\u2026"


def short_names(class_names: Sequence[str], n: int = LABEL_CHARS) -> list[str]:
    """Names of at most n characters that stay distinct: cut in the middle (start and end kept), or,
    when that makes two equal, a window around where the names start to differ; numbered as a last resort.
    """
    names = [_clip(c, n, middle=True) for c in class_names]
    if len(set(names)) == len(names):
        return names
    full = [printable(str(c)) for c in class_names]
    differ = len(os.path.commonprefix(full))  # names agree up to here
    names = []
    for text in full:
        start = max(0, min(differ - n // 3, len(text) - n))  # a third of the window is shared context
        piece = text[start : start + n]
        if start > 0:
            piece = "\u2026" + piece[1:]
        if start + n < len(text):
            piece = piece[:-1] + "\u2026"
        names.append(piece)
    if len(set(names)) < len(names):
        names = [_clip(f"{i}: {c}", n, middle=True) for i, c in enumerate(class_names)]
    return names


def row_shares(cm: np.ndarray) -> np.ndarray:
    """(K, K) share of each true class (row) predicted as each column; a row without images is 0."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)  # (K, 1)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def top_confusions(cm: np.ndarray, n: int = TOP_CONFUSIONS) -> list[tuple[int, int, int]]:
    """(true, predicted, count) of the n largest off-diagonal cells, largest first (ties: row, column)."""
    cm = np.asarray(cm, dtype=np.int64)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    cells = [
        (int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(flat, off.shape), strict=True)
    ]
    return [c for c in cells if c[2] > 0]


# --------------------------------------------------------------------------- confusion matrix


@_styled
def confusion_figure(cm: np.ndarray, class_names: Sequence[str], title: str = "confusion matrix"):
    """Rows: true class, columns: predicted; colour is the share of the row (recall on the diagonal).

    Up to 30 classes every class is named on both axes (and up to 15 the count is written in each
    cell). Beyond, the axes count classes by index and the 20 largest confusions are listed by
    name in a panel beside the matrix: 100 names on an axis are unreadable.
    """
    cm = np.asarray(cm, dtype=np.int64)  # (K, K)
    if len(class_names) <= FULL_MATRIX_MAX_K:
        return _named_matrix(cm, short_names(class_names), title)
    return _large_matrix(cm, class_names, title)


def _named_matrix(cm: np.ndarray, names: list[str], title: str):
    k = len(names)
    share = row_shares(cm)
    cell = 0.5 if k <= 8 else 0.3  # inches
    tick = 9 if k <= 12 else 7
    label_in = 0.6 * tick / 72 * max(len(n) for n in names)  # a name's rough printed length
    flat = label_in <= 0.9 * cell  # short names fit under their column unrotated
    rotation = 0 if flat else (45 if k <= 12 else 90)
    below = 0.25 if flat else label_in * (0.75 if rotation == 45 else 1.0)
    side = max(2.2, cell * k)
    fig = _figure(side + label_in + 2.0, side + below + 1.1)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(k), names, fontsize=tick, rotation=rotation, ha="center" if flat else "right")
    if rotation == 45:
        for label in ax.get_xticklabels():
            label.set_rotation_mode("anchor")
    ax.set_yticks(range(k), names, fontsize=tick)
    ax.tick_params(length=2)
    if k <= COUNTS_MAX_K:
        size = 9 if k <= 8 else 7
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="white" if share[i, j] > 0.5 else "black",
                    in_layout=False,  # inside its cell: nothing for the layout to make room for
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    return fig


def _large_matrix(cm: np.ndarray, class_names: Sequence[str], title: str):
    from matplotlib.colors import PowerNorm
    from matplotlib.ticker import MaxNLocator

    k = len(class_names)
    share = row_shares(cm)
    fig = _figure(13.0, 6.6)
    ax, bars = fig.subplots(1, 2, width_ratios=[1.0, 1.05])
    # square-root colour scale: with many classes each confusion is a small share, invisible on a linear one
    norm = PowerNorm(0.5, vmin=0.0, vmax=1.0)
    im = ax.imshow(share, cmap="Blues", norm=norm, interpolation="nearest")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.set_xlabel("predicted (class index)")
    ax.set_ylabel("true (class index)")
    ax.set_title(f"{title}, {k} classes")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class (square-root scale)")

    top = top_confusions(cm)
    if not top:
        bars.text(0.5, 0.5, "no confusions", ha="center", va="center", transform=bars.transAxes)
        bars.set_axis_off()
        return fig
    names = short_names(class_names, 30)
    labels = [f"{names[i]} [{i}] \u2192 {names[j]} [{j}]" for i, j, _ in top]
    counts = [n for _, _, n in top]
    y = np.arange(len(top))
    bars.barh(y, counts, height=0.7, **BAR)
    bars.set_yticks(y, labels, fontsize=7)
    bars.invert_yaxis()  # the largest on top
    bars.set_xlim(0, max(counts) * 1.35)  # room for the share written after each bar
    bars.xaxis.set_major_locator(MaxNLocator(integer=True))
    for row, (i, _, n) in enumerate(top):
        bars.text(n, row, f" {share[i, top[row][1]]:.2f} of its class", va="center", fontsize=7)
    bars.set_xlabel("images (true \u2192 predicted)")
    bars.set_title(f"the {len(top)} largest confusions")
    return fig


# --------------------------------------------------------------------------- reliability diagram


@_styled
def reliability_figure(bins: Sequence[Any], ece: float, title: str = "reliability"):
    """Accuracy per confidence bin against the diagonal of perfect calibration; image counts below.

    `bins` are `finetune.metrics.ReliabilityBin`s (lower, upper, count, accuracy), all of them,
    empty ones included, so the bars tile [0, 1].
    """
    from matplotlib.ticker import MaxNLocator

    fig = _figure(5.0, 5.4)
    top, low = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    lower = np.asarray([b.lower for b in bins])
    width = np.asarray([b.upper - b.lower for b in bins])
    left, inner = lower + 0.03 * width, 0.94 * width  # a sliver between bars: two full bins read as two
    top.bar(
        left, [b.accuracy for b in bins], width=inner, align="edge", linewidth=0.6, label="accuracy", **BAR
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1.5, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}: ECE {ece:.4f}")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    low.bar(left, [b.count for b in bins], width=inner, align="edge", color="#999999")
    low.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    low.set_ylabel("images")
    low.set_xlabel("confidence (top-1 probability)")
    return fig


# --------------------------------------------------------------------------- most confident mistakes


def _thumbnail(path: Path) -> np.ndarray | None:
    """(h, w, 3) uint8 of the image at most THUMB px a side; None when it cannot be read any more."""
    from finetune.data.decode import ImageError, load_rgb

    try:
        im = load_rgb(path)
        im.thumbnail((THUMB, THUMB))
    except (ImageError, OSError):  # the file moved or broke since the run: the caption still shows
        return None
    return np.asarray(im)


@_styled
def mistakes_figure(picks: Sequence[tuple[Path, dict]], score_kind: str = "probability"):
    """A grid (at most 4 columns) of thumbnails, each with its file name, true class and prediction.

    `picks` are (image path, prediction row with path/label/pred/score); the score is a top-1
    probability ("p 0.93") or, for an SVM head, a decision score ("score 1.20").
    """
    cols = min(4, max(1, len(picks)))
    nrows = max(1, math.ceil(len(picks) / cols))
    # a fixed grid (no constrained layout: it took 2.5x the drawing time of 16 thumbnails)
    cell, caption = 2.6, 0.5  # inches: one cell, and the three caption lines above each thumbnail
    height = cell * nrows
    box = (height - caption - 0.1 - (nrows - 1) * caption) / nrows  # each thumbnail's height
    fig = _figure(cell * cols, height, layout=None)
    grid = {"left": 0.02, "right": 0.98, "top": 1 - caption / height, "bottom": 0.1 / height}
    axes = fig.subplots(
        nrows, cols, squeeze=False, gridspec_kw={**grid, "wspace": 0.1, "hspace": caption / box}
    )
    axes = axes.ravel()
    short = "p" if score_kind == "probability" else "score"
    for ax, (path, row) in zip(axes, picks, strict=False):
        thumb = _thumbnail(path)
        if thumb is None:
            ax.set_facecolor("#f2f2f2")
            ax.text(
                0.5,
                0.5,
                "image unavailable",
                ha="center",
                va="center",
                color="#666666",
                transform=ax.transAxes,
            )
        else:
            ax.imshow(thumb, interpolation="nearest" if max(thumb.shape[:2]) < THUMB else "antialiased")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(
            "\n".join(
                [
                    _clip(Path(str(row["path"])).name, 36, middle=True),
                    f"true {_clip(row['label'], 34, middle=True)}",
                    f"pred {_clip(row['pred'], 28, middle=True)} ({short} {float(row['score']):.2f})",
                ]
            ),
            fontsize=7.5,
        )
    for ax in axes[len(picks) :]:
        ax.set_axis_off()
    return fig


# --------------------------------------------------------------------------- training curves


def read_history(path: Path) -> dict[str, np.ndarray] | None:
    """history.csv as {column: float array}; None when absent or without rows. Blank cells are NaN."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return None

    def number(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else math.nan
        except ValueError:
            return math.nan

    return {col: np.asarray([number(r.get(col)) for r in rows]) for col in rows[0] if col}


def smoothing_floor(label_smoothing: float, n_classes: int) -> float:
    """The least cross-entropy against label-smoothed targets: the entropy of the smoothed target.

    The true class gets 1 - eps + eps/K, every other eps/K (PyTorch's CrossEntropyLoss); a
    perfect model's training loss is this, not 0, while its validation loss (hard labels) goes to 0.
    """
    eps, k = float(label_smoothing), int(n_classes)
    if eps <= 0 or k < 2:
        return 0.0
    hit, miss = 1 - eps + eps / k, eps / k
    return float(-hit * math.log(hit) - (k - 1) * miss * math.log(miss))


def _first(history: dict[str, np.ndarray], *names: str) -> str | None:
    """The first of `names` that history.csv has with at least one number (train.py's names first)."""
    return next((c for c in names if c in history and np.isfinite(history[c]).any()), None)


@_styled
def curves_figure(history: dict[str, np.ndarray], label_smoothing: float = 0.0, n_classes: int = 0):
    """Loss, accuracy and learning rate per epoch from history.csv's columns; one panel each.

    Epochs are whole numbers on the axis and accuracy stays in [0, 1]. The training loss is the
    running mean over the epoch's augmented batches against the recipe's label-smoothed targets;
    the validation loss is plain cross-entropy at the epoch's end. The legend says so, and with
    smoothing a dotted line marks the least training loss it allows (`smoothing_floor`).
    """
    from matplotlib.ticker import MaxNLocator

    n = len(next(iter(history.values())))
    epochs = history.get("epoch", np.arange(1, n + 1, dtype=float))
    smooth = f", label smoothing {label_smoothing:g}" if label_smoothing > 0 else ""
    series = {
        "loss": [
            (_first(history, "train_loss"), f"train (batch mean{smooth})"),
            (_first(history, "val_loss"), "validation (cross-entropy)"),
        ],
        "accuracy": [
            (_first(history, "train_accuracy", "train_acc"), "train (batch mean)"),
            (_first(history, "val_accuracy", "val_acc"), "validation"),
        ],
        "learning rate": [(_first(history, "lr"), "head")],
    }
    panels = [(title, [(c, label) for c, label in cols if c]) for title, cols in series.items()]
    panels = [(title, cols) for title, cols in panels if cols]
    fig = _figure(4.2 * max(1, len(panels)), 3.4)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(panels)))).ravel()
    marker = "o" if n <= 20 else None
    for ax, (title, cols) in zip(axes, panels, strict=False):
        for col, label in cols:
            ax.plot(epochs, history[col], marker=marker, markersize=3.5, label=label, clip_on=False)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xlim(np.nanmin(epochs) - 0.5, np.nanmax(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # never "epoch 1.5"
        if title == "loss":
            floor = smoothing_floor(label_smoothing, n_classes)
            if floor > 0:
                ax.axhline(
                    floor,
                    color="#777777",
                    linestyle=":",
                    label=f"least train loss with smoothing ({floor:.3f})",
                )
            ax.set_ylim(bottom=0)
        elif title == "accuracy":
            ax.set_ylim(0, 1)
        else:
            lr = history[cols[0][0]]
            lr = lr[np.isfinite(lr)]
            if lr.min() > 0 and lr.max() / lr.min() > 3:
                ax.set_yscale("log")
                _log_axis(ax.yaxis)
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------- compare


@_styled
def compare_figure(rows: Sequence[Any]):
    """Validation accuracy (0-1) against wall time, one marker per strategy, named in a legend below.

    `rows` have .strategy, .accuracy and .seconds (`finetune.app.compare.CompareRow`). A legend
    instead of labels beside the points: labels of runs with close times and accuracies overlap.
    """
    fig = _figure(6.4, 4.6)
    ax = fig.subplots()
    markers = "osD^vP*X"
    for i, r in enumerate(rows):
        ax.scatter(
            r.seconds,
            r.accuracy,
            s=55,
            marker=markers[i % len(markers)],
            zorder=3,
            clip_on=False,
            label=f"{r.strategy}: {r.accuracy:.3f} in {r.seconds:.0f} s",
        )
    seconds = [r.seconds for r in rows if r.seconds > 0]
    if seconds and max(seconds) / min(seconds) > 5:
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
        ax.set_xlabel("wall time of the run (s, log scale)")
    else:
        ax.set_xlabel("wall time of the run (s)")
        ax.set_xlim(left=0, right=max(seconds, default=1.0) * 1.1)
    low = min((r.accuracy for r in rows), default=0.0)
    ax.set_ylim(max(0.0, min(0.9, math.floor((low - 0.05) * 10) / 10)), 1.0)
    ax.set_ylabel("validation accuracy")
    ax.set_title("strategies on one split")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


# --------------------------------------------------------------------------- learning-rate range test


@_styled
def lr_find_figure(
    lrs: Sequence[float],
    losses: Sequence[float],
    smoothed: Sequence[float],
    suggested: float,
    diverged_at: float | None = None,
    rule: str = "valley",
):
    """Training loss against the base learning rate (log axis): each step's loss faint, the smoothed
    curve over it, the suggestion marked, and the LR where the smoothed loss diverged.

    The loss axis spans the smoothed curve before the divergence: the last steps' losses can be
    1e6 and would flatten everything else into a line.
    """
    lrs, losses, smoothed = (np.asarray(a, dtype=np.float64) for a in (lrs, losses, smoothed))
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    ax.plot(lrs, losses, color="#9db4d8", linewidth=0.9, label="loss of each step")
    ax.plot(lrs, smoothed, color=BAR["color"], linewidth=1.8, label="smoothed (moving average)")
    at = int(np.argmin(np.abs(np.log(lrs) - math.log(suggested))))  # the step nearest the suggestion
    ax.axvline(suggested, color="#c44e52", linestyle="--", linewidth=1.2)
    ax.plot(
        [suggested],
        [smoothed[at]],
        "o",
        color="#c44e52",
        zorder=3,
        label=f"suggested lr {suggested:g} ({rule})",
    )
    if diverged_at is not None:
        ax.axvline(diverged_at, color="#777777", linestyle=":", label=f"diverged at lr {diverged_at:.3g}")
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    before = lrs < diverged_at if diverged_at is not None else np.ones(len(lrs), dtype=bool)
    seen = smoothed[before & np.isfinite(smoothed)]
    if len(seen):
        low, high = float(seen.min()), float(seen.max())
        pad = 0.08 * max(high - low, 1e-3)
        ax.set_ylim(max(0.0, low - pad), high + pad)
    ax.set_xlabel("learning rate (the recipe's lr; log scale)")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
