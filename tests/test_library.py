"""``alignkit recipes``: the shipped library listed, and recipes copied out as standalone templates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml
from conftest import RECIPES, REPO

from alignkit.cli import main
from alignkit.pipeline import is_pipeline
from alignkit.recipe.library import copy_recipe, shipped_recipes
from alignkit.recipe.loading import load_recipe

SHIPPED = sorted(p for p in RECIPES.rglob("*.yaml") if "_base" not in p.parts)


def test_every_shipped_recipe_is_listed_with_its_stage_and_summary(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(SHIPPED)
    listed = {line.split()[0]: line.split()[1] for line in lines}
    for path in SHIPPED:
        name = path.relative_to(RECIPES).with_suffix("").as_posix()
        assert listed[name] == ("pipeline" if is_pipeline(path) else load_recipe(path).stage)
    assert all(recipe.summary for recipe in shipped_recipes())  # every recipe starts with a comment
    assert main(["recipes", "mistral"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "mistral-7b/dpo-qlora", "mistral-7b/sft-qlora"]


def test_a_copy_stands_alone_and_resolves_to_the_same_recipe(tmp_path, capsys):
    # demo/dpo extends _base/demo.yaml: the copy carries the merged settings, not the extends
    assert main(["recipes", "--copy", "demo/dpo", str(tmp_path / "mine.yaml")]) == 0
    assert "alignkit validate" in capsys.readouterr().out
    copied = (tmp_path / "mine.yaml").read_text()
    assert "extends" not in yaml.safe_load(copied)
    assert copied.startswith("# Demo DPO from the demo SFT run") and "Copied from recipes/demo/dpo.yaml" in copied
    original = load_recipe(RECIPES / "demo" / "dpo.yaml").to_dict()
    assert load_recipe(tmp_path / "mine.yaml").to_dict() == original


def test_copy_into_a_folder_keeps_the_name_and_never_overwrites(tmp_path, capsys):
    written = copy_recipe("mistral-7b/sft-qlora.yaml", tmp_path)
    assert written == tmp_path / "sft-qlora.yaml"
    assert load_recipe(written).model.chat_template == load_recipe(RECIPES / "mistral-7b" / "sft-qlora.yaml") \
        .model.chat_template  # the inline Jinja template survives the YAML round trip
    assert main(["recipes", "--copy", "mistral-7b/sft-qlora", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["recipes", "--copy", "mistral-7b/sft-qlora", str(tmp_path), "--overwrite"]) == 0


def test_an_unknown_recipe_name_suggests_the_nearest(tmp_path, capsys):
    assert main(["recipes", "--copy", "qwen2.5-0.5b/sft-qloar", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no shipped recipe 'qwen2.5-0.5b/sft-qloar'" in err and "qwen2.5-0.5b/sft-qlora" in err


def _run(*command, **kwargs) -> str:
    """Run ``command``; fail the test with the end of its stderr unless it exits 0. Returns its stdout."""
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
    return result.stdout


def test_a_wheel_installed_outside_the_checkout_carries_the_library_and_runs_a_copied_recipe(tmp_path):
    # `pip install .` as a user does it: a wheel built from the sources (in a copy, so the build leaves nothing in
    # the checkout), installed without its dependencies into a fresh venv that borrows them from this one, and run
    # from a folder that is not the checkout.
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("src", "recipes"):
        shutil.copytree(REPO / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source)
    [wheel] = (tmp_path / "dist").glob("alignkit-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    site_packages = Path(_run(venv / "bin" / "python", "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # The dependencies: this venv's site-packages as a plain path entry (its own .pth files, among them the
    # editable install's link to the checkout's src/, are not read).
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(*pip, "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", wheel)

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ALIGNKIT_RECIPES")}
    where = _run(venv / "bin" / "python", "-c", "import alignkit, alignkit.recipe.library as library; "
                 "print(alignkit.__file__); print(library.library_dir())", cwd=work, env=env).split()
    assert all(Path(path).is_relative_to(site_packages) for path in where), where  # not the checkout's
    listed = _run(venv / "bin" / "alignkit", "recipes", cwd=work, env=env).splitlines()
    assert [line.split()[0] for line in listed] == [recipe.name for recipe in shipped_recipes()]  # all of them
    _run(venv / "bin" / "alignkit", "recipes", "--copy", "demo/sft", "x.yaml", cwd=work, env=env)
    _run(venv / "bin" / "alignkit", "sft", "x.yaml", "train.max_steps=5", cwd=work, env=env, timeout=300)
    assert json.loads((work / "runs" / "demo-sft" / "metrics.json").read_text())["train/global_step"] == 5
