"""alignkit.data: every row format and file type normalised to TRL messages, bad rows counted (not fatal),
weighted mixtures, held-out splits, and the demo sets."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import assistant, system, user, write_jsonl
from datasets import Dataset

from alignkit.data import apply_weight, load_sft_data, load_sft_source, split_eval
from alignkit.demo.tasks import reverse_sft
from alignkit.errors import DataError
from alignkit.recipe.settings import DataSettings, DataSource

WHERE = "data.train[0]"



def load(path: Path, **options: Any):
    """(conversations, report) for one source; ``system_prompt`` goes to the loader, the rest to DataSource."""
    system_prompt = options.pop("system_prompt", None)
    return load_sft_source(DataSource(path=str(path), **options), WHERE, system_prompt)


def prompt_rows(count: int) -> list[dict[str, str]]:
    return [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(count)]


def prompts(conversations: list[list[dict[str, str]]]) -> list[str]:
    return [next(m["content"] for m in conversation if m["role"] == "user") for conversation in conversations]


# --------------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------------

FORMAT_CASES = [
    pytest.param(
        "messages",
        {"messages": [system("be brief"), user("hi"), assistant("hello")]},
        [system("be brief"), user("hi"), assistant("hello")],
        id="messages",
    ),
    pytest.param(
        "messages",
        {"messages": [user("a"), assistant("b"), user("c"), assistant("d")], "extra": 1},
        [user("a"), assistant("b"), user("c"), assistant("d")],
        id="messages-multi-turn",
    ),
    pytest.param(
        "prompt_completion",
        {"prompt": "2+2?", "completion": "4"},
        [user("2+2?"), assistant("4")],
        id="prompt_completion-string",
    ),
    pytest.param(
        "prompt_completion",
        {"prompt": [system("terse"), user("2+2?")], "completion": [assistant("4")]},
        [system("terse"), user("2+2?"), assistant("4")],
        id="prompt_completion-conversational",
    ),
    pytest.param(
        "alpaca",
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        [user("Translate\n\nbonjour"), assistant("hello")],
        id="alpaca-with-input",
    ),
    pytest.param(
        "alpaca",
        {"instruction": "Say hi", "output": "hi"},
        [user("Say hi"), assistant("hi")],
        id="alpaca-without-input",
    ),
    pytest.param(
        "alpaca",
        {"instruction": "Say hi", "input": "  ", "output": "hi"},
        [user("Say hi"), assistant("hi")],
        id="alpaca-blank-input",
    ),
    pytest.param(
        "sharegpt",
        {"conversations": [{"from": "system", "value": "be kind"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}]},
        [system("be kind"), user("hi"), assistant("hello")],
        id="sharegpt",
    ),
]


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize(("fmt", "row", "expected"), FORMAT_CASES)
def test_format_is_normalised_to_messages(tmp_path: Path, fmt: str, row: dict, expected: list, explicit: bool) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [row, row])
    conversations, report = load(path, format=fmt if explicit else "auto")
    assert conversations == [expected, expected]
    assert report.format == fmt
    assert (report.rows_read, report.rows_kept, report.skipped, report.first_bad_row) == (2, 2, Counter(), None)


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    row = {"messages": [user("from messages"), assistant("m")], "prompt": "from prompt", "completion": "c"}
    path = write_jsonl(tmp_path / "both.jsonl", [row])
    assert load(path)[0] == [[user("from messages"), assistant("m")]]  # auto: messages is the most specific
    conversations, report = load(path, format="prompt_completion")
    assert conversations == [[user("from prompt"), assistant("c")]]
    assert report.format == "prompt_completion"


def test_explicit_format_that_does_not_fit_skips_every_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", prompt_rows(3))
    with pytest.raises(DataError) as info:
        load(path, format="alpaca")
    assert "'instruction' is missing (3)" in str(info.value)


def test_unknown_format_suggests_the_nearest(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", prompt_rows(1))
    with pytest.raises(DataError) as info:
        load(path, format="alpacca")
    message = str(info.value)
    assert "unknown format 'alpacca'" in message
    assert "Did you mean 'alpaca'?" in message


def test_columns_are_renamed_before_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q1", "answer": "a1", "id": 1}])
    conversations, report = load(path, columns={"question": "prompt", "answer": "completion"})
    assert conversations == [[user("q1"), assistant("a1")]]
    assert report.format == "prompt_completion"


def test_columns_with_explicit_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"task": "Say hi", "response": "hi"}])
    conversations, _ = load(path, format="alpaca", columns={"task": "instruction", "response": "output"})
    assert conversations == [[user("Say hi"), assistant("hi")]]


def test_system_prompt_added_only_when_absent(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [user("a"), assistant("b")]},
        {"messages": [system("own"), user("c"), assistant("d")]},
    ])
    conversations, _ = load(path, system_prompt="default")
    assert conversations == [
        [system("default"), user("a"), assistant("b")],
        [system("own"), user("c"), assistant("d")],
    ]
    assert load(path)[0][0] == [user("a"), assistant("b")]  # no system prompt configured: nothing added


def test_system_prompt_for_sharegpt_and_alpaca(tmp_path: Path) -> None:
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "system", "value": "own"}, {"from": "human", "value": "x"},
                           {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
    ])
    conversations, _ = load(sharegpt, system_prompt="default")
    assert [c[0] for c in conversations] == [system("own"), system("default")]
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    assert load(alpaca, system_prompt="default")[0] == [[system("default"), user("i"), assistant("o")]]


def test_system_prompt_from_data_settings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", prompt_rows(2))
    prepared = load_sft_data(DataSettings(train=[DataSource(path=str(path))], system_prompt="sys"))
    assert all(row["messages"][0] == system("sys") for row in prepared.train)


# --------------------------------------------------------------------------------------------------
# file types
# --------------------------------------------------------------------------------------------------

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Translate", "input": "bonjour", "output": "hello"},
    {"instruction": "Add", "input": "2 2", "output": "4"},
]
EXPECTED = [
    [user("Say hi"), assistant("hi")],
    [user("Translate\n\nbonjour"), assistant("hello")],
    [user("Add\n\n2 2"), assistant("4")],
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_jsonl(path, rows)


def _write_json(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows))


def _write_parquet(path: Path, rows: list[dict]) -> None:
    Dataset.from_list(rows).to_parquet(str(path))


def _write_csv(path: Path, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_csv(path, index=False)


WRITERS = {".jsonl": _write_jsonl, ".json": _write_json, ".parquet": _write_parquet, ".csv": _write_csv}


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_file_types(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"alpaca{suffix}"
    WRITERS[suffix](path, ROWS)
    conversations, report = load(path)
    assert conversations == EXPECTED
    assert report.format == "alpaca"
    assert (report.rows_read, report.rows_kept) == (3, 3)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_nested_messages_in_structured_files(tmp_path: Path, suffix: str) -> None:
    rows = [{"messages": [user("a"), assistant("b")]}, {"messages": [system("s"), user("c"), assistant("d")]}]
    path = tmp_path / f"chat{suffix}"
    WRITERS[suffix](path, rows)
    conversations, report = load(path)
    assert conversations == [row["messages"] for row in rows]
    assert report.format == "messages"


def test_csv_cells_are_read_as_text(tmp_path: Path) -> None:
    """Numbers and pandas' NA words are answers like any other in a CSV, not numbers or missing values."""
    path = tmp_path / "math.csv"
    pd.DataFrame({"prompt": ["2+2", "3*2", "What does print() return?", "Country code of Namibia?"],
                  "completion": ["4", "6", "None", "NA"]}).to_csv(path, index=False)
    conversations, report = load(path)
    assert [c[-1]["content"] for c in conversations] == ["4", "6", "None", "NA"]
    assert report.skipped == Counter()


