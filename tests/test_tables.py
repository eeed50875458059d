"""What the console shows: aligned tables (rich), one unit for accuracy, advice with its margins, --help.

The commands run on two real probe runs of timm's tiny test_efficientnet (seeded weights given as
--weights, so features are cached) at two image sizes: the same network, tap and pooling, two
feature sets that differ only by input size.
"""

from __future__ import annotations

import re

import pytest
import torch

from finetune.app.advise import Advice, format_advice
from finetune.console import text_table
from finetune.probe.decaf import ProbeCell, ProbeTable
from tests.conftest import invoke, write_images

CLASSES = ("blue", "green", "red")


def columns(line: str) -> list[str]:
    """Cells of a table line: text separated by two or more spaces."""
    return re.split(r" {2,}", line.strip())


def spans(line: str) -> list[tuple[int, int]]:
    """(start, end) of each cell of a table line."""
    return [m.span() for m in re.finditer(r"\S+(?: \S+)*", line)]


def aligned(lines: list[str], i: int, right: bool) -> bool:
    """Cell i starts (left-aligned) or ends (right-aligned) at the same place on every line."""
    return len({spans(ln)[i][1 if right else 0] for ln in lines}) == 1


def table_lines(output: str, first_header: str) -> tuple[str, list[str]]:
    """(header line, body lines) of the table whose header starts with `first_header`."""
    lines = output.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith(first_header))
    assert set(lines[at + 1]) == {"─"}, lines[at + 1]  # a rule under the header
    body = []
    for ln in lines[at + 2 :]:
        if not ln.strip():
            break
        body.append(ln)
    return lines[at], body


# --------------------------------------------------------------------------- the table itself


def test_text_table_aligns_columns_and_shows_names_as_typed():
    text = text_table(["name", "accuracy"], [["[bold]cat", "0.9"], ["dog\x1b[2J", "1.0000"]], right=[1])
    header, rule, *rows = text.splitlines()
    assert columns(header) == ["name", "accuracy"] and set(rule) == {"─"}
    assert columns(rows[0]) == ["[bold]cat", "0.9"]  # not rich markup
    assert columns(rows[1])[0] == "dog\\x1b[2J"  # an escape sequence is printed, not obeyed
    assert (
        aligned(rows, 1, right=True) and aligned(rows, 0, right=False) and not aligned(rows, 1, right=False)
    )


def test_probe_table_prints_accuracy_from_0_to_1():
    cells = [ProbeCell("fc6", "logreg", [0.9, 0.95]), ProbeCell("fc6", "svm", [1.0, 1.0])]
    text = ProbeTable(["fc6"], ["logreg", "svm"], cells, 2, 0.2, 100, 2).format()
    title, header, _, row = text.splitlines()
    assert title.startswith("validation accuracy, mean ± std over 2") and "(%)" not in title
    assert columns(header) == ["layer", "logreg", "svm"]
    assert columns(row) == ["fc6", "0.9250 ± 0.0250", "1.0000 ± 0.0000"]  # by hand: mean, population std


# --------------------------------------------------------------------------- advise


def advice(images: float, familiarity: float) -> Advice:
    little, near = images < 200, familiarity >= 0.35
    strategy = {(True, True): "linear-probe", (True, False): "stage-probe"}.get(
        (little, near), "full-finetune"
    )
    return Advice(
        strategy, "why", f"finetune run d --strategy {strategy}", images, familiarity, 200, 0.35, 64
    )


def test_advise_shows_each_margin_and_says_when_the_call_is_close():
    text = format_advice(advice(40, 0.330))  # textures at 0.330 against 0.35
    header, body = table_lines(text, "measurement")
    assert columns(header) == ["measurement", "value", "threshold", "margin", "reads as"]
    data, fam = (columns(ln) for ln in body)
    assert data[1:] == ["40", "200", "-160", "little data"]
    assert fam[1:] == ["0.330", "0.35", "-0.020", "close: different from ImageNet"]
    (close,) = [ln for ln in text.splitlines() if ln.startswith("close call:")]
    assert "familiarity 0.330 is 0.020 from 0.35" in close and "linear-probe may do as well" in close
    assert "finetune compare DATA -s stage-probe -s linear-probe" in close
    assert "[x] stage-probe" in text and "[ ] linear-probe" in text

    far = format_advice(advice(40, 0.62))
    assert "close" not in far and "+0.270" in far
    both = format_advice(advice(180, 0.37))  # 20 below 200 (within 25 %) and 0.02 above 0.35
    (close,) = [ln for ln in both.splitlines() if ln.startswith("close call:")]
    assert "180 images per class is 20 from 200" in close and "partial-finetune or stage-probe" in close


# --------------------------------------------------------------------------- --help


