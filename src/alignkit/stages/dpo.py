"""Direct preference optimisation on TRL's DPOTrainer, any of its loss types (``train.loss_type``).

The reference model is never a second copy: with a fresh adapter it is the base with the adapter
disabled; starting from a run dir (``model.name_or_path: runs/demo-sft``) the run's adapter is trained
further and TRL keeps a frozen copy of it as the reference, so the reference is the SFT policy.
Held-out pairs give ``dpo/reward_accuracy`` and ``dpo/margin`` (implicit rewards, chosen minus rejected).
"""

from __future__ import annotations

from functools import partial

from trl import DPOConfig, DPOTrainer

from alignkit.data import load_preference_data
from alignkit.evaluation import evaluate_preference_policy
from alignkit.recipe.loading import Recipe
from alignkit.runs.rundir import RunDir
from alignkit.stages import Stage, training
from alignkit.stages.preference import check_dpo_train

EVAL_NAMES = {"eval_rewards/accuracies": "dpo/reward_accuracy", "eval_rewards/margins": "dpo/margin",
              "eval_rewards/chosen": "dpo/reward_chosen", "eval_rewards/rejected": "dpo/reward_rejected"}


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    fitted = training.fit(recipe, run_dir, config_class=DPOConfig, trainer_class=DPOTrainer,
                          load_data=partial(load_preference_data, kind="pairs"), eval_names=EVAL_NAMES)
    return fitted.metrics | evaluate_preference_policy(recipe, run_dir.path, fitted, "dpo")


STAGE = Stage(name="dpo", help="Direct preference optimisation (TRL DPOTrainer)", train_config=lambda: DPOConfig,
              run=run, check_train=check_dpo_train, rows="preference",
              load_data=partial(load_preference_data, kind="pairs"), sequences_per_row=2, extra_models="reference",
              dropped_for_length="prompt")