def test_csv_empty_cell_is_an_empty_field(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nSay hi,,hi\nSay bye,,\n")
    conversations, report = load(path)
    assert conversations == [[user("Say hi"), assistant("hi")]]
    assert report.skipped == Counter({"'output' is empty": 1})
    assert report.first_bad_row == 2


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_split_other_than_train_on_a_single_file_is_an_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"rows{suffix}"
    WRITERS[suffix](path, ROWS)
    with pytest.raises(DataError) as info:
        load(path, split="test")
    assert "split 'test' given for a single file" in str(info.value)


def test_max_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", prompt_rows(10))
    conversations, report = load(path, max_rows=3)
    assert prompts(conversations) == ["p0", "p1", "p2"]
    assert (report.rows_read, report.rows_kept) == (3, 3)


# --------------------------------------------------------------------------------------------------
# malformed rows
# --------------------------------------------------------------------------------------------------


def test_bad_rows_are_counted_and_good_rows_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "good1", "completion": "ok"},  # line 1
        "",  # line 2: blank lines are not rows
        "{not json",  # line 3
        {"prompt": "no completion"},  # line 4
        {"prompt": 5, "completion": "c"},  # line 5
        {"prompt": "p", "completion": "   "},  # line 6
        {"prompt": [{"role": "robot", "content": "x"}], "completion": "c"},  # line 7
        {"prompt": "p", "completion": [user("not an answer")]},  # line 8
        {"prompt": "good2", "completion": "ok"},  # line 9
        "[1, 2]",  # line 10: valid JSON, not an object
    ])
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        conversations, report = load(path)
    assert prompts(conversations) == ["good1", "good2"]
    assert report.format == "prompt_completion"
    assert report.rows_read == 9
    assert report.rows_kept == 2
    assert report.first_bad_row == 3
    assert report.skipped == Counter({
        "not a JSON object": 2,
        "'completion' is missing": 1,
        "'prompt' is not a string": 1,
        "'completion' is empty": 1,
        "'prompt' has a message with role 'robot' (expected one of system, user, assistant, tool)": 1,
        "no non-empty assistant message to learn from": 1,
    })
    assert report.to_dict()["skipped"]["not a JSON object"] == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "alignkit.data"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 7 of 9 rows" in message
    assert "mixed.jsonl" in message
    assert "first bad row: 3" in message