def test_top_level_help_shows_every_command_description_whole():
    import typer.main

    from finetune.cli import app

    group = typer.main.get_command(app)
    res = invoke("--help")
    assert res.exit_code == 0
    shown = res.output[res.output.index("Commands:") :].splitlines()[1:]
    assert shown and not any(ln.rstrip().endswith("...") for ln in shown), shown
    for name, cmd in group.commands.items():
        subs = getattr(cmd, "commands", {}) or {}
        for c in (cmd, *subs.values()):
            first = (c.help or "").strip().split("\n")[0]
            # 45 characters leave room for a command name up to 27 characters at 80 columns
            assert first.endswith(".") and len(first) <= 45, (name, first)
    cache = invoke("cache", "--help").output
    assert "..." not in cache[cache.index("Commands:") :]


# --------------------------------------------------------------------------- runs, predict, cache


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Probes of one seeded test_efficientnet at 48 and 64 px; a private cache holding a demo dataset."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tables")
    for k, name in enumerate(CLASSES):
        write_images(root / "data" / name, k, 6)
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "w.safetensors"))
    cache = root / "cache"
    write_images(cache / "datasets" / "digits-png" / "0", 0, 2)  # what `finetune demo` keeps there
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(cache))
        for size in (48, 64):
            args = [
                "run",
                root / "data",
                "--backbone",
                "test_efficientnet",
                "--weights",
                root / "w.safetensors",
            ]
            res = invoke(*args, "--out", root / "runs", "--workers", "0", "--set", f"image_size={size}")
            assert res.exit_code == 0, res.output
    return root


def test_runs_is_a_table_with_aligned_accuracy(two_runs):
    import json

    res = invoke("runs", "--runs", two_runs / "runs")
    assert res.exit_code == 0, res.output
    header, body = table_lines(res.output, "run")
    assert columns(header) == ["run", "strategy", "tap", "classes", "split", "accuracy", "seconds", "note"]
    runs = sorted((two_runs / "runs").iterdir(), reverse=True)  # newest first
    assert [columns(ln)[0] for ln in body] == [r.name for r in runs]
    accs = [json.loads((r / "metrics.json").read_text())["val"]["accuracy"] for r in runs]
    assert [float(columns(ln)[5]) for ln in body] == pytest.approx(accs, abs=5e-5)
    assert aligned([header, *body], 5, right=True)


def test_predict_top_k_is_one_aligned_line_per_image(two_runs):
    """Streamed lines: every column before the path has a width known up front, so they align."""
    run = sorted((two_runs / "runs").iterdir())[-1]
    images = sorted((two_runs / "data" / "red").iterdir())[:3]
    res = invoke("predict", *images, "--run", run, "--top-k", "2")
    assert res.exit_code == 0, res.output
    header, body = table_lines(res.stdout, "class 1")
    assert columns(header) == ["class 1", "probability", "class 2", "probability", "image"]
    assert [columns(ln)[-1] for ln in body] == [str(p) for p in images]
    for ln in body:
        cells = columns(ln)
        assert cells[0] in CLASSES and cells[2] in CLASSES and cells[0] != cells[2]
        assert 1 >= float(cells[1]) >= float(cells[3]) >= 0
    for i, right in ((0, False), (1, True), (2, False), (3, True), (4, False)):
        assert aligned([header, *body], i, right)


def test_cache_info_tells_feature_sets_apart_and_clear_says_what_it_keeps(two_runs, monkeypatch):
    cache = two_runs / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    res = invoke("cache", "info")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0] == f"cache: {cache}"
    header, body = table_lines(res.stdout, "model")
    assert columns(header) == ["model", "weights sha256", "size", "decoder", "tap", "pool", "images", "MiB"]
    rows = [columns(ln) for ln in body]
    assert (
        len(rows) == 2 and {r[0] for r in rows} == {"test_efficientnet"} and {r[4] for r in rows} == {"pool"}
    )
    assert sorted(int(r[2]) for r in rows) == [48, 64]  # what tells the two apart
    assert all(int(r[6]) == 18 for r in rows)
    _, parts = table_lines(res.stdout, "folder")
    kept = {columns(ln)[0]: columns(ln)[-1] for ln in parts}
    assert kept == {
        "engines/": "cleared",
        "trunks/": "cleared",
        "backbones/": "cleared",
        "heads/": "cleared",
        "checked/": "cleared",
        "datasets/": "kept",
    }
    datasets = next(columns(ln) for ln in parts if ln.startswith("datasets/"))
    assert datasets[1] == "demo datasets" and datasets[2] == "2"

    res = invoke("cache", "clear")
    assert res.exit_code == 0, res.output
    assert "kept datasets/ (demo datasets: 2 files" in res.stdout
    assert len(list((cache / "datasets").rglob("*.png"))) == 2 and not (cache / "features").exists()
