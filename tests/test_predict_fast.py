"""`finetune predict` without torch: the run's classifier on ONNX Runtime from a cached export.

The reference is the torch path a run is trained and evaluated on: `load_run`'s module fed by
`eval_reader` (torchvision's decoder, the one transform). On real photos (crops of sklearn's
sample images as JPEG and PNG, progressive and EXIF-rotated ones included) and sklearn's digits,
the fast path must give the same top-1 and probabilities within 1e-4. The cached engine is keyed
by the run's files, rebuilt when damaged, and a read-only run folder still predicts.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import invoke, one_line_error, tree_digest

HEAVY = ("torch", "torchvision", "timm")


def _photos_and_digits(root: Path, n: int, seed: int) -> dict[str, list[Path]]:
    """{class: files}: JPEG crops of china.jpg, PNG crops of flower.jpg, gray digit PNGs (12 x 12)."""
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {"china": [], "flower": [], "digit": []}
    for name, photo, ext in zip(("china", "flower"), load_sample_images().images, (".jpg", ".png")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = int(rng.integers(40, 420)), int(rng.integers(40, 630))
            y, x = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
            path = root / name / f"{i:02d}{ext}"
            Image.fromarray(photo[y : y + h, x : x + w]).save(path, quality=90)
            out[name].append(path)
    digits = load_digits()
    (root / "digit").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ink = np.rint(digits.images[seed * n + i] * (255 / 16)).astype(np.uint8)
        path = root / "digit" / f"{i:02d}.png"
        Image.fromarray(np.pad(255 - ink, 2, constant_values=255), mode="L").save(path)
        out["digit"].append(path)
    return out


def _odd_jpegs(root: Path) -> list[Path]:
    """A progressive JPEG, a 4:4:4 one and the eight EXIF orientations of a real photo."""
    from sklearn.datasets import load_sample_images

    root.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(load_sample_images().images[0][:300, :400])
    paths = [root / "progressive.jpg", root / "444.jpg"]
    im.save(paths[0], progressive=True, quality=85)
    im.save(paths[1], subsampling=0, quality=95)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        paths.append(root / f"exif{orientation}.jpg")
        im.save(paths[-1], exif=exif)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A linear probe of the packaged lite0 (64 px) on photos and digits, and held-out files."""
    base = tmp_path_factory.mktemp("fast")
    _photos_and_digits(base / "data", 8, seed=0)
    res = invoke("run", base / "data", "--out", base / "runs", "--set", "image_size=64", "--workers", "0")
    assert res.exit_code == 0, res.output
    (run,) = (base / "runs").iterdir()
    held = _photos_and_digits(base / "held", 12, seed=1)
    files = [p for paths in held.values() for p in paths] + _odd_jpegs(base / "held" / "odd")
    return run, files


def _torch_probabilities(run: Path, files: list[Path]) -> tuple[np.ndarray, list[str]]:
    """The training/evaluation path: load_run's module on eval_reader's tensors (torchvision decode)."""
    from finetune.app.runfolder import load_run, read_config
    from finetune.data.transforms import eval_reader

    model, _, names = load_run(run)
    read = eval_reader(read_config(run).preprocessing)
    with torch.inference_mode():
        x = torch.stack([read(p) for p in files])  # (N, 3, 64, 64)
        return torch.softmax(model(x), dim=1).numpy(), names  # (N, K)


def _fast_probabilities(rows: list[dict], names: list[str]) -> np.ndarray:
    """(N, K) probabilities from predict rows with top_k = K."""
    col = {n: k for k, n in enumerate(names)}
    out = np.zeros((len(rows), len(names)))
    for i, row in enumerate(rows):
        for t in row["top"]:
            out[i, col[t["label"]]] = t["score"]
    return out


def test_predict_equals_the_torch_path_on_photos_and_digits(trained):
    import finetune

    run, files = trained
    ref, names = _torch_probabilities(run, files)
    rows = finetune.predict(run, files, top_k=len(names))
    assert [r["path"] for r in rows] == [str(p) for p in files]  # in order, none skipped
    got = _fast_probabilities(rows, names)
    assert [r["label"] for r in rows] == [names[i] for i in ref.argmax(1)]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert len({r["label"] for r in rows}) == 3  # a real answer, not one class everywhere
    assert (run / "engine.onnx").is_file() and (run / "engine.json").is_file()


