"""Kahneman-Tversky optimisation on TRL's KTOTrainer: unpaired desirable / undesirable completions.

Pairs are accepted too (each becomes one desirable and one undesirable row). The reference is handled
as for DPO: the base with the adapter disabled, or a frozen copy of a starting run's adapter.
Held-out rows give ``kto/margin`` (implicit reward of desirable minus undesirable completions).
"""

from __future__ import annotations

from functools import partial

from trl import KTOConfig, KTOTrainer

from alignkit.data import load_preference_data
from alignkit.evaluation import evaluate_preference_policy
from alignkit.recipe.loading import Recipe
from alignkit.runs.rundir import RunDir
from alignkit.stages import Stage, training

EVAL_NAMES = {"eval_rewards/margins": "kto/margin", "eval_rewards/chosen": "kto/reward_desirable",
              "eval_rewards/rejected": "kto/reward_undesirable", "eval_kl": "kto/kl"}


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    fitted = training.fit(recipe, run_dir, config_class=KTOConfig, trainer_class=KTOTrainer,
                          load_data=partial(load_preference_data, kind="unpaired"), eval_names=EVAL_NAMES)
    return fitted.metrics | evaluate_preference_policy(recipe, run_dir.path, fitted, "kto")


STAGE = Stage(name="kto", help="Kahneman-Tversky optimisation on unpaired feedback (TRL KTOTrainer)",
              train_config=lambda: KTOConfig, run=run, rows="preference",
              load_data=partial(load_preference_data, kind="unpaired"), extra_models="reference",
              dropped_for_length="prompt")
