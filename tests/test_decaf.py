"""DeCAF-style features: extract-features files, the probe table, stage-probe, the feature cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import invoke, one_line_error, tree_digest, write_images

runner = CliRunner()


@pytest.fixture
def weights_file(tiny_weights):
    return tiny_weights


def _reference_model(weights_file):
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("test_efficientnet", pretrained=False)
    model.load_state_dict(load_file(str(weights_file)))
    return model.eval()


def _extract(data, out, weights_file, *layers, extra=()):
    args = ["extract-features", data, "--backbone", "test_efficientnet", "--weights", weights_file, "-o", out]
    for t in layers:
        args += ["--layer", t]
    return invoke(*args, *extra)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_extract_features_equals_a_hand_written_hook(make_folder, tmp_path, weights_file, suffix):
    """One stage tap and the pooled top, against forward hooks on the same model and the same pixels."""
    from finetune.data.index import scan
    from finetune.data.transforms import eval_reader
    from finetune.features.files import read_features

    data = make_folder({"a": 4, "b": 3}, size=40)
    before = tree_digest(data)
    out = tmp_path / f"feats{suffix}"
    res = _extract(data, out, weights_file, "stage2", "pool")
    assert res.exit_code == 0, res.output
    assert tree_digest(data) == before

    model = _reference_model(weights_file)
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, i, o: seen.__setitem__("stage2", o.mean(dim=(2, 3))))
    model.global_pool.register_forward_hook(lambda m, i, o: seen.__setitem__("pool", o.flatten(1)))
    index = scan(data)
    read = eval_reader(_preprocessing("test_efficientnet"))  # the same pixels: decoders are tested elsewhere
    x = torch.stack([read(index.absolute(i)) for i in range(len(index.paths))])
    with torch.no_grad():
        model(x)

    ff = read_features(out)
    assert ff.paths == list(index.paths) and ff.labels.tolist() == list(index.labels)
    assert ff.class_names == ["a", "b"] and ff.splits == list(index.splits)
    for tap in ("stage2", "pool"):
        np.testing.assert_allclose(ff.taps[tap], seen[tap].numpy(), atol=1e-5, rtol=0)


def _preprocessing(name):
    from finetune.models.backbone import build

    return build(name, pretrained=False).preprocessing


def test_feature_files_load_without_pickle(make_folder, tmp_path, weights_file):
    from safetensors import safe_open

    data = make_folder({"x": 3, "y": 3}, size=32)
    npz, st = tmp_path / "f.npz", tmp_path / "f.safetensors"
    assert _extract(data, npz, weights_file, "pool").exit_code == 0
    assert _extract(data, st, weights_file, "pool").exit_code == 0
    with np.load(npz, allow_pickle=False) as z:  # raises if anything needs pickle
        assert z["labels"].tolist() == [0, 0, 0, 1, 1, 1]
        assert z["paths"].tolist() == [f"x/img_{i:03d}.png" for i in range(3)] + [
            f"y/img_{i:03d}.png" for i in range(3)
        ]
        x_npz = z["feat.pool"]
    with safe_open(str(st), framework="numpy") as f:
        meta = f.metadata()
        assert json.loads(meta["paths"])[3] == "y/img_000.png"
        assert f.get_tensor("labels").tolist() == [0, 0, 0, 1, 1, 1]
        np.testing.assert_allclose(f.get_tensor("feat.pool"), x_npz, atol=1e-6)


def test_unpooled_taps_keep_their_maps(make_folder, tmp_path, weights_file):
    from finetune.features.files import read_features

    data = make_folder({"x": 2, "y": 2}, size=32)
    out = tmp_path / "maps.npz"
    res = _extract(data, out, weights_file, "stage2", extra=["--pool", "none"])
    assert res.exit_code == 0, res.output
    maps = read_features(out).taps["stage2"]
    assert maps.ndim == 4 and maps.shape[0] == 4  # (N, C, H, W)


def test_cache_reuses_rows_and_re_extracts_only_a_changed_image(make_folder, tmp_path):
    """Real packaged weights (the cache needs a weights fingerprint), small folder."""
    from finetune.data.index import scan
    from finetune.features.extract import extract_taps
    from finetune.models.backbone import build

    data = make_folder({"a": 4, "b": 4}, size=32)
    bb = build("lite0")
    pre = bb.preprocessing.with_size(64)
    index = scan(data)
    every = range(len(index.paths))
    first = extract_taps(bb, ["pool"], "avg", index, every, pre, workers=0)["pool"]
    again = extract_taps(bb, ["pool"], "avg", index, every, pre, workers=0)["pool"]
    assert first.hits == 0 and again.hits == len(index.paths) and again.engine == "cache"
    np.testing.assert_array_equal(first.x, again.x)

    changed = index.absolute(0)
    write_images(changed.parent, 1, 1, size=32, start=0)  # other pixels, same name
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse clocks
    third = extract_taps(bb, ["pool"], "avg", index, every, pre, workers=0)["pool"]
    assert third.hits == len(index.paths) - 1
    assert not np.allclose(third.x[0], first.x[0]) and np.allclose(third.x[1:], first.x[1:])


def test_probe_table_matches_sklearn_on_the_same_splits():
    """Each cell is the accuracy of sklearn's model with the chosen C on the seeded split."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from finetune.data.index import stratified_split
    from finetune.probe.decaf import probe_features

    digits = load_digits()
    x, y = digits.data[:400].astype(np.float32), digits.target[:400]
    noise = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    table = probe_features(
        {"pixels": x, "noise": noise}, y, ["pixels", "noise"], heads=("logreg",), repeats=3
    )
    pixels = table.cell("pixels", "logreg")
    assert len(pixels.accs) == 3 and pixels.mean > 0.9 and table.cell("noise", "logreg").mean < 0.3
    for r, C in enumerate(pixels.Cs):
        split = np.asarray(stratified_split(y, 0.2, r))
        tr, va = split == "train", split == "val"
        scaler = StandardScaler().fit(x[tr])
        ref = LogisticRegression(C=C, max_iter=5000).fit(scaler.transform(x[tr]), y[tr])
        ref_acc = (ref.predict(scaler.transform(x[va])) == y[va]).mean()
        assert abs(pixels.accs[r] - ref_acc) <= 0.0125 + 1e-9  # at most one of 80 images differs
    assert "± " in table.format() and "pixels" in table.format()


