"""`finetune run` under torchrun: 2 CPU processes on gloo train the same weights as 1 process.

The reference is one process walking the same global sample order (`DistributedSampler` with
num_replicas=1 and the same seed) with the global batch (2 x 3) and the scaled LR (2 x 0.01):
with a BatchNorm-free model (timm test_convnext: LayerNorm), no augmentation and 18 training
images (divisible by 2 x 3), the averaged DDP gradients are the single-process ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.app.pipeline import run
from finetune.errors import TrainingError
from finetune.method import RunOptions
from tests.conftest import torchrun

ROOT = Path(__file__).resolve().parent.parent
COMMON = ("image_size=32", "epochs=2", "augment=false", 'init_head="random"', "label_smoothing=0.0")


def test_two_gloo_processes_train_the_single_process_weights(make_folder, tmp_path):
    data = make_folder({"red": 8, "blue": 8, "green": 8})  # 18 train, 6 val
    single = run(
        RunOptions(
            data=data,
            strategy="full-finetune",
            backbone="test_convnext",
            pretrained=False,
            workers=0,
            device="cpu",
            overrides=(*COMMON, "batch_size=6", "lr=0.02"),
            out=tmp_path / "one",
        ),
    )
    out = tmp_path / "two"
    sets = [a for kv in (*COMMON, "batch_size=3", "lr=0.01") for a in ("--set", kv)]
    proc = torchrun(
        "run",
        data,
        "--strategy",
        "full-finetune",
        "--backbone",
        "test_convnext",
        "--no-pretrained",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--out",
        out,
        *sets,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(out.iterdir())
    assert len(runs) == 1  # written once, by rank 0
    assert proc.stdout.count("run folder:") == 1 and "lr 0.01 x 2 = 0.02" in proc.stderr
    a, b = load_file(str(single.run_dir / "model.safetensors")), load_file(str(runs[0] / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = load_file(str(runs[0] / "model.safetensors"))["head.weight"]
    assert moved.abs().sum() > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_a_class_balanced_sampler_is_refused_under_torchrun(make_folder, tmp_path):
    from finetune.runtime import Dist
    from tests.test_train import make_trainer

    data = make_folder({"red": 6, "blue": 6})
    two = Dist(world=2, rank=0, local_rank=0)  # as torchrun would set it
    with pytest.raises(TrainingError, match="balance=weights"):
        make_trainer(data, tmp_path, "partial-finetune", 'balance="sampler"', dist=two)
