"""The fine-tuning loop on tiny models: what is frozen stays bit-identical, the loss goes down, an
interrupted and resumed run equals an uninterrupted one bit for bit, and every fault ends cleanly."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import finetune.train.loop
from finetune.app import pipeline
from finetune.app.pipeline import run
from finetune.cli import app
from finetune.data.index import scan
from finetune.errors import TrainingError
from finetune.method import RunContext, RunOptions
from finetune.models.anatomy import build_trunk, feature_dim, stages
from finetune.models.backbone import build
from finetune.models.classifier import Classifier
from finetune.recipes import load_recipe
from finetune.runtime import Dist
from finetune.train.checkpoint import load_checkpoint, save_checkpoint
from finetune.train.loop import _OOM, Progress, fit, predict, prepare, run_finetune
from finetune.train.setup import frozen_norm_layers
from finetune.train.signals import Interrupted
from tests.conftest import seeded_tiny_weights, tree_digest

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
TINY = ("image_size=32", "batch_size=4", "middle_stages=1")  # test_resnet: 5 stages, top 1, middle 1
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_run_args(data, out, strategy: str, *overrides: str) -> list[str]:
    """`finetune run` arguments for the tiny random test_resnet, TINY recipe settings + `overrides`."""
    args = ["run", str(data), "--strategy", strategy, "--backbone", "test_resnet", "--no-pretrained"]
    args += ["--workers", "0", "--out", str(out)]
    return args + [a for kv in (*overrides, *TINY) for a in ("--set", kv)]


def make_trainer(
    data: Path,
    tmp: Path,
    strategy: str,
    *overrides: str,
    backbone: str = "test_resnet",
    workers: int = 0,
    init: bool = True,
    device: str = "cpu",
    dist: Dist | None = None,
):
    """A prepared Training on a real scanned folder and a real (random-init) timm model."""
    recipe = load_recipe(strategy, overrides=list(overrides))
    opts = RunOptions(
        data=data,
        strategy=strategy,
        overrides=overrides,
        backbone=backbone,
        pretrained=False,
        workers=workers,
        device=device,
    )
    torch.manual_seed(recipe.seed)
    bb = build(backbone, pretrained=backbone == "lite0")
    pre = bb.preprocessing.with_size(recipe.image_size) if recipe.image_size else bb.preprocessing
    run_dir = tmp / "run"
    run_dir.mkdir(exist_ok=True)
    ctx = RunContext(scan(data), bb, pre, recipe, run_dir, opts)
    trunk = build_trunk(bb.model, "pool")
    model = Classifier(trunk, nn.Linear(feature_dim(trunk, pre.input_size), len(ctx.index.classes)))
    return prepare(ctx, model, torch.device(device), dist or Dist())


def stop_at(batches: int, signum: int = signal.SIGINT):
    """An on_batch hook that raises a real signal after `batches` training batches of the run."""

    def hook(progress: Progress) -> None:
        if progress.batches_seen == batches:
            signal.raise_signal(signum)

    return hook


def finetune_with(monkeypatch, hook) -> None:
    """`pipeline.run` fine-tunes with `hook` called after every batch (the registry entry, replaced)."""
    monkeypatch.setitem(pipeline.METHODS, "finetune", lambda ctx: run_finetune(ctx, on_batch=hook))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- parameter groups in a real run


def test_partial_finetune_reads_base_tenth_hundredth_and_leaves_the_bottom_bit_identical(
    make_folder, tmp_path
):
    data = make_folder({"red": 6, "blue": 6})
    # bn_policy "eval": the top's BatchNorm statistics train too (the packaged default freezes them all).
    tr = make_trainer(
        data,
        tmp_path,
        "partial-finetune",
        *TINY,
        "epochs=2",
        "lr=0.02",
        "warmup_epochs=0",
        'bn_policy="eval"',
    )
    st = stages(
        tr.model.trunk
    )  # stem, stage1..stage4: bottom = stem+stage1+stage2, middle = stage3, top = stage4
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    assert {k: g["initial_lr"] for k, g in groups.items()} == pytest.approx(
        {"head": 0.02, "top": 0.002, "middle": 0.0002}, rel=1e-12
    )
    named = dict(tr.model.trunk.named_parameters())
    ids = lambda names: {id(named[n]) for n in names}  # noqa: E731
    assert {id(p) for p in groups["top"]["params"]} == ids(st[4].params)
    assert {id(p) for p in groups["middle"]["params"]} == ids(st[3].params)
    bottom = [n for s in st[:3] for n in s.params]
    assert not ids(bottom) & {id(p) for g in groups.values() for p in g["params"]}
    assert all(not named[n].requires_grad for n in bottom)

    # During training: the frozen bottom builds no autograd graph and its BatchNorm is in eval mode.
    seen: dict[str, list] = {"grad": [], "bn_training": [], "top_grad": []}
    tr.model.trunk.layer1.register_forward_hook(lambda m, i, o: seen["grad"].append(o.requires_grad))
    tr.model.trunk.bn1.register_forward_hook(lambda m, i, o: seen["bn_training"].append(m.training))

    def top_hook(module, inputs, output) -> None:
        if torch.is_grad_enabled():  # training forwards, not validation
            seen["top_grad"].append(output.requires_grad)

    tr.model.trunk.layer4.register_forward_hook(top_hook)
    before = snapshot(tr.model)
    fit(tr)
    after = tr.model.state_dict()
    assert seen["grad"] and not any(seen["grad"]) and seen["top_grad"] and all(seen["top_grad"])
    assert not any(seen["bn_training"])
    prefixes = ("conv1.", "bn1.", "layer1.", "layer2.")  # bottom stages: weights AND BatchNorm statistics
    frozen_keys = [k for k in before if k.startswith(tuple("trunk." + p for p in prefixes))]
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)
    moved = [k for k in before if k.startswith(("trunk.layer4.", "head.")) and "num_batches" not in k]
    assert all(not torch.equal(before[k], after[k]) for k in moved)


def test_full_finetune_changes_every_parameter(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6})
    # lr 0.5: the bottom's x0.001 step (5e-4) is large enough to show in float32 after 2 epochs
    tr = make_trainer(
        data,
        tmp_path,
        "full-finetune",
        *TINY,
        "epochs=2",
        "warmup_epochs=0",
        "lr=0.5",
        "grad_clip=0",
        'init_head="random"',
    )
    before = snapshot(tr.model)
    assert len(tr.optimizer.param_groups) == 4 and not frozen_norm_layers(tr.model.trunk)
    fit(tr)
    unchanged = [n for n, p in tr.model.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged and len(before) > 40


def test_bn_policy_frozen_keeps_every_running_statistic_while_affine_weights_learn(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6})
    tr = make_trainer(
        data,
        tmp_path,
        "full-finetune",
        *TINY,
        "epochs=1",
        "warmup_epochs=0",
        "lr=0.5",
        'bn_policy="frozen"',
        'init_head="random"',
    )
    modes: list[bool] = []
    for m in tr.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, i, o: modes.append(mod.training))
    before = snapshot(tr.model)
    fit(tr)
    after = tr.model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    affine = [k for k in before if k.startswith("trunk.layer4") and k.endswith("bn1.weight")]
    assert modes and not any(modes)
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert affine and all(not torch.equal(before[k], after[k]) for k in affine)


def test_training_lowers_the_training_loss(make_folder, tmp_path):
    """Real packaged lite0 at 64 px, no warmup, 2 epochs: the mean cross-entropy on the training images
    (computed here from the softmax) goes down."""
    data = make_folder({"red": 8, "blue": 8, "green": 8})
    tr = make_trainer(
        data,
        tmp_path,
        "full-finetune",
        "image_size=64",
        "epochs=2",
        "warmup_epochs=0",
        "batch_size=6",
        "lr=0.05",
        'init_head="random"',
        "augment=false",
        "label_smoothing=0.0",
        backbone="lite0",
    )
    train = tr.ctx.positions("train")

    def loss() -> float:
        _, y, p = predict(tr, train, 16)
        return float(-np.log(p[np.arange(len(y)), y]).mean())

    start = loss()
    fit(tr)
    assert loss() < 0.8 * start  # 1.63 -> 1.18 measured: a real drop, not noise


def test_early_stopping_keeps_the_best_epoch(make_folder, tmp_path, caplog, monkeypatch):
    """Scripted validation accuracies 0.5, 0.75, 0.75 (worse loss), 0.6 with patience 2: stop after
    epoch 4 of 10, and the model is epoch 2's."""
    data = make_folder({"red": 6, "blue": 6})
    caplog.set_level("INFO", logger="finetune")
    tr = make_trainer(data, tmp_path, "partial-finetune", *TINY, "epochs=10", "patience=2")
    script = iter([(0.5, 1.0), (0.75, 0.8), (0.75, 0.9), (0.6, 1.0)])
    kept = {}

    def validate(t):
        acc, loss = next(script)
        if t.progress.epoch == 1:
            kept.update(snapshot(t.model))
        return acc, loss

    monkeypatch.setattr(finetune.train.loop, "validate", validate)
    fit(tr)
    assert tr.progress.epoch == 4 and tr.progress.best_epoch == 2 and tr.progress.stopped_early
    assert "early stop" in caplog.text
    final = tr.model.state_dict()
    assert all(torch.equal(kept[k], final[k]) for k in kept)
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("epoch,train_loss")


