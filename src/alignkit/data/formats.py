"""Row formats and their normalisation to TRL's conversational format (``{"messages": [...]}``).

Accepted for SFT:
  ``messages``           ``{"messages": [{"role": "user", "content": ...}, ...]}`` (TRL's own)
  ``prompt_completion``  ``{"prompt": str | messages, "completion": str | messages}``
  ``alpaca``             ``{"instruction": str, "input": str (optional), "output": str}``
  ``sharegpt``           ``{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}``
  ``text``               ``{"text": str}``: raw text for continued pretraining (loss on every token)
A message's ``content`` is a string or a list of typed parts (``[{"type": "text", "text": ...}]``, joined); an
assistant turn may carry ``tool_calls`` (OpenAI's form; arguments kept as JSON text) and a ``tool`` turn a
``tool_call_id`` / ``name``; a row's ``tools`` (function schemas) reach the chat template through TRL.
Accepted for preference stages (rm, dpo, orpo need pairs; kto takes pairs or unpaired rows):
  ``preference``           ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``
  ``implicit_preference``  ``{"chosen": messages, "rejected": messages}``: full conversations; the shared
                           leading messages are the prompt
  ``rated``                ``{"prompt": str | messages, "completions": [...], "ratings": [...]}`` or completions as
                           ``{"response" | "text" | "content": str, "rating" | "score" | "overall_score": number}``
                           (UltraFeedback-like); one pair per row, chosen by the ``pairing`` rule
  ``unpaired``             ``{"prompt": str | messages, "completion": str | messages, "label": bool}`` (kto only)
Preference rows come out in TRL's conversational form: ``prompt`` is messages ending with a user turn and
``chosen`` / ``rejected`` / ``completion`` are assistant messages.
Accepted for prompt-only stages (ppo, grpo, rloo: the policy writes the answers):
  ``prompt_only``        ``{"prompt": str | messages}``
  ``prompt_completion``  ``{"prompt": str | messages, "completion": str | messages}``: the completion becomes the
                         ``reference`` (text)
  ``messages``           ``{"messages": [...]}``: the prompt is every message before the last one, which must be
                         the assistant's; its text becomes the ``reference``
Prompt rows come out as ``{"prompt": messages ending with a user turn, "reference": str (if made), **columns}``:
every other column is kept unchanged, because reward functions receive a dataset's columns as keyword
arguments (a reference answer, test cases, ...). Any JSON value is kept; the loader makes one column hold one
kind of value (string, number, boolean, list or mapping) per dataset, as Arrow stores it (so a mapping comes
back with every key its column has, None where its row had none). Columns named like the arguments TRL
itself passes to reward functions (:data:`RESERVED_COLUMNS`) are dropped, with a warning from the loader.

``auto`` picks the format from the columns. A row that does not fit raises :class:`RowError`; the caller
counts and reports those rows instead of failing on the first one.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from typing import Any, Literal

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


def _content(content: Any, key: str) -> str:
    """A message's content as text: a string, or a list of typed parts (OpenAI's form) whose text parts are
    joined; a part of another type (an image, audio) is a bad row, since the model reads text only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RowError(f"'{key}' has a message whose 'content' is not a string")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise RowError(f"'{key}' has a message with a content part of type {kind!r} (only text parts are read)")
        if not isinstance(part.get("text"), str):
            raise RowError(f"'{key}' has a text part without a string 'text'")
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(calls: Any, key: str) -> list[dict[str, Any]]:
    """An assistant turn's tool calls in OpenAI's form, each function's arguments as JSON text (one Arrow
    column cannot hold every function's own argument names). A flat ``{"name", "arguments"}`` call is accepted."""
    if not isinstance(calls, list) or not calls:
        raise RowError(f"'{key}' has a message whose 'tool_calls' is not a non-empty list")
    normalised = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowError(f"'{key}' has a tool call without a function name")
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        normalised.append({"id": call.get("id"), "type": call.get("type", "function"),
                           "function": {"name": function["name"], "arguments": arguments}})
    return normalised


