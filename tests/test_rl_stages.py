"""GRPO and RLOO on TRL's own trainers, rewarded through the ``reward:`` section, on the demo reversal task.

The GRPO and RLOO runs continue the noisy SFT policy (conftest's ``noisy_sft_run``, the sft-noisy recipe), as
recipes/demo/grpo.yaml and rloo.yaml continue runs/demo-sft-noisy.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import metrics_of, run_cli

from alignkit.data import load_prompt_data
from alignkit.demo.rewards import reversal_reward
from alignkit.errors import RecipeError
from alignkit.generation import generate
from alignkit.models import modeling
from alignkit.recipe.loading import load_recipe
from alignkit.stages import training

NO_CHECKPOINTS = ("train.save_strategy=no",)
RL_STAGES = ("grpo", "rloo")


@pytest.fixture(scope="module")
def start_eval_reward(noisy_sft_run) -> float:
    """The noisy SFT policy's mean reward on the held-out prompts, greedy, computed here without the stage's code."""
    recipe = load_recipe("recipes/demo/grpo.yaml", [f"model.name_or_path={noisy_sft_run}"])
    model, tokenizer = modeling.load_for_inference(recipe.model)
    prompts = list(load_prompt_data(recipe.data).eval["prompt"])
    rewards = reversal_reward(prompts, generate(model, tokenizer, prompts, recipe.evaluate.generation))
    return sum(rewards) / len(rewards)


@pytest.mark.parametrize("stage", RL_STAGES)
def test_the_demo_recipe_continues_the_sft_adapter_and_raises_the_held_out_reward(noisy_sft_run, start_eval_reward,
                                                                                 tmp_path, stage):
    run_dir = tmp_path / stage
    metrics = training.run_stage(load_recipe(f"recipes/demo/{stage}.yaml", [
        f"model.name_or_path={noisy_sft_run}", f"train.output_dir={run_dir}", *NO_CHECKPOINTS]))

    assert metrics == metrics_of(run_dir)
    assert metrics["train/global_step"] == 100
    # The run dir holds the SFT adapter trained further (on the original base), its reward curve and data.
    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"].endswith("tiny-llama")
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "reward.png").is_file()
    assert json.loads((run_dir / "data.json").read_text())["eval_rows"] == metrics[f"{stage}/eval_prompts"] == 200
    for name in ("eval_reward_start", "eval_reward_end", "reward_start", "reward_end"):
        assert 0.0 <= metrics[f"{stage}/{name}"] <= 1.0, metrics
    # The start is the noisy SFT policy itself, measured before the first step.
    assert metrics[f"{stage}/eval_reward_start"] == pytest.approx(start_eval_reward, abs=1e-6)
    # Observed on 2 cores after the recipe's 100 steps: held-out greedy reward 0.171 -> 0.631 (GRPO) and
    # 0.681 (RLOO); the sampled answers' reward (first vs last step) 0.256 -> 0.612 and 0.263 -> 0.619.
    assert metrics[f"{stage}/eval_reward_end"] >= metrics[f"{stage}/eval_reward_start"] + 0.25, metrics
    assert metrics[f"{stage}/reward_end"] >= metrics[f"{stage}/reward_start"] + 0.1, metrics


def test_a_continued_adapter_keeps_a_frozen_copy_as_the_reference(noisy_sft_run, tmp_path):
    """With a KL term (beta > 0) TRL's reference for a run dir's adapter is a frozen copy of that adapter, the
    starting policy, not the bare base; with beta 0 GRPO keeps no reference at all."""
    from trl import GRPOConfig, GRPOTrainer

    def trainer_for(beta: float) -> GRPOTrainer:
        recipe = load_recipe("recipes/demo/grpo.yaml", [f"model.name_or_path={noisy_sft_run}", f"train.beta={beta}"])
        args = training.training_args(recipe, GRPOConfig, tmp_path / "grpo")
        model, tokenizer, peft_config = training.load_model_and_tokenizer(recipe, args)
        assert peft_config is None  # no fresh adapter: the SFT run's own is trained further
        data = load_prompt_data(recipe.data)
        return GRPOTrainer(model=model, args=args, train_dataset=data.eval, processing_class=tokenizer,
                           reward_funcs=[reversal_reward])

    params = dict(trainer_for(0.04).model.named_parameters())
    copies = [(name, name.replace(".default.", ".ref.")) for name in params if ".default." in name]
    assert copies and all(torch.equal(params[a], params[b]) for a, b in copies)
    assert all(params[a].requires_grad and not params[b].requires_grad for a, b in copies)
    assert "ref" not in trainer_for(0.0).model.peft_config


def test_a_reward_model_source_rewards_grpo_next_to_a_weighted_rule(demo_model_path, tmp_path):
    """A reward model (here an untrained one-label classifier on the demo model) as a source, with a fresh
    LoRA adapter on the base and a KL term, whose reference is then the base with the adapter disabled."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward_model = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(demo_model_path, num_labels=1).save_pretrained(reward_model)
    AutoTokenizer.from_pretrained(demo_model_path).save_pretrained(reward_model)
    run_dir = tmp_path / "grpo"
    metrics = training.run_stage(load_recipe("recipes/demo/grpo.yaml", [
        "model.name_or_path=demo:tiny-llama",
        "adapter={method: lora, r: 8, lora_alpha: 16, target_modules: all-linear}",
        f"reward.sources=[{{model: {reward_model}}}, {{function: alignkit.demo.rewards:reversal_reward, weight: 0.5}}]",
        "data.train=[{path: demo:reverse/prompts, split: train, max_rows: 64}]",
        "data.eval=[{path: demo:reverse/prompts, split: test, max_rows: 16}]",
        "train.max_steps=2", "train.logging_steps=1", "train.beta=0.1", f"train.output_dir={run_dir}",
        *NO_CHECKPOINTS]))

    assert metrics["train/global_step"] == 2 and metrics["grpo/eval_prompts"] == 16
    assert all(isinstance(metrics[f"grpo/{name}"], float) for name in ("reward_start", "reward_end",
                                                                         "eval_reward_start", "eval_reward_end"))
    # The source weights reached TRL as its reward_weights, in the order of the sources.
    assert torch.load(run_dir / "training_args.bin", weights_only=False).reward_weights == [1.0, 0.5]


