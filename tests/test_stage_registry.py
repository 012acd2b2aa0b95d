"""The stage registry is the one description of a stage: a stage registered there and nowhere else is parsed,
run, validated and planned by the CLI; a name the registry does not hold is an error everywhere, never a
fallback to some other stage's behaviour; the Makefile's stage targets are the registry's stages."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from alignkit import stages
from alignkit.cli import build_parser, main
from alignkit.data import load_sft_data
from alignkit.errors import RecipeError
from alignkit.plan import planner
from alignkit.plan.memory import Launch, Shape
from alignkit.recipe.loading import load_recipe

ROOT = Path(__file__).parents[1]
DEMO_SFT = ROOT / "recipes" / "demo" / "sft.yaml"


def _run_throwaway(recipe, run_dir) -> dict:
    (run_dir.path / "ran.txt").write_text(recipe.stage)
    return {"toy/ran": 1.0}


@pytest.fixture
def throwaway_stage(monkeypatch) -> stages.Stage:
    """A stage built here and registered in the one place a stage is registered: a module holding its
    ``STAGE``, named in ``stages.STAGES``. Its facts differ from sft's where the planner reads them."""
    from trl import SFTConfig

    stage = stages.Stage(name="toy", help="a throwaway stage of the registry test", train_config=lambda: SFTConfig,
                         run=_run_throwaway, load_data=load_sft_data, sequences_per_row=2)
    module = types.ModuleType("throwaway_stage")
    module.STAGE = stage
    monkeypatch.setitem(sys.modules, "throwaway_stage", module)
    monkeypatch.setitem(stages.STAGES, "toy", "throwaway_stage")
    return stage


def _recipe(tmp_path: Path, stage: str) -> Path:
    """The demo SFT recipe as a ``stage`` recipe writing into ``tmp_path``."""
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump({"extends": str(DEMO_SFT), "stage": stage,
                                    "train": {"output_dir": str(tmp_path / "run"), "max_steps": 5}}))
    return path


def test_a_stage_registered_in_one_place_is_parsed_run_validated_and_planned(throwaway_stage, tmp_path, capsys):
    path = _recipe(tmp_path, "toy")
    args = build_parser().parse_args(["toy", str(path), "train.max_steps=3"])
    assert args.command == "toy" and args.overrides == ["train.max_steps=3"]

    assert main(["validate", str(path)]) == 0
    assert f"{path}: valid toy recipe" in capsys.readouterr().err

    assert main(["plan", str(path), "--device", "cpu", "--json"]) == 0
    toy = json.loads(capsys.readouterr().out)
    assert main(["plan", str(_recipe(tmp_path, "sft")), "--device", "cpu", "--json"]) == 0
    sft = json.loads(capsys.readouterr().out)
    assert toy["stage"] == "toy"
    assert toy["data"]["train_rows"] == sft["data"]["train_rows"] > 0  # read with the loader the Stage names
    assert (toy["shape"]["sequences_per_row"], sft["shape"]["sequences_per_row"]) == (2, 1)
    assert (toy["shape"]["fused_head"], sft["shape"]["fused_head"]) == (False, True)

    assert main(["toy", str(path)]) == 0
    run_dir = tmp_path / "run"
    assert (run_dir / "ran.txt").read_text() == "toy"
    assert json.loads((run_dir / "metrics.json").read_text())["toy/ran"] == 1.0


def test_an_unregistered_stage_is_an_error_in_the_parser_validation_and_the_planner(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["toy", "recipe.yaml"])
    capsys.readouterr()
    path = _recipe(tmp_path, "toy")
    for command in ("validate", "plan"):
        assert main([command, str(path)]) == 2
        assert "unknown stage 'toy'" in capsys.readouterr().err
    # A recipe whose stage left the registry: the planner asks the registry, and does not guess a data loader.
    recipe = dataclasses.replace(load_recipe(DEMO_SFT), stage="toy")
    with pytest.raises(RecipeError, match="unknown stage 'toy'"):
        planner.data_summary(recipe, Shape(batch=1, length=8, gradient_accumulation=1, checkpointing=False,
                                           optimizer="adamw_torch", mixed_precision=None), Launch())


def test_the_makefile_has_a_target_for_every_registered_stage_and_no_other():
    line = re.search(r"^STAGES = (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert line is not None
    assert line.group(1).split() == list(stages.STAGES)
