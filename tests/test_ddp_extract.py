"""extract-features and the probes under torchrun: 2 gloo processes shard the images, rank 0 writes once."""

from __future__ import annotations

import json

import numpy as np

from finetune.features.files import read_features
from tests.conftest import invoke, torchrun


def test_two_gloo_processes_extract_what_one_process_extracts(make_folder, tmp_path, tiny_weights):
    data = make_folder({"a": 5, "b": 4}, size=32)  # 9 images: the shards are 5 and 4
    args = [
        "--backbone",
        "test_efficientnet",
        "--weights",
        tiny_weights,
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
    proc = torchrun("extract-features", data, "-o", out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and [p.name for p in out.parent.iterdir()] == ["feats.npz"]

    one, two = read_features(tmp_path / "one.npz"), read_features(out)
    assert two.paths == one.paths and two.labels.tolist() == one.labels.tolist()
    for tap in ("stage2", "pool"):
        np.testing.assert_allclose(two.taps[tap], one.taps[tap], atol=1e-5, rtol=0)


def test_a_linear_probe_under_torchrun_matches_one_process(make_folder, tmp_path, tiny_weights):
    data = make_folder({"a": 6, "b": 6, "c": 6}, size=32)
    args = ["--backbone", "test_efficientnet", "--weights", tiny_weights, "--workers", "0", "--device", "cpu"]
    assert invoke("run", data, "--out", tmp_path / "one", *args).exit_code == 0
    proc = torchrun("run", data, "--out", tmp_path / "two", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one,), two = list((tmp_path / "one").iterdir()), list((tmp_path / "two").iterdir())
    assert len(two) == 1  # written once, by rank 0
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two[0]))
    assert m2["val"]["accuracy"] == m1["val"]["accuracy"] and m2["head"]["C"] == m1["head"]["C"]
