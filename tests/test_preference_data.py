"""alignkit.data for preference stages: every preference format normalised to TRL's conversational pairs or
unpaired rows, rated completions paired by rule, bad rows counted (not fatal), margins, and the mixture."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import assistant, system, user, write_jsonl
from datasets import Dataset

from alignkit.data import formats, load_preference_data, load_preference_source, load_sft_source
from alignkit.errors import DataError, RecipeError
from alignkit.recipe.loading import load_recipe
from alignkit.recipe.settings import DataSettings, DataSource

WHERE = "data.train[0]"



def load(path: Path, kind: str = "pairs", **options: Any) -> tuple[list[dict], Any]:
    """(rows, report) for one source; ``pairing`` and ``system_prompt`` go to the loader, the rest to DataSource."""
    pairing = options.pop("pairing", "best_vs_random")
    system_prompt = options.pop("system_prompt", None)
    return load_preference_source(DataSource(path=str(path), **options), WHERE, kind, pairing, system_prompt)


def pair(prompt: str, chosen: str, rejected: str) -> dict[str, list[dict[str, str]]]:
    return {"prompt": [user(prompt)], "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}


def settings_for(*paths: Path, **options: Any) -> DataSettings:
    return DataSettings(train=[DataSource(path=str(p)) for p in paths], **options)


def rated_rows(count: int, ratings: list[float]) -> list[dict]:
    """``count`` rows ``q{i}`` whose completions ``c0, c1, ...`` carry ``ratings``."""
    return [{"prompt": f"q{i}", "completions": [f"c{j}" for j in range(len(ratings))], "ratings": ratings}
            for i in range(count)]


# --------------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------------

PAIR_CASES = [
    pytest.param(
        "preference",
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        pair("2+2?", "4", "5"),
        id="preference-text",
    ),
    pytest.param(
        "preference",
        {"prompt": [system("terse"), user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("22")]},
        {"prompt": [system("terse"), user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("22")]},
        id="preference-conversational",
    ),
    pytest.param(
        "preference",
        {"prompt": [user("hi")], "chosen": "hello", "rejected": [assistant("go away")]},
        pair("hi", "hello", "go away"),
        id="preference-mixed-forms",
    ),
    pytest.param(
        "preference",  # as HuggingFaceH4/ultrafeedback_binarized: a prompt column and full conversations
        {"prompt": "sky?", "chosen": [user("sky?"), assistant("blue")], "rejected": [user("sky?"), assistant("green")],
         "messages": [user("sky?"), assistant("blue")], "score_chosen": 8.0},
        pair("sky?", "blue", "green"),
        id="preference-full-conversations",
    ),
    pytest.param(
        "implicit_preference",
        {"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("what")]},
        pair("hi", "hello", "what"),
        id="implicit-single-turn",
    ),
    pytest.param(
        "implicit_preference",
        {"chosen": [system("s"), user("a"), assistant("b"), user("c"), assistant("good")],
         "rejected": [system("s"), user("a"), assistant("b"), user("c"), assistant("bad")]},
        {"prompt": [system("s"), user("a"), assistant("b"), user("c")], "chosen": [assistant("good")],
         "rejected": [assistant("bad")]},
        id="implicit-multi-turn",
    ),
    pytest.param(
        "implicit_preference",  # a shared start of the answer stays in the answers: the prompt ends with the user
        {"chosen": [user("q"), assistant("Sure."), assistant("yes")],
         "rejected": [user("q"), assistant("Sure."), assistant("no")]},
        {"prompt": [user("q")], "chosen": [assistant("Sure."), assistant("yes")],
         "rejected": [assistant("Sure."), assistant("no")]},
        id="implicit-shared-assistant-start",
    ),
    pytest.param(
        "rated",
        {"prompt": "q", "completions": ["meh", "best", "worst"], "ratings": [3, 9.5, 1]},
        pair("q", "best", "worst"),  # best_vs_worst in this table (see the pairing tests for best_vs_random)
        id="rated-strings-with-ratings",
    ),
    pytest.param(
        "rated",  # openbmb/UltraFeedback's completions
        {"prompt": [user("q")], "completions": [
            {"model": "m1", "response": "low", "overall_score": 2.5, "fine-grained_score": 9},
            {"model": "m2", "response": "high", "overall_score": 8},
        ]},
        pair("q", "high", "low"),
        id="rated-ultrafeedback-dicts",
    ),
    pytest.param(
        "rated",
        {"prompt": "q", "completions": [{"text": "a", "score": 1}, {"content": "b", "rating": 2}]},
        pair("q", "b", "a"),
        id="rated-dicts-other-keys",
    ),
]


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize(("fmt", "row", "expected"), PAIR_CASES)
def test_pair_format_is_normalised(tmp_path: Path, fmt: str, row: dict, expected: dict, explicit: bool) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [row, row])
    rows, report = load(path, format=fmt if explicit else "auto", pairing="best_vs_worst")
    assert rows == [expected, expected]
    assert report.format == fmt
    assert (report.rows_read, report.rows_kept, report.skipped, report.first_bad_row) == (2, 2, Counter(), None)


UNPAIRED_CASES = [
    pytest.param({"prompt": "2+2?", "completion": "4", "label": True},
                 {"prompt": [user("2+2?")], "completion": [assistant("4")], "label": True}, id="text-true"),
    pytest.param({"prompt": [system("s"), user("2+2?")], "completion": [assistant("5")], "label": False},
                 {"prompt": [system("s"), user("2+2?")], "completion": [assistant("5")], "label": False},
                 id="conversational-false"),
    pytest.param({"prompt": "p", "completion": "c", "label": 1},
                 {"prompt": [user("p")], "completion": [assistant("c")], "label": True}, id="int-1"),
    pytest.param({"prompt": "p", "completion": "c", "label": 0},
                 {"prompt": [user("p")], "completion": [assistant("c")], "label": False}, id="int-0"),
]


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize(("row", "expected"), UNPAIRED_CASES)
def test_unpaired_format_is_normalised(tmp_path: Path, row: dict, expected: dict, explicit: bool) -> None:
    path = write_jsonl(tmp_path / "kto.jsonl", [row])
    rows, report = load(path, kind="unpaired", format="unpaired" if explicit else "auto")
    assert rows == [expected]
    assert rows[0]["label"] is expected["label"]  # a real bool, not 0 / 1
    assert report.format == "unpaired"


def test_detection_keeps_sft_and_preference_apart() -> None:
    preference_formats = list(formats.PREFERENCE_FORMATS)
    # SFT detection is unchanged by the preference signatures (the default candidates are the SFT formats).
    assert formats.detect_format(["prompt", "completion", "label"]) == "prompt_completion"
    assert formats.detect_format(["prompt", "chosen", "rejected"]) is None
    assert formats.detect_format(["messages", "prompt", "chosen", "rejected"]) == "messages"
    assert formats.detect_format(["prompt", "completion", "label"], preference_formats) == "unpaired"
    assert formats.detect_format(["messages", "prompt", "chosen", "rejected"], preference_formats) == "preference"
    assert formats.detect_format(["chosen", "rejected", "id"], preference_formats) == "implicit_preference"
    assert formats.detect_format(["prompt", "completions", "ratings"], preference_formats) == "rated"
    assert formats.detect_format(["prompt", "completion"], preference_formats) is None


def test_sft_loader_still_reads_prompt_completion_with_a_label_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    conversations, report = load_sft_source(DataSource(path=str(path)), WHERE)
    assert conversations == [[user("p"), assistant("c")]]
    assert report.format == "prompt_completion"


def test_preference_file_with_messages_column_is_sft_for_sft_and_pairs_for_dpo(tmp_path: Path) -> None:
    row = {"prompt": "sky?", "chosen": [user("sky?"), assistant("blue")],
           "rejected": [user("sky?"), assistant("green")], "messages": [user("sky?"), assistant("blue")]}
    path = write_jsonl(tmp_path / "ufb.jsonl", [row])
    assert load_sft_source(DataSource(path=str(path)), WHERE)[0] == [[user("sky?"), assistant("blue")]]
    assert load(path)[0] == [pair("sky?", "blue", "green")]


def test_undetectable_columns_ask_for_a_preference_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert "cannot tell the format" in message
    assert "preference, implicit_preference, rated" in message


def test_unknown_preference_format_suggests_the_nearest(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as info:
        load(path, format="preferance")
    assert "Did you mean 'preference'?" in str(info.value)


@pytest.mark.parametrize("fmt", ["auto", "unpaired"])
def test_unpaired_rows_are_refused_for_pairs_with_the_stages_named(tmp_path: Path, fmt: str) -> None:
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    with pytest.raises(DataError) as info:
        load(path, format=fmt)
    message = str(info.value)
    assert message.startswith(f"{WHERE}: ")
    assert "kto.jsonl" in message
    assert "unpaired rows (completion/label) are for the kto stage; rm/dpo/orpo need pairs" in message
    with pytest.raises(DataError, match="kto stage"):
        load_preference_data(settings_for(path), "pairs")


def test_unknown_kind_is_a_programming_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="kind"):
        load_preference_data(settings_for(path), "pair")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# file types
# --------------------------------------------------------------------------------------------------


def test_parquet_rated_with_nested_completions(tmp_path: Path) -> None:
    """Arrow gives every completion struct every key (None where absent): the first non-null key counts."""
    rows = [
        {"prompt": "q1", "completions": [{"response": "a", "overall_score": 1.0, "text": None},
                                         {"response": "b", "overall_score": 4.0, "text": None}]},
        {"prompt": "q2", "completions": [{"response": None, "overall_score": 5.0, "text": "c"},
                                         {"response": "d", "overall_score": 2.0, "text": None}]},
    ]
    path = tmp_path / "rated.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    pairs, report = load(path)
    assert pairs == [pair("q1", "b", "a"), pair("q2", "c", "d")]
    assert report.format == "rated"


def test_csv_preference_text(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"prompt": ["2+2", "capital of France"], "chosen": ["4", "Paris"],
                  "rejected": ["5", "NA"]}).to_csv(path, index=False)
    pairs, report = load(path)
    assert pairs == [pair("2+2", "4", "5"), pair("capital of France", "Paris", "NA")]  # "NA" is text in a CSV
    assert report.format == "preference"


def test_parquet_margin_column_with_a_null_is_one_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    Dataset.from_list([
        {"prompt": "p1", "chosen": "a", "rejected": "b", "margin": 0.5},
        {"prompt": "p2", "chosen": "a", "rejected": "b", "margin": None},
        {"prompt": "p3", "chosen": "a", "rejected": "b", "margin": 2.0},
    ]).to_parquet(str(path))
    pairs, report = load(path)
    assert [(p["prompt"][0]["content"], p["margin"]) for p in pairs] == [("p1", 0.5), ("p3", 2.0)]
    assert report.skipped == Counter({"'margin' is missing": 1})
    assert report.first_bad_row == 2


# --------------------------------------------------------------------------------------------------
# system prompt, column renames, templates
# --------------------------------------------------------------------------------------------------


def test_system_prompt_added_to_prompts_without_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": [system("own"), user("d")], "chosen": "e", "rejected": "f"},
    ])
    pairs, _ = load(path, system_prompt="default")
    assert [p["prompt"] for p in pairs] == [[system("default"), user("a")], [system("own"), user("d")]]
    assert [p["chosen"] for p in pairs] == [[assistant("b")], [assistant("e")]]  # answers untouched
    assert load(path)[0][0]["prompt"] == [user("a")]  # no system prompt configured: nothing added


def test_system_prompt_from_settings_for_implicit_and_unpaired(tmp_path: Path) -> None:
    implicit = write_jsonl(tmp_path / "i.jsonl", [
        {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},
        {"chosen": [system("own"), user("q"), assistant("a")], "rejected": [system("own"), user("q"), assistant("b")]},
    ])
    prepared = load_preference_data(settings_for(implicit, system_prompt="sys"), "pairs")
    assert sorted(row["prompt"][0]["content"] for row in prepared.train) == ["own", "sys"]
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    prepared = load_preference_data(settings_for(kto, system_prompt="sys"), "unpaired")
    assert prepared.train[0]["prompt"] == [system("sys"), user("q")]


def test_columns_are_renamed_before_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "good": "yes", "bad": "no", "id": 3}])
    pairs, report = load(path, columns={"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert pairs == [pair("q", "yes", "no")]
    assert report.format == "preference"


def test_columns_rename_ultrafeedback_instruction(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "uf.jsonl", [
        {"instruction": "q",
         "completions": [{"response": "x", "overall_score": 1}, {"response": "y", "overall_score": 3}]},
    ])
    pairs, report = load(path, columns={"instruction": "prompt"})
    assert pairs == [pair("q", "y", "x")]
    assert report.format == "rated"


def test_templates_render_the_prompt_and_keep_the_answers(tmp_path: Path) -> None:
    rows = [{"document": f"doc{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    templates = ["Summarise: {document}", "TL;DR of {document}"]
    pairs, report = load(path, templates=templates)
    assert report.format == "preference"
    assert [p["chosen"] for p in pairs] == [[assistant(f"good{i}")] for i in range(30)]
    assert [p["rejected"] for p in pairs] == [[assistant(f"bad{i}")] for i in range(30)]
    prompts = [p["prompt"] for p in pairs]
    assert all(len(prompt) == 1 and prompt[0]["role"] == "user" for prompt in prompts)
    assert all(prompt[0]["content"] in (f"Summarise: doc{i}", f"TL;DR of doc{i}") for i, prompt in enumerate(prompts))
    assert {prompt[0]["content"].split()[0] for prompt in prompts} == {"Summarise:", "TL;DR"}  # both phrasings used
    assert load(path, templates=templates)[0] == pairs  # the same phrasing for a row on every load


def test_templates_for_rated_and_unpaired_rows(tmp_path: Path) -> None:
    rated = write_jsonl(tmp_path / "r.jsonl", [{"q": "2+2", "completions": ["4", "5"], "ratings": [2, 1]}])
    assert load(rated, templates=["Compute {q}"])[0] == [pair("Compute 2+2", "4", "5")]
    kto = write_jsonl(tmp_path / "k.jsonl", [{"q": "2+2", "completion": "4", "label": True}])
    rows, _ = load(kto, kind="unpaired", templates=["Compute {q}"])
    assert rows[0]["prompt"] == [user("Compute 2+2")]


def test_template_missing_a_column_is_a_bad_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"document": "d", "chosen": "a", "rejected": "b"},
        {"text": "d", "chosen": "a", "rejected": "b"},
    ])
    pairs, report = load(path, templates=["Summarise: {document}"])
    assert pairs == [pair("Summarise: d", "a", "b")]
    assert report.skipped == Counter({"the prompt template needs a column 'document'": 1})


def test_templates_with_implicit_preference_are_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", [{"chosen": [user("q"), assistant("a")],
                                               "rejected": [user("q"), assistant("b")]}])
    with pytest.raises(DataError) as info:
        load(path, format="implicit_preference", templates=["{x}"])
    assert "implicit_preference" in str(info.value) and "templates" in str(info.value)


# --------------------------------------------------------------------------------------------------
# pairing rated completions
# --------------------------------------------------------------------------------------------------


def rejected_texts(pairs: list[dict]) -> list[str]:
    return [p["rejected"][0]["content"] for p in pairs]


def test_best_vs_worst_picks_the_lowest(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", rated_rows(20, [3, 7, 1, 5, 2]))
    pairs, _ = load(path, pairing="best_vs_worst")
    assert {p["chosen"][0]["content"] for p in pairs} == {"c1"}
    assert set(rejected_texts(pairs)) == {"c2"}


def test_best_vs_random_picks_lower_rated_ones_deterministically(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", rated_rows(60, [3, 7, 1, 5, 7]))
    pairs, _ = load(path, pairing="best_vs_random")
    assert {p["chosen"][0]["content"] for p in pairs} == {"c1"}  # the first of the two rated 7
    rejected = rejected_texts(pairs)
    # Never the best nor its equal (c4), and more than one distinct lower-rated one over many rows.
    assert set(rejected) <= {"c0", "c2", "c3"}
    assert len(set(rejected)) > 1
    assert rejected_texts(load(path, pairing="best_vs_random")[0]) == rejected  # the same on every load
    prepared = load_preference_data(settings_for(path), "pairs")
    again = load_preference_data(settings_for(path, seed=7), "pairs")
    by_prompt = lambda data: {r["prompt"][0]["content"]: r["rejected"][0]["content"] for r in data.train}  # noqa: E731
    assert by_prompt(prepared) == by_prompt(again) == {p["prompt"][0]["content"]: r for p, r in zip(pairs, rejected)}


def test_ties(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q", "completions": ["first best", "second best", "low a", "low b"], "ratings": [5, 5, 1, 1]},
    ])
    pairs, _ = load(path, pairing="best_vs_worst")
    assert pairs == [pair("q", "first best", "low a")]  # first of the best, first of the lowest
    for _ in range(3):
        pairs, _ = load(path, pairing="best_vs_random")
        assert pairs[0]["chosen"] == [assistant("first best")]
        assert pairs[0]["rejected"][0]["content"] in ("low a", "low b")  # a tie with the best is never rejected


def test_pairing_set_in_data_settings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", rated_rows(30, [1, 9, 4, 2]))
    worst = load_preference_data(settings_for(path, pairing="best_vs_worst"), "pairs")
    assert {row["rejected"][0]["content"] for row in worst.train} == {"c0"}
    assert worst.train.column_names == ["prompt", "chosen", "rejected"]  # rated rows carry no margin
    random_ = load_preference_data(settings_for(path), "pairs")
    assert len({row["rejected"][0]["content"] for row in random_.train}) > 1


# --------------------------------------------------------------------------------------------------
# unpaired (KTO) data
# --------------------------------------------------------------------------------------------------


def test_pairs_become_two_unpaired_rows(tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}", "margin": 1.0} for i in range(10)
    ])
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "k", "completion": "solo", "label": False}])
    prepared = load_preference_data(settings_for(pairs, kto), "unpaired")
    assert prepared.train.column_names == ["prompt", "completion", "label"]  # margins dropped
    rows = list(prepared.train)
    assert len(rows) == 21
    outcomes = Counter((r["prompt"][0]["content"], r["completion"][0]["content"], r["label"]) for r in rows)
    expected = {(f"p{i}", f"good{i}", True) for i in range(10)} | {(f"p{i}", f"bad{i}", False) for i in range(10)}
    assert outcomes == Counter(expected | {("k", "solo", False)})
    # Shuffled again once split into halves: TRL's KTO takes a neighbour's completion for its KL estimate.
    only_pairs = list(load_preference_data(settings_for(pairs), "unpaired").train)
    assert not all(only_pairs[i]["prompt"] == only_pairs[i + 1]["prompt"] for i in range(0, 20, 2))


def test_unpaired_eval_split_keeps_both_halves_of_a_pair_together(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(20)])
    prepared = load_preference_data(settings_for(path, eval_size=5), "unpaired")
    assert (len(prepared.train), len(prepared.eval)) == (30, 10)
    train_prompts = Counter(r["prompt"][0]["content"] for r in prepared.train)
    eval_prompts = Counter(r["prompt"][0]["content"] for r in prepared.eval)
    assert set(train_prompts).isdisjoint(eval_prompts)
    assert set(train_prompts.values()) == set(eval_prompts.values()) == {2}


def test_weights_count_pairs(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)])
    prepared = load_preference_data(DataSettings(train=[DataSource(path=str(path), weight=0.5)]), "unpaired")
    prompts = Counter(r["prompt"][0]["content"] for r in prepared.train)
    assert len(prompts) == 5 and set(prompts.values()) == {2}


# --------------------------------------------------------------------------------------------------
# margins and the mixture
# --------------------------------------------------------------------------------------------------


def test_margin_passes_through(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "p1", "chosen": "a", "rejected": "b", "margin": 2},
        {"chosen": [user("p2"), assistant("a")], "rejected": [user("p2"), assistant("b")], "margin": 0.25},
    ])
    prepared = load_preference_data(settings_for(path), "pairs")
    assert sorted(prepared.train.column_names) == ["chosen", "margin", "prompt", "rejected"]
    margins = {row["prompt"][-1]["content"]: row["margin"] for row in prepared.train}
    assert margins == {"p1": 2.0, "p2": 0.25}
    assert all(isinstance(m, float) for m in margins.values())


def test_margin_missing_or_not_a_number_in_a_margin_source(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "p1", "chosen": "a", "rejected": "b"},  # line 1: the source has margins, this row has none
        {"prompt": "p2", "chosen": "a", "rejected": "b", "margin": "high"},  # line 2
        {"prompt": "p3", "chosen": "a", "rejected": "b", "margin": True},  # line 3
        {"prompt": "p4", "chosen": "a", "rejected": "b", "margin": 1.5},  # line 4
    ])
    pairs, report = load(path)
    assert [(p["prompt"][0]["content"], p["margin"]) for p in pairs] == [("p4", 1.5)]
    assert report.skipped == Counter({"'margin' is missing": 1, "'margin' is not a number": 2})
    assert (report.first_bad_row, report.rows_kept) == (1, 1)


def test_sources_must_agree_on_margins(tmp_path: Path) -> None:
    with_margin = write_jsonl(tmp_path / "with.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1}])
    without = write_jsonl(tmp_path / "without.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as info:
        load_preference_data(settings_for(with_margin, without), "pairs")
    message = str(info.value)
    assert "margin" in message
    assert "data.train[0] (" in message and "with.jsonl" in message
    assert "data.train[1] (" in message and "without.jsonl" in message
    # KTO has no use for margins, so the same mixture is fine there.
    assert len(load_preference_data(settings_for(with_margin, without), "unpaired").train) == 4


def test_mixture_of_formats(tmp_path: Path) -> None:
    explicit = write_jsonl(tmp_path / "e.jsonl",
                           [{"prompt": f"e{i}", "chosen": "a", "rejected": "b"} for i in range(4)])
    rated = write_jsonl(tmp_path / "r.jsonl", [{"prompt": f"r{i}", "completions": ["x", "y"], "ratings": [1, 2]}
                                               for i in range(6)])
    prepared = load_preference_data(settings_for(explicit, rated, eval_size=2), "pairs")
    assert (len(prepared.train), len(prepared.eval)) == (8, 2)
    assert [r.format for r in prepared.reports] == ["preference", "rated"]
    assert prepared.train.column_names == ["prompt", "chosen", "rejected"]
    every = list(prepared.train) + list(prepared.eval)
    assert sorted(r["prompt"][0]["content"] for r in every) == sorted([f"e{i}" for i in range(4)] +
                                                                       [f"r{i}" for i in range(6)])


def test_eval_sources(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "t", "chosen": "a", "rejected": "b"}])
    held_out = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "h", "chosen": "a", "rejected": "b"}])
    settings = settings_for(train)
    settings.eval = [DataSource(path=str(held_out))]
    prepared = load_preference_data(settings, "pairs")
    assert [r["prompt"] for r in prepared.eval] == [[user("h")]]
    assert [r.where for r in prepared.reports] == ["data.train[0]", "data.eval[0]"]


# --------------------------------------------------------------------------------------------------
# bad rows
# --------------------------------------------------------------------------------------------------


def test_bad_preference_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "good1", "chosen": "a", "rejected": "b"},  # line 1
        "{broken",  # line 2
        {"prompt": "p", "chosen": "a"},  # line 3
        {"prompt": 3, "chosen": "a", "rejected": "b"},  # line 4
        {"prompt": "p", "chosen": "  ", "rejected": "b"},  # line 5
        {"prompt": "p", "chosen": "same", "rejected": " same "},  # line 6
        {"prompt": "p", "chosen": [user("x")], "rejected": "b"},  # line 7: a conversation with no prompt in common
        {"prompt": "p", "chosen": [assistant("a"), user("more?")], "rejected": "b"},  # line 8
        {"prompt": [user("q"), assistant("a")], "chosen": "b", "rejected": "c"},  # line 9
        {"prompt": "p", "chosen": [assistant("a")], "rejected": [{"role": "assistant", "content": 1}]},  # line 10
        {"prompt": "good2", "chosen": "a", "rejected": "b"},  # line 11
    ])
    pairs, report = load(path)
    assert [p["prompt"][0]["content"] for p in pairs] == ["good1", "good2"]
    assert report.skipped == Counter({
        "not a JSON object": 1,
        "'rejected' is missing": 1,
        "'prompt' is not a string": 1,
        "'chosen' is empty": 1,
        "'chosen' and 'rejected' are identical": 1,
        "'rejected' is not a list of messages": 1,
        "'chosen' has a message with role 'user' (expected assistant)": 1,
        "'prompt' does not end with a user turn": 1,
        "'rejected' has a message whose 'content' is not a string": 1,
    })
    assert (report.rows_read, report.rows_kept, report.first_bad_row) == (11, 2, 2)


def test_bad_implicit_preference_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", [
        {"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},  # line 1: no shared prompt
        {"chosen": [user("q"), assistant("x"), user("more")], "rejected": [user("q"), assistant("y")]},  # line 2
        {"chosen": [user("q")], "rejected": [user("q"), assistant("y")]},  # line 3: no answer
        {"chosen": [user("q"), assistant("x")], "rejected": [user("q"), assistant("x")]},  # line 4
        {"chosen": "text", "rejected": [user("q"), assistant("y")]},  # line 5
        {"chosen": [user("q"), assistant("ok")], "rejected": [user("q"), assistant("no")]},  # line 6
        {"chosen": [user("q"), assistant("x")]},  # line 7
    ])
    pairs, report = load(path, format="implicit_preference")
    assert pairs == [pair("q", "ok", "no")]
    assert report.skipped == Counter({
        "'chosen' and 'rejected' share no prompt": 1,
        "'chosen' does not end with assistant turns after the shared prompt": 2,
        "'chosen' and 'rejected' are identical": 1,
        "'chosen' is not a list of messages": 1,
        "'rejected' is missing": 1,
    })
    assert report.first_bad_row == 1


def test_full_conversations_must_agree_with_the_prompt_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "other", "chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},
        {"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},
    ])
    pairs, report = load(path)
    assert pairs == [pair("q", "a", "b")]
    assert report.skipped == Counter({"'prompt' differs from the prompt inside 'chosen' and 'rejected'": 1})


def test_bad_rated_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q", "completions": ["a", "b"], "ratings": [1, 2]},  # line 1: good
        {"prompt": "q", "completions": ["a", "b", "c"], "ratings": [1, 2]},  # line 2
        {"prompt": "q", "completions": ["a"], "ratings": [1]},  # line 3
        {"prompt": "q", "completions": ["a", "b"], "ratings": [3, 3]},  # line 4
        {"prompt": "q", "completions": ["a", "b"], "ratings": [1, "N/A"]},  # line 5
        {"prompt": "q", "completions": ["a", "b"], "ratings": [1, None]},  # line 6
        {"prompt": "q", "completions": ["a", "b"]},  # line 7: strings without ratings
        {"prompt": "q", "completions": [{"response": "a"}, {"response": "b", "score": 2}]},  # line 8
        {"prompt": "q", "completions": [{"model": "m", "score": 1}, {"response": "b", "score": 2}]},  # line 9
        {"prompt": "q", "completions": "a, b", "ratings": [1, 2]},  # line 10
        {"prompt": "q", "completions": ["a", "  "], "ratings": [1, 2]},  # line 11: a blank one is left out
        {"prompt": "q", "completions": ["same", "same"], "ratings": [2, 1]},  # line 12
        {"prompt": "", "completions": ["a", "b"], "ratings": [1, 2]},  # line 13
        {"prompt": "q", "completions": ["a", "b"], "ratings": [True, 2]},  # line 14
        {"prompt": "q", "ratings": [1, 2]},  # line 15
        {"prompt": "q", "completions": ["a", 5], "ratings": [1, 2]},  # line 16
    ])
    pairs, report = load(path, format="rated")
    assert pairs == [pair("q", "b", "a")]
    assert report.skipped == Counter({
        "'ratings' and 'completions' differ in length": 1,
        "fewer than two non-empty completions": 2,
        "no rating difference": 1,
        "a rating is not a number": 3,
        "'ratings' is missing": 1,
        "a completion has no rating (rating, score or overall_score)": 1,
        "a completion has no text (response, text or content)": 1,
        "'completions' is not a list": 1,
        "'chosen' and 'rejected' are identical": 1,
        "'prompt' is empty": 1,
        "'completions' is missing": 1,
        "a completion is not a string": 1,
    })
    assert (report.rows_read, report.rows_kept, report.first_bad_row) == (16, 1, 2)


def test_bad_unpaired_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "k.jsonl", [
        {"prompt": "p", "completion": "c", "label": "true"},  # line 1
        {"prompt": "p", "completion": "c", "label": 2},  # line 2
        {"prompt": "p", "completion": "c", "label": 1.0},  # line 3
        {"prompt": "p", "completion": "c", "label": None},  # line 4
        {"prompt": "p", "completion": "", "label": True},  # line 5
        {"prompt": "p", "completion": [user("c")], "label": True},  # line 6
        {"prompt": "p", "completion": "c", "label": False},  # line 7
    ])
    rows, report = load(path, kind="unpaired")
    assert rows == [{"prompt": [user("p")], "completion": [assistant("c")], "label": False}]
    assert report.skipped == Counter({
        "'label' is not a boolean": 3,
        "'label' is missing": 1,
        "'completion' is empty": 1,
        "'completion' has a message with role 'user' (expected assistant)": 1,
    })
    assert report.first_bad_row == 1


def test_source_without_usable_rows_is_an_error_with_counts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "q", "completions": ["a", "b"], "ratings": [1, 1]},
        {"prompt": "q", "completions": ["a", "b"], "ratings": [2, 2]},
        {"prompt": "q", "completions": ["a"], "ratings": [1]},
    ])
    with pytest.raises(DataError) as info:
        load_preference_data(settings_for(path), "pairs")
    message = str(info.value)
    assert message.startswith(f"{WHERE}: no usable rows in ")
    assert "bad.jsonl" in message
    assert "format rated" in message
    assert "skipped 3 of 3 rows" in message
    assert "no rating difference (2)" in message
    assert "fewer than two non-empty completions (1)" in message
    assert "first bad row: 1" in message


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="it is empty"):
        load(path)


# --------------------------------------------------------------------------------------------------
# recipe
# --------------------------------------------------------------------------------------------------

RECIPE = """\
stage: sft
model: {name_or_path: demo:tiny-llama}
data:
  train: [demo:reverse/sft]
  pairing: PAIRING
"""


def test_recipe_pairing_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE.replace("PAIRING", "best_vs_wrost")))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "'data.pairing' expects one of 'best_vs_random', 'best_vs_worst'" in message
    assert "Did you mean 'best_vs_worst'?" in message
    assert load_recipe(path, ["data.pairing=best_vs_worst"]).data.pairing == "best_vs_worst"
    path.write_text(RECIPE.replace("  pairing: PAIRING\n", ""))
    assert load_recipe(path).data.pairing == "best_vs_random"
