"""Before the first step: what trains, at which LR, with which BatchNorm statistics, in which order.

    recipe = for_world(recipe, world)                      # lr x (processes x accum_steps)
    freeze(model, frozen_names(stages, recipe))            # stages with multiplier 0: no gradient
    model, norms = batchnorm_policy(model, recipe, device, world)   # BatchNorm layers kept in eval mode
    groups = param_groups(stages, recipe, dict(trunk.named_parameters()), head_params)
    optimizer = OPTIMIZERS[recipe.optimizer](groups, recipe)
    scheduler = make_scheduler(optimizer, total_steps, warmup_steps, recipe.schedule)
    order, seeds = epoch_plan(n, epoch, recipe, world, rank)   # this rank's images of one epoch
    mixup, loss_fn = make_mixup(recipe, k), make_loss(recipe, class_weight)   # timm's Mixup + soft loss
    ema = make_ema(model, recipe)                          # timm's ModelEmaV3, or None

Each is a small pure function of the model, the recipe and the world size, tested on tiny models
in milliseconds; the training loop never decides a learning rate or a sample order itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from finetune.errors import TrainingError
from finetune.models.classifier import Classifier
from finetune.recipes import ROLES, Recipe, stage_roles

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.utils import ModelEmaV3

log = logging.getLogger(__name__)

OPTIMIZERS = {
    "sgd": lambda groups, r: torch.optim.SGD(
        groups, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay
    ),
    "adamw": lambda groups, r: torch.optim.AdamW(groups, lr=r.lr, weight_decay=r.weight_decay),
}


def for_world(recipe: Recipe, world: int) -> Recipe:
    """The recipe as `world` processes run it: the LR scales with the effective batch.

    The recipe's `lr` is for one batch of `batch_size` images; one optimizer step sees
    batch_size x accum_steps x world of them, and the LR is scaled linearly with that
    (lr x accum_steps x world), as the recipes say.

    Raises:
        TrainingError: balance = "sampler" with several processes (each would draw its own sample).
    """
    factor = world * recipe.accum_steps
    if factor == 1:
        return recipe
    if world > 1 and recipe.balance == "sampler":
        raise TrainingError(
            'balance = "sampler" is not supported under torchrun',
            "use --set balance=weights (a class-weighted loss) with several processes",
        )
    parts = [f"{world} processes"] if world > 1 else []
    parts += [f"{recipe.accum_steps} batches per step"] if recipe.accum_steps > 1 else []
    log.info(
        f"{', '.join(parts)}: effective batch {recipe.batch_size * factor}, "
        f"lr {recipe.lr:g} x {factor} = {recipe.lr * factor:g}"
    )
    return dataclasses.replace(recipe, lr=recipe.lr * factor)


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


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, schedule: str):
    """Warmup + cosine (or constant) as a LambdaLR over optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, schedule))


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


