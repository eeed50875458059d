"""report.html: self-contained, complete, drawn from the run folder's files; and a real browser renders it.

One real run of the packaged lite0 at 64 px (module fixture); other variants are copies of
its folder with hand-written history.csv / stages / predictions, re-rendered by write_report.
The hand-written SVG figures are parsed back with ElementTree (`parse_svg`, also used by
test_evaluate.py) and compared with sklearn, matplotlib's colormap and hand calculations.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune.app.figures import confusion_svg, curves_figure, mistakes_svg, read_history
from finetune.app.report import write_report
from tests.conftest import invoke, write_images

runner = CliRunner()
CLASSES = ("blue", "green", "red")
HEADINGS = ("Results", "Configuration", "Data", "Training curves", "Evaluation")


class Page(HTMLParser):
    """Every tag with its attributes, headings with their text, and tables as lists of cell texts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.headings: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.chosen_rows: list[list[str]] = []
        self._heading: list[str] | None = None
        self._cell: list[str] | None = None
        self._row_chosen = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag in ("h1", "h2", "h3", "h4"):
            self._heading = []
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
            self._row_chosen = attrs.get("class") == "chosen"
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3", "h4") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row_chosen:
            self.chosen_rows.append(self.tables[-1][-1])

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def images(self) -> list[str]:
        return [a.get("src", "") for t, a in self.tags if t == "img"]

    def table_with(self, first_header: str) -> list[list[str]]:
        return next(t for t in self.tables if t and t[0] and t[0][0] == first_header)


def png_from_data_uri(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    im = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True)))
    im.load()
    return im


# --------------------------------------------------------------------------- reading SVG back

SVG = "{http://www.w3.org/2000/svg}"
XLINK_HREF = "{http://www.w3.org/1999/xlink}href"


def parse_svg(text: str) -> ET.Element:
    """The root of a self-contained SVG 1.1 document; fails on a script, a reference or a foreign element."""
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg" and root.get("version") == "1.1", root.tag
    assert int(root.get("width")) >= 100 and int(root.get("height")) >= 100
    assert "url(" not in text  # no reference to anything, not even inside the document
    for el in root.iter():
        assert el.tag.startswith(SVG), el.tag  # nothing from another vocabulary (XHTML, MathML)
        assert el.tag[len(SVG) :] not in ("script", "foreignObject", "use", "a", "style"), el.tag
        for name, value in el.attrib.items():
            assert not name.startswith("on"), name  # no event handlers
            if name in ("href", XLINK_HREF):
                assert value.startswith("data:image/png;base64,"), value[:60]  # embedded, never fetched
    return root


def svg_from_data_uri(src: str) -> ET.Element:
    prefix = "data:image/svg+xml;base64,"
    assert src.startswith(prefix), src[:60]
    return parse_svg(base64.b64decode(src[len(prefix) :], validate=True).decode("utf-8"))


def group(root: ET.Element, cls: str) -> ET.Element | None:
    """The <g class="cls"> of a figure (the figures name their parts: cells, counts, accuracy, ...)."""
    return root.find(f".//{SVG}g[@class='{cls}']")


def by_position(elements) -> list[ET.Element]:
    """Elements in reading order: top to bottom, then left to right (not in the order written)."""
    return sorted(elements, key=lambda e: (round(float(e.get("y"))), float(e.get("x"))))


