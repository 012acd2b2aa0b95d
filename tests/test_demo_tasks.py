"""alignkit.demo.tasks: the demo datasets are deterministic, held-out means unseen, the task rules hold on every
row, the tokenizer covers every word a task emits, and the base model's pretraining never shows a task mapping.

Fast: no model is built or trained (the tokenizer alone trains in well under a second).
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from conftest import RECIPES

from alignkit.data import load_sft_data
from alignkit.demo import tasks
from alignkit.demo.build import build_tokenizer
from alignkit.demo.tasks import (
    DEMO_DATASETS,
    DEMO_SPLITS,
    FILLERS,
    PRETRAIN_INSTRUCTIONS,
    TO_ZORBISH,
    WORDS,
    ZORBISH,
    pretraining_conversations,
    translate,
)
from alignkit.recipe import load_recipe

# The column each dataset's input is in (chat rows: the user turn).
RAW_INPUT = {"summarize/raw": "document", "translate/raw": "source"}
RAW_OUTPUT = {"summarize/raw": "summary", "translate/raw": "target"}
RECIPE_FOR = {"summarize/raw": "demo/sft-summarize.yaml", "translate/raw": "demo/sft-translate.yaml"}


def task_input(name: str, row: dict) -> str:
    if name in RAW_INPUT:
        return row[RAW_INPUT[name]]
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def task_output(name: str, row: dict) -> str:
    if name in RAW_OUTPUT:
        return row[RAW_OUTPUT[name]]
    return next(m["content"] for m in row["messages"] if m["role"] == "assistant")


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], list[dict]]:
    """Every demo dataset's rows, per (name, split), generated once for the module."""
    return {(name, split): make(split) for name, make in DEMO_DATASETS.items() for split in DEMO_SPLITS}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_new_tasks_are_registered():
    assert {"reverse/sft", "summarize/raw", "translate/raw"} <= set(DEMO_DATASETS)
    assert set(DEMO_SPLITS) == {"train", "test"}


@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_same_rows_every_time(name, rows):
    for split in DEMO_SPLITS:
        assert DEMO_DATASETS[name](split) == rows[name, split]


@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_held_out_inputs_are_unseen_and_unique(name, rows):
    train = [task_input(name, row) for row in rows[name, "train"]]
    test = [task_input(name, row) for row in rows[name, "test"]]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert len(test) >= 200  # enough for the evaluate section's max_samples


# SHA-256 of json.dumps(reverse_sft(split)): the reversal recipes' numbers (and the README's) depend on these
# exact rows, so adding tasks must not disturb their seeds or their generation.
REVERSE_SHA256 = {
    "train": "4de66d79041d860db8fb818b0ca78266ed5892961ada9be3062b39ad6ecb1e90",
    "test": "1bab2430c53b9cd88a57512aa90fcb6164393e735c3f16c754e680e09d44398b",
}


@pytest.mark.parametrize("split", DEMO_SPLITS)
def test_reverse_rows_unchanged(split, rows):
    assert hashlib.sha256(json.dumps(rows["reverse/sft", split]).encode()).hexdigest() == REVERSE_SHA256[split]


def test_zorbish_dictionary_is_a_bijection_onto_new_words():
    assert len(ZORBISH) == len(set(ZORBISH)) == len(WORDS) == len(TO_ZORBISH)
    assert set(TO_ZORBISH) == set(WORDS) and set(TO_ZORBISH.values()) == set(ZORBISH)
    assert not set(ZORBISH) & set(WORDS) and not set(ZORBISH) & set(FILLERS)
    assert all(re.fullmatch(r"[a-z]+", word) for word in ZORBISH)


def test_fillers_are_not_demo_words():
    assert len(set(FILLERS)) == len(FILLERS)
    assert not set(FILLERS) & set(WORDS)


