"""The lectures' per-layer table: output size, activation memory, parameters and MACs of a backbone.

    s = summarize("tv:alexnet", input_size=227)          # built on the meta device: no weights, no RAM
    s.layers[1]                # Layer(name="features.0", kind="Conv2d", output_shape=(64, 56, 56), ...)
    s.params, s.macs, s.activation_kb, s.weight_kb
    fold(s.layers, depth=1)    # one row per top-level block; depth=0: one row per stage
    compare(["alexnet", "vgg16", "resnet50"])             # one CompareLine per model, with top-1/top-5

How things are counted (the same conventions as the CS231n tables, said again in the table footer):

- A *layer* is a leaf module, or a container that owns parameters, MACs or a new tensor itself
  (timm's BatchNormAct2d holds the BN weights; a residual block's `x + shortcut` makes a new tensor).
- MACs are multiply-adds of convolutions and matrix products, from `torch.utils.flop_counter`
  (which counts 2 FLOPs per multiply-add, so MACs = its count / 2; biases are not counted).
  Pooling, activations, normalisation and additions count 0 MACs by definition.
- Activation memory is the float32 size (numel x 4 bytes) of each new tensor a layer outputs, per
  image, counted once: an in-place ReLU or a view (flatten, eval-mode dropout) adds nothing. The
  input image is the first row, as in the lectures. KB means KiB (1024 bytes).
- Weight memory is parameters x 4 bytes (float32).

The model is built with random weights on the meta device (shapes only, so even VGG16 is
summarized in a fraction of a second); a model that cannot run on meta falls back to one CPU
forward of a single zero image.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.errors import BackboneError, FinetuneError

BYTES_PER_FLOAT = 4  # float32: the lectures' (and PyTorch's default) activation and weight size
KB = 1024
IMAGENET_CLASSES = 1000
HEAD_STAGE = "head"

# timm weight tags that are torchvision's own weights, so torchvision's published accuracy applies.
TIMM_TAG_TO_TV_WEIGHTS: dict[str, str] = {"tv_in1k": "IMAGENET1K_V1", "tv2_in1k": "IMAGENET1K_V2"}

FOOTER = (
    "MACs: multiply-adds of conv/matmul (torch.utils.flop_counter / 2); pooling, activations, norms and "
    "adds count 0. Memory: float32 outputs per image, in KiB, each new tensor once (in-place and views: "
    "0). train: LR multiplier under the strategy; head = the 1000-way classifier the new head replaces."
)


@dataclass(frozen=True)
class Layer:
    """One row of the table: a layer, or (after `fold`) a group of layers."""

    name: str  # module path in named_modules(), e.g. "features.0"; "(input)" for the image
    kind: str  # module type, e.g. "Conv2d"
    stage: str  # anatomy stage ("stem", "stage1", ...), "head", or "" when unknown
    output_shape: tuple[int, ...]  # without the batch dimension, e.g. (64, 56, 56)
    params: int  # parameters owned by this layer (shared ones counted once, where first seen)
    macs: int  # multiply-adds per image
    activation_bytes: int  # bytes of new float32 tensors it outputs, per image
    lr_mult: float | None = None  # None: no parameters; 0.0: frozen
    calls: int = 1  # how often forward ran it (a shared ReLU runs 3 times in a torchvision Bottleneck)

    @property
    def activation_kb(self) -> float:
        return self.activation_bytes / KB

    @property
    def train(self) -> str:
        """'head', 'frozen', 'lr×0.1', 'mixed' or '' (no parameters)."""
        if self.stage == HEAD_STAGE and self.lr_mult is not None:
            return "head"
        if self.lr_mult is None:
            return ""
        if self.lr_mult != self.lr_mult:  # NaN marks a folded group with different multipliers
            return "mixed"
        return "frozen" if self.lr_mult == 0 else f"lr×{self.lr_mult:g}"


@dataclass(frozen=True)
class Summary:
    """A backbone's per-layer table and its totals."""

    backbone: str
    input_size: int
    strategy: str
    layers: tuple[Layer, ...]
    trainable_params: int
    counted_on: str  # "meta" or "cpu"

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def activation_kb(self) -> float:
        return sum(layer.activation_bytes for layer in self.layers) / KB

    @property
    def weight_kb(self) -> float:
        return self.params * BYTES_PER_FLOAT / KB


