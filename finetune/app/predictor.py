"""The classifier `finetune predict` asks: a run's network (trunk + folded head), or the packaged
backbone's ImageNet head when there is no run, on ONNX Runtime, with torch never imported.

    p = open_predictor("runs/2026...-lite0-linear-probe")    # or None: newest run, else ImageNet
    p.scores(x)          # x: (B, 3, S, S) float32 numpy -> (B, K) probabilities (or SVM scores)
    p.scores(x, tta=True)   # the mean over x and its mirror image (test-time augmentation)
    p.class_names, p.preprocessing, p.source, p.engine       # "onnxruntime" | "torch"

The network is exported once (`features.engine.export_onnx`) and cached, keyed by the sha256 of
the run's `model.safetensors` and `config.json`: an edited run is exported again, a damaged file
is rebuilt. The engine lives in the run folder (`engine.onnx` + `engine.json`); a read-only run
folder caches it under the feature cache root instead, or, when neither can be written, the
network is exported for each call. Building and exporting needs torch; using the cached file
needs only ONNX Runtime, numpy and Pillow.

Test-time augmentation (`tta=True`) runs the batch and its horizontal mirror (`x[..., ::-1]`,
the preprocessed pixels flipped) and averages the two views' probabilities: softmax of each
view's logits, or a kNN head's neighbour votes. An SVM head has no probabilities: its decision
scores are averaged instead. Mirroring the preprocessed pixels is mirroring the image, except
that a centre crop with an odd margin (resize - crop) sits one resized pixel off centre, and its
mirror one pixel the other way.

`--device cuda` (or `mps`), FINETUNE_ENGINE=torch, and `auto` for a run trained on CUDA on a
machine with an NVIDIA driver loaded take PyTorch instead.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from finetune.data.transforms import Preprocessing
from finetune.errors import RunError

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.onnx"  # in the run folder, with engine.json beside it

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class Predictor:
    """A network that classifies model inputs, with what a row needs to name its answer."""

    source: str  # which model answers: a run folder, or the ImageNet labels of the packaged backbone
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    outputs: str  # what forward returns: "logits" (softmaxed here), "probabilities" (kNN) or "scores" (SVM)
    forward: Callable[[np.ndarray], np.ndarray]  # (B, 3, S, S) float32 -> (B, K) outputs
    engine: str  # "onnxruntime" | "torch"

    @property
    def score_kind(self) -> str:
        return "score" if self.outputs == "scores" else "probability"

    def scores(self, x: np.ndarray, tta: bool = False) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, K) float32: probabilities, or the SVM's scores.

        `tta`: the mean over x and its mirror image x[..., ::-1] (one forward of both views).
        """
        if not tta:
            return self._view_scores(self.forward(x))
        both = self.forward(np.concatenate([x, x[..., ::-1]]))  # (2B, K): the views in one batch
        return self._view_scores(both).reshape(2, len(x), -1).mean(axis=0)

    def _view_scores(self, z: np.ndarray) -> np.ndarray:
        if self.outputs != "logits":
            return z
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def imagenet_class_names() -> list[str]:
    text = resources.files("finetune").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def check_device(device: str) -> None:
    """Refuse a device name no runtime knows, before any work (torch is not imported for this)."""
    if not _DEVICE.fullmatch(device):
        raise RunError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps")


def _nvidia_driver_loaded() -> bool:
    """A CUDA device is likely usable (Linux: the NVIDIA driver is loaded), asked without torch."""
    return os.path.exists("/proc/driver/nvidia/version")


def _torch_device(device: str, trained_on: str = "") -> str | None:
    """The device PyTorch runs on for this call, or None for ONNX Runtime on CPU: an explicit GPU,
    FINETUNE_ENGINE=torch, or `auto` for a run trained on CUDA where an NVIDIA driver is loaded."""
    if device not in ("auto", "cpu"):
        return device
    if device == "auto" and trained_on.startswith("cuda") and _nvidia_driver_loaded():
        return "auto"  # cuda when torch can use it, else cpu
    return "cpu" if os.environ.get("FINETUNE_ENGINE") == "torch" else None


