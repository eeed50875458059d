"""report.html: self-contained, complete, drawn from the run folder's files; and a real browser renders it.

One real run of the packaged lite0 at 64 px (module fixture); other variants are copies of
its folder with hand-written history.csv / stages / predictions / config, re-rendered by
write_report. Figures are compared with the bytes of the figure functions on references
computed here (sklearn, hand-written key lists); the figures themselves are tested in
test_figures.py. The browser test opens the report of a probe and of a fine-tune run in
headless Chromium (`.ci/run` installs it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune.app.figures import confusion_figure, curves_figure, figure_bytes, figure_size_px, read_history
from finetune.app.report import write_report
from tests.conftest import invoke, write_images
from tests.test_figures import SVG, check_svg

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


def data_uri_bytes(src: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a base64 data: URI."""
    head, _, data = src.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), head[:60]
    return head[5:-7], base64.b64decode(data, validate=True)


def image_size(mime: str, blob: bytes) -> tuple[int, int]:
    """The size a browser gives the image: PNG pixels, or an SVG's width/height (pt) in CSS px."""
    if mime == "image/png":
        with Image.open(io.BytesIO(blob)) as im:
            return im.size
    assert mime == "image/svg+xml", mime
    root = check_svg(blob)
    return tuple(round(float(root.get(a).removesuffix("pt")) * 4 / 3) for a in ("width", "height"))


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
    assert not (run / "curves.png").exists()

    saved = {p.name: p.read_bytes() for p in (run / "figures").iterdir()}
    assert sorted(saved) == ["confusion-val.svg", "reliability-val.svg"]
    images = [data_uri_bytes(src) for src in page.images()]
    assert [m for m, _ in images] == ["image/svg+xml"] * 2
    assert [b for _, b in images] == [saved["confusion-val.svg"], saved["reliability-val.svg"]]
    for _, blob in images:
        root = check_svg(blob)  # a standalone SVG: no script, nothing linked
        assert len(list(root.iter(f"{SVG}path"))) > 20  # marks and glyphs, not a blank canvas
    # nothing outside the file: no external URL, no script, no stylesheet or frame to fetch
    assert "http://" not in text and "https://" not in text and "url(" not in text
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for name in ("src", "href", "srcset", "data"):
            value = attrs.get(name)
            assert value is None or value.startswith("data:"), (tag, name, value[:80])
    write_report(run)  # the same files give the same page, byte for byte
    assert (run / "report.html").read_text(encoding="utf-8") == text


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
    expected = figure_bytes(confusion_figure(cm, list(CLASSES), "confusion matrix (val)"), "svg")
    saved = (run / "figures" / "confusion-val.svg").read_bytes()
    assert saved == expected
    wrong = figure_bytes(confusion_figure(cm[::-1], list(CLASSES), "confusion matrix (val)"), "svg")
    assert wrong != expected  # the comparison can fail


# --------------------------------------------------------------------------- history, stages, mistakes

HISTORY = (
    "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,img_per_s,seconds\n"
    "1,1.20,0.40,1.10,0.50,0.01,50,2.0\n"
    "2,0.80,0.70,0.90,0.60,0.005,51,2.1\n"
    "3,0.50,0.85,0.70,0.75,0.001,52,2.0\n"
)
STAGES = [
    {"stage": "stage1", "accuracy": 0.61, "dim": 16},
    {"stage": "stage3", "accuracy": 0.83, "dim": 40},
    {"stage": "pool", "accuracy": 0.78, "dim": 1280},
]


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
    assert names == ["confusion-val.svg", "mistakes-val.svg", "reliability-val.svg"]
    # the one training-curves figure: the run folder's curves.png, shown in the page as it is
    images = [data_uri_bytes(src) for src in page.images()]
    assert [m for m, _ in images].count("image/png") == 1 and len(images) == 4
    png = next(b for m, b in images if m == "image/png")
    assert png == (run2 / "curves.png").read_bytes()
    fig = curves_figure(read_history(run2 / "history.csv"), 0.0, 3)
    assert image_size("image/png", png) == figure_size_px(fig) and png == figure_bytes(fig, "png")
    mistakes = check_svg((run2 / "figures" / "mistakes-val.svg").read_bytes())
    assert not list(mistakes.iter(f"{SVG}image"))  # the image is gone: no thumbnail, its caption stays


# The recipe keys each method reads, listed by hand from probe/ and train/ (not from report.py).
PROBE_USES = [
    "name",
    "description",
    "method",
    "head",
    "c_grid",
    "layer",
    "pool",
    "batch_size",
    "image_size",
    "seed",
]
FINETUNE_NEVER = {"head", "layer"}


def test_recipe_section_lists_only_the_keys_the_method_uses(trained, tmp_path):
    run, _ = trained
    page = Page((run / "report.html").read_text(encoding="utf-8"))
    recipe = json.loads((run / "config.json").read_text())["recipe"]
    shown = [row[0] for row in page.table_with("key")[1:]]
    assert shown == [k for k in recipe if k in PROBE_USES] == PROBE_USES
    assert len(recipe) > len(shown) and "lr" not in shown and "epochs" not in shown
    setting = dict(row for row in page.table_with("setting")[1:])
    assert setting["head"].startswith("logistic regression")

    # the same run as a fine-tune would record it: no probe head, no tap; LP-FT's keys only with it
    run2 = copy_run(run, tmp_path / "ft")
    config = json.loads((run2 / "config.json").read_text())
    config.update(strategy="partial-finetune", head_kind="finetune")
    config["recipe"].update(
        method="finetune", name="partial-finetune", init_head="random", label_smoothing=0.1
    )
    (run2 / "config.json").write_text(json.dumps(config))
    page = Page(write_report(run2).read_text(encoding="utf-8"))
    shown = [row[0] for row in page.table_with("key")[1:]]
    assert not FINETUNE_NEVER & set(shown) and {"lr", "epochs", "label_smoothing", "lr_mult"} <= set(shown)
    assert "c_grid" not in shown  # the head starts at random: no probe fit, no C grid
    setting = dict(row for row in page.table_with("setting")[1:])
    assert setting["head"] == "linear layer, trained with the network" and "logreg" not in setting["head"]
    config["recipe"]["init_head"] = "probe"  # LP-FT fits its starting head with the C grid
    (run2 / "config.json").write_text(json.dumps(config))
    shown = [row[0] for row in Page(write_report(run2).read_text(encoding="utf-8")).table_with("key")[1:]]
    assert "c_grid" in shown and "head" not in shown


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


