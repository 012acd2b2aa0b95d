"""Odds-ratio preference optimisation (ORPO, trl.experimental): SFT and preference in one loss, no reference.

Held-out pairs give ``orpo/reward_accuracy`` and ``orpo/margin`` (log-odds based rewards) and
``orpo/log_odds_ratio``.
"""

from __future__ import annotations

import os
from functools import partial

from alignkit.data import load_preference_data
from alignkit.evaluation import evaluate_preference_policy
from alignkit.recipe.loading import Recipe
from alignkit.runs.rundir import RunDir
from alignkit.stages import Stage, training

EVAL_NAMES = {"eval_rewards/accuracies": "orpo/reward_accuracy", "eval_rewards/margins": "orpo/margin",
              "eval_log_odds_ratio": "orpo/log_odds_ratio"}


def _orpo():
    # ORPO lives in trl.experimental, which warns on import; alignkit pins the TRL version it is tested with.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    config_class, trainer_class = _orpo()
    fitted = training.fit(recipe, run_dir, config_class=config_class, trainer_class=trainer_class,
                          load_data=partial(load_preference_data, kind="pairs"), eval_names=EVAL_NAMES)
    return fitted.metrics | evaluate_preference_policy(recipe, run_dir.path, fitted, "orpo")


STAGE = Stage(name="orpo", help="Odds-ratio preference optimisation (trl.experimental ORPOTrainer)",
              train_config=lambda: _orpo()[0], run=run, rows="preference",
              load_data=partial(load_preference_data, kind="pairs"), sequences_per_row=2)
