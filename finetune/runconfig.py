"""A whole run in a TOML file (`finetune run --config run.toml`), and the run.toml of every run folder.

    # run.toml — relative paths are read from this file's folder
    data = "mydata"
    strategy = "partial-finetune"
    backbone = "resnet50"
    seed = 1

    [recipe]                 # recipe keys, as --set takes them (`finetune recipes --keys`)
    epochs = 5
    lr = "auto"

    [recipe.lr_mult]
    top = 0.2

    opts = run_options("run.toml", {"seed": 2})                    # a RunOptions: the file, then these
    opts = run_options(None, {"data": "mydata", "recipe": {"epochs": 3}})   # `finetune.run` from Python
    write_run_toml(run_dir, opts, recipe)                          # what a finished run writes

The top-level keys are the options of `finetune run` (`OPTIONS`; `CLI_NAMES` says which
command-line parameter each one is); `[recipe]` holds recipe keys. What wins, lowest first:

    recipe:  packaged recipe < recipe_file (--recipe) < [recipe] < head (--head) < --set
    options: the config file < what the command line (or Python's keywords) gives explicitly

A run folder's run.toml holds the resolved run: every option with absolute paths and the fully
resolved recipe (the lr `lr = "auto"` found, the seeds), so `finetune run --config RUN/run.toml`
trains the same model again, into a new run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError, RecipeError
from finetune.method import RunOptions
from finetune.recipes import CHOICES, MAX_SEED, Recipe, load_recipe, read_toml, recipe_from_dict, toml_value

RUN_FILE = "run.toml"  # in every run folder: the resolved run, for --config
VAL_FRACTION = (0.05, 0.9)  # as --val-fraction takes it


class _Bad(ValueError):
    """A value of the wrong type or range; its message says what the key takes."""


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a non-empty string")
    return value


def _path(value: Any) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a path (a non-empty string)")
    return Path(value).expanduser()


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if isinstance(value, Enum):  # the command line's choices (Head.svm)
            value = value.value
        if value not in choices:
            raise _Bad(f"one of {', '.join(choices)}")
        return value

    return check


def _integer(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < lo
            or (hi is not None and value > hi)
        ):
            raise _Bad(f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}")
        return int(value)

    return check


def _number(lo: float, hi: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Bad(f"a number from {lo:g} to {hi:g}")
        if not lo <= value <= hi:
            raise _Bad(f"a number from {lo:g} to {hi:g}")
        return float(value)

    return check


def _logs(value: Any) -> tuple[str, ...]:
    """ "tensorboard", "csv,tensorboard" or a list of them; the kinds are checked by the run."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise _Bad('a kind of log or a list of them, e.g. ["csv", "tensorboard"]')
    return tuple(items)


@dataclass(frozen=True)
class Option:
    """One top-level key: the `RunOptions` field it sets (None: a recipe override) and its check."""

    field: str | None
    check: Callable[[Any], Any]
    path: bool = False  # relative to the config file's folder


# Every option of `finetune run`, by its config key (the Python keyword of `finetune.run`).
OPTIONS: dict[str, Option] = {
    "data": Option("data", _path, path=True),
    "strategy": Option("strategy", _text),
    "backbone": Option("backbone", _text),
    "head": Option(None, _choice(*CHOICES["head"])),  # the recipe's head, over [recipe], under --set
    "recipe_file": Option("recipe_file", _path, path=True),
    "weights": Option("weights", _path, path=True),
    "weights_map": Option("weights_map", _choice("name", "positional")),
    "pretrained": Option("pretrained", _bool),
    "out": Option("out", _path, path=True),
    "val_fraction": Option("val_fraction", _number(*VAL_FRACTION)),
    "labels": Option("labels_csv", _path, path=True),
    "device": Option("device", _text),
    "workers": Option("workers", _integer(0)),
    "resume": Option("resume", _path, path=True),
    "compile": Option("compile", _bool),
    "seed": Option("seed", _integer(0, MAX_SEED)),
    "cache": Option("cache", _bool),
    "offline": Option("offline", _bool),
    "keep_checkpoints": Option("keep_checkpoints", _bool),
    "log": Option("log", _logs),
}

# `finetune.evaluate(run_dir, data, **options)`: the options of `finetune evaluate`, as Python keywords.
EVALUATE_OPTIONS: dict[str, Option] = {
    "out": Option("out", _path),
    "labels": Option("labels_csv", _path),
    "device": Option("device", _text),
    "workers": Option("workers", _integer(0)),
    "batch_size": Option("batch_size", _integer(1)),
}
RECIPE_TABLE = "recipe"  # the [recipe] table: recipe keys, as --set

# The parameters of the `run` command (cli.py), by their Python names, and the config key each
# sets. `--set` adds to [recipe]; `--no-cache` is `cache = false`.
CLI_NAMES: dict[str, str] = {name: name for name in OPTIONS}
CLI_NAMES.update({"recipe": "recipe_file", "set_": RECIPE_TABLE, "compile_": "compile", "no_cache": "cache"})
_FROM_CLI: dict[str, Callable[[Any], Any]] = {"no_cache": lambda v: not v}


