"""The wheel is the product, and the command line speaks one language (issue 17).

The full wheel check (install in a fresh venv, run from another folder) is `.ci/wheel-check`, run by
`.ci/run`; here: what the wheel holds, and what `--help`, `--version` and `recipes --keys` say.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.conftest import invoke

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> dict:
    import typer.main

    from finetune.cli import app

    group = typer.main.get_command(app)
    out = {}
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            out[name] = cmd
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(ROOT),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.skip(f"cannot build a wheel offline here: {res.stderr.strip().splitlines()[-1:]}")
    return next(out.glob("finetune-*.whl"))


def test_the_wheel_holds_every_package_the_recipes_and_tomli_for_python_310(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in ("linear-probe", "stage-probe", "partial-finetune", "full-finetune"):
        assert f"finetune/recipe_files/{recipe}.toml" in names
    packages = {
        str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "finetune").rglob("__init__.py")
    }
    assert packages <= {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("__init__.py")}
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert re.search(r"Requires-Dist: tomli.*python_version < \"3\.11\"", metadata), metadata


def test_pyproject_lists_every_subpackage():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {
        str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "finetune").rglob("__init__.py")
    }
    assert found <= listed


def test_version():
    from importlib.metadata import version

    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"finetune {version('finetune')}"


def test_help_shows_no_python_types_and_names_arguments_alike():
    for name in _commands():
        res = invoke(*name.split(), "--help")
        assert res.exit_code == 0, (name, res.output)
        assert not re.search(r"<(list\[|str>|int>|float>|path>|Path>)", res.output), (name, res.output)
    for name in ("check", "advise", "compare", "extract-features"):
        assert f" {name} [OPTIONS] {{DATA}}" in invoke(name, "--help").output
    assert " run [OPTIONS] [DATA]" in invoke("run", "--help").output  # or `data` in its --config file
    for name in ("evaluate", "export"):
        assert f" {name} [OPTIONS] {{RUN}}" in invoke(name, "--help").output


def test_shared_options_have_one_name_and_one_range():
    def option(cmd, flag):
        return next((p for p in cmd.params if flag in p.opts or flag in p.secondary_opts), None)

    commands = _commands()
    for name in ("run", "extract-features"):
        p = option(commands[name], "--pretrained")
        assert p is not None and "--no-pretrained" in p.secondary_opts, name
    ranges = {}
    for flag in ("--val-fraction", "--workers", "--seed", "--device"):
        for cmd in commands.values():
            p = option(cmd, flag)
            if p is not None:
                ranges.setdefault(flag, set()).add(
                    (getattr(p, "min", None), getattr(p, "max", None), p.metavar)
                )
    assert ranges["--val-fraction"] == {(0.05, 0.9, "F")}
    assert ranges["--workers"] == {(0, None, "N")}
    assert ranges["--seed"] == {(0, 2**32 - 1, "N")}
    assert ranges["--device"] == {(None, None, "DEVICE")}


def test_recipes_keys_lists_every_set_key_with_the_methods_that_use_it():
    import dataclasses

    from finetune.recipes import LRMult, Recipe

    res = invoke("recipes", "--keys")
    assert res.exit_code == 0
    header, rule, *lines = res.output.splitlines()
    assert header.split() == ["key", "values", "used", "by", "default"] and set(rule) == {"─"}
    keys = {ln.split()[0]: ln for ln in lines}
    column = header.index("used by")  # aligned: the augment policies once ran into this column
    assert all(ln[column - 1] == " " and ln[column] != " " for ln in lines), lines
    expected = {f.name for f in dataclasses.fields(Recipe) if f.name != "lr_mult"}
    expected |= {f"lr_mult.{f.name}" for f in dataclasses.fields(LRMult)}
    assert set(keys) == expected
    assert "finetune" in keys["epochs"] and "probe" not in keys["epochs"].split()[-2]
    assert "sgd | adamw" in keys["optimizer"]


def test_the_readme_names_the_cpu_wheel_index_of_pytorch():
    readme = (ROOT / "README.md").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in readme