# --------------------------------------------------------------------------- exact resume


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def test_interrupted_and_resumed_twice_equals_uninterrupted_bit_for_bit(make_folder, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    data = make_folder({"red": 8, "blue": 8, "green": 8})  # 18 train images, batches of 4: 5 per epoch
    common = dict(
        data=data,
        strategy="partial-finetune",
        backbone="test_resnet",
        pretrained=False,
        workers=0,
        overrides=(*TINY, "epochs=3"),
    )
    whole = run(RunOptions(**common, out=tmp_path / "a"))

    finetune_with(monkeypatch, stop_at(5))  # after the last batch of epoch 1, before its validation
    with pytest.raises(Interrupted) as err:
        run(RunOptions(**common, out=tmp_path / "b"))
    assert err.value.exit_code == 130 and "--resume" in str(err.value)
    run_dir = next((tmp_path / "b").iterdir())
    meta = json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())
    assert (meta["epoch"], meta["batch"], meta["world"], meta["history"]) == (0, 5, 1, [])  # not validated
    finetune_with(monkeypatch, stop_at(8, signal.SIGTERM))  # mid-epoch 2, after 3 of its 5 batches
    with pytest.raises(Interrupted) as err:
        run(RunOptions(data=data, resume=run_dir, workers=0))
    assert err.value.exit_code == 143
    finetune_with(monkeypatch, None)
    resumed = run(RunOptions(data=data, resume=run_dir, workers=0))

    assert resumed.run_dir == run_dir
    a, b = _weights(whole.run_dir), _weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [r.split(",")[:6] for r in (p / "history.csv").read_text().splitlines()]  # noqa: E731
    assert strip(whole.run_dir) == strip(run_dir) and len(strip(run_dir)) == 4