@dataclass(frozen=True)
class _Layer:
    """The checked values of one source (a config file, or keywords), and how to name it."""

    values: dict[str, Any]
    recipe: list[str]  # `key=literal` overrides from [recipe], in --set's syntax
    recipe_keys: list[str]
    where: str  # "run.toml: " or ""


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The TOML table of a config file.

    Raises:
        ConfigError: no such file, not UTF-8, or not TOML (with the line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist", "pass a TOML file, e.g. a run folder's run.toml"
        )
    return read_toml(path, what="config file", error=ConfigError)


def _unknown(key: str, where: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
    what = f"{where}unknown key {key!r}" if where else f"unknown option {key!r}"
    return ConfigError(what, hint)


def _recipe_layer(table: Any, where: str) -> tuple[list[str], list[str]]:
    """([recipe] as `key=literal` overrides, its top-level keys), checked as a recipe checks them."""
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"{where}recipe must be a table of recipe keys, got {table!r}",
            "write [recipe] with keys as `finetune recipes --keys` lists them",
        )
    nested: dict[str, Any] = {}
    for key, value in table.items():  # "lr_mult.top" (as --set spells it) -> lr_mult = {top = ...}
        head, dot, sub = str(key).partition(".")
        if dot and head == "lr_mult":
            nested.setdefault("lr_mult", {})[sub] = value
        else:
            nested[key] = list(value) if isinstance(value, tuple) else value
    try:
        recipe = recipe_from_dict(nested)
    except RecipeError as err:
        raise ConfigError(f"{where}[recipe] {err.what}" if where else err.what, err.todo) from None
    overrides = []
    for key, value in nested.items():
        if key == "lr_mult":
            overrides += [f"lr_mult.{m}={toml_value(getattr(recipe.lr_mult, m))}" for m in value]
        else:  # the checked value (a float for 1, a tuple for c_grid): written back as TOML
            overrides.append(f"{key}={toml_value(getattr(recipe, key))}")
    return overrides, list(nested)


def check_keywords(
    raw: Mapping[str, Any],
    table: Mapping[str, Option],
    where: str = "",
    base: Path | None = None,
    command: str = "run",
) -> dict[str, Any]:
    """`raw`'s values checked against `table` (None: not given); paths relative to `base` if given.

    `where` names the source in messages ("run.toml: "; "" for Python's keywords), `command` the
    command whose --help lists the options.

    Raises:
        ConfigError: a key not in `table` (did you mean ...?), or a value it does not take.
    """
    values: dict[str, Any] = {}
    for key, value in raw.items():
        option = table.get(key)
        if option is None:
            raise _unknown(key, where, [*table, *([RECIPE_TABLE] if command == "run" else [])])
        if value is None:  # Python's "not given" (TOML has no null)
            continue
        try:
            checked = option.check(value)
        except _Bad as err:
            name = f"{where}{key}" if where else f"option {key}"
            raise ConfigError(
                f"{name} must be {err}, got {value!r}", f"see `finetune {command} --help`"
            ) from None
        if option.path and base is not None and not checked.is_absolute():
            checked = base / checked
        values[key] = checked
    return values


def _layer(raw: Mapping[str, Any], where: str = "", base: Path | None = None) -> _Layer:
    """One source of a run's settings, checked: its options, and its [recipe] as overrides."""
    table = raw.get(RECIPE_TABLE)
    recipe, recipe_keys = _recipe_layer(table, where) if table is not None else ([], [])
    values = check_keywords({k: v for k, v in raw.items() if k != RECIPE_TABLE}, OPTIONS, where, base)
    return _Layer(values, recipe, recipe_keys, where)


