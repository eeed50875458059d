"""The Python API: `finetune.run`, `finetune.predict`, `finetune.evaluate`; the README's example
runs as written; every mistake is a `finetune.FinetuneError`, never `SystemExit`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
from finetune.errors import ConfigError, DataError, RecipeError, RunError

ROOT = Path(__file__).resolve().parent.parent
TINY = {"backbone": "test_efficientnet", "pretrained": False, "workers": 0, "recipe": {"image_size": 32}}


def _readme_block(heading: str) -> str:
    """The first ```python block under `heading` in README.md, as written there."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(f"\n{heading}\n") :]
    section = section[: section.find("\n## ", 1)]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading}"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(make_folder, tmp_path):
    make_folder({"cat": 6, "dog": 6}, name="mydata")
    make_folder({"cat": 2, "dog": 2}, name="holdout")
    script = tmp_path / "example.py"
    script.write_text(_readme_block("## From Python"), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINETUNE_PROGRESS": "0", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    run_dir = Path(lines[0].split()[0])
    assert (tmp_path / run_dir / "run.toml").is_file() and float(lines[0].split()[1]) == 1.0
    assert lines[1].startswith("mydata/cat/") and lines[1].split()[1] == "cat"
    assert lines[-1] == "unknown strategy 'linear-prob' — did you mean linear-probe?"
    assert (tmp_path / run_dir / "eval-holdout" / "evaluation.json").is_file()
    assert len(list((tmp_path / "runs").iterdir())) == 2  # the run and its repetition


@pytest.mark.slow
def test_run_takes_the_options_as_keywords_and_returns_the_run(make_folder, tmp_path):
    data = make_folder({"red": 6, "blue": 6})
    out = tmp_path / "out"
    result = finetune.run(data, out=out, seed=3, val_fraction=0.34, head="svm", cache=False, **TINY)
    assert result.run_dir.parent == out and result.run_dir.is_dir()
    written = json.loads((result.run_dir / "metrics.json").read_text())
    assert result.metrics["val"]["accuracy"] == written["val"]["accuracy"] == 1.0
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["head_kind"] == "svm" and config["backbone"] == "test_efficientnet"
    assert config["preprocessing"]["input_size"] == 32 and result.config.class_names == ("blue", "red")
    split = json.loads((result.run_dir / "split.json").read_text())
    assert split["seed"] == 3 and split["val_fraction"] == 0.34

    rows = finetune.predict(result.run_dir, data / "red")
    assert len(rows) == 6 and {"path", "label", "score"} <= set(rows[0])
    assert all(r["label"] == "red" for r in rows)
    metrics = finetune.evaluate(result.run_dir, data, out=tmp_path / "ev", workers=0)
    assert metrics["accuracy"] == 1.0 and metrics["n"] == 12
    assert (tmp_path / "ev" / "evaluation.json").is_file()


@pytest.mark.parametrize(
    "kwargs, error, needles",
    [
        ({"sed": 1}, ConfigError, ["unknown option 'sed'", "did you mean seed"]),
        ({"seed": "1"}, ConfigError, ["option seed must be an integer"]),
        ({"val_fraction": 2}, ConfigError, ["val_fraction must be a number from 0.05 to 0.9"]),
        ({"recipe": {"epoch": 1}}, ConfigError, ["'epoch'", "did you mean epochs"]),
        ({"recipe": {"epochs": 1}}, ConfigError, ["recipe key 'epochs': not used by the linear-probe"]),
        ({"recipe": {"lr_mult.top": -1}}, ConfigError, ["lr_mult.top", ">= 0"]),
        ({"strategy": "linear-prob"}, RecipeError, ["unknown strategy", "did you mean linear-probe"]),
        ({"device": "tpu"}, finetune.FinetuneError, ["unknown --device 'tpu'"]),
    ],
)
def test_run_mistakes_are_finetune_errors_and_leave_nothing(image_folder, tmp_path, kwargs, error, needles):
    out = tmp_path / "runs"
    with pytest.raises(error) as caught:
        finetune.run(image_folder, out=out, **kwargs)
    for n in needles:
        assert n in str(caught.value), str(caught.value)
    assert not out.exists()


def test_no_data_a_missing_folder_and_a_non_run_are_errors_not_system_exit(tmp_path):
    with pytest.raises(ConfigError, match="no data folder given"):
        finetune.run()
    with pytest.raises(DataError):
        finetune.run(tmp_path / "missing", out=tmp_path / "runs")
    with pytest.raises(RunError, match="does not exist"):
        finetune.evaluate(tmp_path / "no-run", tmp_path)
    with pytest.raises(ConfigError, match="unknown option 'batchsize' — did you mean batch_size"):
        finetune.evaluate(tmp_path, tmp_path, batchsize=8)
    with pytest.raises(ConfigError, match="option batch_size must be an integer >= 1"):
        finetune.evaluate(tmp_path, tmp_path, batch_size=0)
    assert issubclass(ConfigError, finetune.FinetuneError) and not issubclass(ConfigError, SystemExit)


def test_importing_finetune_imports_no_torch():
    code = "import sys, finetune; finetune.FinetuneError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
