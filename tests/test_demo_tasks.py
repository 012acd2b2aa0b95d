"""The demo datasets: deterministic, held-out means unseen, each task's rule holds on every row, the recipes
turn raw rows into prompts through data templates, and the summarise / translate fine-tunes beat the base."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RECIPES, REPO, metrics_of

from alignkit.data import load_sft_data
from alignkit.demo.tasks import (
    CORRUPTIONS,
    DEMO_DATASETS,
    DEMO_SPLITS,
    PRETRAIN_INSTRUCTIONS,
    SUMMARY_FILLERS,
    SUMMARY_KEYWORDS,
    TO_ZORBISH,
    WORDS,
    ZORBISH_SOURCE_WORDS,
    corrupt_reversal,
    pretraining_conversations,
    translate_to_zorbish,
)
from alignkit.recipe.loading import load_recipe

RAW_INPUT = {"summarize/raw": "document", "translate/raw": "source"}
RAW_OUTPUT = {"summarize/raw": "summary", "translate/raw": "target"}
RECIPE_FOR = {"summarize/raw": "demo/sft-summarize.yaml", "translate/raw": "demo/sft-translate.yaml"}


def task_input(name: str, row: dict) -> str:
    """The text a row asks the model about: a raw input column, or the user's question (the first user turn: a
    judge row's second one only asks for the label)."""
    if name in RAW_INPUT:
        return row[RAW_INPUT[name]]
    prompt = row.get("prompt", row.get("messages"))
    if isinstance(prompt, str):  # rated rows
        return prompt
    return next(m["content"] for m in prompt if m["role"] == "user")


def task_output(name: str, row: dict) -> str:
    if name in RAW_OUTPUT:
        return row[RAW_OUTPUT[name]]
    return next(m["content"] for m in row["messages"] if m["role"] == "assistant")


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], list[dict]]:
    return {(name, split): make(split) for name, make in DEMO_DATASETS.items() for split in DEMO_SPLITS}


@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_same_rows_every_time_and_held_out_inputs_unseen(name, rows):
    for split in DEMO_SPLITS:
        assert DEMO_DATASETS[name](split) == rows[name, split]
    train = [task_input(name, row) for row in rows[name, "train"]]
    test = [task_input(name, row) for row in rows[name, "test"]]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert len(test) >= 200  # the demo recipes evaluate on 200 samples


# The reversal recipes' numbers (and the README's) depend on these exact rows: adding tasks must not move them.
REVERSE_SHA256 = {
    "train": "4de66d79041d860db8fb818b0ca78266ed5892961ada9be3062b39ad6ecb1e90",
    "test": "1bab2430c53b9cd88a57512aa90fcb6164393e735c3f16c754e680e09d44398b",
}


@pytest.mark.parametrize("split", DEMO_SPLITS)
def test_reverse_rows_unchanged(split, rows):
    assert hashlib.sha256(json.dumps(rows["reverse/sft", split]).encode()).hexdigest() == REVERSE_SHA256[split]


@pytest.mark.parametrize("split", DEMO_SPLITS)
def test_every_summary_is_the_documents_content_words_in_order(split, rows):
    assert not set(SUMMARY_FILLERS) & set(SUMMARY_KEYWORDS)
    for row in rows["summarize/raw", split]:
        document, summary = row["document"].split(), row["summary"].split()
        assert 4 <= len(document) <= 18 and set(document) <= set(WORDS)
        assert summary == [word for word in document if word in SUMMARY_KEYWORDS]
        assert 2 <= len(summary) <= 4


def test_zorbish_dictionary_is_a_bijection_between_halves_of_the_vocabulary():
    assert set(TO_ZORBISH) == set(ZORBISH_SOURCE_WORDS)
    assert len(set(TO_ZORBISH.values())) == len(TO_ZORBISH) == 50
    assert not set(TO_ZORBISH.values()) & set(ZORBISH_SOURCE_WORDS)
    assert set(TO_ZORBISH.values()) <= set(WORDS)


def test_translation_looks_words_up_then_swaps_each_pair():
    a, b, c, d = ZORBISH_SOURCE_WORDS[:4]
    assert translate_to_zorbish([a, b, c]) == [TO_ZORBISH[b], TO_ZORBISH[a], TO_ZORBISH[c]]
    assert translate_to_zorbish([a, b, c, d]) == [TO_ZORBISH[b], TO_ZORBISH[a], TO_ZORBISH[d], TO_ZORBISH[c]]


@pytest.mark.parametrize("split", DEMO_SPLITS)
def test_every_translation_follows_the_rule(split, rows):
    for row in rows["translate/raw", split]:
        source = row["source"].split()
        assert 3 <= len(source) <= 6
        assert row["target"] == " ".join(translate_to_zorbish(source))


@pytest.mark.parametrize("split", DEMO_SPLITS)
def test_preference_sets_pair_the_right_reversal_with_a_corruption(split, rows):
    def reversal(prompt_text: str) -> str:
        return " ".join(reversed(prompt_text.split()[1:]))

    for row in rows["reverse/preference", split]:
        right = reversal(row["prompt"][0]["content"])
        assert row["chosen"][0]["content"] == right and row["rejected"][0]["content"] != right
    labels = []
    for row in rows["reverse/unpaired", split]:
        labels.append(row["label"])
        assert (row["completion"][0]["content"] == reversal(row["prompt"][0]["content"])) == row["label"]
    assert 0.4 < sum(labels) / len(labels) < 0.6
    for row in rows["reverse/rated", split]:
        best = max(range(4), key=lambda i: row["ratings"][i])
        assert row["completions"][best] == reversal(row["prompt"]) and row["ratings"].count(10) == 1


