"""A network's anatomy: depth-ordered stages (for layer-wise LRs) and named taps (for features).

Every catalogue network is read as an ordered list of parts, bottom -> top: `stem`,
`stage1` .. `stageN` (conv stages), for AlexNet/VGG-style nets `fc6`, `fc7` (DeCAF's
post-ReLU fully connected layers), and `head` (the 1000-way classifier). A part's tap is the
output of its last module; `pool` is always the pooled penultimate layer, what a linear probe
reads::

    taps(model)                            # ["stem", "stage1", ..., "fc6", "fc7", "pool"]
    tap_shapes(model, 224)                 # {"stem": (64, 55, 55), ..., "pool": (4096,)}
    stages(model)                          # [Stage("stem", (...param names...)), ...]
    trunk = build_trunk(model, "stage3")   # images (B, 3, H, W) -> pooled features (B, C)
    multi = build_multi_trunk(model, ["stage2", "pool"])   # one forward -> ((B, C2), (B, D))

The parts come from a registry of rules keyed by the network's class (`RULES`); adding an
architecture is adding a row. Any other timm model is read from timm's own `feature_info` (the
modules where timm says each feature level ends): `convnext_tiny`, `regnety_016`, ... get a stem,
stage1..N and their taps, and are cut at a stage by timm itself (`prune_intermediate_layers`,
`forward_intermediates`), so a head norm sized for the last stage or NHWC blocks are timm's
business. A model timm gives no `forward_intermediates` keeps its stages but only the `pool` tap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from finetune.errors import BackboneError

IMAGENET_CLASSES = 1000
POOLS = ("avg", "max", "none")


@dataclass(frozen=True)
class Stage:
    """A depth-ordered slice of a network: its name and the names of its parameters."""

    name: str  # "stem", "stage1", ..., "fc6"/"fc7" for AlexNet/VGG, "head"
    params: tuple[str, ...]  # names as in model.named_parameters()

    @property
    def size(self) -> int:
        return len(self.params)


@dataclass(frozen=True)
class Part:
    """A run of consecutive submodules that forms one stage; its tap is the last module's output."""

    name: str
    modules: tuple[str, ...]  # module paths, in forward order
    tap: str | None  # module whose output is the tap; None for the head (no tap)


