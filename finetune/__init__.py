"""finetune: transfer learning for image folders.

from finetune import load_run, predict
model, transform, class_names = load_run("runs/20261123-101500-lite0-linear-probe")  # torch module
rows = predict("runs/20261123-101500-lite0-linear-probe", ["img.jpg", "photos/"])     # no torch
rows[0]   # {"path": "img.jpg", "label": "cat", "score": 0.97, "top": [...]}
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_run", "predict", "__version__"]


def load_run(run_dir):
    """(model, transform, class_names) of a run folder; see `finetune.app.runfolder.load_run`."""
    from finetune.app.runfolder import load_run as _load_run

    return _load_run(run_dir)


def predict(run_dir, paths, top_k: int = 1, device: str = "auto", tta: bool = False) -> list[dict]:
    """Rows {"path", "label", "score", "top"} (or {"path", "error"}) for image files and folders.

    `run_dir` None: the newest run under ./runs, else the packaged backbone's ImageNet labels.
    The run's network runs on ONNX Runtime from its cached export (see `finetune.app.predictor`);
    `device="cuda"` runs it in PyTorch instead. `tta=True` averages each image with its mirror image.
    """
    from finetune.app.predict import predict as _predict

    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        paths = [paths]
    return list(_predict(paths, run_dir=run_dir, top_k=top_k, device=device, tta=tta).rows)
