"""What a person looks at: the printed summaries, the figures, and the run's self-contained HTML report.

    print_run_summary(result)            # after `finetune run`: accuracy, per-class table, run folder
    print_evaluation(ev)                 # after `finetune evaluate`
    confusion_svg(cm, class_names)       # SVG text; also reliability_svg(bins, ece), mistakes_svg(picks)
    curves_png(read_history(path))       # PNG bytes of the training curves (fine-tune runs only)
    write_report(run_dir)                # run_dir/report.html + run_dir/figures/*.svg (+ curves.png)

report.html opens offline in any browser: figures are inline `data:` images, the CSS is inline,
there is no script and no external URL. The evaluation figures (confusion matrix, reliability
diagram, most-confident mistakes) are SVG written by hand, so a probe run's report never imports
matplotlib; the training curves are drawn with matplotlib's Agg canvas on a `Figure` object,
never through pyplot, so no global backend or figure state is touched.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FIGURES_DIR = "figures"
REPORT_FILE = "report.html"
MAX_LISTED_PROBLEMS = 200  # skipped/ignored files shown in the report; the rest are counted


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def per_class_table(metrics: dict, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, row in metrics.get("per_class", {}).items():
        table.add_row(
            name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"])
        )
    return table


def print_run_summary(result: Any) -> None:
    """Skipped files, the headline metrics and the per-class table of a finished run."""
    console = _console()
    m = result.metrics
    skipped = result.config.data.get("skipped", 0)
    ignored = result.config.data.get("ignored", 0)
    if skipped or ignored:
        console.print(
            f"data: {skipped} file(s) skipped, {ignored} ignored — "
            f"full list in {result.run_dir / 'problems.json'}"
        )
    for split in ("val", "test"):
        if split in m and m[split].get("n"):
            s = m[split]
            console.print(
                f"{split} accuracy: {s['accuracy']:.4f}  (balanced {s['balanced_accuracy']:.4f}, "
                f"macro-F1 {s['macro_f1']:.4f}, n={s['n']})"
            )
    headline = m.get("headline", "val")
    if headline in m and len(m[headline].get("per_class", {})) <= 50:
        console.print(per_class_table(m[headline], f"per class ({headline})"))
    if (result.run_dir / REPORT_FILE).is_file():
        console.print(f"report: {result.run_dir / REPORT_FILE}")
    console.print(f"run folder: {result.run_dir}")


def print_evaluation(ev: Any) -> None:
    """Headline metrics, calibration, the per-class table and the files of an `Evaluation`."""
    console = _console()
    m = ev.metrics
    console.print(f"model: {ev.run_dir}")
    console.print(f"data: {ev.data_root} ({m['n']} images evaluated, {len(ev.skipped)} skipped)")
    line = f"accuracy: {m['accuracy']:.4f}  (balanced {m['balanced_accuracy']:.4f}, "
    line += f"macro-F1 {m['macro_f1']:.4f})"
    if "top5_accuracy" in m:
        line += f"  top-5: {m['top5_accuracy']:.4f}"
    console.print(line)
    if m.get("calibration") is not None:
        console.print(f"calibration: ECE {m['calibration']['ece']:.4f} ({m['calibration']['n_bins']} bins)")
    else:
        console.print("calibration: not applicable (the SVM head gives scores, not probabilities)")
    if len(m.get("per_class", {})) <= 50:
        console.print(per_class_table(m, "per class"))
    for name, path in ev.files.items():
        console.print(f"{name}: {path}")


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
    from finetune.images import ImageError, load_rgb

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


# --------------------------------------------------------------------------- the HTML report

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 3em; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #e3e3e3; padding-bottom: 0.2em; margin-top: 1.8em; }
.lede { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f4f7; }
td.l, th.l { text-align: left; }
tr.chosen td { font-weight: bold; background: #eef6ee; }
.note { color: #666; font-style: italic; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figs img { max-width: calc(50% - 0.5em); height: auto; border: 1px solid #eee; }
img { max-width: 100%; height: auto; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
code { font-size: 0.92em; }
footer { color: #777; font-size: 0.85em; margin-top: 3em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is absent or broken (the report shows what there is)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _img(blob: bytes, alt: str, mime: str = "image/png") -> str:
    """An <img> whose picture is inside the page (a base64 data: URI), with its alt text."""
    data = base64.b64encode(blob).decode("ascii")
    return f'<img src="data:{mime};base64,{data}" alt="{_e(alt)}">'


def _svg_img(svg: str, alt: str) -> str:
    return _img(svg.encode("utf-8"), alt, "image/svg+xml")


def _table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1, chosen: int | None = None
) -> str:
    """An HTML table; the first `left` columns are left-aligned (names), the rest right (numbers)."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f'<td class="{"l" if i < left else ""}">{_e(v)}</td>' for i, v in enumerate(row))
        body.append(f'<tr class="chosen">{cells}</tr>' if r == chosen else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _fmt(x: Any, digits: int = 4) -> str:
    return (
        f"{x:.{digits}f}"
        if isinstance(x, (int, float)) and not isinstance(x, bool)
        else ("—" if x is None else str(x))
    )


def _results_section(metrics: dict, ece: dict[str, float]) -> str:
    rows = []
    for split in ("val", "test"):
        m = metrics.get(split)
        if isinstance(m, dict) and m.get("n"):
            rows.append(
                [
                    split,
                    m["n"],
                    _fmt(m.get("accuracy")),
                    _fmt(m.get("balanced_accuracy")),
                    _fmt(m.get("macro_f1")),
                    _fmt(m.get("top5_accuracy")),
                    _fmt(ece.get(split)),
                ]
            )
    if not rows:
        note = '<p class="note">no held-out images were evaluated</p>'
        return f'<section id="results"><h2>Results</h2>{note}</section>'
    table = _table(["split", "images", "accuracy", "balanced acc.", "macro-F1", "top-5", "ECE"], rows)
    extra = ""
    if "seconds" in metrics:
        extra = f"<p>whole run: {_fmt(metrics['seconds'], 1)} s</p>"
    return f'<section id="results"><h2>Results</h2>{table}{extra}</section>'


def _config_section(config: dict) -> str:
    pre = config.get("preprocessing", {})
    weights = config.get("weights", {})
    extra = config.get("extra", {})
    rows = [
        ["backbone", f"{config.get('backbone')} ({config.get('model')})"],
        [
            "weights",
            f"{weights.get('source', '?')}"
            + (f", sha256 {weights['sha256'][:16]}…" if weights.get("sha256") else ""),
        ],
        ["strategy", config.get("strategy", "")],
        ["head", config.get("head_kind", "")],
        ["cut at (tap), pooling", f"{config.get('tap')}, {config.get('pool')}"],
        ["input", f"{pre.get('input_size')} px, crop {pre.get('crop_pct')}, {pre.get('interpolation')}"],
        ["normalize", f"mean {pre.get('mean')}, std {pre.get('std')}"],
        ["classes", len(config.get("class_names", []))],
        ["device", extra.get("device", "")],
        ["created", config.get("created", "")],
    ]
    advice = extra.get("advice")
    if isinstance(advice, dict) and advice.get("reason"):
        rows.append(["chosen by auto", advice["reason"]])
    recipe = config.get("recipe", {})
    recipe_rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in recipe.items()]
    full = html.escape(json.dumps(config, indent=2))
    return (
        '<section id="config"><h2>Configuration</h2>'
        + _table(["setting", "value"], rows, left=2)
        + (
            f"<details><summary>recipe ({_e(recipe.get('name', '?'))}, {len(recipe_rows)} keys)</summary>"
            + _table(["key", "value"], recipe_rows, left=2)
            + "</details>"
            if recipe_rows
            else ""
        )
        + f"<details><summary>config.json</summary><pre>{full}</pre></details></section>"
    )


