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

from finetune.console import printable, setup_logging
from finetune.errors import FinetuneError


def _fail(message: str, code: int = 2) -> None:
    echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(TyperGroup):
    """Maps domain errors and usage errors to one line and exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        setup_logging()
        try:
            rv = super().main(
                args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
            )
        except click_errors.NoArgsIsHelpError as err:
            echo(err.ctx.get_help() if err.ctx else "", err=True)
            sys.exit(2)
        except click_errors.UsageError as err:
            where = (
                f"finetune {err.ctx.info_name} --help" if err.ctx and err.ctx.parent else "finetune --help"
            )
            _fail(f"{err.format_message()} — see `{where}`")
        except click_errors.ClickException as err:
            _fail(err.format_message())
        except (typer.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        except FinetuneError as err:
            _fail(str(err), getattr(err, "exit_code", 2))  # Interrupted training: 130 / 143
        if rv == 130:  # Typer turns Ctrl-C (KeyboardInterrupt) into a silent exit 130
            _fail("interrupted (Ctrl-C) — run it again (a fine-tune with a checkpoint: --resume RUN)", 130)
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
        str,
        typer.Option(
            "--strategy", "-s", help="linear-probe | stage-probe | partial-finetune | full-finetune | auto"
        ),
    ] = "linear-probe",
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Alias, timm name or tv:name.")] = "lite0",
    head: Annotated[Head | None, typer.Option(help="Probe head (overrides the recipe).")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="A recipe TOML file of your own.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: key=value.")] = None,
    weights: Annotated[Path | None, typer.Option(help="Weights file (.safetensors or state dict).")] = None,
    weights_map: Annotated[
        WeightsMap, typer.Option(help="Match --weights tensors by name or position.")
    ] = WeightsMap.name,
    no_pretrained: Annotated[
        bool, typer.Option("--no-pretrained", help="Random init (no ImageNet weights).")
    ] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where run folders go.")] = Path("runs"),
    val_fraction: Annotated[float, typer.Option(help="Validation share when there is no val/ folder.")] = 0.2,
    labels: Annotated[Path | None, typer.Option(help="CSV of path,label (paths relative to DATA).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Decode worker processes (default: cores).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Resume an interrupted fine-tuning run folder.")] = None,
    compile_: Annotated[
        bool, typer.Option("--compile", help="torch.compile the network (fine-tuning).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the validation split.")] = 0,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the feature cache.")
    ] = False,
    keep_checkpoints: Annotated[
        bool, typer.Option("--keep-checkpoints", help="Keep checkpoint/ in a finished fine-tune's folder.")
    ] = False,
) -> None:
    """Train and evaluate a classifier on DATA; write a run folder.

    Example: finetune run ./mydata --backbone vgg16 --strategy linear-probe
    """
    from finetune.app.pipeline import run as run_pipeline
    from finetune.app.report import print_run_summary
    from finetune.method import RunOptions

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
        keep_checkpoints=keep_checkpoints,
    )
    result = run_pipeline(opts)
    if result.main:  # under torchrun only rank 0 prints
        print_run_summary(result)


# --------------------------------------------------------------------------- predict


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    run_dir: Annotated[
        Path | None, typer.Option("--run", help="Run folder (default: newest under runs/).")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes to show per image.")] = 1,
    runs_root: Annotated[Path, typer.Option("--runs", help="Where to look for the newest run.")] = Path(
        "runs"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable rows.")] = False,
) -> None:
    """Classify images with a run's model (ImageNet labels when there is no run).

    Example: finetune predict img.jpg photos/ --top-k 3
    """
    from finetune.app.predict import predict as predict_images

    result = predict_images(paths, run_dir=run_dir, top_k=top_k, runs_root=runs_root)
    if as_json:
        _echo_json({"source": result.source, "score_kind": result.score_kind, "rows": result.rows})
        return
    typer.echo(f"model: {result.source}")
    for row in result.rows:
        if "error" in row:
            typer.echo(f"{printable(row['path'])}: skipped ({row['error']})")
            continue
        tops = ", ".join(f"{t['label']} ({result.score_kind} {t['score']:.3f})" for t in row["top"])
        typer.echo(f"{printable(row['path'])}: {tops}")


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the run folder goes.")] = Path("runs"),
) -> None:
    """Linear probe of the packaged backbone on sklearn's handwritten digits, as PNG files.

    Example: finetune demo
    """
    from finetune.app.demo import run_demo

    run_demo(out=out, echo=typer.echo)


# --------------------------------------------------------------------------- DeCAF: features and probes


class Pool(str, Enum):
    avg = "avg"
    max = "max"
    none = "none"


@app.command("extract-features")
def extract_features(
    data: Annotated[
        Path, typer.Argument(help="Image folder (class folders, split folders, or --labels CSV).")
    ],
    layer: Annotated[
        list[str] | None, typer.Option("--layer", "-l", help="Tap to read (repeatable), e.g. fc6.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .npz or .safetensors.")] = Path(
        "features.npz"
    ),
    backbone: Annotated[
        str, typer.Option(help="Backbone name or alias (see `finetune backbones`).")
    ] = "lite0",
    pool: Annotated[Pool, typer.Option(help="Pooling of conv taps; none keeps (C, H, W) maps.")] = Pool.avg,
    weights: Annotated[Path | None, typer.Option(help="Weights file (.safetensors or state dict).")] = None,
    pretrained: Annotated[bool, typer.Option(help="--no-pretrained: random init.")] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward.")] = 64,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Decoding processes (default: cores - 1).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps.")] = "auto",
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the feature cache.")
    ] = False,
    labels: Annotated[
        Path | None, typer.Option(help="CSV of path,label[,split] instead of class folders.")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Recorded split: validation share.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the recorded split.")] = 0,
) -> None:
    """Write the features of named layers (DeCAF-style) for every image of DATA.

    Example: finetune extract-features ./mydata --backbone alexnet --layer fc6 --layer fc7 -o feats.npz
    """
    from finetune.probe.decaf import ExtractOptions, extract_to_file

    opts = ExtractOptions(
        data=data,
        out=out,
        backbone=backbone,
        layers=tuple(layer or ("pool",)),
        pool=pool.value,
        weights=weights,
        pretrained=pretrained,
        batch_size=batch_size,
        workers=workers,
        device=device,
        cache=not no_cache,
        val_fraction=val_fraction,
        seed=seed,
        labels_csv=labels,
    )
    s = extract_to_file(opts)
    if not s.main:  # under torchrun only rank 0 reports
        return
    shapes = ", ".join(f"{t} {'x'.join(map(str, shape))}" for t, shape in s.shapes.items())
    typer.echo(f"wrote {s.out}: {s.images} images; {shapes}")
    typer.echo(
        f"{s.seconds:.1f} s, {s.images / max(s.seconds, 1e-9):.0f} img/s ({s.engine}); "
        f"cache hits {s.cache_hits}; skipped {len(s.skipped)}"
    )


@app.command()
def probe(
    file: Annotated[Path, typer.Argument(help="A features file written by extract-features.")],
    layer: Annotated[
        list[str] | None, typer.Option("--layer", "-l", help="Layer(s) to probe (default: all).")
    ] = None,
    head: Annotated[list[Head] | None, typer.Option(help="logreg and/or svm (default: both).")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Seeded stratified splits to average over.")] = 5,
    val_fraction: Annotated[
        float, typer.Option(min=0.05, max=0.9, help="Validation share of each split.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the first split.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable table.")] = False,
) -> None:
    """Linear heads on saved features: layer x head table, accuracy mean ± std over splits.

    Example: finetune probe feats.npz --head svm --repeats 5
    """
    from finetune.probe.decaf import probe_file

    heads = [h.value for h in head] if head else ["logreg", "svm"]
    table = probe_file(
        file,
        layers=layer or (),
        heads=heads,
        repeats=repeats,
        val_fraction=val_fraction,
        seed=seed,
    )
    if as_json:
        _echo_json(table.to_dict())
        return
    typer.echo(table.format())


cache_app = typer.Typer(help="The feature cache: what it holds, and emptying it.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable rows.")] = False,
) -> None:
    """Where the cache is and what it holds (one row per model x tap).

    Example: finetune cache info --json
    """
    from finetune.features.cache import cache_info, cache_parts
    from finetune.io import cache_root

    rows, parts = cache_info(), cache_parts()
    if as_json:
        _echo_json({"root": str(cache_root()), "sets": rows, "other": parts})
        return
    typer.echo(f"cache: {cache_root()}")
    for r in rows:
        typer.echo(
            f"  {r['model']:<28} {r['tap']:<8} {r['pool']:<4} {r['rows']:>7} images "
            f"{r['bytes'] / 2**20:8.1f} MiB"
        )
    total = sum(r["bytes"] for r in rows)
    typer.echo(f"  {len(rows)} feature sets, {total / 2**20:.1f} MiB")
    for p in parts.values():
        typer.echo(f"  {p['files']} {p['what']}, {p['bytes'] / 2**20:.1f} MiB")


@cache_app.command("clear")
def cache_clear_cmd() -> None:
    """Delete cached features, exported engines, cut networks and backbone cards (rebuilt on demand).

    Example: FINETUNE_CACHE=/scratch/ft finetune cache clear
    """
    from finetune.features.cache import cache_clear

    freed = cache_clear()
    typer.echo(f"freed {freed / 2**20:.1f} MiB")


# --------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder written by `finetune run`.")],
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Held-out images in class folders.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Default: RUN/eval-<DATA name>/.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable metrics on stdout.")] = False,
    labels: Annotated[Path | None, typer.Option(help="CSV of path,label (paths relative to DATA).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Decode worker processes (default: cores).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
) -> None:
    """Accuracy, top-5, per-class P/R/F1, calibration (ECE) and figures of a run on a held-out folder.

    Example: finetune evaluate runs/20260101-120000-lite0-linear-probe ./holdout --out eval/
    """
    from finetune.app.evaluate import evaluate_run
    from finetune.app.report import print_evaluation

    ev = evaluate_run(
        run_dir,
        data,
        out=out,
        device=device,
        workers=workers,
        labels_csv=labels,
        batch_size=batch_size,
    )
    if as_json:
        _echo_json(ev.to_dict())
        return
    print_evaluation(ev)


# --------------------------------------------------------------------------- summary


@app.command()
def summary(
    backbones: Annotated[list[str], typer.Argument(help="Backbone name(s): alias, timm name or tv:name.")],
    input_size: Annotated[
        int | None, typer.Option("--input-size", "-i", min=1, help="Input side (default: the weights').")
    ] = None,
    depth: Annotated[
        int | None, typer.Option("--depth", "-d", min=0, help="Fold rows to K name levels; 0: per stage.")
    ] = None,
    strategy: Annotated[
        str, typer.Option("--strategy", "-s", help="Recipe deciding the train column.")
    ] = "linear-probe",
    csv_file: Annotated[Path | None, typer.Option("--csv", help="Also write the rows to this CSV.")] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="One line per backbone: params, MACs, memory, top-1/top-5.")
    ] = False,
) -> None:
    """Per-layer table: output shape, activation memory, parameters, MACs (random weights, offline).

    Example: finetune summary tv:alexnet --input-size 227; finetune summary --compare alexnet vgg16 resnet50
    """
    from finetune.models import summary as lib

    if len(backbones) > 1 and not compare:
        raise typer.BadParameter("several backbones need --compare", param_hint="BACKBONES")
    if compare:
        table = lib.compare(backbones, input_size)
    else:
        table = lib.summarize(backbones[0], input_size=input_size, strategy=strategy, depth=depth)
    if csv_file is not None:
        lib.write_csv(table, csv_file)
    lib.print_summary(table)


# --------------------------------------------------------------------------- check (the data doctor)


class DecoderName(str, Enum):
    fast = "fast"
    pil = "pil"


@app.command()
def check(
    data: Annotated[Path, typer.Argument(help="Folder of class subfolders (or train/ val/ [test/]).")],
    labels: Annotated[Path | None, typer.Option(help="CSV of path,label (paths relative to DATA).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Validation share when there is no val/ folder.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the validation split.")] = 0,
    decoder: Annotated[DecoderName | None, typer.Option(help="fast or pil (default: as extraction).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
) -> None:
    """Report what a run would do with DATA: classes, skipped files and why, duplicates. Trains nothing.

    Example: finetune check ./mydata
    """
    from finetune.app.doctor import check as check_data

    report = check_data(
        data,
        val_fraction=val_fraction,
        seed=seed,
        labels_csv=labels,
        decoder=decoder.value if decoder else None,
    )
    if as_json:
        _echo_json(report.to_dict())
        return
    for line in report.lines():
        typer.echo(line)


# --------------------------------------------------------------------------- choosing, comparing, shipping


@app.command()
def advise(
    data: Annotated[Path, typer.Argument(help="Image folder to measure.")],
    backbone: Annotated[str, typer.Option(help="ImageNet-pretrained backbone to measure with.")] = "lite0",
    sample: Annotated[int, typer.Option(min=8, help="Images to measure familiarity on.")] = 256,
    labels: Annotated[
        Path | None, typer.Option(help="CSV of path,label[,split] instead of class folders.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable advice.")] = False,
) -> None:
    """Which of the four strategies fits DATA: how much data, and how far from ImageNet.

    Example: finetune advise ./mydata
    """
    from finetune.app.advise import advise as advise_data
    from finetune.app.advise import format_advice
    from finetune.data.index import scan

    advice = advise_data(scan(data, labels_csv=labels), backbone=backbone, device=device, sample=sample)
    typer.echo(json.dumps(advice.to_dict(), indent=2) if as_json else format_advice(advice))


@app.command()
def compare(
    data: Annotated[Path, typer.Argument(help="Image folder.")],
    strategy: Annotated[
        list[str] | None,
        typer.Option("--strategy", "-s", help="Recipe to include (repeatable; default: all four)."),
    ] = None,
    backbone: Annotated[str, typer.Option(help="Backbone name or alias.")] = "lite0",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override for every recipe, key=value.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where run folders and the plot go.")] = Path(
        "runs"
    ),
    val_fraction: Annotated[float, typer.Option(min=0.05, max=0.9, help="Validation share.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the shared split.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
) -> None:
    """Run several strategies on one split; print a table and write an accuracy-vs-time plot.

    Example: finetune compare ./mydata -s linear-probe -s stage-probe --set image_size=128
    """
    from finetune.app.compare import CompareOptions, format_rows
    from finetune.app.compare import compare as compare_strategies
    from finetune.recipes import STRATEGIES

    opts = CompareOptions(
        data=data,
        strategies=tuple(strategy or STRATEGIES),
        backbone=backbone,
        overrides=tuple(set_ or ()),
        out=out,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    rows, plot = compare_strategies(opts)
    typer.echo(format_rows(rows))
    typer.echo(f"plot: {plot}")


class ExportFormat(str, Enum):
    onnx = "onnx"
    pt2 = "pt2"


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder.")],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="onnx or pt2 (torch.export).")
    ] = ExportFormat.onnx,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Model file (default RUN/export/model.FORMAT).")
    ] = None,
) -> None:
    """Write a run's model as a standalone ONNX or torch.export file, with a JSON of its preprocessing.

    Example: finetune export runs/20261123-101500-lite0-linear-probe --format onnx
    """
    from finetune.app.export import export_run

    path = export_run(run_dir, fmt.value, out)
    typer.echo(f"wrote {path} and {path.with_suffix('.json')}")


@app.command("runs")
def runs_cmd(
    out: Annotated[Path, typer.Option("--runs", help="Folder holding run folders.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable rows.")] = False,
) -> None:
    """List past runs, newest first, with their headline accuracy.

    Example: finetune runs --runs runs
    """
    from finetune.app.runfolder import list_runs

    rows = list_runs(out)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        typer.echo(f"no runs under {out}; make one with `finetune run DATA` or `finetune demo`")
        return
    typer.echo(f"{'run':<48}{'strategy':<18}{'tap':<8}{'accuracy':>9}{'seconds':>9}")
    for r in rows:
        if r.get("status") == "interrupted":
            typer.echo(f"{printable(r['run']):<48}{r['strategy']:<18}interrupted at {r['where']}")
            typer.echo(f"{'':<4}continue with: {printable(r['resume'])}")
            continue
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        typer.echo(f"{r['run']:<48}{r['strategy']:<18}{r['tap']:<8}{acc:>9}{secs:>9}")


@app.command("recipes")
def recipes_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Full resolved recipes.")] = False,
) -> None:
    """List the packaged recipes (the four cells of the transfer-learning table) and their key settings.

    Example: finetune recipes
    """
    from finetune.recipes import packaged_recipes

    recipes = packaged_recipes()
    if as_json:
        _echo_json([r.to_dict() for r in recipes])
        return
    for r in recipes:
        if r.method == "probe":
            keys = f"head={r.head} layer={r.layer} pool={r.pool} C={list(r.c_grid)}"
        else:
            m = r.lr_mult
            keys = (
                f"epochs={r.epochs} {r.optimizer} lr={r.lr:g} lr_mult head/top/middle/bottom="
                f"{m.head:g}/{m.top:g}/{m.middle:g}/{m.bottom:g} top_stages={r.top_stages} "
                f"middle_stages={r.middle_stages}"
            )
        typer.echo(f"{r.name:<18}{r.description}\n{'':<18}{keys}")


# --------------------------------------------------------------------------- backbones


@app.command("backbones")
def backbones_cmd(
    name: Annotated[str | None, typer.Argument(help="Alias, timm name or tv:name (default: table).")] = None,
    taps: Annotated[bool, typer.Option("--taps", help="Named taps with their output shapes.")] = False,
    stages: Annotated[bool, typer.Option("--stages", help="Stages, bottom to top, with sizes.")] = False,
    input_size: Annotated[int | None, typer.Option(min=8, help="Input size for --taps shapes.")] = None,
) -> None:
    """The catalogue: aliases, families, parameters, input size and weights status; or one backbone.

    Example: finetune backbones vgg16 --taps --stages
    """
    from finetune.models.describe import catalogue_text, describe

    typer.echo(catalogue_text() if name is None else describe(name, taps, stages, input_size))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