def test_bad_messages_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [user("bad"), {"role": "bot", "content": "x"}]},  # line 1
        {"messages": [user("only a question")]},  # line 2
        {"messages": [user("q"), assistant("  ")]},  # line 3: blank answer
        {"messages": []},  # line 4
        {"messages": [user("q"), {"role": "assistant", "content": 7}]},  # line 5
        {"messages": [user("good"), assistant("a")]},  # line 6
        {"messages": "text"},  # line 7
    ])
    conversations, report = load(path)
    assert conversations == [[user("good"), assistant("a")]]
    assert report.first_bad_row == 1
    assert report.skipped == Counter({
        "'messages' has a message with role 'bot' (expected one of system, user, assistant, tool)": 1,
        "no non-empty assistant message to learn from": 2,
        "'messages' is not a non-empty list of messages": 2,
        "'messages' has a message whose 'content' is not a string": 1,
    })


def test_bad_alpaca_and_sharegpt_rows(tmp_path: Path) -> None:
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "i", "output": "o"},
        {"instruction": "i", "output": ""},
        {"instruction": ["i"], "output": "o"},
        {"instruction": "i", "input": 3, "output": "o"},
    ])
    _, report = load(alpaca)
    assert report.skipped == Counter({"'output' is empty": 1, "'instruction' is not a string": 1,
                                      "'input' is not a string": 1})
    assert report.first_bad_row == 2
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "x"}]},
        {"conversations": [{"from": "human"}]},
    ])
    conversations, report = load(sharegpt)
    assert conversations == [[user("x"), assistant("y")]]
    assert report.first_bad_row == 1
    assert report.skipped == Counter({
        "'conversations' has a turn from 'alien' (expected human, gpt or system)": 1,
        "no non-empty assistant message to learn from": 1,
        "'conversations' has a turn without a string 'value'": 1,
    })


def test_first_row_missing_a_field_does_not_stop_auto_detection(tmp_path: Path) -> None:
    """A JSON Lines row lacking a column is a bad row, even when it comes before the format is known."""
    path = write_jsonl(tmp_path / "pc.jsonl", [
        "oops",  # line 1
        {"prompt": "no completion"},  # line 2
        {"prompt": "p1", "completion": "c1"},  # line 3
        {"completion": "no prompt"},  # line 4
        {"prompt": "p2", "completion": "c2"},  # line 5
    ])
    conversations, report = load(path)
    assert prompts(conversations) == ["p1", "p2"]
    assert report.format == "prompt_completion"
    assert report.rows_read == 5
    assert report.skipped == Counter({"not a JSON object": 1, "'completion' is missing": 1, "'prompt' is missing": 1})
    assert report.first_bad_row == 1


def test_jsonl_line_that_is_not_utf8_is_one_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "p1", "completion": "c1"}).encode()
    path.write_bytes(good + b"\n" + '{"prompt": "caf\u00e9", "completion": "c"}\n'.encode("latin-1") + good + b"\n")
    conversations, report = load(path)
    assert prompts(conversations) == ["p1", "p1"]
    assert report.skipped == Counter({"not a JSON object": 1})
    assert report.first_bad_row == 2


def test_jsonl_with_utf8_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    rows = [{"prompt": "caf\u00e9", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows))
    conversations, report = load(path)
    assert prompts(conversations) == ["caf\u00e9", "p2"]
    assert report.skipped == Counter()


