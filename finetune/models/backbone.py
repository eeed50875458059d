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
from collections.abc import Callable, Sequence
from typing import Any

from finetune.data.transforms import Preprocessing
from finetune.errors import WeightsError
from finetune.io import sha256_file
from finetune.models.catalogue import ALIASES, DEFAULT_BACKBONE, BackboneSpec, resolve
from finetune.models.weights import (
    WeightsInfo,
    apply_state,
    hf_cache_dir,
    hub_cached_file,
    missing_weights_error,
    packaged_file,
    read_state_dict,
    torch_hub_dir,
)

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
    from finetune.models import classic

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
    try:
        _write_card(path, bb)
    except OSError as err:  # a full or read-only cache: the card is only a shortcut for next time
        log.info(f"backbone card not cached ({err.strerror})")
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


def _meta_model(spec: BackboneSpec) -> Any:
    """The architecture without weights or memory (meta device); on CPU where meta cannot build it."""
    import torch

    try:
        with torch.device("meta"):
            return build(spec, pretrained=False).model
    except (NotImplementedError, RuntimeError):
        return build(spec, pretrained=False).model
