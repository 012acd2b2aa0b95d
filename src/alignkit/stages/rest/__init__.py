"""ReST (Gulcehre et al. 2023): grow a dataset by sampling the policy, improve it by fine-tuning on the
best samples, with a bar that rises at every improve step. Best-of-N rejection sampling (RAFT) is the same
loop with ``rest.filter: best_of_n``. Neither TRL nor the other toolkits ship it; the fine-tuning is TRL's SFT.

recipe -> prompts (``data``, prompt-only formats) -> reward sources (``reward``) -> for each grow step:
sample ``samples_per_prompt`` answers per prompt with the current policy and score them -> for each improve
step: keep the samples that pass the step's bar, SFT the policy on them (``train``: TRL's SFTConfig, per
improve step), measure the held-out reward -> run dir with the final policy, ``rest_log.jsonl``,
``metrics.json`` and report.md (the held-out reward per improve step).

Run dir layout: ``grow-<g>/samples.jsonl`` (every sample and its reward), ``improve-<k>/`` (the k-th
improve step's SFT run: ``kept.jsonl``, its checkpoints, the policy after it) and ``checkpoint-<k>/`` (the
loop's state after improve step k, written last). An interrupted run resumes after its last complete
improve step, and inside an improve step from the SFT trainer's last checkpoint.

metrics.json: ``rest/eval_reward_start`` and ``rest/eval_reward_end`` (greedy answers to the held-out
prompts, before and after), ``rest/sample_reward_start`` and ``_end`` (mean reward of the first and last
grow steps' samples), ``rest/kept_fraction_end``; every improve step's figures are in ``rest_log.jsonl``.

The ``rest:`` section and the sample filters are in ``selection``; what ReST shares with RLAIF (sampling,
loop state and resume) in :mod:`alignkit.stages.iterative`.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path
from typing import Any

from trl import SFTConfig, SFTTrainer

from alignkit.data import load_prompt_data, load_sft_data, prepare
from alignkit.errors import RecipeError
from alignkit.feedback import LazyJudge, round_robin_scores
from alignkit.feedback.rewards import monitoring_reward
from alignkit.models import modeling
from alignkit.recipe.loading import Recipe
from alignkit.recipe.settings import DataSettings, DataSource, RewardSettings
from alignkit.runs.reports import write_history
from alignkit.runs.rundir import RunDir, last_checkpoint
from alignkit.stages import Stage, training
from alignkit.stages.iterative import (
    LoopState,
    adopt_final_model,
    draw_prompts,
    held_out_mean_reward,
    load_loop_state,
    mean,
    policy_settings,
    read_jsonl,
    sample_answers,
    save_loop_state,
    write_jsonl,
)
from alignkit.stages.rest.selection import RestSettings, Sample, keep_samples
from alignkit.stages.rl_common import held_out_prompts

logger = logging.getLogger(__name__)

LOG_FILE, SAMPLES_FILE, KEPT_FILE = "rest_log.jsonl", "samples.jsonl", "kept.jsonl"


def run(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    settings: RestSettings = recipe.sections["rest"]
    reward = monitoring_reward(recipe.sections.get("reward"))  # a bad import path fails before anything loads
    if reward is None and settings.judge is None:
        raise RecipeError("rest needs something to score samples with: a reward section (reward models, rule "
                          "functions) or rest.judge")
    score = reward if settings.judge is None else _judge_scorer(settings)
    data = prepare(recipe.data, load_prompt_data)
    training.record_data(run_dir, data)
    held_out_reward = partial(held_out_mean_reward, rows=held_out_prompts(data.eval, recipe), reward=reward,
                              recipe=recipe, max_new_tokens=settings.generation.max_new_tokens)

    state = load_loop_state(run_dir, LOG_FILE, "rest", "improve step")
    if state is None:
        model, tokenizer = modeling.load_for_inference(recipe.model)
        state = LoopState(eval_reward_start=held_out_reward(model, tokenizer))
        del model
    step = state.completed
    for grow in range(1, settings.grow_steps + 1):
        if grow * settings.improve_steps <= step:
            continue  # this grow step and all its improve steps were done before an interruption
        samples = _grow(recipe, settings, run_dir, grow, state.policy, data.train, score)
        for improve in range(1, settings.improve_steps + 1):
            if step >= (grow - 1) * settings.improve_steps + improve:
                continue
            step += 1
            entry, policy = _improve(recipe, settings, run_dir, step, grow, improve, samples, state.policy,
                                     held_out_reward)
            state = dataclasses.replace(state, completed=step, policy=policy, history=[*state.history, entry])
            save_loop_state(run_dir, step, state, LOG_FILE)
    return _finish(recipe, run_dir, state)


def _judge_scorer(settings: RestSettings):
    """``score(prompts, answers, columns)`` from ``rest.judge``: each sample's mean preference over its prompt's
    other samples. The judge loads on first use (a resumed run whose samples are scored never loads it)."""
    judge = LazyJudge(settings.judge)

    def score(prompts: list, answers: list[str], columns: dict[str, list]) -> list[float]:
        scores = round_robin_scores(judge, prompts, answers, settings.samples_per_prompt)
        stats = judge.take_stats()
        if stats.get("skipped"):
            logger.warning("rest judge: %s", stats)
        return scores

    return score


# ---- grow: sample and score ---------------------------------------------------------------------------------

def _grow(recipe: Recipe, settings: RestSettings, run_dir: RunDir, grow: int, policy: str | None, prompts_data,
          reward) -> list[Sample]:
    """This grow step's samples: read back if an interrupted run already wrote them, else sampled and scored."""
    path = run_dir.path / f"grow-{grow}" / SAMPLES_FILE
    if path.is_file():
        return [Sample(**row) for row in read_jsonl(path)]
    rows = draw_prompts(prompts_data, settings.prompts_per_grow, f"{recipe.data.seed}-grow-{grow}")
    repeats = settings.samples_per_prompt
    sampling = dataclasses.replace(settings.generation, seed=settings.generation.seed + grow)
    prompts, completions, columns = sample_answers(policy_settings(recipe, policy), rows, repeats, sampling)
    rewards = reward(prompts, completions, columns)
    samples = [Sample(prompt_index=index // repeats, prompt=prompt, completion=completion, reward=float(value))
               for index, (prompt, completion, value) in enumerate(zip(prompts, completions, rewards))]
    write_jsonl(path, (dataclasses.asdict(s) for s in samples))
    logger.info("rest grow %d: %d samples of %d prompts, mean reward %.3f", grow, len(samples), len(rows),
                mean([s.reward for s in samples]))
    return samples


# ---- improve: filter and fine-tune --------------------------------------------------------------------------

def _improve(recipe: Recipe, settings: RestSettings, run_dir: RunDir, step: int, grow: int, improve: int,
             samples: list[Sample], policy: str | None, held_out_reward) -> tuple[dict[str, Any], str | None]:
    """Fine-tune the policy on the samples that pass improve step ``improve``'s bar; (log entry, new policy)."""
    kept = keep_samples(samples, settings, improve)
    entry: dict[str, Any] = {
        "step": step, "grow": grow, "improve": improve, "filter": settings.filter, "bar": settings.bar(improve),
        "samples": len(samples), "sample_reward": mean([s.reward for s in samples]), "kept": len(kept),
        "kept_fraction": len(kept) / len(samples) if samples else 0.0,
        "kept_reward": mean([s.reward for s in kept]) if kept else None,
    }
    if not kept:
        # Nothing reached the bar: the policy stays as it is rather than being trained on nothing.
        logger.warning("rest improve step %d: no sample reached the bar (%s %s); the policy is unchanged", step,
                       settings.filter, entry["bar"])
        return entry | {"eval_reward": None, "trained": False}, policy
    out = run_dir.path / f"improve-{step}"
    out.mkdir(parents=True, exist_ok=True)
    kept_path = out / KEPT_FILE
    write_jsonl(kept_path, ({"messages": [*s.prompt, {"role": "assistant", "content": s.completion}]} for s in kept))
    step_recipe = dataclasses.replace(
        recipe, model=policy_settings(recipe, policy),
        data=DataSettings(train=[DataSource(path=str(kept_path), format="messages")], seed=recipe.data.seed),
        train={**improve_train(recipe.train), "output_dir": str(out)})
    fitted = training.fit(step_recipe, RunDir(path=out, resume_from=last_checkpoint(out)), config_class=SFTConfig,
                          trainer_class=SFTTrainer, load_data=load_sft_data)
    score = held_out_reward(fitted.trainer.model, fitted.tokenizer)
    entry |= {"eval_reward": score, "trained": True, "train_loss": fitted.metrics.get("train/loss"),
              "train_steps": fitted.metrics.get("train/global_step")}
    logger.info("rest improve step %d (grow %d, improve %d): kept %d of %d (%.0f%%), held-out reward %s", step, grow,
                improve, len(kept), len(samples), 100 * entry["kept_fraction"],
                "n/a" if score is None else f"{score:.3f}")
    return entry, str(out)


def improve_train(train: dict[str, Any]) -> dict[str, Any]:
    """The SFTConfig options of an improve step: the train section's, without evaluation (the stage measures the
    held-out reward itself; the SFT trainer has no held-out set to evaluate)."""
    return {**train, "eval_strategy": "no"}


# ---- state, resume and results ------------------------------------------------------------------------------

def _finish(recipe: Recipe, run_dir: RunDir, state: LoopState) -> dict[str, Any]:
    history = state.history
    if state.policy is None:
        raise RecipeError("rest: no improve step kept any sample, so nothing was trained; lower rest.thresholds "
                          "(or rest.min_reward) or sample more (rest.samples_per_prompt)")
    adopt_final_model(run_dir, Path(state.policy), keep_out=(KEPT_FILE,))
    evaluated = [e for e in history if e.get("eval_reward") is not None]
    # The report's curves: per improve step, the mean sample reward and the held-out reward (also before step 1).
    start = [{"step": 0, "eval_reward": state.eval_reward_start}] if state.eval_reward_start is not None else []
    write_history(run_dir.path, [*start, *history])
    metrics: dict[str, Any] = {
        "rest/improve_steps": len(history),
        "rest/sample_reward_start": history[0]["sample_reward"],
        "rest/sample_reward_end": history[-1]["sample_reward"],
        "rest/kept_fraction_end": history[-1]["kept_fraction"],
    }
    if state.eval_reward_start is not None and evaluated:
        metrics["rest/eval_reward_start"] = state.eval_reward_start
        metrics["rest/eval_reward_end"] = evaluated[-1]["eval_reward"]
    return metrics


STAGE = Stage(name="rest", help="ReST / best-of-N: sample, keep the best answers, fine-tune (TRL SFTTrainer)",
              train_config=lambda: SFTConfig, run=run, sections={"reward": RewardSettings, "rest": RestSettings},
              required_sections=("rest",), rows="prompt", load_data=load_prompt_data, fused_head=True,
              train_configs=lambda recipe: [("train", SFTConfig, improve_train(recipe.train))])
