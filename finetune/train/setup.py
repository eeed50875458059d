"""Before the first step: what trains, at which learning rate, with which BatchNorm statistics.

    names = frozen_names(stages, recipe)            # parameters of stages with multiplier 0
    groups = param_groups(stages, recipe, dict(trunk.named_parameters()), head_params)
    optimizer = OPTIMIZERS[recipe.optimizer](groups, recipe)
    lr_factor(step, total, warmup)                  # warmup + cosine multiplier

`param_groups` — the layer-wise learning rates — is a pure function, tested on tiny models in
milliseconds; the training loop never decides a learning rate itself.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import torch
from torch import nn

from finetune.models.classifier import Classifier
from finetune.recipes import ROLES, Recipe, stage_roles

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass


OPTIMIZERS = {
    "sgd": lambda groups, r: torch.optim.SGD(
        groups, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay
    ),
    "adamw": lambda groups, r: torch.optim.AdamW(groups, lr=r.lr, weight_decay=r.weight_decay),
}


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Multiplier of every group's LR at optimizer step `step` (0-based) of `total`.

    Linear warmup from 1/(warmup+1) to 1 over `warmup` steps, then cosine to 0 (or constant).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def amp_for(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed): bf16 where supported, else fp16."""
    if device.type != "cuda":
        return None, False  # CPU and MPS train in float32: exact, and resume is bit-identical
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def freeze(model: Classifier, names: list[str]) -> None:
    """requires_grad=False for the named trunk parameters: no gradient, no autograd graph below them."""
    params = dict(model.trunk.named_parameters())
    for n in names:
        params[n].requires_grad_(False)


def frozen_norm_layers(trunk: nn.Module) -> list[nn.Module]:
    """BatchNorm layers whose parameters are all frozen: bn_policy=eval keeps their ImageNet statistics."""
    out = []
    for module in trunk.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                out.append(module)
    return out


def norm_layers(trunk: nn.Module) -> list[nn.Module]:
    return [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# Which BatchNorm layers stay in eval mode (running statistics, not updated) while training:
# "eval": those of frozen stages; "train": none; "frozen": all of them (their affine weights
# still learn) -- for small batches or images far from ImageNet, where batch statistics differ
# so much from ImageNet's that they wreck a probed head (measured on digits, see the note).
BN_POLICIES = {
    "eval": frozen_norm_layers,
    "train": lambda trunk: [],
    "frozen": norm_layers,
}


def set_train_mode(model: nn.Module, frozen_norms: list[nn.Module]) -> None:
    model.train()
    for m in frozen_norms:
        m.eval()  # running mean/var neither used from the batch nor updated


def frozen_names(stages: list, recipe: Recipe) -> list[str]:
    """Names of the trunk parameters whose stage has multiplier 0: they never get a gradient."""
    mult = dataclasses.asdict(recipe.lr_mult)
    roles = stage_roles(len(stages), recipe)
    pairs = zip(stages, roles, strict=True)
    return [name for stage, role in pairs if mult[role] == 0 for name in stage.params]


def param_groups(stages: list, recipe: Recipe, named_params: dict[str, Any], head_params: list) -> list[dict]:
    """Optimizer parameter groups: the layer-wise learning rates of a recipe, as one pure function.

    The head learns at `recipe.lr * lr_mult.head`; each stage group (top, middle, bottom, see
    `stage_roles`) at `recipe.lr * lr_mult.<role>`. Groups with multiplier 0 (frozen) or no
    parameters are left out, so frozen parameters never reach the optimizer. Nothing is
    modified: the caller sets `requires_grad=False` on `frozen_names(stages, recipe)`.

    Args:
        stages: the trunk's stages, bottom -> top (`anatomy.stages(trunk)`); every name in
            `named_params` must belong to exactly one stage.
        recipe: lr, weight_decay, top_stages, middle_stages, lr_mult.
        named_params: `dict(trunk.named_parameters())`.
        head_params: the new head's parameters.

    Returns:
        Dicts for `torch.optim` with keys params, lr, weight_decay, name ("head", "top",
        "middle", "bottom") and lr_mult, head first, then top -> bottom.
    """
    covered = [n for s in stages for n in s.params]
    missing = sorted(set(named_params) - set(covered))
    if missing or len(covered) != len(set(covered)):
        raise ValueError(f"stages must cover every trunk parameter once; not covered: {missing[:5]}")
    mult = dataclasses.asdict(recipe.lr_mult)
    by_role: dict[str, list] = {role: [] for role in ROLES}
    for stage, role in zip(stages, stage_roles(len(stages), recipe), strict=True):
        by_role[role] += [named_params[n] for n in stage.params]
    groups = []
    for role, params in [("head", list(head_params))] + [(r, by_role[r]) for r in reversed(ROLES)]:
        if params and mult[role] > 0:
            groups.append(
                {
                    "params": params,
                    "lr": recipe.lr * mult[role],
                    "weight_decay": recipe.weight_decay,
                    "name": role,
                    "lr_mult": mult[role],
                }
            )
    return groups
