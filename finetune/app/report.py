"""What a person reads: the printed summaries and the run's self-contained HTML report.

    print_run_summary(result)            # after `finetune run`: accuracy, per-class table, run folder
    print_evaluation(ev)                 # after `finetune evaluate`
    write_report(run_dir)                # run_dir/report.html + figures/*.svg (+ curves.png of a fine-tune)

report.html opens offline in any browser: figures (`figures.py`, matplotlib) are inline `data:`
images, the CSS is inline, there is no script and no external URL.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.app.figures import (
    confusion_figure,
    curves_figure,
    figure_bytes,
    figure_size_px,
    mistakes_figure,
    read_history,
    reliability_figure,
)
from finetune.console import printable, text_table

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
REPORT_FILE = "report.html"
CURVES_FILE = "curves.png"  # in the run folder itself, as the README promises
MAX_LISTED_PROBLEMS = 200  # skipped/ignored files shown in the report; the rest are counted
OPEN_TABLE_MAX_ROWS = 30  # longer per-class tables start folded (<details>), so the figures stay near
WIDE_FIGURE_PX = 600  # wider than half the page: shown at its own size on a row of its own, not shrunk


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, markup=False)  # a class named "[red]" prints as is


def per_class_table(metrics: dict, title: str) -> str:
    """Precision, recall, F1 and support per class, as aligned text."""
    rows = [
        [name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
        for name, r in metrics.get("per_class", {}).items()
    ]
    header = ["class", "precision", "recall", "f1", "support"]
    return text_table(header, rows, right=(1, 2, 3, 4), title=title)


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
            label = m.get("headline_label", split) if split == m.get("headline") else split
            console.print(
                f"{label} accuracy: {s['accuracy']:.4f}  (balanced {s['balanced_accuracy']:.4f}, "
                f"macro-F1 {s['macro_f1']:.4f}, n={s['n']})"
            )
    headline = m.get("headline", "val")
    if headline in m and len(m[headline].get("per_class", {})) <= 50:
        label = m.get("headline_label", headline)
        console.print(per_class_table(m[headline], f"per class ({label})"), markup=False)
    if (result.run_dir / REPORT_FILE).is_file():
        console.print(f"report: {printable(str(result.run_dir / REPORT_FILE))}")
    console.print(f"run folder: {printable(str(result.run_dir))}")


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
    if "without_tta" in m:
        plain = m["without_tta"]["accuracy"]
        console.print(
            f"with TTA (mirror image): accuracy {m['accuracy']:.4f}, without: {plain:.4f} "
            f"({m['accuracy'] - plain:+.4f}); the figures here are with TTA"
        )
    if m.get("calibration") is not None:
        console.print(f"calibration: ECE {m['calibration']['ece']:.4f} ({m['calibration']['n_bins']} bins)")
    else:
        console.print("calibration: not applicable (the SVM head gives scores, not probabilities)")
    if len(m.get("per_class", {})) <= 50:
        console.print(per_class_table(m, "per class"), markup=False)
    for name, path in ev.files.items():
        console.print(f"{name}: {path}")


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
.figs img.wide { max-width: 100%; }
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


def _img(blob: bytes, alt: str, mime: str = "image/png", wide: bool = False) -> str:
    """An <img> whose picture is inside the page (a base64 data: URI), with its alt text.

    `wide`: the figure may take the page's whole width instead of half of it.
    """
    data = base64.b64encode(blob).decode("ascii")
    cls = ' class="wide"' if wide else ""
    return f'<img{cls} src="data:{mime};base64,{data}" alt="{_e(alt)}">'


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


def _folded(summary: str, table: str) -> str:
    """A long table folded under its summary line; a short one shown as it is."""
    if table.count("<tr>") + table.count('<tr class="chosen">') <= OPEN_TABLE_MAX_ROWS + 1:
        return table
    return f"<details><summary>{_e(summary)}</summary>{table}</details>"


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
                    metrics.get("headline_label", split) if split == metrics.get("headline") else split,
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


# The recipe keys each method reads (probe/linear.py, probe/stage.py; train/); the others are shown
# in config.json only, so a probe's report does not list learning rates it never used.
PROBE_KEYS = (
    *("name", "description", "method"),
    *("head", "c_grid", "layer", "pool", "batch_size", "image_size", "seed"),
)
NOT_FINETUNE_KEYS = ("head", "layer")  # a fine-tune trains its own linear head on the pooled output
LPFT_KEYS = ("c_grid", "pool")  # read by a fine-tune only to fit its starting head (init_head = "probe")


def recipe_keys(recipe: dict, strategy: str = "") -> list[str]:
    """The keys of a resolved recipe that its method uses, in the recipe's order."""
    if recipe.get("method", "probe") == "probe":
        used = set(PROBE_KEYS) - ({"layer"} if strategy == "stage-probe" else set())  # it tries every stage
    else:
        used = set(recipe) - set(NOT_FINETUNE_KEYS)
        if recipe.get("init_head") != "probe":
            used -= set(LPFT_KEYS)
    return [k for k in recipe if k in used]