def test_a_resumed_run_continues_its_tensorboard_curves(make_folder, tmp_path, monkeypatch):
    """Stopped after step 8 (SIGTERM: the checkpoint holds 8 steps), resumed: TensorBoard reads one
    point per step 1..15 from the two event files (the resumed writer purges from step 9 on)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_folder({"red": 8, "blue": 8, "green": 8})  # 18 train images, batches of 4: 5 per epoch
    opts = dict(strategy="partial-finetune", backbone="test_resnet", pretrained=False, workers=0)
    finetune_with(monkeypatch, stop_at(8, signal.SIGTERM))
    with pytest.raises(Interrupted):
        run(
            RunOptions(
                data=data, **opts, overrides=(*TINY, "epochs=3"), out=tmp_path / "r", log=("tensorboard",)
            )
        )
    run_dir = next((tmp_path / "r").iterdir())
    finetune_with(monkeypatch, None)
    run(RunOptions(data=data, resume=run_dir, workers=0))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("step/loss")] == list(range(1, 16))
    assert [e.step for e in acc.Scalars("epoch/val_accuracy")] == [1, 2, 3]


def test_resume_mistakes_are_one_line(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6})
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["run", str(data), "--resume", str(empty)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "no checkpoint" in res.output

    out = tmp_path / "runs"
    done = runner.invoke(app, tiny_run_args(data, out, "partial-finetune", "epochs=1"))
    assert done.exit_code == 0, done.output
    run_dir = next(out.iterdir())
    for f in ("history.csv", "curves.png", "model.safetensors"):
        assert (run_dir / f).is_file(), f
    assert not (run_dir / "checkpoint").exists()  # a finished fine-tune drops it
    res = runner.invoke(app, ["run", str(data), "--resume", str(run_dir)])
    assert (
        res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "already finished" in res.output
    )


def test_keep_checkpoints_keeps_the_finished_checkpoint(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6})
    out = tmp_path / "runs"
    args = tiny_run_args(data, out, "partial-finetune", "epochs=1", 'init_head="random"')
    done = runner.invoke(app, [*args, "--keep-checkpoints"])
    assert done.exit_code == 0, done.output
    run_dir = next(out.iterdir())
    meta, tensors, best = load_checkpoint(run_dir / "checkpoint")
    assert meta["finished"] and best is not None
    saved = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.equal(saved[k], best[k]) for k in saved)  # the model is the checkpoint's best
    res = runner.invoke(app, ["run", str(data), "--resume", str(run_dir)])
    assert res.exit_code == 2 and "already finished" in res.output


class _Killed(BaseException):
    """What SIGKILL looks like to the code after it: nothing more runs (not an Exception: no cleanup)."""


def test_a_run_killed_before_its_folder_was_written_is_resumed_into_it(make_folder, tmp_path, monkeypatch):
    """Killed after the last epoch's checkpoint, while writing model.safetensors: `--resume` writes the
    folder from the checkpoint, with the model an uninterrupted run saves, and `runs` said so before."""
    import finetune.app.runfolder as runfolder

    data = make_folder({"red": 6, "blue": 6})
    common = dict(
        data=data,
        strategy="partial-finetune",
        backbone="test_resnet",
        pretrained=False,
        workers=0,
        overrides=(*TINY, "epochs=2"),
    )
    whole = run(RunOptions(**common, out=tmp_path / "a"))
    real = runfolder.save_run

    def killed(run_dir, tensors, config):
        (run_dir / "model.safetensors").write_bytes(b"half a file")  # the kill came mid-write
        raise _Killed

    monkeypatch.setattr(runfolder, "save_run", killed)
    with pytest.raises(_Killed):
        run(RunOptions(**common, out=tmp_path / "b runs"))
    monkeypatch.setattr(runfolder, "save_run", real)
    run_dir = next((tmp_path / "b runs").iterdir())
    assert not (run_dir / "config.json").exists() and (run_dir / "checkpoint" / "checkpoint.json").is_file()

    listed = runner.invoke(app, ["runs", "--runs", str(tmp_path / "b runs")])
    assert listed.exit_code == 0 and "interrupted" in listed.output, listed.output
    assert f"--resume '{run_dir}'" in listed.output  # shell-quoted: the folder name has a space

    resumed = run(RunOptions(data=data, resume=run_dir, workers=0))
    assert resumed.run_dir == run_dir and (run_dir / "config.json").is_file()
    a, b = _weights(whole.run_dir), _weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["val"]["accuracy"] == whole.metrics["val"]["accuracy"]
    assert not (run_dir / "checkpoint").exists()


def test_runs_lists_an_interrupted_finetune_with_its_resume_command(make_folder, tmp_path, monkeypatch):
    data = make_folder({"red": 6, "blue": 6}, name="my data")
    out = tmp_path / "runs"
    finetune_with(monkeypatch, stop_at(2))
    with pytest.raises(Interrupted) as err:
        run(
            RunOptions(
                data=data,
                strategy="partial-finetune",
                backbone="test_resnet",
                pretrained=False,
                workers=0,
                overrides=(*TINY, "epochs=3", 'init_head="random"'),
                out=out,
            )
        )
    run_dir = next(out.iterdir())
    command = f"finetune run '{data}' --resume {run_dir}"
    assert command in str(err.value)
    rows = json.loads(runner.invoke(app, ["runs", "--runs", str(out), "--json"]).output)
    assert [(r["status"], r["resume"]) for r in rows] == [("interrupted", command)]
    text = runner.invoke(app, ["runs", "--runs", str(out)]).output
    assert "interrupted at epoch 1/3, batch 2" in text and command in text


def test_a_finetuned_run_is_used_by_predict_like_a_probe(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6})
    res = run(
        RunOptions(
            data=data,
            strategy="partial-finetune",
            backbone="test_resnet",
            pretrained=False,
            workers=0,
            overrides=(*TINY, "epochs=1"),
            out=tmp_path / "runs",
        ),
    )
    saved = {p["path"]: p for p in json.loads((res.run_dir / "predictions.json").read_text())}
    out = runner.invoke(app, ["predict", str(data), "--run", str(res.run_dir), "--json"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.splitlines()]  # one JSON object per image
    assert all(0 <= r["score"] <= 1 for r in rows)  # softmax probabilities
    checked = 0
    for r in rows:
        rel = Path(r["path"]).relative_to(data).as_posix()
        if rel in saved:
            assert r["top"][0]["label"] == saved[rel]["pred"]
            assert r["top"][0]["score"] == pytest.approx(saved[rel]["score"], abs=1e-5)
            checked += 1
    assert checked == len(saved) > 0


# --------------------------------------------------------------------------- signals, kills, full disks


def test_sigterm_saves_a_checkpoint_and_exits_143(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6})
    out = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "finetune",
        *tiny_run_args(data, out, "partial-finetune", "epochs=100000", 'init_head="random"'),
    ]
    env = {**os.environ, "FINETUNE_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while (
        not list(out.glob("*/checkpoint/checkpoint.json"))
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: SIGTERM") and "--resume" in last, err
    meta, tensors, _ = load_checkpoint(next(out.iterdir()) / "checkpoint")
    assert meta["epoch"] >= 1 and any(k.startswith("model.") for k in tensors)


def test_sigterm_to_the_whole_job_with_decode_workers_saves_a_checkpoint(make_folder, tmp_path):
    """Slurm and torchrun's agent signal every process of a job, decode workers included: the
    workers must not die first (that was reported as a decode worker crash naming innocent files)."""
    data = make_folder({"red": 6, "blue": 6})
    out = tmp_path / "runs"
    args = tiny_run_args(data, out, "partial-finetune", "epochs=100000", 'init_head="random"')
    args[args.index("--workers") + 1] = "2"
    env = {**os.environ, "FINETUNE_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while (
        not list(out.glob("*/checkpoint/checkpoint.json"))
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    time.sleep(1.0)  # well into the next epoch, its workers running
    os.killpg(proc.pid, signal.SIGTERM)  # the job's every process, as a scheduler does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: SIGTERM") and "--resume" in last and "crashed" not in err, err


class _Mask(torch.utils.data.Dataset):
    """Each item: the signals blocked in the process that reads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> list[int]:
        return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_decode_workers_are_born_with_sigint_and_sigterm_blocked_and_the_main_mask_is_given_back():
    """A signal to the whole job cannot kill a worker before it ignores signals (the race that made
    the SIGTERM test above end in "decode worker crashed" now and then)."""
    from torch.utils.data import DataLoader

    from finetune.train.loop import _workers_born_deaf

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with _workers_born_deaf():
        assert {signal.SIGINT, signal.SIGTERM} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
        it = iter(DataLoader(_Mask(), batch_size=None, num_workers=1))
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    in_worker = set(next(it))
    del it
    assert {int(signal.SIGINT), int(signal.SIGTERM)} <= in_worker


