"""RLAIF: preference pairs labelled by an AI judge instead of people (Bai et al. 2022, Lee et al. 2023), then
DPO on them, or a reward model trained on them for PPO. Neither TRL (judges removed) nor the other toolkits
ship the loop; the training is TRL's DPO or reward trainer.

recipe -> prompts (``data``, prompt-only formats) -> the judge (``rlaif.judge``) -> for each iteration: sample
``samples_per_prompt`` answers per prompt with the current policy -> pair distinct answers -> the judge's
preference for each pair -> keep pairs with confidence >= ``min_confidence`` -> DPO the policy on them (or
train a reward model, ``objective: rm``) -> the held-out reward, when the recipe has a ``reward`` section to
monitor with (it never labels anything) -> run dir with the final policy (or reward model),
``rlaif_log.jsonl``, ``metrics.json`` and report.md (the held-out reward per iteration).

With ``rlaif.revision`` the loop starts with Constitutional AI's supervised stage: the policy answers
``revision.prompts`` prompts, the policy (or ``revision.model``) critiques each answer against the
constitution and rewrites it, and the policy is fine-tuned on the rewrites (TRL's SFT) in ``revision/``
(``revisions.jsonl``: answer, critiques, revisions; ``revised.jsonl``: the SFT rows); iteration 1 samples
from the revised policy.

Run dir layout: ``iteration-<i>/samples.jsonl`` (every sampled answer), ``pairs.jsonl`` (every judged pair:
the two answers, P(first is better), confidence, and the monitoring rewards), ``label_counts.json`` (answers
that could not be paired, the judge's skips), ``preferences.jsonl`` (the kept
pairs as prompt / chosen / rejected rows, loadable by the dpo and rm stages) and the iteration's training run
(checkpoints, the model after it); ``checkpoint-<i>/`` holds the loop's state after iteration i, written last.
An interrupted run resumes after its last complete iteration, inside one from the files it had written and
the trainer's last checkpoint.

metrics.json: ``rlaif/pairs_judged_end``, ``rlaif/pairs_kept_end``, ``rlaif/confidence_end`` (mean
confidence of the kept pairs), ``rlaif/label_agreement_end`` (kept labels the monitoring reward agrees
with), ``rlaif/eval_reward_start`` and ``_end`` (the monitoring reward of greedy answers to the held-out
prompts); every iteration's figures, the judge's skips included, are in ``rlaif_log.jsonl``.

The ``rlaif:`` section and the pairing of answers are in ``pairs``; what RLAIF shares with ReST (sampling,
loop state and resume) in :mod:`alignkit.stages.iterative`, with the preference stages in
:mod:`alignkit.stages.preference`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from functools import partial
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from alignkit import distributed
from alignkit.data import load_preference_data, load_prompt_data, load_sft_data, prepare
from alignkit.errors import RecipeError
from alignkit.feedback import LazyJudge
from alignkit.feedback.revision import Revision, RevisionSettings, critique_and_revise
from alignkit.feedback.rewards import monitoring_reward
from alignkit.generation import generate
from alignkit.models import modeling
from alignkit.recipe.loading import Recipe
from alignkit.recipe.settings import DataSettings, DataSource, ModelSettings, RewardSettings
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
from alignkit.stages.preference import check_dpo_train, check_starts_new_head
from alignkit.stages.rl_common import held_out_prompts
from alignkit.stages.rlaif.pairs import (
    Pair,
    RlaifSettings,
    confident_pairs,
    label_agreement,
    make_pairs,
    preference_row,
)

logger = logging.getLogger(__name__)

LOG_FILE, SAMPLES_FILE, PAIRS_FILE, COUNTS_FILE, PREFERENCES_FILE = (
    "rlaif_log.jsonl", "samples.jsonl", "pairs.jsonl", "label_counts.json", "preferences.jsonl")
REVISION_DIR, REVISIONS_FILE, REVISED_FILE = "revision", "revisions.jsonl", "revised.jsonl"
# What the revision fine-tune takes from the train section: transformers' own options (steps, batch sizes,
# precision, logging...) and max_length. Not the DPO ones: a DPO loss_type means something else to SFT.
SHARED_WITH_SFT = {f.name for f in dataclasses.fields(TrainingArguments) if f.init} | {"max_length"}


def run(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    settings: RlaifSettings = recipe.sections["rlaif"]
    monitor = monitoring_reward(recipe.sections.get("reward"))
    if settings.objective == "rm":
        check_starts_new_head(recipe, "rlaif objective rm")
    data = prepare(recipe.data, load_prompt_data)
    training.record_data(run_dir, data)
    # A reward model has no answers of its own to monitor.
    held_out = held_out_prompts(data.eval, recipe) if monitor is not None and settings.objective == "dpo" else None
    held_out_reward = partial(held_out_mean_reward, rows=held_out, reward=monitor, recipe=recipe,
                              max_new_tokens=settings.generation.max_new_tokens)
    judge = LazyJudge(settings.judge)

    state = load_loop_state(run_dir, LOG_FILE, "rlaif", "iteration")
    if state is None:
        start = None
        if held_out is not None:
            model, tokenizer = modeling.load_for_inference(recipe.model)
            start = held_out_reward(model, tokenizer)
            del model
        state = LoopState(eval_reward_start=start)
        if settings.revision is not None:
            entry, revised = _revise(recipe, settings.revision, run_dir, data.train, held_out_reward)
            state = dataclasses.replace(state, policy=revised, history=[entry])
            save_loop_state(run_dir, 0, state, LOG_FILE)  # checkpoint-0: a resumed run starts from the revised policy
    for iteration in range(state.completed + 1, settings.iterations + 1):
        entry, trained = _iteration(recipe, settings, run_dir, iteration, state.policy, data.train, judge, monitor,
                                    held_out_reward)
        state = dataclasses.replace(state, completed=iteration, history=[*state.history, entry],
                                    policy=trained or state.policy)
        save_loop_state(run_dir, iteration, state, LOG_FILE)
    return _finish(run_dir, state)


# ---- one iteration: sample, pair, judge, train --------------------------------------------------------------

def _iteration(recipe: Recipe, settings: RlaifSettings, run_dir: RunDir, iteration: int, policy: str | None,
               prompts_data, judge: LazyJudge, monitor, held_out_reward) -> tuple[dict[str, Any], str | None]:
    """Label pairs of the current policy's answers and train on them; (log entry, the trained run dir or None)."""
    out = run_dir.path / f"iteration-{iteration}"
    pairs, entry = _labelled_pairs(recipe, settings, out, iteration, policy, prompts_data, judge, monitor)
    kept = confident_pairs(pairs, settings.min_confidence)
    agreement = label_agreement(kept)
    entry |= {"iteration": iteration, "pairs_judged": len(pairs), "pairs_kept": len(kept),
              "confidence": mean([p.confidence for p in kept]) if kept else None,
              "label_agreement": agreement}
    logger.info("rlaif iteration %d: kept %d of %d judged pairs (confidence >= %s)%s", iteration, len(kept),
                len(pairs), settings.min_confidence,
                "" if agreement is None else f", {agreement:.0%} of them agree with the monitoring reward")
    if not kept:
        logger.warning("rlaif iteration %d: the judge decided no pair with confidence >= %s; nothing is trained",
                       iteration, settings.min_confidence)
        return entry | {"trained": False, "eval_reward": None}, None
    preferences = out / PREFERENCES_FILE
    if not preferences.is_file():
        write_jsonl(preferences, (preference_row(pair) for pair in kept))
    fitted = _train(recipe, settings, out, policy, preferences)
    entry |= {"trained": True, "train_loss": fitted.metrics.get("train/loss"),
              "train_steps": fitted.metrics.get("train/global_step"),
              "eval_reward": held_out_reward(fitted.trainer.model, fitted.tokenizer)}
    if entry["eval_reward"] is not None:
        logger.info("rlaif iteration %d: held-out reward %.3f", iteration, entry["eval_reward"])
    return entry, str(out)