def _data_section(config: dict, problems: dict | None) -> str:
    data = config.get("data", {})
    counts: dict = data.get("counts", {})
    splits = [s for s in ("train", "val", "test") if s in counts]
    names = list(config.get("class_names", []))
    rows = [
        [c] + [counts[s].get(c, 0) for s in splits] + [sum(counts[s].get(c, 0) for s in splits)]
        for c in names
    ]
    rows.append(
        ["total"] + [sum(counts[s].values()) for s in splits] + [sum(sum(counts[s].values()) for s in splits)]
    )
    parts = [
        '<section id="data"><h2>Data</h2>',
        f"<p>folder <code>{_e(data.get('root', '?'))}</code>, layout {_e(data.get('layout', '?'))}</p>",
        _table(["class"] + splits + ["all"], rows) if splits else "",
    ]
    problems = problems or {}
    for key, title in (("skipped", "Skipped files (unreadable)"), ("ignored", "Ignored files")):
        items = problems.get(key) or []
        if not items:
            parts.append(f'<p class="note">{_e(title.split(" (")[0].lower())}: none</p>')
            continue
        shown = [[p.get("path", "?"), p.get("reason", "")] for p in items[:MAX_LISTED_PROBLEMS]]
        more = len(items) - len(shown)
        parts.append(f"<h3>{_e(title)}: {len(items)}</h3>" + _table(["file", "reason"], shown, left=2))
        if more:
            parts.append(f'<p class="note">and {more} more in problems.json</p>')
    for w in problems.get("warnings") or []:
        parts.append(f'<p class="note">warning: {_e(w)}</p>')
    parts.append("</section>")
    return "".join(parts)


