"""`finetune demo`: the whole tool on real data in a few minutes, offline.

sklearn's 1,797 handwritten digits are written as PNG files into the user cache (never the
current folder), the packaged EfficientNet-Lite0 is probed on them, and a few held-out
images are predicted with the saved run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    env = os.environ.get("FINETUNE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finetune"


def digits_folder() -> Path:
    from finetune.data import write_digits_folder

    return write_digits_folder(cache_root() / "datasets" / "digits")


def run_demo(out: Path, log: Callable[[str], None], echo: Callable[[str], None]) -> float:
    """Probe lite0 on digits; print accuracy and a few predictions. Returns validation accuracy."""
    from finetune.pipeline import RunOptions, run
    from finetune.predict import predict
    from finetune.report import print_run_summary

    folder = digits_folder()
    echo(f"data: sklearn digits as PNG images in {folder}")
    result = run(RunOptions(data=folder, strategy="linear-probe", backbone="lite0", out=out), log=log)
    print_run_summary(result)
    acc = result.metrics["val"]["accuracy"]
    echo(f"demo: validation accuracy {acc:.4f} on {result.metrics['val']['n']} held-out digits")
    val = [result.index.root / p for p in result.index.split_dict()["val"][:5]]
    shown = predict(val, run_dir=result.run_dir)
    for row in shown.rows:
        truth = Path(row["path"]).parent.name
        echo(f"  {Path(row['path']).name}: predicted {row.get('label')} (true {truth}), p={row.get('score', 0):.3f}")
    return acc