def test_csv_that_is_not_utf8_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,completion\ncaf\u00e9,c\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        load(path)
    assert WHERE in str(info.value)
    assert "latin1.csv" in str(info.value)


def test_source_without_valid_rows_is_an_error_with_counts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "p", "completion": ""},
        {"prompt": "p", "completion": ""},
        "nope",
    ])
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert WHERE in message
    assert "no usable rows" in message
    assert "skipped 3 of 3 rows" in message
    assert "'completion' is empty (2)" in message
    assert "not a JSON object (1)" in message
    assert "first bad row: 1" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert "empty.jsonl" in message
    assert "it is empty" in message


def test_undetectable_columns_ask_for_a_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2", "answer": "a2"}])
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert "cannot tell the format" in message
    assert "question, answer" in message
    assert "set format:" in message
    assert "prompt_completion" in message


# --------------------------------------------------------------------------------------------------
# mixtures and held-out splits
# --------------------------------------------------------------------------------------------------


def mixture(tmp_path: Path, sizes: dict[str, int], weights: dict[str, float] | None = None,
            **settings: Any) -> DataSettings:
    """Sources named by ``sizes`` (prompts ``name0``, ``name1``...), with optional weights."""
    sources = []
    for name, size in sizes.items():
        rows = [{"prompt": f"{name}{i}", "completion": "c"} for i in range(size)]
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        sources.append(DataSource(path=str(path), weight=(weights or {}).get(name, 1.0)))
    return DataSettings(train=sources, **settings)


def train_prompts(prepared) -> list[str]:
    return [row["messages"][0]["content"] for row in prepared.train]


@pytest.mark.parametrize(("size", "weight", "expected"), [(10, 0.5, 5), (7, 0.5, 4), (10, 0.25, 2), (10, 0.01, 1)])
def test_down_weighting_keeps_a_rounded_share_without_repeats(tmp_path: Path, size: int, weight: float,
                                                               expected: int) -> None:
    prepared = load_sft_data(mixture(tmp_path, {"a": size}, {"a": weight}))
    kept = train_prompts(prepared)
    assert len(kept) == expected
    assert len(set(kept)) == expected
    assert set(kept) <= {f"a{i}" for i in range(size)}
    assert prepared.eval is None


def test_weight_two_doubles_every_row(tmp_path: Path) -> None:
    prepared = load_sft_data(mixture(tmp_path, {"a": 6}, {"a": 2.0}))
    assert Counter(train_prompts(prepared)) == {f"a{i}": 2 for i in range(6)}


def test_fractional_up_weighting(tmp_path: Path) -> None:
    counts = Counter(train_prompts(load_sft_data(mixture(tmp_path, {"a": 10}, {"a": 1.5}))))
    assert sum(counts.values()) == 15
    assert set(counts) == {f"a{i}" for i in range(10)}  # every row at least once
    assert sorted(counts.values()) == [1] * 5 + [2] * 5


def test_mixture_of_sources(tmp_path: Path) -> None:
    prepared = load_sft_data(mixture(tmp_path, {"a": 10, "b": 4}, {"b": 0.5}))
    kept = train_prompts(prepared)
    assert len(kept) == 12
    assert sum(p.startswith("a") for p in kept) == 10
    assert sum(p.startswith("b") for p in kept) == 2
    assert [r.where for r in prepared.reports] == ["data.train[0]", "data.train[1]"]
    assert prepared.train.column_names == ["messages"]


def test_mixture_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = train_prompts(load_sft_data(mixture(tmp_path, {"a": 20, "b": 20}, {"b": 0.5}, seed=3, eval_size=5)))
    again = train_prompts(load_sft_data(mixture(tmp_path, {"a": 20, "b": 20}, {"b": 0.5}, seed=3, eval_size=5)))
    other = train_prompts(load_sft_data(mixture(tmp_path, {"a": 20, "b": 20}, {"b": 0.5}, seed=4, eval_size=5)))
    assert first == again
    assert first != other
    assert len(first) == len(other) == 25


def test_mixture_is_shuffled(tmp_path: Path) -> None:
    kept = train_prompts(load_sft_data(mixture(tmp_path, {"a": 30, "b": 30})))
    assert kept != [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(30)]
    assert sorted(kept) == sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(30)])


