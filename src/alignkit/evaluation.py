"""Generation-based evaluation: generate for held-out prompts, score, write predictions and evaluation.md
(which the run's report.md includes).

Shared by the ``eval`` stage and by the ``evaluate:`` section of training recipes. With
``evaluate.compare`` a second model answers the same prompts and the report shows both side by side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit import distributed
from alignkit.feedback import LazyJudge, win_rates
from alignkit.feedback.rewards import monitoring_reward
from alignkit.generation import generate
from alignkit.metrics import compute
from alignkit.models import modeling
from alignkit.recipe.loading import Recipe
from alignkit.recipe.settings import EvaluateSettings, ModelSettings
from alignkit.runs.reports import EVALUATION_FILE

if TYPE_CHECKING:
    from alignkit.stages.training import Fitted

COMPARE_BASE = "base"


@dataclass
class Evaluation:
    """One model's answers to the held-out prompts and their scores."""

    label: str
    prompts: list[list[dict[str, str]]]
    references: list[str]
    predictions: list[str]
    scores: dict[str, float]


def split_conversation(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, reference): everything before the last assistant turn, and that turn's text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def held_out_examples(dataset, max_samples: int | None) -> tuple[list, list[str]]:
    """Prompts and references from a dataset of ``{"messages": [...]}`` rows."""
    rows = dataset["messages"][:max_samples]
    prompts, references = zip(*(split_conversation(messages) for messages in rows))
    return list(prompts), list(references)


def evaluate_model(model, tokenizer, prompts: list, references: list[str], settings: EvaluateSettings,
                   label: str, reward: Callable[..., list[float]] | None = None) -> Evaluation:
    """Generate an answer to every prompt and score the answers against the references (and with ``reward``,
    ``reward(prompts, answers, columns) -> rewards``, as ``reward``: the mean)."""
    predictions = generate(model, tokenizer, prompts, settings.generation)
    scores = compute(settings.metrics, predictions, references, options=settings.metric_options)
    if reward is not None:
        rewards = reward(prompts, predictions, {})
        scores["reward"] = sum(rewards) / len(rewards)
    return Evaluation(label=label, prompts=prompts, references=references, predictions=predictions, scores=scores)


def evaluate_generations(model, tokenizer, dataset, settings: EvaluateSettings) -> dict[str, Any]:
    """Scores of ``model`` on ``dataset`` as ``eval/<metric>`` keys (no files written)."""
    prompts, references = held_out_examples(dataset, settings.max_samples)
    result = evaluate_model(model, tokenizer, prompts, references, settings, label="model")
    return {f"eval/{name}": value for name, value in result.scores.items()} | {"eval/samples": len(prompts)}


def evaluate_and_report(model, tokenizer, dataset, settings: EvaluateSettings, run_dir: Path, *, label: str,
                        base_settings: ModelSettings) -> dict[str, Any]:
    """Evaluate ``model`` (and ``settings.compare``) on ``dataset``; write predictions and evaluation.md.

    Returns ``eval/<metric>`` for the model and ``compare/<metric>`` for the comparison model.
    ``base_settings`` describe the model before training, for ``compare: base``.
    """
    prompts, references = held_out_examples(dataset, settings.max_samples)
    reward = monitoring_reward(settings.reward)  # loaded once, for both models
    results = [evaluate_model(model, tokenizer, prompts, references, settings, label, reward)]
    if settings.compare:
        with comparison_model(settings.compare, model, tokenizer, base_settings) as (other, other_tokenizer, name):
            results.append(evaluate_model(other, other_tokenizer, prompts, references, settings, name, reward))

    write_predictions(run_dir / "predictions.jsonl", results[0])
    metrics: dict[str, Any] = {f"eval/{k}": v for k, v in results[0].scores.items()} | {"eval/samples": len(prompts)}
    if len(results) > 1:
        write_predictions(run_dir / "predictions-compare.jsonl", results[1])
        metrics |= {f"compare/{k}": v for k, v in results[1].scores.items()}
    judged = None
    if settings.judge:
        judged = judge_win_rates(settings, results)
        metrics |= {f"eval/{k}": v for k, v in judged.items()}
    judge_label = settings.judge.label if settings.judge else None
    report = render_report(results, settings.report_samples, judged, judge_label)
    distributed.write_text(run_dir / EVALUATION_FILE, report)
    return metrics


