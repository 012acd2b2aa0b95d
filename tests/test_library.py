"""``alignkit recipes``: the shipped library listed, and recipes copied out as standalone templates."""

from __future__ import annotations

import yaml
from conftest import RECIPES

from alignkit.cli import main
from alignkit.library import copy_recipe, shipped_recipes
from alignkit.pipeline import is_pipeline
from alignkit.recipe import load_recipe

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