_KILL_SCRIPT = """
import os, sys, time, torch
from pathlib import Path
from finetune.train.checkpoint import save_checkpoint
folder, hang_at = Path(sys.argv[1]), int(sys.argv[2])
first = {"saves": 1, "epoch": 1, "batch": 0}
save_checkpoint(folder, first, {"w": torch.full((4096,), 1.0)}, {"b": torch.ones(3)})
real, calls = os.fsync, [0]
def hang(fd):
    calls[0] += 1
    if calls[0] == hang_at:
        (folder.parent / "hanging").write_text("now")
        time.sleep(120)
    real(fd)
os.fsync = hang
second = {"saves": 2, "epoch": 2, "batch": 0}
save_checkpoint(folder, second, {"w": torch.full((4096,), 2.0)}, {"b": torch.zeros(3)})
"""


@pytest.mark.parametrize(
    ("hang_at", "epoch"),
    # fsync order: state temp file, its folder; best temp file, its folder; checkpoint.json, its folder.
    [(1, 1), (2, 1), (3, 1), (5, 1), (6, 2)],
)
def test_sigkill_during_a_save_leaves_a_loadable_checkpoint(tmp_path, hang_at, epoch):
    folder = tmp_path / "run" / "checkpoint"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(folder), str(hang_at)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / "hanging").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the save finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    meta, tensors, best = load_checkpoint(folder)
    assert meta["epoch"] == epoch
    assert torch.equal(tensors["w"], torch.full((4096,), float(epoch)))
    assert torch.equal(best["b"], torch.ones(3) if epoch == 1 else torch.zeros(3))
    # The next save clears what the killed one left behind.
    save_checkpoint(folder, {"saves": 3, "epoch": 3, "batch": 0}, {"w": torch.zeros(2)})
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "state-000003.safetensors"]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(make_folder, tmp_path, monkeypatch):
    data = make_folder({"red": 6, "blue": 6})
    out = tmp_path / "runs"
    real_save, real_fsync, calls = save_checkpoint, os.fsync, []

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(folder, meta, tensors, best=None):
        calls.append(meta["epoch"])
        if len(calls) == 2:  # the disk fills up after epoch 1's checkpoint
            monkeypatch.setattr(os, "fsync", no_space)
        return real_save(folder, meta, tensors, best)

    monkeypatch.setattr(finetune.train.loop, "save_checkpoint", save)
    res = runner.invoke(
        app,
        tiny_run_args(data, out, "partial-finetune", "epochs=3", 'init_head="random"'),
    )
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert "error: cannot write the checkpoint" in last and "disk is full" in last
    assert "epoch 1, batch 0" in last and "--resume" in last
    folder = next(out.iterdir()) / "checkpoint"
    meta, _, _ = load_checkpoint(folder)
    assert meta["epoch"] == 1
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- training faults


