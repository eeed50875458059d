"""Fine-tuning speed on CUDA: our loop (AMP, channels_last) against a bare PyTorch loop, 1 and 2 GPUs.

    python benchmarks/gpu_train.py [DATA] [--backbone lite0] [--batch 64] [--epochs 3]

Ours: `finetune run DATA --strategy full-finetune --device cuda` (real images decoded, resized and
augmented by DataLoader workers; the img/s of the last epoch, from history.csv, so start-up and
cuDNN autotuning are left out). Reference, measured in the same run: the same timm network, batch,
AMP dtype, channels_last and SGD step on random tensors already on the GPU (no data loading: an
upper bound). With two or more GPUs, both again on 2 processes under torchrun: ours averages
gradients after every rank's backward succeeded (`runtime.average_gradients`), the reference is
DistributedDataParallel (gradients all-reduced during backward). Prints img/s per GPU, the
ratio ours / reference, and the scaling from 1 to 2 GPUs for both. Needs a CUDA machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def reference(backbone: str, batch: int, steps: int, size: int) -> float:
    """img/s (per process) of a bare training loop on random GPU tensors; DDP under torchrun."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    from finetune.models.backbone import build
    from finetune.train.setup import amp_for

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        torch.cuda.set_device(rank)
        torch.distributed.init_process_group("nccl")
    device = torch.device("cuda", rank)
    model = build(backbone, pretrained=False).model.to(device, memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank]) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype, _ = amp_for(device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            out = net(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        opt.step()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    ips = steps * batch / (time.perf_counter() - t0)
    if world > 1:
        torch.distributed.destroy_process_group()
    return ips


def ours(data: str, backbone: str, batch: int, epochs: int, nproc: int, out: Path) -> float:
    """img/s per GPU of our loop's last epoch (history.csv counts every process's images)."""
    args = ["run", data, "--strategy", "full-finetune", "--backbone", backbone, "--device", "cuda"]
    args += ["--no-cache", "--out", str(out)]
    for kv in (f"epochs={epochs}", f"batch_size={batch}", 'init_head="random"', "patience=0"):
        args += ["--set", kv]
    launcher = [sys.executable, "-m", "finetune"]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
        ]
        launcher += ["-m", "finetune"]
    env = {**os.environ, "FINETUNE_PROGRESS": "0"}
    done = subprocess.run(launcher + args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"finetune failed ({done.returncode}):\n{done.stderr[-3000:]}")
    (run_dir,) = list(out.iterdir())
    with open(run_dir / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    return float(rows[-1]["img_per_s"]) / nproc


def reference_launch(backbone: str, batch: int, steps: int, size: int, nproc: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [__file__, "--worker", "--backbone", backbone, "--batch", str(batch), "--steps", str(steps)]
    cmd += ["--size", str(size)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"reference DDP failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", help="image folder (default: sklearn's digits as PNG files)")
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--batch", type=int, default=64, help="per GPU")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="reference steps")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:  # one process of the reference DDP launch
        ips = reference(a.backbone, a.batch, a.steps, a.size)
        if os.environ.get("RANK", "0") == "0":
            print(ips)
        return

    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device (none found); nothing measured")
    sys.path.insert(0, str(HERE))
    from common import digits_folder

    data = a.data or str(digits_folder())
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    print(f"{name} x {gpus}, torch {torch.__version__}, {a.backbone}, batch {a.batch}/GPU")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one = ours(data, a.backbone, a.batch, a.epochs, 1, Path(tmp) / "one")
        ref1 = reference(a.backbone, a.batch, a.steps, a.size)
        rows.append(("1 GPU", one, ref1))
        if gpus > 1:
            two = ours(data, a.backbone, a.batch, a.epochs, 2, Path(tmp) / "two")
            ref2 = reference_launch(a.backbone, a.batch, a.steps, a.size, 2)
            rows.append(("2 GPUs (per GPU)", two, ref2))
    print(f"{'':<18}{'ours img/s':>12}{'bare img/s':>12}{'ours/bare':>11}")
    for name, o, r in rows:
        print(f"{name:<18}{o:>12.1f}{r:>12.1f}{o / r:>11.2f}")
    if len(rows) == 2:
        print(
            f"scaling 1 -> 2 GPUs (total img/s ratio): ours {2 * rows[1][1] / rows[0][1]:.2f}, "
            f"DDP reference {2 * rows[1][2] / rows[0][2]:.2f}"
        )
    else:
        print("one GPU: the 2-process scaling needs two")


if __name__ == "__main__":
    main()
