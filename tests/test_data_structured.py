"""Formats users' files have beyond plain chat: raw text for continued pretraining, OpenAI-style content parts,
and tool-calling conversations rendered through a chat template that supports tools."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import assistant, user, write_jsonl
from trl.data_utils import is_conversational

from alignkit.data import load_preference_source, load_sft_data, load_sft_source
from alignkit.errors import DataError
from alignkit.recipe.settings import DataSettings, DataSource

WHERE = "data.train[0]"


# --------------------------------------------------------------------------------------------------
# raw text (continued pretraining)
# --------------------------------------------------------------------------------------------------

CORPUS = [  # as a scraped or exported corpus: one document per line, some metadata, a few broken records
    {"text": "The tide rises twice a day.", "url": "https://example.org/tides", "id": 1},
    {"text": "Bread rises when yeast makes gas.\n\nBake it hot.", "url": "https://example.org/bread", "id": 2},
    {"text": "", "url": "https://example.org/empty", "id": 3},
    {"text": None, "url": "https://example.org/missing", "id": 4},
    {"text": 42, "url": "https://example.org/number", "id": 5},
    {"text": "Rivers run to the sea.", "url": "https://example.org/rivers", "id": 6},
]


def test_raw_text_corpus_becomes_language_modelling_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    texts, report = load_sft_source(DataSource(path=str(path)), WHERE)
    assert texts == [CORPUS[0]["text"], CORPUS[1]["text"], CORPUS[5]["text"]]
    assert report.format == "text"
    assert report.skipped == Counter({"'text' is empty": 1, "'text' is missing": 1, "'text' is not a string": 1})
    assert report.first_bad_row == 3
    prepared = load_sft_data(DataSettings(train=[DataSource(path=str(path))], eval_size=1))
    assert prepared.train.column_names == ["text"]  # TRL's language-modelling type: the loss is on every token
    assert not is_conversational(prepared.train[0])
    assert len(prepared.train) + len(prepared.eval) == 3


def test_raw_text_and_conversations_are_not_mixed(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS[:2])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [user("hi"), assistant("hello")]}])
    with pytest.raises(DataError) as info:
        load_sft_data(DataSettings(train=[DataSource(path=str(corpus)), DataSource(path=str(chat))]))
    assert "raw text and conversations cannot be mixed" in str(info.value)
    assert "corpus.jsonl" in str(info.value) and "chat.jsonl" in str(info.value)


# --------------------------------------------------------------------------------------------------
# content as typed parts (OpenAI's chat format)
# --------------------------------------------------------------------------------------------------


def parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": text} for text in texts]


def test_text_content_parts_are_joined_and_other_parts_are_bad_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "openai.jsonl", [
        {"messages": [{"role": "system", "content": parts("You are terse.")},
                      {"role": "user", "content": parts("Summarise: ", "the cat sat on the mat.")},
                      {"role": "assistant", "content": parts("A cat sat.")}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                   {"type": "image_url",
                                                    "image_url": {"url": "https://example.org/cat.png"}}]},
                      {"role": "assistant", "content": "A cat."}]},
        {"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "plain text still works"}, {"role": "assistant", "content": "yes"}]},
    ])
    conversations, report = load_sft_source(DataSource(path=str(path)), WHERE)
    assert conversations == [
        [{"role": "system", "content": "You are terse."}, user("Summarise: the cat sat on the mat."),
         assistant("A cat sat.")],
        [user("plain text still works"), assistant("yes")],
    ]
    assert report.skipped == Counter({
        "'messages' has a message with a content part of type 'image_url' (only text parts are read)": 1,
        "'messages' has a text part without a string 'text'": 1,
    })
    assert report.first_bad_row == 2


def test_content_parts_in_preference_pairs(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": parts("2+2?")}],
         "chosen": [{"role": "assistant", "content": parts("4")}],
         "rejected": [{"role": "assistant", "content": parts("5")}]},
    ])
    rows, _ = load_preference_source(DataSource(path=str(path)), WHERE, "pairs")
    assert rows == [{"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}]


# --------------------------------------------------------------------------------------------------
# tool calling
# --------------------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CONVERSATION = {  # OpenAI's / TRL's tool-calling shape: tools, an assistant turn calling one, its result
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "user", "content": "Is it raining in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"rain\": true, \"temp\": 7}"},
        {"role": "assistant", "content": "Yes, it is raining in Oslo (7 degrees)."},
    ],
}
# A template that supports tools, as Qwen's and Llama's do: the tool list, each call as JSON (arguments given
# as JSON text are written as they are), tool results in their own turn. Null fields test as false.
TOOL_TEMPLATE = (
    "{%- if tools %}<tools>{{ tools | tojson }}</tools>{{ '\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<assistant>"
    "{%- for call in m.tool_calls %}<call>{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments if call.function.arguments is string else call.function.arguments | tojson }}}"
    "</call>{%- endfor %}{{ '\\n' }}"
    "{%- elif m.role == 'tool' %}<tool id={{ m.tool_call_id }}>{{ m.content }}</tool>{{ '\\n' }}"
    "{%- else %}<{{ m.role }}>{{ m.content }}{{ '\\n' }}{%- endif %}"
    "{%- endfor %}"
)


def test_tool_calling_conversation_reaches_a_template_that_supports_tools(tmp_path: Path, demo_model_path) -> None:
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "tools.jsonl", [
        TOOL_CONVERSATION,
        {"messages": [user("Say hi"), assistant("hi")]},  # a row without tools in the same file
        {"messages": [user("x"), {"role": "user", "content": "y", "tool_calls": [{"function": {"name": "f"}}]}]},
    ])
    prepared = load_sft_data(DataSettings(train=[DataSource(path=str(path))], seed=0))
    assert len(prepared.train) == 2 and sum(prepared.reports[0].skipped.values()) == 1
    assert prepared.reports[0].skipped == Counter({"'messages' has tool calls in a user message (only the assistant "
                                                   "calls tools)": 1})
    rows = {row["messages"][0]["content"]: row for row in prepared.train}
    tool_row, plain_row = rows["Is it raining in Oslo?"], rows["Say hi"]
    call = tool_row["messages"][1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}
    assert tool_row["messages"][2]["tool_call_id"] == "call_1"
    assert json.loads(tool_row["tools"]) == [WEATHER_TOOL]
    assert plain_row["tools"] is None and plain_row["messages"][1]["tool_calls"] is None

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    # As TRL's SFT tokenisation does: the tools column decoded, passed to the template with the messages.
    rendered = tokenizer.apply_chat_template(tool_row["messages"], tools=json.loads(tool_row["tools"]),
                                             chat_template=TOOL_TEMPLATE, tokenize=False)
    assert "<tools>" in rendered and "\"get_weather\"" in rendered.split("</tools>")[0]
    assert "<call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</call>" in rendered
    assert "<tool id=call_1>{\"rain\": true, \"temp\": 7}</tool>" in rendered
    assert rendered.endswith("<assistant>Yes, it is raining in Oslo (7 degrees).\n")
    plain = tokenizer.apply_chat_template(plain_row["messages"], chat_template=TOOL_TEMPLATE, tokenize=False)
    assert plain == "<user>Say hi\n<assistant>hi\n"


# --------------------------------------------------------------------------------------------------
# TRL's own dataset types
# --------------------------------------------------------------------------------------------------


def test_trl_dataset_types_are_read_as_they_are(tmp_path: Path) -> None:
    """TRL's documented types go in unchanged: language modelling (text, messages), prompt-completion
    (conversational), preference (explicit prompt) and unpaired preference; stepwise supervision is refused
    with the reason (it trains process reward models, which no alignkit stage does)."""
    language = write_jsonl(tmp_path / "lm.jsonl", [{"text": "The sky is blue."}])
    assert load_sft_source(DataSource(path=str(language)), WHERE)[0] == ["The sky is blue."]
    completion = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": [user("The sky is")],
                                                      "completion": [assistant("blue.")]}])
    assert load_sft_source(DataSource(path=str(completion)), WHERE)[0] == [[user("The sky is"), assistant("blue.")]]
    preference = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": [user("The sky is")], "chosen": [assistant("blue.")],
                                                        "rejected": [assistant("green.")]}])
    assert load_preference_source(DataSource(path=str(preference)), WHERE, "pairs")[0] == [
        {"prompt": [user("The sky is")], "chosen": [assistant("blue.")], "rejected": [assistant("green.")]}]
    unpaired = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": [user("The sky is")], "completion": [assistant("blue.")],
                                                     "label": True}])
    assert load_preference_source(DataSource(path=str(unpaired)), WHERE, "unpaired")[0] == [
        {"prompt": [user("The sky is")], "completion": [assistant("blue.")], "label": True}]
    stepwise = write_jsonl(tmp_path / "steps.jsonl", [{"prompt": "Which number is larger, 9.8 or 9.11?",
                                                       "completions": ["11 is larger than 8.", "So 9.11 is larger."],
                                                       "labels": [False, False]}])
    with pytest.raises(DataError) as info:
        load_preference_source(DataSource(path=str(stepwise)), WHERE, "pairs")
    assert "stepwise supervision" in str(info.value) and "steps.jsonl" in str(info.value)


def test_arrow_files_and_directories_load_through_datasets(tmp_path: Path) -> None:
    from datasets import Dataset

    rows = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    expected = [[user("2+2?"), assistant("4")], [user("3+3?"), assistant("6")]]
    assert load_sft_source(DataSource(path=str(arrow)), WHERE)[0] == expected
    shards = tmp_path / "shards"
    shards.mkdir()
    for index, row in enumerate(rows):
        Dataset.from_list([row]).to_parquet(str(shards / f"part-{index}.parquet"))
    assert sorted(load_sft_source(DataSource(path=str(shards)), WHERE)[0], key=str) == sorted(expected, key=str)
