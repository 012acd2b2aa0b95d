"""Prepared once: the prepared data is cached by content and settings, reused by a second run (with a stable
fingerprint, so TRL's tokenisation cache can hit), prepared by one process of a launch only, and the rows
``alignkit validate`` and ``alignkit plan`` count come from the same cache entry."""

from __future__ import annotations

import json
import os
import time
import uuid
from functools import partial
from pathlib import Path

import pytest
from conftest import REPO, run_cli, write_jsonl
from test_multiprocess import CPU_CONFIG, accelerate_launch

from alignkit.data import cache, file_hash, load_preference_data, load_sft_data, prepare
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


def stored_file(path: Path, first: int, rows: int, text_bytes: int = 10, batch_rows: int = 40):
    """A memory-mapped dataset of rows ``first``.. (``n``, a message list, and an ``extra`` column), stored in
    ``path`` as record batches of ``batch_rows`` rows, as a map's output is."""
    import pyarrow as pa
    from datasets import Dataset, Features, Value

    features = Features({"n": Value("int64"), "messages": [{"role": Value("string"), "content": Value("string")}],
                         "extra": Value("string")})
    schema = features.arrow_schema
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(first, first + rows, batch_rows):
            numbers = range(start, min(start + batch_rows, first + rows))
            messages = [[{"role": "user", "content": f"{i:0{text_bytes}d}"}] for i in numbers]
            writer.write_table(pa.Table.from_pydict({"n": list(numbers), "messages": messages,
                                                     "extra": ["x" for _ in numbers]}, schema=schema))
    return Dataset.from_file(str(path))


def test_a_shuffled_weighted_split_mixture_reads_back_in_its_order(tmp_path: Path) -> None:
    # Rows in two memory-mapped files (with a column dropped after loading, which datasets replays on the file's
    # table) and one in-memory table, some selected twice (a weight above 1), shuffled, split: the saved entry
    # reads back as the same rows in the same order, with the same fingerprint each time it is read.
    from datasets import Dataset, concatenate_datasets

    from alignkit.data.prepared import PreparedData

    mapped = [stored_file(tmp_path / f"part-{k}.arrow", 100 * k, 100).remove_columns("extra") for k in (0, 1)]
    in_memory = Dataset.from_dict({"n": [200 + i for i in range(50)],
                                   "messages": [[{"role": "user", "content": f"m{i}"}] for i in range(50)]},
                                  features=mapped[0].features)
    stored = concatenate_datasets([*mapped, in_memory])
    mixture = stored.select([*range(250), *range(0, 250, 3)]).shuffle(seed=1)
    train, held_out = mixture.select(range(20, len(mixture))), mixture.select(range(20))
    cache._write(tmp_path / "entry", PreparedData(train=train, eval=held_out, reports=[]))
    assert sorted(p.name for p in (tmp_path / "entry").glob("rows-*.arrow")) == ["rows-0.arrow"]  # shared
    first, second = cache._read(tmp_path / "entry"), cache._read(tmp_path / "entry")
    assert first.train.to_list() == train.to_list() and first.eval.to_list() == held_out.to_list()
    assert (first.train._fingerprint, first.eval._fingerprint) == (second.train._fingerprint, second.eval._fingerprint)
    assert first.train._fingerprint != first.eval._fingerprint


def mapped_resident_bytes(path: Path) -> int:
    """How much of ``path``'s memory mappings this process has resident (Linux's /proc/self/smaps)."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line: address range, ..., path
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            resident += int(line.split()[1]) * 1024
    return resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_saving_prepared_data_does_not_read_the_mapped_rows_into_the_process(tmp_path: Path) -> None:
    # Each page of a memory-mapped file a process touches counts in its resident memory (its peak RSS), so the
    # main process of a launch, whose workers converted the rows, must save them without reading the mapping.
    from alignkit.data.prepared import PreparedData

    path = tmp_path / "converted.arrow"
    converted = stored_file(path, 0, 20_000, text_bytes=400, batch_rows=1000)  # 8 MB
    shuffled = converted.shuffle(seed=0)
    before = mapped_resident_bytes(path)  # the record batches' headers, read when the file was mapped
    cache._write(tmp_path / "entry", PreparedData(train=shuffled, eval=None, reports=[]))
    assert mapped_resident_bytes(path) - before < path.stat().st_size / 20
    assert cache._read(tmp_path / "entry").train[:5] == shuffled[:5]


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_looking_for_tool_calls_does_not_read_the_mapped_lines_into_the_process(tmp_path: Path) -> None:
    # The main process of a launch opens each JSON Lines source and searches it for tool calls before its
    # workers convert it: through the mapping, that search alone made it resident (1M pairs: +166 MB at peak).
    from alignkit.data import sources

    long_text = "x" * 400
    rows = [{"prompt": f"{i} {long_text}", "completion": "c"} for i in range(20_000)]
    path = write_jsonl(tmp_path / "rows.jsonl", [*rows, {"messages": [{"role": "tool", "content": "42"}]}])
    raw = sources.open_source(DataSource(path=str(path)), "data.train[0]")
    mapped = Path(raw.dataset.cache_files[0]["filename"])
    before = mapped_resident_bytes(mapped)
    assert sources.mentions_tools(raw)  # found on the last line
    assert mapped_resident_bytes(mapped) - before < mapped.stat().st_size / 20


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


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files :mod:`alignkit.data.file_hash` reads in full, in order (the real hash still computed)."""
    reads: list[Path] = []
    real = file_hash.sha256_of_file

    def counted(path: Path) -> str:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(file_hash, "sha256_of_file", counted)
    return reads


def test_an_unchanged_file_is_not_hashed_again_but_an_edit_keeping_size_and_time_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = counting_reads(monkeypatch)
    monkeypatch.setattr(file_hash, "RACY_MARGIN_NS", 20_000_000)  # 20 ms, to keep the test short
    path = tmp_path / "rows.jsonl"
    path.write_text("abcdef\n")
    time.sleep(0.1)  # older than the margin when hashed: remembered
    first = file_hash.file_sha256(path)
    assert file_hash.file_sha256(path) == first and reads == [path.resolve()]  # not read the second time
    time.sleep(0.1)
    stat = path.stat()
    path.write_text("ABCDEF\n")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    edited = file_hash.file_sha256(path)
    assert edited == file_hash.sha256_of_file(path) != first and len(reads) == 3  # the status change was seen


def test_a_file_hashed_just_after_it_was_written_is_hashed_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Racily clean: a change within the same timestamp tick as the hashing could keep every status field, so
    # a hash taken within RACY_MARGIN_NS of the file's last change is not trusted on the next call.
    reads = counting_reads(monkeypatch)
    path = tmp_path / "rows.jsonl"
    path.write_text("abcdef\n")
    assert file_hash.file_sha256(path) == file_hash.file_sha256(path)
    assert len(reads) == 2


def test_a_cached_run_does_not_read_its_unchanged_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", unique_rows(10))
    old = time.time_ns() - 2 * file_hash.RACY_MARGIN_NS
    os.utime(path, ns=(old, old))  # the modification time is old; its status change is not (it cannot be set)
    monkeypatch.setattr(file_hash, "RACY_MARGIN_NS", 0)  # the status change is then old enough
    time.sleep(0.05)
    first = prepare(settings_for(path), load_sft_data)
    reads = counting_reads(monkeypatch)
    second = prepare(settings_for(path), load_sft_data)
    assert second.from_cache and second.cache_key == first.cache_key and reads == []


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
