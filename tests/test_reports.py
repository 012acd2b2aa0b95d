"""Run dir reports: report.md with the measures before and after, PNG charts of the logged curves, TensorBoard
on by default."""

from __future__ import annotations

import json
import math

import pytest
from conftest import RECIPES

from alignkit.recipe.loading import load_recipe
from alignkit.runs import reports
from alignkit.stages import training

PNG = b"\x89PNG\r\n\x1a\n"


def test_before_and_after_pairs_start_with_end_and_compare_with_eval():
    metrics = {"train/loss_start": 4.0, "train/loss_end": 0.5,     # _start with _end
               "rm/accuracy_start": 0.5, "rm/accuracy": 0.9,        # _start with the plain name
               "compare/rouge1": 0.1, "eval/rouge1": 0.8,           # the comparison model against the model
               "compare/only_here": 0.3,                            # no partner: left out
               "ppo/eval_reward_start": None, "ppo/eval_reward_end": 0.4,  # not measured: left out
               "eval/loss_start": math.nan, "eval/loss": 1.0}
    changes = {change.name: change for change in reports.before_and_after(metrics)}
    assert set(changes) == {"train/loss", "rm/accuracy", "eval/rouge1"}
    assert (changes["train/loss"].before, changes["train/loss"].after) == (4.0, 0.5)
    assert (changes["rm/accuracy"].before, changes["rm/accuracy"].after) == (0.5, 0.9)
    assert changes["eval/rouge1"].source == "the comparison model"
    table = "\n".join(reports.render_changes(list(changes.values())))
    assert "| train/loss | 4.0000 | 0.5000 | -3.5000 |" in table
    assert "| rm/accuracy | 0.5000 | 0.9000 | +0.4000 |" in table


def test_a_run_without_both_ends_says_how_to_get_them():
    (line,) = reports.render_changes(reports.before_and_after({"train/loss": 0.3}))
    assert "train.eval_on_start: true" in line and "compare" in line


def test_charts_are_drawn_for_the_keys_the_log_has(tmp_path):
    history = [{"step": 0, "eval_loss": 3.0, "eval_accuracy": 0.5},
               {"step": 10, "loss": 2.0, "reward": 0.1},
               {"step": 20, "loss": float("nan"), "reward": 0.3},  # a non-finite point is left out
               {"step": 20, "eval_loss": 1.0, "eval_accuracy": 0.9},
               {"train_runtime": 3.0}]                               # no step: not a point
    written = reports.write_charts(tmp_path, history)
    assert written == ["loss.png", "reward.png", "accuracy.png"]
    for name in written:
        assert (tmp_path / name).read_bytes().startswith(PNG)
    assert not (tmp_path / "kl.png").exists() and not (tmp_path / "margin.png").exists()
    assert reports.write_charts(tmp_path / "none", [{"step": 1, "learning_rate": 1e-3}]) == []


def test_report_inlines_the_evaluation_one_heading_level_down(tmp_path):
    (tmp_path / "evaluation.md").write_text("# Evaluation\n\n| metric | a |\n\n## Samples\n")
    recipe = {"model": {"name_or_path": "demo:tiny-llama"}, "adapter": {"method": "lora"},
              "train": {"learning_rate": 1e-3}}
    text = reports.render(tmp_path, "sft", recipe, {"eval/exact_match": 1.0, "compare/exact_match": 0.0},
                          ["loss.png"])
    assert text.startswith(f"# sft: `{tmp_path}`")
    assert "- model: `demo:tiny-llama`" in text and "- adapter: lora" in text
    assert "| eval/exact_match | 0.0000 | 1.0000 | +1.0000 | the comparison model |" in text
    assert "![loss](loss.png)" in text
    assert "\n## Evaluation\n" in text and "\n### Samples\n" in text and "\n# Evaluation" not in text


def test_tensorboard_is_the_default_report_to_and_a_recipe_can_change_it():
    assert load_recipe(RECIPES / "demo" / "sft.yaml").train["report_to"] == ["tensorboard"]
    assert load_recipe(RECIPES / "demo" / "ppo.yaml").train["report_to"] == ["tensorboard"]
    assert load_recipe(RECIPES / "demo" / "sft.yaml", ["train.report_to=none"]).train["report_to"] == "none"
    assert load_recipe(RECIPES / "demo" / "sft.yaml", ["train.report_to=[tensorboard, wandb]"]).train["report_to"] \
        == ["tensorboard", "wandb"]
    assert "report_to" not in load_recipe(RECIPES / "demo" / "eval.yaml").train  # the eval stage trains nothing


@pytest.mark.slow
def test_a_training_run_writes_its_report_curves_and_tensorboard_events(tmp_path):
    run_dir = tmp_path / "rm"
    sft = tmp_path / "sft"
    training.run_stage(load_recipe(RECIPES / "demo" / "sft.yaml", [
        f"train.output_dir={sft}", "train.max_steps=60", "train.eval_strategy=no", "evaluate=null"]))
    metrics = training.run_stage(load_recipe(RECIPES / "demo" / "rm.yaml", [
        f"model.name_or_path={sft}", f"train.output_dir={run_dir}", "train.max_steps=100", "train.eval_steps=50",
        "train.logging_steps=10", "train.eval_on_start=true", "train.save_strategy=no"]))

    # The trainer's held-out evaluation before the first step is the "before" of the report.
    assert metrics["rm/accuracy_start"] < metrics["rm/accuracy"]
    assert metrics["eval/loss_start"] > metrics["eval/loss"]
    history = json.loads((run_dir / "log_history.json").read_text())
    assert history == json.loads(json.dumps(history)) and history[0]["step"] == 0 and "eval_accuracy" in history[0]
    assert [e["step"] for e in history if "loss" in e] == list(range(10, 101, 10))
    for name in ("loss.png", "accuracy.png", "margin.png"):
        assert (run_dir / name).read_bytes().startswith(PNG), name
    report = (run_dir / "report.md").read_text()
    before, after = metrics["rm/accuracy_start"], metrics["rm/accuracy"]
    assert f"| rm/accuracy | {before:.4f} | {after:.4f} | {after - before:+.4f} | the start of the run |" in report
    assert "![accuracy](accuracy.png)" in report and "tensorboard --logdir" in report

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = (run_dir / "runs").iterdir()
    events = EventAccumulator(str(events_dir))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == list(range(10, 101, 10))
    assert [event.step for event in events.Scalars("eval/accuracy")] == [0, 50, 100, 100]
