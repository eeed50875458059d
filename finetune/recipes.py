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
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError, RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STRATEGIES = ("linear-probe", "stage-probe", "partial-finetune", "full-finetune")
METHODS = ("probe", "finetune")
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "head": ("logreg", "svm", "knn"),
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "constant"),
    "bn_policy": ("eval", "train", "frozen"),  # see train.BN_POLICIES
    "augment": ("none", "light", "randaugment", "trivialaugment"),
    "balance": ("none", "weights", "sampler"),
    "init_head": ("probe", "random"),
    "pool": ("avg", "max"),
    "layer": (),  # free text: a tap name
}


# Which keys each method reads: a key the chosen recipe does not use is refused when given on the
# command line (`--set epochs=3` on a probe, `--head svm` on a fine-tune), never silently ignored.
COMMON_KEYS = frozenset({"name", "description", "method", "batch_size", "image_size", "seed"})
KEYS_BY_METHOD: dict[str, frozenset[str]] = {
    "probe": COMMON_KEYS | {"head", "c_grid", "layer", "pool"},
    "finetune": COMMON_KEYS
    | {
        "epochs",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "schedule",
        "warmup_epochs",
        "lr_mult",
        "top_stages",
        "middle_stages",
        "bn_policy",
        "augment",
        "augment_scale",
        "random_erasing",
        "mixup",
        "cutmix",
        "ema",
        "accum_steps",
        "label_smoothing",
        "balance",
        "patience",
        "init_head",
        "grad_clip",
        "c_grid",  # the LP-FT head's C grid (init_head = "probe")
    },
}
MAX_LR = 10.0  # no optimizer of this tool trains at a larger base LR; 1e30 is a typo, not a setting
MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit
# A recipe name is part of the run folder's name: one path component, no separators, no "..".
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")


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
    lr: float | str = 0.01  # base LR, the head's (or "auto": `lr-find` first); scaled with the global batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: int = 1
    lr_mult: LRMult = field(default_factory=LRMult)
    top_stages: int = 1
    middle_stages: int = 1
    bn_policy: str = "frozen"  # every BatchNorm keeps ImageNet statistics, as the packaged recipes
    # "none"; "light": random-resized crop + horizontal flip; "randaugment": light + timm's
    # rand-m9-mstd0.5-inc1; "trivialaugment": light + torchvision's TrivialAugmentWide
    augment: str = "light"
    augment_scale: float = 0.35  # smallest area fraction of the random-resized crop
    random_erasing: float = 0.0  # probability of erasing a random box of each training image
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0: off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0: off
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0: off
    accum_steps: int = 1  # batches whose gradients make one optimizer step
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

    @property
    def keys(self) -> frozenset[str]:
        """The keys this recipe's method reads (`lr_mult.*` counts as `lr_mult`)."""
        return KEYS_BY_METHOD[self.method]

    @property
    def selects_on_val(self) -> bool:
        """True when the validation split chooses the saved model (fine-tuning keeps its best epoch)."""
        return self.method == "finetune"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["c_grid"] = list(self.c_grid)
        return d

    def to_toml(self) -> str:
        lines, mult = [], []
        for key, value in self.to_dict().items():
            if key == "lr_mult":
                mult = [f"{k} = {toml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{key} = {toml_value(value)}")
        return "\n".join(lines + ["", "[lr_mult]"] + mult) + "\n"


# A TOML basic string holds no raw control character but tab: the rest as \uXXXX (a newline in a
# description, an odd byte in a path).
_TOML_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"'}
_TOML_ESCAPES.update({c: f"\\u{c:04x}" for c in (*range(0x20), 0x7F) if c != 0x09})


def toml_value(v: Any) -> str:
    """One value as a TOML literal (bool, str, number, list): `toml_value("svm")` -> `'"svm"'`.

    The one TOML writer of the package (recipes, the run folder's run.toml); `tomllib` reads it back.
    """
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.translate(_TOML_ESCAPES) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


_FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}
_MULT_FIELDS = {f.name for f in dataclasses.fields(LRMult)}
_FLOAT = {
    "lr",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "grad_clip",
    "augment_scale",
    "random_erasing",
    "mixup",
    "cutmix",
    "ema",
}
_INT = {
    "epochs",
    "batch_size",
    "warmup_epochs",
    "top_stages",
    "middle_stages",
    "patience",
    "image_size",
    "seed",
    "accum_steps",
}
_POSITIVE_INT = {"epochs", "batch_size", "accum_steps"}
_BOOL: set[str] = set()
# Recipes written before `augment` took a policy name said true / false.
_LEGACY = {("augment", True): "light", ("augment", False): "none"}
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

    if isinstance(value, bool) and (key, value) in _LEGACY:
        return _LEGACY[key, value]
    if key == "lr" and value == "auto":
        return value  # resolved by the learning-rate range test before training (`lr-find`)
    if key in _BOOL:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key in _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if key in _POSITIVE_INT and value < 1:
            raise bad("an integer >= 1")
        if value < 0:
            raise bad("an integer >= 0")
        if key == "seed" and value > MAX_SEED:
            raise bad(f"an integer from 0 to {MAX_SEED}")
        return value
    if key in _FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        if key == "lr" and not 0 < value <= MAX_LR:
            raise bad(f"a positive number up to {MAX_LR:g}")
        if value < 0:
            raise bad("a number >= 0")
        if key in ("label_smoothing", "momentum", "ema") and value >= 1:
            raise bad("a number in [0, 1)")
        if key == "random_erasing" and value > 1:
            raise bad("a probability in [0, 1]")
        if key == "augment_scale" and not 0 < value <= 1:
            raise bad("a number in (0, 1]")
        return float(value)
    if key == "c_grid":
        if (
            not isinstance(value, list)
            or not value
            or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0
                for c in value
            )
        ):
            raise bad("a non-empty list of positive finite numbers")
        return tuple(float(c) for c in value)
    if key in _STR:
        if not isinstance(value, str):
            raise bad("a string")
        if key == "name" and not SAFE_NAME.fullmatch(value):
            raise RecipeError(
                f"recipe name {value!r} cannot name a run folder",
                "use letters, digits and . _ + - (one name, no / or spaces), e.g. --set name=my-probe",
            )
        allowed = CHOICES.get(key)
        if allowed and value not in allowed:
            raise RecipeError(f"recipe key {key!r} is {value!r}", f"choose one of {', '.join(allowed)}")
        return value
    raise _unknown(key, list(_FIELDS))  # pragma: no cover - guarded by callers


