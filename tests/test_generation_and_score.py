"""Generation knobs are honoured; ``alignkit score`` scores prediction files and reports bad rows."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from alignkit.generation import generate
from alignkit.metrics import compute
from alignkit.recipe.settings import GenerationSettings

PROMPTS = [[{"role": "user", "content": f"copy: {words}"}] for words in
           ("apple river stone", "cloud green table music", "light house", "bread water plant chair horse")]


@pytest.fixture(scope="module")
def base(demo_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(demo_model_path), AutoTokenizer.from_pretrained(demo_model_path)


def test_greedy_is_deterministic_and_uses_the_chat_template(base):
    model, tokenizer = base
    first = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=12, batch_size=3))
    second = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=12, batch_size=2))
    assert first == second  # also independent of batching (left padding)
    # The same prompt alone, through a plain generate() call on the chat-templated text, gives the same answer.
    text = tokenizer.apply_chat_template(PROMPTS[3], tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    alone = model.generate(**encoded, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(alone[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip() == first[3]


def test_max_new_tokens_bounds_the_length(base):
    model, tokenizer = base
    outputs = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=2))
    longer = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=12))
    assert all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 2 for text in outputs)
    # Cut after two tokens: a prefix of the unbounded answer.
    assert all(full.startswith(short) for short, full in zip(outputs, longer))
    assert any(len(full) > len(short) for short, full in zip(outputs, longer))


def test_beam_search_runs(base):
    model, tokenizer = base
    beams = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=6, num_beams=4))
    assert len(beams) == len(PROMPTS) and all(isinstance(b, str) and b for b in beams)
    assert all(len(tokenizer(b, add_special_tokens=False)["input_ids"]) <= 6 for b in beams)
    assert beams == generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=6, num_beams=4))


def test_sampling_is_seeded_and_temperature_matters(base):
    model, tokenizer = base
    hot = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=5.0, seed=1)
    assert generate(model, tokenizer, PROMPTS, hot) == generate(model, tokenizer, PROMPTS, hot)
    greedy = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=8))
    assert generate(model, tokenizer, PROMPTS, hot) != greedy  # very high temperature leaves the greedy path
    other_seed = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=5.0, seed=2)
    assert generate(model, tokenizer, PROMPTS, other_seed) != generate(model, tokenizer, PROMPTS, hot)


def test_score_reports_bad_rows_and_writes_json(tmp_path):
    rows = [
        '{"prediction": "the cat sat on the mat", "reference": "the cat sat on the mat"}',
        '{"prediction": "a dog ran", "references": ["the dog ran", "a dog ran fast"]}',
        "not json",
        '{"prediction": 3, "reference": "x"}',
        "",
        '{"reference": "y"}',
        '{"prediction": "z", "references": []}',
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(rows) + "\n")
    output = tmp_path / "scores.json"
    result = run_cli("score", str(path), "--metrics", "rouge,bleu,exact_match", "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "skipped 4 of 6 rows" in result.stderr
    for reason in ("line 3: not valid JSON", "line 4: 'prediction' is not a string", "line 6: 'prediction' is missing",
                   "line 7: 'references' is not a non-empty list of strings"):
        assert reason in result.stderr
    scores = json.loads(output.read_text())
    expected = compute(["rouge", "bleu", "exact_match"], ["the cat sat on the mat", "a dog ran"],
                       [["the cat sat on the mat"], ["the dog ran", "a dog ran fast"]])
    assert scores["exact_match"] == 0.5 and scores["rows"] == 2 and scores["skipped_rows"] == 4
    assert {k: scores[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert "rougeL" in result.stdout


@pytest.mark.parametrize("content, message", [("", "it has no rows"), ("nope\n", "none of its 1 rows is usable")])
def test_score_of_an_unusable_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "predictions.jsonl"
    path.write_text(content)
    result = run_cli("score", str(path))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_score_of_a_missing_file_names_the_path(tmp_path):
    result = run_cli("score", str(tmp_path / "absent.jsonl"))
    assert result.returncode == 2 and "absent.jsonl" in result.stderr
