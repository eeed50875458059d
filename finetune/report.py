"""What a person looks at: the printed summaries, the figures, and the run's self-contained HTML report.

    print_run_summary(result)            # after `finetune run`: accuracy, per-class table, run folder
    print_evaluation(ev)                 # after `finetune evaluate`
    confusion_png(cm, class_names)       # PNG bytes; also reliability_png, mistakes_png, curves_png
    write_report(run_dir)                # run_dir/report.html + run_dir/figures/*.png

report.html opens offline in any browser: figures are inline `data:` PNGs, the CSS is inline,
there is no script and no external URL. Figures are drawn with matplotlib's Agg canvas on a
`Figure` object, never through pyplot, so no global backend or figure state is touched.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
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


# --------------------------------------------------------------------------- figures


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


def confusion_figure(cm: np.ndarray, class_names: Sequence[str], title: str = "confusion matrix"):
    """Rows: true class, columns: predicted. Colour is the row share (recall), text the count."""
    cm = np.asarray(cm)  # (K, K)
    k = len(class_names)
    side = min(4.0 + 0.35 * k, 20.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    # colour by share of the true class, so a rare class's mistakes are as visible as a common one's
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    if k <= 50:  # beyond that the tick labels overlap into a black bar
        ax.set_xticks(range(k), labels=list(class_names), rotation=90 if k > 6 else 0)
        ax.set_yticks(range(k), labels=list(class_names))
    if k <= 25:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def confusion_png(cm: np.ndarray, class_names: Sequence[str], title: str = "confusion matrix") -> bytes:
    return png_bytes(confusion_figure(cm, class_names, title))


def reliability_figure(bins: Sequence[Any], ece: float, title: str = "reliability"):
    """Accuracy per confidence bin against the diagonal of perfect calibration; counts below."""
    fig = _figure(5.0, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = bins[0].upper - bins[0].lower if bins else 1.0
    centers = [b.lower + width / 2 for b in bins]
    top.bar(
        centers,
        [b.accuracy for b in bins],
        width=width * 0.95,
        color="#4c72b0",
        edgecolor="#223355",
        label="accuracy",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="#999999", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_xlim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}: ECE {ece:.4f}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, [b.count for b in bins], width=width * 0.95, color="#999999")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images")
    return fig


def reliability_png(bins: Sequence[Any], ece: float, title: str = "reliability") -> bytes:
    return png_bytes(reliability_figure(bins, ece, title))


def mistakes_figure(picks: Sequence[tuple[Path, dict]], score_kind: str = "probability", thumb: int = 128):
    """A grid of thumbnails: each image with its true class, the predicted class and the confidence."""
    from finetune.images import ImageError, load_rgb

    cols = min(4, max(1, len(picks)))
    nrows = max(1, math.ceil(len(picks) / cols))
    fig = _figure(2.3 * cols, 2.6 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
    short = "p" if score_kind == "probability" else "score"
    for ax in axes:
        ax.set_axis_off()
    # more axes than picks when the last row is partial
    for ax, (path, row) in zip(axes, picks, strict=False):
        try:
            im = load_rgb(path)
            im.thumbnail((thumb, thumb))
            ax.imshow(np.asarray(im))
        except (ImageError, OSError):  # the file moved or broke since: show the caption anyway
            ax.text(
                0.5, 0.5, "image unavailable", ha="center", va="center", fontsize=8, transform=ax.transAxes
            )
        ax.set_title(
            f"{Path(row['path']).name}\ntrue {row['label']}\npred {row['pred']} ({short} {row['score']:.2f})",
            fontsize=7,
        )
    return fig


def mistakes_png(picks: Sequence[tuple[Path, dict]], score_kind: str = "probability") -> bytes:
    return png_bytes(mistakes_figure(picks, score_kind))


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


def _img(blob: bytes, alt: str) -> str:
    data = base64.b64encode(blob).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


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
    """HTML and ECE of one split: confusion matrix, reliability diagram, confident mistakes, per class."""
    from sklearn.metrics import confusion_matrix

    from finetune.evaluate import calibration_summary, most_confident_mistakes, reliability_bins

    names = list(config.get("class_names", []))
    rows, y_true, y_pred, score = split_arrays(predictions, names, split)
    if not rows:
        return "", None
    parts = [f"<h3>{_e(split)} split ({len(rows)} images)</h3>", '<div class="figs">']
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(names))))
    blob = confusion_png(cm, names, f"confusion matrix ({split})")
    save(f"confusion-{split}", blob)
    parts.append(_img(blob, f"confusion matrix, {split} split"))
    ece = None
    probabilistic = config.get("head_kind", "logreg") != "svm"
    if probabilistic and np.isfinite(score).all():
        correct = y_true == y_pred
        ece = calibration_summary(score, correct)["ece"]
        blob = reliability_png(reliability_bins(score, correct), ece, f"reliability ({split})")
        save(f"reliability-{split}", blob)
        parts.append(_img(blob, f"reliability diagram, {split} split"))
    worst = most_confident_mistakes(y_true, y_pred, np.nan_to_num(score, nan=-np.inf))
    parts.append("</div>")
    if worst:
        root = Path(config.get("data", {}).get("root", ""))
        blob = mistakes_png(
            [(root / rows[i]["path"], rows[i]) for i in worst], "probability" if probabilistic else "score"
        )
        save(f"mistakes-{split}", blob)
        parts.append(f"<h4>Most confident mistakes ({len(worst)} shown)</h4>")
        parts.append(_img(blob, f"most confident mistakes, {split} split"))
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
    """Write run_dir/report.html (self-contained) and run_dir/figures/*.png from the run folder's files.

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
        atomic_write(run_dir / FIGURES_DIR / f"{name}.png", lambda fh: fh.write(blob))

    history = read_history(run_dir / "history.csv")
    if history:
        blob = curves_png(history)
        save("curves", blob)
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
