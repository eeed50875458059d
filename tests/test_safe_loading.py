"""Nothing a stranger hands us runs code: crafted pickles are refused with one line, and every
loader in the package is pinned to a non-pickle path (checked in the source itself).

The crafted files call `os.system("touch MARKER")` when unpickled; every test also checks the
marker was never created, so "refused" means "refused before any code ran".
"""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import finetune
from finetune.cli import app
from finetune.errors import WeightsError
from finetune.models.weights import read_state_dict
from tests.conftest import one_line_error

runner = CliRunner()
TINY = ["--backbone", "test_efficientnet", "--no-pretrained"]


class _Evil:
    """Unpickling this runs a shell command (that is what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture(params=["torch-zip", "raw-pickle"])
def evil_file(request, tmp_path, marker) -> Path:
    """A weights file whose unpickling would create `marker`: torch.save's zip format, or a bare pickle."""
    path = tmp_path / "evil.pt"
    payload = {"conv_stem.weight": torch.zeros(1), "x": _Evil(marker)}
    if request.param == "torch-zip":
        torch.save(payload, path)  # torch.save pickles _Evil via its __reduce__: os.system(...)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def test_the_crafted_file_is_really_armed(tmp_path, marker):
    """Without weights_only the payload runs: so refusing it below means something."""
    path = tmp_path / "armed.pkl"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    pickle.loads(path.read_bytes())  # noqa: S301 — the point of the test
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("force_env", [False, True], ids=["plain", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_pickle_in_weights_is_refused_with_one_line(
    force_env, evil_file, marker, image_folder, tmp_path, monkeypatch
):
    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    res = runner.invoke(
        app,
        [
            "run",
            str(image_folder),
            *TINY[:2],
            "--weights",
            str(evil_file),
            "--out",
            str(tmp_path / "runs"),
            "--workers",
            "0",
            "--set",
            "image_size=32",
        ],
    )
    one_line_error(res, "refused to load evil.pt")
    assert not marker.exists()


def test_read_state_dict_refuses_even_when_torch_is_told_to_allow_pickles(evil_file, marker, tmp_path):
    """A fresh interpreter with the env var set from the start (torch reads it at load time)."""
    code = (
        "import sys\nfrom finetune.models.weights import read_state_dict\n"
        "from finetune.errors import WeightsError\n"
        "try:\n    read_state_dict(sys.argv[1])\nexcept WeightsError as e:\n    print('REFUSED', e)\n"
    )
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(evil_file)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.startswith("REFUSED"), out.stdout + out.stderr
    assert not marker.exists()


def test_a_plain_state_dict_still_loads(tmp_path, monkeypatch):
    """weights_only=True is not 'refuse everything': tensors saved by torch.save load fine."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "ok.pt"
    torch.save({"state_dict": {"module.a": torch.arange(3.0)}}, path)
    state = read_state_dict(path)
    assert list(state) == ["a"] and torch.equal(state["a"], torch.arange(3.0))
    with pytest.raises(WeightsError):
        read_state_dict(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from tests.conftest import write_images

    data = tmp_path_factory.mktemp("safe") / "data"
    write_images(data / "a", 0, 4, 16)
    write_images(data / "b", 1, 4, 16)
    out = tmp_path_factory.mktemp("safe-runs")
    res = runner.invoke(
        app, ["run", str(data), *TINY, "--out", str(out), "--set", "image_size=32", "--workers", "0"]
    )
    assert res.exit_code == 0, res.output
    return next(out.iterdir())


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_pickle_as_a_run_model_is_refused_with_one_line(fmt, run_dir, tmp_path, marker, monkeypatch):
    import shutil

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    payload = {"x": _Evil(marker)}
    if fmt == "torch-zip":
        torch.save(payload, run / "model.safetensors")
    else:
        (run / "model.safetensors").write_bytes(pickle.dumps(payload))
    from tests.conftest import write_images

    img = write_images(tmp_path / "imgs", 0, 1, 16)[0]
    res = runner.invoke(app, ["predict", str(img), "--run", str(run)])
    one_line_error(res, "model.safetensors")
    assert not marker.exists()


def test_pickle_in_a_features_file_is_refused_with_one_line(tmp_path, marker):
    import typer.main

    if "probe" not in typer.main.get_command(app).commands:
        pytest.skip("no `probe` command in this build")
    path = tmp_path / "feats.npz"
    np.savez(path, pool=np.zeros((4, 3), np.float32), labels=np.array([_Evil(marker)] * 4, dtype=object))
    res = runner.invoke(app, ["probe", str(path)])
    one_line_error(res)
    assert not marker.exists()


# --------------------------------------------------------------------------- the source itself


def _calls(name_suffix: str):
    """(file, call node) for every call whose dotted name ends with `name_suffix` in finetune/."""
    root = Path(finetune.__file__).parent
    for py in sorted(root.rglob("*.py")):
        tree = ast.parse(py.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name == name_suffix or name.endswith("." + name_suffix):
                    yield py.name, node


def _keyword(node: ast.Call, key: str):
    for kw in node.keywords:
        if kw.arg == key:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a constant>"
    return "<missing>"


def test_every_torch_load_passes_weights_only_true_explicitly():
    calls = list(_calls("torch.load"))
    assert calls, "expected at least the one in weights.read_state_dict"
    for fname, node in calls:
        assert _keyword(node, "weights_only") is True, (
            f"{fname}:{node.lineno} torch.load without weights_only=True"
        )


def test_every_np_load_refuses_pickles():
    for fname, node in _calls("np.load"):
        assert _keyword(node, "allow_pickle") is False, (
            f"{fname}:{node.lineno} np.load without allow_pickle=False"
        )


def test_no_unpickling_or_unfiltered_archive_extraction_anywhere():
    for banned in (
        "pickle.load",
        "pickle.loads",
        "joblib.load",
        "dill.load",
        "torch.jit.load",
        "marshal.loads",
    ):
        found = [f"{f}:{n.lineno}" for f, n in _calls(banned)]
        assert not found, (banned, found)
    for fname, node in _calls("extractall"):
        assert _keyword(node, "filter") in ("data", "tar"), (
            f"{fname}:{node.lineno} extractall without a safe filter"
        )