def _check_messages(messages: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"'{key}' is not a non-empty list of messages")
    checked = []
    for message in messages:
        if not isinstance(message, dict):
            raise RowError(f"'{key}' holds a message that is not a mapping")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"'{key}' has a message with role {role!r} (expected one of {', '.join(ROLES)})")
        calls = message.get("tool_calls")
        if calls is not None and role != "assistant":
            raise RowError(f"'{key}' has tool calls in a {role} message (only the assistant calls tools)")
        if calls is not None and content is None:  # a turn that only calls tools has no text
            content = ""
        checked_message: dict[str, Any] = {"role": role, "content": _content(content, key)}
        if calls is not None:
            checked_message["tool_calls"] = _tool_calls(calls, key)
        if role == "tool":
            for field in ("tool_call_id", "name"):
                if isinstance(message.get(field), str):
                    checked_message[field] = message[field]
        checked.append(checked_message)
    return checked


def _require_assistant_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in messages):
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


def from_text(row: dict) -> str:
    """``{"text": str}``: raw text for continued pretraining (TRL's language-modelling type); the loss is on
    every token."""
    return _text(row, "text")


SFT_FORMATS: dict[str, Callable[[dict], Any]] = {
    "messages": from_messages,
    "prompt_completion": from_prompt_completion,
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "text": from_text,
}


def _tools(value: Any) -> str:
    """The functions a conversation may call (a ``tools`` column: a list of JSON schemas, or that list as JSON
    text) as JSON text, which TRL decodes before it renders the chat template."""
    tools = value
    if isinstance(value, str):
        try:
            tools = json.loads(value)
        except ValueError:
            raise RowError("'tools' is text but not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise RowError("'tools' is not a list of function descriptions")
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def sft_row(fmt: str, row: dict, system_prompt: str | None = None) -> dict[str, Any]:
    """An SFT row in TRL's form: ``{"text"}`` for raw text, else ``{"messages"}`` with ``system_prompt`` added
    (unless the conversation has one) and the row's ``tools``, if it has them."""
    if fmt == "text":
        return {"text": from_text(row)}
    converted: dict[str, Any] = {"messages": add_system_prompt(SFT_FORMATS[fmt](row), system_prompt)}
    if row.get("tools") is not None:
        converted["tools"] = _tools(row["tools"])
    return converted

# Columns that identify each format, most specific first. SFT, preference and prompt formats are detected
# separately (see ``candidates`` below): a preference file often has a `messages` column too, and an SFT
# file may have a `label` column, which must not turn prompt_completion rows into unpaired ones.
_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("messages", frozenset({"messages"})),
    ("sharegpt", frozenset({"conversations"})),
    ("alpaca", frozenset({"instruction", "output"})),
    ("preference", frozenset({"prompt", "chosen", "rejected"})),
    ("implicit_preference", frozenset({"chosen", "rejected"})),
    ("rated", frozenset({"prompt", "completions"})),
    ("unpaired", frozenset({"prompt", "completion", "label"})),
    ("prompt_completion", frozenset({"prompt", "completion"})),
    ("prompt_only", frozenset({"prompt"})),
    ("text", frozenset({"text"})),  # last: a conversation's file may have a text column beside it
)


def detect_format(columns: Iterable[str], candidates: Iterable[str] | None = None) -> str | None:
    """The first of ``candidates`` (default: the SFT formats) whose identifying columns are all present, or None."""
    allowed = set(SFT_FORMATS if candidates is None else candidates)
    present = set(columns)
    for name, needed in _SIGNATURES:
        if name in allowed and needed <= present:
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


# --------------------------------------------------------------------------------------------------
# Preference rows (rm, dpo, orpo: pairs; kto: unpaired rows, or pairs split in two)
# --------------------------------------------------------------------------------------------------

Pairing = Literal["best_vs_random", "best_vs_worst"]
PreferenceConverter = Callable[[dict, int, Pairing], dict[str, Any]]

PROMPT_END_ROLES = ("user", "tool")  # the turn a reply follows: a user message or a tool result
TEXT_KEYS = ("response", "text", "content")  # a rated completion's text, first present wins
SCORE_KEYS = ("rating", "score", "overall_score")  # a rated completion's score, first present wins


def _either(keys: tuple[str, ...]) -> str:
    return f"{', '.join(keys[:-1])} or {keys[-1]}"


