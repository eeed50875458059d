"""The figures people look at: evaluation figures as hand-written SVG, training curves as PNG.

    confusion_svg(cm, class_names)        # SVG text: rows true, columns predicted, colour = row share
    reliability_svg(bins, ece)            # accuracy per confidence bin against the diagonal, counts below
    mistakes_svg(picks, "probability")    # thumbnails of the most confident mistakes, with captions
    curves_png(read_history(path))        # PNG bytes of loss / accuracy / LR per epoch (fine-tune runs)

The SVG figures need no plotting library, so a probe run's report never imports matplotlib;
`report.py` embeds them in report.html and `evaluate.py` saves them next to its metrics. The
curves are drawn with matplotlib's Agg canvas on a `Figure` object, never through pyplot, so no
global backend or figure state is touched.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- SVG figures (evaluation)
#
# The evaluation figures are SVG written by hand: a probe run's report then never imports
# matplotlib (its import and the layout + PNG encoding of three figures were ~2.5 s of a ~4 s
# cached re-run). Every number goes through `_num`, so equal inputs give equal bytes. Parts are
# named groups (<g class="cells">, "counts", "accuracy", "mistake", ...) that tests read back.

SVG_NS = "http://www.w3.org/2000/svg"  # namespace names, never fetched
XLINK_NS = "http://www.w3.org/1999/xlink"
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
# matplotlib's "Blues" colormap: the 9 ColorBrewer colours it interpolates, evenly spaced on [0, 1]
BLUES = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
_BLUES_RGB = np.asarray([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in BLUES], float)  # (9, 3)
# not allowed in XML 1.0 at all (even escaped); lone surrogates are the undecodable bytes of a file name
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
CONFUSION_TEXT_MAX_K = 25  # count in each cell up to this many classes
CONFUSION_LABEL_MAX_K = 50  # tick labels up to this many; beyond, they overlap into a black bar
THUMB = 128  # longest side of a mistake thumbnail, in pixels
DASHED = {"stroke": "#999999", "stroke_width": 1.5, "stroke_dasharray": "6 4"}  # perfect calibration
BAR = {"fill": "#4c72b0", "stroke": "#223355"}  # accuracy bars


def _x(value: Any) -> str:
    """Text safe inside an XML element or attribute: &<>"' escaped, XML-illegal characters as U+FFFD."""
    return html.escape(_XML_ILLEGAL.sub("\ufffd", str(value)), quote=True)


def _num(value: float) -> str:
    """A coordinate with at most 2 decimals, never '-0': the same figure always has the same text."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _el(name: str, content: str | None = None, **attrs: Any) -> str:
    """One SVG element; `font_size=12` becomes font-size="12", `class_` class; None drops an attribute."""
    parts = []
    for key, value in attrs.items():
        if value is None:
            continue
        text = _num(value) if isinstance(value, (int, float, np.number)) else _x(value)
        parts.append(f' {key.rstrip("_").replace("_", "-")}="{text}"')
    head = f"<{name}{''.join(parts)}"
    return f"{head}/>" if content is None else f"{head}>{content}</{name}>"


def _text(
    x: float, y: float, text: str, size: float = 12, anchor: str = "middle", rotate: bool = False, **attrs
):
    """A line of text whose middle sits at y; with rotate, it reads bottom to top around (x, y).

    dy shifts the baseline down by a third of the font size: dominant-baseline is not honoured
    by every SVG 1.1 viewer.
    """
    if rotate:
        attrs["transform"] = f"translate({_num(x)},{_num(y)}) rotate(-90)"
        x = y = 0
    return _el("text", _x(text), x=x, y=y, dy="0.35em", font_size=size, text_anchor=anchor, **attrs)


def _clip(text: str, n: int, middle: bool = False) -> str:
    """At most n characters; the cut marked with an ellipsis (in the middle keeps a file's extension)."""
    if len(text) <= n:
        return text
    if middle:
        tail = (n - 1) // 2
        return text[: n - 1 - tail] + "\u2026" + text[len(text) - tail :]
    return text[: n - 1] + "\u2026"


def _text_width(text: str, size: float) -> float:
    """Rough rendered width (an average glyph of DejaVu/Arial is ~0.6 em): enough to size margins."""
    return 0.6 * size * len(text)


def _svg(width: float, height: float, title: str, body: Sequence[str]) -> str:
    """A standalone SVG 1.1 document on a white background; `title` is its accessible name."""
    w, h = math.ceil(width), math.ceil(height)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="{SVG_NS}" xmlns:xlink="{XLINK_NS}" version="1.1" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" font-family="{FONT}" fill="#222222">'
        f"<title>{_x(title)}</title>"
        + _el("rect", width=w, height=h, fill="#ffffff")
        + "".join(body)
        + "</svg>\n"
    )