def _check_mult(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
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


def read_toml(
    path: Path | Traversable, what: str = "recipe", error: type[FinetuneError] = RecipeError
) -> dict[str, Any]:
    """The TOML table of a file (UTF-8, with or without a byte-order mark); `error` if it is not one.

    `what` names the file in the message ("recipe", "config file"); a TOML mistake says its line
    and column.
    """
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise error(
            f"{what} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})",
            "save it as UTF-8",
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{what} {path} is not valid TOML: {err}", "fix the file") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror}", "check the path") from None


def list_recipes() -> list[str]:
    return sorted(f.name[: -len(".toml")] for f in recipes_dir().iterdir() if f.name.endswith(".toml"))


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The top-level recipe keys that `--set` items name ('lr_mult.top=0.1' -> 'lr_mult')."""
    return list(dict.fromkeys(parse_override(item)[0][0] for item in overrides))


def check_used(recipe: Recipe, keys: Sequence[str]) -> None:
    """Refuse settings that `recipe`'s method would silently ignore (`--set epochs=3` on a probe)."""
    unused = [k for k in keys if k not in recipe.keys]
    if unused:
        users = [s for s in STRATEGIES if all(k in KEYS_BY_METHOD[_METHOD_OF[s]] for k in unused)]
        flags = ", ".join(f"--set {k}" + (" / --head" if k == "head" else "") for k in unused)
        does = "fits a head on frozen features" if recipe.is_probe else "fine-tunes the network"
        raise RecipeError(
            f"{flags}: not used by the {recipe.name} recipe, which {does}",
            f"drop it, or choose a recipe that uses it ({', '.join(users) or 'none does'})",
        )


_METHOD_OF = {"linear-probe": "probe", "stage-probe": "probe", "partial-finetune": "finetune"}
_METHOD_OF["full-finetune"] = "finetune"


def _default_name(path: Path | Traversable) -> str:
    """A recipe file's name as a run-folder-safe default (`my recipe.toml` -> `my-recipe`)."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", path.name.removesuffix(".toml")).strip(".-")[:64]
    return name or "custom"


def load_recipe(
    strategy: str | None = "linear-probe",
    recipe_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    strict: bool = True,
) -> Recipe:
    """The packaged recipe `strategy` (or a user's TOML file) with `--set` overrides applied.

    `strict`: refuse overrides of keys the recipe's method does not use (`check_used`).
    """
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
    raw.setdefault("name", _default_name(path))
    recipe = recipe_from_dict(raw)
    if strict:
        check_used(recipe, override_keys(overrides))
    return recipe


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


def key_table() -> list[dict]:
    """Every key `--set` takes: type or choices, the methods that use it, its default (`recipes --keys`)."""
    defaults = Recipe()
    rows = []
    for name in _FIELDS:
        if name == "lr_mult":
            for m in _MULT_FIELDS_ORDER:
                rows.append(
                    {
                        "key": f"lr_mult.{m}",
                        "type": "number >= 0",
                        "methods": ["finetune"],
                        "default": getattr(defaults.lr_mult, m),
                    }
                )
            continue
        rows.append(
            {
                "key": name,
                "type": _type_of(name),
                "methods": [m for m in METHODS if name in KEYS_BY_METHOD[m]],
                "default": toml_value(getattr(defaults, name)),
            }
        )
    return rows


_MULT_FIELDS_ORDER = [f.name for f in dataclasses.fields(LRMult)]


def _type_of(key: str) -> str:
    if CHOICES.get(key):
        return " | ".join(CHOICES[key])
    if key == "lr":
        return f"number in (0, {MAX_LR:g}] | auto"
    if key == "seed":
        return f"integer 0..{MAX_SEED}"
    if key in _POSITIVE_INT:
        return "integer >= 1"
    if key in _INT:
        return "integer >= 0"
    if key in ("momentum", "label_smoothing", "ema"):
        return "number in [0, 1)"
    if key == "random_erasing":
        return "number in [0, 1]"
    if key == "augment_scale":
        return "number in (0, 1]"
    if key in _FLOAT:
        return "number >= 0"
    if key in _BOOL:
        return "true | false"
    if key == "c_grid":
        return "list of numbers > 0"
    return "text"