def _labelled_pairs(recipe: Recipe, settings: RlaifSettings, out: Path, iteration: int, policy: str | None,
                    prompts_data, judge: LazyJudge, monitor) -> tuple[list[Pair], dict[str, Any]]:
    """This iteration's judged pairs and their counts, read back where an interrupted run wrote them."""
    pairs_path, samples_path, counts_path = out / PAIRS_FILE, out / SAMPLES_FILE, out / COUNTS_FILE
    if pairs_path.is_file():
        pairs = [Pair(**{k: v for k, v in row.items() if k != "confidence"}) for row in read_jsonl(pairs_path)]
        return pairs, json.loads(counts_path.read_text())
    if samples_path.is_file():
        samples = read_jsonl(samples_path)
    else:
        rows = draw_prompts(prompts_data, settings.prompts_per_iteration, f"{recipe.data.seed}-rlaif-{iteration}")
        sampling = dataclasses.replace(settings.generation, seed=settings.generation.seed + iteration)
        prompts, answers, columns = sample_answers(policy_settings(recipe, policy), rows, settings.samples_per_prompt,
                                                   sampling)
        rewards = monitor(prompts, answers, columns) if monitor is not None else [None] * len(answers)
        samples = [{"prompt": p, "answer": a, "reward": r} for p, a, r in zip(prompts, answers, rewards)]
        write_jsonl(samples_path, samples)
    pairing = make_pairs([s["prompt"] for s in samples], [s["answer"] for s in samples], settings.samples_per_prompt,
                         settings.pairs_per_prompt, random.Random(f"{recipe.data.seed}-rlaif-pairs-{iteration}"),
                         rewards=None if monitor is None else [s["reward"] for s in samples])
    pairs = pairing.pairs
    preferences = judge.compare([p.prompt for p in pairs], [p.first for p in pairs], [p.second for p in pairs])
    for pair, preference in zip(pairs, preferences):
        pair.preference = float(preference)
    counts = {"samples": len(samples), "sample_reward": mean([s["reward"] for s in samples])
              if monitor is not None else None, "empty_answers": pairing.empty_answers,
              "unpaired_prompts": pairing.unpaired_prompts}
    counts |= {f"judge_{name}": value for name, value in judge.take_stats().items()}
    # The counts first: pairs.jsonl marks the labelling complete, and a resumed run reports them as they were.
    distributed.write_text(counts_path, json.dumps(counts, indent=1))
    write_jsonl(pairs_path, (pair.to_row() for pair in pairs))
    return pairs, counts


