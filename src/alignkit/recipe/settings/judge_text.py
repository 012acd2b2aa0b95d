"""The question an LLM judge is asked: a template with the constitution, the prompt and two labelled answers.

Kept free of model code so that data builders can import it: a judge fine-tuned on questions built here
(the demo's ``reverse/judge`` set) is later asked exactly the same questions by :class:`LLMJudge`.

Placeholders of a template: ``{constitution}``, ``{prompt}``, ``{answer_1}``, ``{answer_2}``,
``{option_1}``, ``{option_2}`` (the option labels, "1" and "2" by default). Write ``{{`` and ``}}`` for
literal braces. The judge adds the closing instruction itself (:data:`ANSWER_INSTRUCTION`, or
:data:`REASONING_INSTRUCTION` with chain of thought), so a template only lays out the material.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from alignkit.suggest import did_you_mean

DEFAULT_CONSTITUTION = ("Prefer the answer that does what the prompt asks, correctly, helpfully and honestly.")

# Short on purpose: every word costs prompt tokens on every comparison, and the demo judge (a ~1M model
# with a 256-token context) is trained on exactly these questions.
DEFAULT_TEMPLATE = (
    "Which answer to the prompt is better?\n"
    "Principles: {constitution}\n"
    "Prompt: {prompt}\n"
    "Answer {option_1}: {answer_1}\n"
    "Answer {option_2}: {answer_2}"
)

# Appended to the question; the judge's preference is read from its next token, so it must answer with a label.
ANSWER_INSTRUCTION = "Reply {option_1} or {option_2}."
# Chain of thought: the question ends with this instead, the judge writes its reasoning, and a second user
# turn (ANSWER_INSTRUCTION) asks for the label, whose probabilities are then read.
REASONING_INSTRUCTION = "First explain briefly which answer follows the principles better; give no verdict yet."

PLACEHOLDERS = ("constitution", "prompt", "answer_1", "answer_2", "option_1", "option_2")
REQUIRED_PLACEHOLDERS = ("prompt", "answer_1", "answer_2")


def placeholders_of(template: str) -> list[str]:
    """The ``{names}`` a template uses, in order (ValueError for malformed braces)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def check_template(template: str, constitution: str | None = None) -> None:
    """Raise ValueError for a template that cannot build a judge question (naming what is wrong)."""
    try:
        names = placeholders_of(template)
    except ValueError as err:
        raise ValueError(f"judge template is malformed ({err}); write {{{{ and }}}} for literal braces") from None
    for name in names:
        if name not in PLACEHOLDERS:
            raise ValueError(f"judge template has an unknown placeholder '{{{name}}}'."
                             f"{did_you_mean(name, PLACEHOLDERS)} Placeholders: "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    missing = [name for name in REQUIRED_PLACEHOLDERS if name not in names]
    if missing:
        raise ValueError(f"judge template lacks {', '.join('{' + m + '}' for m in missing)}: the judge would not "
                         "see what it compares")
    if constitution and "constitution" not in names:
        raise ValueError("a constitution is given but the judge template has no {constitution} placeholder")


def render_prompt(prompt: str | Sequence[dict[str, Any]]) -> str:
    """A prompt as text: a lone user message is its content; a longer conversation is one ``role: content``
    line per message."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if len(messages) == 1 and messages[0].get("role") == "user":
        return str(messages[0]["content"])
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


def judge_question(prompt: str | Sequence[dict[str, Any]], answer_1: str, answer_2: str, *,
                   template: str = DEFAULT_TEMPLATE, constitution: str = DEFAULT_CONSTITUTION,
                   options: Sequence[str] = ("1", "2"), reasoning: bool = False,
                   reasoning_instruction: str = REASONING_INSTRUCTION) -> str:
    """The user turn that asks a judge which of two answers to ``prompt`` is better.

    ``answer_1`` is shown under ``options[0]``, ``answer_2`` under ``options[1]``. With ``reasoning`` the
    question ends with ``reasoning_instruction`` (chain of thought: explain first), otherwise it asks for a
    label straight away.
    """
    option_1, option_2 = options
    body = template.format(constitution=constitution, prompt=render_prompt(prompt), answer_1=answer_1,
                           answer_2=answer_2, option_1=option_1, option_2=option_2)
    closing = reasoning_instruction if reasoning else answer_instruction(options)
    return f"{body}\n{closing}"


def answer_instruction(options: Sequence[str]) -> str:
    """The instruction asking for one of the two option labels."""
    return ANSWER_INSTRUCTION.format(option_1=options[0], option_2=options[1])
