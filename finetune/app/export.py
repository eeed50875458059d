"""`finetune export`: a run's model as a standalone file, with its preprocessing beside it.

    path = export_run("runs/2026...-lite0-linear-probe", fmt="onnx")   # model.onnx + model.json
    path = export_run(run_dir, fmt="pt2")                               # model.pt2 (torch.export)

ONNX is written by the tool's one exporter (`features.engine.export_onnx`, the same file the
feature engine and `finetune predict` run, checked against PyTorch before it is written); `pt2`
is `torch.export`. The JSON says how to feed the model: input size, resize/crop, mean/std, class
names, and whether the outputs are logits (softmax them), probabilities (a kNN head: its
training features are constants inside the file) or SVM scores.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.errors import RunError

FORMATS = ("onnx", "pt2")
OUTPUTS = {  # config.outputs -> how to read the model's outputs
    "logits": "logits: apply softmax",
    "probabilities": "probabilities (votes of the k nearest training images): use as they are",
    "scores": "SVM scores: argmax, not probabilities",
}


def _model_bytes(model, fmt: str, size: int) -> bytes:
    """The model file's bytes (in memory: the target is written atomically, and torch.export never
    sees a temporary name without the .pt2 suffix it warns about)."""
    import io

    import torch

    from finetune.features.engine import ExportError, export_onnx

    if fmt == "onnx":
        try:
            return export_onnx(model, size, output_name="scores")
        except ExportError as err:
            raise RunError(str(err), "try --format pt2, or report the backbone") from None
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.zeros(2, 3, size, size),), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def export_run(run_dir: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None) -> Path:
    """Write the model file and `<name>.json`; returns the model file's path."""
    from finetune.app.runfolder import load_run, read_config
    from finetune.io import atomic_write, write_json

    if fmt not in FORMATS:
        raise RunError(f"unknown export format {fmt!r}", f"choose --format {' or '.join(FORMATS)}")
    config = read_config(run_dir)
    model, _, classes = load_run(run_dir)
    size = config.preprocessing.input_size
    target = Path(out) if out is not None else Path(run_dir) / "export" / f"model.{fmt}"
    data = _model_bytes(model, fmt, size)
    atomic_write(target, lambda fh: fh.write(data))
    write_json(
        target.with_suffix(".json"),
        {
            "format": fmt,
            "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32"},
            "preprocessing": config.preprocessing.to_dict(),
            "class_names": classes,
            "outputs": OUTPUTS[config.outputs],
            "backbone": config.backbone,
            "strategy": config.strategy,
        },
    )
    return target