def test_corruptions_are_always_wrong():
    rng = random.Random(0)
    for kind in CORRUPTIONS:
        for _ in range(200):
            phrase = rng.sample(WORDS, rng.randint(3, 6))
            assert corrupt_reversal(phrase, kind, rng) != list(reversed(phrase))


def test_pretraining_never_shows_a_task_but_produces_every_word_a_task_needs():
    seen_outputs: set[str] = set()
    for user, assistant in pretraining_conversations(3000):
        instruction, _, text = user["content"].partition(" ")
        assert instruction in PRETRAIN_INSTRUCTIONS
        words, answer = text.split(), assistant["content"].split()
        assert answer == {"copy:": words, "first:": words[:1], "last:": words[-1:]}[instruction]
        seen_outputs.update(answer)
    assert seen_outputs == set(WORDS)


@pytest.mark.parametrize("name", RECIPE_FOR)
def test_recipe_templates_turn_raw_rows_into_prompts(name, rows):
    recipe = load_recipe(RECIPES / RECIPE_FOR[name])
    source = recipe.data.train[0]
    assert len(source.templates) >= 3 and recipe.data.eval[0].templates == source.templates
    for template in source.templates:
        # The input follows a space or starts the prompt: after a newline the byte-level demo tokenizer would
        # split its first word into pieces the base model never read.
        before = template.split("{" + RAW_INPUT[name] + "}")[0]
        assert before == "" or before.endswith(" "), template

    data = load_sft_data(recipe.data)
    assert len(data.eval) == len(rows[name, "test"])
    phrasings = set()
    for row, conversation in zip(rows[name, "test"], data.eval["messages"], strict=True):
        prompt, answer = conversation[0]["content"], conversation[1]["content"]
        assert task_input(name, row) in prompt and answer == task_output(name, row)
        phrasings.add(prompt.replace(task_input(name, row), "{}"))
    assert len(phrasings) == len(source.templates)  # every phrasing is used, not one


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory) -> dict[str, Path]:
    """The summarise and translate recipes as shipped, trained side by side with one thread each: a model this
    small gains little from a second thread, so two runs at once take about as long as one."""
    runs: dict[str, Path] = {}
    processes = []
    for task in ("summarize", "translate"):
        runs[task] = tmp_path_factory.mktemp(task) / "run"
        command = [sys.executable, "-m", "alignkit", "sft", f"recipes/demo/sft-{task}.yaml",
                   f"train.output_dir={runs[task]}", "train.save_strategy=no", "train.eval_strategy=no"]
        log = (runs[task].parent / "log.txt").open("w")
        processes.append((subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                           env=dict(os.environ, OMP_NUM_THREADS="1")), log))
    for process, log in processes:
        process.wait(timeout=1800)
        log.close()
    for run_dir in runs.values():
        assert (run_dir / "metrics.json").is_file(), (run_dir.parent / "log.txt").read_text()[-3000:]
    return runs


def test_summarize_recipe_beats_the_base_by_a_wide_margin(task_runs):
    metrics = metrics_of(task_runs["summarize"])
    # Observed on 2 cores (800 steps): ROUGE-L 0.993 vs 0.007, BLEU 96.2 vs 0.04, exact match 0.965 vs 0.
    assert metrics["eval/rougeL"] >= 0.9 and metrics["compare/rougeL"] <= 0.2, metrics
    assert metrics["eval/bleu"] >= 80 and metrics["compare/bleu"] <= 10, metrics
    report = (task_runs["summarize"] / "report.md").read_text()
    assert "`demo:tiny-llama (base)`" in report and "| rougeL |" in report


def test_translate_recipe_beats_the_base_by_a_wide_margin(task_runs):
    metrics = metrics_of(task_runs["translate"])
    # Observed on 2 cores (800 steps): BLEU 100 vs 0.03, chrF ~100 vs 5.6, exact match 1.0 vs 0.
    assert metrics["eval/bleu"] >= 80 and metrics["compare/bleu"] <= 10, metrics
    assert metrics["eval/chrf"] >= metrics["compare/chrf"] + 50, metrics
    assert metrics["eval/exact_match"] >= 0.8, metrics


@pytest.mark.parametrize("split", DEMO_SPLITS)
def test_noisy_reversal_answers_one_in_three_right_and_echoes_the_rest(split, rows):
    clean, noisy = rows["reverse/sft", split], rows["reverse/sft-noisy", split]
    assert [row["messages"][0] for row in noisy] == [row["messages"][0] for row in clean]
    right = [n["messages"][1] == c["messages"][1] for n, c in zip(noisy, clean)]
    echoed = [n["messages"][1]["content"] == task_input("reverse/sft", n).removeprefix("reverse: ") for n in noisy]
    assert all(r != e for r, e in zip(right, echoed))  # every answer is one or the other, never both
    assert abs(sum(right) / len(right) - 1 / 3) < 0.01


def test_building_the_demo_model_leaves_the_callers_random_state_alone(tmp_path, monkeypatch):
    """A run seeds torch, then resolves demo:tiny-llama: what it draws afterwards (a critic's new head) must not
    depend on whether the model was cached or built inside that call. The build itself is replaced by one that
    seeds and draws as the real one does (the real build takes ~40 s)."""
    import torch

    from alignkit.demo import build

    def seeding_build(output_dir: Path, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        torch.rand(1000)
        (Path(output_dir) / "config.json").write_text("{}")
        return Path(output_dir)

    monkeypatch.setattr(build, "build_tiny_llama", seeding_build)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    torch.manual_seed(1234)
    expected = torch.rand(8)
    torch.manual_seed(1234)
    assert (build.demo_model_dir("demo:tiny-llama") / "config.json").is_file()
    assert torch.equal(torch.rand(8), expected)
