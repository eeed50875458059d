"""The `finetune` command line: parse, call one library function, print. No logic lives here.

    finetune run ./mydata --backbone vgg16 --strategy linear-probe
    finetune predict img.jpg
    finetune demo

Every user mistake (a `FinetuneError` from the library, or a bad option) becomes one line
on stderr and exit code 2. Heavy libraries (torch, timm, sklearn) are imported inside the
commands, so `finetune --help` answers at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperGroup

try:  # typer >= 0.26 ships its own copy of click; its exceptions are the ones raised
    from typer._click import echo
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import echo
    from click import exceptions as click_errors

from finetune.console import printable, setup_logging, text_table
from finetune.errors import FinetuneError


def _fail(message: str, code: int = 2) -> None:
    echo(f"error: {printable(message)}", err=True)
    sys.exit(code)


# OSErrors that mean "cannot write here" (a full disk, a read-only place): one line, not a traceback.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _tolerant_streams() -> None:
    """A terminal whose encoding cannot show a name (ASCII, Latin-1) gets "?" instead of a crash."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a stream that cannot change: leave it
                reconfigure(errors="replace")


class _Argument(TyperArgument):
    """An argument named in capitals (DATA, RUN, IMAGE...): its help shows no Python type beside it."""

    def display_type_rich(self, ctx) -> None:  # noqa: D102
        return None