def test_imagenet_labels_without_a_run_equal_the_torch_path(tmp_path):
    """No run: the packaged backbone's own head, on the same fast path, against lite0 in PyTorch."""
    from finetune.app.predict import predict
    from finetune.app.predictor import imagenet_class_names
    from finetune.data.transforms import eval_reader
    from finetune.models.backbone import build

    files = _photos_and_digits(tmp_path / "p", 4, seed=2)
    files = files["china"] + files["flower"] + _odd_jpegs(tmp_path / "odd")[:2]
    result = predict(files, runs_root=tmp_path / "no-runs", top_k=5)
    assert result.source.startswith("ImageNet-1k labels (lite0")
    bb = build("lite0")
    read = eval_reader(bb.preprocessing)
    with torch.inference_mode():
        ref = torch.softmax(bb.model(torch.stack([read(p) for p in files])), dim=1).numpy()  # (N, 1000)
    names = imagenet_class_names()
    for row, p in zip(result.rows, ref):
        assert [t["label"] for t in row["top"]] == [names[i] for i in np.argsort(-p)[:5]]
        assert max(abs(t["score"] - p[names.index(t["label"])]) for t in row["top"]) <= 1e-4


def test_pillow_decodes_odd_jpegs_to_torchvisions_pixels(tmp_path):
    """The fast path decodes with Pillow; the training path with torchvision: the same pixels."""
    from finetune.data.decode import decode, load_rgb

    for path in _odd_jpegs(tmp_path):
        a = np.asarray(load_rgb(path))  # (H, W, 3)
        b = decode(path).permute(1, 2, 0).numpy()  # (H, W, 3)
        assert a.shape == b.shape and (a == b).all(), path.name


def _predict_logged(run: Path, files, caplog) -> tuple[list[dict], str]:
    import finetune

    caplog.clear()
    with caplog.at_level("INFO", logger="finetune"):
        rows = finetune.predict(run, files, top_k=3)
    return rows, caplog.text


def test_an_edited_run_is_exported_again(trained, tmp_path, caplog):
    import shutil

    from safetensors.numpy import load_file, save_file

    run, files = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before, log = _predict_logged(copy, files[:6], caplog)
    key = json.loads((copy / "engine.json").read_text())["key"]
    _, log = _predict_logged(copy, files[:6], caplog)
    assert "exporting" not in log  # the cached engine answered

    state = load_file(str(copy / "model.safetensors"))
    state["head.bias"] = state["head.bias"] + np.arange(3, dtype=np.float32) * 4.0  # favour class 2
    save_file(state, str(copy / "model.safetensors"))
    after, log = _predict_logged(copy, files[:6], caplog)
    assert "exporting" in log and json.loads((copy / "engine.json").read_text())["key"] != key
    ref, names = _torch_probabilities(copy, files[:6])
    assert [r["label"] for r in after] == [names[i] for i in ref.argmax(1)]
    assert [r["score"] for r in after] != [r["score"] for r in before]
    np.testing.assert_allclose([r["score"] for r in after], ref.max(1), atol=1e-4, rtol=0)


