"""Evaluation by generation: a model (or run dir) answers held-out prompts, scored with ROUGE / BLEU /
chrF / exact match; optionally a second model side by side (``evaluate.compare``).

recipe -> model (+ adapter of a run dir) -> data.eval -> generate -> predictions.jsonl, metrics.json,
report.md
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.data import load_sft_data
from alignkit.evaluation import evaluate_and_report
from alignkit.models import modeling
from alignkit.recipe.loading import Recipe
from alignkit.recipe.settings import EvaluateSettings
from alignkit.runs.rundir import RunDir
from alignkit.stages import Stage


@dataclass
class EvalRunSettings:
    """The ``train`` section of an eval recipe: the stage trains nothing, it only needs a run dir."""

    output_dir: str = field(metadata={"help": "Where predictions, metrics.json and report.md are written."})


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    # ---- model: a plain model, or base + adapter of an alignkit run dir ------------------------------
    model, tokenizer = modeling.load_for_inference(recipe.model)

    # ---- held-out data, normalised like training data -------------------------------------------------
    data = load_sft_data(recipe.data)
    held_out = data.eval if data.eval is not None else data.train

    # ---- generate, score, report ------------------------------------------------------------------------
    settings = recipe.evaluate or EvaluateSettings()
    return evaluate_and_report(model, tokenizer, held_out, settings, run_dir.path, label=recipe.model.name_or_path,
                               base_settings=recipe.model)


STAGE = Stage(name="eval", help="Evaluate a model or run dir by generation (ROUGE, BLEU, chrF, exact match)",
              train_config=lambda: EvalRunSettings, run=run, required_data=("eval",),
              load_data=load_sft_data, trains=False)