def batchnorm_policy(
    model: Classifier, recipe: Recipe, device: torch.device, world: int
) -> tuple[Classifier, list[nn.Module]]:
    """(the model, its BatchNorm layers that stay in eval mode) under `recipe.bn_policy`.

    Call after `freeze`. Under torchrun on CUDA, the BatchNorm layers whose statistics train (and
    only those) become SyncBatchNorm: statistics of the global batch. SyncBatchNorm needs a GPU,
    so on gloo (CPU) each process keeps its own and rank 0's are shared before validating and saving.
    """
    norms = BN_POLICIES[recipe.bn_policy](model.trunk)
    if world > 1 and device.type == "cuda":
        kept = {id(m) for m in norms}
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and id(child) not in kept:
                    # convert_sync_batchnorm returns a new module (same parameters and buffers): put it in
                    setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return model, norms


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


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """sklearn's "balanced" weight per class: n / (K * count), a missing class counted once."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return len(labels) / (n_classes * np.maximum(counts, 1))


def epoch_plan(
    n: int,
    epoch: int,
    recipe: Recipe,
    world: int = 1,
    rank: int = 0,
    sample_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(this rank's sample order, augmentation seed per sample) for one epoch: a pure function.

    Everything comes from (recipe.seed, epoch, world, rank), so a resumed run (any rank) rebuilds
    exactly the epoch it stopped in from those numbers alone. The order is torch's
    `DistributedSampler` (1 process and N processes walk the same global order, each rank every
    N-th image); class-balanced sampling (one process only) draws with replacement. Augmentation
    seeds are the same on every rank (indexed by image). A rank's last batch of one image is
    dropped: it breaks BatchNorm in training mode (every rank has the same count, so all agree).
    """
    from torch.utils.data import DistributedSampler

    rng = np.random.default_rng([recipe.seed, epoch])
    if sample_weights is not None:
        order = rng.choice(n, size=n, replace=True, p=sample_weights / sample_weights.sum())
    else:
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=recipe.seed)
        sampler.set_epoch(epoch)
        order = np.fromiter(iter(sampler), dtype=np.int64)
    seeds = rng.integers(0, 2**31 - 1, size=n, dtype=np.int64)
    if len(order) % recipe.batch_size == 1 and len(order) > 1:
        order = order[:-1]
    return order.astype(np.int64), seeds


def batches_per_epoch(n: int, batch_size: int, world: int) -> int:
    """How many batches each rank takes per epoch (the length of `epoch_plan`'s order, batched)."""
    per_rank = math.ceil(n / world)
    if per_rank % batch_size == 1 and per_rank > 1:
        per_rank -= 1
    return math.ceil(per_rank / batch_size)


def steps_per_epoch(n: int, recipe: Recipe, world: int) -> int:
    """Optimizer steps per epoch: one per `accum_steps` batches, and one for the epoch's rest."""
    return math.ceil(batches_per_epoch(n, recipe.batch_size, world) / recipe.accum_steps)


# --------------------------------------------------------------------------- mixup, loss, EMA


def make_mixup(recipe: Recipe, n_classes: int) -> Mixup | None:
    """timm's `Mixup` for the recipe's mixup / cutmix alphas (None when both are 0).

    One lambda per batch (timm's default "batch" mode); with both on, each batch is mixup or
    cutmix with even odds. The recipe's label smoothing is folded into the mixed targets.
    """
    if recipe.mixup <= 0 and recipe.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=recipe.mixup,
        cutmix_alpha=recipe.cutmix,
        label_smoothing=recipe.label_smoothing,
        num_classes=n_classes,
    )


def make_loss(recipe: Recipe, weight: torch.Tensor | None) -> nn.Module:
    """The training loss: cross-entropy, class-weighted when `weight` is given (balance = "weights").

    Without mixup: hard labels, the recipe's label smoothing. With mixup / cutmix the targets are
    soft (B, K) rows and already smoothed: timm's `SoftTargetCrossEntropy`, or with class weights
    torch's cross-entropy on probability targets, mean over images of -sum_k w_k t_k log p_k (the
    same loss with every w_k = 1; a mixed image counts each class's weight by its share).
    """
    if recipe.mixup <= 0 and recipe.cutmix <= 0:
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.label_smoothing)
    if weight is not None:
        return nn.CrossEntropyLoss(weight=weight)
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy()


def make_ema(model: nn.Module, recipe: Recipe) -> ModelEmaV3 | None:
    """timm's `ModelEmaV3` of `model` (parameters and buffers) for `recipe.ema` > 0, else None.

    Updated after every optimizer step with the step count, as timm's train.py does: the first
    update copies the weights (decay 0 at step 1), every later one is ema = d * ema + (1 - d) * w
    with d = recipe.ema exactly (no warmup ramp: the recipe's number is the decay). The average
    remembers about 1 / (1 - d) steps: 0.99 suits a fine-tune of a few hundred steps, timm's
    0.9998 one of hundreds of thousands.
    """
    if recipe.ema <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=recipe.ema)