def test_a_seed_orders_the_mixture_as_it_did_before_the_arrow_preparation(tmp_path: Path) -> None:
    """The rows' order for a seed is the one alignkit gave when it mixed Python lists (weights drawn, then
    ``random.Random(seed).shuffle``): a recipe rerun after an upgrade trains on the same batches, and the demo
    stages' tests, tuned on that order, keep their margins (datasets' own numpy shuffle gives another order)."""
    import random

    rng = random.Random(7)
    rows = [f"a{i}" for i in range(40)] + rng.sample([f"b{i}" for i in range(30)], 15)
    rng.shuffle(rows)
    held_out, expected_train = rows[:5], rows[5:]
    prepared = load_sft_data(mixture(tmp_path, {"a": 40, "b": 30}, {"b": 0.5}, seed=7, eval_size=5))
    assert train_prompts(prepared) == expected_train
    assert [row["messages"][0]["content"] for row in prepared.eval] == held_out


def test_eval_size_as_fraction(tmp_path: Path) -> None:
    prepared = load_sft_data(mixture(tmp_path, {"a": 20}, eval_size=0.25))
    train, held_out = train_prompts(prepared), [row["messages"][0]["content"] for row in prepared.eval]
    assert (len(train), len(held_out)) == (15, 5)
    assert set(train).isdisjoint(held_out)
    assert set(train) | set(held_out) == {f"a{i}" for i in range(20)}


def test_eval_size_as_count(tmp_path: Path) -> None:
    prepared = load_sft_data(mixture(tmp_path, {"a": 20}, eval_size=3))
    assert (len(prepared.train), len(prepared.eval)) == (17, 3)


@pytest.mark.parametrize("eval_size", [10, 25, 0.96])
def test_eval_size_too_large_is_an_error(tmp_path: Path, eval_size: float) -> None:
    with pytest.raises(DataError) as info:
        load_sft_data(mixture(tmp_path, {"a": 10}, eval_size=eval_size))
    message = str(info.value)
    assert f"data.eval_size={eval_size}" in message
    assert "the mixture has 10" in message


def test_eval_sources_are_used_when_given(tmp_path: Path) -> None:
    settings = mixture(tmp_path, {"a": 10}, eval_size=0.5)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": f"e{i}", "completion": "c"} for i in range(4)])
    settings.eval = [DataSource(path=str(held_out), weight=3.0)]
    prepared = load_sft_data(settings)
    assert sorted(train_prompts(prepared)) == sorted(f"a{i}" for i in range(10))  # eval_size is not applied
    assert [row["messages"][0]["content"] for row in prepared.eval] == ["e0", "e1", "e2", "e3"]  # unweighted, in order
    assert [r.where for r in prepared.reports] == ["data.train[0]", "data.eval[0]"]


def test_apply_weight_and_split_eval_helpers() -> None:
    import random

    rows = list(range(10))
    assert apply_weight(rows, 1.0, random.Random(0)) == rows
    assert apply_weight(rows, 0.3, random.Random(0)) == apply_weight(rows, 0.3, random.Random(0))
    assert split_eval(rows, 0.2) == (rows[2:], rows[:2])
    assert split_eval(rows, 4) == (rows[4:], rows[:4])
    assert split_eval(rows, 0.01) == (rows, [])


# --------------------------------------------------------------------------------------------------
# demo sets
# --------------------------------------------------------------------------------------------------


def test_demo_reverse_sft_splits_do_not_share_prompts() -> None:
    train, test = reverse_sft("train"), reverse_sft("test")
    assert (len(train), len(test)) == (4000, 200)
    train_prompts_ = {row["messages"][0]["content"] for row in train}
    test_prompts = {row["messages"][0]["content"] for row in test}
    assert len(train_prompts_) == 4000 and len(test_prompts) == 200  # no duplicates within a split
    assert train_prompts_.isdisjoint(test_prompts)
    assert reverse_sft("test") == test  # deterministic


def test_demo_source_loads_through_the_data_layer() -> None:
    conversations, report = load_sft_source(DataSource(path="demo:reverse/sft", split="test"), "data.eval[0]")
    assert len(conversations) == 200
    assert report.format == "messages"
    first = conversations[0]
    assert first[0]["content"].startswith("reverse: ")
    words = first[0]["content"].removeprefix("reverse: ").split()
    assert first[1] == assistant(" ".join(reversed(words)))


def test_demo_unknown_split_is_an_error() -> None:
    with pytest.raises(DataError) as info:
        load_sft_source(DataSource(path="demo:reverse/sft", split="validation"), WHERE)
    message = str(info.value)
    assert "'validation'" in message
    assert "train, test" in message