@pytest.mark.parametrize("split", DEMO_SPLITS)
def test_every_translation_follows_the_dictionary_and_swaps_pairs(split, rows):
    for row in rows["translate/raw", split]:
        source, target = row["source"].split(), row["target"].split()
        assert 3 <= len(source) <= 6 and set(source) <= set(WORDS)
        glossed = [TO_ZORBISH[word] for word in source]
        # Pairs (1st, 2nd), (3rd, 4th), ... swap places; an odd last word stays last.
        assert target[0::2] == glossed[1::2] + glossed[len(glossed) - len(glossed) % 2:]
        assert target[1::2] == glossed[0::2][: len(glossed) // 2]


def test_translation_example():
    assert translate(["apple", "river", "stone"]) == ["thousuk", "dretex", "drithux"]
    assert translate(["apple", "river", "stone", "cloud"]) == ["thousuk", "dretex", "nizvain", "drithux"]


@pytest.mark.parametrize("split", DEMO_SPLITS)
def test_every_summary_is_the_key_words_in_order(split, rows):
    for row in rows["summarize/raw", split]:
        document, summary = row["document"].split(), row["summary"].split()
        assert 8 <= len(document) <= 16
        assert set(document) <= set(WORDS) | set(FILLERS)
        assert summary == [word for word in document if word in WORDS]
        assert 2 <= len(summary) <= 4 and len(set(summary)) == len(summary)


def test_tokenizer_has_one_token_per_word(tokenizer):
    # A task word split into pieces would be a multi-token output that pretraining never practised.
    for word in (*WORDS, *FILLERS, *ZORBISH):
        assert len(tokenizer.tokenize(" " + word)) == 1, word


@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_tokenizer_round_trips_every_output(name, rows, tokenizer):
    for split in DEMO_SPLITS:
        for row in rows[name, split]:
            text = task_output(name, row)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text.split())
            assert tokenizer.decode(ids).strip() == text


@pytest.mark.parametrize("name", RECIPE_FOR)
def test_recipe_templates_build_prompts_around_the_input(name, rows):
    recipe = load_recipe(RECIPES / RECIPE_FOR[name])
    assert recipe.data.eval and recipe.data.eval[0].split == "test"
    assert len(recipe.data.train[0].templates) >= 3
    assert recipe.data.train[0].templates == recipe.data.eval[0].templates
    for template in recipe.data.train[0].templates:
        # The input must follow a space or start the prompt: after a newline the byte-level tokenizer would
        # split its first word into pieces the base model never read.
        before = template.split("{" + RAW_INPUT[name] + "}")[0]
        assert before == "" or before.endswith(" "), template

    data = load_sft_data(recipe.data)
    assert len(data.eval) == len(rows[name, "test"])
    # Mixing shuffles the train rows (and summaries repeat), so find each prompt's row by its completion.
    inputs_by_output: dict[str, list[str]] = {}
    for row in rows[name, "train"]:
        inputs_by_output.setdefault(task_output(name, row), []).append(task_input(name, row))
    for conversation in data.train.select(range(50))["messages"]:
        prompt, completion = conversation[0]["content"], conversation[1]["content"]
        assert [m["role"] for m in conversation] == ["user", "assistant"]
        assert any(text in prompt for text in inputs_by_output[completion])
    phrasings = set()
    for row, conversation in zip(rows[name, "test"][:50], data.eval.select(range(50))["messages"], strict=True):
        prompt = conversation[0]["content"]
        assert task_input(name, row) in prompt and conversation[1]["content"] == task_output(name, row)
        phrasings.add(prompt.replace(task_input(name, row), "{}"))
    assert len(phrasings) > 1  # several phrasings, not one


def test_pretraining_never_shows_a_task_mapping():
    conversations = pretraining_conversations(3000)
    seen_outputs: set[str] = set()
    english, zorbish = set(WORDS), set(ZORBISH)
    for user, assistant in conversations:
        instruction, _, text = user["content"].partition(" ")
        assert instruction in PRETRAIN_INSTRUCTIONS
        assert not re.search(r"summar|translat|zorbish|tl;dr|reverse", user["content"], re.IGNORECASE)
        words, answer = text.split(), assistant["content"].split()
        # Copy / first / last only: the answer is a piece of the input, never a translation or a summary.
        assert answer == {"copy:": words, "first:": words[:1], "last:": words[-1:]}[instruction]
        # No sentence mixes English and Zorbish, so no conversation pairs a word with its translation.
        assert not (set(words) & english and set(words) & zorbish)
        seen_outputs.update(answer)
    # ... while every word a task must produce is produced in pretraining.
    assert seen_outputs >= english | zorbish | set(FILLERS)


def test_pretraining_is_deterministic():
    assert pretraining_conversations(50) == pretraining_conversations(50)
    assert pretraining_conversations(50, seed=1) != pretraining_conversations(50)


def test_tokenizer_corpus_covers_every_word():
    corpus = " ".join(tasks.tokenizer_corpus()).split()
    assert set(corpus) >= set(WORDS) | set(FILLERS) | set(ZORBISH) | set(tasks.TASK_INSTRUCTIONS)
