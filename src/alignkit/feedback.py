"""Feedback on generated answers: reward models as scorers, judges that compare two answers, win rates.

A reward model trained by the ``rm`` stage loads back with ``RewardModel.load(run_dir)`` and scores
(prompt, answer) pairs; PPO, ReST and the evaluation's win rate use it. Anything that can compare two
answers to the same prompt is a ``Judge``: a reward model (``RewardModelJudge``) today, AI judges later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from alignkit import modeling
from alignkit.recipe import ModelSettings, is_run_with_adapter

Messages = list[dict[str, str]]


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
            model = PeftModel.from_pretrained(modeling.load_model(base, for_training=False, head="reward"), path)
            tokenizer = modeling.load_tokenizer(dataclasses.replace(base, tokenizer=path, chat_template=None))
        else:
            model = modeling.load_model(settings, for_training=False, head="reward")
            tokenizer = modeling.load_tokenizer(settings)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.eval()
        return cls(model=model, tokenizer=tokenizer, batch_size=batch_size)

    def score(self, prompts: Sequence[Messages], answers: Sequence[str]) -> list[float]:
        """The reward of each answer to its prompt, tokenised exactly as TRL's RewardTrainer does in training
        (the chat template over prompt + assistant turn)."""
        import torch

        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
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


class Judge(Protocol):
    """Compares two answers to each prompt."""

    def compare(self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str]) -> list[float]:
        """Per prompt, how much ``first`` beats ``second``: > 0 first is better, < 0 second is, 0 a tie."""
        ...


@dataclass
class RewardModelJudge:
    """A judge from a reward model: the difference of the two answers' rewards."""

    reward_model: RewardModel

    def compare(self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str]) -> list[float]:
        first_scores = self.reward_model.score(prompts, first)
        second_scores = self.reward_model.score(prompts, second)
        return [a - b for a, b in zip(first_scores, second_scores)]


def win_rates(preferences: Sequence[float], tie_margin: float = 0.0) -> dict[str, float]:
    """Win / tie / loss rates of the first answers from a judge's preferences; ``|p| <= tie_margin`` is a tie."""
    if not preferences:
        raise ValueError("no comparisons to count")
    wins = sum(p > tie_margin for p in preferences)
    losses = sum(p < -tie_margin for p in preferences)
    count = len(preferences)
    return {"win_rate": wins / count, "tie_rate": (count - wins - losses) / count, "loss_rate": losses / count}
