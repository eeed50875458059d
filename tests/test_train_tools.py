"""Issue 20's training tools against their references: augmentation policies (timm, torchvision),
random erasing, mixup / cutmix (timm's `Mixup` and `SoftTargetCrossEntropy`), the weight average
(timm's `ModelEmaV3`, checked by hand), gradient accumulation (the gradient of one large batch),
and every key end to end from the command line, recorded in config.json, resumed exactly."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from typer.testing import CliRunner

import finetune.train.loop as loop
from finetune.app.pipeline import run
from finetune.cli import app
from finetune.data.transforms import EvalTransform, Preprocessing, TrainTransform
from finetune.method import RunOptions
from finetune.recipes import load_recipe
from finetune.train.loop import fit, mix, seeded_rngs, train_step
from finetune.train.setup import make_loss, steps_per_epoch
from finetune.train.signals import Interrupted
from tests.conftest import class_image
from tests.test_train import TINY, finetune_with, make_trainer, stop_at, tiny_run_args

runner = CliRunner()
PRE = Preprocessing(input_size=32, crop_pct=0.875)
POLICY_NAMES = ("light", "randaugment", "trivialaugment")


def photo(k: int = 0, i: int = 0, size: int = 48) -> Image.Image:
    return Image.fromarray(class_image(k, i, size))


# --------------------------------------------------------------------------- augmentation


def test_each_augment_policy_changes_pixels_is_seeded_and_differs_between_policies():
    im = photo()
    plain = EvalTransform(PRE)(im)
    assert torch.equal(TrainTransform(PRE, "none")(im), plain)  # "none" is the eval transform

    outs = {}
    for name in POLICY_NAMES:
        t = TrainTransform(PRE, name)
        runs = []
        for noise in (1, 2):  # whatever the global generators hold, the sample's seed decides
            random.seed(noise)
            np.random.seed(noise)
            torch.manual_seed(noise)
            runs.append([_seeded(t, im, s) for s in range(6)])
        assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True)), name
        assert all(not torch.equal(x, plain) for x in runs[0]), name
        outs[name] = torch.stack(runs[0])  # (6, 3, 32, 32)
    for a, b in (("light", "randaugment"), ("light", "trivialaugment"), ("randaugment", "trivialaugment")):
        differ = [not torch.equal(x, y) for x, y in zip(outs[a], outs[b], strict=True)]
        assert sum(differ) >= 3, (a, b)  # the same crop + flip, then each policy's own ops

    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    _seeded(TrainTransform(PRE, "randaugment"), im, 3)
    assert (random.random(), np.random.rand()) == expected  # the global generators are given back


def test_randaugment_at_its_largest_magnitude_runs_every_op_on_current_pillow():
    """timm's magnitude 10 makes its increasing posterize keep 0 bits, which Pillow >= 10 refuses:
    one training image in a few hundred crashed a randaugment run before the magnitude was capped."""
    t = TrainTransform(PRE, "randaugment")
    ops = t.policy.ops
    assert any(op.name == "PosterizeIncreasing" for op in ops)
    for op in ops:  # every op applied, at a magnitude drawn far above the cap
        op.prob, op.magnitude, op.magnitude_std = 1.0, 30.0, 0.0
    im = photo(size=32)
    for op in ops:
        assert op(im).size == im.size, op.name


def _seeded(t: TrainTransform, im: Image.Image, seed: int) -> torch.Tensor:
    with seeded_rngs(seed):
        return t(im)


def test_random_erasing_1_replaces_one_box_of_the_normalized_image():
    im = photo(1, 2)
    plain = EvalTransform(PRE)(im)  # (3, 32, 32)
    erase = TrainTransform(PRE, "none", random_erasing=1.0)
    for seed in range(5):
        out = _seeded(erase, im, seed)
        changed = (out != plain).any(0)  # (32, 32)
        rows, cols = np.nonzero(changed.numpy())
        box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and int(changed.sum()) == box.numel()  # one filled rectangle, nothing else
        assert 0.01 <= box.numel() / changed.numel() <= 0.4  # timm's 2% .. 1/3 of the area
        inside = out[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert abs(float(inside.mean())) < 0.5 and 0.6 < float(inside.std()) < 1.4  # N(0, 1) noise
    assert torch.equal(_seeded(TrainTransform(PRE, "none", random_erasing=0.0), im, 0), plain)


# --------------------------------------------------------------------------- mixup / cutmix


def _timm_reference(tr, x, y, step: int, batch: int):
    """What timm's own Mixup gives for the loop's seed of (step, batch of the step)."""
    r = tr.recipe
    ref = Mixup(mixup_alpha=r.mixup, cutmix_alpha=r.cutmix, label_smoothing=r.label_smoothing, num_classes=3)
    seed = np.random.SeedSequence([r.seed, step, batch, 0]).generate_state(1)[0]
    np.random.seed(int(seed))
    return ref(x, y)


def test_mixup_gives_timms_soft_targets_per_batch_and_leaves_an_odd_batch_unmixed(make_folder, tmp_path):
    data = make_folder({"a": 5, "b": 5, "c": 5})
    tr = make_trainer(data, tmp_path, "partial-finetune", *TINY, "mixup=0.8", "cutmix=1.0")
    assert isinstance(tr.loss_fn, SoftTargetCrossEntropy)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=gen)  # two loader batches of 4, as one step gets them
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    tr.progress.step = 5
    mixed = x.clone()
    target = mix(tr, mixed, y)  # (8, 3)

    assert target.shape == (8, 3)
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    assert float(target.max()) < 1.0  # soft: never one-hot (smoothing 0.1 and the mix)
    for b in (0, 1):
        part = slice(4 * b, 4 * b + 4)
        ref_x, ref_t = _timm_reference(tr, x[part].clone(), y[part], step=5, batch=b)
        assert torch.equal(mixed[part], ref_x) and torch.equal(target[part], ref_t)
    assert not torch.equal(mixed, x)

    again = x.clone()
    assert torch.equal(mix(tr, again, y), target) and torch.equal(again, mixed)  # the step's seed decides
    tr.progress.step = 6
    assert not torch.equal(mix(tr, x.clone(), y), target)  # another step, another draw

    odd_x = x[:3].clone()
    odd = mix(tr, odd_x, y[:3])  # an odd batch: not mixed, smoothed one-hot targets
    eps = tr.recipe.label_smoothing
    hand = torch.full((3, 3), eps / 3)
    hand[torch.arange(3), y[:3]] = 1 - eps + eps / 3
    assert torch.equal(odd_x, x[:3])
    torch.testing.assert_close(odd, hand)


def test_a_mixup_step_trains_on_soft_cross_entropy_and_counts_hard_label_accuracy(make_folder, tmp_path):
    data = make_folder({"a": 5, "b": 5, "c": 5})
    tr = make_trainer(data, tmp_path, "partial-finetune", *TINY, "mixup=0.4", 'init_head="random"')
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    ref_x, ref_t = _timm_reference(tr, x.clone(), y, step=0, batch=0)
    loop.set_train_mode(tr.model, tr.frozen_norms)
    reference = copy.deepcopy(tr.model)  # the weights and modes the step starts from
    with torch.no_grad():
        logits = reference(ref_x)  # (4, 3)

    total, correct, n = train_step(tr, x, y)

    by_hand = -(ref_t * torch.log_softmax(logits, 1)).sum(1).mean()  # soft-target cross-entropy
    assert n == 4 and correct == int((logits.argmax(1) == y).sum())
    assert total / n == pytest.approx(float(by_hand), rel=1e-5)


def test_class_weights_with_mixup_weigh_each_class_by_its_share_of_a_soft_target():
    recipe = load_recipe("partial-finetune", overrides=["mixup=0.4", "balance=weights"])
    w = torch.tensor([0.5, 1.0, 3.0])
    weighted, plain = make_loss(recipe, w), make_loss(recipe, None)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 3, generator=gen)
    target = torch.softmax(torch.randn(6, 3, generator=gen), 1)  # (6, 3) rows of 1
    logp = torch.log_softmax(logits, 1)
    torch.testing.assert_close(weighted(logits, target), -(w * target * logp).sum(1).mean())
    torch.testing.assert_close(plain(logits, target), -(target * logp).sum(1).mean())
    torch.testing.assert_close(make_loss(recipe, torch.ones(3))(logits, target), plain(logits, target))


# --------------------------------------------------------------------------- EMA


def test_ema_copies_the_first_step_then_follows_its_decay(make_folder, tmp_path):
    data = make_folder({"a": 5, "b": 5})
    tr = make_trainer(data, tmp_path, "full-finetune", *TINY, "ema=0.9", 'init_head="random"', "lr=0.1")
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 0, 1])
    loop.set_train_mode(tr.model, tr.frozen_norms)
    train_step(tr, x.clone(), y)
    w1 = {k: v.clone() for k, v in tr.model.state_dict().items()}
    ema = tr.ema.module.state_dict()
    assert all(torch.equal(ema[k], w1[k]) for k in w1)  # step 1: decay 0, the average is the weights
    train_step(tr, x.clone(), y)
    w2 = tr.model.state_dict()
    ema = tr.ema.module.state_dict()
    moved = 0
    for k, v in w2.items():
        if v.is_floating_point():
            torch.testing.assert_close(ema[k], 0.9 * w1[k] + 0.1 * v, rtol=0, atol=1e-6)
            moved += int(not torch.equal(ema[k], v))
        else:
            assert torch.equal(ema[k], v)  # counters are copied
    assert moved > 10  # the average differs from the raw weights


@pytest.mark.parametrize("better", ["ema", "raw"])
def test_the_better_of_raw_and_ema_weights_is_kept(make_folder, tmp_path, monkeypatch, better):
    data = make_folder({"a": 5, "b": 5})
    tr = make_trainer(data, tmp_path, "partial-finetune", *TINY, "epochs=1", "ema=0.5", 'init_head="random"')

    def validate(t, model=None):
        is_ema = model is t.ema.module
        return (0.9, 0.1) if is_ema == (better == "ema") else (0.5, 0.2)

    monkeypatch.setattr(loop, "validate", validate)
    fit(tr)
    row = tr.progress.history[0]
    assert tr.progress.best_kind == better and tr.progress.best == [0.9, -0.1]
    assert {"ema_val_loss", "ema_val_accuracy"} <= set(row)
    ema = tr.ema.module.state_dict()  # unchanged since the epoch ended
    assert any(not torch.equal(tr.best_weights[k], ema[k]) for k in ema) == (better == "raw")
    saved = tr.model.state_dict()  # fit ends with the best weights in the model
    assert all(torch.equal(saved[k], tr.best_weights[k]) for k in saved)


# --------------------------------------------------------------------------- accumulation


def test_two_accumulated_batches_of_4_give_the_gradient_of_one_batch_of_8(make_folder, tmp_path):
    """One epoch of 8 training images is one optimizer step either way; BatchNorm keeps its running
    statistics (bn_policy frozen), so the batch split cannot change the forward."""
    data = make_folder({"a": 5, "b": 5})  # 8 training images
    common = ("image_size=32", "middle_stages=1", "epochs=1", "augment=none", "grad_clip=0", "lr=0.05")
    common += ('init_head="random"', "bn_policy=frozen")
    (tmp_path / "big").mkdir()
    big = make_trainer(data, tmp_path / "big", "full-finetune", *common, "batch_size=8")
    (tmp_path / "acc").mkdir()
    acc = make_trainer(data, tmp_path / "acc", "full-finetune", *common, "batch_size=4", "accum_steps=2")
    seen = []
    acc.forward = _Recorder(acc.model, seen)
    fit(big)
    fit(acc)

    assert big.progress.step == acc.progress.step == 1 and seen == [4, 4]
    named = dict(acc.model.named_parameters())
    grads = 0
    for name, p in big.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(named[name].grad, p.grad, rtol=0, atol=1e-5, msg=name)
            grads += 1
    assert grads > 10
    # the LR follows the effective batch: 4 x 2 images at the recipe's lr for 4 = 2 x lr
    lrs = [g["initial_lr"] for g in acc.optimizer.param_groups]
    assert lrs == pytest.approx([2 * g["initial_lr"] for g in big.optimizer.param_groups])


class _Recorder(torch.nn.Module):
    def __init__(self, model, sizes: list[int]) -> None:
        super().__init__()
        self.model, self.sizes = model, sizes

    def forward(self, x):
        self.sizes.append(len(x))
        return self.model(x)


def test_accumulation_scales_the_lr_and_the_schedule_with_the_effective_batch(make_folder, tmp_path, caplog):
    caplog.set_level("INFO", logger="finetune")
    data = make_folder({"a": 8, "b": 8, "c": 8})  # 18 training images, batches of 4: 5 per epoch
    tr = make_trainer(data, tmp_path, "partial-finetune", *TINY, "epochs=2", "accum_steps=2", "lr=0.01")
    assert tr.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.02)
    assert "effective batch 8, lr 0.01 x 2 = 0.02" in caplog.text
    assert steps_per_epoch(18, tr.recipe, 1) == 3  # 2 + 2 + 1 batches
    assert steps_per_epoch(18, tr.recipe, 2) == 1  # 9 per rank, a lone last image dropped: 2 batches
    factors = [tr.scheduler.lr_lambdas[0](s) for s in range(7)]  # warmup 1 epoch = 3 steps, then cosine to 0
    assert factors[:3] == [0.25, 0.5, 0.75] and factors[3] == 1.0 and factors[6] == pytest.approx(0.0)


# --------------------------------------------------------------------------- end to end


CASES = {
    "randaugment": ("augment=randaugment", "random_erasing=0.5"),
    "trivialaugment": ("augment=trivialaugment", "mixup=0.4", "cutmix=1.0"),
    "ema-accum-weights": ("ema=0.9", "accum_steps=2", "balance=weights", "cutmix=1.0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_key_runs_from_the_command_line_and_is_recorded(make_folder, tmp_path, case):
    data = make_folder({"a": 6, "b": 6})
    out = tmp_path / "runs"
    res = runner.invoke(app, tiny_run_args(data, out, "partial-finetune", "epochs=1", *CASES[case]))
    assert res.exit_code == 0, res.output
    run_dir = next(out.iterdir())
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    recipe = config["recipe"]
    for key in ("augment", "random_erasing", "mixup", "cutmix", "ema", "accum_steps"):
        assert key in recipe, key
    for kv in CASES[case]:
        key, value = kv.split("=")
        assert str(recipe[key]) == value or recipe[key] == float(value), kv
    assert config["extra"]["weights"] == metrics["train"]["weights"]
    assert metrics["train"]["weights"] in (("ema", "raw") if "ema=0.9" in CASES[case] else ("raw",))
    assert metrics["train"]["effective_batch"] == 4 * recipe["accum_steps"]
    header = (run_dir / "history.csv").read_text().splitlines()[0]
    assert ("ema_val_accuracy" in header) == ("ema=0.9" in CASES[case])


@pytest.mark.parametrize(
    ("kv", "says"),
    [
        ("accum_steps=0", "'accum_steps' must be an integer >= 1"),
        ("augment=heavy", "choose one of none, light, randaugment, trivialaugment"),
        ("mixup=-0.5", "'mixup' must be a number >= 0"),
        ("ema=1", "'ema' must be a number in [0, 1)"),
        ("random_erasing=1.5", "'random_erasing' must be a probability in [0, 1]"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(make_folder, tmp_path, kv, says):
    data = make_folder({"a": 3, "b": 3})
    res = runner.invoke(app, tiny_run_args(data, tmp_path / "runs", "partial-finetune", kv))
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert says in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


def test_interrupted_mid_accumulation_and_resumed_equals_uninterrupted(make_folder, tmp_path, monkeypatch):
    """ema + accum_steps + mixup + RandAugment: a stop between the two batches of a step saves at the
    step's first batch; the resumed run retakes it and ends bit for bit where an unstopped one does."""
    torch.set_num_threads(1)
    data = make_folder({"red": 8, "blue": 8, "green": 8})  # 18 train images, batches of 4: 5 per epoch
    keys = ("epochs=2", "accum_steps=2", "ema=0.8", "mixup=0.4", "augment=randaugment", "random_erasing=0.3")
    common = dict(
        data=data,
        strategy="partial-finetune",
        backbone="test_resnet",
        pretrained=False,
        workers=0,
        overrides=(*TINY, *keys),
    )
    whole = run(RunOptions(**common, out=tmp_path / "a"))

    finetune_with(monkeypatch, stop_at(8))  # epoch 2: after batch 3 of 5, inside its second step
    with pytest.raises(Interrupted):
        run(RunOptions(**common, out=tmp_path / "b"))
    run_dir = next((tmp_path / "b").iterdir())
    meta = json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())
    assert (meta["epoch"], meta["batch"], meta["batches_seen"], meta["step"]) == (1, 2, 7, 4)
    finetune_with(monkeypatch, None)
    resumed = run(RunOptions(data=data, resume=run_dir, workers=0))

    a, b = load_file(str(whole.run_dir / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(run_dir: Path) -> list[list[str]]:  # history.csv without the timing columns
        rows = (run_dir / "history.csv").read_text().splitlines()
        return [r.split(",")[:6] + r.split(",")[8:] for r in rows]

    assert strip(whole.run_dir) == strip(run_dir) and "ema_val_accuracy" in strip(run_dir)[0]
    assert resumed.metrics["train"]["weights"] == whole.metrics["train"]["weights"]