def _stage_section(stages: list[dict], chosen_stage: str) -> str:
    rows = [[s.get("stage", "?"), _fmt(s.get("accuracy")), s.get("dim", "")] for s in stages]
    chosen = next((i for i, s in enumerate(stages) if s.get("stage") == chosen_stage), None)
    return (
        '<section id="stages"><h2>Stage probe</h2>'
        "<p>validation accuracy of a linear head on the pooled output of each stage, bottom to top; "
        "the run keeps the highlighted one.</p>"
        + _table(["stage", "val accuracy", "feature dim"], rows, chosen=chosen)
        + "</section>"
    )


def split_arrays(predictions: list[dict], class_names: Sequence[str], split: str):
    """(y_true, y_pred, score) arrays of one split of predictions.json, as positions in class_names."""
    pos = {c: k for k, c in enumerate(class_names)}
    rows = [
        r for r in predictions if r.get("split") == split and r.get("label") in pos and r.get("pred") in pos
    ]
    y_true = np.asarray([pos[r["label"]] for r in rows], dtype=np.int64)
    y_pred = np.asarray([pos[r["pred"]] for r in rows], dtype=np.int64)
    score = np.asarray([float(r.get("score", math.nan)) for r in rows], dtype=np.float64)
    return rows, y_true, y_pred, score


def _split_figures(
    config: dict, metrics: dict, predictions: list[dict], split: str, save: Callable[[str, bytes], None]
) -> tuple[str, float | None]:
    """HTML and ECE of one split: confusion matrix, reliability diagram, confident mistakes, per class.

    `save(file name, bytes)` keeps each figure under figures/ as well.
    """
    from finetune.evaluate import (
        calibration_summary,
        confusion_matrix,
        most_confident_mistakes,
        reliability_bins,
    )

    names = list(config.get("class_names", []))
    rows, y_true, y_pred, score = split_arrays(predictions, names, split)
    if not rows:
        return "", None
    parts = [f"<h3>{_e(split)} split ({len(rows)} images)</h3>", '<div class="figs">']
    cm = confusion_matrix(y_true, y_pred, len(names))  # (K, K)
    svg = confusion_svg(cm, names, f"confusion matrix ({split})")
    save(f"confusion-{split}.svg", svg.encode("utf-8"))
    parts.append(_svg_img(svg, f"confusion matrix, {split} split"))
    ece = None
    probabilistic = config.get("head_kind", "logreg") != "svm"
    if probabilistic and np.isfinite(score).all():
        correct = y_true == y_pred
        ece = calibration_summary(score, correct)["ece"]
        svg = reliability_svg(reliability_bins(score, correct), ece, f"reliability ({split})")
        save(f"reliability-{split}.svg", svg.encode("utf-8"))
        parts.append(_svg_img(svg, f"reliability diagram, {split} split"))
    worst = most_confident_mistakes(y_true, y_pred, np.nan_to_num(score, nan=-np.inf))
    parts.append("</div>")
    if worst:
        root = Path(config.get("data", {}).get("root", ""))
        svg = mistakes_svg(
            [(root / rows[i]["path"], rows[i]) for i in worst], "probability" if probabilistic else "score"
        )
        save(f"mistakes-{split}.svg", svg.encode("utf-8"))
        parts.append(f"<h4>Most confident mistakes ({len(worst)} shown)</h4>")
        parts.append(_svg_img(svg, f"most confident mistakes, {split} split"))
    else:
        parts.append('<p class="note">no mistakes on this split</p>')
    per_class = (metrics.get(split) or {}).get("per_class", {})
    if per_class:
        table_rows = [
            [c, _fmt(r["precision"], 3), _fmt(r["recall"], 3), _fmt(r["f1"], 3), r["support"]]
            for c, r in per_class.items()
        ]
        parts.append(
            "<h4>Per class</h4>" + _table(["class", "precision", "recall", "F1", "support"], table_rows)
        )
    return "".join(parts), ece