def _train(recipe: Recipe, settings: RlaifSettings, out: Path, policy: str | None, preferences: Path):
    """DPO of the current policy (objective dpo) or a new reward model (objective rm) on the kept pairs, as a
    training run in ``out`` (resumed from its last checkpoint)."""
    step_recipe = dataclasses.replace(
        recipe, model=policy_settings(recipe, policy),
        data=DataSettings(train=[DataSource(path=str(preferences), format="preference")], seed=recipe.data.seed),
        train={**iteration_train(recipe.train), "output_dir": str(out)})
    run = RunDir(path=out, resume_from=last_checkpoint(out))
    load_pairs = partial(load_preference_data, kind="pairs")
    if settings.objective == "rm":
        return training.fit(step_recipe, run, config_class=RewardConfig, trainer_class=RewardTrainer,
                            load_data=load_pairs, head="reward")
    return training.fit(step_recipe, run, config_class=DPOConfig, trainer_class=DPOTrainer, load_data=load_pairs)


# ---- Constitutional AI's supervised stage ------------------------------------------------------------------

def _revise(recipe: Recipe, revision: RevisionSettings, run_dir: RunDir, prompts_data,
            held_out_reward) -> tuple[dict[str, Any], str]:
    """Critique and revise the policy's answers, fine-tune the policy on the revisions (TRL's SFT) in
    ``revision/``; (log entry, the revised policy's run dir)."""
    out = run_dir.path / REVISION_DIR
    path = out / REVISIONS_FILE
    if path.is_file():
        rows = read_jsonl(path)
    else:
        prompts = list(draw_prompts(prompts_data, revision.prompts, f"{recipe.data.seed}-rlaif-revision")["prompt"])
        model, tokenizer = modeling.load_for_inference(recipe.model)
        answers = generate(model, tokenizer, prompts, revision.generation)
        if revision.model is not None:
            del model
            model, tokenizer = modeling.load_for_inference(ModelSettings(name_or_path=revision.model))
        rows = [dataclasses.asdict(r) for r in critique_and_revise(model, tokenizer, prompts, answers, revision)]
        del model
        write_jsonl(path, rows)
    revised = [{"messages": [*row["prompt"], {"role": "assistant", "content": Revision(**row).final}]}
               for row in rows if Revision(**row).final]
    entry: dict[str, Any] = {"iteration": 0, "step": "revision", "answers": len(rows), "revised": len(revised),
                             "unrevised": len(rows) - len(revised)}
    logger.info("rlaif revision: %d of %d answers critiqued and rewritten", len(revised), len(rows))
    if not revised:
        raise RecipeError(f"rlaif revision: none of the {len(rows)} answers got a non-empty revision (see {path}); "
                          "check revision.model, its requests and revision.generation.max_new_tokens")
    write_jsonl(out / REVISED_FILE, revised)
    step_recipe = dataclasses.replace(
        recipe, data=DataSettings(train=[DataSource(path=str(out / REVISED_FILE), format="messages")],
                                  seed=recipe.data.seed),
        train={**revision_train(recipe.train, revision), "output_dir": str(out)})
    fitted = training.fit(step_recipe, RunDir(path=out, resume_from=last_checkpoint(out)), config_class=SFTConfig,
                          trainer_class=SFTTrainer, load_data=load_sft_data)
    entry |= {"trained": True, "train_loss": fitted.metrics.get("train/loss"),
              "train_steps": fitted.metrics.get("train/global_step"),
              "eval_reward": held_out_reward(fitted.trainer.model, fitted.tokenizer)}
    return entry, str(out)