def all_text(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def png_of_href(el: ET.Element) -> Image.Image:
    """The PNG embedded by an <image>; href and xlink:href (for old viewers) must agree."""
    assert el.get("href") == el.get(XLINK_HREF)
    return png_from_data_uri(el.get("href"))


def luminance(colour: str) -> float:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A linear-probe run on three classes of 6 images, one more red file broken (skipped)."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    for k, name in enumerate(CLASSES):
        write_images(data / name, k, 6)
    (data / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    res = invoke("run", data, "--out", root / "runs", "--set", "image_size=64")
    assert res.exit_code == 0, res.output
    return next((root / "runs").iterdir()), data


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("report.html", "figures", "eval-*"))
    return dest


# --------------------------------------------------------------------------- the report of a real run


def test_run_writes_a_self_contained_report(trained):
    run, _ = trained
    text = (run / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    for heading in HEADINGS:
        assert heading in page.headings, page.headings
    assert "Stage probe" not in page.headings  # a linear probe has no per-stage table
    assert "no history.csv" in text  # a probe has no epochs

    images = page.images()
    assert len(images) >= 2  # confusion matrix and reliability diagram of the val split
    for src in images:
        root = svg_from_data_uri(src)
        fills = {r.get("fill") for r in root.iter(f"{SVG}rect")} - {"#ffffff", "none"}
        assert fills and len(all_text(root)) >= 5  # coloured marks and labels, not a blank page
    # nothing outside the file: no external URL, no script, no stylesheet or frame to fetch
    assert "http://" not in text and "https://" not in text and "url(" not in text
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for name in ("src", "href", "srcset", "data"):
            value = attrs.get(name)
            assert value is None or value.startswith("data:"), (tag, name, value[:80])
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["confusion-val.svg", "reliability-val.svg"]


def test_report_data_summary_counts_files_and_lists_skipped(trained):
    run, data = trained
    page = Page((run / "report.html").read_text(encoding="utf-8"))
    table = page.table_with("class")
    header = table[0]
    assert header[0] == "class" and header[-1] == "all" and "train" in header and "val" in header
    # independent reference: readable images on disk per class folder
    on_disk = {c: len([p for p in (data / c).iterdir() if p.name != "broken.png"]) for c in CLASSES}
    rows = {r[0]: r for r in table[1:]}
    for c in CLASSES:
        assert int(rows[c][-1]) == on_disk[c]
        assert int(rows[c][header.index("train")]) + int(rows[c][header.index("val")]) == on_disk[c]
    assert int(rows["total"][-1]) == sum(on_disk.values())
    skipped = page.table_with("file")
    assert skipped[1][0] == "red/broken.png" and skipped[1][1]  # with its reason
    assert any(h.startswith("Skipped files") and h.endswith(": 1") for h in page.headings)


def test_report_confusion_matrix_is_the_one_of_predictions_json(trained):
    from sklearn.metrics import confusion_matrix

    run, _ = trained
    rows = [r for r in json.loads((run / "predictions.json").read_text()) if r["split"] == "val"]
    pos = {c: i for i, c in enumerate(CLASSES)}
    cm = confusion_matrix([pos[r["label"]] for r in rows], [pos[r["pred"]] for r in rows], labels=[0, 1, 2])
    expected = confusion_svg(cm, list(CLASSES), "confusion matrix (val)")
    saved = (run / "figures" / "confusion-val.svg").read_text(encoding="utf-8")
    assert saved == expected
    counts = [int(t.text) for t in by_position(group(parse_svg(saved), "counts"))]
    assert counts == cm.ravel().tolist()
    wrong = confusion_svg(cm[::-1], list(CLASSES), "confusion matrix (val)")
    assert wrong != expected  # the comparison can fail
    # the page shows the same figure as the file
    page = Page((run / "report.html").read_text(encoding="utf-8"))
    src = next(s for s in page.images() if s.startswith("data:image/svg+xml"))
    assert base64.b64decode(src.split(",", 1)[1]).decode("utf-8") == saved


# --------------------------------------------------------------------------- history, stages, mistakes

HISTORY = (
    "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n"
    "1,1.20,0.40,1.10,0.50,0.01,2.0\n"
    "2,0.80,0.70,0.90,0.60,0.005,2.1\n"
    "3,0.50,0.85,,0.75,0.001,2.0\n"  # a blank cell (no val pass that epoch)
)
STAGES = [
    {"stage": "stage1", "accuracy": 0.61, "dim": 16},
    {"stage": "stage3", "accuracy": 0.83, "dim": 40},
    {"stage": "pool", "accuracy": 0.78, "dim": 1280},
]


def test_curves_figure_plots_the_history_columns(tmp_path):
    (tmp_path / "history.csv").write_text(HISTORY)
    history = read_history(tmp_path / "history.csv")
    fig = curves_figure(history)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "learning rate"]
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert list(lines["train loss"].get_ydata()) == [1.2, 0.8, 0.5]
    val_loss = list(lines["val loss"].get_ydata())
    assert val_loss[:2] == [1.1, 0.9] and math.isnan(val_loss[2])
    assert list(lines["val acc"].get_xdata()) == [1, 2, 3]
    assert list(lines["lr"].get_ydata()) == [0.01, 0.005, 0.001] and fig.axes[2].get_yscale() == "log"

    # the column names train.py writes: train_accuracy / val_accuracy, plus extra columns
    (tmp_path / "history.csv").write_text(
        "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,img_per_s,seconds\n"
        "1,0.9,0.5,1.0,0.4,0.1,50,1\n2,0.7,0.6,0.8,0.7,0.1,51,1\n"
    )
    fig = curves_figure(read_history(tmp_path / "history.csv"))
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert list(lines["val accuracy"].get_ydata()) == [0.4, 0.7] and "img per s" not in lines

    (tmp_path / "history.csv").write_text("epoch,train_loss,val_loss\n1,0.9,1.0\n2,0.7,0.8\n")
    fig = curves_figure(read_history(tmp_path / "history.csv"))
    assert [ax.get_title() for ax in fig.axes] == ["loss"]  # no accuracy, no lr: one panel
    (tmp_path / "history.csv").write_text("epoch,train_loss\n")
    assert read_history(tmp_path / "history.csv") is None  # header only: no curves
    assert read_history(tmp_path / "absent.csv") is None


def test_report_with_history_stages_and_a_mistake_whose_image_is_gone(trained, tmp_path):
    run, _ = trained
    run2 = copy_run(run, tmp_path / "run2")
    (run2 / "history.csv").write_text(HISTORY)
    metrics = json.loads((run2 / "metrics.json").read_text())
    metrics["stages"] = STAGES
    (run2 / "metrics.json").write_text(json.dumps(metrics))
    config = json.loads((run2 / "config.json").read_text())
    config["tap"] = "stage3"
    config["data"]["root"] = str(tmp_path / "moved-away")  # thumbnails cannot be read any more
    (run2 / "config.json").write_text(json.dumps(config))
    preds = json.loads((run2 / "predictions.json").read_text())
    preds[0]["pred"] = next(c for c in CLASSES if c != preds[0]["label"])
    (run2 / "predictions.json").write_text(json.dumps(preds))

    out = write_report(run2)
    page = Page(out.read_text(encoding="utf-8"))
    assert "Stage probe" in page.headings
    stage_rows = page.table_with("stage")[1:]
    assert [(r[0], float(r[1]), int(r[2])) for r in stage_rows] == [
        (s["stage"], s["accuracy"], s["dim"]) for s in STAGES
    ]
    assert page.chosen_rows == [["stage3", "0.8300", "40"]]
    assert "no history.csv" not in out.read_text(encoding="utf-8")
    assert any(h.startswith("Most confident mistakes (1") for h in page.headings)
    names = sorted(p.name for p in (run2 / "figures").iterdir())
    assert names == ["confusion-val.svg", "curves.png", "mistakes-val.svg", "reliability-val.svg"]
    images = page.images()
    assert len(images) == 4
    assert sum(src.startswith("data:image/png;base64,") for src in images) == 1  # the curves
    png_from_data_uri(next(src for src in images if src.startswith("data:image/png")))
    figures = [svg_from_data_uri(src) for src in images if not src.startswith("data:image/png")]
    mistakes = parse_svg((run2 / "figures" / "mistakes-val.svg").read_text(encoding="utf-8"))
    assert all_text(mistakes).count("image unavailable") == 1 and not list(mistakes.iter(f"{SVG}image"))
    assert len(figures) == 3


def test_a_plotting_failure_never_loses_the_run(tmp_path, monkeypatch, make_folder):
    import finetune.app.report

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(finetune.app.report, "write_report", broken)
    data = make_folder({"red": 4, "blue": 4})
    res = invoke("run", data, "--out", tmp_path / "runs", "--set", "image_size=64")
    assert res.exit_code == 0, res.output
    assert "report.html not written (RuntimeError: no fonts today)" in res.output
    run = next((tmp_path / "runs").iterdir())
    for name in ("model.safetensors", "config.json", "metrics.json", "predictions.json", "problems.json"):
        assert (run / name).is_file(), name
    assert not (run / "report.html").exists()


# --------------------------------------------------------------------------- the SVG figures themselves

ODD_CLASS = 'a<b&"c"\''  # every character XML escapes


def test_mistakes_svg_thumbnails_captions_and_escaping(tmp_path):
    wide = tmp_path / "ünï-日本 €.png"  # non-ASCII file name
    Image.new("RGB", (300, 200), (200, 30, 30)).save(wide)
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (30, 30, 200)).save(small)
    rows = [
        {"path": f"x/{wide.name}", "label": ODD_CLASS, "pred": "green", "score": 0.93},
        {"path": "x/small.png", "label": "green", "pred": ODD_CLASS, "score": 0.5},
        {"path": "x/gone.png", "label": "red", "pred": "green", "score": 0.4},  # deleted since the run
        {"path": "x/bad\x01name\udcff.png", "label": "red", "pred": "blue", "score": 0.3},  # XML-illegal
        {"path": "x/small.png", "label": "red", "pred": "blue", "score": 0.2},
        {"path": "x/small.png", "label": "red", "pred": "blue", "score": 0.1},
    ]
    paths = [wide, small, tmp_path / "gone.png", tmp_path / "missing", small, small]
    picks = list(zip(paths, rows, strict=True))
    text = mistakes_svg(picks, "probability")
    root = parse_svg(text)
    assert mistakes_svg(picks, "probability") == text  # same input, same bytes

    # one <image> per readable file, "image unavailable" for each of the other two
    images = list(root.iter(f"{SVG}image"))
    assert len(images) == 4
    assert all_text(root).count("image unavailable") == 2
    thumbs = [png_of_href(el) for el in images]
    # longest side 128 px: 300x200 -> 128x85 (200 * 128 / 300 = 85.3); a smaller image is not enlarged
    assert sorted(t.size for t in thumbs) == [(32, 32)] * 3 + [(128, 85)]
    big = next(t for t in thumbs if t.size == (128, 85))
    assert np.abs(np.asarray(big, float).mean(axis=(0, 1)) - (200, 30, 30)).max() < 2  # the wide file

    # three caption lines per pick, text as written (ElementTree undoes the escaping)
    texts = all_text(root)
    for line in (wide.name, f"true {ODD_CLASS}", "pred green (p 0.93)", f"pred {ODD_CLASS} (p 0.50)"):
        assert line in texts, line
    assert "bad\ufffdname\ufffd.png" in texts  # control character and undecodable byte replaced
    # at most 4 columns: 6 picks make a 4 + 2 grid
    cells = root.findall(f".//{SVG}g[@class='mistake']")
    assert len(cells) == 6
    firsts = [c.find(f"{SVG}text") for c in cells]
    assert len({t.get("x") for t in firsts}) == 4 and len({t.get("y") for t in firsts}) == 2

    svm = parse_svg(mistakes_svg([(wide, {**rows[0], "score": 1.2})], "score"))  # an SVM's decision score
    assert "pred green (score 1.20)" in all_text(svm)


