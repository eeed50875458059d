"""Shared fixtures: tiny image folders made in code, and a guard that data folders stay untouched.

def test_x(image_folder):            # tmp/<data>/{red,blue}/*.png, 6 images per class
def test_y(make_folder):             # make_folder({"a": 3, "b": 2}, size=24, layout="split")
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("FINETUNE_PROGRESS", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Distinct, easily separable class looks: (base colour, stripe orientation).
_LOOKS = [
    ((220, 40, 40), 0),
    ((40, 60, 220), 1),
    ((40, 200, 60), 0),
    ((230, 200, 40), 1),
    ((150, 40, 200), 0),
]


def class_image(k: int, i: int, size: int = 32) -> np.ndarray:
    """An RGB (size, size, 3) uint8 image of class k, variant i: coloured stripes plus noise."""
    rng = np.random.default_rng(1000 * k + i)
    colour, vertical = _LOOKS[k % len(_LOOKS)]
    img = np.empty((size, size, 3), np.float64)
    img[:] = colour
    stripes = (np.arange(size) // max(2, size // 8 + (k // len(_LOOKS)))) % 2
    mask = stripes[None, :] if vertical else stripes[:, None]
    img *= 0.55 + 0.45 * np.broadcast_to(mask, (size, size))[..., None]
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(
    folder: Path, k: int, n: int, size: int = 32, start: int = 0, ext: str = ".png"
) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        p = folder / f"img_{i:03d}{ext}"
        Image.fromarray(class_image(k, i, size)).save(p)
        out.append(p)
    return out


@pytest.fixture(autouse=True)
def _signal_handlers_given_back():
    """Each test starts with the signal handlers and mask the session had: a handler left behind
    (a training loop's, an ignored SIGINT) would change what Ctrl-C does in every later test. One
    left behind is put back and reported as a warning naming the test."""
    import signal
    import warnings

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    after = {s: signal.getsignal(s) for s in before}
    blocked_after = signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    for s in before:
        signal.signal(s, before[s])
    if after != before or blocked_after != blocked:
        warnings.warn(f"signal handlers or mask left changed: {after}, blocked {blocked_after}", stacklevel=1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Every test session gets its own feature/engine cache, never the user's."""
    old = os.environ.get("FINETUNE_CACHE")
    os.environ["FINETUNE_CACHE"] = str(tmp_path_factory.mktemp("finetune-cache"))
    yield
    if old is None:
        os.environ.pop("FINETUNE_CACHE", None)
    else:
        os.environ["FINETUNE_CACHE"] = old


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own (FINETUNE_CACHE), whose unwritable-cache line is said afresh."""
    import finetune.io

    root = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(root))
    monkeypatch.setattr(finetune.io, "_UNWRITABLE", set())
    return root


@pytest.fixture
def make_folder(tmp_path):
    """Factory: make_folder({"red": 6, "blue": 6}, size=32, layout="class"|"split", name="data")."""

    def make(
        classes: dict[str, int] | None = None,
        size: int = 32,
        layout: str = "class",
        name: str = "data",
        val: int = 2,
        test: int = 0,
    ) -> Path:
        classes = classes or {"red": 6, "blue": 6}
        root = tmp_path / name
        for k, (cname, n) in enumerate(classes.items()):
            if layout == "class":
                write_images(root / cname, k, n, size)
            else:
                write_images(root / "train" / cname, k, n, size)
                write_images(root / "val" / cname, k, val, size, start=n)
                if test:
                    write_images(root / "test" / cname, k, test, size, start=n + val)
        return root

    return make


@pytest.fixture
def image_folder(make_folder) -> Path:
    return make_folder({"red": 6, "blue": 6})


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file and the listing of every folder under root (symlinks by target text).

    Walks without recursion (a test tree may be 1,200 folders deep), and never follows links.
    """
    out = {}
    stack = [os.fspath(root)]
    while stack:
        dirpath = stack.pop()
        rel = os.path.relpath(dirpath, root)
        with os.scandir(dirpath) as it:
            entries = sorted(it, key=lambda e: e.name)
        out[f"dir:{rel}"] = "|".join(e.name for e in entries)
        for e in entries:
            if e.is_symlink():
                out[f"link:{rel}/{e.name}"] = os.readlink(e.path)
            elif e.is_dir():
                stack.append(e.path)
            elif e.is_file():
                out[f"file:{rel}/{e.name}"] = hashlib.sha256(Path(e.path).read_bytes()).hexdigest()
            else:  # a pipe or socket: its type is its content
                out[f"other:{rel}/{e.name}"] = str(os.lstat(e.path).st_mode)
    return out


@contextmanager
def unchanged(root: Path):
    """`with unchanged(data): invoke(...)`: the DATA tree hashes the same before and after."""
    before = tree_digest(root)
    yield
    assert tree_digest(root) == before, f"{root} changed"


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    return tmp_path / "runs"


def invoke(*args):
    """Run the CLI in-process with every argument as a string; the typer Result (output = stdout+stderr)."""
    from typer.testing import CliRunner

    from finetune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """A user mistake: exit code 2, exactly one line `error: ...` containing every needle, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    """Seeded random weights of timm's tiny test_efficientnet, saved as a user's --weights file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# What a torchrun launch must not inherit from the test process (a parent launched under torchrun).
_DIST_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
)


def torchrun_cmd(*args, nproc: int = 2, script: str | Path | None = None, rdzv: list[str] | None = None):
    """The command line of `python -m torch.distributed.run ... -m finetune ARGS` (or SCRIPT ARGS).

    `--standalone` by default: the rendezvous store binds port 0, so the OS picks a free port and
    concurrent launches never collide (no port is chosen by us and then bound later).
    """
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", *(rdzv or ["--standalone"])]
    cmd += ["--nproc-per-node", str(nproc)]
    cmd += ["-m", "finetune"] if script is None else [str(script)]
    return cmd + [str(a) for a in args]


def torchrun_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update({"FINETUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "FINETUNE_ENGINE": "torch"})
    env.setdefault("FINETUNE_DIST_TIMEOUT", "300")  # a hang fails the test; a loaded machine does not
    env.update(extra)
    return env


def launch(cmd: list[str], env: dict[str, str]):
    """Start a launcher in its own process group (so a timeout can end its workers too)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
        start_new_session=True,
    )


def finish(proc, timeout: float = 300):
    """(returncode, stdout, stderr) of a launched process; on timeout its whole group is killed.

    torchrun's workers are its children: killing only the launcher would leave them running,
    holding CPU (and sockets) for the tests after it.
    """
    import contextlib
    import signal
    import subprocess

    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{err[-3000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of the launch outlives it
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torchrun(*args, nproc: int = 2, script: str | Path | None = None, timeout: float = 300, **env):
    """`python -m torch.distributed.run --standalone -m finetune ARGS` on CPU; the CompletedProcess."""
    return finish(launch(torchrun_cmd(*args, nproc=nproc, script=script), torchrun_env(**env)), timeout)


def seeded_tiny_weights(folder: Path, model: str = "test_efficientnet") -> list:
    """`--backbone MODEL --weights FILE`: timm's tiny MODEL with seeded random weights, in `folder`."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False)
    path = Path(folder) / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return ["--backbone", model, "--weights", path]
