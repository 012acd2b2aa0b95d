"""Pipelines (``alignkit pipeline``): steps validated up front, ``${step.output}`` references, and a pipeline
killed in its second step continued by running it again: the first step is not re-run."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import RECIPES, kill_when_written, run_cli

from alignkit.errors import RecipeError
from alignkit.pipeline import load_pipeline
from alignkit.recipe.loading import load_recipe


def write_pipeline(tmp_path, steps, **extra) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stage": "pipeline", "output_dir": str(tmp_path / "pipeline"), "steps": steps}
                                   | extra, sort_keys=False))
    return str(path)


def sft_then_rm(tmp_path) -> str:
    """The demo SFT (shortened), then the demo reward model started from it, checkpointing every 10 steps."""
    return write_pipeline(tmp_path, [
        {"name": "sft", "recipe": str(RECIPES / "demo" / "sft.yaml"),
         "overrides": {"train.output_dir": str(tmp_path / "sft"), "train.max_steps": 150, "train.save_steps": 50,
                       "train.eval_strategy": "no", "evaluate": None}},
        {"name": "rm", "recipe": str(RECIPES / "demo" / "rm.yaml"),
         "overrides": {"model.name_or_path": "${sft.output}", "train.output_dir": str(tmp_path / "rm"),
                       "train.max_steps": 200, "train.save_steps": 10, "train.eval_strategy": "no"}},
    ])


def test_a_pipeline_killed_in_its_second_step_continues_without_rerunning_the_first(tmp_path):
    pipeline = sft_then_rm(tmp_path)
    kill_when_written(["pipeline", pipeline], tmp_path / "rm" / "checkpoint-20" / "trainer_state.json",
                      tmp_path / "first.log", timeout=600)
    sft_status = json.loads((tmp_path / "sft" / "run.json").read_text())
    assert sft_status["status"] == "complete"
    assert json.loads((tmp_path / "rm" / "run.json").read_text())["status"] == "running"

    again = run_cli("pipeline", pipeline)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pipeline step 'sft'" in again.stderr and "is complete, skipped" in again.stderr
    assert json.loads((tmp_path / "sft" / "run.json").read_text()) == sft_status  # not touched
    rm_status = json.loads((tmp_path / "rm" / "run.json").read_text())
    assert rm_status["status"] == "complete" and rm_status["resumed_from"].startswith("checkpoint-")
    assert int(rm_status["resumed_from"].split("-")[1]) >= 20
    assert json.loads((tmp_path / "rm" / "metrics.json").read_text())["train/global_step"] == 200
    report = (tmp_path / "pipeline" / "report.md").read_text()
    assert "| sft | sft |" in report and "complete before, skipped" in report
    assert "| rm | rm |" in report and "resumed and completed" in report
    assert "rm/accuracy" in report
    summary = json.loads((tmp_path / "pipeline" / "pipeline.json").read_text())
    assert [s["outcome"] for s in summary["steps"]] == ["complete before, skipped", "resumed and completed"]

    # A step changed since its run completed is not silently skipped.
    changed = run_cli("pipeline", pipeline, "sft.train.learning_rate=1e-4")
    assert changed.returncode == 2 and "step 'sft'" in changed.stderr and "train.learning_rate" in changed.stderr


def test_every_step_is_validated_before_anything_runs(tmp_path):
    steps = [{"name": "sft", "recipe": str(RECIPES / "demo" / "sft.yaml")},
             {"name": "dpo", "recipe": str(RECIPES / "demo" / "dpo.yaml"),
              "overrides": {"train.learning_rat": 1e-4}}]
    result = run_cli("pipeline", write_pipeline(tmp_path, steps))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "step 'dpo'" in result.stderr and "learning_rat" in result.stderr and "learning_rate" in result.stderr
    assert not (tmp_path / "pipeline").exists()


@pytest.mark.parametrize("steps, message", [
    ([{"name": "rm", "recipe": str(RECIPES / "demo" / "rm.yaml"),
       "overrides": {"model.name_or_path": "${sft.output}"}}], "${sft.output} names no earlier step"),
    ([{"name": "a", "recipe": str(RECIPES / "demo" / "sft.yaml")},
      {"name": "a", "recipe": str(RECIPES / "demo" / "sft-full.yaml")}], "two steps are called 'a'"),
    ([{"name": "a", "recipe": str(RECIPES / "demo" / "sft.yaml")},
      {"name": "b", "recipe": str(RECIPES / "demo" / "sft.yaml")}], "as an earlier step does"),
    ([{"name": "a", "recipie": "sft.yaml"}], "unknown key 'recipie'"),
])
def test_bad_pipelines_are_clear_errors(tmp_path, steps, message):
    with pytest.raises(RecipeError, match=message.replace("$", r"\$").replace("{", r"\{").replace("}", r"\}")):
        load_pipeline(write_pipeline(tmp_path, steps))


def test_inline_steps_get_their_own_run_dirs_and_overrides_address_steps_by_name(tmp_path):
    first_inline = {"extends": str(RECIPES / "demo" / "sft.yaml"), "train": {"max_steps": 5}}
    second_inline = {"extends": str(RECIPES / "demo" / "dpo.yaml"), "model": {"name_or_path": "${first.output}"}}
    path = write_pipeline(tmp_path, [{"name": "first", "recipe": first_inline},
                                     {"name": "second", "recipe": second_inline}])
    pipeline = load_pipeline(path, ["second.train.max_steps=7"])
    first, second = (step.recipe for step in pipeline.steps)
    assert first.output_dir == tmp_path / "pipeline" / "first"
    assert second.model.name_or_path == str(tmp_path / "pipeline" / "first")
    assert second.output_dir == tmp_path / "pipeline" / "second"  # not dpo.yaml's runs/demo-dpo
    assert (first.train["max_steps"], second.train["max_steps"]) == (5, 7)
    with pytest.raises(RecipeError, match="a pipeline takes <step>.<key>=value"):
        load_pipeline(path, ["third.train.max_steps=1"])


def test_the_demo_pipeline_validates_and_a_stage_command_points_to_pipeline(capsys):
    result = run_cli("validate", str(RECIPES / "demo" / "pipeline.yaml"))
    assert result.returncode == 0 and "valid pipeline of 6 steps" in result.stderr
    assert "rm: rm -> runs/demo/rm" in result.stdout and "eval-dpo: eval -> runs/demo/eval-dpo" in result.stdout
    wrong = run_cli("sft", str(RECIPES / "demo" / "pipeline.yaml"))
    assert wrong.returncode == 2 and "alignkit pipeline FILE" in wrong.stderr
    with pytest.raises(RecipeError, match="pipeline recipe"):
        load_recipe(RECIPES / "demo" / "pipeline.yaml")