# --------------------------------------------------------------------------- rules


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _units(model: nn.Module, expand: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """Top-level children in registration order, with the `expand` containers opened one level."""
    out = []
    for name, child in model.named_children():
        if name in expand:
            out += [(f"{name}.{k}", c) for k, c in child.named_children()]
        else:
            out.append((name, child))
    return out


def _assemble(
    stem: list[str], body: list[list[str]], tail: list[str], extras: list[Part], head: list[str]
) -> list[Part]:
    parts = [Part("stem", tuple(stem), stem[-1])] if stem else []
    parts += [Part(f"stage{i}", tuple(g), g[-1]) for i, g in enumerate(body, 1)]
    if tail:  # a final norm or 1x1 conv belongs to the last stage, and its output is that tap
        last = parts[-1]
        parts[-1] = Part(last.name, last.modules + tuple(tail), tail[-1])
    parts += extras
    if head:
        parts.append(Part("head", tuple(head), None))
    return parts


def _name_key(pattern: str) -> Callable[[str, nn.Module], str | None]:
    """Stage key from a unit's path: group 1 of `pattern`, or None when it does not match."""
    rx = re.compile(pattern)

    def key(path: str, module: nn.Module) -> str | None:
        m = rx.fullmatch(path)
        return m.group(1) if m else None

    return key


def _keyed(
    model: nn.Module,
    key: Callable[[str, nn.Module], Any],
    head: str,
    expand: Sequence[str] = (),
    extra: tuple[str, str] | None = None,
) -> list[Part]:
    """Parts from a stage key per unit: units before the first keyed unit are the stem, consecutive
    units with one key are one stage, parametrised units after the body join the last stage."""
    stem: list[str] = []
    body: list[list[str]] = []
    tail: list[str] = []
    extra_units: list[str] = []
    heads: list[str] = []
    last_key = None
    for path, module in _units(model, expand):
        k = key(path, module)
        if re.fullmatch(head, path):
            heads.append(path)
        elif extra and re.fullmatch(extra[1], path):
            extra_units.append(path)
        elif k is not None:
            if k != last_key or tail:
                body.append([])
            body[-1].append(path)
            last_key = k
        elif not body:
            stem.append(path)
        elif _has_params(module):
            tail.append(path)
    extras = [Part(extra[0], tuple(extra_units), extra_units[-1])] if extra and extra_units else []
    return _assemble(stem, body, tail, extras, heads)


def _dense_key(path: str, module: nn.Module) -> int | None:
    """DenseNet: transition i opens stage i+1, so each stage ends on its dense block (timm's taps)."""
    m = re.fullmatch(r"features\.(denseblock|transition)(\d+)", path)
    if not m:
        return None
    return int(m.group(2)) + (m.group(1) == "transition")


_INCEPTION_V4_STAGE = {"InceptionA": 1, "ReductionA": 2, "InceptionB": 2, "ReductionB": 3, "InceptionC": 3}


def _v4_key(path: str, module: nn.Module) -> int | None:
    return _INCEPTION_V4_STAGE.get(type(module).__name__)


_POOL_LAYERS = (nn.MaxPool2d, nn.AvgPool2d)


def _split_features(units: list[tuple[str, nn.Module]]) -> list[list[str]]:
    """Conv blocks of a `features` Sequential: each ends at a pooling layer (AlexNet, VGG); a net
    without pooling layers (MobileNet, EfficientNet) is split where the channel width changes."""
    groups: list[list[str]] = []
    if any(isinstance(m, _POOL_LAYERS) for _, m in units):
        cur: list[str] = []
        for path, module in units:
            cur.append(path)
            if isinstance(module, _POOL_LAYERS):
                groups.append(cur)
                cur = []
        if cur:
            groups[-1] += cur
        return groups
    width = None
    for i, (path, module) in enumerate(units):
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        w = convs[-1].out_channels if convs else width
        if i <= 1 or w != width:  # features.0 is the stem on its own
            groups.append([])
        groups[-1].append(path)
        width = w
    return groups


def _split_classifier(
    units: list[tuple[str, nn.Module]], fc_names: Sequence[str]
) -> tuple[list[Part], list[str]]:
    """Hidden FC layers (each with the activation after it, so its tap is post-ReLU) and the head."""
    with_params = [i for i, (_, m) in enumerate(units) if _has_params(m)]
    if not with_params:
        return [], []
    last = with_params[-1]
    segments: list[list[str]] = []
    cur: list[str] = []
    cur_has_layer = False
    for path, module in units[:last]:
        if cur_has_layer and (_has_params(module) or isinstance(module, nn.Dropout)):
            segments.append(cur)
            cur, cur_has_layer = [], False
        cur.append(path)
        cur_has_layer |= _has_params(module)
    head = [p for p, _ in units[last:]]
    if cur_has_layer:
        segments.append(cur)
    else:
        head = cur + head
    names = list(fc_names) + [f"fc{i}" for i in range(len(fc_names) + 1, len(segments) + 1)]
    return [Part(names[i], tuple(s), s[-1]) for i, s in enumerate(segments)], head


def _features_classifier(model: nn.Module, fc_names: Sequence[str] = ("fc6", "fc7")) -> list[Part]:
    """torchvision's `features` -> pool -> `classifier` layout (AlexNet, VGG, MobileNet, ...)."""
    blocks = _split_features([(p, m) for p, m in _units(model, ("features",)) if p.startswith("features.")])
    classifier = model.classifier
    cls_units = (
        _units(model, ("classifier",))
        if isinstance(classifier, nn.Sequential)
        else [("classifier", classifier)]
    )
    cls_units = [(p, m) for p, m in cls_units if p == "classifier" or p.startswith("classifier.")]
    fcs, head = _split_classifier(cls_units, fc_names)
    return _assemble(blocks[0], blocks[1:], [], fcs, head)


def _timm_vgg(model: nn.Module) -> list[Part]:
    """timm VGG: conv blocks, then fc6/fc7 as 7x7 and 1x1 convolutions (`pre_logits`), then the head."""
    blocks = _split_features([(p, m) for p, m in _units(model, ("features",)) if p.startswith("features.")])
    fc6 = Part("fc6", ("pre_logits.fc1", "pre_logits.act1"), "pre_logits.act1")
    fc7 = Part("fc7", ("pre_logits.drop", "pre_logits.fc2", "pre_logits.act2"), "pre_logits.act2")
    return _assemble(blocks[0], blocks[1:], [], [fc6, fc7], ["head"])


_RESNET = partial(_keyed, key=_name_key(r"layer(\d+)"), head=r"fc")
_INCEPTION = partial(_keyed, key=_name_key(r"Mixed_(\d)\w"), head=r"fc|AuxLogits")
_DENSENET = partial(_keyed, key=_dense_key, head=r"classifier", expand=("features",))
_EFFICIENTNET = partial(_keyed, key=_name_key(r"blocks\.(\d+)"), head=r"classifier", expand=("blocks",))

# Class (module.qualname) -> parts, bottom to top. One row per architecture family.
RULES: dict[str, Callable[[nn.Module], list[Part]]] = {
    "torchvision.models.alexnet.AlexNet": _features_classifier,
    "torchvision.models.vgg.VGG": _features_classifier,
    "finetune.classic.ZFNet": _features_classifier,
    "finetune.classic.LeNet5": partial(_features_classifier, fc_names=("c5", "f6")),
    "timm.models.vgg.VGG": _timm_vgg,
    "torchvision.models.googlenet.GoogLeNet": partial(
        _keyed, key=_name_key(r"(?:inception|maxpool)([345])[a-e]?"), head=r"fc|aux\d"
    ),
    "torchvision.models.inception.Inception3": _INCEPTION,
    "timm.models.inception_v3.InceptionV3": _INCEPTION,
    "timm.models.inception_v4.InceptionV4": partial(
        _keyed, key=_v4_key, head=r"last_linear", expand=("features",)
    ),
    "torchvision.models.resnet.ResNet": _RESNET,
    "timm.models.resnet.ResNet": _RESNET,
    "timm.models.resnetv2.ResNetV2": partial(
        _keyed, key=_name_key(r"stages\.(\d+)"), head=r"head", expand=("stages",)
    ),
    "torchvision.models.densenet.DenseNet": _DENSENET,
    "timm.models.densenet.DenseNet": _DENSENET,
    "timm.models.efficientnet.EfficientNet": _EFFICIENTNET,
    "timm.models.mobilenetv3.MobileNetV3": partial(
        _EFFICIENTNET, extra=("pre_logits", r"conv_head|norm_head|act2")
    ),
    "torchvision.models.mobilenetv2.MobileNetV2": partial(_features_classifier, fc_names=("pre_logits",)),
    "torchvision.models.mobilenetv3.MobileNetV3": partial(_features_classifier, fc_names=("pre_logits",)),
    "torchvision.models.efficientnet.EfficientNet": partial(_features_classifier, fc_names=("pre_logits",)),
}


def _class_key(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _deep_units(model: nn.Module, expand: set[str], prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Children in registration order, with every container named in `expand` opened (recursively)."""
    out = []
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if path in expand:
            out += _deep_units(child, expand, path + ".")
        else:
            out.append((path, child))
    return out


def _feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not hasattr(model, "pretrained_cfg"):
        return []
    return [f for f in info if isinstance(f, dict)]


def feature_modules(model: nn.Module) -> list[str]:
    """The module paths where timm says each feature level ends (`feature_info`), bottom -> top."""
    return [str(f.get("module", "")) for f in _feature_info(model)]


def _timm_features(model: nn.Module) -> list[Part] | None:
    """Parts of a timm net that has no rule, from its `feature_info`.

    Each feature module ends a stage. The units before the first one are the stem: with its own
    tap when the first feature level is the stem's output (stride 2, or nothing with parameters
    before it: ResNet's `act1`, RegNet's `stem`, NFNet's `stem.conv3`), untapped when it is
    already a stage (ConvNeXt's `stages.0`, stride 4). Parametrised units after the last
    level (a final norm or conv) join the last stage, whose tap stays timm's feature module;
    the classifier's units are the head. None when timm's modules are not found in the network
    (a network cut by `prune_intermediate_layers` keeps a found prefix: its lower levels).
    """
    wanted = feature_modules(model)
    expand = {".".join(p.split(".")[:i]) for p in wanted for i in range(1, p.count(".") + 1)}
    units = _deep_units(model, expand)
    names = [u for u, _ in units]
    found = [p for p in wanted if p in names]
    if not found or found != wanted[: len(found)]:
        return None
    cfg = model.pretrained_cfg or {}
    classifier = cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)

    def is_head(u: str) -> bool:
        return any(c == u or c.startswith(u + ".") or u.startswith(c + ".") for c in heads)

    first = names.index(found[0])
    pre = [u for u, _ in units[:first] if not is_head(u)]
    stride = int(_feature_info(model)[0].get("reduction", 1))
    layout: list[Part] = []
    if stride > 2 and any(_has_params(m) for _, m in units[:first]):
        layout.append(Part("stem", tuple(pre), None))  # the first level is a stage: the stem has no tap
        levels = [("stage", p) for p in found]
    else:
        levels = [("stem", found[0])] + [("stage", p) for p in found[1:]]
    cur: list[str] = [] if layout else pre
    n = 0
    for u, _ in units[first:]:
        if is_head(u):
            continue
        cur.append(u)
        if levels and u == levels[0][1]:
            kind, tap = levels.pop(0)
            n += kind == "stage"
            layout.append(Part("stem" if kind == "stem" else f"stage{n}", tuple(cur), tap))
            cur = []
    tail = [u for u in cur if _has_params(dict(units)[u])]
    if tail:  # a final norm or 1x1 conv belongs to the last stage; the tap stays timm's feature
        last = layout[-1]
        layout[-1] = Part(last.name, last.modules + tuple(tail), last.tap)
    head = [u for u, _ in units if is_head(u)]
    if head:
        layout.append(Part("head", tuple(head), None))
    return layout


def cut_by_timm(model: nn.Module) -> bool:
    """True for a timm net read from `feature_info`, which timm itself can cut at a feature level."""
    return (
        RULES.get(_class_key(model)) is None
        and not isinstance(model, Trunk)
        and callable(getattr(model, "forward_intermediates", None))
        and callable(getattr(model, "prune_intermediate_layers", None))
        and _timm_features(model) is not None
    )


def parts(model: nn.Module) -> list[Part] | None:
    """The network's parts, bottom -> top, or None when no rule knows its architecture."""
    if isinstance(model, Trunk):
        return None
    rule = RULES.get(_class_key(model))
    if rule is None and feature_modules(model):
        rule = _timm_features  # any other timm net: timm's own feature levels
    tv_layout = isinstance(getattr(model, "features", None), nn.Sequential) and hasattr(model, "classifier")
    if rule is None and tv_layout:
        rule = partial(_features_classifier, fc_names=())  # other torchvision nets of this layout
    return rule(model) if rule is not None else None


# --------------------------------------------------------------------------- stages


def _stages_from_parts(model: nn.Module, layout: list[Part]) -> list[Stage]:
    owner: dict[str, int] = {}
    for i, part in enumerate(layout):
        for path in part.modules:
            owner[path] = i
    buckets: list[list[str]] = [[] for _ in layout]
    current = 0
    for name, _ in model.named_parameters():
        # The longest module path that owns this parameter; a parameter no rule names (rare)
        # stays with the previous one, so registration order keeps it at its depth.
        pieces = name.split(".")
        for n in range(len(pieces) - 1, 0, -1):
            prefix = ".".join(pieces[:n])
            if prefix in owner:
                current = owner[prefix]
                break
        buckets[current].append(name)
    return [Stage(p.name, tuple(b)) for p, b in zip(layout, buckets, strict=True) if b]


def stages(model: nn.Module) -> list[Stage]:
    """The trainable layers of `model` (a whole backbone or a trunk) as stages, bottom -> top.

    Every parameter belongs to exactly one stage; stages without parameters are left out.
    Names are as in `model.named_parameters()`.

    Raises:
        BackboneError: no rule knows this architecture.
    """
    if isinstance(model, Trunk):
        return [Stage(s.name, tuple(f"net.{p}" for p in s.params)) for s in stages(model.net)]
    layout = parts(model)
    if layout is not None:
        return _stages_from_parts(model, layout)
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        ordered = [tuple(names) for _, names in sorted(groups.items())]
        names = ["stem"] + [f"stage{i}" for i in range(1, len(ordered))]
        return [Stage(n, p) for n, p in zip(names, ordered, strict=True)]
    raise BackboneError(
        f"no stage split known for {type(model).__name__}",
        "use a catalogue backbone (see `finetune backbones`) or a timm model",
    )


# --------------------------------------------------------------------------- taps


def _tapped(model: nn.Module) -> list[Part]:
    """Parts with a tap that can be read: a timm net without a rule only where timm can cut it."""
    layout = parts(model) or []
    if RULES.get(_class_key(model)) is None and feature_modules(model) and not cut_by_timm(model):
        return []  # no forward_intermediates: its feature levels cannot be read without the whole head
    return [p for p in layout if p.tap is not None]


def taps(model: nn.Module) -> list[str]:
    """Tap names of a whole backbone, bottom -> top: stem, stage1..N, [fc6, fc7], pool."""
    return [p.name for p in _tapped(model)] + ["pool"]


def _tap_modules(model: nn.Module, names: Sequence[str]) -> tuple[list[str | None], int]:
    """Module path per tap (None for `pool`) and the index of the highest part needed."""
    layout = parts(model) or []
    readable = {p.name for p in _tapped(model)}
    by_name = {p.name: (i, p) for i, p in enumerate(layout) if p.name in readable}
    paths: list[str | None] = []
    top = -1
    for name in names:
        if name == "pool":
            paths.append(None)
            top = max(top, len(layout))
        elif name in by_name:
            i, p = by_name[name]
            paths.append(p.tap)
            top = max(top, i)
        elif any(p.name == name and p.tap for p in layout):
            raise BackboneError(
                f"{type(model).__name__} cannot be cut at {name}: timm gives it no forward_intermediates, "
                "so its levels are not readable without its head",
                "use the pool tap (linear-probe), or a catalogue backbone for stage taps",
            )
        else:
            raise BackboneError(
                f"unknown tap {name!r} for {type(model).__name__}", f"choose from {', '.join(taps(model))}"
            )
    return paths, top


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _drop_head(model: nn.Module) -> None:
    """Remove the classifier so the network returns its pooled pre-logits (B, D)."""
    if hasattr(model, "reset_classifier"):  # timm: num_classes=0 -> pooled pre-logits
        model.reset_classifier(0)
        return
    layout = parts(model)
    head = [p for p in layout if p.name == "head"] if layout else []
    if head:
        for path in head[0].modules:  # param-free layers (a final ReLU/pool) keep working
            if _has_params(model.get_submodule(path)):
                _replace(model, path, nn.Identity())
        return
    path = classifier_path(model)
    if path is None:
        raise BackboneError("cannot find the 1000-way classifier of this network", "use a timm model instead")
    _replace(model, path, nn.Identity())


def classifier_path(model: nn.Module) -> str | None:
    """The module path of the network's ImageNet classifier (what a new head replaces), or None.

    The one place that finds it: timm names its own (`get_classifier`); a catalogue rule's
    `head` part names it for torchvision and the classic nets; otherwise the last 1000-way
    nn.Linear.
    """
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        for name, module in model.named_modules():
            if module is classifier and name:
                return name
    head = next((p for p in parts(model) or [] if p.name == "head"), None)
    for path in head.modules if head is not None else ():
        if _has_params(model.get_submodule(path)):
            return path
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == IMAGENET_CLASSES:
            last = name
    return last


def _pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) by global avg/max; 'none' keeps the map; (B, D) passes through."""
    if x.dim() != 4 or pool == "none":
        return x.clone()  # a later in-place op (ReLU(inplace=True)) must not change what was read
    if pool == "max":
        return x.amax(dim=(2, 3))
    return x.mean(dim=(2, 3))


class Trunk(nn.Module):
    """A backbone cut above its highest tap; forward returns the tap(s), read by forward hooks.

    The layers above the highest tap are replaced by `nn.Identity`, so their parameters are
    gone (a saved stage-probe model is the truncated network plus its head). State-dict keys
    are the backbone's own, prefixed by `net.`.
    """

    def __init__(
        self, net: nn.Module, names: Sequence[str], paths: Sequence[str | None], pool: str, single: bool
    ) -> None:
        super().__init__()
        self.net = net
        self.tap_names = tuple(names)
        self.tap_paths = tuple(paths)
        self.pool = pool
        self.single = single

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:  # x: (B, 3, H, W)
        seen: dict[str, torch.Tensor] = {}

        def keep(path: str):
            def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
                seen[path] = _pool(out, self.pool)  # pooled at once: later in-place ops cannot touch it

            return hook

        wanted = {p for p in self.tap_paths if p is not None}
        handles = [self.net.get_submodule(p).register_forward_hook(keep(p)) for p in wanted]
        try:
            out = self.net(x)  # (B, D) pooled pre-logits once the head is gone
        finally:
            for h in handles:
                h.remove()
        feats = tuple(out if p is None else seen[p] for p in self.tap_paths)  # each (B, D_i)
        return feats[0] if self.single else feats


class Intermediates(Trunk):
    """A timm net cut by timm: `prune_intermediate_layers` removes what lies above the highest
    feature level asked for (keys unchanged), `forward_intermediates` returns the levels as NCHW
    maps (whatever layout the blocks use inside). With `pool` asked for too, nothing is pruned
    and the head gives the pooled pre-logits from the same forward.
    """

    def __init__(
        self,
        net: nn.Module,
        names: Sequence[str],
        paths: Sequence[str | None],
        levels: Sequence[int | None],
        pool: str,
        single: bool,
    ) -> None:
        super().__init__(net, names, paths, pool, single)
        self.levels = tuple(levels)  # feature_info index per tap; None for `pool`

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:  # x: (B, 3, H, W)
        wanted = sorted({i for i in self.levels if i is not None})
        if None in self.levels:
            final, maps = self.net.forward_intermediates(x, indices=wanted)
            pooled = self.net.forward_head(final, pre_logits=True)  # (B, D)
        else:
            maps, pooled = self.net.forward_intermediates(x, indices=wanted, intermediates_only=True), None
        by_level = dict(zip(wanted, maps, strict=True))  # each (B, C_i, H_i, W_i)
        feats = tuple(pooled if i is None else _pool(by_level[i], self.pool) for i in self.levels)
        return feats[0] if self.single else feats


def _cut_by_timm(model: nn.Module, names: Sequence[str], pool: str, single: bool) -> nn.Module:
    paths, _ = _tap_modules(model, names)
    modules = feature_modules(model)
    levels = [None if p is None else modules.index(p) for p in paths]
    kept = sorted({i for i in levels if i is not None})
    if None in levels:
        _drop_head(model)  # the whole network runs; its classifier goes
    else:
        model.prune_intermediate_layers(kept, prune_norm=True, prune_head=True)
    return Intermediates(model, names, paths, levels, pool, single)


def _cut(model: nn.Module, names: Sequence[str], pool: str, single: bool) -> nn.Module:
    if pool not in POOLS:
        raise BackboneError(f"unknown pooling {pool!r}", f"choose from {', '.join(POOLS)}")
    if not names:
        raise BackboneError("no taps asked for", "name at least one, e.g. pool")
    if cut_by_timm(model) and any(n != "pool" for n in names):
        return _cut_by_timm(model, names, pool, single)
    paths, top = _tap_modules(model, names)
    layout = parts(model) or []
    for part in layout[top + 1 :]:
        if part.name == "head":
            continue
        for path in part.modules:
            _replace(model, path, nn.Identity())
    _drop_head(model)
    return Trunk(model, names, paths, pool, single)


class OneTap(nn.Module):
    """A one-tap trunk with the multi-tap interface: forward returns a 1-tuple."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.trunk(x),)


class Concatenated(nn.Module):
    """Several taps from one forward, as one (B, sum D_i) tensor: engines and caches see one output."""

    def __init__(self, multi: nn.Module) -> None:
        super().__init__()
        self.multi = multi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.flatten(1) for t in self.multi(x)], dim=1)  # (B, sum D_i)


def build_trunk(model: nn.Module, tap: str = "pool", pool: str = "avg") -> nn.Module:
    """The network up to `tap`: images (B, 3, H, W) -> features (B, D). Modifies `model`.

    Conv taps are pooled by global `pool` ("avg" or "max"; "none" returns (B, C, H, W)). The
    `pool` tap is the network's own pooled pre-logits, whatever `pool` says; with pool="avg" it
    is the model itself with its classifier removed (keys unchanged).
    Deterministic: the same call on a fresh model gives the same architecture and keys.

    Raises:
        BackboneError: unknown tap or pooling.
    """
    if tap == "pool" and pool == "avg":
        _drop_head(model)
        return model
    return _cut(model, [tap], pool, single=True)


def build_multi_trunk(model: nn.Module, names: Sequence[str], pool: str = "avg") -> nn.Module:
    """The network cut above the highest of `names`; forward returns a tuple of (B, D_i), one per tap,
    from one forward pass. Modifies `model`.

    Raises:
        BackboneError: unknown tap or pooling.
    """
    return _cut(model, list(names), pool, single=False)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def tap_shapes(model: nn.Module, input_size: int) -> dict[str, tuple[int, ...]]:
    """Unpooled output shape (without batch) of every tap, from one forward on a zeros batch.

    A model on the meta device costs no memory and no arithmetic: only shapes are computed.
    The model is not modified; `pool` is read as the input of the classifier.
    """
    layout = parts(model) or []
    found: dict[str, tuple[int, ...]] = {}
    handles = []
    for part in layout:
        if part.tap is not None:

            def hook(module, args, out, name=part.name):
                found[name] = tuple(out.shape[1:])

            handles.append(model.get_submodule(part.tap).register_forward_hook(hook))
    head_path = classifier_path(model)
    if head_path is not None:

        def pre(module, args):
            found["pool"] = tuple(torch.flatten(args[0], 1).shape[1:])

        handles.append(model.get_submodule(head_path).register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, 3, input_size, input_size, device=_model_device(model)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if "pool" not in found:
        found["pool"] = tuple(out.shape[1:])
    return {name: found[name] for name in taps(model) if name in found}


@torch.no_grad()
def feature_dim(trunk: nn.Module, input_size: int = 224) -> int:
    """Width D of the trunk's output, from one forward on a tiny batch."""
    was_training = trunk.training
    trunk.eval()
    out = trunk(torch.zeros(1, 3, input_size, input_size, device=_model_device(trunk)))
    trunk.train(was_training)
    return int(out.shape[-1] if out.dim() == 2 else out.shape[1])


class ImageNetEntropy(nn.Module):
    """An unmodified backbone's 1000-way ImageNet softmax, reduced to its entropy / log(1000).

    images (B, 3, H, W) -> (B, 1) in [0, 1]: 0 is one confident class, 1 is uniform. `advise`
    measures how familiar a dataset looks to the network with it (and caches it per image).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)  # (B, 1000)
        if logits.shape[-1] != 1000:
            raise BackboneError(
                "this backbone has no ImageNet classifier to measure with",
                "run advise with an ImageNet-pretrained --backbone, e.g. lite0",
            )
        p = logits.float().softmax(dim=1)
        return -(p * p.clamp_min(1e-12).log()).sum(dim=1, keepdim=True) / math.log(logits.shape[-1])