class _Group(TyperGroup):
    """Maps domain errors and usage errors to one line and exit code 2."""

    def get_command(self, ctx, cmd_name):  # noqa: D102
        command = super().get_command(ctx, cmd_name)
        for param in getattr(command, "params", ()):
            if type(param) is TyperArgument:
                param.__class__ = _Argument  # same object, same parsing; only its help line differs
        return command

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        setup_logging()
        _tolerant_streams()
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
        except OSError as err:
            if err.errno not in _WRITE_ERRNOS:
                raise
            where = err.filename or "a file"
            _fail(f"cannot write {where}: {err.strerror} — free some space or choose another place (-o)")
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


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"finetune {version('finetune')}")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            typer.echo("finetune (not installed)")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Transfer learning for image folders: probe or fine-tune an ImageNet CNN on your images."""


def _device(value: str) -> str:
    """--device checked before any work: a name this machine has (auto, cpu, cuda, cuda:N, mps)."""
    from finetune.runtime import check_device

    try:
        return check_device(value)
    except FinetuneError as err:
        raise typer.BadParameter(str(err)) from None


# The options several commands share, spelled and ranged the same way everywhere.
MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit (recipes.MAX_SEED)
DeviceOpt = Annotated[
    str, typer.Option("--device", metavar="DEVICE", callback=_device, help="auto | cpu | cuda | cuda:N | mps")
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", metavar="N", min=0, help="Decode worker processes (default: cores; 0: none)."),
]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", min=0, max=MAX_SEED, help="Seed of the split.")]
ValFractionOpt = Annotated[
    float,
    typer.Option(
        "--val-fraction",
        metavar="F",
        min=0.05,
        max=0.9,
        help="Validation share when DATA has no val/ folder.",
    ),
]
LabelsOpt = Annotated[
    Path | None,
    typer.Option("--labels", metavar="CSV", help="CSV of path,label[,split] (paths relative to DATA)."),
]
PretrainedOpt = Annotated[
    bool, typer.Option("--pretrained/--no-pretrained", help="ImageNet weights, or random init.")
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", metavar="FILE", help="Weights file (.safetensors or state dict).")
]
BackboneOpt = Annotated[
    str, typer.Option("--backbone", "-b", metavar="NAME", help="Alias, timm name or tv:name.")
]
DataArg = Annotated[
    Path, typer.Argument(metavar="DATA", help="Folder of class subfolders (or train/ val/ [test/]).")
]
RunArg = Annotated[Path, typer.Argument(metavar="RUN", help="Run folder written by `finetune run`.")]
NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache", help="Neither read nor write the cache (features, checked headers, fitted heads)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


class Head(str, Enum):
    logreg = "logreg"
    svm = "svm"
    knn = "knn"


class LinearHead(str, Enum):  # `finetune probe`'s DeCAF table compares the linear heads
    logreg = "logreg"
    svm = "svm"


TTAOpt = Annotated[
    bool,
    typer.Option("--tta", help="Test-time augmentation: average each image with its mirror image."),
]


class WeightsMap(str, Enum):
    name = "name"
    positional = "positional"


# Every command that may build a pretrained network takes it; FINETUNE_OFFLINE=1 or HF_HUB_OFFLINE=1
# say the same.
Offline = Annotated[
    bool, typer.Option("--offline", help="Use only cached weights; never download (see `finetune fetch`).")
]


# --------------------------------------------------------------------------- run


def _given(ctx: typer.Context) -> set[str]:
    """The parameters typed on the command line (or set by an environment variable), not defaults."""
    return {
        name
        for name in ctx.params
        if (source := ctx.get_parameter_source(name)) is not None
        and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")
    }


@app.command()
def run(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Argument(
            metavar="DATA",
            help="Folder of class subfolders (or train/ val/ [test/]); optional when --config gives data.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="FILE",
            help="A run in a TOML file (e.g. a run folder's run.toml); options given here win.",
        ),
    ] = None,
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy",
            "-s",
            metavar="NAME",
            help="linear-probe | stage-probe | partial-finetune | full-finetune | auto",
        ),
    ] = "linear-probe",
    backbone: BackboneOpt = "lite0",
    head: Annotated[
        Head | None,
        typer.Option(help="Probe head: logreg, svm or knn (cosine k-NN; overrides the recipe)."),
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", metavar="FILE", help="A recipe TOML file of your own.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="KEY=VALUE", help="Override a recipe key (see `finetune recipes --keys`)."
        ),
    ] = None,
    weights: WeightsOpt = None,
    weights_map: Annotated[
        WeightsMap, typer.Option(help="Match --weights tensors by name or position.")
    ] = WeightsMap.name,
    pretrained: PretrainedOpt = True,
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="FOLDER", help="Where run folders go (not inside DATA).")
    ] = Path("runs"),
    val_fraction: ValFractionOpt = 0.2,
    labels: LabelsOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", metavar="RUN", help="Resume an interrupted fine-tuning run folder."),
    ] = None,
    compile_: Annotated[
        bool, typer.Option("--compile", help="torch.compile the network (fine-tuning).")
    ] = False,
    seed: SeedOpt = 0,
    no_cache: NoCacheOpt = False,
    offline: Offline = False,
    keep_checkpoints: Annotated[
        bool, typer.Option("--keep-checkpoints", help="Keep checkpoint/ in a finished fine-tune's folder.")
    ] = False,
    log: Annotated[
        list[str] | None,
        typer.Option(
            "--log",
            metavar="KIND",
            help="Fine-tuning logs: csv (history.csv, always) | tensorboard (RUN/tensorboard/); "
            "repeatable or a comma list.",
        ),
    ] = None,
) -> None:
    """Train and evaluate on DATA; write a run.

    The strategy's recipe probes or fine-tunes the backbone; the run folder holds the model,
    its metrics, report.html and run.toml, the resolved run.

    --config FILE holds a whole run: top-level keys are this command's options by their names
    (data, strategy, backbone, out, seed, ...; recipe_file for --recipe, cache = false for
    --no-cache) and a [recipe] table holds recipe keys. Its relative paths are read from the
    file's folder. What wins, lowest first:

    \b
      recipe:   packaged < recipe_file < [recipe] < head < --set
      options:  the config file < options given on the command line

    Example: finetune run ./mydata --backbone vgg16 --strategy linear-probe

    Again, another seed: finetune run --config runs/20260101-120000-lite0-linear-probe/run.toml --seed 1
    """
    from finetune.app.pipeline import run as run_pipeline
    from finetune.app.report import print_run_summary
    from finetune.runconfig import from_command_line

    opts = from_command_line(ctx.params, _given(ctx), config)
    result = run_pipeline(opts)
    if result.main:  # under torchrun only rank 0 prints
        print_run_summary(result)


# --------------------------------------------------------------------------- lr-find


@app.command("lr-find")
def lr_find(
    data: DataArg,
    strategy: Annotated[
        str, typer.Option("--strategy", "-s", metavar="NAME", help="partial-finetune | full-finetune")
    ] = "partial-finetune",
    backbone: BackboneOpt = "lite0",
    recipe: Annotated[
        Path | None, typer.Option("--recipe", metavar="FILE", help="A recipe TOML file of your own.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="KEY=VALUE", help="Override a recipe key (see `finetune recipes --keys`)."
        ),
    ] = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = True,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="FOLDER", help="Where its folder goes (not inside DATA)."),
    ] = Path("runs"),
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps", metavar="N", min=2, help="Training steps (default 100, fewer on a small set)."
        ),
    ] = None,
    start_lr: Annotated[
        float, typer.Option("--start-lr", metavar="LR", min=0, help="Lowest lr tried.")
    ] = 1e-7,
    end_lr: Annotated[
        float, typer.Option("--end-lr", metavar="LR", min=0, help="Highest lr tried (at most 10).")
    ] = 10.0,
    val_fraction: ValFractionOpt = 0.2,
    labels: LabelsOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    offline: Offline = False,
) -> None:
    """Find a fine-tuning learning rate.

    The learning-rate range test: a copy of the model is trained as `run` would while the lr
    grows exponentially, until the smoothed loss diverges; the suggestion is fastai's valley
    rule (the middle of the longest descent). Writes lr-find.csv and lr-find.png;
    `run --set lr=auto` does this first.

    Example: finetune lr-find ./mydata --strategy full-finetune --backbone resnet50
    """
    from finetune.app.pipeline import lr_find as find
    from finetune.method import RunOptions

    opts = RunOptions(
        data=data,
        strategy=strategy,
        recipe_file=recipe,
        overrides=tuple(set_ or ()),
        backbone=backbone,
        weights=weights,
        pretrained=pretrained,
        out=out,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
        workers=workers,
        labels_csv=labels,
        offline=offline,
    )
    found = find(opts, steps=steps, start=start_lr, end=end_lr)
    if not found.main:  # under torchrun only rank 0 prints
        return
    test = found.test
    where = f"diverged at lr {test.divergence_lr:.3g}" if test.diverged is not None else "no divergence"
    typer.echo(f"{len(test.lrs)} steps from lr {test.lrs[0]:.3g} to {test.lrs[-1]:.3g}: {where}")
    typer.echo(f"rule: {test.rule} (the middle of the longest descent of the smoothed loss)")
    typer.echo(f"points: {printable(str(found.folder / 'lr-find.csv'))}")
    typer.echo(f"figure: {printable(str(found.folder / 'lr-find.png'))}")
    typer.echo(f"suggested lr: {test.suggested:g}")


# --------------------------------------------------------------------------- predict


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(metavar="IMAGE", help="Image files and/or folders.")],
    run_dir: Annotated[
        Path | None, typer.Option("--run", metavar="RUN", help="Run folder (default: newest under runs/).")
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", metavar="K", min=1, help="Classes to show per image.")
    ] = 1,
    runs_root: Annotated[
        Path, typer.Option("--runs", metavar="FOLDER", help="Where to look for the newest run.")
    ] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image and line.")] = False,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", metavar="FILE", help="Also write the rows to this CSV file.")
    ] = None,
    device: DeviceOpt = "auto",
    tta: TTAOpt = False,
) -> None:
    """Classify images with a run's model.

    The newest run under --runs unless --run says which; ImageNet labels when there is none. Rows
    are printed (and written to --csv) as they come; on CPU the run's model runs on ONNX Runtime
    without importing PyTorch (--device cuda uses PyTorch).

    Example: finetune predict img.jpg photos/ --top-k 3 --csv predictions.csv
    """
    from finetune.app.predict import stream

    result = stream(
        paths,
        run_dir=run_dir,
        top_k=top_k,
        runs_root=runs_root,
        device=device,
        csv_file=csv_file,
        tta=tta,
    )
    if as_json:
        for row in result.rows:
            typer.echo(json.dumps(row))
        return
    # One aligned line per image, printed as it comes: every column before the path has a width
    # known up front (the longest class name, the score), so a million files never wait in memory.
    k = max(1, min(top_k, len(result.class_names)))
    name_w = max([len(printable(n)) for n in result.class_names] + [7])
    score_w = len(result.score_kind)
    cells = [(f"class {r}" if k > 1 else "class", result.score_kind) for r in range(1, k + 1)]
    head = "  ".join(f"{c:<{name_w}}  {s:>{score_w}}" for c, s in cells) + "  image"
    typer.echo(head)
    typer.echo("─" * len(head))
    for row in result.rows:
        if "error" in row:
            typer.echo(f"skipped {printable(row['path'])}: {row['error']}", err=True)
            continue
        tops = "  ".join(f"{printable(t['label']):<{name_w}}  {t['score']:>{score_w}.3f}" for t in row["top"])
        typer.echo(f"{tops}  {printable(row['path'])}")


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="FOLDER", help="Where the run folder goes.")
    ] = Path("runs"),
) -> None:
    """Probe the packaged backbone on digits.

    sklearn's handwritten digits are written as PNG files into the cache and probed with lite0.

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
    data: DataArg,
    layer: Annotated[
        list[str] | None,
        typer.Option("--layer", "-l", metavar="TAP", help="Tap to read (repeatable), e.g. fc6."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="FILE", help="Output file: .npz or .safetensors.")
    ] = Path("features.npz"),
    backbone: BackboneOpt = "lite0",
    pool: Annotated[Pool, typer.Option(help="Pooling of conv taps; none keeps (C, H, W) maps.")] = Pool.avg,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = True,
    batch_size: Annotated[
        int, typer.Option("--batch-size", metavar="N", min=1, help="Images per forward pass.")
    ] = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    no_cache: NoCacheOpt = False,
    labels: LabelsOpt = None,
    val_fraction: ValFractionOpt = 0.2,
    seed: SeedOpt = 0,
    offline: Offline = False,
) -> None:
    """Save named layers' features (DeCAF-style).

    One pass over every image of DATA; one array per layer, with labels, paths and split.

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
        offline=offline,
    )
    s = extract_to_file(opts)
    if not s.main:  # under torchrun only rank 0 reports
        return
    shapes = ", ".join(f"{t} {'x'.join(map(str, shape))}" for t, shape in s.shapes.items())
    typer.echo(f"wrote {printable(str(s.out))}: {s.images} images; {shapes}")
    typer.echo(
        f"{s.seconds:.1f} s, {s.images / max(s.seconds, 1e-9):.0f} img/s ({s.engine}); "
        f"cache hits {s.cache_hits}; skipped {len(s.skipped)}"
    )


@app.command()
def probe(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="A features file written by extract-features.")
    ],
    layer: Annotated[
        list[str] | None,
        typer.Option("--layer", "-l", metavar="TAP", help="Layer(s) to probe (default: all)."),
    ] = None,
    head: Annotated[
        list[LinearHead] | None,
        typer.Option(metavar="HEAD", help="logreg and/or svm, repeatable (default: both)."),
    ] = None,
    repeats: Annotated[
        int, typer.Option(metavar="N", min=1, help="Seeded stratified splits to average over.")
    ] = 5,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction", metavar="F", min=0.05, max=0.9, help="Validation share of each split."
        ),
    ] = 0.2,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Linear heads on saved features, per layer.

    A layer x head table of validation accuracy (0-1), mean ± std over seeded splits.

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


cache_app = typer.Typer(help="Show or empty the feature cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info_cmd(as_json: JsonOpt = False) -> None:
    """Where the cache is and what it holds.

    One row per feature set (model, weights, input size, decoder, tap), then the other parts.

    Example: finetune cache info --json
    """
    from finetune.features.cache import cache_info, cache_parts
    from finetune.io import cache_root

    rows, parts = cache_info(), cache_parts()
    if as_json:
        _echo_json({"root": str(cache_root()), "sets": rows, "other": parts})
        return
    typer.echo(f"cache: {printable(str(cache_root()))}\n")
    mib = 2**20
    sets = [
        [
            r["model"],
            r["weights"],
            r["input_size"],
            r["decoder"],
            r["tap"],
            r["pool"],
            r["rows"],
            f"{r['bytes'] / mib:.1f}",
        ]
        for r in rows
    ]
    header = ["model", "weights sha256", "size", "decoder", "tap", "pool", "images", "MiB"]
    typer.echo(text_table(header, sets, right=(2, 6, 7), title=f"feature sets: {len(rows)}"))
    other = [
        [f"{sub}/", p["what"], p["files"], f"{p['bytes'] / mib:.1f}", "kept" if p["kept"] else "cleared"]
        for sub, p in parts.items()
    ]
    typer.echo("")
    typer.echo(text_table(["folder", "holds", "files", "MiB", "by cache clear"], other, right=(2, 3)))
    total = sum(r["bytes"] for r in rows) + sum(p["bytes"] for p in parts.values() if not p["kept"])
    typer.echo(f"\n`finetune cache clear` frees {total / mib:.1f} MiB")


@cache_app.command("clear")
def cache_clear_cmd() -> None:
    """Empty the cache; the demo's datasets stay.

    Deletes cached features, exported engines, cut networks, backbone cards, fitted heads and
    checked image headers (all rebuilt on demand).

    Example: FINETUNE_CACHE=/scratch/ft finetune cache clear
    """
    from finetune.features.cache import cache_clear, cache_parts
    from finetune.io import cache_root

    freed = cache_clear()
    typer.echo(f"freed {freed / 2**20:.1f} MiB in {cache_root()}")
    for sub, p in cache_parts().items():
        if p["kept"] and p["files"]:
            typer.echo(f"kept {sub}/ ({p['what']}: {p['files']} files, {p['bytes'] / 2**20:.1f} MiB)")


# --------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    run_dir: RunArg,
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Held-out images in class folders.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", metavar="FOLDER", help="Default: RUN/eval-<DATA name>/ (not inside DATA)."
        ),
    ] = None,
    as_json: JsonOpt = False,
    labels: LabelsOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", metavar="N", min=1, help="Images per forward pass.")
    ] = 64,
    tta: TTAOpt = False,
) -> None:
    """Judge a run on a held-out folder.

    Accuracy, top-5, per-class P/R/F1, calibration (ECE) and figures, written under RUN/eval-*/.

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
        tta=tta,
    )
    if as_json:
        _echo_json(ev.to_dict())
        return
    print_evaluation(ev)


