"""End to end: the README's demo SFT learns the task; interrupted runs resume; finished runs are kept."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from alignkit.data import load_sft_data
from alignkit.evaluation import evaluate_generations, split_conversation
from alignkit.recipe.loading import load_recipe

DEMO_SFT = "recipes/demo/sft.yaml"


def test_demo_sft_learns_reversal_from_a_base_that_cannot(tmp_path, demo_model_path):
    """The acceptance test of the README's first command: exact match >= 0.9 on held-out prompts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "demo-sft"
    result = run_cli("sft", DEMO_SFT, f"train.output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval/exact_match"] >= 0.9, metrics
    assert metrics["eval/samples"] == 200
    assert metrics["train/loss_end"] < 0.1 * metrics["train/loss_start"]

    # The untrained base, scored the same way on the same held-out prompts, is near 0.
    recipe = load_recipe(REPO / DEMO_SFT)
    held_out = load_sft_data(recipe.data).eval
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    base = AutoModelForCausalLM.from_pretrained(demo_model_path)
    base_metrics = evaluate_generations(base, tokenizer, held_out, recipe.evaluate)
    assert base_metrics["eval/exact_match"] <= 0.05, base_metrics

    # The run dir holds what a user needs, and the saved adapter reproduces the logged predictions.
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml",
                 "metrics.json", "run.json", "data.json", "predictions.jsonl"):
        assert (run_dir / name).is_file(), name
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "complete" and status["world_size"] == 1
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["output_dir"] == str(run_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_path), run_dir)
    first = json.loads((run_dir / "predictions.jsonl").read_text().splitlines()[0])
    again = evaluate_generations(reloaded, AutoTokenizer.from_pretrained(run_dir), held_out.select(range(1)),
                                 recipe.evaluate)
    assert again["eval/exact_match"] == float(first["prediction"] == first["reference"])
    assert split_conversation(held_out[0]["messages"])[1] == first["reference"]


def test_finished_run_is_not_overwritten_without_asking(tmp_path):
    run_dir = tmp_path / "run"
    args = ("sft", DEMO_SFT, f"train.output_dir={run_dir}", "train.max_steps=5", "train.eval_strategy=no",
            "train.save_strategy=no", "evaluate.max_samples=4")
    assert run_cli(*args).returncode == 0
    adapter = (run_dir / "adapter_model.safetensors").read_bytes()

    again = run_cli(*args)
    assert again.returncode == 2
    assert "finished sft run" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert (run_dir / "adapter_model.safetensors").read_bytes() == adapter  # untouched

    replaced = run_cli(*args, "train.learning_rate=1e-4", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert (run_dir / "adapter_model.safetensors").read_bytes() != adapter


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("sft", DEMO_SFT, f"train.output_dir={tmp_path}")
    assert result.returncode == 2
    assert "not an alignkit run" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _kill_after_first_checkpoint(run_dir: Path) -> None:
    """Start the demo SFT (120 steps, a checkpoint every 40) and SIGKILL it once checkpoint-40 is complete."""
    log = run_dir.parent / "killed-run.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "alignkit", "sft", DEMO_SFT, f"train.output_dir={run_dir}", "train.max_steps=120",
             "train.save_steps=40", "train.eval_strategy=no", "evaluate.max_samples=8"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
        )
        deadline = time.time() + 300
        while not (run_dir / "checkpoint-40" / "trainer_state.json").exists():
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.time() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)  # as a lost node would: no chance to clean up
        process.wait()


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    _kill_after_first_checkpoint(run_dir)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    resumed = run_cli("sft", DEMO_SFT, f"train.output_dir={run_dir}", "train.max_steps=120", "train.save_steps=40",
                      "train.eval_strategy=no", "evaluate.max_samples=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "complete"
    assert status["resumed_from"] in ("checkpoint-40", "checkpoint-80")
    state = json.loads((run_dir / "checkpoint-120" / "trainer_state.json").read_text())
    assert state["global_step"] == 120
    # The resumed run continued the step count instead of starting again from zero.
    assert json.loads((run_dir / "metrics.json").read_text())["train/global_step"] == 120


def test_unfinished_run_with_a_changed_recipe_needs_resume_flag(tmp_path):
    run_dir = tmp_path / "run"
    _kill_after_first_checkpoint(run_dir)

    changed = ("sft", DEMO_SFT, f"train.output_dir={run_dir}", "train.max_steps=60", "train.save_steps=40",
               "train.eval_strategy=no", "evaluate.max_samples=8")
    refused = run_cli(*changed)
    assert refused.returncode == 2
    assert "train.max_steps" in refused.stderr and "--resume" in refused.stderr

    forced = run_cli(*changed, "--resume")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["train/global_step"] == 60


PACKING_OPTIONS = [["train.packing=true"], ["train.padding_free=true", "train.max_length=null"]]


@pytest.mark.parametrize("options", PACKING_OPTIONS)
def test_packing_and_padding_free_train(tmp_path, options):
    result = run_cli("sft", DEMO_SFT, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=30",
                     *options, "train.logging_steps=5", "train.eval_strategy=no", "train.save_strategy=no",
                     "evaluate.max_samples=8")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train/loss_end"] < metrics["train/loss_start"]


def test_conflicting_trainer_options_are_a_recipe_error(tmp_path):
    """TRL rejects padding_free without packing when max_length is set: reported without a traceback."""
    result = run_cli("sft", DEMO_SFT, f"train.output_dir={tmp_path / 'run'}", "train.padding_free=true")
    assert result.returncode == 2
    assert "error: train:" in result.stderr and "max_length" in result.stderr
    assert "Traceback" not in result.stderr