def judge_win_rates(settings: EvaluateSettings, results: list[Evaluation]) -> dict[str, float]:
    """Win / tie / loss rates of the model's answers, judged by ``settings.judge`` against the comparison
    model's answers when there is one, else against the references; ``judge_skipped`` when the judge had to
    skip pairs (counted as ties)."""
    judge = LazyJudge(settings.judge)
    opponent = results[1].predictions if len(results) > 1 else results[0].references
    rates = win_rates(judge.compare(results[0].prompts, results[0].predictions, opponent), settings.tie_margin)
    skipped = judge.take_stats().get("skipped", 0)
    return rates | ({"judge_skipped": skipped} if skipped else {})


@contextlib.contextmanager
def comparison_model(compare: str, model, tokenizer, base_settings: ModelSettings) -> Iterator[tuple[Any, Any, str]]:
    """The model to compare with: ``base`` (the model before training) or any model / run dir."""
    if compare == COMPARE_BASE and hasattr(model, "disable_adapter"):
        # A peft model without its adapter is the base: no second copy in memory.
        with model.disable_adapter():
            yield model, tokenizer, f"{base_settings.name_or_path} (base)"
        return
    settings = base_settings if compare == COMPARE_BASE else dataclasses.replace(base_settings, name_or_path=compare)
    other, other_tokenizer = modeling.load_for_inference(settings)
    label = f"{settings.name_or_path} (base)" if compare == COMPARE_BASE else compare
    yield other, other_tokenizer, label


def write_predictions(path: Path, result: Evaluation) -> None:
    """One JSON line per held-out prompt: the prompt, the model's answer and the reference."""
    distributed.write_text(path, "".join(
        json.dumps({"prompt": prompt, "prediction": prediction, "reference": reference}, ensure_ascii=False) + "\n"
        for prompt, prediction, reference in zip(result.prompts, result.predictions, result.references)))


def render_report(results: list[Evaluation], samples: int, judged: dict[str, float] | None = None,
                  judge: str | None = None) -> str:
    """Markdown: a metric table with one column per model, the judge's win rate, then sample answers."""
    names = list(results[0].scores)
    lines = ["# Evaluation", "", f"{len(results[0].prompts)} held-out prompts.", "",
             "| metric | " + " | ".join(f"`{r.label}`" for r in results) + " |",
             "|---" * (len(results) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_number(r.scores.get(name)) for r in results) + " |" for name in names]
    if judged is not None:
        opponent = f"`{results[1].label}`" if len(results) > 1 else "the references"
        lines += ["", f"Judged by `{judge}`: `{results[0].label}` against {opponent}: "
                  f"win {judged['win_rate']:.3f}, tie {judged['tie_rate']:.3f}, loss {judged['loss_rate']:.3f}."]
    lines += ["", "## Samples", ""]
    for index in range(min(samples, len(results[0].prompts))):
        prompt_text = "\n".join(f"{m['role']}: {m['content']}" for m in results[0].prompts[index])
        lines += [f"### {index + 1}", "", "```", prompt_text, "```", "",
                  f"- reference: `{results[0].references[index]}`"]
        lines += [f"- `{r.label}`: `{r.predictions[index]}`" for r in results]
        lines.append("")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluate_preference_policy(recipe: Recipe, run_path: Path, fitted: Fitted, stage: str) -> dict[str, Any]:
    """Generation metrics of a preference-tuned policy (DPO, KTO, ORPO) on the held-out prompts, with the
    preferred answers (``chosen``, or the desirable ``completion`` of unpaired rows) as references."""
    held_out = fitted.data.eval
    if recipe.evaluate is None or held_out is None:
        return {}
    if "label" in held_out.column_names:
        held_out = held_out.filter(lambda row: row["label"]).rename_column("completion", "chosen")
    conversations = held_out.map(lambda row: {"messages": row["prompt"] + row["chosen"]},
                                 remove_columns=held_out.column_names)
    return evaluate_and_report(fitted.trainer.model, fitted.tokenizer, conversations, recipe.evaluate, run_path,
                               label=f"{recipe.model.name_or_path} + {stage}", base_settings=recipe.model)