# --------------------------------------------------------------------------- summary


@app.command()
def summary(
    backbones: Annotated[
        list[str],
        typer.Argument(metavar="BACKBONE", help="Backbone name(s): alias, timm name or tv:name."),
    ],
    input_size: Annotated[
        int | None,
        typer.Option("--input-size", "-i", metavar="PX", min=1, help="Input side (default: the weights')."),
    ] = None,
    depth: Annotated[
        int | None,
        typer.Option("--depth", "-d", metavar="K", min=0, help="Fold rows to K name levels; 0: per stage."),
    ] = None,
    strategy: Annotated[
        str, typer.Option("--strategy", "-s", metavar="NAME", help="Recipe deciding the train column.")
    ] = "linear-probe",
    csv_file: Annotated[
        Path | None, typer.Option("--csv", metavar="FILE", help="Also write the rows to this CSV.")
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="One line per backbone: params, MACs, memory, top-1/top-5.")
    ] = False,
) -> None:
    """Per-layer shapes, memory, parameters, MACs.

    Computed on random weights, offline.

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
    data: DataArg,
    labels: LabelsOpt = None,
    val_fraction: ValFractionOpt = 0.2,
    seed: SeedOpt = 0,
    decoder: Annotated[DecoderName | None, typer.Option(help="fast or pil (default: as extraction).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check DATA as a run would read it.

    Classes, skipped files and why, duplicates; trains nothing.

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
    data: DataArg,
    backbone: BackboneOpt = "lite0",
    sample: Annotated[int, typer.Option(metavar="N", min=8, help="Images to measure familiarity on.")] = 256,
    labels: LabelsOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    as_json: JsonOpt = False,
    offline: Offline = False,
) -> None:
    """Which strategy fits DATA, and why.

    Measures how much data there is and how far it is from ImageNet, against two thresholds.

    Example: finetune advise ./mydata
    """
    from finetune.app.advise import advise as advise_data
    from finetune.app.advise import format_advice
    from finetune.data.index import scan

    advice = advise_data(
        scan(data, labels_csv=labels),
        backbone=backbone,
        device=device,
        workers=workers,
        sample=sample,
        offline=offline,
    )
    typer.echo(json.dumps(advice.to_dict(), indent=2) if as_json else format_advice(advice))


@app.command()
def compare(
    data: DataArg,
    strategy: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy", "-s", metavar="NAME", help="Recipe to include (repeatable; default: all four)."
        ),
    ] = None,
    backbone: BackboneOpt = "lite0",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Override for the recipes that use the key."),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", metavar="FOLDER", help="Where run folders and the plot go (not inside DATA)."
        ),
    ] = Path("runs"),
    val_fraction: ValFractionOpt = 0.2,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    offline: Offline = False,
) -> None:
    """Run several strategies on one split.

    Prints a table and writes an accuracy-vs-time plot.

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
        workers=workers,
        offline=offline,
    )
    rows, plot = compare_strategies(opts)
    typer.echo(format_rows(rows))
    typer.echo(f"plot: {printable(str(plot))}")


