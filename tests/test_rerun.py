"""A re-run from the cache: the same run folder, with no network built and torch never imported.

The first `run` fills the feature cache, the trunk cache and the backbone card; the second is a
fresh process that must fit its head from cached features (numpy + scipy) and write the same
model. Whether torch was imported is read from `sys.modules` inside that process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import invoke

HEAVY = ("torch", "torchvision", "timm")  # sklearn (metrics) and matplotlib (report figures) are allowed

CODE = """
import json, sys
from finetune.cli import main
sys.argv = ["finetune", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
print("HEAVY " + json.dumps(sorted(m for m in HEAVY if m in sys.modules)))
sys.exit(code)
""".replace("HEAVY if", f"{HEAVY!r} if")


def _run(args: list, cache: Path) -> tuple[list[str], str]:
    """`finetune ARGS` in a fresh process: (heavy modules it imported, its output)."""
    env = {**os.environ, "FINETUNE_CACHE": str(cache), "FINETUNE_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", CODE, json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("HEAVY "))
    return json.loads(line[6:]), done.stdout + done.stderr


@pytest.mark.parametrize("strategy", ["linear-probe", "stage-probe", "auto"])
def test_a_cached_rerun_writes_the_same_model_without_torch(
    make_folder, tiny_weights, tmp_path, monkeypatch, strategy
):
    data = make_folder({"a": 6, "b": 6, "c": 6}, size=40)
    out, cache = tmp_path / "runs", tmp_path / "cache"
    args = ["run", data, "--strategy", strategy, "--backbone", "test_efficientnet", "--weights", tiny_weights]
    args += ["--out", out, "--set", "image_size=48", "--workers", "0"]

    heavy_first, _ = _run(args, cache)
    assert "torch" in heavy_first  # the first run builds the network and extracts
    first = max(out.iterdir())
    heavy_again, log = _run(args, cache)
    again = max(out.iterdir())
    assert again != first
    assert heavy_again == [], log  # no torch, torchvision or timm in the re-run
    assert "feature cache: 18 of 18 images reused" in log

    a, b = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and {"head.weight", "head.bias"} <= a.keys()
    for k in a:  # the trunk from its cache, the head fitted on the very same features (or read back)
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, again))
    assert m1["val"] == m2["val"] and m2["timing"]["engine"] == "cache"
    assert json.loads((again / "predictions.json").read_text()) == json.loads(
        (first / "predictions.json").read_text()
    )
    assert json.loads((again / "config.json").read_text())["extra"]["device"].startswith("none")
    assert (again / "report.html").is_file()
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    info = json.loads(invoke("cache", "info", "--json").stdout)
    assert info["other"]["trunks"]["files"] == 1 and info["other"]["backbones"]["files"] == 1
    n_taps = len(json.loads((first / "metrics.json").read_text()).get("stages", [None]))
    n_taps += strategy == "auto"  # and the per-image ImageNet familiarity that advise measured
    assert len(info["sets"]) == n_taps  # one feature set per tap read

    # The model written without torch is an ordinary run: predict loads it and agrees with the first.
    img = next((data / "a").iterdir())
    p1, p2 = (invoke("predict", img, "--run", d, "--json") for d in (first, again))
    assert p1.exit_code == 0 and p2.exit_code == 0, p2.output
    assert json.loads(p1.stdout) == json.loads(p2.stdout)  # one row (a JSON line) each, the same


def test_backbone_card_is_used_only_while_the_weights_file_is_unchanged(tiny_weights, tmp_path, monkeypatch):
    import timm
    import torch
    from safetensors.torch import save_file

    from finetune.models.anatomy import taps
    from finetune.models.backbone import open_backbone

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    first = open_backbone("test_efficientnet", weights_file=tiny_weights)
    assert first.built  # no card yet: built, and the card written
    again = open_backbone("test_efficientnet", weights_file=tiny_weights)
    assert not again.built  # from the card
    assert again.weights == first.weights and again.preprocessing == first.preprocessing
    assert again.tap_names == tuple(taps(first.model))
    ref = first.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.model.state_dict().items())  # built on first use
    assert again.built

    torch.manual_seed(1)  # other weights in the same file: the card no longer describes it
    other = timm.create_model("test_efficientnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tiny_weights))
    changed = open_backbone("test_efficientnet", weights_file=tiny_weights)
    assert changed.built and changed.weights.sha256 != first.weights.sha256
    assert not open_backbone("test_efficientnet", weights_file=tiny_weights).built  # its new card

    assert open_backbone("test_efficientnet", pretrained=False).built  # random init: never carded
    assert open_backbone("test_efficientnet", weights_file=tiny_weights, cards=False).built


def test_trunk_cache_holds_the_cut_network(tiny_weights, tmp_path, monkeypatch):
    import copy

    from finetune.features.cache import trunk_tensors
    from finetune.models.anatomy import build_trunk
    from finetune.models.backbone import build

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    bb = build("test_efficientnet", weights_file=tiny_weights)
    reference = build_trunk(copy.deepcopy(bb.model), "stage2", "avg").state_dict()  # by hand, a fresh cut
    built = trunk_tensors(bb, "stage2", "avg", bb.preprocessing)  # cuts bb.model, stores the tensors
    assert list((tmp_path / "cache" / "trunks").glob("*.safetensors"))
    fresh = build("test_efficientnet", weights_file=tiny_weights)
    cached = trunk_tensors(fresh, "stage2", "avg", fresh.preprocessing)
    assert cached.keys() == built.keys() == {f"trunk.{k}" for k in reference}
    for k, v in reference.items():
        np.testing.assert_array_equal(cached[f"trunk.{k}"], v.numpy())
    assert build_trunk(fresh.model, "pool", "avg") is fresh.model  # fresh's network was never cut


def test_a_file_that_fails_to_decode_is_remembered(make_folder, tiny_weights, tmp_path):
    """A truncated file (its header reads, its pixels do not) is skipped from the cache on a re-run,
    said again, and retried once its bytes change."""
    from tests.badfiles import _truncated_jpeg

    data = make_folder({"a": 6, "b": 6}, size=40)
    _truncated_jpeg(data / "a" / "broken.jpg")
    out, cache = tmp_path / "runs", tmp_path / "cache"
    args = ["run", data, "--backbone", "test_efficientnet", "--weights", tiny_weights, "--out", out]
    args += ["--set", "image_size=48", "--workers", "0"]

    heavy, log = _run(args, cache)
    assert "torch" in heavy and "skipped a/broken.jpg: truncated" in log
    heavy, log = _run(args, cache)
    assert heavy == [], log  # the failure came from the cache: no network, no torch
    assert "skipped a/broken.jpg: truncated" in log and "feature cache: 12 of 13 images reused" in log
    skipped = json.loads((max(out.iterdir()) / "problems.json").read_text())["skipped"]
    assert [r["path"] for r in skipped] == ["a/broken.jpg"]

    (data / "a" / "broken.jpg").write_bytes((data / "a" / "img_000.png").read_bytes())  # repaired
    heavy, log = _run(args, cache)
    assert "torch" in heavy and "skipped" not in log  # new bytes, new key: decoded this time
