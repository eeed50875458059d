"""Recipes: the four cells of the transfer-learning table, as data.

A recipe is a TOML file in `recipes/` read into a frozen `Recipe`; unknown keys are refused
by name, `--set key=value` overrides any key (the value is read as a TOML literal)::

    recipe = load_recipe("partial-finetune", overrides=["lr=0.01", "lr_mult.top=0.2"])
    recipe.lr_mult.top      # 0.2
    recipe.to_dict()        # what the run folder stores as the resolved recipe

`param_groups(stages, recipe)` — the layer-wise learning rates — is a pure function here so
the training loop never decides a learning rate itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from finetune.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STRATEGIES = ("linear-probe", "stage-probe", "partial-finetune", "full-finetune")
METHODS = ("probe", "finetune")
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "head": ("logreg", "svm"),
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "constant"),
    "bn_policy": ("eval", "train", "frozen"),  # see train.BN_POLICIES
    "balance": ("none", "weights", "sampler"),
    "init_head": ("probe", "random"),
    "pool": ("avg", "max"),
    "layer": (),  # free text: a tap name
}


def recipes_dir() -> Traversable:
    """The packaged recipes: `recipes/*.toml` of the repository, shipped as `finetune.recipe_files`."""
    return resources.files("finetune.recipe_files")


@dataclass(frozen=True)
class LRMult:
    """Learning-rate multiplier per stage group; 0 freezes the group."""

    head: float = 1.0
    top: float = 0.1
    middle: float = 0.01
    bottom: float = 0.0


@dataclass(frozen=True)
class Recipe:
    """Every setting of a strategy. Field names are the TOML keys and the `--set` keys."""

    name: str = "custom"
    description: str = ""
    method: str = "probe"  # "probe": frozen features + sklearn head; "finetune": gradient training
    # probe settings
    head: str = "logreg"
    c_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    layer: str = "pool"  # tap for linear-probe; stage-probe tries every stage and keeps the best
    pool: str = "avg"
    # fine-tuning settings
    epochs: int = 10
    batch_size: int = 32  # per device (per process under torchrun)
    optimizer: str = "sgd"
    lr: float = 0.01  # base LR, the head's; scaled linearly with the global batch under torchrun
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: int = 1
    lr_mult: LRMult = field(default_factory=LRMult)
    top_stages: int = 1
    middle_stages: int = 1
    bn_policy: str = "frozen"  # every BatchNorm keeps ImageNet statistics, as the packaged recipes
    augment: bool = True
    augment_scale: float = 0.35  # smallest area fraction of the random-resized crop
    label_smoothing: float = 0.0
    balance: str = "none"
    patience: int = 0  # epochs without improvement before stopping; 0: never stop early
    image_size: int = 0  # 0: the weights' own size
    init_head: str = "probe"  # LP-FT: start from the linear probe's head
    grad_clip: float = 1.0  # max gradient norm; 0: off
    seed: int = 0

    @property
    def is_probe(self) -> bool:
        return self.method == "probe"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["c_grid"] = list(self.c_grid)
        return d

    def to_toml(self) -> str:
        lines, mult = [], []
        for key, value in self.to_dict().items():
            if key == "lr_mult":
                mult = [f"{k} = {_toml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines + ["", "[lr_mult]"] + mult) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


_FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}
_MULT_FIELDS = {f.name for f in dataclasses.fields(LRMult)}
_FLOAT = {"lr", "momentum", "weight_decay", "label_smoothing", "grad_clip", "augment_scale"}
_INT = {
    "epochs",
    "batch_size",
    "warmup_epochs",
    "top_stages",
    "middle_stages",
    "patience",
    "image_size",
    "seed",
}
_BOOL = {"augment"}
_STR = {"name", "description"} | set(CHOICES)


def _unknown(key: str, known: list[str]) -> RecipeError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(sorted(known))}"
    return RecipeError(f"unknown recipe key {key!r}", hint)


def _check(key: str, value: Any) -> Any:
    """Type- and range-check one top-level value; return it normalized."""

    def bad(expected: str) -> RecipeError:
        return RecipeError(
            f"recipe key {key!r} must be {expected}, got {value!r}", f"fix it, e.g. --set {key}=..."
        )

    if key in _BOOL:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key in _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if value < 0 or (key in ("batch_size",) and value < 1):
            raise bad("a positive integer" if key == "batch_size" else "an integer >= 0")
        return value
    if key in _FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if key == "lr" and value <= 0:
            raise bad("a positive number")
        if value < 0:
            raise bad("a number >= 0")
        if key in ("label_smoothing", "momentum", "augment_scale") and value >= 1:
            raise bad("a number in [0, 1)")
        return float(value)
    if key == "c_grid":
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in value)
        ):
            raise bad("a non-empty list of positive numbers")
        return tuple(float(c) for c in value)
    if key in _STR:
        if not isinstance(value, str):
            raise bad("a string")
        allowed = CHOICES.get(key)
        if allowed and value not in allowed:
            raise RecipeError(f"recipe key {key!r} is {value!r}", f"choose one of {', '.join(allowed)}")
        return value
    raise _unknown(key, list(_FIELDS))  # pragma: no cover - guarded by callers


def _check_mult(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise RecipeError(
            f"recipe key 'lr_mult.{key}' must be a number >= 0, got {value!r}", "0 freezes the group"
        )
    return float(value)


def recipe_from_dict(raw: dict[str, Any], base: Recipe | None = None) -> Recipe:
    """A Recipe from TOML-shaped data; keys not given keep `base`'s (or the defaults')."""
    base = base or Recipe()
    values: dict[str, Any] = {}
    mult = dataclasses.asdict(base.lr_mult)
    for key, value in raw.items():
        if key == "lr_mult":
            if not isinstance(value, dict):
                raise RecipeError(
                    "recipe key 'lr_mult' must be a table", "write [lr_mult] with head/top/middle/bottom"
                )
            for mk, mv in value.items():
                if mk not in _MULT_FIELDS:
                    raise _unknown(f"lr_mult.{mk}", [f"lr_mult.{m}" for m in _MULT_FIELDS])
                mult[mk] = _check_mult(mk, mv)
        elif key not in _FIELDS:
            raise _unknown(key, list(_FIELDS) + [f"lr_mult.{m}" for m in _MULT_FIELDS])
        else:
            values[key] = _check(key, value)
    values["lr_mult"] = LRMult(**mult)
    return dataclasses.replace(base, **values)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'lr_mult.top=0.1' -> (['lr_mult', 'top'], 0.1); the value is a TOML literal, else a string."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r} has no '='", "write --set key=value, e.g. --set lr=0.01")
    key, _, text = item.partition("=")
    key, text = key.strip(), text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words: --set optimizer=adamw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        path, value = parse_override(item)
        if len(path) == 1:
            out[path[0]] = value
        elif len(path) == 2 and path[0] == "lr_mult":
            out.setdefault("lr_mult", {})[path[1]] = value
        else:
            raise _unknown(".".join(path), list(_FIELDS))
    return out


def read_toml(path: Path | Traversable) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"recipe {path} is not valid TOML: {err}", "fix the file") from None
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror}", "check the path") from None


def list_recipes() -> list[str]:
    return sorted(f.name[: -len(".toml")] for f in recipes_dir().iterdir() if f.name.endswith(".toml"))


def load_recipe(
    strategy: str | None = "linear-probe", recipe_file: str | Path | None = None, overrides: list[str] = ()
) -> Recipe:
    """The packaged recipe `strategy` (or a user's TOML file) with `--set` overrides applied."""
    if recipe_file is not None:
        path = Path(recipe_file)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist", "pass a TOML file, or use --strategy")
    else:
        path = recipes_dir() / f"{strategy}.toml"
        if not path.is_file():
            known = list_recipes()
            close = difflib.get_close_matches(str(strategy), known, n=2)
            hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(known)}, or auto"
            raise RecipeError(f"unknown strategy {strategy!r}", hint)
    raw = apply_overrides(read_toml(path), list(overrides))
    raw.setdefault("name", path.name.removesuffix(".toml"))
    return recipe_from_dict(raw)


# --------------------------------------------------------------------------- parameter groups

ROLES = ("bottom", "middle", "top")  # stage groups, bottom -> top; the head is its own group


def stage_roles(n_stages: int, recipe: Recipe) -> list[str]:
    """The role of each of `n_stages` stages (bottom -> top): the last `top_stages` are "top",
    the `middle_stages` below them "middle", the rest "bottom".

    >>> stage_roles(5, Recipe(top_stages=1, middle_stages=2))
    ['bottom', 'bottom', 'middle', 'middle', 'top']
    """
    top = min(recipe.top_stages, n_stages)
    middle = min(recipe.middle_stages, n_stages - top)
    return ["bottom"] * (n_stages - top - middle) + ["middle"] * middle + ["top"] * top


def packaged_recipes() -> list[Recipe]:
    """The packaged recipes, in the order of the transfer-learning table."""
    return [load_recipe(name) for name in STRATEGIES]
