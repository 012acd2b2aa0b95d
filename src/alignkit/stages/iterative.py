"""What the iterative stages (``rest``, ``rlaif``) share: a loop of sample -> select -> fine-tune, where each
step continues the policy the previous one trained.

- ``policy_settings``: the model settings of the current policy (the recipe's start, or a step's run dir);
- ``draw_prompts``: the prompts of one step, a seeded draw;
- ``sample_answers``: several sampled answers per prompt from that policy;
- ``held_out_mean_reward``: the mean reward of a model's answers to the held-out prompts;
- ``write_jsonl`` / ``read_jsonl``: a step's files, written whole or not at all;
- ``save_loop_state`` / ``load_loop_state``: ``checkpoint-<k>/trainer_state.json`` after step k and the
  step log, so an interrupted run resumes after its last complete step;
- ``adopt_final_model``: the last step's model becomes the run dir's own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from alignkit import distributed, generation
from alignkit.models import modeling
from alignkit.recipe.loading import Recipe
from alignkit.recipe.settings import GenerationSettings, ModelSettings
from alignkit.runs.rundir import RunDir
from alignkit.stages.rl_common import eval_generation

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


def policy_settings(recipe: Recipe, policy: str | None) -> ModelSettings:
    """The model settings of the current policy: the recipe's start (``policy`` None), or a step's run dir
    (its adapter trained further, on the recipe's base, dtype and quantisation)."""
    if policy is None:
        return recipe.model
    return dataclasses.replace(recipe.model, name_or_path=policy, run_adapter="continue")


def draw_prompts(rows, count: int | None, seed: str):
    """``count`` of the prompt ``rows``, drawn with ``random.Random(seed)`` and kept in their order (all of them
    for ``count`` None or at least their number)."""
    chosen = list(range(len(rows)))
    if count is not None and count < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, count))
    return rows.select(chosen)


def sample_answers(settings: ModelSettings, rows, repeats: int,
                   sampling: GenerationSettings) -> tuple[list, list[str], dict[str, list]]:
    """``repeats`` sampled answers to each prompt of ``rows`` (prompt-only rows) from the model ``settings``
    describe: (prompts, answers, other columns), each prompt repeated ``repeats`` times in a row."""
    prompts = [prompt for prompt in rows["prompt"] for _ in range(repeats)]
    columns = {name: [value for value in values for _ in range(repeats)] for name, values in columns_of(rows).items()}
    model, tokenizer = modeling.load_for_inference(settings)
    answers = generation.generate(model, tokenizer, prompts, sampling)
    del model
    return prompts, answers, columns


def held_out_mean_reward(model, tokenizer, rows, reward, recipe: Recipe, max_new_tokens: int) -> float | None:
    """Mean ``reward(prompts, answers, columns)`` of ``model``'s answers to the held-out prompt ``rows``,
    generated as ``evaluate.generation`` says (else greedily, up to ``max_new_tokens``); None without rows or
    without a reward."""
    if rows is None or len(rows) == 0 or reward is None:
        return None
    prompts = list(rows["prompt"])
    answers = generation.generate(model, tokenizer, prompts, eval_generation(recipe, max_new_tokens))
    return mean(reward(prompts, answers, columns_of(rows)))


def columns_of(rows) -> dict[str, list]:
    """The columns of prompt rows other than ``prompt`` (references and the like, passed to reward functions)."""
    return {name: list(rows[name]) for name in rows.column_names if name != "prompt"}


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """One JSON line per row, written whole or not at all, by the main process (the others wait for it)."""
    distributed.write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[Any]:
    """The rows of a file ``write_jsonl`` wrote."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclasses.dataclass
class LoopState:
    """Where the loop of an iterative stage (rest, rlaif) stands after a complete step; saved as
    ``checkpoint-<step>/trainer_state.json``, from which an interrupted run resumes."""

    completed: int = 0  # steps complete: ReST's improve steps, RLAIF's iterations (0: only its revision step)
    policy: str | None = None  # run dir of the current policy; None: the recipe's model, untrained
    eval_reward_start: float | None = None  # held-out reward before the first step (None: no held-out data)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # each step's log entry, in order


def save_loop_state(run_dir: RunDir, step: int, state: LoopState, log_file: str) -> None:
    """Record step ``step``: its log entry (``state.history[-1]``) appended to ``log_file``, then
    ``checkpoint-<step>/trainer_state.json``, written last because it marks the step complete."""
    if distributed.is_main_process():
        with (run_dir.path / log_file).open("a") as log:
            log.write(json.dumps(state.history[-1]) + "\n")
    distributed.write_text(run_dir.path / f"checkpoint-{step}" / STATE_FILE,
                           json.dumps(dataclasses.asdict(state), indent=1))


def load_loop_state(run_dir: RunDir, log_file: str, stage: str, step_name: str) -> LoopState | None:
    """The state of the last complete step of an interrupted run (None for a new run), logged as "<stage>:
    resuming after <step_name> <k>"; the step log is rewritten to hold exactly the steps the resumed run
    stands on."""
    if run_dir.resume_from is None:
        return None
    state = LoopState(**json.loads((run_dir.resume_from / STATE_FILE).read_text()))
    logger.info("%s: resuming after %s %d", stage, step_name, state.completed)
    distributed.write_text(run_dir.path / log_file, "".join(json.dumps(entry) + "\n" for entry in state.history))
    return state


def adopt_final_model(run_dir: RunDir, final: Path, keep_out: Sequence[str] = ()) -> None:
    """Copy the files of the last step's run dir (adapter or model, tokenizer, recipe) into the run dir, so the
    run dir loads as the trained policy; ``keep_out`` names the step's own files (its data) that stay there."""
    skipped = {*keep_out, "data.json", "metrics.json"}
    if distributed.is_main_process():
        for item in final.iterdir():
            if item.is_file() and item.name not in skipped:
                (run_dir.path / item.name).write_bytes(item.read_bytes())
    distributed.wait_for_everyone()


def mean(values: Sequence[float]) -> float:
    """The mean; NaN for no values."""
    return sum(values) / len(values) if values else float("nan")