def test_a_diverging_loss_stops_with_the_learning_rate_named(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6})
    res = runner.invoke(
        app,
        tiny_run_args(
            data,
            tmp_path / "runs",
            "full-finetune",
            "lr=10",  # the largest base LR a recipe takes (recipes.MAX_LR); 1e30 is refused up front
            "grad_clip=0",
            "warmup_epochs=0",
            'init_head="random"',
        ),
    )
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    diverged = ("error: the training loss became", "error: training diverged")
    assert last.startswith(diverged) and "lr = 10" in last and "--set lr=" in last


class _SmallMemory(nn.Module):
    """Pretends the GPU holds at most `limit` images per forward."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x):
        if len(x) > self.limit:
            raise _OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.sizes.append(len(x))
        return self.model(x)


def test_out_of_memory_retries_with_half_batches_and_says_so(make_folder, tmp_path, caplog):
    data = make_folder({"red": 5, "blue": 5})  # 8 training images, batch 4: 2 steps per epoch
    caplog.set_level("INFO", logger="finetune")
    tr = make_trainer(data, tmp_path, "partial-finetune", *TINY, "epochs=1", 'init_head="random"')
    tr.forward = _SmallMemory(tr.model, limit=2)
    fit(tr)
    assert tr.progress.micro == 2 and tr.progress.step == 2 and tr.forward.sizes == [2, 2, 2, 2]
    assert "out of GPU memory: retrying with batches of 2 images" in caplog.text

    (tmp_path / "x").mkdir()
    tr2 = make_trainer(data, tmp_path / "x", "partial-finetune", *TINY, "epochs=1", 'init_head="random"')
    tr2.forward = _SmallMemory(tr2.model, limit=0)
    with pytest.raises(TrainingError, match="batch of 1 image"):
        fit(tr2)


def test_a_crashed_decode_worker_is_reported_with_its_file(make_folder, tmp_path, monkeypatch):
    import finetune.data.decode as D

    data = make_folder({"red": 6, "blue": 6})
    tr = make_trainer(data, tmp_path, "partial-finetune", *TINY, "epochs=1", 'init_head="random"', workers=2)
    victim = tr.ctx.index.paths[tr.train_pos[3]]
    real = D.read_header  # the first step of every decoder

    def crashing(path):
        if str(path).endswith(victim):
            os._exit(1)  # what a segfaulting decoder looks like from the outside
        return real(path)

    monkeypatch.setattr(D, "read_header", crashing)
    with pytest.raises(TrainingError, match="decode worker crashed") as err:
        fit(tr)
    assert victim in str(err.value)


# --------------------------------------------------------------------------- GPU paths


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_amp_channels_last_trains_and_resumes(make_folder, tmp_path, compile_):
    data = make_folder({"red": 8, "blue": 8})
    tr = make_trainer(data, tmp_path, "full-finetune", *TINY, "epochs=2", device="cuda")
    if compile_:
        tr.forward = torch.compile(tr.model)
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert tr.amp_dtype == expected and (tr.scaler is not None) == (expected == torch.float16)
    conv = tr.model.trunk.conv1.weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    before = snapshot(tr.model)
    fit(tr)
    assert all(np.isfinite(r["train_loss"]) for r in tr.progress.history)
    assert any(not torch.equal(before[k].cuda(), v) for k, v in tr.model.state_dict().items())
    meta, tensors, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert "rng.cuda.0" in tensors and meta["epoch"] == 2


def test_ctrl_c_during_feature_extraction_is_one_line_and_exit_130(make_folder, tmp_path, monkeypatch):
    """A real SIGINT (Python's own handler: KeyboardInterrupt) while the LP-FT head's features are
    extracted, before the training loop handles signals itself."""
    import finetune.features.extract as extract

    data = make_folder({"red": 6, "blue": 6})
    real = extract._run_engine

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "_run_engine", interrupted)
    # Python's own handler, whatever the session started with: a background job of a shell starts
    # with SIGINT ignored, and then Python installs none (this test failed under `.ci/run` so)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    try:
        res = runner.invoke(app, tiny_run_args(data, tmp_path / "runs", "partial-finetune", "epochs=1"))
    finally:
        signal.signal(signal.SIGINT, old)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    assert calls, "the LP-FT head's features were not extracted (read from a cache?)"
    assert res.exit_code == 130, res.output
    lines = res.output.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("error: interrupted"), res.output


def test_sigterm_does_not_offer_a_second_ctrl_c(make_folder, tmp_path, monkeypatch, caplog):
    data = make_folder({"red": 6, "blue": 6})
    caplog.set_level("INFO", logger="finetune")
    finetune_with(monkeypatch, stop_at(1, signal.SIGTERM))
    res = runner.invoke(app, tiny_run_args(data, tmp_path / "runs", "partial-finetune", 'init_head="random"'))
    assert res.exit_code == 143, res.output
    assert "SIGTERM: stopping after this batch and saving a checkpoint" in caplog.text
    assert "Ctrl-C" not in caplog.text and "Ctrl-C" not in res.output


def test_a_signal_during_validation_stops_before_the_next_batch(make_folder, tmp_path, monkeypatch):
    """SIGINT arrives while epoch 1 validates: the epoch's checkpoint is written and no batch of
    epoch 2 runs (the message promised "after this batch")."""
    from finetune.train.setup import batches_per_epoch

    data = make_folder({"red": 6, "blue": 6})
    tr = make_trainer(data, tmp_path, "partial-finetune", *TINY, "epochs=3", 'init_head="random"')
    one_epoch = batches_per_epoch(len(tr.train_pos), 4, 1)
    real = finetune.train.loop.validate

    def validate(t):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while validating
        return real(t)

    monkeypatch.setattr(finetune.train.loop, "validate", validate)
    with pytest.raises(Interrupted) as err:
        fit(tr)
    assert err.value.exit_code == 130 and "epoch 2, batch 0" in str(err.value)
    assert tr.progress.batches_seen == one_epoch and tr.progress.epoch == 1
    meta, _, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert (meta["epoch"], meta["batch"], len(meta["history"])) == (1, 0, 1)


def test_a_nan_validation_loss_stops_naming_the_lr_and_is_never_the_best(make_folder, tmp_path, monkeypatch):
    data = make_folder({"red": 6, "blue": 6})
    tr = make_trainer(data, tmp_path, "partial-finetune", *TINY, "epochs=3", 'init_head="random"')
    script = iter([(0.5, 0.7), (0.9, float("nan"))])  # epoch 2's model is broken, its accuracy looks better
    kept = {}

    def validate(t):
        if t.progress.epoch == 0:
            kept.update({k: v.clone() for k, v in t.model.state_dict().items()})
        return next(script)

    monkeypatch.setattr(finetune.train.loop, "validate", validate)
    with pytest.raises(TrainingError) as err:
        fit(tr)
    text = str(err.value)
    assert (
        "validation loss became nan after epoch 2" in text
        and "lr = 0.01" in text
        and "--set lr=0.001" in text
    )
    meta, _, best = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert meta["best_epoch"] == 1 and meta["epoch"] == 1
    assert all(torch.equal(best[k], kept[k]) for k in kept)


def test_a_loss_that_rises_far_above_its_start_stops_naming_the_lr(make_folder, tmp_path):
    """lr 10 (the largest a recipe takes) without clipping sends a finite loss far above its start:
    stopped as divergence, not a NaN."""
    data = make_folder({"red": 6, "blue": 6})
    res = runner.invoke(
        app,
        tiny_run_args(
            data,
            tmp_path / "runs",
            "full-finetune",
            "lr=10",
            "grad_clip=0",
            "warmup_epochs=0",
            'init_head="random"',
            "epochs=20",
        ),
    )
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: the loss rose from") and "lr = 10" in last, last
    assert "--set lr=1" in last


def test_divergence_is_measured_against_the_start_and_the_loss_of_guessing():
    from finetune.train.loop import diverged

    k = 10  # guessing: ln 10 = 2.30
    assert not diverged(2.3, 2.3 + 4.5, k) and diverged(2.3, 2.3 + 4.7, k)
    assert not diverged(0.05, 4.6, k) and diverged(0.05, 4.7, k)  # a probed head's small start
    assert diverged(3.0, 9.1, k) and not diverged(3.0, 8.9, k)  # a start above guessing: twice it


@pytest.mark.parametrize(
    ("policy", "synced"),
    [("train", 4), ("eval", 1), ("frozen", 0)],  # every BatchNorm trains / those of trained stages / none
)
def test_batchnorm_layers_that_train_become_syncbatchnorm_under_torchrun_on_cuda(policy, synced):
    """The converted model is the one returned and used (convert_sync_batchnorm replaces modules),
    and the layers kept in eval mode are layers of that model. No GPU needed: only modules change."""
    from finetune.recipes import recipe_from_dict
    from finetune.train.setup import batchnorm_policy, freeze

    trunk = nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    top = nn.Sequential(nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = Classifier(nn.Sequential(trunk, top), nn.Linear(4, 2))
    freeze(model, [n for n, _ in model.trunk[0].named_parameters(prefix="0")])  # the bottom is frozen
    recipe = recipe_from_dict({"bn_policy": policy})
    out, eval_norms = batchnorm_policy(model, recipe, torch.device("cuda"), world=2)
    kinds = [type(m) for m in out.trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds.count(nn.SyncBatchNorm) == synced and len(kinds) == 4
    assert all(any(m is n for n in out.trunk.modules()) for m in eval_norms)
    assert len(eval_norms) == 4 - synced
    fresh = Classifier(nn.Sequential(nn.BatchNorm2d(3), nn.Flatten()), nn.Linear(3, 2))
    cpu, _ = batchnorm_policy(fresh, recipe, torch.device("cpu"), world=2)  # gloo: no SyncBatchNorm
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in cpu.modules())


def test_fine_tuning_never_returns_a_model_worse_than_its_linear_probe_start(
    make_folder, tmp_path, monkeypatch
):
    """LP-FT's start is epoch 0 of the best-epoch choice: training that only hurts keeps the probe."""

    def ruin(t, x, y):  # a "step" that wipes the head: every later epoch guesses one class
        with torch.no_grad():
            t.model.head.weight.zero_()
            t.model.head.bias.zero_()
        return float(len(y)) * math.log(2), 0, len(y)

    monkeypatch.setattr(finetune.train.loop, "train_step", ruin)
    data, out = make_folder({"red": 8, "blue": 8}), tmp_path / "runs"
    res = runner.invoke(app, tiny_run_args(data, out, "partial-finetune", "epochs=2"))
    assert res.exit_code == 0, res.output
    run_dir = next(out.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["best_epoch"] == 0 and metrics["val"]["accuracy"] == 1.0
    history = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [float(r["val_accuracy"]) for r in history] == [0.5, 0.5]  # what the wiped head scores
    head = load_file(run_dir / "model.safetensors")
    assert any(float(v.abs().sum()) > 0 for k, v in head.items() if k.startswith("head."))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["extra"]["probe_head"]["temperature"] > 0  # the probe was scaled to the loss


@pytest.mark.parametrize("fine_tune_fails", [True, False])
def test_auto_measures_a_stage_probe_beside_a_full_finetune_and_keeps_the_better(
    make_folder, tmp_path, monkeypatch, fine_tune_fails
):
    """auto's "a lot of data, unlike ImageNet" cell: the fine-tune and a stage-probe on one split."""
    advice = {"strategy": "full-finetune", "reason": "a lot of data, unlike ImageNet (test)"}
    monkeypatch.setattr(pipeline, "resolve_strategy", lambda opts, index: ("full-finetune", advice))
    if fine_tune_fails:  # every step wipes the head and its start is not kept: the fine-tune scores 0.5

        def ruin(t, x, y):
            with torch.no_grad():
                t.model.head.weight.zero_()
                t.model.head.bias.zero_()
            return float(len(y)) * math.log(2), 0, len(y)

        monkeypatch.setattr(finetune.train.loop, "train_step", ruin)
        monkeypatch.setattr(finetune.train.loop, "keep_start", lambda t: None)
    data, out = make_folder({"red": 8, "blue": 8}), tmp_path / "runs"
    before = tree_digest(data)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    weights = [str(a) for a in seeded_tiny_weights(tmp_path, "test_resnet")]  # fingerprinted: cached

    def args(out: Path, strategy: str, *sets: str) -> list[str]:
        a = tiny_run_args(data, out, strategy, *sets)
        i = a.index("--no-pretrained")
        a[i - 2 : i + 1] = weights
        return a if strategy != "stage-probe" else a[: a.index("middle_stages=1") - 1]  # not a probe's

    if fine_tune_fails:  # every stage's features already cached: the rival itself runs no network
        res = runner.invoke(app, args(tmp_path / "earlier", "stage-probe"))
        assert res.exit_code == 0, res.output
        (earlier,) = (tmp_path / "earlier").iterdir()
        assert json.loads((earlier / "config.json").read_text())["extra"]["device"] == "cpu"
    res = runner.invoke(app, args(out, "auto", "epochs=2"))
    assert res.exit_code == 0, res.output
    (run_dir,) = out.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    compared = config["extra"]["auto"]["compared"]
    assert set(compared) == {"full-finetune", "stage-probe"} and compared["stage-probe"] == 1.0
    kept = "stage-probe" if fine_tune_fails else "full-finetune"
    assert config["extra"]["auto"]["kept"] == kept == config["strategy"]
    assert run_dir.name.endswith(f"-{kept}")  # named after the model it holds
    assert metrics["val"]["accuracy"] == max(compared.values())
    assert metrics["headline_label"] == "val (used for selection)"
    assert config["extra"]["device"] == "cpu"  # the run trained there, whichever model it kept
    assert not (run_dir / "checkpoint").exists()
    if fine_tune_fails:
        assert compared["full-finetune"] == 0.5
        assert not (run_dir / "history.csv").exists()  # not this model's curves
        assert (run_dir / "full-finetune-history.csv").exists()
    else:
        assert (run_dir / "history.csv").exists()
    html = (run_dir / "report.html").read_text()
    assert "measured by auto" in html and f"kept {kept}" in html
    one = next((data / "red").iterdir())
    res = runner.invoke(app, ["predict", str(one), "--run", str(run_dir)])
    assert res.exit_code == 0 and "red" in res.output, res.output
    assert tree_digest(data) == before
