"""alignkit.data for the RL stages: prompt-only rows (prompt_only, prompt_completion, messages), extra columns
kept for reward functions, bad rows counted, the mixture's shared columns, the demo prompt set, and the demo's
rule reward."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import assistant, system, user, write_jsonl

from alignkit.data import formats, load_prompt_data, load_prompt_source, load_sft_source
from alignkit.demo.rewards import exact_reversal_reward, reversal_answer, reversal_reward
from alignkit.demo.tasks import DEMO_DATASETS, reverse_sft
from alignkit.errors import DataError
from alignkit.recipe.settings import DataSettings, DataSource

WHERE = "data.train[0]"


def load(path: Path | str, system_prompt: str | None = None, **options: Any) -> tuple[list[dict], Any]:
    return load_prompt_source(DataSource(path=str(path), **options), WHERE, system_prompt)


def settings_for(*paths: Path, **options: Any) -> DataSettings:
    return DataSettings(train=[DataSource(path=str(p)) for p in paths], **options)


# --------------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------------

PROMPT_CASES = [
    pytest.param("prompt_only", {"prompt": "2+2?"}, {"prompt": [user("2+2?")]}, id="prompt-text"),
    pytest.param(
        "prompt_only",
        {"prompt": [system("terse"), user("hi"), assistant("hello"), user("2+2?")]},
        {"prompt": [system("terse"), user("hi"), assistant("hello"), user("2+2?")]},
        id="prompt-messages",
    ),
    pytest.param(
        "prompt_only",
        {"prompt": [user("weather?"), {"role": "tool", "content": "sunny"}]},
        {"prompt": [user("weather?"), {"role": "tool", "content": "sunny"}]},
        id="prompt-ends-with-tool",
    ),
    pytest.param(
        "prompt_only",
        {"prompt": "2+2?", "answer": "4", "level": 1, "score": 0.5, "exact": True, "note": None,
         "tests": ["assert f(2) == 4", "assert f(0) == 0"]},
        {"prompt": [user("2+2?")], "answer": "4", "level": 1, "score": 0.5, "exact": True, "note": None,
         "tests": ["assert f(2) == 4", "assert f(0) == 0"]},
        id="prompt-with-extras",
    ),
    pytest.param(
        "prompt_completion",
        {"prompt": "2+2?", "completion": "4", "id": 7},
        {"prompt": [user("2+2?")], "reference": "4", "id": 7},
        id="prompt-completion-text",
    ),
    pytest.param(
        "prompt_completion",
        {"prompt": [user("2+2?")], "completion": [assistant("Let me see."), assistant("4")]},
        {"prompt": [user("2+2?")], "reference": "4"},  # the last message is the reference
        id="prompt-completion-messages",
    ),
    pytest.param(
        "messages",
        {"messages": [user("2+2?"), assistant("4")], "source": "gsm"},
        {"prompt": [user("2+2?")], "reference": "4", "source": "gsm"},
        id="messages-single-turn",
    ),
    pytest.param(
        "messages",
        {"messages": [system("s"), user("a"), assistant("b"), user("c"), assistant("d")]},
        {"prompt": [system("s"), user("a"), assistant("b"), user("c")], "reference": "d"},
        id="messages-multi-turn",
    ),
    pytest.param(
        "messages",  # as HuggingFaceH4/ultrafeedback_binarized: a prompt column that agrees is replaced
        {"prompt": "sky?", "messages": [user("sky?"), assistant("blue")], "score_chosen": 8.0},
        {"prompt": [user("sky?")], "reference": "blue", "score_chosen": 8.0},
        id="messages-with-agreeing-prompt",
    ),
]


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize(("fmt", "row", "expected"), PROMPT_CASES)
def test_prompt_format_is_normalised(tmp_path: Path, fmt: str, row: dict, expected: dict, explicit: bool) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [row, row])
    rows, report = load(path, format=fmt if explicit else "auto")
    assert rows == [expected, expected]
    assert list(rows[0]) == list(expected)  # prompt first, then reference, then the row's columns in order
    assert report.format == fmt
    assert (report.rows_read, report.rows_kept, report.skipped, report.first_bad_row) == (2, 2, Counter(), None)


def test_converters_keep_extra_columns_unchanged() -> None:
    nested = {"inputs": [1, 2], "meta": {"lang": "en"}}
    row = {"prompt": "q", "solution": nested, "ids": [3, 4]}
    out = formats.PROMPT_FORMATS["prompt_only"](row)
    assert out == {"prompt": [user("q")], "solution": nested, "ids": [3, 4]}
    assert out["solution"] is nested  # kept as is, not copied or reshaped


def test_reserved_argument_names_are_dropped_with_a_warning(tmp_path: Path, caplog) -> None:
    # A rated (UltraFeedback-like) file used for its prompts: TRL passes `completions` to reward functions
    # itself, so the column could never reach one; `ratings` is kept.
    path = write_jsonl(tmp_path / "rated.jsonl", [{"prompt": "q", "completions": ["a", "b"], "ratings": [1, 2]}])
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        rows, report = load(path)
    assert rows == [{"prompt": [user("q")], "ratings": [1, 2]}]
    assert report.format == "prompt_only"
    assert "dropped the column(s) completions" in caplog.text


def test_detection_of_prompt_formats() -> None:
    prompt_formats = list(formats.PROMPT_FORMATS)
    assert formats.detect_format(["prompt"], prompt_formats) == "prompt_only"
    assert formats.detect_format(["prompt", "answer"], prompt_formats) == "prompt_only"
    assert formats.detect_format(["prompt", "completion"], prompt_formats) == "prompt_completion"
    assert formats.detect_format(["messages", "prompt"], prompt_formats) == "messages"
    assert formats.detect_format(["prompt", "chosen", "rejected"], prompt_formats) == "prompt_only"
    assert formats.detect_format(["question", "answer"], prompt_formats) is None
    # SFT and preference detection do not pick up the new signature.
    assert formats.detect_format(["prompt"]) is None
    assert formats.detect_format(["prompt"], formats.PREFERENCE_FORMATS) is None


def test_sft_loader_does_not_accept_prompt_only_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    with pytest.raises(DataError, match="cannot tell the format"):
        load_sft_source(DataSource(path=str(path)), WHERE)


# --------------------------------------------------------------------------------------------------
# bad rows
# --------------------------------------------------------------------------------------------------

BAD_ROWS = [
    pytest.param("prompt_only", {"prompt": [user("q"), assistant("a")]}, "'prompt' does not end with a user turn",
                 id="prompt-ends-with-assistant"),
    pytest.param("prompt_only", {"prompt": "   "}, "'prompt' is empty", id="prompt-blank"),
    pytest.param("prompt_only", {"prompt": [user("")]}, "'prompt' is empty", id="prompt-blank-message"),
    pytest.param("prompt_only", {"answer": "4"}, "'prompt' is missing", id="prompt-missing"),
    pytest.param("prompt_only", {"prompt": 5}, "'prompt' is not a string", id="prompt-number"),
    pytest.param("prompt_only", {"prompt": [{"role": "bot", "content": "x"}]},
                 "'prompt' has a message with role 'bot' (expected one of system, user, assistant, tool)",
                 id="prompt-bad-role"),
    pytest.param("prompt_completion", {"prompt": "q", "completion": ""}, "'completion' is empty",
                 id="completion-empty"),
    pytest.param("prompt_completion", {"prompt": "q", "completion": [assistant("a"), assistant(" ")]},
                 "'completion' ends with an empty message", id="completion-last-message-empty"),
    pytest.param("prompt_completion", {"prompt": "q", "completion": "a", "reference": "b"},
                 "'reference' is a column, but this format makes it from 'completion'; rename one of them",
                 id="reference-clash"),
    pytest.param("messages", {"messages": [user("q")]}, "'messages' does not end with an assistant turn",
                 id="messages-no-answer"),
    pytest.param("messages", {"messages": [user("q"), assistant("")]}, "'messages' ends with an empty assistant turn",
                 id="messages-empty-answer"),
    pytest.param("messages", {"messages": [assistant("a")]},
                 "'messages' has no user turn before its last assistant turn", id="messages-answer-only"),
    pytest.param("messages", {"messages": [user("q"), assistant("a"), assistant("b")]},
                 "'messages' has no user turn before its last assistant turn", id="messages-two-answers"),
    pytest.param("messages", {"messages": [user(" "), assistant("a")]}, "'messages' has an empty prompt",
                 id="messages-blank-prompt"),
    pytest.param("messages", {"prompt": "other", "messages": [user("q"), assistant("a")]},
                 "'prompt' differs from the prompt inside 'messages'", id="messages-disagreeing-prompt"),
]


@pytest.mark.parametrize(("fmt", "bad", "reason"), BAD_ROWS)
def test_bad_rows_are_counted_with_their_reason(tmp_path: Path, fmt: str, bad: dict, reason: str) -> None:
    good = {"prompt": "fine", "completion": "ok"} if fmt == "prompt_completion" else (
        {"messages": [user("fine"), assistant("ok")]} if fmt == "messages" else {"prompt": "fine"})
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad, "not json", good])
    rows, report = load(path, format=fmt)
    assert len(rows) == 2 and all(row["prompt"] == [user("fine")] for row in rows)
    assert report.skipped == Counter({reason: 1, "not a JSON object": 1})
    assert (report.rows_read, report.rows_kept, report.first_bad_row) == (4, 2, 2)


def test_a_column_of_mixed_kinds_keeps_the_majority(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "a", "answer": "1"},
        {"prompt": "b", "answer": 2},
        {"prompt": "c", "answer": "3"},
        {"prompt": "d", "answer": None},  # None fits any kind
    ])
    rows, report = load(path)
    assert [(row["prompt"][0]["content"], row["answer"]) for row in rows] == [("a", "1"), ("c", "3"), ("d", None)]
    assert report.skipped == Counter({"'answer' is a number (a string in most rows)": 1})
    assert report.first_bad_row == 2


def test_a_source_with_no_valid_rows_is_a_data_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [user("q"), assistant("a")]}, {"prompt": ""}])
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{WHERE}: no usable rows in '{path}'")
    assert "'prompt' does not end with a user turn (1)" in message and "'prompt' is empty (1)" in message


def test_undetectable_columns_name_the_prompt_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        load(path)
    assert "cannot tell the format" in str(info.value)
    assert "prompt_only, prompt_completion, messages" in str(info.value)


def test_unknown_format_suggests_the_nearest(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    with pytest.raises(DataError, match="Did you mean 'prompt_only'"):
        load(path, format="prompt-only")


def test_columns_and_templates_make_the_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2", "answer": "4"}])
    rows, report = load(path, columns={"question": "prompt"})
    assert rows == [{"prompt": [user("2+2")], "answer": "4"}]
    rows, report = load(path, templates=["Compute {question}"])
    assert rows == [{"prompt": [user("Compute 2+2")], "question": "2+2", "answer": "4"}]  # raw columns kept
    assert report.format == "prompt_only"


def test_templates_with_messages_rows_are_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [user("q"), assistant("a")], "x": "y"}])
    for fmt in ("auto", "messages"):
        with pytest.raises(DataError, match="messages rows take their prompt from the conversation"):
            load(path, format=fmt, templates=["{x}"])


# --------------------------------------------------------------------------------------------------
# system prompt and the mixture
# --------------------------------------------------------------------------------------------------


def test_system_prompt_added_to_prompts_without_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a"},
        {"prompt": [system("own"), user("b")]},
    ])
    rows, _ = load(path, system_prompt="default")
    assert [row["prompt"] for row in rows] == [[system("default"), user("a")], [system("own"), user("b")]]
    assert load(path)[0][0]["prompt"] == [user("a")]
    prepared = load_prompt_data(settings_for(path, system_prompt="sys"))
    assert sorted(row["prompt"][0]["content"] for row in prepared.train) == ["own", "sys"]


def test_mixture_fills_columns_a_source_lacks_with_none(tmp_path: Path, caplog) -> None:
    math = write_jsonl(tmp_path / "math.jsonl", [{"prompt": f"m{i}", "answer": str(i)} for i in range(3)])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [user(f"c{i}"), assistant(f"r{i}")]} for i in range(2)])
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        prepared = load_prompt_data(settings_for(math, chat))
    assert prepared.eval is None
    assert prepared.train.column_names == ["prompt", "reference", "answer"]
    by_prompt = {row["prompt"][0]["content"]: (row["reference"], row["answer"]) for row in prepared.train}
    assert by_prompt == {"m0": (None, "0"), "m1": (None, "1"), "m2": (None, "2"), "c0": ("r0", None),
                         "c1": ("r1", None)}
    assert "column 'reference' is missing from data.train[0]" in caplog.text
    assert "column 'answer' is missing from data.train[1]" in caplog.text
    assert [r.format for r in prepared.reports] == ["prompt_only", "messages"]


def test_train_and_eval_get_the_same_columns(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"t{i}"} for i in range(4)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "e", "completion": "ref"}])
    prepared = load_prompt_data(DataSettings(train=[DataSource(path=str(train))],
                                             eval=[DataSource(path=str(held_out))]))
    assert prepared.train.column_names == prepared.eval.column_names == ["prompt", "reference"]
    assert prepared.train["reference"] == [None] * 4
    assert prepared.eval[0] == {"prompt": [user("e")], "reference": "ref"}


def test_mixture_split_and_weights(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "n": i} for i in range(10)])
    prepared = load_prompt_data(DataSettings(train=[DataSource(path=str(path), weight=2.0)], eval_size=4))
    assert len(prepared.train) == 16 and len(prepared.eval) == 4
    assert prepared.train.column_names == ["prompt", "n"]
    assert all(row["prompt"] == [user(f"p{row['n']}")] for row in prepared.train)


def test_a_column_of_different_kinds_across_sources_is_a_data_error(tmp_path: Path) -> None:
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "a", "answer": "4"}])
    number = write_jsonl(tmp_path / "number.jsonl", [{"prompt": "b", "answer": 4}])
    with pytest.raises(DataError) as info:
        load_prompt_data(settings_for(text, number))
    message = str(info.value)
    assert "column 'answer' holds different kinds of value" in message
    assert f"a string in data.train[0] ({text})" in message and f"a number in data.train[1] ({number})" in message


def test_a_column_arrow_cannot_store_is_a_data_error_naming_it(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "tests": ["x"]}, {"prompt": "b", "tests": [1]}])
    with pytest.raises(DataError, match="column 'tests' holds values Arrow cannot store together"):
        load_prompt_data(settings_for(path))


# --------------------------------------------------------------------------------------------------
# the demo prompt set
# --------------------------------------------------------------------------------------------------


def test_demo_reverse_prompts_load_with_train_and_test_disjoint() -> None:
    assert "reverse/prompts" in DEMO_DATASETS
    prepared = load_prompt_data(DataSettings(train=[DataSource(path="demo:reverse/prompts")],
                                             eval=[DataSource(path="demo:reverse/prompts", split="test")]))
    assert prepared.train.column_names == ["prompt"]
    assert [r.format for r in prepared.reports] == ["prompt_only", "prompt_only"]
    train = [row["prompt"] for row in prepared.train]
    test = [row["prompt"] for row in prepared.eval]
    assert (len(train), len(test)) == (4000, 200)
    assert all(len(p) == 1 and p[0]["role"] == "user" and p[0]["content"].startswith("reverse: ") for p in train)
    train_texts, test_texts = {p[0]["content"] for p in train}, {p[0]["content"] for p in test}
    assert len(train_texts) == 4000 and len(test_texts) == 200 and not train_texts & test_texts
    # The same phrases as reverse/sft, so held-out prompts are unseen by an SFT run on the train split too.
    for split, texts in (("train", train_texts), ("test", test_texts)):
        assert texts == {row["messages"][0]["content"] for row in reverse_sft(split)}


# --------------------------------------------------------------------------------------------------
# the demo's rule reward
# --------------------------------------------------------------------------------------------------

PROMPT = [user("reverse: apple river stone")]


def test_right_answer_scores_one() -> None:
    assert reversal_reward([PROMPT], ["stone river apple"]) == [1.0]
    assert exact_reversal_reward([PROMPT], ["  stone river  apple\n"]) == [1.0]


@pytest.mark.parametrize(("completion", "expected"), [
    ("apple river stone", 1 / 3),  # the echo: only the middle word is in place
    ("stone river", 2 / 3),  # a word missing
    ("stone river apple apple", 3 / 4),  # an extra word
    ("river stone apple", 1 / 3),  # two words swapped
    ("stone apple", 1 / 3),  # the middle word dropped: apple is now out of place
    ("cloud cloud cloud", 0.0),
    ("", 0.0),
    ("   ", 0.0),
])
def test_partial_credit(completion: str, expected: float) -> None:
    assert reversal_reward([PROMPT], [completion]) == [pytest.approx(expected)]
    assert exact_reversal_reward([PROMPT], [completion]) == [0.0]


def test_echo_of_a_longer_phrase_scores_below_one() -> None:
    prompts = [[user("reverse: a b c d")], [user("reverse: a b c d e")]]
    assert reversal_reward(prompts, ["a b c d", "a b c d e"]) == [0.0, pytest.approx(1 / 5)]


@pytest.mark.parametrize("completion", [
    [assistant("stone river apple")],
    {"role": "assistant", "content": "stone river apple"},
    [assistant("stone river"), assistant("apple")],
    "stone river apple<|end|>",  # decoded with the stop token
])
def test_message_completions_are_accepted(completion: Any) -> None:
    assert reversal_reward([PROMPT], [completion]) == [1.0]
    assert exact_reversal_reward([PROMPT], [completion]) == [1.0]


@pytest.mark.parametrize("prompt", [
    "reverse: apple river stone",
    "<|user|>reverse: apple river stone<|end|><|assistant|>",  # chat-formatted text
    [system("be exact"), user("copy: x"), assistant("x"), user("reverse: apple river stone")],
])
def test_string_and_multi_turn_prompts_are_accepted(prompt: Any) -> None:
    assert reversal_answer(prompt) == ["stone", "river", "apple"]
    assert reversal_reward([prompt], ["stone river apple"], completion_ids=[[1, 2, 3]], answer=[None]) == [1.0]


def test_scores_a_batch_in_order() -> None:
    prompts = [PROMPT, [user("reverse: a b")], "reverse: x y z"]
    assert reversal_reward(prompts, ["stone river apple", "a b", "z y"]) == [1.0, 0.0, pytest.approx(2 / 3)]
    assert exact_reversal_reward(prompts, ["stone river apple", "b a", "z y"]) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("prompt", [
    [user("copy: apple river")],
    "summarise: apple river",
    [user("reverse:")],
    [assistant("reverse: a b")],  # no user message
])
def test_non_reversal_prompt_raises_naming_it(prompt: Any) -> None:
    with pytest.raises(ValueError, match="not a reversal prompt") as info:
        reversal_reward([prompt], ["a b"])
    assert repr(prompt)[:20] in str(info.value)
    with pytest.raises(ValueError, match="not a reversal prompt"):
        exact_reversal_reward([prompt], ["a b"])


def test_mismatched_batch_lengths_raise() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reversal_reward([PROMPT, PROMPT], ["a"])


def test_demo_prompts_score_one_with_their_sft_answers() -> None:
    prompts = DEMO_DATASETS["reverse/prompts"]("test")
    answers = [row["messages"][1]["content"] for row in reverse_sft("test")]
    assert reversal_reward([row["prompt"] for row in prompts], answers) == [1.0] * len(prompts)
