"""`finetune demo`: the whole tool on real data in a few minutes, offline.

sklearn's 1,797 handwritten digits are written as PNG files into the user cache (never the
current folder), the packaged EfficientNet-Lite0 is probed on them, and a few held-out
images are predicted with the saved run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finetune.io import cache_root


def digits_folder() -> Path:
    from finetune.data.digits import write_digits_folder

    return write_digits_folder(cache_root() / "datasets" / "digits-png")


def run_demo(out: Path, echo: Callable[[str], None]) -> float:
    """Probe lite0 on digits; print accuracy and a few predictions. Returns validation accuracy."""
    from finetune.app.pipeline import run
    from finetune.app.predict import predict
    from finetune.app.report import print_run_summary
    from finetune.method import RunOptions

    folder = digits_folder()
    echo(f"data: sklearn digits as PNG images in {folder}")
    result = run(RunOptions(data=folder, strategy="linear-probe", backbone="lite0", out=out))
    print_run_summary(result)
    acc = result.metrics["val"]["accuracy"]
    echo(f"demo: validation accuracy {acc:.4f} on {result.metrics['val']['n']} held-out digits")
    val_paths = result.index.split_dict()["val"]
    val = [result.index.root / p for p in val_paths[:: max(1, len(val_paths) // 5)][:5]]
    shown = predict(val, run_dir=result.run_dir)
    for row in shown.rows:
        truth = Path(row["path"]).parent.name
        echo(
            f"  {Path(row['path']).name}: predicted {row.get('label')} (true {truth}), "
            f"p={row.get('score', 0):.3f}"
        )
    return acc