def _other_evaluations(run_dir: Path) -> str:
    """A table of `finetune evaluate` results kept in the run folder (eval-*/evaluation.json)."""
    rows = []
    for path in sorted(run_dir.glob("eval-*/evaluation.json")):
        ev = _read_json(path)
        if not isinstance(ev, dict) or not isinstance(ev.get("metrics"), dict):
            continue
        m = ev["metrics"]
        cal = m.get("calibration") or {}
        rows.append(
            [
                path.parent.name,
                ev.get("data", ""),
                m.get("n", 0),
                _fmt(m.get("accuracy")),
                _fmt(m.get("top5_accuracy")),
                _fmt(cal.get("ece")),
            ]
        )
    if not rows:
        return ""
    return "<h3>Other folders (finetune evaluate)</h3>" + _table(
        ["folder", "data", "images", "accuracy", "top-5", "ECE"], rows, left=2
    )


def write_report(run_dir: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """Write run_dir/report.html (self-contained) and its figures under run_dir/figures/.

    Figures: confusion-<split>.svg, reliability-<split>.svg, mistakes-<split>.svg for the val and
    test splits, and curves.png when there is a history.csv (matplotlib is imported only then).
    Reads config.json, metrics.json, problems.json, predictions.json and history.csv; each one
    that is missing only drops its section. Returns the path of report.html.
    """
    from finetune.runs import atomic_write

    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json") or {}
    metrics = _read_json(run_dir / "metrics.json") or {}
    problems = _read_json(run_dir / "problems.json")
    predictions = _read_json(run_dir / "predictions.json") or []

    def save(name: str, blob: bytes) -> None:
        atomic_write(run_dir / FIGURES_DIR / name, lambda fh: fh.write(blob))

    history = read_history(run_dir / "history.csv")
    if history:
        blob = curves_png(history)
        save("curves.png", blob)
        curves = _img(blob, "training curves")
    else:
        curves = (
            '<p class="note">no history.csv: this run has no epochs (a probe fits its head in one step)</p>'
        )

    evaluation, ece = [], {}
    for split in ("val", "test"):
        part, split_ece = _split_figures(config, metrics, predictions, split, save)
        if part:
            evaluation.append(part)
        if split_ece is not None:
            ece[split] = split_ece
    evaluation.append(_other_evaluations(run_dir))
    if not any(evaluation):
        evaluation = ['<p class="note">no predictions.json: nothing to evaluate</p>']

    stages = metrics.get("stages")
    title = f"finetune report — {run_dir.name}"
    versions = ", ".join(f"{k} {v}" for k, v in config.get("versions", {}).items())
    page = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(run_dir.name)}</h1>",
        f'<p class="lede">{_e(config.get("strategy", "?"))} on {_e(config.get("backbone", "?"))}, '
        f"{len(config.get('class_names', []))} classes, created {_e(config.get('created', '?'))}</p>",
        _results_section(metrics, ece),
        _config_section(config),
        _data_section(config, problems),
        f'<section id="curves"><h2>Training curves</h2>{curves}</section>',
        _stage_section(stages, metrics.get("best_stage", config.get("tap", "")))
        if isinstance(stages, list) and stages
        else "",
        f'<section id="evaluation"><h2>Evaluation</h2>{"".join(evaluation)}</section>',
        f"<footer>written by finetune; {_e(versions)}</footer>",
        "</main></body></html>\n",
    ]
    out = run_dir / REPORT_FILE
    text = "".join(page)
    atomic_write(out, lambda fh: fh.write(text.encode("utf-8")))
    if log:
        log(f"report: {out}")
    return out
