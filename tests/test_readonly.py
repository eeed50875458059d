"""No command writes inside the data folder: sha256 of every file and every folder listing are unchanged.

The folder is the bad-data catalogue mixed with good images (links, loops, odd names included),
so the promise is tested where it is hardest to keep.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from tests.badfiles import build_mixed_folder
from tests.conftest import tree_digest

runner = CliRunner()
TINY = ["--backbone", "test_efficientnet", "--no-pretrained"]


def _commands() -> set[str]:
    import typer.main

    return set(typer.main.get_command(app).commands)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_mixed_folder(tmp_path_factory.mktemp("ro") / "data")


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ro-runs")
    res = runner.invoke(
        app, ["run", str(data), *TINY, "--out", str(out), "--set", "image_size=32", "--workers", "0"]
    )
    assert res.exit_code == 0, res.output
    return next(out.iterdir())


COMMANDS = {
    "check": lambda data, run, out: ["check", str(data)],
    "check --json": lambda data, run, out: ["check", str(data), "--json", "--decoder", "pil"],
    "run": lambda data, run, out: [
        "run",
        str(data),
        *TINY,
        "--out",
        str(out),
        "--set",
        "image_size=32",
        "--workers",
        "0",
    ],
    "extract-features": lambda data, run, out: [
        "extract-features",
        str(data),
        *TINY,
        "--workers",
        "0",
        "-o",
        str(out / "feats.npz"),
    ],
    "predict": lambda data, run, out: ["predict", str(data), "--run", str(run)],
    "predict --json": lambda data, run, out: ["predict", str(data / "2"), "--run", str(run), "--json"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_leaves_the_data_folder_untouched(name, data, run_dir, tmp_path):
    command = name.split()[0]
    if command not in _commands():
        pytest.skip(f"no `{command}` command in this build")
    before = tree_digest(data)
    res = runner.invoke(app, COMMANDS[name](data, run_dir, tmp_path))
    assert res.exit_code == 0, res.output
    after = tree_digest(data)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:5]


def test_the_digest_sees_a_change(data, tmp_path):
    """The guard itself can fail: a new file, a rewritten byte and a touched listing all show."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data, copy, symlinks=True)
    before = tree_digest(copy)
    (copy / "2" / "new.txt").write_text("x")
    assert tree_digest(copy) != before
    (copy / "2" / "new.txt").unlink()
    assert tree_digest(copy) == before
    blob = bytearray((copy / "10" / "img_000.png").read_bytes())
    blob[-1] ^= 1
    (copy / "10" / "img_000.png").write_bytes(bytes(blob))
    assert tree_digest(copy) != before