def test_confusion_svg_escapes_class_names():
    names = [ODD_CLASS, "béta", "日本"]
    text = confusion_svg(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]), names, f"confusion {ODD_CLASS}")
    root = parse_svg(text)
    assert ["".join(t.itertext()) for t in by_position(group(root, "ylabels"))] == names
    assert ["".join(t.itertext()) for t in group(root, "xlabels")] == names
    assert f"confusion {ODD_CLASS}" in all_text(root)
    assert root.find(f"{SVG}title").text == f"confusion {ODD_CLASS}"


def test_probe_report_does_not_import_matplotlib(trained, tmp_path):
    """A probe run has no history.csv: its report is written without matplotlib (nor sklearn)."""
    run, _ = trained
    run2 = copy_run(run, tmp_path / "run2")
    preds = json.loads((run2 / "predictions.json").read_text())
    preds[0]["pred"] = next(c for c in CLASSES if c != preds[0]["label"])  # a mistake: its grid too
    (run2 / "predictions.json").write_text(json.dumps(preds))
    code = (
        "import sys; from finetune.app.report import write_report; write_report(sys.argv[1]); "
        "heavy = [m for m in ('matplotlib', 'sklearn') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    res = subprocess.run([sys.executable, "-c", code, str(run2)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    names = sorted(p.name for p in (run2 / "figures").iterdir())
    assert names == ["confusion-val.svg", "mistakes-val.svg", "reliability-val.svg"]
    assert len(Page((run2 / "report.html").read_text(encoding="utf-8")).images()) == 3


# --------------------------------------------------------------------------- a real browser


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Injected into a copy of the report only (the report itself has no script): records how many
# images failed to decode, so --dump-dom can tell a rendered page from one with broken images.
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken", String(broken));
});
</script></body>"""


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")  # module scope: set up before the module-scoped `trained`
def browser() -> str:
    """Path of a Chromium-family browser; the test is skipped (before any run is trained) without one."""
    path = find_browser()
    if path is None:
        pytest.skip("no chromium / google-chrome on PATH")
    return path


@pytest.mark.browser
def test_report_renders_in_headless_chromium(browser, trained, tmp_path):
    run, _ = trained
    run2 = copy_run(run, tmp_path / "run2")
    (run2 / "history.csv").write_text(HISTORY)
    report = write_report(run2)
    n_images = len(Page(report.read_text(encoding="utf-8")).images())

    shot = tmp_path / "shot.png"
    res = _chromium(
        browser, tmp_path / "profile1", "--window-size=1200,2000", f"--screenshot={shot}", report.as_uri()
    )
    assert res.returncode == 0, res.stderr[-2000:]
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == [], console  # no console errors or warnings from the page
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert pixels.std() > 10 and colours > 50  # text and figures, not a blank page

    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE), encoding="utf-8")
    res = _chromium(
        browser, tmp_path / "profile2", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()
    )
    assert res.returncode == 0, res.stderr[-2000:]
    dom = Page(res.stdout)
    body = next(a for t, a in dom.tags if t == "body")
    assert body.get("data-images") == str(n_images) and n_images >= 3
    assert body.get("data-broken") == "0"
    for heading in HEADINGS:
        assert heading in dom.headings