def _torch_forward(model, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """Eager PyTorch on `device` (auto: cuda, mps, cpu), numpy in and out."""
    import torch

    from finetune.runtime import pick_device

    dev = pick_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {device}: CUDA is not available on this machine", "use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RunError("--device mps: MPS is not available on this machine", "use --device cpu")
    model = model.eval().to(dev, memory_format=torch.channels_last)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x).to(dev).contiguous(memory_format=torch.channels_last)
            return model(t).float().cpu().numpy()  # (B, K)

    return forward


def _ort_forward(key: str, build: Callable, input_size: int, places: list[Path], what: str):
    """ONNX Runtime on the cached export of `build()` (built, and torch imported, only on a miss)."""
    from finetune.features.engine import OrtEngine, cached_onnx, export_onnx

    def export() -> bytes:
        model = build()  # a broken run folder fails here, before anything is said
        log.info(f"exporting {what} to ONNX Runtime (once; cached)")
        return export_onnx(model, input_size, output_name="scores")

    return OrtEngine(cached_onnx(key, export, places)).run


def _forward(key: str, build: Callable, input_size: int, places: list[Path], what: str, torch_on: str | None):
    """(forward, engine name): ONNX Runtime, or PyTorch on `torch_on` when it is a device."""
    from finetune.features.engine import ExportError

    if torch_on is not None:
        return _torch_forward(build(), torch_on), "torch"
    try:
        return _ort_forward(key, build, input_size, places, what), "onnxruntime"
    except ExportError as err:
        log.warning(f"{err}; predicting with PyTorch")
        return _torch_forward(build(), "cpu"), "torch"


def open_run(run_dir: str | os.PathLike, device: str = "auto") -> Predictor:
    """The run folder's classifier (see the module docstring for engine and cache)."""
    from finetune.app.runfolder import CONFIG_FILE, MODEL_FILE, load_run, read_config
    from finetune.features.engine import engine_key
    from finetune.io import cache_root, sha256_file

    check_device(device)
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    try:
        key = engine_key("run", sha256_file(run_dir / MODEL_FILE), sha256_file(run_dir / CONFIG_FILE))
    except OSError as err:
        raise RunError(f"cannot read {run_dir} ({err.strerror})", "check the folder's permissions") from None
    places = [run_dir / ENGINE_FILE, cache_root() / "engines" / f"run-{key}.onnx"]
    forward, engine = _forward(
        key,
        lambda: load_run(run_dir)[0],
        config.preprocessing.input_size,
        places,
        "the run's classifier",
        _torch_device(device, str(config.extra.get("device", ""))),
    )
    return Predictor(str(run_dir), config.class_names, config.preprocessing, config.outputs, forward, engine)


def open_imagenet(device: str = "auto", why: str = "") -> Predictor:
    """The packaged backbone with its own 1000-way ImageNet head (its card keeps torch away)."""
    from finetune.features.engine import engine_key
    from finetune.io import cache_root
    from finetune.models.backbone import open_backbone
    from finetune.models.catalogue import DEFAULT_BACKBONE

    check_device(device)
    bb = open_backbone(DEFAULT_BACKBONE)
    pre = bb.preprocessing
    key = engine_key("imagenet", bb.spec.model, bb.weights.sha256, pre.input_size)
    places = [cache_root() / "engines" / f"imagenet-{key}.onnx"]
    what = f"{DEFAULT_BACKBONE} with its ImageNet head"
    forward, engine = _forward(key, lambda: bb.model, pre.input_size, places, what, _torch_device(device))
    source = f"ImageNet-1k labels ({DEFAULT_BACKBONE}{'; ' + why if why else ''})"
    return Predictor(source, tuple(imagenet_class_names()), pre, "logits", forward, engine)


def open_predictor(
    run_dir: str | os.PathLike | None = None, runs_root: str | os.PathLike = "runs", device: str = "auto"
) -> Predictor:
    """`run_dir`'s classifier; without one, the newest run under `runs_root`, else ImageNet labels.

    The choice made for the user is said in one log line.
    """
    from finetune.app.runfolder import latest_run

    if run_dir is not None:
        return open_run(run_dir, device)
    check_device(device)
    newest = latest_run(runs_root)
    if newest is None:
        predictor = open_imagenet(device, f"no run found under {runs_root}")
        log.info(f"model: ImageNet-1k labels of the packaged backbone (no run found under {runs_root})")
        return predictor
    predictor = open_run(newest, device)  # a broken newest run is one error line, nothing before it
    log.info(f"model: {newest} (the newest run under {runs_root})")
    return predictor