def _prompt(row: dict) -> list[dict[str, str]]:
    """``prompt`` as messages: a string is one user message; messages must end with the user's turn."""
    value = row.get("prompt")
    if not isinstance(value, list):
        return [{"role": "user", "content": _text(row, "prompt")}]
    messages = _check_messages(value, "prompt")
    if messages[-1]["role"] not in PROMPT_END_ROLES:
        raise RowError("'prompt' does not end with a user turn")
    if not messages[-1]["content"].strip():
        raise RowError("'prompt' is empty")
    return messages


def _assistant_turns(messages: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    for message in messages:
        if message["role"] != "assistant":
            raise RowError(f"'{key}' has a message with role {message['role']!r} (expected assistant)")
    if not any(message["content"].strip() for message in messages):
        raise RowError(f"'{key}' is empty")
    return messages


def _answer(row: dict, key: str) -> list[dict[str, str]]:
    """``row[key]`` as assistant messages: a string is one assistant message."""
    value = row.get(key)
    if not isinstance(value, list):
        return [{"role": "assistant", "content": _text(row, key)}]
    return _assistant_turns(_check_messages(value, key), key)


def _conversation(row: dict, key: str) -> list[dict[str, str]]:
    value = row.get(key)
    if value is None:
        raise RowError(f"'{key}' is missing")
    if not isinstance(value, list):
        raise RowError(f"'{key}' is not a list of messages")
    return _check_messages(value, key)


def _pair(prompt: list[dict[str, str]], chosen: list[dict[str, str]], rejected: list[dict[str, str]],
          row: dict) -> dict[str, Any]:
    # Compared without surrounding whitespace: answers that differ only there teach the model nothing.
    if [(m["role"], m["content"].strip()) for m in chosen] == [(m["role"], m["content"].strip()) for m in rejected]:
        raise RowError("'chosen' and 'rejected' are identical")
    pair: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if row.get("margin") is not None:  # checked per source by the loader: all of a source's pairs or none
        pair["margin"] = row["margin"]
    return pair


def _holds_prompt(value: Any) -> bool:
    """Whether ``value`` is a full conversation (it starts with a message that is not the assistant's)."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)
            and value[0].get("role") != "assistant")


def from_preference(row: dict, row_number: int, pairing: Pairing) -> dict[str, Any]:
    """``{"prompt", "chosen", "rejected"}``, each a string or messages, to a conversational pair.

    Some datasets (HuggingFaceH4/ultrafeedback_binarized) put the whole conversation in chosen and rejected
    next to a prompt column; as in TRL, the prompt is then the conversations' shared start, and the
    prompt column must agree with it.
    """
    if _holds_prompt(row.get("chosen")) or _holds_prompt(row.get("rejected")):
        pair = from_implicit_preference(row, row_number, pairing)
        _check_same_prompt(row.get("prompt"), pair["prompt"])
        return pair
    return _pair(_prompt(row), _answer(row, "chosen"), _answer(row, "rejected"), row)


def _check_same_prompt(column: Any, shared: list[dict[str, str]], inside: str = "'chosen' and 'rejected'") -> None:
    if column is None:
        return
    if isinstance(column, str):
        same = column.strip() == shared[-1]["content"].strip()
    else:
        same = _check_messages(column, "prompt") == shared
    if not same:
        raise RowError(f"'prompt' differs from the prompt inside {inside}")


def from_implicit_preference(row: dict, row_number: int, pairing: Pairing) -> dict[str, Any]:
    """``{"chosen": messages, "rejected": messages}``: the shared leading messages are the prompt."""
    chosen, rejected = _conversation(row, "chosen"), _conversation(row, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # Assistant turns at the end of the shared start belong to the answers: a prompt ends with the user's turn.
    while shared and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if not shared or chosen[shared - 1]["role"] not in PROMPT_END_ROLES:
        raise RowError("'chosen' and 'rejected' share no prompt")
    answers = []
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        tail = conversation[shared:]
        if not tail or any(m["role"] != "assistant" for m in tail):
            raise RowError(f"'{key}' does not end with assistant turns after the shared prompt")
        answers.append(_assistant_turns(tail, key))
    return _pair(chosen[:shared], *answers, row)


def as_number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a number (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _completion_text(completion: Any) -> str:
    if isinstance(completion, dict):
        completion = next((completion[k] for k in TEXT_KEYS if completion.get(k) is not None), None)
        if completion is None:
            raise RowError(f"a completion has no text ({_either(TEXT_KEYS)})")
    if not isinstance(completion, str):
        raise RowError("a completion is not a string")
    return completion


def _rating(value: Any) -> float:
    rating = as_number(value)
    if rating is None:
        raise RowError("a rating is not a number")
    return rating


def _scored_completion(completion: Any) -> tuple[str, float]:
    if not isinstance(completion, dict):
        raise RowError("'ratings' is missing")  # plain-text completions need the parallel ratings list
    score = next((completion[k] for k in SCORE_KEYS if completion.get(k) is not None), None)
    if score is None:
        raise RowError(f"a completion has no rating ({_either(SCORE_KEYS)})")
    return _completion_text(completion), _rating(score)


def from_rated(row: dict, row_number: int, pairing: Pairing) -> dict[str, Any]:
    """A prompt with several rated completions (UltraFeedback-like) to one pair.

    Completions are strings with a parallel ``ratings`` list, or mappings with a text (``response``,
    ``text`` or ``content``) and a score (``rating``, ``score`` or ``overall_score``); blank completions are
    left out. Chosen is the highest rated (the first one on ties). Rejected is, among the completions rated
    strictly lower, a random one for ``best_vs_random`` (seeded by the row number, so a row always gets the
    same pair) or the lowest rated (the first on ties) for ``best_vs_worst``. Rated rows carry no margin.
    """
    prompt = _prompt(row)
    completions = row.get("completions")
    if completions is None:
        raise RowError("'completions' is missing")
    if not isinstance(completions, list):
        raise RowError("'completions' is not a list")
    ratings = row.get("ratings")
    if ratings is not None:
        if not isinstance(ratings, list):
            raise RowError("'ratings' is not a list")
        if len(ratings) != len(completions):
            raise RowError("'ratings' and 'completions' differ in length")
        scored = [(_completion_text(c), _rating(r)) for c, r in zip(completions, ratings)]
    else:
        scored = [_scored_completion(c) for c in completions]
    # A blank answer cannot be chosen, and as the rejected one it teaches nothing worth a pair.
    scored = [(text, rating) for text, rating in scored if text.strip()]
    if len(scored) < 2:
        raise RowError("fewer than two non-empty completions")
    best_text, best_rating = max(scored, key=lambda item: item[1])  # max keeps the first of equals
    lower = [(text, rating) for text, rating in scored if rating < best_rating]
    if not lower:
        raise RowError("no rating difference")
    lower = [(text, rating) for text, rating in lower if text.strip() != best_text.strip()]
    if not lower:
        raise RowError("'chosen' and 'rejected' are identical")
    if pairing == "best_vs_worst":
        rejected = min(lower, key=lambda item: item[1])[0]
    else:
        rejected = random.Random(f"pairing-{row_number}").choice(lower)[0]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": best_text}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def from_unpaired(row: dict, row_number: int, pairing: Pairing) -> dict[str, Any]:
    """``{"prompt", "completion", "label"}`` (KTO's unpaired form); ``label`` is a boolean, or 0 / 1."""
    prompt, completion = _prompt(row), _answer(row, "completion")
    label = row.get("label")
    if label is None:
        raise RowError("'label' is missing")
    # Only true booleans and the integers 0 / 1: "false" as text or 0.7 are too easy to misread.
    if not isinstance(label, bool) and not (type(label) is int and label in (0, 1)):
        raise RowError("'label' is not a boolean")
    return {"prompt": prompt, "completion": completion, "label": bool(label)}


PREFERENCE_FORMATS: dict[str, PreferenceConverter] = {
    "preference": from_preference,
    "implicit_preference": from_implicit_preference,
    "rated": from_rated,
    "unpaired": from_unpaired,
}


def with_system_prompt(row: dict[str, Any], system_prompt: str | None) -> dict[str, Any]:
    """A preference, unpaired or prompt row with ``system_prompt`` prepended to its prompt (unless it has one)."""
    return {**row, "prompt": add_system_prompt(row["prompt"], system_prompt)}


def to_unpaired(row: dict[str, Any]) -> list[dict[str, Any]]:
    """KTO rows from one normalised row: a pair becomes (chosen, True) and (rejected, False); margins are dropped."""
    if "label" in row:
        return [row]
    return [{"prompt": row["prompt"], "completion": row["chosen"], "label": True},
            {"prompt": row["prompt"], "completion": row["rejected"], "label": False}]


# --------------------------------------------------------------------------------------------------
# Prompt rows (ppo, grpo, rloo): a prompt to answer, plus the columns a reward function may need
# --------------------------------------------------------------------------------------------------

PromptConverter = Callable[[dict], dict[str, Any]]

# Keyword arguments TRL's GRPO / RLOO trainers give reward functions themselves (besides the dataset's
# columns): a column with one of these names would clash with them, so it is dropped.
RESERVED_COLUMNS = frozenset({"prompts", "completions", "completion_ids", "trainer_state", "log_extra",
                              "log_metric", "environments"})


def extra_columns(row: dict, consumed: Iterable[str]) -> dict[str, Any]:
    """The row's columns except ``consumed`` ones (turned into prompt / reference) and :data:`RESERVED_COLUMNS`."""
    left_out = RESERVED_COLUMNS | set(consumed)
    return {key: value for key, value in row.items() if key not in left_out}


def _prompt_row(prompt: list[dict[str, str]], reference: str | None, row: dict,
                consumed: tuple[str, ...]) -> dict[str, Any]:
    extras = extra_columns(row, ("prompt", *consumed))
    if reference is None:
        return {"prompt": prompt, **extras}
    if "reference" in extras:
        raise RowError(f"'reference' is a column, but this format makes it from '{consumed[0]}'; rename one of them")
    return {"prompt": prompt, "reference": reference, **extras}


def prompt_from_prompt_only(row: dict) -> dict[str, Any]:
    """``{"prompt": str | messages, ...}``: a string is one user message; messages must end with the user's turn."""
    return _prompt_row(_prompt(row), None, row, ())


def prompt_from_prompt_completion(row: dict) -> dict[str, Any]:
    """``{"prompt", "completion", ...}``: the completion (its last message, if messages) is the ``reference``."""
    prompt = _prompt(row)
    reference = _answer(row, "completion")[-1]["content"]
    if not reference.strip():
        raise RowError("'completion' ends with an empty message")
    return _prompt_row(prompt, reference, row, ("completion",))


def prompt_from_messages(row: dict) -> dict[str, Any]:
    """``{"messages": [...], ...}``: the messages before the final assistant turn are the prompt, its text the
    ``reference``. A ``prompt`` column beside the conversation must agree with it (it is then replaced)."""
    messages = _check_messages(row.get("messages"), "messages")
    if messages[-1]["role"] != "assistant":
        raise RowError("'messages' does not end with an assistant turn")
    prompt, reference = messages[:-1], messages[-1]["content"]
    if not reference.strip():
        raise RowError("'messages' ends with an empty assistant turn")
    if not prompt or prompt[-1]["role"] not in PROMPT_END_ROLES:
        raise RowError("'messages' has no user turn before its last assistant turn")
    if not prompt[-1]["content"].strip():
        raise RowError("'messages' has an empty prompt")
    _check_same_prompt(row.get("prompt"), prompt, "'messages'")
    return _prompt_row(prompt, reference, row, ("messages",))


PROMPT_FORMATS: dict[str, PromptConverter] = {
    "prompt_only": prompt_from_prompt_only,
    "prompt_completion": prompt_from_prompt_completion,
    "messages": prompt_from_messages,
}


def value_kind(value: Any) -> str | None:
    """The kind of a column value, as one dataset column must hold one: None for a missing value (None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


# The formats a stage's data sources may name (besides ``auto``), by the rows the stage reads (Stage.rows);
# recipe validation checks every source's ``format`` against its stage's.
FORMATS: dict[str, tuple[str, ...]] = {
    "sft": tuple(SFT_FORMATS),
    "preference": tuple(PREFERENCE_FORMATS),
    "prompt": tuple(PROMPT_FORMATS),
}
