"""`finetune run --config FILE`: a whole run in TOML, which wins over which, its mistakes, and the
run.toml every run folder writes, which runs the same model again."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.method import RunOptions
from finetune.recipes import load_recipe, read_toml
from finetune.runconfig import CLI_NAMES, OPTIONS, RECIPE_TABLE, RUN_FILE, run_options, run_toml
from tests.conftest import invoke, one_line_error, tree_digest


def _run_command():
    import typer.main

    from finetune.cli import app

    return typer.main.get_command(app).commands["run"]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def captured(monkeypatch):
    """`finetune run` parses and resolves as usual, then hands its RunOptions here instead of training."""
    import finetune.app.pipeline as pipeline

    seen: list[RunOptions] = []

    class _NotMain:
        main = False  # nothing to print

    def fake_run(opts):
        seen.append(opts)
        return _NotMain()

    monkeypatch.setattr(pipeline, "run", fake_run)
    return seen


def _opts(captured, *args) -> RunOptions:
    result = invoke("run", *args)
    assert result.exit_code == 0, result.output
    return captured[-1]


# --------------------------------------------------------------------------- every option has a key


def test_every_parameter_of_run_has_a_config_key():
    params = [p.name for p in _run_command().params]
    assert "log" in params and "set_" in params and "no_cache" in params  # the names mapped below
    for name in params:
        if name == "config":
            continue
        assert name in CLI_NAMES, f"--{name}: no key in a config file (runconfig.CLI_NAMES)"
        assert CLI_NAMES[name] in OPTIONS or CLI_NAMES[name] == RECIPE_TABLE, name
    assert CLI_NAMES["log"] == "log" and CLI_NAMES["set_"] == "recipe"
    # and every field of RunOptions is reachable from a file (overrides: through [recipe] and head)
    fields = {f.name for f in dataclasses.fields(RunOptions)} - {"overrides"}
    assert fields == {o.field for o in OPTIONS.values() if o.field}


def test_without_a_config_the_command_line_defaults_are_the_library_defaults(captured, image_folder):
    """Typing every option at its default changes nothing: the defaults of both sides agree."""
    plain = _opts(captured, image_folder)
    args = [image_folder]
    for p in _run_command().params:
        if p.name in ("data", "config", "set_", "head", "log") or p.default is None:
            continue
        default = getattr(p.default, "value", p.default)
        if p.is_flag:
            flag = p.opts[0] if default else (p.secondary_opts or p.opts)[0]
            args.append(flag if (default or p.secondary_opts) else None)
        else:
            args += [p.opts[0], default]
    typed = _opts(captured, *[a for a in args if a is not None])
    same_out = [
        dataclasses.replace(o, out=Path(o.out)) for o in (typed, plain, RunOptions(data=image_folder))
    ]
    assert same_out[0] == same_out[1] == same_out[2]  # out: "runs" or Path("runs")


# --------------------------------------------------------------------------- which wins


def test_the_config_fills_what_the_command_line_leaves_out(captured, tmp_path):
    cfg = _write(
        tmp_path / "proj" / "run.toml",
        'data = "data"\nout = "runs"\nbackbone = "test_resnet"\nstrategy = "stage-probe"\n'
        'seed = 5\nval_fraction = 0.3\ncache = false\nworkers = 0\nlog = "csv"\nlabels = "l.csv"\n',
    )
    opts = _opts(captured, "--config", cfg)
    proj = tmp_path / "proj"
    assert opts.data == proj / "data" and opts.out == proj / "runs"  # from the file's folder
    assert opts.labels_csv == proj / "l.csv"
    assert (opts.backbone, opts.strategy, opts.seed, opts.val_fraction) == (
        "test_resnet",
        "stage-probe",
        5,
        0.3,
    )
    assert (opts.cache, opts.workers, opts.log) == (False, 0, ("csv",))


def test_options_typed_on_the_command_line_win_even_at_their_default_value(captured, tmp_path, image_folder):
    cfg = _write(
        tmp_path / "run.toml",
        'data = "elsewhere"\nseed = 5\nbackbone = "test_resnet"\ncache = false\nval_fraction = 0.3\n',
    )
    # --seed 0 and --backbone lite0 are the defaults: typed, they still beat the file
    opts = _opts(captured, image_folder, "--config", cfg, "--seed", "0", "--backbone", "lite0")
    assert opts.data == image_folder and opts.seed == 0 and opts.backbone == "lite0"
    assert opts.cache is False and opts.val_fraction == 0.3  # not typed: the file's
    opts = _opts(captured, "--config", cfg, "--no-cache", "--val-fraction", "0.2")
    assert opts.cache is False and opts.val_fraction == 0.2 and opts.data == tmp_path / "elsewhere"


def test_recipe_precedence_packaged_file_table_head_set(captured, tmp_path):
    """packaged < recipe_file < [recipe] < head < --set, key by key."""
    own = _write(
        tmp_path / "recipes" / "mine.toml",
        'name = "mine"\nmethod = "probe"\nbatch_size = 8\nimage_size = 48\npool = "max"\nc_grid = [0.5]\n',
    )
    cfg = _write(
        tmp_path / "run.toml",
        'data = "data"\nrecipe_file = "recipes/mine.toml"\nhead = "logreg"\n'
        '[recipe]\nimage_size = 56\nhead = "svm"\npool = "avg"\nc_grid = [2.0]\n',
    )

    def recipe(*args):
        opts = _opts(captured, "--config", cfg, *args)
        assert opts.recipe_file == own
        return load_recipe(opts.strategy, opts.recipe_file, opts.overrides)

    r = recipe()
    assert r.name == "mine" and r.batch_size == 8  # the recipe file over the packaged one (64)
    assert r.image_size == 56 and r.pool == "avg" and r.c_grid == (2.0,)  # [recipe] over the file
    assert r.head == "logreg"  # head over [recipe]
    assert recipe("--head", "svm").head == "svm"  # --head over the file's head
    r = recipe("--head", "svm", "--set", 'head="logreg"', "--set", "image_size=64")
    assert r.head == "logreg" and r.image_size == 64  # --set over everything


def test_python_keywords_win_over_the_config_and_recipe_merges_key_by_key(tmp_path):
    cfg = _write(tmp_path / "run.toml", 'data = "d"\nseed = 4\n[recipe]\nimage_size = 56\nbatch_size = 8\n')
    opts = run_options(cfg, {"seed": 9, "recipe": {"batch_size": 16}, "workers": None})
    r = load_recipe(opts.strategy, opts.recipe_file, opts.overrides)
    assert opts.seed == 9 and opts.workers is None and opts.data == tmp_path / "d"
    assert (r.image_size, r.batch_size) == (56, 16)


# --------------------------------------------------------------------------- mistakes: one line, exit 2


@pytest.mark.parametrize(
    "text, needles",
    [
        ('data = "d"\nsed = 1\n', ["unknown key 'sed'", "did you mean seed"]),
        ('data = "d"\n[recipe]\nepoch = 3\n', ["[recipe]", "'epoch'", "did you mean epochs"]),
        ('data = "d"\n[recipe.lr_mult]\ntopp = 0.1\n', ["lr_mult.topp", "did you mean lr_mult.top"]),
        ('data = "d"\nrecipes = "x"\n', ["unknown key 'recipes'", "did you mean recipe"]),
        ('data = "d"\nseed = "1"\n', ["seed must be an integer", "'1'"]),
        ('data = "d"\nval_fraction = 2\n', ["val_fraction must be a number from 0.05 to 0.9"]),
        ('data = "d"\ncache = "no"\n', ["cache must be true or false"]),
        ('data = "d"\nweights_map = "order"\n', ["weights_map must be one of name, positional"]),
        ("data = 3\n", ["data must be a path"]),
        ('data = "d"\nrecipe = 3\n', ["recipe must be a table"]),
        ('data = "d"\n[recipe]\nlr = -1\n', ["[recipe]", "'lr' must be a positive number"]),
        ('data = "d"\n[recipe]\nepochs = 3\n', ["[recipe] epochs: not used by the linear-probe recipe"]),
        ('data = "d"\nstrategy = "full-finetune"\nhead = "svm"\n', ["head: not used by the full-finetune"]),
        ('data = "d"\nseed = \n', ["not valid TOML", "line 2, column"]),
        ("seed = 1\n", ["no data folder given", "DATA"]),
    ],
)
def test_config_mistakes_are_one_line_naming_the_key(tmp_path, text, needles):
    cfg = _write(tmp_path / "bad.toml", text)
    one_line_error(invoke("run", "--config", cfg), *needles)


def test_no_data_anywhere_and_a_missing_or_binary_config_file_are_one_line(tmp_path):
    one_line_error(invoke("run"), "no data folder given")
    one_line_error(invoke("run", "--config", tmp_path / "nope.toml"), "does not exist")
    (tmp_path / "bin.toml").write_bytes(b"data = \xff\n")
    one_line_error(invoke("run", "--config", tmp_path / "bin.toml"), "not UTF-8")


# --------------------------------------------------------------------------- run.toml


def test_run_toml_reads_back_as_the_same_options_and_recipe(tmp_path):
    opts = RunOptions(
        data=tmp_path / 'odd "data"\tfolder',
        strategy="auto",
        backbone="tv:alexnet",
        weights=tmp_path / "w.pt",
        out=tmp_path / "runs",
        seed=7,
        workers=0,
        log=("csv", "tensorboard"),
        resume=tmp_path / "old",
        keep_checkpoints=True,
    )
    recipe = load_recipe("full-finetune", overrides=["lr=0.0123", "lr_mult.top=0.25"])
    recipe = dataclasses.replace(recipe, description='say "hi"\nand \\ more')  # escapes survive
    path = _write(tmp_path / "elsewhere" / RUN_FILE, run_toml(opts, recipe))
    raw = read_toml(path)
    assert "epochs" in raw["recipe"] and "head" not in raw["recipe"]  # only the keys the method reads
    back = run_options(path)
    assert back.strategy == "full-finetune"  # what auto chose: the recipe's own
    assert back.resume is None  # a new run, never a resume of the old one
    assert dataclasses.replace(back, strategy="auto", overrides=(), resume=opts.resume) == opts
    assert load_recipe(back.strategy, back.recipe_file, back.overrides) == recipe


def test_run_toml_of_a_user_recipe_file_stands_alone(tmp_path):
    recipe = load_recipe(
        recipe_file=_write(tmp_path / "p.toml", 'method = "probe"\nlayer = "all"\nc_grid = [3.0]\n')
    )
    back = run_options(_write(tmp_path / RUN_FILE, run_toml(RunOptions(data=tmp_path), recipe)))
    assert back.recipe_file is None and back.strategy == "linear-probe"
    assert load_recipe(back.strategy, None, back.overrides) == recipe  # name "p" included


@pytest.mark.slow
def test_a_probe_run_repeated_from_its_run_toml_is_the_same_run_in_a_new_folder(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6})
    out = tmp_path / "runs"
    args = ["--backbone", "test_efficientnet", "--no-pretrained", "--seed", "3", "--val-fraction", "0.34"]
    first = invoke("run", data, "--out", out, "--workers", "0", *args, "--set", "image_size=32")
    assert first.exit_code == 0, first.output
    (run_dir,) = out.iterdir()
    toml = read_toml(run_dir / RUN_FILE)
    assert toml["data"] == str(data.resolve()) and toml["seed"] == 3 and toml["recipe"]["image_size"] == 32
    before = tree_digest(run_dir)

    again = invoke("run", "--config", run_dir / RUN_FILE)
    assert again.exit_code == 0, again.output
    assert tree_digest(run_dir) == before  # the old run folder is untouched
    (other,) = [p for p in out.iterdir() if p != run_dir]

    def read(folder, name):
        return json.loads((folder / name).read_text())

    a, b = read(run_dir, "config.json"), read(other, "config.json")
    for key in ("strategy", "backbone", "recipe", "class_names", "tap", "preprocessing", "weights"):
        assert a[key] == b[key], key
    assert read(run_dir, "split.json") == read(other, "split.json")
    ma, mb = read(run_dir, "metrics.json"), read(other, "metrics.json")
    for m in (ma, mb):
        del m["seconds"], m["timing"]  # the clock
    assert ma == mb
    assert read(run_dir, "predictions.json") == read(other, "predictions.json")
    assert (other / RUN_FILE).read_text() == (run_dir / RUN_FILE).read_text()


@pytest.mark.slow
def test_lr_auto_is_recorded_as_the_lr_found_and_the_rerun_trains_the_same_weights(make_folder, tmp_path):
    data = make_folder({"red": 8, "blue": 8})
    out = tmp_path / "runs"
    args = ["run", data, "--strategy", "partial-finetune", "--backbone", "test_resnet", "--no-pretrained"]
    args += ["--workers", "0", "--device", "cpu", "--out", out, "--seed", "2"]
    sets = ["image_size=32", "batch_size=4", "lr=auto", "epochs=1", 'init_head="random"', "seed=5"]
    result = invoke(*args, *[a for kv in sets for a in ("--set", kv)])
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    toml = read_toml(run_dir / RUN_FILE)
    lr = config["extra"]["lr_find"]["suggested_lr"]
    assert toml["recipe"]["lr"] == lr == config["recipe"]["lr"] and isinstance(lr, float)
    assert toml["seed"] == 2 and toml["recipe"]["seed"] == 5 and toml["strategy"] == "partial-finetune"
    assert toml["recipe"]["lr_mult"] == config["recipe"]["lr_mult"]

    result = invoke("run", "--config", run_dir / RUN_FILE)
    assert result.exit_code == 0, result.output
    (other,) = [p for p in out.iterdir() if p != run_dir]
    assert not (other / "lr-find.csv").exists()  # the number, not a second range test
    a, b = load_file(str(run_dir / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