def blues_rgb(share: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 "Blues" colours of values in [0, 1] (0: near white, 1: dark blue), vectorised."""
    share = np.clip(np.asarray(share, dtype=np.float64), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(BLUES))
    rgb = [np.interp(share, stops, _BLUES_RGB[:, c]) for c in range(3)]  # 3 x (...)
    return np.rint(np.stack(rgb, axis=-1)).astype(np.uint8)


def blues(share: float) -> str:
    """The "Blues" colour of one value in [0, 1] as #rrggbb."""
    return _hex(blues_rgb(np.asarray(share)))


def _hex(rgb: np.ndarray) -> str:
    r, g, b = (int(c) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def _png_href(pixels: np.ndarray) -> str:
    """An (H, W, 3) uint8 array as a data: URI of a PNG (Pillow writes no date, so bytes are stable)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image(x: float, y: float, width: float, height: float, href: str, **attrs: Any) -> str:
    """An embedded raster; xlink:href too, for viewers that predate SVG 2's plain href."""
    return _el("image", x=x, y=y, width=width, height=height, href=href, **{"xlink:href": href}, **attrs)


def confusion_svg(cm: np.ndarray, class_names: Sequence[str], title: str = "confusion matrix") -> str:
    """Rows: true class, columns: predicted. Colour is the row share (recall), text the count.

    Counts are written in the cells up to 25 classes, tick labels up to 50; beyond 50 the cells
    are one embedded PNG (a pixel per cell), which keeps a 1000-class matrix a small file.
    """
    cm = np.asarray(cm, dtype=np.int64)  # (K, K)
    k = len(class_names)
    # colour by share of the true class, so a rare class's mistakes are as visible as a common one's
    rows = cm.sum(axis=1, keepdims=True)  # (K, 1)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)  # (K, K)
    grid = min(max(56.0 * k, 160.0), 400.0 + 8.0 * k, 1200.0)  # side of the matrix: grows with K, capped
    cell = grid / max(k, 1)
    labelled = k <= CONFUSION_LABEL_MAX_K
    rotated = k > 6
    tick = min(12.0, 0.7 * cell)
    names = [_clip(str(c), 24) for c in class_names] if labelled else []
    label_w = max((_text_width(n, tick) for n in names), default=0.0)
    left = 34 + (label_w + 8 if labelled else 0)
    top = 40.0
    below = (label_w if rotated else tick) + 8 if labelled else 0.0
    bar_x = left + grid + 24  # colour legend to the right of the matrix
    width, height = bar_x + 16 + 70, top + grid + below + 34

    colours = blues_rgb(share)  # (K, K, 3)
    body = [_text(left + grid / 2, 20, title, size=14, font_weight="bold")]
    if labelled:
        cells = [
            _el(
                "rect", x=left + j * cell, y=top + i * cell, width=cell, height=cell, fill=_hex(colours[i, j])
            )
            for i in range(k)
            for j in range(k)
        ]
        body.append(_el("g", "".join(cells), class_="cells", shape_rendering="crispEdges"))
    else:  # one pixel per cell, scaled up without smoothing
        body.append(
            _image(
                left,
                top,
                grid,
                grid,
                _png_href(colours),
                preserveAspectRatio="none",
                image_rendering="optimizeSpeed",
                style="image-rendering:pixelated",
            )
        )
    body.append(_el("rect", x=left, y=top, width=grid, height=grid, fill="none", stroke="#444444"))
    if k <= CONFUSION_TEXT_MAX_K:
        size = min(12.0, 0.42 * cell)
        counts = [
            _text(
                left + (j + 0.5) * cell,
                top + (i + 0.5) * cell,
                str(int(cm[i, j])),
                size=size,
                fill="#ffffff" if share[i, j] > 0.5 else "#000000",
            )
            for i in range(k)
            for j in range(k)
        ]
        body.append(_el("g", "".join(counts), class_="counts"))
    if labelled:
        ys = [
            _text(left - 6, top + (i + 0.5) * cell, n, size=tick, anchor="end") for i, n in enumerate(names)
        ]
        if rotated:
            xs = [
                _text(left + (j + 0.5) * cell, top + grid + 6, n, size=tick, anchor="end", rotate=True)
                for j, n in enumerate(names)
            ]
        else:
            xs = [
                _text(left + (j + 0.5) * cell, top + grid + 6 + tick / 2, n, size=tick)
                for j, n in enumerate(names)
            ]
        body.append(_el("g", "".join(ys), class_="ylabels"))
        body.append(_el("g", "".join(xs), class_="xlabels"))
    body.append(_text(left + grid / 2, height - 14, "predicted", size=13))
    body.append(_text(14, top + grid / 2, "true", size=13, rotate=True))
    body.append(_colour_legend(bar_x, top, grid))
    return _svg(width, height, title, body)


def _colour_legend(x: float, y: float, height: float, slices: int = 64) -> str:
    """A vertical 0..1 "Blues" bar with ticks, as stacked slices (a gradient would need an id reference)."""
    step = height / slices
    parts = [
        # each slice overlaps the next by half a pixel so no hairline gaps show between them
        _el(
            "rect",
            x=x,
            y=y + height - (s + 1) * step,
            width=16,
            height=step + 0.5,
            fill=blues((s + 0.5) / slices),
        )
        for s in range(slices)
    ]
    parts.append(_el("rect", x=x, y=y, width=16, height=height, fill="none", stroke="#444444"))
    for v in (0.0, 0.5, 1.0):
        ty = y + height * (1 - v)
        parts.append(_el("line", x1=x + 16, y1=ty, x2=x + 20, y2=ty, stroke="#444444"))
        parts.append(_text(x + 23, ty, _num(v), size=10, anchor="start"))
    parts.append(_text(x + 56, y + height / 2, "share of true class", size=11, rotate=True))
    return _el("g", "".join(parts), class_="legend")


def reliability_svg(bins: Sequence[Any], ece: float, title: str = "reliability") -> str:
    """Accuracy per confidence bin against the diagonal of perfect calibration; image counts below.

    `bins` are `finetune.evaluate.ReliabilityBin`s (lower, upper, count, accuracy), all of them,
    empty ones included, so the bars tile [0, 1].
    """
    width, height = 500.0, 550.0
    left, plot_w = 64.0, 416.0
    top, top_h = 40.0, 320.0  # accuracy panel
    low, low_h = top + top_h + 16, 110.0  # count panel
    bin_w = bins[0].upper - bins[0].lower if bins else 1.0

    def px(v: float) -> float:
        return left + plot_w * v

    def py(v: float) -> float:
        return top + top_h * (1 - v)

    body = [_text(left + plot_w / 2, 20, f"{title}: ECE {ece:.4f}", size=14, font_weight="bold")]
    grid_lines, ticks = [], []
    for t in range(6):  # 0, 0.2, ..., 1 on both axes of the top panel, x labels under the bottom one
        v = t / 5
        grid_lines.append(_el("line", x1=left, y1=py(v), x2=left + plot_w, y2=py(v), stroke="#eeeeee"))
        grid_lines.append(_el("line", x1=px(v), y1=top, x2=px(v), y2=top + top_h, stroke="#eeeeee"))
        ticks.append(_el("line", x1=left - 4, y1=py(v), x2=left, y2=py(v), stroke="#444444"))
        ticks.append(_text(left - 7, py(v), _num(v), size=11, anchor="end"))
        ticks.append(_el("line", x1=px(v), y1=low + low_h, x2=px(v), y2=low + low_h + 4, stroke="#444444"))
        ticks.append(_text(px(v), low + low_h + 14, _num(v), size=11))
    body.append(_el("g", "".join(grid_lines)))
    acc = [
        _el(
            "rect",
            x=px(b.lower + 0.025 * bin_w),
            y=py(b.accuracy),
            width=plot_w * 0.95 * bin_w,
            height=top_h * b.accuracy,
            stroke_width=0.8,
            **BAR,
        )
        for b in bins
    ]
    body.append(_el("g", "".join(acc), class_="accuracy"))
    body.append(_el("line", x1=px(0), y1=py(0), x2=px(1), y2=py(1), **DASHED))
    most = max((b.count for b in bins), default=0)
    counts = [
        _el(
            "rect",
            x=px(b.lower + 0.025 * bin_w),
            y=low + low_h * (1 - b.count / most if most else 1),
            width=plot_w * 0.95 * bin_w,
            height=low_h * b.count / most if most else 0,
            fill="#999999",
        )
        for b in bins
    ]
    body.append(_el("g", "".join(counts), class_="counts"))
    for value, y in ((0, low + low_h), (most, low)) if most else ((0, low + low_h),):
        ticks.append(_el("line", x1=left - 4, y1=y, x2=left, y2=y, stroke="#444444"))
        ticks.append(_text(left - 7, y, str(value), size=11, anchor="end"))
    body.append(_el("g", "".join(ticks), class_="ticks"))
    for y0, h in ((top, top_h), (low, low_h)):
        body.append(_el("rect", x=left, y=y0, width=plot_w, height=h, fill="none", stroke="#444444"))
    body.append(_text(16, top + top_h / 2, "accuracy", size=12, rotate=True))
    body.append(_text(16, low + low_h / 2, "images", size=12, rotate=True))
    body.append(_text(left + plot_w / 2, height - 14, "confidence (top-1 probability)", size=12))
    legend = [
        _el("rect", x=left + 8, y=top + 8, width=150, height=42, fill="#ffffff", stroke="#cccccc"),
        _el("rect", x=left + 16, y=top + 16, width=18, height=10, **BAR),
        _text(left + 42, top + 21, "accuracy", size=11, anchor="start"),
        _el("line", x1=left + 16, y1=top + 40, x2=left + 34, y2=top + 40, **DASHED),
        _text(left + 42, top + 40, "perfect calibration", size=11, anchor="start"),
    ]
    body.append(_el("g", "".join(legend), class_="legend"))
    return _svg(width, height, f"{title}: ECE {ece:.4f}", body)


def _thumbnail(path: Path) -> tuple[str, int, int] | None:
    """(data: URI of a PNG, width, height) of the image at most THUMB px a side; None if unreadable."""
    from finetune.data.decode import ImageError, load_rgb

    try:
        im = load_rgb(path)
        im.thumbnail((THUMB, THUMB))
    except (ImageError, OSError):  # the file moved or broke since the run: the caption still shows
        return None
    return _png_href(np.asarray(im)), im.width, im.height


def mistakes_svg(picks: Sequence[tuple[Path, dict]], score_kind: str = "probability") -> str:
    """A grid (at most 4 columns) of thumbnails, each with its file name, true class and prediction.

    `picks` are (image path, prediction row with path/label/pred/score); the score is a top-1
    probability ("p 0.93") or, for an SVM head, a decision score ("score 1.20").
    """
    cols = min(4, max(1, len(picks)))
    nrows = max(1, math.ceil(len(picks) / cols))
    cell_w, cell_h, pad = 190.0, 200.0, 10.0
    short = "p" if score_kind == "probability" else "score"
    body = []
    for n, (path, row) in enumerate(picks):
        x0, y0 = pad + (n % cols) * cell_w, pad + (n // cols) * cell_h
        mid = x0 + cell_w / 2
        caption = [
            _clip(Path(str(row["path"])).name, 28, middle=True),
            f"true {_clip(str(row['label']), 24)}",
            f"pred {_clip(str(row['pred']), 14)} ({short} {float(row['score']):.2f})",
        ]
        parts = [_text(mid, y0 + 8 + 14 * i, line, size=11) for i, line in enumerate(caption)]
        box_y = y0 + 46
        thumb = _thumbnail(path)
        if thumb is None:
            box = {"x": mid - THUMB / 2, "y": box_y, "width": THUMB, "height": THUMB}
            parts.append(_el("rect", fill="#f2f2f2", stroke="#dddddd", **box))
            parts.append(_text(mid, box_y + THUMB / 2, "image unavailable", size=11, fill="#666666"))
        else:
            href, w, h = thumb
            scale = THUMB / max(w, h)  # drawn THUMB px on the long side; a small image is enlarged
            parts.append(
                _image(mid - w * scale / 2, box_y + (THUMB - h * scale) / 2, w * scale, h * scale, href)
            )
        body.append(_el("g", "".join(parts), class_="mistake"))
    return _svg(2 * pad + cols * cell_w, 2 * pad + nrows * cell_h, "most confident mistakes", body)


# --------------------------------------------------------------------------- training curves (matplotlib)
#
# Only fine-tune runs have a history.csv; matplotlib is imported when there is one to draw.


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (no software/date metadata, so equal figures give equal bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def read_history(path: Path) -> dict[str, np.ndarray] | None:
    """history.csv as {column: float array}; None when absent or without rows. Blank cells are NaN.

    Columns used: epoch, train_loss, val_loss, train_acc(uracy), val_acc(uracy), lr; others are ignored.
    """
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


def curves_figure(history: dict[str, np.ndarray]):
    """Loss and accuracy per epoch (train and val), and the learning rate, from history.csv columns."""
    from matplotlib.ticker import MaxNLocator

    n = len(next(iter(history.values())))
    epochs = history.get("epoch", np.arange(1, n + 1, dtype=float))
    panels = [
        ("loss", ("train_loss", "val_loss")),
        # train.py writes train_accuracy / val_accuracy; the short names are accepted too
        ("accuracy", ("train_acc", "train_accuracy", "val_acc", "val_accuracy")),
        ("learning rate", ("lr",)),
    ]
    panels = [(t, [c for c in cols if c in history and np.isfinite(history[c]).any()]) for t, cols in panels]
    panels = [(t, cols) for t, cols in panels if cols]
    fig = _figure(4.0 * max(1, len(panels)), 3.2)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(panels)))).ravel()
    for ax, (title, cols) in zip(axes, panels, strict=False):
        for col in cols:
            ax.plot(epochs, history[col], marker="o", markersize=3, label=col.replace("_", " "))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 1.5"
        if title == "learning rate" and np.nanmin(history["lr"]) > 0:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def curves_png(history: dict[str, np.ndarray]) -> bytes:
    return png_bytes(curves_figure(history))