@pytest.mark.parametrize("stage", RL_STAGES)
def test_an_rl_recipe_needs_a_reward_section(tmp_path, stage):
    recipe = tmp_path / f"{stage}.yaml"
    recipe.write_text(yaml.safe_dump({"stage": stage, "model": {"name_or_path": "demo:tiny-llama"},
                                      "data": {"train": [{"path": "demo:reverse/prompts", "split": "train"}]}}))
    with pytest.raises(RecipeError, match="missing section 'reward'"):
        load_recipe(recipe)


@pytest.mark.parametrize("stage", RL_STAGES)
def test_reward_weights_belong_to_the_reward_section(stage):
    with pytest.raises(RecipeError, match=r"train.reward_weights: .*give each of reward.sources a weight"):
        load_recipe(f"recipes/demo/{stage}.yaml", ["train.reward_weights=[1.0]"])


def test_a_bad_reward_import_path_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="not an import path of the form module:function"):
        load_recipe("recipes/demo/grpo.yaml", ["reward.sources=[{function: alignkit.demo.rewards.reversal_reward}]"])
    with pytest.raises(RecipeError, match="cannot import module 'alignkit.demo.no_such_module'"):
        training.run_stage(load_recipe("recipes/demo/rloo.yaml", [
            "reward.sources=[{function: alignkit.demo.no_such_module:reward}]", f"train.output_dir={tmp_path / 'a'}"]))
    # From the command line: one error line and exit status 2, before any model is loaded.
    result = run_cli("grpo", "recipes/demo/grpo.yaml", f"train.output_dir={tmp_path / 'b'}",
                     "reward.sources=[{function: alignkit.demo.rewards:reversal_rewrd}]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "has no 'reversal_rewrd'. Did you mean 'reversal_reward'" in result.stderr