def test_a_damaged_engine_file_is_rebuilt_not_trusted(trained, tmp_path, caplog):
    import hashlib
    import shutil

    run, files = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    good, _ = _predict_logged(copy, files[:4], caplog)
    blob = bytearray((copy / "engine.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside the weights: ONNX Runtime would load it
    (copy / "engine.onnx").write_bytes(bytes(blob))
    again, log = _predict_logged(copy, files[:4], caplog)
    assert "damaged" in log and "exporting" in log
    assert again == good
    sha = hashlib.sha256((copy / "engine.onnx").read_bytes()).hexdigest()
    assert sha == json.loads((copy / "engine.json").read_text())["sha256"]
    (copy / "engine.json").write_text("{not json")
    assert _predict_logged(copy, files[:4], caplog)[0] == good


@pytest.fixture
def read_only(monkeypatch):
    """Make folders unwritable, for root too (which chmod does not stop): writes below them fail."""
    import errno

    import finetune.io

    frozen: list[Path] = []
    real = finetune.io.atomic_write

    def atomic_write(path, write, mode="wb"):
        if any(Path(path).resolve().is_relative_to(f) for f in frozen):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, write, mode)

    monkeypatch.setattr(finetune.io, "atomic_write", atomic_write)
    monkeypatch.setattr("finetune.features.engine.atomic_write", atomic_write)

    def freeze(folder: Path) -> None:
        folder.chmod(0o555)
        frozen.append(folder.resolve())

    yield freeze
    for f in frozen:
        if f.exists():
            f.chmod(0o755)


def test_a_read_only_run_folder_still_predicts(trained, tmp_path, monkeypatch, read_only, caplog):
    import shutil

    run, files = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("engine.*"))
    cache = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    read_only(copy)
    before = tree_digest(copy)
    rows, log = _predict_logged(copy, files[:5], caplog)
    ref, names = _torch_probabilities(copy, files[:5])
    assert [r["label"] for r in rows] == [names[i] for i in ref.argmax(1)]
    assert tree_digest(copy) == before  # nothing written in the run folder
    assert len(list((cache / "engines").glob("run-*.onnx"))) == 1  # cached under the cache root
    assert _predict_logged(copy, files[:5], caplog) == (rows, "")  # and read back from there

    shutil.rmtree(cache / "engines")
    read_only(cache)  # nowhere to cache: exported for each call, still the same answers
    again, log = _predict_logged(copy, files[:5], caplog)
    assert again == rows and "could not be cached" in log


