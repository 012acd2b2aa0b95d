"""The demo's ground-truth rule rewards for the word-reversal task (``reverse: a b c`` -> ``c b a``).

The reversal task has a right answer that a rule can check, so the RL demo recipes (ppo, grpo, rloo on
``demo:reverse/prompts``) can reward the policy without a learned reward model, or compare one against the
truth. Recipes name these functions by import path in their ``reward:`` section::

    reward:
      sources:
        - {function: alignkit.demo.rewards:reversal_reward}

Both follow TRL's reward-function signature, ``f(prompts, completions, **columns) -> list[float]``, as
TRL's GRPO / RLOO trainers and alignkit's PPO call them (``completion_ids``, ``trainer_state`` and the
dataset's other columns arrive as keyword arguments and are ignored). Prompts are strings or message
lists; completions are strings, one message, or message lists (``[{"role": "assistant", "content": ...}]``).
A prompt that is not a reversal prompt raises ValueError: a rule applied to the wrong data should fail
loudly rather than hand out zeros.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# The reversal task's prompt is this instruction and the words to reverse (the demo data in
# alignkit.demo.tasks writes it, the rewards here read it).
REVERSE_INSTRUCTION = "reverse:"

# Chat-format special tokens (the demo's <|end|>, <|assistant|>, ...): they end a string prompt's phrase,
# and are not words of an answer decoded with them.
_SPECIAL_TOKEN = re.compile(r"<\|[^|<>]*\|>")


def _shown(prompt: Any, limit: int = 200) -> str:
    text = repr(prompt)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _last_user_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1].get("content"), str):
            return users[-1]["content"]
    raise ValueError(f"not a reversal prompt (no user message): {_shown(prompt)}")


def reversal_answer(prompt: str | Sequence[dict[str, Any]]) -> list[str]:
    """The right answer to a reversal prompt, as words.

    The phrase is the words after the last ``reverse:`` of the last user message (of the whole text, for a
    string prompt), up to the end of that line or the first special token such as ``<|end|>``, so a
    chat-formatted string prompt works too. Raises ValueError, naming the prompt, when there is no
    ``reverse:`` or no word after it.
    """
    text = _last_user_text(prompt)
    _, found, phrase = text.rpartition(REVERSE_INSTRUCTION)
    if not found:
        raise ValueError(f"not a reversal prompt (no '{REVERSE_INSTRUCTION}'): {_shown(prompt)}")
    words = _SPECIAL_TOKEN.split(phrase, maxsplit=1)[0].split("\n", 1)[0].split()
    if not words:
        raise ValueError(f"not a reversal prompt (nothing after '{REVERSE_INSTRUCTION}'): {_shown(prompt)}")
    return words[::-1]


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, Sequence) and all(isinstance(m, dict) for m in completion):
        # Assistant turns (a message without a role counts as one); a tool call's result is not the answer.
        return " ".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")
    raise TypeError(f"a completion must be a string or assistant messages, not {type(completion).__name__}")


def completion_words(completion: str | dict[str, Any] | Sequence[dict[str, Any]]) -> list[str]:
    """The words of a completion (a string, one message or a message list), special tokens left out."""
    return _SPECIAL_TOKEN.sub(" ", _completion_text(completion)).split()


def reversal_score(prompt: str | Sequence[dict[str, Any]],
                   completion: str | dict[str, Any] | Sequence[dict[str, Any]]) -> float:
    """Partial credit in [0, 1]: positions where the answer has the right word, over the longer length.

    ``matches / max(len(right answer), len(answer))``, so a missing word, an extra word and a word out of
    place all cost; an empty answer scores 0.0 and only the exact reversal scores 1.0.
    """
    right, words = reversal_answer(prompt), completion_words(completion)
    if not words:
        return 0.0
    return sum(a == b for a, b in zip(right, words)) / max(len(right), len(words))


def _check_lengths(prompts: Sequence[Any], completions: Sequence[Any]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")


def reversal_reward(prompts: Sequence[str | Sequence[dict[str, Any]]],
                    completions: Sequence[str | dict[str, Any] | Sequence[dict[str, Any]]],
                    **kwargs: Any) -> list[float]:
    """The demo's rule reward: :func:`reversal_score` of each (prompt, completion), in [0, 1].

    Named in recipes as ``alignkit.demo.rewards:reversal_reward``; other keyword arguments are ignored.
    """
    _check_lengths(prompts, completions)
    return [reversal_score(prompt, completion) for prompt, completion in zip(prompts, completions)]


def exact_reversal_reward(prompts: Sequence[str | Sequence[dict[str, Any]]],
                          completions: Sequence[str | dict[str, Any] | Sequence[dict[str, Any]]],
                          **kwargs: Any) -> list[float]:
    """1.0 for exactly the reversed words (spacing aside), else 0.0: the demo's success rate as a reward.

    Named in recipes as ``alignkit.demo.rewards:exact_reversal_reward``; other keyword arguments are ignored.
    """
    _check_lengths(prompts, completions)
    return [float(completion_words(completion) == reversal_answer(prompt))
            for prompt, completion in zip(prompts, completions)]
