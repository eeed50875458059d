"""A network's anatomy: named taps (where features are read) and trunks (the network cut at a tap).

    trunk = build_trunk(model, "pool")     # images (B, 3, H, W) -> pooled features (B, D)
    feature_dim(trunk, 224)                # D, from one tiny forward

The `pool` tap is the pooled penultimate layer: what a linear probe reads, and what the new
head of a fine-tuned model sits on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune.errors import BackboneError

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class Stage:
    """A depth-ordered slice of a network: its name and the names of its parameters."""

    name: str  # "stem", "stage1", ..., or "fc6"/"fc7" for AlexNet/VGG
    params: tuple[str, ...]  # names as in model.named_parameters()

    @property
    def size(self) -> int:
        return len(self.params)


def stages(model: nn.Module) -> list[Stage]:
    """The trainable layers of `model` (a trunk or a whole backbone) as stages, bottom -> top.

    Every parameter belongs to exactly one stage. timm models use timm's own coarse
    `group_matcher` (stem, one group per block stage, ...).
    """
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        ordered = [tuple(names) for _, names in sorted(groups.items())]
        names = ["stem"] + [f"stage{i}" for i in range(1, len(ordered))]
        return [Stage(n, p) for n, p in zip(names, ordered)]
    raise BackboneError(f"no stage split known for {type(model).__name__}", "use a timm backbone")


def _drop_last_linear(model: nn.Module) -> nn.Module:
    """Replace the final 1000-way nn.Linear of a torchvision-style model by Identity."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == IMAGENET_CLASSES:
            last = name
    if last is None:
        raise BackboneError("cannot find the 1000-way classifier of this network", "use a timm model instead")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return model


def build_trunk(model: nn.Module, tap: str = "pool") -> nn.Module:
    """The network up to `tap`, returning pooled (B, D) features. Modifies and returns `model`."""
    if tap != "pool":
        raise BackboneError(f"unknown tap {tap!r}", "use `pool`; see `finetune backbones NAME --taps`")
    if hasattr(model, "reset_classifier"):  # timm: num_classes=0 -> pooled pre-logits
        model.reset_classifier(0)
        return model
    return _drop_last_linear(model)


@torch.no_grad()
def feature_dim(trunk: nn.Module, input_size: int = 224) -> int:
    """Width D of the trunk's output, from one forward on a tiny batch."""
    was_training = trunk.training
    trunk.eval()
    out = trunk(torch.zeros(1, 3, input_size, input_size))
    trunk.train(was_training)
    return int(out.shape[-1])


def imagenet_logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, 1000) ImageNet logits of an unmodified backbone."""
    return model(x)