def _head_text(config: dict) -> str:
    """What the run's head is: a probe's sklearn head, or the linear layer a fine-tune trained."""
    kind = config.get("head_kind", "")
    if kind == "finetune":
        return "linear layer, trained with the network"
    k = config.get("extra", {}).get("knn", {}).get("k", "?")
    return {
        "logreg": "logistic regression (folded into a linear layer)",
        "svm": "linear SVM (folded)",
        "knn": f"cosine k-nearest neighbours (k = {k}, the training features in the model)",
    }.get(kind, kind)


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
        ["head", _head_text(config)],
        ["cut at (tap), pooling", f"{config.get('tap')}, {config.get('pool')}"],
        ["input", f"{pre.get('input_size')} px, crop {pre.get('crop_pct')}, {pre.get('interpolation')}"],
        ["normalize", f"mean {pre.get('mean')}, std {pre.get('std')}"],
        ["classes", len(config.get("class_names", []))],
        ["device", extra.get("device", "")],
        ["created", config.get("created", "")],
    ]
    advice = extra.get("advice")
    if isinstance(advice, dict) and advice.get("reason"):
        rows.append(["chosen by auto", f"{advice.get('strategy', '')}: {advice['reason']}".lstrip(": ")])
    measured = extra.get("auto")
    if isinstance(measured, dict) and isinstance(measured.get("compared"), dict):
        said = ", ".join(
            f"{name} {acc:.4f}" for name, acc in measured["compared"].items() if isinstance(acc, (int, float))
        )
        rows.append(["measured by auto", f"validation accuracy {said}: kept {measured.get('kept')}"])
    recipe = config.get("recipe", {})
    keys = recipe_keys(recipe, config.get("strategy", ""))
    shown = {k: recipe[k] for k in keys}
    recipe_rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in shown.items()]
    unused = len(recipe) - len(keys)
    note = f"; {unused} keys it does not use are in config.json" if unused else ""
    full = html.escape(json.dumps(config, indent=2))
    return (
        '<section id="config"><h2>Configuration</h2>'
        + _table(["setting", "value"], rows, left=2)
        + (
            f"<details><summary>recipe ({_e(recipe.get('name', '?'))}: the {len(recipe_rows)} keys "
            f"a {_e(recipe.get('method', 'probe'))} run uses{_e(note)})</summary>"
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
        _folded(
            f"images per class and split ({len(names)} classes)", _table(["class"] + splits + ["all"], rows)
        )
        if splits
        else "",
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
    from finetune.metrics import (
        calibration_summary,
        confusion_matrix,
        most_confident_mistakes,
        reliability_bins,
    )

    names = list(config.get("class_names", []))
    rows, y_true, y_pred, score = split_arrays(predictions, names, split)
    if not rows:
        return "", None

    def figure(fig, name: str, alt: str) -> str:
        svg = figure_bytes(fig, "svg")
        save(f"{name}-{split}.svg", svg)
        wide = figure_size_px(fig)[0] > WIDE_FIGURE_PX
        return _img(svg, f"{alt}, {split} split", "image/svg+xml", wide=wide)

    parts = [f"<h3>{_e(split)} split ({len(rows)} images)</h3>", '<div class="figs">']
    cm = confusion_matrix(y_true, y_pred, len(names))  # (K, K)
    parts.append(
        figure(confusion_figure(cm, names, f"confusion matrix ({split})"), "confusion", "confusion matrix")
    )
    ece = None
    probabilistic = config.get("head_kind", "logreg") != "svm"
    if probabilistic and np.isfinite(score).all():
        correct = y_true == y_pred
        ece = calibration_summary(score, correct)["ece"]
        fig = reliability_figure(reliability_bins(score, correct), ece, f"reliability ({split})")
        parts.append(figure(fig, "reliability", "reliability diagram"))
    worst = most_confident_mistakes(y_true, y_pred, np.nan_to_num(score, nan=-np.inf))
    parts.append("</div>")
    if worst:
        root = Path(config.get("data", {}).get("root", ""))
        picks = [(root / rows[i]["path"], rows[i]) for i in worst]
        fig = mistakes_figure(picks, "probability" if probabilistic else "score")
        parts.append(f"<h4>Most confident mistakes ({len(worst)} shown)</h4>")
        parts.append(figure(fig, "mistakes", "most confident mistakes"))
    else:
        parts.append('<p class="note">no mistakes on this split</p>')
    per_class = (metrics.get(split) or {}).get("per_class", {})
    if per_class:
        table_rows = [
            [c, _fmt(r["precision"], 3), _fmt(r["recall"], 3), _fmt(r["f1"], 3), r["support"]]
            for c, r in per_class.items()
        ]
        table = _table(["class", "precision", "recall", "F1", "support"], table_rows)
        parts.append(
            "<h4>Per class</h4>" + _folded(f"precision, recall, F1 ({len(table_rows)} classes)", table)
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


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.html (self-contained) and its figures under run_dir/figures/.

    Figures: figures/confusion-<split>.svg, reliability-<split>.svg, mistakes-<split>.svg for the
    val and test splits, and the run folder's curves.png when there is a history.csv.
    Reads config.json, metrics.json, problems.json, predictions.json and history.csv; each one
    that is missing only drops its section. Returns the path of report.html.
    """
    from finetune.io import atomic_write

    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json") or {}
    metrics = _read_json(run_dir / "metrics.json") or {}
    problems = _read_json(run_dir / "problems.json")
    predictions = _read_json(run_dir / "predictions.json") or []

    def save(name: str, blob: bytes) -> None:
        atomic_write(run_dir / FIGURES_DIR / name, lambda fh: fh.write(blob))

    history = read_history(run_dir / "history.csv")
    if history:
        recipe = config.get("recipe", {})
        fig = curves_figure(history, recipe.get("label_smoothing", 0.0), len(config.get("class_names", [])))
        blob = figure_bytes(fig, "png")
        atomic_write(run_dir / CURVES_FILE, lambda fh: fh.write(blob))
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
    atomic_write(out, lambda fh: fh.write(text.encode("utf-8", "replace")))
    log.debug(f"report: {out}")
    return out