class ExportFormat(str, Enum):
    onnx = "onnx"
    pt2 = "pt2"


@app.command()
def export(
    run_dir: RunArg,
    fmt: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="onnx or pt2 (torch.export).")
    ] = ExportFormat.onnx,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="FILE", help="Model file (default RUN/export/model.FORMAT)."),
    ] = None,
) -> None:
    """Save a run's model as ONNX or torch.export.

    A standalone file, with a JSON of its preprocessing and class names.

    Example: finetune export runs/20261123-101500-lite0-linear-probe --format onnx
    """
    from finetune.app.export import export_run

    path = export_run(run_dir, fmt.value, out)
    typer.echo(f"wrote {printable(str(path))} and {printable(str(path.with_suffix('.json')))}")


@app.command("runs")
def runs_cmd(
    out: Annotated[Path, typer.Option("--runs", metavar="FOLDER", help="Folder holding run folders.")] = Path(
        "runs"
    ),
    as_json: JsonOpt = False,
) -> None:
    """List past runs with their accuracy.

    Newest first; the accuracy is the headline split's (test when there is one, else val).

    Example: finetune runs --runs runs
    """
    from finetune.app.runfolder import list_runs

    rows = list_runs(out)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        typer.echo(
            f"no runs under {printable(str(out))}; make one with `finetune run DATA` or `finetune demo`"
        )
        return

    def note(r: dict) -> str:
        if r.get("status") == "interrupted":
            return f"interrupted at {r['where']}"
        return f"damaged: {r['damaged']}" if r.get("damaged") else ""

    cells = [
        [
            r["run"],
            r["strategy"],
            r["tap"],
            r["classes"],
            r["split"],
            f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-",
            f"{r['seconds']:.1f}" if r["seconds"] is not None else "-",
            note(r),
        ]
        for r in rows
    ]
    header = ["run", "strategy", "tap", "classes", "split", "accuracy", "seconds", "note"]
    typer.echo(text_table(header, cells, right=(3, 5, 6)))
    for r in rows:
        if r.get("status") == "interrupted":
            typer.echo(f"continue {printable(r['run'])} with: {printable(r['resume'])}")