def test_probe_command_prints_the_layer_by_head_table(make_folder, tmp_path, weights_file):
    data = make_folder({"a": 6, "b": 6}, size=32)
    out = tmp_path / "f.npz"
    assert _extract(data, out, weights_file, "stage1", "pool").exit_code == 0
    res = invoke("probe", out, "--repeats", "2")
    assert res.exit_code == 0, res.output
    rows = [ln.split()[0] for ln in res.output.splitlines() if "±" in ln and not ln.startswith("validation")]
    assert rows == ["stage1", "pool"] and "logreg" in res.output and "svm" in res.output
    res = invoke("probe", out, "--layer", "pool", "--head", "svm", "--repeats", "2", "--json")
    table = json.loads(res.output[res.output.index("{") :])  # after the progress lines on stderr
    assert [(c["layer"], c["head"], len(c["accuracies"])) for c in table["cells"]] == [("pool", "svm", 2)]


def test_user_mistakes_are_one_line(make_folder, tmp_path, weights_file):
    data = make_folder({"a": 3, "b": 3}, size=32)
    before = tree_digest(data)
    one_line_error(_extract(data, data / "a" / "f.npz", weights_file, "pool"), "inside the data folder")
    one_line_error(_extract(data, tmp_path / "f.pkl", weights_file, "pool"), ".npz or .safetensors")
    one_line_error(_extract(data, tmp_path / "f.npz", weights_file, "fc9"), "unknown layer", "pool")
    one_line_error(invoke("probe", tmp_path / "missing.npz"), "does not exist")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    one_line_error(invoke("probe", tmp_path / "junk.npz"), "not a finetune features file")
    assert _extract(data, tmp_path / "ok.npz", weights_file, "pool").exit_code == 0
    one_line_error(invoke("probe", tmp_path / "ok.npz", "--layer", "fc7"), "no layer 'fc7'")
    assert tree_digest(data) == before


def test_stage_probe_keeps_the_best_stage_and_predict_uses_it(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6, "green": 6}, size=32)
    runs = tmp_path / "runs"
    res = invoke("run", data, "--strategy", "stage-probe", "--out", runs, "--set", "image_size=64")
    assert res.exit_code == 0, res.output
    (run_dir,) = list(runs.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    stages = metrics["stages"]
    assert [r["stage"] for r in stages][-1] == "pool" and len(stages) >= 3
    # chosen by cross-validation on the training split, ties to the later stage (not by validation)
    top = max(r["cv_accuracy"] for r in stages)
    best = [r for r in stages if r["cv_accuracy"] == top][-1]
    assert config["tap"] == metrics["best_stage"] == best["stage"]
    assert metrics["val"]["accuracy"] == pytest.approx(best["accuracy"])

    from finetune.app.runfolder import load_run

    model, tf, classes = load_run(run_dir)
    n_params = sum(p.numel() for p in model.parameters())
    if best["stage"] != "pool":  # the network is cut: fewer parameters than the whole trunk
        from finetune.models.anatomy import build_trunk
        from finetune.models.backbone import build

        full = build_trunk(build("lite0", pretrained=False).model, "pool")
        assert n_params < sum(p.numel() for p in full.parameters())
    res = invoke("predict", data / "red" / "img_000.png", "--run", run_dir)
    assert res.exit_code == 0 and "red" in res.output, res.output


def test_cache_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "c"))
    res = invoke("cache", "info", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["sets"] == []
    res = invoke("cache", "clear")
    assert res.exit_code == 0 and "freed 0.0 MiB" in res.output
