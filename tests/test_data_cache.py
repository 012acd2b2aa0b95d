"""Prepared once: the prepared data is cached by content and settings, reused by a second run (with a stable
fingerprint, so TRL's tokenisation cache can hit), prepared by one process of a launch only, and the rows
``alignkit validate`` and ``alignkit plan`` count come from the same cache entry."""

from __future__ import annotations

import json
import os
import uuid
from functools import partial
from pathlib import Path

import pytest
from conftest import REPO, run_cli, write_jsonl
from test_multiprocess import CPU_CONFIG, accelerate_launch

from alignkit.data import cache, load_preference_data, load_sft_data, prepare
from alignkit.recipe.settings import DataSettings, DataSource


def unique_rows(count: int) -> list[dict]:
    """Rows no earlier test run wrote (the cache is keyed by content, and shared across runs)."""
    nonce = uuid.uuid4().hex
    return [{"prompt": f"p{i} {nonce}", "completion": f"c{i}"} for i in range(count)]


def settings_for(path: Path, **options) -> DataSettings:
    return DataSettings(train=[DataSource(path=str(path))], eval_size=2, **options)


def test_second_preparation_reads_the_cache(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", unique_rows(10))
    first = prepare(settings_for(path), load_sft_data)
    second = prepare(settings_for(path), load_sft_data)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert first.cache_key == second.cache_key
    assert (cache.data_cache_dir() / first.cache_key / cache.DONE).exists()
    assert second.train.to_list() == first.train.to_list() == load_sft_data(settings_for(path)).train.to_list()
    assert second.eval.to_list() == first.eval.to_list()
    assert second.train._fingerprint == first.train._fingerprint  # what TRL's map cache is keyed by
    assert [r.to_dict() for r in second.reports] == [r.to_dict() for r in first.reports]


def test_rows_are_saved_in_the_order_of_a_shuffled_weighted_selection() -> None:
    # Rows spread over several stored batches, some selected twice (a weight above 1), shuffled: gathered a few
    # at a time (chunks smaller than a batch and straddling batches), they come out in the dataset's order.
    import pyarrow as pa
    from datasets import Dataset, concatenate_datasets

    stored = concatenate_datasets([Dataset.from_dict({"n": list(range(start, start + 40)),
                                                      "messages": [[{"role": "user", "content": str(i)}]
                                                                   for i in range(start, start + 40)]})
                                   for start in range(0, 200, 40)])
    assert len(stored.data.table.to_batches()) == 5
    mixture = stored.select([*range(200), *range(0, 200, 3)]).shuffle(seed=1).select(range(5, 250))
    for chunk_rows in (7, 64, 1000):
        gathered = pa.concat_tables(cache._in_order(mixture, chunk_rows=chunk_rows))
        assert gathered.to_pylist() == mixture.to_list()
    assert pa.concat_tables(cache._in_order(stored, chunk_rows=64)).to_pylist() == stored.to_list()


def test_an_edit_that_keeps_size_and_time_prepares_again(tmp_path: Path) -> None:
    rows = unique_rows(10)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    first = prepare(settings_for(path), load_sft_data)
    stat = path.stat()
    write_jsonl(path, [{**row, "completion": row["completion"].upper()} for row in rows])  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second = prepare(settings_for(path), load_sft_data)
    assert second.cache_key != first.cache_key and not second.from_cache
    assert {row["messages"][1]["content"] for row in second.train} <= {f"C{i}" for i in range(10)}


def test_settings_that_change_the_rows_change_the_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", unique_rows(10))
    base = prepare(settings_for(path), load_sft_data).cache_key
    assert prepare(settings_for(path, seed=7), load_sft_data).cache_key != base
    assert prepare(settings_for(path, system_prompt="be brief"), load_sft_data).cache_key != base
    assert prepare(settings_for(path, num_proc=2), load_sft_data).cache_key == base  # same rows
    uncached = prepare(settings_for(path, cache=False), load_sft_data)
    assert uncached.cache_key is None and not uncached.from_cache


def test_a_launch_of_two_processes_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", unique_rows(12))
    monkeypatch.setenv(cache.RECORD_ENV, str(tmp_path))
    result = accelerate_launch(CPU_CONFIG, str(REPO / "tests" / "scripts" / "check_data_prepared_once.py"), str(path),
                               str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"data-{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["from_cache"] for record in records] == [False, True]  # one conversion, by the main process
    assert records[0]["key"] == records[1]["key"]
    prompts = [json.loads((tmp_path / f"prompts-{rank}.json").read_text()) for rank in (0, 1)]
    assert prompts[0] == prompts[1] and len(prompts[0]) == 10


def test_validate_and_plan_count_the_same_prepared_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [*unique_rows(40), {"prompt": "no completion"}])
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"extends: {REPO / 'recipes/demo/sft.yaml'}\n"
                      f"data: {{train: [{{path: {path}}}], eval: null, eval_size: 4}}\n"
                      f"train: {{output_dir: {tmp_path / 'run'}}}\n")
    validated = run_cli("validate", str(recipe))
    assert validated.returncode == 0, validated.stderr
    counted = next(line for line in validated.stderr.splitlines() if line.startswith("# data:"))
    assert "36 training rows, 4 held out, 1 bad rows skipped" in counted
    key = counted.rsplit("prepared data ", 1)[1].rstrip(")")
    planned = run_cli("plan", str(recipe))
    assert planned.returncode == 0, planned.stderr
    assert "36 training rows, 4 held out" in planned.stdout and f"(prepared data {key})" in planned.stdout


def test_the_loader_is_named_alike_in_every_process() -> None:
    """The stages pass partials: their key part must not be a repr with a memory address."""
    pairs = cache.loader_name(partial(load_preference_data, kind="pairs"))
    assert pairs == "alignkit.data.load_preference_data(kind='pairs')"
    assert cache.loader_name(partial(load_preference_data, kind="unpaired")) != pairs
    assert cache.loader_name(load_sft_data) == "alignkit.data.load_sft_data"