@dataclass(frozen=True)
class CompareLine:
    """One model in `--compare`: totals and the published ImageNet accuracy, if any is known offline."""

    backbone: str
    input_size: int
    params: int
    macs: int
    activation_kb: float
    top1: float | None
    top5: float | None


# --------------------------------------------------------------------------- counting


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a module output (a tensor, tuple, list, dict or namedtuple)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _storage_key(t: torch.Tensor) -> int:
    # Views and in-place results share their input's storage: that is how we count memory once.
    # On the meta device storages exist (without data), so this works there too.
    return t.untyped_storage()._cdata


def _flops(counter: Any) -> int:
    return int(sum(counter.flop_counts["Global"].values()))


@dataclass
class _Record:
    """Mutable per-module tallies while the forward runs (turned into frozen Layers after)."""

    order: int = -1
    calls: int = 0
    inclusive_flops: int = 0
    children_flops: int = 0
    activation_bytes: int = 0
    output_shape: tuple[int, ...] = ()


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, _Record], int]:
    """Run one forward, recording per module: call order, own FLOPs, new output tensors, shape.

    Returns (records by module name, input image bytes).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    records: dict[str, _Record] = {}
    stack: list[tuple[str, int]] = []  # (module name, FLOP count when it started)
    seen: set[int] = {_storage_key(x)}  # the image is counted by its own row
    keep: list[torch.Tensor] = [x]  # hold outputs so a freed storage id is never reused mid-trace
    finished = [0]
    handles = []

    def pre(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            stack.append((name, _flops(counter)))

        return hook

    def post(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            _, start = stack.pop()
            rec = records.setdefault(name, _Record())
            if rec.order < 0:
                rec.order = finished[0]
                finished[0] += 1
            rec.calls += 1
            spent = _flops(counter) - start
            rec.inclusive_flops += spent
            if stack:  # a parent's own FLOPs are what its children did not spend
                records.setdefault(stack[-1][0], _Record()).children_flops += spent
            tensors = _tensors(out)
            if tensors and not rec.output_shape:
                rec.output_shape = tuple(int(d) for d in tensors[0].shape[1:])  # drop batch
            for t in tensors:
                key = _storage_key(t)
                if key not in seen:
                    seen.add(key)
                    keep.append(t)
                    rec.activation_bytes += t[0].numel() * BYTES_PER_FLOAT  # per image
            return None

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return records, x[0].numel() * BYTES_PER_FLOAT


def classifier_params(model: nn.Module) -> set[str]:
    """Names of the parameters of the 1000-way ImageNet classifier, which a new head replaces."""
    from finetune.models.anatomy import classifier_path

    path = classifier_path(model)
    if path is None:
        return set()
    return {f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()}


def stage_multipliers(stage_names: Sequence[str], recipe: Any) -> dict[str, float]:
    """LR multiplier per stage (bottom -> top) under `recipe`; 0 means frozen.

    The roles come from `recipes.stage_roles` (the training loop's own rule: the top
    `top_stages` stages get `lr_mult.top`, the `middle_stages` below `lr_mult.middle`, the rest
    `lr_mult.bottom`). A probe recipe freezes the whole backbone.
    """
    from finetune.recipes import stage_roles

    if recipe.is_probe:
        return {name: 0.0 for name in stage_names}
    roles = stage_roles(len(stage_names), recipe)
    return {name: float(getattr(recipe.lr_mult, role)) for name, role in zip(stage_names, roles, strict=True)}


def _stage_of_params(model: nn.Module, head: set[str], need: bool) -> dict[str, str]:
    """Parameter name -> stage name ("head" for the classifier). Empty if unknown and not `need`ed."""
    from finetune.models.anatomy import stages

    try:
        found = stages(model)
    except BackboneError:
        if need:  # a fine-tuning recipe cannot say what trains without stages
            raise
        found = []
    out = {p: s.name for s in found for p in s.params if p not in head}
    out.update({p: HEAD_STAGE for p in head})
    return out


def summarize_model(
    model: nn.Module,
    input_size: int,
    param_stage: dict[str, str] | None = None,
    multipliers: dict[str, float] | None = None,
    head_mult: float = 1.0,
) -> list[Layer]:
    """The per-layer rows of `model` for one (1, 3, input_size, input_size) image.

    Args:
        model: any nn.Module taking images; its device (meta or cpu) is used for the input.
        input_size: side of the square input.
        param_stage: parameter name -> stage; layers without parameters take the stage of the
            layer run before them.
        multipliers: stage -> LR multiplier (0 frozen); None leaves `lr_mult` empty.
        head_mult: multiplier of the "head" stage.

    Raises:
        BackboneError: the network cannot run at this input size.
    """
    param_stage = param_stage or {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros(1, 3, input_size, input_size, device=device)  # (B, C, H, W)
    try:
        records, input_bytes = _trace(model, x)
    except (RuntimeError, ValueError, AssertionError) as err:  # NotImplementedError is a RuntimeError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(
            f"{type(model).__name__} cannot run at input size {input_size} ({first[:120]})",
            "try a larger --input-size",
        ) from None

    names_of: dict[int, str] = {}
    direct: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in names_of:  # shared weights: counted at the first owner only
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            names_of[id(p)] = full
            direct.setdefault(mod_name, []).append((full, p))

    modules = dict(model.named_modules())
    rows = [Layer("(input)", "image", "", (3, input_size, input_size), 0, 0, input_bytes)]
    # Layers without parameters (ReLU, pooling) belong to the stage of the layer run before them.
    stage = next((v for v in param_stage.values() if v != HEAD_STAGE), "")
    for mod_name, rec in sorted(records.items(), key=lambda kv: kv[1].order):
        module = modules[mod_name]
        own_params = direct.get(mod_name, [])
        own_flops = rec.inclusive_flops - rec.children_flops
        is_leaf = next(module.children(), None) is None
        if not (is_leaf or own_params or own_flops or rec.activation_bytes):
            continue  # a pure container: its children's rows already say everything
        mult = None
        if own_params:
            stage = param_stage.get(own_params[0][0], "")
            if multipliers is not None:
                stages_here = [param_stage.get(n, "") for n, _ in own_params]
                mult = max(head_mult if st == HEAD_STAGE else multipliers.get(st, 0.0) for st in stages_here)
        rows.append(
            Layer(
                name=mod_name or "(model)",
                kind=type(module).__name__,
                stage=stage,
                output_shape=rec.output_shape,
                params=sum(p.numel() for _, p in own_params),
                macs=own_flops // 2,  # the flop counter counts 2 per multiply-add
                activation_bytes=rec.activation_bytes,
                lr_mult=mult,
                calls=rec.calls,
            )
        )
    unused = [(n, p) for m, ps in direct.items() if m not in records for n, p in ps]
    if unused:  # e.g. auxiliary classifiers that eval-mode forward skips
        rows.append(Layer("(not run by forward)", "", "", (), sum(p.numel() for _, p in unused), 0, 0))
    return rows


# --------------------------------------------------------------------------- folding


def _merge(name: str, kind: str, shape: tuple[int, ...], group: list[Layer]) -> Layer:
    stages = list(dict.fromkeys(layer.stage for layer in group if layer.stage))
    mults = {layer.lr_mult for layer in group if layer.lr_mult is not None}
    mult = None if not mults else (mults.pop() if len(mults) == 1 else float("nan"))  # NaN: "mixed"
    return Layer(
        name=name,
        kind=kind,
        stage=stages[0] if len(stages) == 1 else (f"{stages[0]}…{stages[-1]}" if stages else ""),
        output_shape=shape,
        params=sum(layer.params for layer in group),
        macs=sum(layer.macs for layer in group),
        activation_bytes=sum(layer.activation_bytes for layer in group),
        lr_mult=mult,
        calls=1,
    )


def fold(
    layers: Sequence[Layer],
    depth: int | None,
    model: nn.Module | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[Layer]:
    """Group rows: `depth` K keeps K levels of module names (features.0.conv -> features.0 at K=2),
    0 gives one row per stage, None keeps every layer.

    Args:
        layers: rows from `summarize_model`, in forward order.
        depth: how many name levels to keep; 0 for stages; None for no folding.
        model: the network (for the folded modules' type names); optional.
        shapes: module name -> output shape of the folded modules; optional.
    """
    if depth is None:
        return list(layers)
    if depth < 0:
        raise BackboneError(
            f"--depth must be >= 0, got {depth}", "0: one row per stage, 1: top-level blocks, ..."
        )
    modules = dict(model.named_modules()) if model is not None else {}
    shapes = shapes or {}
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        if layer.name.startswith("("):
            key = layer.name
        elif depth == 0:
            key = layer.stage or "(other)"
        else:
            key = ".".join(layer.name.split(".")[:depth])
        groups.setdefault(key, []).append(layer)
    out = []
    for key, group in groups.items():
        if len(group) == 1 and (depth == 0 or group[0].name == key):
            out.append(group[0] if depth else _merge(key, group[0].kind, group[0].output_shape, group))
            continue
        if depth == 0:
            kind, shape = f"{len(group)} layers", group[-1].output_shape
        else:
            kind = type(modules[key]).__name__ if key in modules else f"{len(group)} layers"
            shape = shapes.get(key, group[-1].output_shape)
        out.append(_merge(key, kind, shape, group))
    return out


# --------------------------------------------------------------------------- building


def _build_for_count(name: str) -> tuple[Any, nn.Module, str]:
    """(Backbone, its model, device) built with random weights, on meta when it can run there."""
    from finetune.models.backbone import build
    from finetune.models.catalogue import resolve

    spec = resolve(name)  # an unknown name is the user's mistake: let its BackboneError through
    try:
        with torch.device("meta"):
            bb = build(spec, pretrained=False)
        return bb, bb.model, "meta"
    except (RuntimeError, ValueError, NotImplementedError):  # an init that needs real data
        bb = build(spec, pretrained=False)
        return bb, bb.model, "cpu"


def _output_shapes(model: nn.Module, input_size: int) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of every module, for the folded rows."""
    shapes: dict[str, tuple[int, ...]] = {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def post(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            tensors = _tensors(out)
            if tensors and name not in shapes:
                shapes[name] = tuple(int(d) for d in tensors[0].shape[1:])

        return hook

    handles = [m.register_forward_hook(post(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _count(name: str, input_size: int | None, strategy: str) -> tuple[Summary, nn.Module]:
    from finetune.recipes import load_recipe

    recipe = load_recipe(strategy)
    bb, model, where = _build_for_count(name)
    size = int(input_size or bb.preprocessing.input_size)
    if size < 1:
        raise BackboneError(
            f"--input-size must be positive, got {size}", f"try {bb.preprocessing.input_size}"
        )
    head = classifier_params(model)
    param_stage = _stage_of_params(model, head, need=not recipe.is_probe)
    body_stages = list(dict.fromkeys(s for s in param_stage.values() if s != HEAD_STAGE))
    mults = stage_multipliers(body_stages, recipe)
    try:
        layers = summarize_model(model, size, param_stage, mults, head_mult=recipe.lr_mult.head)
    except (NotImplementedError, BackboneError):
        if where != "meta":
            raise
        # Some ops have no meta kernel: count once more on CPU with real (random) weights.
        from finetune.models.backbone import build

        model, where = build(name, pretrained=False).model, "cpu"
        layers = summarize_model(model, size, param_stage, mults, head_mult=recipe.lr_mult.head)
    trainable = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n in head or (not recipe.is_probe and mults.get(param_stage.get(n, ""), 0.0) > 0)
    )
    summary = Summary(bb.spec.name, size, recipe.name, tuple(layers), trainable, where)
    return summary, model


def summarize(
    name: str, input_size: int | None = None, strategy: str = "linear-probe", depth: int | None = None
) -> Summary:
    """The per-layer table of backbone `name`, with random weights (no download, works offline).

    Args:
        name: catalogue name (alias, timm name or tv:name).
        input_size: side of the square input; None: the weights' own input size.
        strategy: recipe deciding which layers train (linear-probe freezes the whole backbone).
        depth: fold rows (see `fold`); None: every layer.

    Raises:
        BackboneError: unknown backbone, no stage split for a fine-tuning strategy, bad input size.
        RecipeError: unknown strategy.
    """
    summary, model = _count(name, input_size, strategy)
    if depth is None:
        return summary
    shapes = _output_shapes(model, summary.input_size) if depth > 0 else {}
    folded = fold(summary.layers, depth, model, shapes)
    return Summary(
        summary.backbone,
        summary.input_size,
        summary.strategy,
        tuple(folded),
        summary.trainable_params,
        summary.counted_on,
    )


# --------------------------------------------------------------------------- compare


def published_accuracy(name: str) -> tuple[float | None, float | None]:
    """(top-1, top-5) ImageNet accuracy in % from the weights' own metadata; (None, None) if unknown.

    torchvision weights carry `meta["_metrics"]`; timm's pretrained_cfg carries none, except that
    timm's `tv_in1k` / `tv2_in1k` weights *are* torchvision's, so their numbers apply. No network.
    """
    import torchvision

    from finetune.models.catalogue import resolve

    spec = resolve(name)
    arch, weights_name = spec.arch, "DEFAULT"
    if spec.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.model)
        tag = getattr(cfg, "tag", None) if cfg is not None else None
        if tag not in TIMM_TAG_TO_TV_WEIGHTS:
            return None, None
        weights_name = TIMM_TAG_TO_TV_WEIGHTS[tag]
    elif spec.source != "torchvision":
        return None, None
    try:
        weights = torchvision.models.get_model_weights(arch)[weights_name]
    except (ValueError, KeyError, AttributeError):
        return None, None
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    top1, top5 = metrics.get("acc@1"), metrics.get("acc@5")
    return (float(top1) if top1 is not None else None, float(top5) if top5 is not None else None)


def compare(names: Sequence[str], input_size: int | None = None) -> list[CompareLine]:
    """One line per backbone: params, MACs, activation memory at its own (or the given) input size."""
    lines = []
    for name in names:
        s, _ = _count(name, input_size, "linear-probe")
        top1, top5 = published_accuracy(name)
        lines.append(CompareLine(s.backbone, s.input_size, s.params, s.macs, s.activation_kb, top1, top5))
    return lines


# --------------------------------------------------------------------------- output


CSV_COLUMNS = ("stage", "name", "type", "output_shape", "activation_kb", "params", "macs", "train", "calls")


def to_csv(summary: Summary) -> str:
    """The rows (exact integers) and a TOTAL line, as CSV text."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in summary.layers:
        w.writerow(
            [
                r.stage,
                r.name,
                r.kind,
                "x".join(map(str, r.output_shape)),
                f"{r.activation_kb:.2f}",
                r.params,
                r.macs,
                r.train,
                r.calls,
            ]
        )
    w.writerow(
        [
            "",
            "TOTAL",
            "",
            "",
            f"{summary.activation_kb:.2f}",
            summary.params,
            summary.macs,
            f"trainable {summary.trainable_params}",
            "",
        ]
    )
    return buf.getvalue()


def compare_to_csv(lines: Sequence[CompareLine]) -> str:
    """The `--compare` lines as CSV text (accuracy empty where unknown)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("backbone", "input_size", "params", "macs", "activation_kb", "top1", "top5"))
    for c in lines:
        w.writerow(
            [
                c.backbone,
                c.input_size,
                c.params,
                c.macs,
                f"{c.activation_kb:.2f}",
                "" if c.top1 is None else c.top1,
                "" if c.top5 is None else c.top5,
            ]
        )
    return buf.getvalue()


def write_csv(table: Summary | Sequence[CompareLine], path: str | Path) -> Path:
    """Write a summary's rows (or `--compare` lines) to `path` as CSV, atomically.

    Raises:
        FinetuneError: `path` is a folder or cannot be written.
    """
    from finetune.io import atomic_write

    path = Path(path)
    if path.is_dir():
        raise FinetuneError(f"--csv {path} is a folder", "give a file name, e.g. --csv summary.csv")
    text = to_csv(table) if isinstance(table, Summary) else compare_to_csv(table)
    try:
        atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
    except OSError as err:
        raise FinetuneError(
            f"cannot write {path}: {err.strerror or err}", "choose another --csv path"
        ) from None
    return path


def _human(n: float) -> str:
    """72855552 -> '72.86M' (the lectures write MACs and memory this way)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _kb(kb: float) -> str:
    return f"{kb:,.0f}" if kb >= 10 else f"{kb:.1f}"


def summary_table(summary: Summary):
    """A rich Table of the rows, with stage sections and the totals in the footer."""
    from rich.table import Table
    from rich.text import Text

    title = (
        f"{summary.backbone} at {summary.input_size}×{summary.input_size}, strategy {summary.strategy} "
        f"(random weights, counted on {summary.counted_on})"
    )
    share = summary.trainable_params / summary.params if summary.params else 0.0
    caption = (
        f"trainable: {summary.trainable_params:,} of {summary.params:,} parameters ({share:.1%}). {FOOTER}"
    )
    table = Table(
        title=title,
        title_justify="left",
        caption=caption,
        caption_justify="left",
        show_footer=True,
        pad_edge=False,
        box=None,
    )
    total_row = {
        "layer": "TOTAL",
        "type": f"{summary.weight_kb / KB:,.1f} MB weights",
        "output": "",
        "act KB": _kb(summary.activation_kb),
        "params": f"{summary.params:,}",
        "MACs": _human(summary.macs),
        "train": "",
    }
    for col in ("layer", "type", "output", "act KB", "params", "MACs", "train"):
        right = col in ("act KB", "params", "MACs")
        table.add_column(
            col,
            footer=total_row[col],
            justify="right" if right else "left",
            overflow="fold",
            no_wrap=col not in ("layer", "type"),
        )
    previous = None
    for r in summary.layers:
        if r.stage and r.stage != previous and r.name != r.stage:  # a heading row per stage
            table.add_row(Text(f"{r.stage}", style="bold"), "", "", "", "", "", "")
        previous = r.stage or previous
        name = r.name if r.calls == 1 else f"{r.name} (×{r.calls})"
        table.add_row(
            Text(name),
            Text(r.kind),
            _shape(r.output_shape),
            _kb(r.activation_kb) if r.activation_bytes else "·",
            f"{r.params:,}" if r.params else "·",
            _human(r.macs) if r.macs else "·",
            r.train,
        )
    return table


def compare_table(lines: Sequence[CompareLine]):
    """A rich Table with one line per model."""
    from rich.table import Table

    table = Table(
        title="backbones compared (random weights; accuracy from the weights' metadata)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    for col in ("backbone", "input", "params", "MACs", "act MB", "weights MB", "top-1", "top-5"):
        table.add_column(col, justify="left" if col == "backbone" else "right")
    for c in lines:
        table.add_row(
            c.backbone,
            str(c.input_size),
            f"{c.params / 1e6:.1f}M",
            _human(c.macs),
            f"{c.activation_kb / KB:.1f}",
            f"{c.params * BYTES_PER_FLOAT / KB / KB:.1f}",
            f"{c.top1:.2f}" if c.top1 is not None else "n/a",
            f"{c.top5:.2f}" if c.top5 is not None else "n/a",
        )
    return table


def print_summary(table: Summary | Sequence[CompareLine], width: int = 100) -> None:
    """Print a summary (or `--compare` lines) as a rich table, at most `width` columns wide."""
    from rich.console import Console

    console = Console(highlight=False)
    # A pipe gets rich's 80 columns by default; the table is laid out for 100.
    console.width = min(console.width, width) if console.is_terminal else width
    console.print(summary_table(table) if isinstance(table, Summary) else compare_table(table))
