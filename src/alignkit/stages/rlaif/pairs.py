"""The ``rlaif:`` section of an rlaif recipe, and how sampled answers become AI-labelled preference pairs.

    rlaif:
      iterations: 2              # label with the current policy, train, and again
      samples_per_prompt: 4      # N answers sampled per prompt; every two distinct ones make a pair
      pairs_per_prompt: 2        # judge at most this many of a prompt's pairs (null: all N(N-1)/2)
      min_confidence: 0.2        # keep pairs the judge decided with |2p - 1| >= 0.2
      objective: dpo             # dpo: train the policy on the pairs; rm: train a reward model (for ppo)
      judge: {kind: llm, model: runs/demo-judge, constitution: ...}
      revision: {constitution: ..., rounds: 1, sft: {max_steps: 100}}   # optional: critique -> revision SFT first

A judge returns ``p``, the probability that the first answer is the better one; the pair's label is the
answer it prefers and its *confidence* is ``|2p - 1|`` (0: a tie, 1: certain). Every judged pair is written
to the run dir with both; the ones at or above ``min_confidence`` are the training set.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.feedback.revision import RevisionSettings
from alignkit.recipe.settings import GenerationSettings, JudgeSettings


def _sampling() -> GenerationSettings:
    return GenerationSettings(do_sample=True, temperature=1.0, max_new_tokens=64)


@dataclass
class RlaifSettings:
    """RLAIF's loop: sample answers, have a judge label pairs of them, train on the confident labels."""

    judge: JudgeSettings | None = field(
        default=None,
        metadata={"help": "The AI judge that labels the pairs (required): {kind: llm | reward_model | rule, ...}, see "
                  "alignkit.feedback.JudgeSettings; a path alone is a reward model."},
    )
    iterations: int = field(
        default=1,
        metadata={"help": "Rounds of sample -> label -> train; each samples from the policy the previous round "
                  "trained (objective dpo only)."},
    )
    samples_per_prompt: int = field(default=4, metadata={"help": "Answers sampled per prompt (at least 2)."})
    prompts_per_iteration: int | None = field(
        default=None,
        metadata={"help": "Prompts sampled in each iteration, drawn afresh from the training prompts (null: all)."},
    )
    pairs_per_prompt: int | None = field(
        default=None,
        metadata={"help": "Pairs judged per prompt, drawn from all pairs of its distinct answers (null: every pair)."},
    )
    min_confidence: float = field(
        default=0.0,
        metadata={"help": "Train only on pairs the judge decided with confidence |2p - 1| at least this (0 to 1); "
                  "ties (p = 0.5) are never kept."},
    )
    objective: Literal["dpo", "rm"] = field(
        default="dpo",
        metadata={"help": "dpo: train the policy on the labelled pairs (train: TRL's DPOConfig); rm: train a reward "
                  "model on them (train: TRL's RewardConfig), a reward source for ppo."},
    )
    generation: GenerationSettings = field(
        default_factory=_sampling, metadata={"help": "How answers are sampled (do_sample true; temperature, top_p...)."}
    )
    revision: RevisionSettings | None = field(
        default=None,
        metadata={"help": "Constitutional AI's supervised stage before the first iteration: the policy (or "
                  "revision.model) critiques and rewrites its answers against revision.constitution, and the policy "
                  "is fine-tuned on the rewrites (null: no such step)."},
    )

    def __post_init__(self) -> None:
        if self.judge is None:
            raise ValueError("needs a judge, e.g. judge: {kind: llm, model: runs/demo-judge} or judge: runs/demo-rm")
        for name in ("iterations", "samples_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2: a pair needs two answers to the same prompt")
        for name in ("prompts_per_iteration", "pairs_per_prompt"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {getattr(self, name)}")
        if not 0 <= self.min_confidence < 1:
            raise ValueError(f"min_confidence must lie in [0, 1), got {self.min_confidence}")
        if self.objective == "rm" and self.iterations != 1:
            raise ValueError("objective rm trains a reward model, which does not change the policy that samples: "
                             "set iterations: 1 (then run ppo with the reward model)")
        if not self.generation.do_sample:
            raise ValueError("generation.do_sample must be true: a prompt's answers have to differ to make pairs")


@dataclass
class Pair:
    """Two distinct answers to one prompt and the judge's verdict: ``preference`` is P(first is better)."""

    prompt_index: int
    prompt: Any
    first: str
    second: str
    preference: float = 0.5
    first_reward: float | None = None  # the monitoring reward (the recipe's reward section), when there is one
    second_reward: float | None = None

    @property
    def confidence(self) -> float:
        """How decided the judge was: 0 for a tie, 1 for certain."""
        return abs(2 * self.preference - 1)

    @property
    def chosen_and_rejected(self) -> tuple[str, str]:
        """The preferred answer, then the other."""
        return (self.first, self.second) if self.preference > 0.5 else (self.second, self.first)

    def to_row(self) -> dict[str, Any]:
        """The pair as written to pairs.jsonl."""
        return {"prompt_index": self.prompt_index, "prompt": self.prompt, "first": self.first, "second": self.second,
                "preference": self.preference, "confidence": self.confidence, "first_reward": self.first_reward,
                "second_reward": self.second_reward}


@dataclass
class Pairing:
    """The pairs made from one iteration's samples, and what could not be paired."""

    pairs: list[Pair]
    empty_answers: int
    unpaired_prompts: int  # prompts with fewer than two distinct non-empty answers


def make_pairs(prompts: Sequence[Any], answers: Sequence[str], samples_per_prompt: int,
               pairs_per_prompt: int | None, rng: random.Random,
               rewards: Sequence[float] | None = None) -> Pairing:
    """Pairs of distinct answers to the same prompt (``prompts`` / ``answers`` hold ``samples_per_prompt``
    consecutive samples per prompt). Empty answers are left out and counted; an answer sampled twice is one
    answer; at most ``pairs_per_prompt`` pairs per prompt, drawn with ``rng``; which answer comes first is
    random, so a judge's taste for a position cannot line up with the sampling order."""
    if len(prompts) != len(answers) or len(answers) % samples_per_prompt:
        raise ValueError(f"{len(answers)} answers to {len(prompts)} prompts is not {samples_per_prompt} per prompt")
    pairs: list[Pair] = []
    empty = unpaired = 0
    for index, start in enumerate(range(0, len(answers), samples_per_prompt)):
        distinct: dict[str, int] = {}  # answer text -> the position of its first sample
        for position in range(start, start + samples_per_prompt):
            if not answers[position].strip():
                empty += 1
            else:
                distinct.setdefault(answers[position].strip(), position)
        candidates = list(itertools.combinations(distinct.values(), 2))
        if not candidates:
            unpaired += 1
            continue
        if pairs_per_prompt is not None and len(candidates) > pairs_per_prompt:
            candidates = rng.sample(candidates, pairs_per_prompt)
        for a, b in candidates:
            if rng.random() < 0.5:
                a, b = b, a
            pairs.append(Pair(prompt_index=index, prompt=prompts[a], first=answers[a], second=answers[b],
                              first_reward=None if rewards is None else float(rewards[a]),
                              second_reward=None if rewards is None else float(rewards[b])))
    return Pairing(pairs=pairs, empty_answers=empty, unpaired_prompts=unpaired)


def confident_pairs(pairs: Sequence[Pair], min_confidence: float) -> list[Pair]:
    """The pairs to train on: decided (not a tie) with confidence at least ``min_confidence``."""
    return [pair for pair in pairs if pair.preference != 0.5 and pair.confidence >= min_confidence]


def preference_row(pair: Pair) -> dict[str, Any]:
    """A judged pair as a preference row (prompt / chosen / rejected messages), with the judge's confidence."""
    chosen, rejected = pair.chosen_and_rejected
    return {"prompt": pair.prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "confidence": pair.confidence}


def label_agreement(pairs: Sequence[Pair]) -> float | None:
    """Share of labelled pairs whose chosen answer the monitoring reward also ranks higher, over the pairs the
    reward tells apart (None when there is no reward or it ties every pair)."""
    scored = [pair for pair in pairs if pair.first_reward is not None and pair.first_reward != pair.second_reward]
    if not scored:
        return None
    agree = sum((pair.preference > 0.5) == (pair.first_reward > pair.second_reward) for pair in scored)
    return agree / len(scored)
