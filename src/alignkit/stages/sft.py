"""Supervised fine-tuning on TRL's SFTTrainer.

recipe -> model + tokenizer (+ adapter config) -> conversational data -> SFTTrainer -> run dir,
then, if the recipe has an ``evaluate`` section, greedy generation on the held-out set scored into
``metrics.json`` (``eval/exact_match``, ...).
"""

from __future__ import annotations

import logging

from trl import SFTConfig, SFTTrainer

from alignkit.data import load_sft_data
from alignkit.evaluation import evaluate_and_report
from alignkit.recipe.loading import Recipe
from alignkit.runs.rundir import RunDir
from alignkit.stages import Stage, training

logger = logging.getLogger(__name__)


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    fitted = training.fit(recipe, run_dir, config_class=SFTConfig, trainer_class=SFTTrainer, load_data=load_sft_data)
    metrics = fitted.metrics
    # ---- evaluate by generation on the held-out set -------------------------------------------------
    if recipe.evaluate is not None and fitted.data.eval is not None and "text" in fitted.data.eval.column_names:
        # Raw text has no prompt to answer: its held-out loss (eval/loss) is the measure.
        logger.warning("evaluate: skipped, the held-out rows are raw text (no prompt to generate an answer to)")
    elif recipe.evaluate is not None and fitted.data.eval is not None:
        metrics |= evaluate_and_report(fitted.trainer.model, fitted.tokenizer, fitted.data.eval, recipe.evaluate,
                                       run_dir.path, label=f"{recipe.model.name_or_path} + sft",
                                       base_settings=recipe.model)
    return metrics


STAGE = Stage(name="sft", help="Supervised fine-tuning (TRL SFTTrainer)", train_config=lambda: SFTConfig, run=run,
              load_data=load_sft_data, fused_head=True, dropped_for_length="first_answer")
