"""Reward modelling on TRL's RewardTrainer: a scalar head trained on preference pairs (Bradley-Terry loss).

recipe -> sequence classifier with one label (+ adapter; peft saves the new head with it) -> pairs ->
RewardTrainer -> run dir. Held-out pairs give ``rm/accuracy`` (chosen scored above rejected) and
``rm/margin`` (mean score difference), before training too (``rm/accuracy_start``, ``rm/margin_start``).
The run dir loads back as a scorer: ``alignkit.feedback.RewardModel``.
"""

from __future__ import annotations

from functools import partial

from trl import RewardConfig, RewardTrainer

from alignkit.data import load_preference_data
from alignkit.feedback import RewardModel
from alignkit.recipe.loading import Recipe
from alignkit.runs.rundir import RunDir
from alignkit.stages import Stage, training
from alignkit.stages.preference import check_starts_new_head


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    check_starts_new_head(recipe, "the rm stage")

    def held_out_accuracy(trainer, tokenizer, pairs) -> dict[str, float]:
        # Scored with the same scorer later stages load (TRL's own accuracy is a mean of per-batch means).
        scorer = RewardModel(model=trainer.model, tokenizer=tokenizer,
                             batch_size=trainer.args.per_device_eval_batch_size)
        return pair_accuracy(scorer, pairs)

    def before_train(trainer, tokenizer, data) -> dict[str, float]:
        # The new head before its first step (a fresh head scores at chance): the "before" of report.md.
        if data.eval is None:
            return {}
        return {f"{key}_start": value for key, value in held_out_accuracy(trainer, tokenizer, data.eval).items()}

    fitted = training.fit(recipe, run_dir, config_class=RewardConfig, trainer_class=RewardTrainer,
                          load_data=partial(load_preference_data, kind="pairs"), head="reward",
                          before_train=before_train)
    if fitted.data.eval is None:
        return fitted.metrics
    return fitted.metrics | held_out_accuracy(fitted.trainer, fitted.tokenizer, fitted.data.eval)


def pair_accuracy(scorer: RewardModel, pairs) -> dict[str, float]:
    """``rm/accuracy`` (share of pairs whose chosen answer scores higher) and ``rm/margin`` (mean difference)."""
    prompts = pairs["prompt"]
    training_mode = scorer.model.training
    scorer.model.eval()  # dropout off while scoring, whichever mode the trainer left the model in
    try:
        chosen = scorer.score(prompts, [answer[-1]["content"] for answer in pairs["chosen"]])
        rejected = scorer.score(prompts, [answer[-1]["content"] for answer in pairs["rejected"]])
    finally:
        scorer.model.train(training_mode)
    differences = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {"rm/accuracy": sum(d > 0 for d in differences) / len(differences),
            "rm/margin": sum(differences) / len(differences)}


STAGE = Stage(name="rm", help="Reward modelling on preference pairs (TRL RewardTrainer)",
              train_config=lambda: RewardConfig, run=run, rows="preference",
              load_data=partial(load_preference_data, kind="pairs"), head="reward", sequences_per_row=2,
              dropped_for_length="conversation")
