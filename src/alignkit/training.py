"""The parts every training stage shares: run the stage, build its TRL config, load model + adapter,
train with resume, and collect metrics. A stage module keeps only what is particular to it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from alignkit import adapters, modeling
from alignkit.errors import RecipeError
from alignkit.recipe import Recipe
from alignkit.runs import RunDir, open_run_dir
from alignkit.stages import get_stage

logger = logging.getLogger(__name__)


def run_stage(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Open the run dir, run the recipe's stage, write ``metrics.json`` and mark the run complete."""
    stage = get_stage(recipe.stage)
    run = open_run_dir(recipe, overwrite=overwrite, resume=resume)
    metrics = stage.run(recipe, run)
    metrics["run/world_size"] = _world_size()
    run.finish(metrics)
    return metrics


def training_args(recipe: Recipe, config_class: type, run: RunDir):
    """The stage's TRL config from ``recipe.train``, writing into the run dir."""
    values = dict(recipe.train, output_dir=str(run.path))
    try:
        return config_class(**values)
    except (ValueError, TypeError) as err:  # TRL / transformers cross-field checks in __post_init__
        raise RecipeError(f"train: {err}") from None


def build_trainer(trainer_class: type, **kwargs):
    """Construct a TRL trainer. TRL checks combinations of options (packing, padding-free, max_length...)
    when the trainer is built and raises ValueError: those are recipe errors, reported as such."""
    try:
        return trainer_class(**kwargs)
    except ValueError as err:
        raise RecipeError(f"train: {err}") from None


def load_model_and_tokenizer(recipe: Recipe, args) -> tuple[Any, Any, Any]:
    """(model, tokenizer, peft_config) for a training stage; the trainer applies the peft config."""
    tokenizer = modeling.load_tokenizer(recipe.model)
    model = modeling.load_model(recipe.model)
    model = modeling.prepare_for_kbit_training(model, args.gradient_checkpointing)
    peft_config = adapters.build_peft_config(
        recipe.adapter, task_type="CAUSAL_LM", tokenizer_path=modeling.resolve_path(recipe.model.name_or_path)
    )
    return model, tokenizer, peft_config


def parameter_metrics(model) -> dict[str, int]:
    """Trainable and total parameter counts, logged and recorded in metrics.json."""
    trainable, total = adapters.trainable_parameters(model)
    logger.info("trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return {"model/trainable_params": trainable, "model/total_params": total}


def train(trainer, run: RunDir) -> dict[str, float]:
    """Train (resuming from the run dir's last checkpoint, if any), save the final model, return metrics."""
    resume = trainer.args.resume_from_checkpoint or (str(run.resume_from) if run.resume_from else None)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(run.path))  # the adapter for peft models, else the full model; plus the tokenizer
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "train/loss": result.training_loss,
        "train/global_step": result.global_step,
        "train/runtime": result.metrics.get("train_runtime"),
    }
    if losses:
        metrics.update({"train/loss_start": losses[0], "train/loss_end": losses[-1]})
    if trainer.eval_dataset is not None:
        eval_loss = trainer.evaluate().get("eval_loss")
        if eval_loss is not None and math.isfinite(eval_loss):
            metrics["eval/loss"] = eval_loss
    return metrics


def _world_size() -> int:
    from accelerate import PartialState

    return PartialState().num_processes
