"""Reward modelling, DPO (every loss type), KTO and ORPO on the demo, and the reward model as a judge.

One demo SFT run is shared by the module: the RM starts from it (merged), DPO and KTO train its adapter
further. Observed on 2 cores with the shipped recipes: rm/accuracy 0.98; DPO reward accuracy 0.96 with
exact match 0.985 (SFT: 1.0); KTO margin 0 -> 0.23; ORPO exact match 0.0 -> 1.0; win rate of the SFT model
over its base, judged by the RM: 1.0.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import metrics_of, run_cli, run_ok

from alignkit.data import load_preference_data
from alignkit.errors import RecipeError
from alignkit.evaluation import evaluate_generations
from alignkit.feedback import RewardModel, RewardModelJudge, win_rates
from alignkit.models import modeling
from alignkit.recipe.loading import load_recipe
from alignkit.recipe.settings import ModelSettings
from alignkit.stages import training
from alignkit.stages.preference import LOSS_TYPES

NO_CHECKPOINTS = ("train.save_strategy=no", "train.eval_strategy=no")


@pytest.fixture(scope="module")
def rm_run(demo_sft_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pref") / "rm"
    run_ok("rm", "recipes/demo/rm.yaml", f"model.name_or_path={demo_sft_run}", f"train.output_dir={run_dir}",
           *NO_CHECKPOINTS)
    return run_dir


def test_reward_model_ranks_held_out_pairs(rm_run):
    metrics = metrics_of(rm_run)
    assert metrics["rm/accuracy"] >= 0.9 and metrics["rm/margin"] > 0, metrics

    # The run dir loads back as a scorer that agrees with the stage's own numbers.
    scorer = RewardModel.load(rm_run)
    pairs = load_preference_data(load_recipe("recipes/demo/rm.yaml").data, kind="pairs").eval
    chosen = scorer.score(pairs["prompt"], [c[0]["content"] for c in pairs["chosen"]])
    rejected = scorer.score(pairs["prompt"], [r[0]["content"] for r in pairs["rejected"]])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    assert accuracy == pytest.approx(metrics["rm/accuracy"], abs=1.01 / len(chosen))  # a near-tie may flip

    judge = RewardModelJudge(scorer)
    preferences = judge.compare(pairs["prompt"], [c[0]["content"] for c in pairs["chosen"]],
                                [r[0]["content"] for r in pairs["rejected"]])
    # Bradley-Terry probabilities of the same rewards: sigmoid(r_chosen - r_rejected).
    assert preferences == pytest.approx([1 / (1 + math.exp(r - c)) for c, r in zip(chosen, rejected)])
    rates = win_rates(preferences)
    assert rates["win_rate"] == pytest.approx(accuracy) and sum(rates.values()) == pytest.approx(1.0)


def test_win_rate_of_the_fine_tune_over_its_base(demo_sft_run, rm_run, tmp_path):
    out = tmp_path / "eval"
    run_ok("eval", "recipes/demo/eval.yaml", f"model.name_or_path={demo_sft_run}", f"train.output_dir={out}",
           "evaluate.compare=base", f"evaluate.judge={rm_run}")
    metrics = metrics_of(out)
    assert metrics["eval/win_rate"] >= 0.9 and metrics["eval/loss_rate"] <= 0.05, metrics
    assert f"Judged by `{rm_run}`" in (out / "report.md").read_text()


def test_win_rates_count_ties_within_the_margin():
    # Preference probabilities: within 0.5 +- tie_margin is a tie.
    assert win_rates([0.9, 0.2, 0.55, 0.5], tie_margin=0.1) == {"win_rate": 0.25, "tie_rate": 0.5,
                                                                  "loss_rate": 0.25}
    assert win_rates([0.9, 0.2, 0.55, 0.5]) == {"win_rate": 0.5, "tie_rate": 0.25, "loss_rate": 0.25}
    with pytest.raises(ValueError, match="no comparisons"):
        win_rates([])


def test_dpo_from_the_sft_run_learns_the_preferences_and_keeps_the_skill(demo_sft_run, tmp_path):
    run_dir = tmp_path / "dpo"
    run_ok("dpo", "recipes/demo/dpo.yaml", f"model.name_or_path={demo_sft_run}", f"train.output_dir={run_dir}",
           f"evaluate.compare={demo_sft_run}", *NO_CHECKPOINTS)
    metrics = metrics_of(run_dir)
    assert metrics["dpo/reward_accuracy"] >= 0.9 and metrics["dpo/margin"] > 0, metrics
    assert metrics["compare/exact_match"] >= 0.9, metrics  # the SFT model
    assert metrics["eval/exact_match"] >= metrics["compare/exact_match"] - 0.05, metrics
    # The DPO run dir loads for inference as one adapter on the original base.
    model, _ = modeling.load_for_inference(load_recipe("recipes/demo/eval.yaml",
                                                       [f"model.name_or_path={run_dir}"]).model)
    assert model.peft_config["default"].base_model_name_or_path.endswith("tiny-llama")


def test_dpo_from_a_run_dir_starts_from_its_adapter_with_a_frozen_copy_as_reference(demo_sft_run, tmp_path):
    from trl import DPOConfig, DPOTrainer

    recipe = load_recipe("recipes/demo/dpo.yaml", [f"model.name_or_path={demo_sft_run}", *NO_CHECKPOINTS])
    args = training.training_args(recipe, DPOConfig, tmp_path / "dpo")
    model, tokenizer, peft_config = training.load_model_and_tokenizer(recipe, args)
    assert peft_config is None  # no fresh adapter: the SFT one is trained further

    # Before any DPO step the policy already solves the task: it is the SFT model, not the bare base.
    data = load_preference_data(recipe.data, kind="pairs")
    held_out = data.eval.select(range(50)).map(lambda row: {"messages": row["prompt"] + row["chosen"]},
                                               remove_columns=data.eval.column_names)
    assert evaluate_generations(model, tokenizer, held_out, recipe.evaluate)["eval/exact_match"] >= 0.9
    with model.disable_adapter():
        assert evaluate_generations(model, tokenizer, held_out, recipe.evaluate)["eval/exact_match"] <= 0.05

    trainer = training.build_trainer(DPOTrainer, model=model, args=args, train_dataset=data.eval,
                                     processing_class=tokenizer)
    params = dict(trainer.model.named_parameters())
    copies = [(name, name.replace(".default.", ".ref.")) for name in params if ".default." in name]
    assert copies and all(torch.equal(params[a], params[b]) for a, b in copies)
    assert all(params[a].requires_grad and not params[b].requires_grad for a, b in copies)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_dpo_loss_type_trains(demo_sft_run, tmp_path, loss_type):
    logging.disable(logging.WARNING)
    overrides = [f"model.name_or_path={demo_sft_run}", f"train.output_dir={tmp_path / 'run'}",
                 f"train.loss_type=[{loss_type}]", "train.max_steps=3", "train.warmup_steps=0",
                 "train.logging_steps=1", "data.train=[{path: demo:reverse/preference, split: train, max_rows: 96}]",
                 "data.eval=[]", "evaluate=null", *NO_CHECKPOINTS]
    if loss_type == "exo_pair":
        overrides.append("train.label_smoothing=1e-3")  # EXO needs it; TRL says so (see the next test)
    try:
        metrics = training.run_stage(load_recipe("recipes/demo/dpo.yaml", overrides))
    finally:
        logging.disable(logging.NOTSET)
    assert metrics["train/global_step"] == 3
    assert metrics["train/loss_end"] != metrics["train/loss_start"]


def test_dpo_options_are_checked_before_training(demo_sft_run):
    with pytest.raises(RecipeError, match="unknown DPO loss 'sigmod'. Did you mean 'sigmoid'"):
        load_recipe("recipes/demo/dpo.yaml", ["train.loss_type=[sigmod]"])
    with pytest.raises(RecipeError, match="run_adapter is 'continue'.*remove adapter.method"):
        load_recipe("recipes/demo/dpo.yaml", [f"model.name_or_path={demo_sft_run}", "adapter.method=lora"])
    with pytest.raises(RecipeError, match="quantised base cannot hold"):
        load_recipe("recipes/demo/dpo-qlora.yaml", [f"model.name_or_path={demo_sft_run}", "model.run_adapter=merge"])
    result = run_cli("dpo", "recipes/demo/dpo.yaml", f"model.name_or_path={demo_sft_run}", "train.loss_type=[exo_pair]",
                     "train.output_dir=/nonexistent/never-written")
    assert result.returncode == 2 and "Label smoothing must be greater than 0.0" in result.stderr


def test_rm_from_a_run_dir_needs_merge(demo_sft_run, tmp_path):
    result = run_cli("rm", "recipes/demo/rm.yaml", f"model.name_or_path={demo_sft_run}", "model.run_adapter=continue",
                     f"train.output_dir={tmp_path / 'rm'}")
    assert result.returncode == 2 and "set model.run_adapter: merge" in result.stderr


def test_dpo_qlora_trains_the_sft_adapter_on_a_4bit_base(demo_sft_run, tmp_path):
    from trl import DPOConfig

    recipe = load_recipe("recipes/demo/dpo-qlora.yaml", [f"model.name_or_path={demo_sft_run}"])
    args = training.training_args(recipe, DPOConfig, tmp_path / "q")
    model, _, _ = training.load_model_and_tokenizer(recipe, args)
    assert modeling.is_quantized(model.get_base_model())

    run_dir = tmp_path / "dpo-qlora"
    run_ok("dpo", "recipes/demo/dpo-qlora.yaml", f"model.name_or_path={demo_sft_run}", f"train.output_dir={run_dir}",
           "train.max_steps=100", "evaluate.compare=null", *NO_CHECKPOINTS)
    metrics = metrics_of(run_dir)
    # Observed: reward accuracy 0.95, margin 0.76, exact match 0.995 after 100 steps.
    assert metrics["dpo/reward_accuracy"] >= 0.8 and metrics["dpo/margin"] > 0, metrics
    assert metrics["eval/exact_match"] >= 0.9, metrics


def test_kto_moves_the_margin_between_desirable_and_undesirable(demo_sft_run, tmp_path):
    run_dir = tmp_path / "kto"
    run_ok("kto", "recipes/demo/kto.yaml", f"model.name_or_path={demo_sft_run}", f"train.output_dir={run_dir}",
           *NO_CHECKPOINTS)
    metrics = metrics_of(run_dir)
    # The policy starts equal to its reference (margin 0); observed after 200 steps: 0.21 (demo model built
    # here), 0.12 (built with seed 1).
    assert metrics["kto/margin"] > 0.05, metrics
    assert metrics["kto/reward_desirable"] > metrics["kto/reward_undesirable"], metrics
    assert metrics["train/loss_end"] < metrics["train/loss_start"], metrics
    # The SFT policy reverses (~1.0) and KTO keeps most of it. Each machine builds its own demo model, and the
    # figures move with it: 0.98 here, 1.0 on a build with seed 1, 0.80 on CI's machine.
    assert metrics["eval/exact_match"] >= 0.7, metrics


def test_orpo_learns_the_task_from_the_base(tmp_path):
    run_dir = tmp_path / "orpo"
    run_ok("orpo", "recipes/demo/orpo.yaml", f"train.output_dir={run_dir}", *NO_CHECKPOINTS)
    metrics = metrics_of(run_dir)
    # Base 0.0. ORPO's exact match after 400 steps depends on the demo model, which each machine builds for
    # itself: 1.0 here (reward accuracy 1.0, loss 5.02 -> 2.00), 0.75 on CI's machine, 0.285 on a build with
    # seed 1 (reward accuracy 0.98, loss 5.56 -> 2.39; 0.5 after 800 steps). What holds on every build: it
    # prefers the right reversal to its corruptions and completes a share of reversals the base never does.
    assert metrics["eval/exact_match"] >= 0.2 and metrics["compare/exact_match"] <= 0.05, metrics
    assert metrics["orpo/reward_accuracy"] >= 0.9, metrics
    assert metrics["train/loss_end"] < metrics["train/loss_start"] - 1, metrics


def test_a_run_dir_not_written_yet_validates_but_does_not_load(tmp_path):
    # Recipes that start from runs/demo-sft validate before `make sft` (CI checks every shipped recipe)...
    recipe = load_recipe("recipes/demo/dpo-qlora.yaml", ["model.name_or_path=runs/never-made"])
    assert recipe.adapter["method"] == "none" and recipe.model.quantization is not None
    # ... and running one before its input run exists says what to do, without a traceback.
    result = run_cli("dpo", "recipes/demo/dpo.yaml", "model.name_or_path=runs/never-made",
                     f"train.output_dir={tmp_path / 'dpo'}")
    assert result.returncode == 2 and "run the recipe that writes it first" in result.stderr
    assert "Traceback" not in result.stderr


FOUR_BIT = "model.quantization={bits: 4, compute_dtype: float32}"


@pytest.mark.parametrize("adapter", [["adapter={method: none}"], ["adapter={method: qlora}", FOUR_BIT]],
                         ids=["full", "qlora"])
def test_reward_model_trains_fully_or_on_a_4bit_base_and_loads_back(tmp_path, adapter):
    run_dir = tmp_path / "rm"
    run_ok("rm", "recipes/demo/rm.yaml", "model.name_or_path=demo:tiny-llama", *adapter, "train.max_steps=200",
           "data.eval=[{path: demo:reverse/preference, split: test, max_rows: 64}]", f"train.output_dir={run_dir}",
           *NO_CHECKPOINTS)
    metrics = metrics_of(run_dir)
    assert metrics["train/loss_end"] < metrics["train/loss_start"], metrics
    # 200 steps from the bare base only start the learning (observed 0.56 full, 0.63 QLoRA on 64 pairs); the
    # accuracy bar is the shipped recipe's test above. Here: it trains, saves, and loads back as a scorer.
    assert metrics["rm/accuracy"] > 0.5, metrics
    pairs = load_preference_data(load_recipe("recipes/demo/rm.yaml").data, kind="pairs").eval.select(range(64))
    scorer = RewardModel.load(run_dir)
    chosen = scorer.score(pairs["prompt"], [c[0]["content"] for c in pairs["chosen"]])
    rejected = scorer.score(pairs["prompt"], [r[0]["content"] for r in pairs["rejected"]])
    # Batched differently than in the stage, a near-tie may flip: allow one pair. On a 4-bit base TRL evaluates
    # with the adapter cast to bf16 while the reloaded adapter is float32, and this barely trained RM has many
    # near-ties: a fresh-clone run (OMP_NUM_THREADS=1) saw 4 of 64 flip (0.594 vs 0.656), so allow 4 there.
    flips = 4 if "adapter={method: qlora}" in adapter else 1
    assert sum(c > r for c, r in zip(chosen, rejected)) / 64 == pytest.approx(metrics["rm/accuracy"],
                                                                             abs=(flips + 0.01) / 64)


def test_a_run_merged_into_its_base_trains_in_full(demo_sft_run):
    # peft freezes the base to load an adapter; once merged the model must be trainable again, or a full
    # fine-tune from a run dir (adapter method none, run_adapter merge) has nothing to train.
    model, _, keeps_adapter = modeling.load_run_for_training(
        ModelSettings(name_or_path=str(demo_sft_run), run_adapter="merge"), "causal_lm", gradient_checkpointing=False)
    assert not keeps_adapter and all(param.requires_grad for param in model.parameters())