@app.command("recipes")
def recipes_cmd(
    as_json: JsonOpt = False,
    keys: Annotated[
        bool, typer.Option("--keys", help="The keys --set takes, and which recipes use each.")
    ] = False,
) -> None:
    """List the packaged recipes.

    The four cells of the transfer-learning table, with their key settings.

    Example: finetune recipes --keys
    """
    from finetune.recipes import key_table, packaged_recipes

    if keys:
        rows = key_table()
        if as_json:
            _echo_json(rows)
            return
        cells = [[r["key"], r["type"], ", ".join(r["methods"]), r["default"]] for r in rows]
        typer.echo(text_table(["key", "values", "used by", "default"], cells))
        return
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
    name: Annotated[
        str | None, typer.Argument(metavar="BACKBONE", help="Alias, timm name or tv:name (default: table).")
    ] = None,
    taps: Annotated[bool, typer.Option("--taps", help="Named taps with their output shapes.")] = False,
    stages: Annotated[bool, typer.Option("--stages", help="Stages, bottom to top, with sizes.")] = False,
    input_size: Annotated[
        int | None, typer.Option("--input-size", metavar="PX", min=8, help="Input size for --taps shapes.")
    ] = None,
) -> None:
    """List the backbones, or describe one.

    Aliases, families, parameters, input size and weights status; with NAME, its taps and stages.

    Example: finetune backbones vgg16 --taps --stages
    """
    from finetune.models.describe import catalogue_text, describe

    typer.echo(catalogue_text() if name is None else describe(name, taps, stages, input_size))


@app.command("fetch")
def fetch_cmd(
    backbones: Annotated[
        list[str], typer.Argument(metavar="BACKBONE", help="Backbone name(s): alias, timm name or tv:name.")
    ],
) -> None:
    """Download ImageNet weights ahead of time.

    For a machine that will be offline: the weights go into the frameworks' caches, and the
    folders to copy are printed.

    Example: finetune fetch vgg16 alexnet resnet50
    """
    from finetune.models.fetch import cache_folders, fetch_backbones

    fetched = fetch_backbones(backbones)
    for name, info in fetched:
        if info is None:
            typer.echo(f"{name}: packaged with finetune, nothing to fetch")
            continue
        origin = f"{info.repo}@{(info.revision or '?')[:12]}" if info.repo else info.url
        size = Path(info.path).stat().st_size / 1e6
        typer.echo(f"{name}: {origin} {info.file}, {size:.1f} MB, sha256 {info.sha256}\n  {info.path}")
    folders = cache_folders([info for _, info in fetched])
    if folders:
        typer.echo(
            f"for an offline machine, copy {' and '.join(folders)} to the same place there "
            "(cp -a keeps the Hub cache's links), or point HF_HOME / TORCH_HOME at the copies"
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
