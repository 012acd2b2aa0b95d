"""What the critic-free RL stages (grpo, rloo) share: TRL's own trainers, PPO's ``reward:`` section.

recipe -> GRPOConfig / RLOOConfig (``train``, argument names as in TRL; the reward weights come from
``reward.sources``) -> prompt-only data -> one reward function per source -> policy (a fresh adapter, or a
run dir's adapter trained further) -> greedy answers to the held-out prompts -> TRL's trainer -> greedy
answers again -> run dir with the policy adapter (or model), ``metrics.json`` and report.md (reward curve):

  <stage>/reward_start, _end       mean reward of the sampled training answers, from the ``reward`` TRL logs
                                   every ``logging_steps``: the mean of the first / last logged entries (a
                                   window of a tenth of them, 1 to 10, as PPO's ``ppo/reward_start``)
  <stage>/eval_reward_start, _end  mean reward of the answers to the held-out prompts (``data.eval``, at most
                                   ``evaluate.max_samples``; generated as ``evaluate.generation`` says, else
                                   greedily up to ``max_completion_length`` tokens), before the first step and
                                   after the last. PPO reports the same as ``ppo/eval_reward_start, _end``.

The reference model of the KL term (``train.beta``: GRPO's default 0.0 keeps none, RLOO's is 0.05):
with a fresh adapter it is the base with the adapter disabled; starting from a run dir's adapter
(``model.name_or_path: runs/demo-sft-noisy``, ``run_adapter: continue``) TRL adds a frozen copy of that
adapter, named ``ref``, so the reference is the starting policy, not the bare base. RLOO adds the copy even
with beta 0; the copy is saved with the policy, in the run dir's ``ref/`` (inference and later stages load
the run dir's own adapter, the trained one). For a full fine-tune TRL loads the model a second time.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Any

from alignkit import generation
from alignkit.data import PreparedData, load_prompt_data
from alignkit.errors import RecipeError
from alignkit.feedback.rewards import RewardFunction, load_reward_functions, shared_reward
from alignkit.recipe.loading import Recipe
from alignkit.recipe.settings import GenerationSettings, RewardSettings
from alignkit.runs.rundir import RunDir
from alignkit.stages import Stage, training

logger = logging.getLogger(__name__)


def make_stage(name: str, description: str, config_class: type, trainer_class: type) -> Stage:
    """The ``Stage`` of a critic-free RL method on TRL's ``trainer_class`` (GRPOTrainer, RLOOTrainer)."""
    return Stage(name=name, help=description, train_config=lambda: config_class,
                 run=partial(run, stage=name, config_class=config_class, trainer_class=trainer_class),
                 sections={"reward": RewardSettings}, required_sections=("reward",), check_train=check_train,
                 rows="prompt", load_data=load_prompt_data)


def check_train(train: dict[str, Any]) -> None:
    """The weights of the rewards belong to the ``reward`` section, next to the sources they weigh."""
    if train.get("reward_weights") is not None:
        raise RecipeError("train.reward_weights: the rewards are weighted in the reward section; remove "
                          "train.reward_weights and give each of reward.sources a weight, e.g. "
                          "{function: module:function, weight: 0.5}")


def run(recipe: Recipe, run_dir: RunDir, *, stage: str, config_class: type, trainer_class: type) -> dict[str, Any]:
    """Train with ``trainer_class`` on the recipe's rewards; metrics as the module docstring lists them."""
    settings: RewardSettings = recipe.sections["reward"]
    functions = load_reward_functions(settings)  # before any data or model: a bad import path fails at once
    # TRL sums the functions' rewards with its own reward_weights; check_train keeps the user from setting them.
    weighted = dataclasses.replace(recipe, train={**recipe.train, "reward_weights": settings.weights})
    held_out = partial(held_out_reward, recipe=recipe, functions=functions, weights=settings.weights)

    def before_train(trainer, tokenizer, data: PreparedData) -> dict[str, Any]:
        # The policy as it starts: the trainer is built (a continued adapter loaded, or a fresh one attached)
        # but has taken no step; on resume the checkpoint is only loaded later, by train().
        score = held_out(trainer.model, tokenizer, data.eval, trainer.args)
        return {} if score is None else {f"{stage}/eval_reward_start": score}

    # TRL's own evaluation samples num_generations answers per held-out prompt; it only runs when the recipe
    # asks for it (train.eval_strategy), as the greedy held-out reward below is the stage's measure.
    trainer_eval = recipe.train.get("eval_strategy", "no") != "no"
    fitted = training.fit(weighted, run_dir, config_class=config_class, trainer_class=trainer_class,
                          load_data=load_prompt_data, trainer_eval=trainer_eval,
                          eval_names={"eval_reward": f"{stage}/eval_sampled_reward"} if trainer_eval else None,
                          before_train=before_train, reward_funcs=functions)
    trainer = fitted.trainer
    metrics = fitted.metrics | logged_reward(trainer.state.log_history, stage)
    end = held_out(trainer.model, fitted.tokenizer, fitted.data.eval, trainer.args)
    if end is not None:
        metrics[f"{stage}/eval_reward_end"] = end
        metrics[f"{stage}/eval_prompts"] = len(held_out_prompts(fitted.data.eval, recipe))
    return metrics


def held_out_prompts(dataset, recipe: Recipe):
    """The held-out prompt rows evaluated: the first ``evaluate.max_samples`` (200 without an evaluate section)."""
    if dataset is None:
        return None
    limit = recipe.evaluate.max_samples if recipe.evaluate else 200
    return dataset.select(range(min(len(dataset), limit or len(dataset))))


def eval_generation(recipe: Recipe, max_new_tokens: int) -> GenerationSettings:
    """How the held-out answers are generated: ``evaluate.generation``, else greedy up to ``max_new_tokens``
    (the length of the training answers)."""
    if recipe.evaluate is not None:
        return recipe.evaluate.generation
    return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False)


def held_out_reward(model, tokenizer, dataset, args, *, recipe: Recipe, functions: list[RewardFunction],
                    weights: list[float]) -> float | None:
    """Mean weighted reward of ``model``'s answers to the held-out prompts; None without held-out data. Every
    process holds the same prompts and (gathered) answers, so each scores its share of them."""
    rows = held_out_prompts(dataset, recipe)
    if rows is None or len(rows) == 0:
        return None
    prompts = list(rows["prompt"])
    completions = generation.generate(model, tokenizer, prompts, eval_generation(recipe, args.max_completion_length))
    columns = {name: list(rows[name]) for name in rows.column_names if name != "prompt"}
    rewards = shared_reward(functions, weights)(prompts, completions, columns)
    return sum(rewards) / len(rewards)


def logged_reward(log_history: list[dict[str, Any]], stage: str) -> dict[str, float]:
    """``<stage>/reward_start`` and ``_end``: means of the first / last logged training rewards.

    The window is a tenth of the logged entries (1 to 10), as for PPO, so one noisy batch does not decide
    either end. Eval logs carry ``eval_reward`` and are left out; so are entries where no answer was scored.
    """
    rewards = [entry["reward"] for entry in log_history if entry.get("reward") is not None]
    if not rewards:
        logger.warning("the trainer logged no reward: train.logging_steps is more than the steps trained")
        return {}
    window = max(1, min(10, len(rewards) // 10))
    return {f"{stage}/reward_start": sum(rewards[:window]) / window,
            f"{stage}/reward_end": sum(rewards[-window:]) / window,
            f"{stage}/reward_window": window}
