"""Row formats and their normalisation to TRL's conversational format (``{"messages": [...]}``).

Accepted for SFT:
  ``messages``           ``{"messages": [{"role": "user", "content": ...}, ...]}`` (TRL's own)
  ``prompt_completion``  ``{"prompt": str | messages, "completion": str | messages}``
  ``alpaca``             ``{"instruction": str, "input": str (optional), "output": str}``
  ``sharegpt``           ``{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}``
``auto`` picks the format from the columns. A row that does not fit raises :class:`RowError`; the caller
counts and reports those rows instead of failing on the first one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "tool": "tool", "function": "tool",
}


class RowError(ValueError):
    """A row that does not fit its format; the message names the field and the problem."""


def _text(row: dict, key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RowError(f"'{key}' is missing" if value is None else f"'{key}' is not a string")
    if required and not value.strip():
        raise RowError(f"'{key}' is empty")
    return value


def _check_messages(messages: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"'{key}' is not a non-empty list of messages")
    checked = []
    for message in messages:
        if not isinstance(message, dict):
            raise RowError(f"'{key}' holds a message that is not a mapping")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"'{key}' has a message with role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise RowError(f"'{key}' has a message whose 'content' is not a string")
        checked.append({"role": role, "content": content})
    return checked


def _require_assistant_turn(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowError("no non-empty assistant message to learn from")
    return messages


def from_messages(row: dict) -> list[dict[str, str]]:
    return _require_assistant_turn(_check_messages(row.get("messages"), "messages"))


def from_prompt_completion(row: dict) -> list[dict[str, str]]:
    prompt, completion = row.get("prompt"), row.get("completion")
    prompt_messages = (
        [{"role": "user", "content": _text(row, "prompt")}] if not isinstance(prompt, list)
        else _check_messages(prompt, "prompt")
    )
    completion_messages = (
        [{"role": "assistant", "content": _text(row, "completion")}] if not isinstance(completion, list)
        else _check_messages(completion, "completion")
    )
    return _require_assistant_turn(prompt_messages + completion_messages)


def from_alpaca(row: dict) -> list[dict[str, str]]:
    instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]


def from_sharegpt(row: dict) -> list[dict[str, str]]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowError("'conversations' is not a non-empty list of turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RowError("'conversations' has a turn without a string 'value'")
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise RowError(f"'conversations' has a turn from {turn.get('from')!r} (expected human, gpt or system)")
        messages.append({"role": role, "content": turn["value"]})
    return _require_assistant_turn(messages)


SFT_FORMATS: dict[str, Callable[[dict], list[dict[str, str]]]] = {
    "messages": from_messages,
    "prompt_completion": from_prompt_completion,
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
}

# Columns that identify each format, most specific first.
_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("messages", frozenset({"messages"})),
    ("sharegpt", frozenset({"conversations"})),
    ("alpaca", frozenset({"instruction", "output"})),
    ("prompt_completion", frozenset({"prompt", "completion"})),
)


def detect_format(columns: Iterable[str]) -> str | None:
    """The format whose identifying columns are all present, or None."""
    present = set(columns)
    for name, needed in _SIGNATURES:
        if needed <= present:
            return name
    return None


def apply_template(row: dict, template: str) -> dict:
    """Set the row's ``prompt`` to ``template`` filled from its columns (``{document}`` -> row["document"])."""
    try:
        return {**row, "prompt": template.format_map(row)}
    except KeyError as err:
        raise RowError(f"the prompt template needs a column '{err.args[0]}'") from None
    except (ValueError, IndexError) as err:  # a stray { or } in the template: write {{ and }} for literal braces
        raise RowError(f"the prompt template is malformed ({err})") from None


def add_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend ``system_prompt`` unless the conversation already starts with a system message."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]
