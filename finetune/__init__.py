"""finetune: transfer learning for image folders.

from finetune import load_run
model, transform, class_names = load_run("runs/20261123-101500-lite0-linear-probe")
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_run", "__version__"]


def load_run(run_dir):
    """(model, transform, class_names) of a run folder; see `finetune.app.runfolder.load_run`."""
    from finetune.app.runfolder import load_run as _load_run

    return _load_run(run_dir)
