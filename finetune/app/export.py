"""`finetune export`: a run's model as a standalone file, with its preprocessing beside it.

    path = export_run("runs/2026...-lite0-linear-probe", fmt="onnx")   # model.onnx + model.json
    path = export_run(run_dir, fmt="pt2")                               # model.pt2 (torch.export)

ONNX goes through the current exporter (`torch.onnx.export(..., dynamo=True)`, which needs the
`onnx` and `onnxscript` packages: `pip install -e ".[export]"`); `pt2` is `torch.export`. The JSON
says how to feed the model: input size, resize/crop, mean/std, class names, and whether the
outputs are logits (softmax them) or SVM scores.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from finetune.errors import RunError

FORMATS = ("onnx", "pt2")


def export_run(run_dir: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None) -> Path:
    """Write the model file and `<name>.json`; returns the model file's path."""
    import torch

    from finetune.app.runfolder import load_run, read_config
    from finetune.io import atomic_write, write_json

    if fmt not in FORMATS:
        raise RunError(f"unknown export format {fmt!r}", f"choose --format {' or '.join(FORMATS)}")
    config = read_config(run_dir)
    model, _, classes = load_run(run_dir)
    size = config.preprocessing.input_size
    target = Path(out) if out is not None else Path(run_dir) / "export" / f"model.{fmt}"
    target.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, size, size)
    tmp = target.with_name(target.name + f".{os.getpid()}.partial")
    try:
        if fmt == "onnx":
            try:
                import onnx  # noqa: F401
                import onnxscript  # noqa: F401
            except ImportError:
                raise RunError(
                    "ONNX export needs the onnx and onnxscript packages",
                    'install them with: pip install -e ".[export]"',
                ) from None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                batch = torch.export.Dim("batch", min=1, max=1024)
                program = torch.onnx.export(
                    model,
                    (example,),
                    dynamo=True,
                    input_names=["images"],
                    output_names=["scores"],
                    dynamic_shapes=({0: batch},),
                    external_data=False,
                    verbose=False,
                )
                program.save(str(tmp))
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(tmp))
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write(target, lambda fh: fh.write(data))
    write_json(
        target.with_suffix(".json"),
        {
            "format": fmt,
            "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32"},
            "preprocessing": config.preprocessing.to_dict(),
            "class_names": classes,
            "outputs": "logits: apply softmax"
            if config.probabilistic
            else "SVM scores: argmax, not probabilities",
            "backbone": config.backbone,
            "strategy": config.strategy,
        },
    )
    return target
