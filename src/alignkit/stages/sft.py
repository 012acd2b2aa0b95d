"""Supervised fine-tuning on TRL's SFTTrainer.

recipe -> model + tokenizer (+ adapter config) -> conversational data -> SFTTrainer -> run dir,
then, if the recipe has an ``evaluate`` section, greedy generation on the held-out set scored into
``metrics.json`` (``eval/exact_match``, ...).
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from alignkit import training
from alignkit.data import load_sft_data
from alignkit.evaluation import evaluate_and_report
from alignkit.recipe import Recipe
from alignkit.runs import RunDir
from alignkit.stages import Stage


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    # ---- config, model, adapter -------------------------------------------------------------------
    args = training.training_args(recipe, SFTConfig, run_dir)
    model, tokenizer, peft_config = training.load_model_and_tokenizer(recipe, args)

    # ---- data: every source normalised to {"messages": [...]} ---------------------------------------
    data = load_sft_data(recipe.data)
    run_dir.write_json("data.json", {"train_rows": len(data.train), "eval_rows": len(data.eval or []),
                                     "sources": [r.to_dict() for r in data.reports]})

    # ---- train ---------------------------------------------------------------------------------------
    trainer = training.build_trainer(SFTTrainer, model=model, args=args, train_dataset=data.train,
                                     eval_dataset=data.eval, processing_class=tokenizer, peft_config=peft_config)
    metrics = training.parameter_metrics(trainer.model)
    metrics |= training.train(trainer, run_dir)

    # ---- evaluate by generation on the held-out set -------------------------------------------------
    if recipe.evaluate is not None and data.eval is not None:
        metrics |= evaluate_and_report(trainer.model, tokenizer, data.eval, recipe.evaluate, run_dir.path,
                                       label=f"{recipe.model.name_or_path} + sft", base_settings=recipe.model)
    return metrics


STAGE = Stage(name="sft", help="Supervised fine-tuning (TRL SFTTrainer)", train_config=lambda: SFTConfig, run=run)
