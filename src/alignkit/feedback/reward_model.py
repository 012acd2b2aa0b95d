"""Reward models as scorers, and the judge built on one.

A reward model trained by the ``rm`` stage loads back with ``RewardModel.load(run_dir)`` and scores
(prompt, answer) pairs; PPO, ReST and the evaluation's win rate use it. ``RewardModelJudge`` turns two
rewards into a preference probability the way the reward model was trained to mean them: Bradley-Terry,
``P(first better) = sigmoid(r_first - r_second)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit import distributed
from alignkit.feedback.base import JudgeStats, Messages, check_lengths, sigmoid
from alignkit.models import modeling
from alignkit.recipe.settings import ModelSettings, is_run_with_adapter


@dataclass
class RewardModel:
    """A scalar reward head over a language model: ``score(prompts, answers)`` -> one float per answer."""

    model: Any
    tokenizer: Any
    batch_size: int = 32

    @classmethod
    def load(cls, name_or_path: str | Path, batch_size: int = 32) -> RewardModel:
        """An ``rm`` run dir (base + adapter with its reward head, or a full model), or any local or hub
        sequence classifier with one label."""
        settings = ModelSettings(name_or_path=str(name_or_path))
        path = modeling.resolve_path(settings.name_or_path)
        if is_run_with_adapter(path):
            from peft import PeftModel

            base = modeling.base_settings_of_adapter(Path(path), settings)
            # The adapter brings the reward head the base lacks: transformers' load report would call the head
            # "newly initialized" (a warning for a head that is about to be loaded), so it is kept quiet here.
            with _transformers_errors_only():
                base_model = modeling.load_model(base, for_training=False, head="reward")
            model = PeftModel.from_pretrained(base_model, path)
            tokenizer = modeling.load_tokenizer(dataclasses.replace(base, tokenizer=path, chat_template=None))
        else:
            model = modeling.load_model(settings, for_training=False, head="reward")
            tokenizer = modeling.load_tokenizer(settings)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.eval()
        return cls(model=model, tokenizer=tokenizer, batch_size=batch_size)

    def score(self, prompts: Sequence[Messages], answers: Sequence[str]) -> list[float]:
        """The reward of each answer to its prompt, tokenised exactly as TRL's RewardTrainer does in training
        (the chat template over prompt + assistant turn).

        With several processes, each passes its own rows (PPO's rollouts, the completions TRL gives a reward
        function on each process) or all pass the same (held-out answers), and each gets the scores of the
        rows it passed (``distributed.map_local``; the same rows everywhere are scored in shares). With
        ``ALIGNKIT_RECORD_SCORES=DIR`` set, every process appends what it scored to DIR/scores-<rank>.jsonl,
        to check on a cluster that each score belongs to its answer (docs/multi-gpu.md)."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        # A model sharded across the processes (FSDP, ZeRO-3 after training) needs every process in every
        # forward pass: then all score as many rows, and so run the same number of batches.
        sharded = distributed.is_sharded(self.model)
        scores = distributed.map_local(self._score_block, list(prompts), list(answers), equal_shards=sharded)
        _record_scores(prompts, answers, scores)
        return scores

    def _score_block(self, prompts: Sequence[Messages], answers: Sequence[str]) -> list[float]:
        import torch

        conversations = [[*prompt, {"role": "assistant", "content": answer}]
                         for prompt, answer in zip(prompts, answers, strict=True)]
        scores: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(conversations), self.batch_size):
            batch = [self._token_ids(conversation) for conversation in conversations[start:start + self.batch_size]]
            width = max(len(ids) for ids in batch)
            # Right padding: the classifier reads the last non-pad token of each row.
            input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention_mask[row, :len(ids)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scores += logits[:, 0].float().tolist()
        return scores

    def _token_ids(self, conversation: Messages) -> list[int]:
        ids = self.tokenizer.apply_chat_template(conversation, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@dataclass
class RewardModelJudge:
    """A judge from a reward model: ``sigmoid(r_first - r_second)``, the Bradley-Terry probability the
    reward model was trained on (TRL's RewardTrainer minimises ``-log sigmoid(r_chosen - r_rejected)``).

    Every answer is scored, empty ones included: the reward model has learned what they are worth.
    """

    reward_model: RewardModel
    stats: JudgeStats = field(default_factory=JudgeStats)

    def compare(self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str]) -> list[float]:
        """Per prompt, the probability that ``first`` is the better answer."""
        check_lengths(prompts, first, second)
        first_scores = self.reward_model.score(prompts, first)
        second_scores = self.reward_model.score(prompts, second)
        self.stats.compared += len(prompts)
        return [sigmoid(a - b) for a, b in zip(first_scores, second_scores)]


RECORD_SCORES_ENV = "ALIGNKIT_RECORD_SCORES"


def _record_scores(prompts: Sequence[Messages], answers: Sequence[str], scores: Sequence[float]) -> None:
    """Append each (prompt, answer, score) this process scored to $ALIGNKIT_RECORD_SCORES/scores-<rank>.jsonl
    when that variable names a directory; nothing otherwise."""
    directory = os.environ.get(RECORD_SCORES_ENV)
    if not directory:
        return
    path = Path(directory) / f"scores-{distributed.process_index()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        for prompt, answer, score in zip(prompts, answers, scores, strict=True):
            out.write(json.dumps({"prompt": list(prompt), "answer": answer, "score": score}) + "\n")


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """transformers logs only errors inside the block."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
