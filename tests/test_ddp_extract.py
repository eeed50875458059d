"""extract-features under torchrun: 2 gloo processes shard the images and write the same file once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from finetune.featfile import read_features
from tests.conftest import invoke

ROOT = Path(__file__).resolve().parent.parent


def test_two_gloo_processes_extract_what_one_process_extracts(make_folder, tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_efficientnet", pretrained=False)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    data = make_folder({"a": 5, "b": 4}, size=32)  # 9 images: the shards are 5 and 4
    args = [
        "--backbone",
        "test_efficientnet",
        "--weights",
        str(weights),
        "--layer",
        "stage2",
        "--layer",
        "pool",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-cache",
    ]
    assert invoke("extract-features", data, "-o", tmp_path / "one.npz", *args).exit_code == 0

    out = tmp_path / "two" / "feats.npz"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "finetune",
        "extract-features",
        str(data),
        "-o",
        str(out),
        *args,
    ]
    env = {**os.environ, "FINETUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "FINETUNE_ENGINE": "torch"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and [p.name for p in out.parent.iterdir()] == ["feats.npz"]

    one, two = read_features(tmp_path / "one.npz"), read_features(out)
    assert two.paths == one.paths and two.labels.tolist() == one.labels.tolist()
    for tap in ("stage2", "pool"):
        np.testing.assert_allclose(two.taps[tap], one.taps[tap], atol=1e-5, rtol=0)


def test_a_linear_probe_under_torchrun_matches_one_process(make_folder, tmp_path):
    import json

    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_efficientnet", pretrained=False)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    data = make_folder({"a": 6, "b": 6, "c": 6}, size=32)
    args = ["--backbone", "test_efficientnet", "--weights", str(weights), "--workers", "0", "--device", "cpu"]
    assert invoke("run", data, "--out", tmp_path / "one", *args).exit_code == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "finetune",
        "run",
        str(data),
        "--out",
        str(tmp_path / "two"),
        *args,
    ]
    env = {**os.environ, "FINETUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "FINETUNE_ENGINE": "torch"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one,), two = list((tmp_path / "one").iterdir()), list((tmp_path / "two").iterdir())
    assert len(two) == 1  # written once, by rank 0
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two[0]))
    assert m2["val"]["accuracy"] == m1["val"]["accuracy"] and m2["head"]["C"] == m1["head"]["C"]