def _heavy_modules(args: list, env: dict | None = None) -> tuple[list[str], subprocess.CompletedProcess]:
    """`finetune ARGS` in a fresh process: (heavy modules it imported, the process)."""
    code = (
        "import json, sys\nfrom finetune.cli import main\nsys.argv = ['finetune', *json.loads(sys.argv[1])]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code or 0\n"
        f"print('HEAVY ' + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = next(x for x in done.stderr.splitlines() if x.startswith("HEAVY "))
    return json.loads(line[6:]), done


def test_predict_imports_neither_torch_nor_timm(trained, tmp_path):
    run, files = trained
    assert invoke("predict", files[0], "--run", run).exit_code == 0  # the engine is cached
    heavy, done = _heavy_modules(["predict", files[0], files[-1], "--run", run, "--json"])
    assert done.returncode == 0 and heavy == [], done.stderr
    assert len(done.stdout.splitlines()) == 2
    # the torch engine on request: the same answer
    heavy, forced = _heavy_modules(
        ["predict", files[0], files[-1], "--run", run, "--json"], {"FINETUNE_ENGINE": "torch"}
    )
    assert "torch" in heavy and forced.returncode == 0
    for a, b in zip(done.stdout.splitlines(), forced.stdout.splitlines()):
        ra, rb = json.loads(a), json.loads(b)
        assert ra["label"] == rb["label"] and abs(ra["score"] - rb["score"]) <= 1e-4

    # ImageNet labels without a run: the packaged backbone's card and engine, no torch either
    runs = tmp_path / "none"
    assert invoke("predict", files[0], "--runs", runs).exit_code == 0  # card + engine, once
    heavy, done = _heavy_modules(["predict", files[0], "--runs", runs])
    assert done.returncode == 0 and heavy == [] and "ImageNet-1k" in done.stderr, done.stderr


def test_the_cli_says_which_run_writes_csv_and_fails_when_nothing_is_classified(trained, tmp_path):
    run, files = trained
    runs = run.parent
    res = invoke("predict", *files[:3], files[-1], "--runs", runs, "--csv", tmp_path / "p.csv", "-k", "2")
    assert res.exit_code == 0, res.output
    assert f"model: {run} (the newest run under {runs})" in res.stderr
    with open(tmp_path / "p.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["path", "label", "score", "label_2", "score_2", "error"]
    printed = [line.split() for line in res.stdout.splitlines()[2:]]  # under the header and its rule
    assert [r["path"] for r in table] == [cells[-1] for cells in printed]
    assert [r["path"] for r in table] == [str(p) for p in [*files[:3], files[-1]]]
    assert all(cells[:2] == [r["label"], f"{float(r['score']):.3f}"] for r, cells in zip(table, printed))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    (bad / "b.png").write_bytes(b"")
    res = invoke("predict", bad, "--run", run, "--csv", tmp_path / "bad.csv")
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("error: none of the 2 file(s) could be classified")
    assert sum("skipped" in line for line in lines) == 2
    with open(tmp_path / "bad.csv", newline="") as fh:
        assert [r["error"] != "" and r["label"] == "" for r in csv.DictReader(fh)] == [True, True]

    one_line_error(invoke("predict", files[0], "--run", run, "--device", "gpu"), "unknown --device 'gpu'")
    one_line_error(
        invoke("predict", files[0], "--run", run, "--csv", tmp_path / "no" / "x.csv"), "cannot write"
    )


def test_a_progress_bar_on_many_files(trained, monkeypatch):
    run, files = trained
    monkeypatch.setenv("FINETUNE_PROGRESS", "1")
    many = invoke("predict", *files, "--run", run, "--json")
    assert many.exit_code == 0 and "predicting" in many.stderr and len(many.stdout.splitlines()) == len(files)
    few = invoke("predict", *files[:3], "--run", run, "--json")
    assert few.exit_code == 0 and "predicting" not in few.stderr


def test_export_pt2_says_nothing_of_torchs_and_leaves_no_temporary_file(trained, tmp_path):
    """torch warns (through its own logger, to the terminal) about a pt2 file not named *.pt2.

    What the exported files compute is tested in tests/test_choose.py.
    """
    import logging

    run, _ = trained
    said: list[str] = []
    catch = logging.Handler(logging.WARNING)
    catch.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("torch.export").addHandler(catch)
    try:
        res = invoke("export", run, "--format", "pt2", "-o", tmp_path / "m.pt2")
    finally:
        logging.getLogger("torch.export").removeHandler(catch)
    assert res.exit_code == 0 and res.output.strip().startswith("wrote"), res.output
    assert said == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pt2"]


@pytest.mark.gpu
def test_cuda_goes_through_torch_and_agrees_with_the_cpu_engine(trained):
    """`--device cuda`: PyTorch on the GPU (convolutions may use TF32, hence the looser tolerance)."""
    import finetune

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    run, files = trained
    cpu = finetune.predict(run, files, top_k=1)
    gpu = finetune.predict(run, files, top_k=1, device="cuda")
    assert [r["label"] for r in gpu] == [r["label"] for r in cpu]
    np.testing.assert_allclose([r["score"] for r in gpu], [r["score"] for r in cpu], atol=5e-3)
    heavy, done = _heavy_modules(["predict", files[0], "--run", run, "--device", "cuda", "--json"])
    assert done.returncode == 0 and "torch" in heavy, done.stderr


def test_a_network_the_exporter_cannot_write_is_predicted_with_pytorch(make_folder, tmp_path, caplog):
    """LeNet-5 at 32 px pools adaptively by a non-integer factor, which the ONNX exporter refuses."""
    import finetune

    data = make_folder({"red": 4, "blue": 4}, size=32)
    res = invoke("run", data, "--backbone", "lenet5", "--out", tmp_path / "runs", "--set", "image_size=32")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    files = sorted(data.rglob("*.png"))
    with caplog.at_level("WARNING", logger="finetune"):
        rows = finetune.predict(run, files, top_k=2)
    assert "predicting with PyTorch" in caplog.text and not (run / "engine.onnx").exists()
    ref, names = _torch_probabilities(run, files)
    assert [r["label"] for r in rows] == [names[i] for i in ref.argmax(1)]
    np.testing.assert_allclose([r["score"] for r in rows], ref.max(1), atol=1e-6)