# --------------------------------------------------------------------------- a real browser

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: a fetch out of the page could not succeed
    "--enable-logging=stderr",
    "--v=0",
)


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Injected into a copy of the report only (the report itself has no script). The policy lets the
# page load nothing but data: images and its own inline style; every attempt to fetch anything
# else is a violation the page records. On load it writes what Chromium decoded of each image,
# and every resource Chromium fetched, into <body data-probe="...">, which --dump-dom prints.
PROBE_HEAD = (
    '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
    "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
    "<script>window.blocked = []; document.addEventListener('securitypolicyviolation', "
    "e => window.blocked.push(e.blockedURI));</script>"
)
PROBE_BODY = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  const fetched = performance.getEntriesByType("resource").map(e => e.name);
  document.body.dataset.probe = JSON.stringify({images, fetched, blocked: window.blocked});
});
</script></body>"""


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir()  # a new, empty profile: nothing cached, nothing synced
    cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")  # module scope: set up before the module-scoped runs
def browser() -> str:
    """Path of a Chromium-family browser; the test is skipped (before any run is trained) without one."""
    path = find_browser()
    if path is None:
        pytest.skip("no chromium / google-chrome on PATH (.ci/run installs Debian's chromium)")
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A real 1-epoch partial fine-tune of timm's tiny test_resnet (random init) on three classes."""
    from tests.test_train import tiny_run_args

    root = tmp_path_factory.mktemp("finetuned")
    for k, name in enumerate(CLASSES):
        write_images(root / "data" / name, k, 6)
    args = tiny_run_args(root / "data", root / "runs", "partial-finetune", "epochs=1", "init_head=random")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return next((root / "runs").iterdir())


def render(browser: str, report: Path, tmp: Path, name: str) -> tuple[dict, Path, list[str]]:
    """Open a copy of report.html, with the probe, in headless Chromium: (what the page saw, its
    screenshot under `tmp`, console lines). One browser start does both (about 2 s here).
    """
    text = report.read_text(encoding="utf-8")
    probe = tmp / f"{name}-probe.html"
    probe.write_text(text.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY), "utf-8")
    shot = tmp / f"{name}.png"
    args = ("--virtual-time-budget=5000", "--window-size=1200,2400", f"--screenshot={shot}", "--dump-dom")
    res = _chromium(browser, tmp / f"{name}-profile", *args, probe.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    body = next(a for t, a in Page(res.stdout).tags if t == "body")
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    return json.loads(body["data-probe"]), shot, console


@pytest.mark.browser
def test_reports_render_in_headless_chromium(browser, trained, finetuned, tmp_path):
    for name, run in (("probe", trained[0]), ("finetune", finetuned)):
        report = run / "report.html"
        expected = [image_size(*data_uri_bytes(src)) for src in Page(report.read_text("utf-8")).images()]
        mimes = [data_uri_bytes(src)[0] for src in Page(report.read_text("utf-8")).images()]
        assert mimes.count("image/svg+xml") >= 2 and mimes.count("image/png") == (
            name == "finetune"
        )  # curves
        seen, shot, console = render(browser, report, tmp_path, name)
        assert console == [], console  # no console errors or warnings from the page
        # every figure decoded, at the size its file declares (a broken image is 0 x 0)
        assert [(w, h) for done, w, h in seen["images"]] == expected, name
        assert all(done and w > 200 and h > 200 for done, w, h in seen["images"])
        assert seen["fetched"] == [] and seen["blocked"] == []  # nothing loaded from outside the page
        with Image.open(shot) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.shape[:2] == (2400, 1200)
        packed = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1])  # (H, W) one int per colour
        colours = len(np.unique(packed))
        assert pixels.std() > 10 and colours > 50  # text and figures, not a blank page


def test_the_browser_probe_sees_a_broken_image_and_a_fetch(browser, tmp_path):
    """The checks above can fail: a page with a broken image and an external picture is caught."""
    page = tmp_path / "bad.html"
    good = base64.b64encode(
        figure_bytes(curves_figure({"epoch": np.array([1.0]), "lr": np.array([0.1])}), "png")
    )
    page.write_text(
        "<!DOCTYPE html><html><head><title>x</title></head><body>"
        f'<img src="data:image/png;base64,{good.decode()}">'
        '<img src="data:image/png;base64,AAAA">'  # not a PNG
        '<img src="https://example.invalid/x.png"></body></html>',
        encoding="utf-8",
    )
    seen, _, _ = render(browser, page, tmp_path, "bad")
    sizes = [(w, h) for _, w, h in seen["images"]]
    assert sizes[0] == (420, 340) and sizes[1] == (0, 0)
    assert any("example.invalid" in u for u in seen["blocked"] + seen["fetched"])
