"""The `finetune` command line: parse, call one library function, print. No logic lives here.

    finetune run ./mydata --backbone vgg16 --strategy linear-probe
    finetune predict img.jpg
    finetune demo

Every user mistake (a `FinetuneError` from the library, or a bad option) becomes one line
on stderr and exit code 2. Heavy libraries (torch, timm, sklearn) are imported inside the
commands, so `finetune --help` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.26 ships its own copy of click; its exceptions are the ones raised
    from typer._click import echo
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import echo
    from click import exceptions as click_errors

from finetune.errors import FinetuneError


def _fail(message: str, code: int = 2) -> None:
    echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(TyperGroup):
    """Maps domain errors and usage errors to one line and exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        try:
            rv = super().main(
                args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
            )
        except click_errors.NoArgsIsHelpError as err:
            echo(err.ctx.get_help() if err.ctx else "", err=True)
            sys.exit(2)
        except click_errors.UsageError as err:
            where = f"finetune {err.ctx.info_name} --help" if err.ctx and err.ctx.parent else "finetune --help"
            _fail(f"{err.format_message()} — see `{where}`")
        except click_errors.ClickException as err:
            _fail(err.format_message())
        except (typer.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        except FinetuneError as err:
            _fail(str(err))
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
    help="Transfer learning for image folders: probe or fine-tune an ImageNet CNN on your images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


class Head(str, Enum):
    logreg = "logreg"
    svm = "svm"


class WeightsMap(str, Enum):
    name = "name"
    positional = "positional"


# --------------------------------------------------------------------------- run


@app.command()
def run(
    data: Annotated[Path, typer.Argument(help="Folder of class subfolders (or train/ val/ [test/]).")],
    strategy: Annotated[
        str, typer.Option("--strategy", "-s", help="linear-probe | stage-probe | partial-finetune | full-finetune | auto")
    ] = "linear-probe",
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Alias, timm name or tv:name.")] = "lite0",
    head: Annotated[Head | None, typer.Option(help="Probe head (overrides the recipe).")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="A recipe TOML file of your own.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: key=value.")] = None,
    weights: Annotated[Path | None, typer.Option(help="Weights file (.safetensors or state dict).")] = None,
    weights_map: Annotated[WeightsMap, typer.Option(help="Match --weights tensors by name or position.")] = WeightsMap.name,
    no_pretrained: Annotated[bool, typer.Option("--no-pretrained", help="Random init (no ImageNet weights).")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where run folders go.")] = Path("runs"),
    val_fraction: Annotated[float, typer.Option(help="Validation share when there is no val/ folder.")] = 0.2,
    labels: Annotated[Path | None, typer.Option(help="CSV of path,label (paths relative to DATA).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Decode worker processes (default: cores).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Resume an interrupted fine-tuning run folder.")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the network (fine-tuning).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the validation split.")] = 0,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the feature cache.")] = False,
) -> None:
    """Train and evaluate a classifier on DATA; write a run folder.

    Example: finetune run ./mydata --backbone vgg16 --strategy linear-probe
    """
    from finetune.pipeline import RunOptions
    from finetune.pipeline import run as run_pipeline
    from finetune.report import print_run_summary

    overrides = list(set_ or [])
    if head is not None:
        overrides.append(f'head="{head.value}"')
    opts = RunOptions(
        data=data,
        strategy=strategy,
        recipe_file=recipe,
        overrides=tuple(overrides),
        backbone=backbone,
        weights=weights,
        weights_map=weights_map.value,
        pretrained=not no_pretrained,
        out=out,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
        workers=workers,
        labels_csv=labels,
        resume=resume,
        compile=compile_,
        cache=not no_cache,
    )
    result = run_pipeline(opts, log=_log)
    print_run_summary(result)


# --------------------------------------------------------------------------- predict


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    run_dir: Annotated[Path | None, typer.Option("--run", help="Run folder (default: newest under runs/).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes to show per image.")] = 1,
    runs_root: Annotated[Path, typer.Option("--runs", help="Where to look for the newest run.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable rows.")] = False,
) -> None:
    """Classify images with a run's model (ImageNet labels when there is no run).

    Example: finetune predict img.jpg photos/ --top-k 3
    """
    from finetune.predict import predict as predict_images

    result = predict_images(paths, run_dir=run_dir, top_k=top_k, runs_root=runs_root)
    if as_json:
        _echo_json({"source": result.source, "score_kind": result.score_kind, "rows": result.rows})
        return
    typer.echo(f"model: {result.source}")
    for row in result.rows:
        if "error" in row:
            typer.echo(f"{row['path']}: skipped ({row['error']})")
            continue
        tops = ", ".join(f"{t['label']} ({result.score_kind} {t['score']:.3f})" for t in row["top"])
        typer.echo(f"{row['path']}: {tops}")


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the run folder goes.")] = Path("runs"),
) -> None:
    """Linear probe of the packaged backbone on sklearn's handwritten digits, as PNG files.

    Example: finetune demo
    """
    from finetune.demo import run_demo

    run_demo(out=out, log=_log, echo=typer.echo)


def main() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    app()


if __name__ == "__main__":
    main()
