"""data.streaming: sources read as IterableDatasets, converted as they are read, mixed by probability, bad rows
counted as the stream passes; recipe rules (sft only, max_steps, a held-out count); the demo run on a stream."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, run_cli, write_jsonl

from alignkit.data import columns, formats, load_sft_data, streaming
from alignkit.errors import RecipeError
from alignkit.recipe.loading import load_recipe
from alignkit.recipe.settings import DataSettings, DataSource


def rows(name: str, count: int, bad_every: int = 0) -> list[dict]:
    """``count`` rows ``{name}{i}``; every ``bad_every``-th one lacks its completion."""
    return [{"prompt": f"{name}{i}", **({} if bad_every and i % bad_every == 0 else {"completion": "c"})}
            for i in range(count)]


def prompts(dataset) -> list[str]:
    return [row["messages"][0]["content"] for row in dataset]


def test_stream_gives_the_rows_and_counts_of_the_in_memory_preparation(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", rows("a", 300, bad_every=10))
    in_memory = load_sft_data(DataSettings(train=[DataSource(path=str(path))], eval_size=5))
    streamed = load_sft_data(DataSettings(train=[DataSource(path=str(path))], eval_size=5, streaming=True))
    assert not hasattr(streamed.train, "__len__")  # an IterableDataset
    assert streamed.reports[0].rows_read == 0  # nothing counted before the run reads
    held_out, trained = prompts(streamed.eval), prompts(streamed.train)
    assert len(held_out) == 5 and not set(held_out) & set(trained)
    assert sorted(held_out + trained) == sorted(prompts(in_memory.train) + prompts(in_memory.eval))
    assert streamed.reports[0].to_dict() == in_memory.reports[0].to_dict()
    assert streamed.reports[0].skipped == Counter({"'completion' is missing": 30})


def test_bad_rows_are_reported_as_the_stream_is_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", rows("a", 2500, bad_every=100))
    source = DataSource(path=str(path))

    def converter_for(fmt):
        return lambda row, _row_number: formats.sft_row(fmt, row)

    dataset, report = streaming.stream_source(source, "data.train[0]", formats.SFT_FORMATS, converter_for,
                                              columns.sft, report_every=1000)
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        kept = sum(1 for _ in dataset)
    assert kept == 2475 and report.rows_read == 2500 and report.first_bad_row == 1
    so_far = [record.getMessage() for record in caplog.records if "so far" in record.getMessage()]
    assert len(so_far) == 2  # after 1,000 and 2,000 rows
    assert "skipped 10 of 1000 rows" in so_far[0] and "skipped 20 of 2000 rows" in so_far[1]


def test_sources_are_interleaved_by_weight(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", rows("a", 400))
    b = write_jsonl(tmp_path / "b.jsonl", rows("b", 400))
    settings = DataSettings(train=[DataSource(path=str(a), weight=3.0), DataSource(path=str(b))], streaming=True)
    first = prompts(load_sft_data(settings).train.take(200))
    share = sum(prompt.startswith("a") for prompt in first) / len(first)
    assert 0.65 <= share <= 0.85, share  # probability 0.75
    assert first == prompts(load_sft_data(settings).train.take(200))  # the seed fixes the stream


@pytest.mark.parametrize(("overrides", "message"), [
    (("train.max_steps=-1",), "set train.max_steps"),
    (("data.eval=null", "data.eval_size=0.1"), "give a row count"),
])
def test_streaming_recipe_rules(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "recipes/demo/sft.yaml", ["data.streaming=true", *overrides])
    assert message in str(info.value)


def test_streaming_is_for_sft_only() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "recipes/demo/dpo.yaml", ["data.streaming=true", "train.max_steps=10"])
    assert "data.streaming is for the sft stage" in str(info.value)


def test_streamed_demo_run_learns_as_the_in_memory_one(tmp_path: Path) -> None:
    """recipes/demo/sft.yaml on a stream: the in-memory run's acceptance bar (tests/test_sft.py), exact match >= 0.9
    on the held-out prompts; data.json says the data was streamed and counts the rows read."""
    run_dir = tmp_path / "streamed"
    result = run_cli("sft", "recipes/demo/sft.yaml", "data.streaming=true", f"train.output_dir={run_dir}",
                     "train.save_strategy=no", "train.eval_strategy=no")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval/exact_match"] >= 0.9, metrics
    data = json.loads((run_dir / "data.json").read_text())
    assert data["streaming"] is True and data["train_rows"] is None and data["eval_rows"] == 200
    assert data["sources"][0]["rows_read"] >= 4000  # 800 steps read the 4,000 rows at least once
