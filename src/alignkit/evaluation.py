"""Generation-based evaluation of a trained model on held-out conversations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.generation import generate
from alignkit.recipe import EvaluateSettings


def split_conversation(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, reference): everything before the last assistant turn, and that turn's text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def evaluate_generations(model, tokenizer, dataset, settings: EvaluateSettings,
                         predictions_file: Path | None = None) -> dict[str, Any]:
    """Generate for each held-out conversation and score against its reference; keys are ``eval/<metric>``."""
    from alignkit.metrics import compute

    rows = dataset["messages"][: settings.max_samples]
    prompts, references = zip(*(split_conversation(messages) for messages in rows))
    predictions = generate(model, tokenizer, prompts, settings.generation)
    if predictions_file is not None:
        with predictions_file.open("w", encoding="utf-8") as handle:
            for prompt, prediction, reference in zip(prompts, predictions, references):
                handle.write(json.dumps({"prompt": prompt, "prediction": prediction, "reference": reference}) + "\n")
    scores = compute(settings.metrics, predictions, list(references))
    return {f"eval/{name}": value for name, value in scores.items()} | {"eval/samples": len(predictions)}
