"""Rewards for tests of PPO's mechanics: a learning signal that exists on every build of the demo model.

The bare demo base echoes the prompt's word on some builds (the demo model is pretrained on each machine), so the
demo's reversal reward is 0 for every answer of a first rollout and PPO rightly gets no gradient at all. Tests
that check what an optimizer step does (the adapter moves, gradients are scaled or clipped) need answers that
score differently whatever the build: the answer's length does, since the prompts' words differ in length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# As a recipe override, for in-process trainers (pytest puts tests/ on sys.path).
ANSWER_LENGTH_REWARD = "reward.sources=[{function: signal_rewards:answer_length_reward}]"


def answer_length_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Characters in each completion's text, scaled to about [0, 1] for the demo's one-word answers."""
    return [len(completion if isinstance(completion, str) else str(completion)) / 10 for completion in completions]