# ---- results ------------------------------------------------------------------------------------------------

def _finish(run_dir: RunDir, state: LoopState) -> dict[str, Any]:
    history = [entry for entry in state.history if entry["iteration"] > 0]  # not the revision step
    if state.policy is None:
        raise RecipeError("rlaif: the judge decided no pair confidently enough in any iteration, so nothing was "
                          "trained; lower rlaif.min_confidence or sample more (rlaif.samples_per_prompt)")
    adopt_final_model(run_dir, Path(state.policy),
                      keep_out=(SAMPLES_FILE, PAIRS_FILE, COUNTS_FILE, PREFERENCES_FILE))
    last = history[-1]
    metrics: dict[str, Any] = {"rlaif/iterations": len(history), "rlaif/pairs_judged_end": last["pairs_judged"],
                               "rlaif/pairs_kept_end": last["pairs_kept"]}
    for name in ("confidence", "label_agreement", "sample_reward"):
        if last.get(name) is not None:
            metrics[f"rlaif/{name}_end"] = last[name]
    revision = next((entry for entry in state.history if entry["iteration"] == 0), None)
    if revision is not None:
        metrics["rlaif/revised_answers"] = revision["revised"]
        if revision.get("eval_reward") is not None:
            metrics["rlaif/revision_eval_reward"] = revision["eval_reward"]
    evaluated = [entry for entry in history if entry.get("eval_reward") is not None]
    if state.eval_reward_start is not None and evaluated:
        metrics["rlaif/eval_reward_start"] = state.eval_reward_start
        metrics["rlaif/eval_reward_end"] = evaluated[-1]["eval_reward"]
    # The report's curves: per iteration, the judged pairs' sample reward and the held-out reward (also before).
    start = [{"step": 0, "eval_reward": state.eval_reward_start}] if state.eval_reward_start is not None else []
    write_history(run_dir.path, [*start, *({"step": entry["iteration"], **entry} for entry in history)])
    return metrics


def _train_config(raw: dict[str, Any]) -> type:
    """The ``train`` section's TRL config: DPOConfig, or RewardConfig with ``rlaif.objective: rm``."""
    section = raw.get("rlaif")
    objective = section.get("objective", "dpo") if isinstance(section, dict) else "dpo"
    return RewardConfig if objective == "rm" else DPOConfig


def iteration_train(train: dict[str, Any]) -> dict[str, Any]:
    """The options of an iteration's DPO or reward-model training: the train section's, without evaluation (the
    loop measures the held-out reward itself; the trainer has no held-out pairs)."""
    return {**train, "eval_strategy": "no"}


def revision_train(train: dict[str, Any], revision: RevisionSettings) -> dict[str, Any]:
    """The SFTConfig options of the revision fine-tune: the train section's transformers options, then
    revision.sft's, without evaluation."""
    shared = {key: value for key, value in train.items() if key in SHARED_WITH_SFT}
    return {**shared, **revision.sft, "eval_strategy": "no"}


def _train_configs(recipe: Recipe) -> list[tuple[str, type, dict[str, Any]]]:
    """The TRL configs a run builds: each iteration's, and the revision step's (with rlaif.revision)."""
    settings: RlaifSettings = recipe.sections["rlaif"]
    objective = RewardConfig if settings.objective == "rm" else DPOConfig
    configs = [("train", objective, iteration_train(recipe.train))]
    if settings.revision is not None:
        configs.append(("rlaif.revision.sft", SFTConfig, revision_train(recipe.train, settings.revision)))
    return configs


STAGE = Stage(name="rlaif", help="RLAIF: an AI judge labels pairs of sampled answers, then DPO or a reward model "
              "(TRL DPOTrainer / RewardTrainer)", train_config=lambda: DPOConfig, train_config_of=_train_config,
              run=run, sections={"rlaif": RlaifSettings, "reward": RewardSettings}, required_sections=("rlaif",),
              check_train=check_dpo_train, rows="prompt", train_configs=_train_configs,
              load_data=load_prompt_data)
