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
from tests.test_fetch import net as net  # the loopback Hub and URL host (a fixture)

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


# --------------------------------------------------------------------------- every place weights come from


def _armed_bytes(marker: Path) -> bytes:
    """A torch.save file with test_resnet's first tensor name, whose unpickling creates `marker`."""
    import io

    buf = io.BytesIO()
    torch.save({"conv1.0.weight": torch.zeros(1), "x": _Evil(marker)}, buf)
    return buf.getvalue()


def _refused(args: list[str], marker: Path, *needles: str) -> str:
    line = one_line_error(runner.invoke(app, args), *needles)
    assert not marker.exists()
    return line


@pytest.fixture
def armed_env(net, image_folder, tmp_path, monkeypatch):  # noqa: F811 (pytest passes the fixture)
    """A machine with the loopback Hub/URL host (tests/test_fetch.py), torch told to allow pickles."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return (
        net,
        image_folder,
        ["--out", str(tmp_path / "runs"), "--workers", "0", "--no-cache", "--set", "image_size=32"],
    )


def test_armed_pickle_as_packaged_weights_is_refused(armed_env, marker, tmp_path, monkeypatch):
    import dataclasses

    from finetune.models import weights

    _, data, common = armed_env
    (tmp_path / "lite0.pth").write_bytes(_armed_bytes(marker))
    provider = dataclasses.replace(
        weights.PACKAGED["tf_efficientnet_lite0"], locate=lambda m: str(tmp_path / "lite0.pth")
    )
    monkeypatch.setitem(weights.PACKAGED, "tf_efficientnet_lite0", provider)
    _refused(["run", str(data), "--backbone", "lite0", *common], marker, "refused to load lite0.pth")


def test_armed_pickle_in_the_hugging_face_cache_is_refused(armed_env, marker):
    """Planted where a download lands, under its true sha256 (the ETag check passes): the reader refuses."""
    import hashlib

    from finetune.models.catalogue import resolve
    from finetune.models.fetch import hf_cache_dir, published

    _, data, common = armed_env
    blob = _armed_bytes(marker)
    repo = published(resolve("test_resnet")).repo
    root = Path(hf_cache_dir()) / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("a" * 40)
    (root / "blobs").mkdir()
    (root / "blobs" / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    (root / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (root / "snapshots" / ("a" * 40) / "pytorch_model.bin").symlink_to(
        root / "blobs" / hashlib.sha256(blob).hexdigest()
    )
    args = ["run", str(data), "--backbone", "test_resnet", "--offline", *common]
    _refused(args, marker, "refused to load pytorch_model.bin")
    # The same bytes named model.safetensors are no safetensors file: refused too.
    (root / "snapshots" / ("a" * 40) / "model.safetensors").write_bytes(blob)
    _refused(args, marker, "refused to load model.safetensors")


def test_armed_pickle_served_by_the_hub_is_refused(armed_env, marker):
    from finetune.models.catalogue import resolve
    from finetune.models.fetch import published

    server, data, common = armed_env
    repo = published(resolve("test_resnet")).repo
    server.hub[(repo, "pytorch_model.bin")] = _armed_bytes(marker)  # no model.safetensors in this repo
    _refused(
        ["run", str(data), "--backbone", "test_resnet", *common], marker, "refused to load pytorch_model.bin"
    )


def test_armed_pickle_in_the_torch_hub_cache_is_refused(armed_env, marker, monkeypatch):
    """The issue's example: a pickle at $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth."""
    import hashlib

    from finetune.models.fetch import torch_hub_dir
    from tests.test_fetch import tv_publish

    server, data, common = armed_env
    common = [a.replace("image_size=32", "image_size=64") for a in common]  # AlexNet accepts 63 px and up
    checkpoints = Path(torch_hub_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True)
    blob = _armed_bytes(marker)
    (checkpoints / "alexnet-owt-7be5be79.pth").write_bytes(blob)
    args = ["run", str(data), "--backbone", "alexnet", "--offline", *common]
    _refused(args, marker, "alexnet-owt-7be5be79.pth", "does not match")
    # Under a name whose hash prefix it does match, it reaches the reader: refused there.
    name = f"alexnet-{hashlib.sha256(blob).hexdigest()[:8]}.pth"
    (checkpoints / name).write_bytes(blob)
    tv_publish(server, monkeypatch, "alexnet", blob, name)
    _refused(args, marker, f"refused to load {name}")


def test_armed_pickle_served_at_a_url_is_refused(armed_env, marker, monkeypatch):
    from tests.test_fetch import tv_publish

    server, data, common = armed_env
    name = tv_publish(server, monkeypatch, "squeezenet1_1", _armed_bytes(marker))  # its true hash prefix
    _refused(["run", str(data), "--backbone", "tv:squeezenet1_1", *common], marker, f"refused to load {name}")


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


def test_no_framework_loader_that_unpickles_is_called():
    """torchvision's weights loader and torch.hub's unpickle with weights_only=False; timm's hub loader
    is ours to replace too: nothing in the package calls them, and torchvision builds with weights=None."""
    for banned in (
        "get_state_dict",
        "load_state_dict_from_url",
        "load_state_dict_from_hf",
        "load_pretrained",
    ):
        found = [f"{f}:{n.lineno}" for f, n in _calls(banned)]
        assert not found, (banned, found)
    for fname, node in _calls("get_model"):
        assert _keyword(node, "weights") is None, f"{fname}:{node.lineno} builds torchvision with weights"
