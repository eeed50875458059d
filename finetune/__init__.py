"""finetune: transfer learning for image folders.

    import finetune
    result = finetune.run("mydata", strategy="linear-probe", backbone="lite0", recipe={"image_size": 128})
    result.run_dir, result.metrics["val"]["accuracy"]        # the run folder, its metrics.json
    rows = finetune.predict(result.run_dir, ["img.jpg", "photos/"])   # no torch
    rows[0]   # {"path": "img.jpg", "label": "cat", "score": 0.97, "top": [...]}
    metrics = finetune.evaluate(result.run_dir, "holdout/")           # as `finetune evaluate`
    model, transform, class_names = finetune.load_run(result.run_dir)  # a torch module

Every user mistake is a `finetune.FinetuneError` (what is wrong, and what to do): the same
errors the command line prints as one line; nothing here calls `sys.exit`. Importing the
package imports no torch: each function imports what it needs.
"""

from __future__ import annotations

import os
from typing import Any

from finetune.errors import FinetuneError

__version__ = "0.1.0"
__all__ = ["FinetuneError", "evaluate", "load_run", "predict", "run", "__version__"]


def run(
    data: str | os.PathLike | None = None,
    *,
    strategy: str | None = None,
    backbone: str | None = None,
    recipe: dict[str, Any] | None = None,
    config: str | os.PathLike | None = None,
    **options: Any,
):
    """Train and evaluate one model as `finetune run` does; write its run folder and return it.

    Args:
        data: a folder of class subfolders (or train/ val/ [test/]); may come from `config`.
        strategy: linear-probe (the default) | stage-probe | partial-finetune | full-finetune | auto.
        backbone: lite0 (the default), a timm name or tv:name.
        recipe: recipe keys, as `[recipe]` of a config file: {"epochs": 3, "lr": "auto",
            "lr_mult": {"top": 0.2}} ("lr_mult.top" works too).
        config: a TOML file as `finetune run --config` reads (a run folder's run.toml repeats
            that run); the arguments given here win over it, `recipe` key by key.
        **options: the other options of `finetune run` by their config names: out, seed, head,
            weights, val_fraction, labels, device, workers, resume, compile, cache, offline,
            keep_checkpoints, log, recipe_file, weights_map, pretrained. None: not given.

    Returns:
        The result: `run_dir` (Path), `metrics` (dict, as metrics.json), `config` (config.json's
        `RunConfig`).

    Raises:
        FinetuneError: an unknown option (`ConfigError`, naming it), a wrong value, unusable
            data, ... — what the command line prints as `error: ...`.
    """
    from finetune.app.pipeline import run as run_pipeline
    from finetune.runconfig import run_options

    given = {"data": data, "strategy": strategy, "backbone": backbone, "recipe": recipe, **options}
    return run_pipeline(run_options(config, given))


def evaluate(run_dir: str | os.PathLike, data: str | os.PathLike, **options: Any) -> dict:
    """The metrics of a run on a held-out folder, as `finetune evaluate` writes them to RUN/eval-*/.

    Args:
        **options: out, labels, device, workers, batch_size (as `finetune evaluate` takes them).

    Returns:
        {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix",
        "calibration", "n", ...}: evaluation.json's metrics.

    Raises:
        FinetuneError: an unknown option, not a run folder, classes the run does not know, ...
    """
    from finetune.app.evaluate import evaluate_run
    from finetune.runconfig import EVALUATE_OPTIONS, check_keywords

    values = check_keywords(options, EVALUATE_OPTIONS, command="evaluate")
    kwargs = {EVALUATE_OPTIONS[k].field: v for k, v in values.items()}
    return evaluate_run(run_dir, data, **kwargs).metrics


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
