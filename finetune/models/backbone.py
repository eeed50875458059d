"""A backbone: a network with its weights and preprocessing, built from a catalogue spec.

    bb = build("lite0")                           # packaged ImageNet weights, works offline
    bb.model, bb.preprocessing, bb.weights.source # nn.Module, Preprocessing, "packaged"
    bb = open_backbone("lite0")                   # the same, built only when .model is first used

Weights are resolved as `weights.py` says; preprocessing comes from the weights' own
metadata, never from a hard-coded ImageNet mean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from finetune.data.transforms import Preprocessing
from finetune.errors import WeightsError
from finetune.io import sha256_file
from finetune.models.catalogue import ALIASES, DEFAULT_BACKBONE, BackboneSpec, resolve
from finetune.models.fetch import fetch, published, tv_weights
from finetune.models.weights import WeightsInfo, apply_state, packaged_file, read_state_dict

log = logging.getLogger(__name__)


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
            from finetune.models.anatomy import taps

            self._tap_names = tuple(taps(self.model))
        return self._tap_names


def _create_timm(spec: BackboneSpec, state: dict | None = None, origin: str = "", **extra: Any) -> Any:
    import timm

    kwargs = {**dict(spec.kwargs), **extra}
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


# torchvision nets whose train mode returns named tuples through auxiliary heads: built without them.
TV_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


def _create_torchvision(spec: BackboneSpec, **extra: Any) -> Any:
    import torchvision

    kwargs = {**TV_KWARGS.get(spec.arch, {}), **dict(spec.kwargs), **extra}
    return torchvision.models.get_model(spec.arch, weights=None, **kwargs)


def _create_builtin(spec: BackboneSpec) -> Any:
    from finetune.models import classic

    return classic.BUILDERS[spec.arch]()


def bare_model(spec: BackboneSpec, **extra: Any) -> Any:
    """The architecture with random weights (the framework's own init); `extra` constructor arguments."""
    if spec.source == "timm":
        return _create_timm(spec, **extra)
    if spec.source == "torchvision":
        return _create_torchvision(spec, **extra)
    return _create_builtin(spec)


@dataclass(frozen=True)
class Loading:
    """What a library's builder does around `load_state_dict` for one architecture, as data.

    torchvision's own loader is never called (it unpickles with weights_only=False), nor timm's
    download path: their builders' extra steps are these rows, applied to tensors our safe
    reader has read.
    """

    aux: tuple[str, ...] = ()  # auxiliary heads: built when the file holds them, dropped after loading
    kwargs: tuple[tuple[str, Any], ...] = ()  # constructor arguments that published weights need
    rename: tuple[tuple[str, str], ...] = ()  # (regex, replacement): old tensor names -> current
    meta_kwargs: Callable[[dict], dict] | None = None  # constructor arguments read off torchvision's meta

    def renamed(self, state: dict) -> dict:
        for pattern, repl in self.rename:
            rx = re.compile(pattern)
            state = {rx.sub(repl, k): v for k, v in state.items()}
        return state

    def has_aux(self, state: dict) -> bool:
        return any(k.split(".", 1)[0] in self.aux for k in state)


# DenseNet's published files predate '.'-free module names: "norm.1.weight" is now "norm1.weight".
_DENSE_OLD = (
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
    r"\1\2",
)
_TV_VIT = Loading(meta_kwargs=lambda meta: {"image_size": meta["min_size"][0]})

# Keyed by the spec's model without its weight tag: "tv:<arch>" for torchvision, the timm name.
LOADING: dict[str, Loading] = {
    "tv:googlenet": Loading(aux=("aux1", "aux2"), kwargs=(("transform_input", True),)),
    "tv:inception_v3": Loading(aux=("AuxLogits",), kwargs=(("transform_input", True),)),
    "inception_v3": Loading(aux=("AuxLogits",)),  # timm's torchvision-derived file keeps the aux head
    **{f"tv:densenet{n}": Loading(rename=(_DENSE_OLD,)) for n in (121, 161, 169, 201)},
    **{f"tv:vit_{v}": _TV_VIT for v in ("b_16", "b_32", "l_16", "l_32", "h_14")},
    "tv:maxvit_t": Loading(meta_kwargs=lambda meta: {"input_size": meta["min_size"]}),
}


def load_state(spec: BackboneSpec, state: dict, mapping: str = "name", origin: str = "") -> Any:
    """The spec's network holding `state`: the one place a weights layout meets an architecture.

    Loaded as the network's library loads its published file (`LOADING`: old names renamed,
    auxiliary heads built for loading and then dropped for transfer), with tensors matched by
    name (strict, shape-checked) or, with mapping="positional", by order. A timm file in another
    layout (torchvision's VGG) then goes through timm's own filter.

    Raises:
        WeightsError: the tensors do not fit, with the first mismatch named.
    """
    rule = LOADING.get(spec.model.split(".")[0], Loading())
    state = rule.renamed(state)
    aux = rule.has_aux(state)
    extra = dict(rule.kwargs) if spec.source == "torchvision" else {}
    if rule.meta_kwargs is not None and (w := tv_weights(spec.arch)) is not None:
        extra.update(rule.meta_kwargs(w.meta))
    if aux:
        extra["aux_logits"] = True
    model = bare_model(spec, **extra)
    try:
        apply_state(model, state, mapping=mapping)
    except WeightsError:
        if spec.source != "timm" or mapping != "name":
            raise
        # A checkpoint in another layout (torchvision's VGG for timm's VGG): timm's own filter may map it.
        try:
            model = _create_timm(spec, state, origin, **extra)
        except WeightsError:
            pass
        else:
            return _without_aux(model, rule.aux if aux else ())
        raise
    return _without_aux(model, rule.aux if aux else ())


def _without_aux(model: Any, heads: tuple[str, ...]) -> Any:
    """Drop auxiliary heads once loaded: transfer reads and trains the main path only."""
    if heads:
        model.aux_logits = False
        for name in heads:
            setattr(model, name, None)
    return model


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
        w = tv_weights(spec.arch)
        if w is not None:
            t = w.transforms()
            crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
            return Preprocessing(crop, crop / resize, tuple(t.mean), tuple(t.std), t.interpolation.value)
    return getattr(model, "preprocessing", Preprocessing())


def build(
    name: str | BackboneSpec = DEFAULT_BACKBONE,
    pretrained: bool = True,
    weights_file: str | os.PathLike | None = None,
    weights_map: str = "name",
    seed: int | None = None,
    offline: bool | None = None,
) -> Backbone:
    """Build a backbone in eval mode with weights resolved as in `weights.py`.

    `seed` seeds torch first, so a random init (--no-pretrained) is reproducible. Published
    weights come from the framework's cache, or are downloaded once unless `offline` (or
    FINETUNE_OFFLINE / HF_HUB_OFFLINE) says not to (`fetch.py`).

    Raises:
        BackboneError: unknown name.
        WeightsError: not cached offline, unreachable, an unsafe file, or a file that does not fit.
    """
    spec = name if isinstance(name, BackboneSpec) else resolve(name)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    if spec.source == "builtin" and (pretrained and weights_file is None):
        pretrained = False  # nothing published: random init, said in the notes and by `backbones`
    model, info = _build_model(spec, pretrained, weights_file, weights_map, offline)
    model.eval()
    return Backbone(spec=spec, model=model, preprocessing=_preprocessing_of(spec, model), weights=info)


# Sources whose file cannot be shadowed by another one appearing later: a card stays true as
# long as that file is unchanged. Hub-cache weights (a newer snapshot may appear) are never carded.
CARDED_SOURCES = ("packaged", "file")


def _card_path(name: str, pretrained: bool, weights_file, weights_map: str):
    from finetune.io import cache_root, versions

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
    from finetune.io import file_key

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
    from finetune.io import file_key, write_json

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
    offline: bool | None = None,
) -> Backbone:
    """`build`, deferred when a card in the cache still describes the result.

    A card (`backbones/<request digest>.json`) records what `build` resolved: the model, the
    weights file with its sha256 and file key (path, size, mtime, inode), preprocessing and taps.
    It is keyed by the request and the library versions, and used only while the weights file
    is unchanged; the network itself is built on first use of `.model`.
    """

    def make() -> Backbone:
        return build(name, pretrained, weights_file, weights_map, seed, offline)

    if not cards or not pretrained:
        return make()
    path = _card_path(name, pretrained, weights_file, weights_map)
    found = _read_card(path, name, make) if path.is_file() else None
    if found is not None:
        return found
    bb = make()
    try:
        _write_card(path, bb)
    except OSError as err:  # a full or read-only cache: the card is only a shortcut for next time
        log.info(f"backbone card not cached ({err.strerror})")
    return bb


