"""The Arrow types (``datasets.Features``) of normalised rows, given to the conversion map so every batch and
every process writes the same columns (a batch of bad rows alone would otherwise write an untyped column)."""

from __future__ import annotations

MARGIN_STATE = "_margin"  # a pair's margin as given: null when absent, else "number" or "not a number"


def message(tools: bool = False) -> dict:
    """One message. With ``tools``, also an assistant turn's ``tool_calls`` (arguments as JSON text, since each
    function's arguments have their own keys, which one Arrow column cannot hold) and a tool turn's
    ``tool_call_id`` and ``name``; a message without them has them null."""
    from datasets import List, Value

    fields = {"role": Value("string"), "content": Value("string")}
    if tools:
        call = {"id": Value("string"), "type": Value("string"),
                "function": {"name": Value("string"), "arguments": Value("string")}}
        fields |= {"tool_calls": List(call), "tool_call_id": Value("string"), "name": Value("string")}
    return fields


def messages(tools: bool = False):
    from datasets import List

    return List(message(tools))


def sft(fmt: str, tools: bool = False):
    """Columns of SFT rows: ``text`` for raw text, else ``messages`` (and ``tools``, JSON text, with tools)."""
    from datasets import Features, Value

    if fmt == "text":
        return Features({"text": Value("string")})
    columns = {"messages": messages(tools)}
    if tools:
        columns["tools"] = Value("string")
    return Features(columns)


def preference(fmt: str, tools: bool = False):
    """Columns of preference rows: unpaired rows, or pairs with their margin (dropped later if none has one)."""
    from datasets import Features, Value

    if fmt == "unpaired":
        return Features({"prompt": messages(tools), "completion": messages(tools), "label": Value("bool")})
    return Features({"prompt": messages(tools), "chosen": messages(tools), "rejected": messages(tools),
                     "margin": Value("float64"), MARGIN_STATE: Value("string")})


def unpaired(tools: bool = False):
    """Columns of KTO's unpaired rows."""
    return preference("unpaired", tools)