def run_options(
    config: str | os.PathLike | None = None,
    given: Mapping[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> RunOptions:
    """The RunOptions of a run: `config`'s values, then `given`'s, then `sets` (--set).

    Args:
        config: a TOML file of options and a [recipe] table; its relative paths are read from
            its folder.
        given: options by their config keys (`OPTIONS`), `recipe` a dict of recipe keys; a value
            None is not given.
        sets: `key=value` recipe overrides that win over everything (the command line's --set).

    Raises:
        ConfigError: an unknown key (with a did-you-mean), a value of the wrong type or range, a
            config file that is not TOML, no data folder, or recipe keys the recipe does not use.
    """
    layers = []
    if config is not None:
        path = Path(config).expanduser()
        layers.append(_layer(read_config(path), f"{path}: ", path.parent))
    layers.append(_layer(given or {}))
    values = {k: v for layer in layers for k, v in layer.values.items()}
    overrides = [item for layer in layers for item in layer.recipe]
    if "head" in values:
        overrides.append(f"head={toml_value(values['head'])}")
    if "data" not in values:
        raise ConfigError(
            "no data folder given",
            'pass DATA, or write data = "FOLDER" in the config file',
        )
    fields = {OPTIONS[k].field: v for k, v in values.items() if OPTIONS[k].field is not None}
    opts = RunOptions(overrides=(*overrides, *sets), **fields)
    for layer in layers:
        _refuse_unused(opts, layer)
    return opts


def _refuse_unused(opts: RunOptions, layer: _Layer) -> None:
    """Recipe keys of a layer that the chosen recipe would ignore: refused, naming where they are.

    `auto` chooses its recipe after looking at the data: the run warns about them then. A `head`
    given on the command line (or from Python) is refused by the run itself, as `--head`.
    """
    names = [f"[recipe] {k}" if layer.where else f"recipe key {k!r}" for k in layer.recipe_keys]
    keys = list(layer.recipe_keys)
    if layer.where and "head" in layer.values:
        names, keys = [*names, "head"], [*keys, "head"]
    if not keys or opts.strategy == "auto" or opts.resume is not None:
        return
    recipe = load_recipe(opts.strategy, opts.recipe_file, opts.overrides, strict=False)
    unused = [name for name, k in zip(names, keys) if k not in recipe.keys]
    if unused:
        does = "fits a head on frozen features" if recipe.is_probe else "fine-tunes the network"
        raise ConfigError(
            f"{layer.where}{', '.join(unused)}: not used by the {recipe.name} recipe, which {does}",
            "drop it, or choose a strategy that uses it (see `finetune recipes --keys`)",
        )


def from_command_line(
    params: Mapping[str, Any], explicit: Collection[str], config: str | os.PathLike | None = None
) -> RunOptions:
    """The RunOptions of `finetune run`: `config`, then the parameters given on the command line.

    Args:
        params: the `run` command's parameters by their Python names (`CLI_NAMES`).
        explicit: the names given on the command line (not left at their defaults): only
            these override the config file.
    """
    given: dict[str, Any] = {}
    sets: list[str] = []
    for name, value in params.items():
        key = CLI_NAMES.get(name)
        if key is None or name not in explicit:
            continue  # `config` itself; a default leaves the file's value (or the library's default)
        if key == RECIPE_TABLE:
            sets = list(value or ())
            continue
        value = _FROM_CLI.get(name, lambda v: v)(value)
        given[key] = value.value if isinstance(value, Enum) else value
    return run_options(config, given, sets)


# --------------------------------------------------------------------------- the run folder's run.toml


def _base_strategy(recipe: Recipe) -> str:
    """A packaged recipe to start from: the recipe's own name, else one of the same method.

    run.toml's [recipe] lists every key the method reads, so the start only fills keys it ignores.
    """
    from finetune.recipes import STRATEGIES

    if recipe.name in STRATEGIES:
        return recipe.name
    return "linear-probe" if recipe.is_probe else "partial-finetune"


def run_toml(opts: RunOptions, recipe: Recipe) -> str:
    """The resolved run as a config file: every option (absolute paths) and the resolved recipe.

    Left out: `resume` (a re-run starts afresh), `recipe_file`, `head` and --set (all inside
    [recipe]), and options that were not given (None).
    """
    by_field = {opt.field: key for key, opt in OPTIONS.items() if opt.field}
    lines = [
        "# The resolved run: `finetune run --config THIS_FILE` trains it again into a new run folder.",
        "# Options as `finetune run` takes them; [recipe] as `finetune recipes --keys` lists them.",
        "",
    ]
    for f in dataclasses.fields(RunOptions):
        key = by_field.get(f.name)
        value = getattr(opts, f.name)
        if key in (None, "resume", "recipe_file") or value is None:
            continue
        if key == "strategy":
            value = _base_strategy(recipe)
        elif OPTIONS[key].path:
            value = str(Path(value).expanduser().resolve())
        lines.append(f"{key} = {toml_value(value)}")
    values = recipe.to_dict()
    mult = values.pop("lr_mult")
    lines += ["", f"[{RECIPE_TABLE}]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if k in recipe.keys]
    if "lr_mult" in recipe.keys:
        lines += ["", f"[{RECIPE_TABLE}.lr_mult]"] + [f"{k} = {toml_value(v)}" for k, v in mult.items()]
    return "\n".join(lines) + "\n"


def write_run_toml(run_dir: Path, opts: RunOptions, recipe: Recipe) -> Path | None:
    """RUN/run.toml, written atomically (as config.json); None, said in one line, when a path in it
    is not valid UTF-8 (a folder name of raw bytes): TOML holds only Unicode text."""
    import logging

    from finetune.io import atomic_write

    try:
        text = run_toml(opts, recipe).encode("utf-8")
    except UnicodeEncodeError:
        logging.getLogger(__name__).warning(
            "run.toml not written: a path of this run is not valid UTF-8, which TOML cannot hold "
            "(config.json records the run)"
        )
        return None
    path = Path(run_dir) / RUN_FILE
    atomic_write(path, lambda fh: fh.write(text))
    return path