def _build_model(spec: BackboneSpec, pretrained: bool, weights_file, weights_map: str, offline: bool | None):
    if weights_file is not None:
        model = load_state(spec, read_state_dict(weights_file), weights_map, os.fspath(weights_file))
        return model, WeightsInfo("file", str(weights_file), sha256_file(weights_file))
    if not pretrained:
        return bare_model(spec), WeightsInfo("random")
    packaged = packaged_file(spec.model) if spec.source == "timm" else None
    if packaged is not None:
        provider, path = packaged
        model = load_state(spec, read_state_dict(path), provider.mapping, path)
        return model, WeightsInfo("packaged", path, sha256_file(path))
    src = published(spec)
    if src is None:
        raise WeightsError(
            f"{spec.name} has no published ImageNet weights",
            "pass --weights FILE (.safetensors or state dict), or --no-pretrained to train from random init",
        )
    info = fetch(src, offline)
    return load_state(spec, read_state_dict(info.path), "name", info.path), info


def num_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_model(spec: BackboneSpec) -> Any:
    """The architecture without weights or memory (meta device); on CPU where meta cannot build it."""
    import torch

    try:
        with torch.device("meta"):
            return build(spec, pretrained=False).model
    except (NotImplementedError, RuntimeError):
        return build(spec, pretrained=False).model
