"""The question a rating model behind an API is asked about one answer (a reward source with ``api:``): a
template with the constitution, the prompt and the answer; the model answers with a digit from 0 to 9.

Kept free of client code, as :mod:`alignkit.recipe.settings.judge_text` is, so a recipe validates its template
without importing anything that talks to an endpoint.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from alignkit.recipe.settings.judge_text import DEFAULT_CONSTITUTION, render_prompt
from alignkit.suggest import did_you_mean

DEFAULT_RATING_TEMPLATE = (
    "How good is this answer to the prompt?\n"
    "Principles: {constitution}\n"
    "Prompt: {prompt}\n"
    "Answer: {answer}"
)
# Appended to the question: the reward is read from the probabilities of these digits.
RATING_INSTRUCTION = "Rate the answer from 0 (worst) to 9 (best). Reply with the digit only."
RATINGS = tuple(str(digit) for digit in range(10))
PLACEHOLDERS = ("constitution", "prompt", "answer")


def check_rating_template(template: str) -> None:
    """Raise ValueError for a rating template that cannot build a question (naming what is wrong)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"rating template is malformed ({err}); write {{{{ and }}}} for literal braces") from None
    for name in names:
        if name not in PLACEHOLDERS:
            raise ValueError(f"rating template has an unknown placeholder '{{{name}}}'."
                             f"{did_you_mean(name, PLACEHOLDERS)} Placeholders: "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    if "prompt" not in names or "answer" not in names:
        raise ValueError("rating template needs {prompt} and {answer}: the model would not see what it rates")


def rating_question(prompt: str | Sequence[dict[str, Any]], answer: str, *, template: str = DEFAULT_RATING_TEMPLATE,
                    constitution: str = DEFAULT_CONSTITUTION) -> str:
    """The user turn asking for a 0-9 rating of ``answer`` to ``prompt``."""
    body = template.format(constitution=constitution, prompt=render_prompt(prompt), answer=answer)
    return f"{body}\n{RATING_INSTRUCTION}"
