"""Prepared once: a stage's prepared data saved under alignkit's cache and reused by every later run on the
same data, and by every process of a launch but the main one.

The key (:func:`cache_key`) is a hash of each source's content (:func:`alignkit.data.sources.content_fingerprint`:
the bytes of local files, the rows of demo sets, ``datasets``' fingerprint of hub splits), the data settings,
the loader that prepares them and the data code itself, so an edit to any of them prepares anew. An entry holds
the rows the splits were selected from, in the order they were converted, as an Arrow stream file
(:func:`_save_rows`), and each split's order as the row numbers it takes from it (:func:`_save_order`). Every run
reads them back memory-mapped with the same fingerprint, so TRL's own tokenisation map finds its cache on the
next run too (an in-memory dataset has none and is tokenised again every time).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from alignkit import distributed
from alignkit.data import arrow_files, sources
from alignkit.data.prepared import PreparedData, SourceReport
from alignkit.demo.build import cache_dir
from alignkit.recipe.settings import DataSettings

logger = logging.getLogger("alignkit.data")

# Where each process notes whether it prepared the data or read it from the cache (one JSON file per process),
# so that tests can count the conversions of a launch; unset in normal runs.
RECORD_ENV = "ALIGNKIT_RECORD_DATA_PREPARATION"
DONE = "prepared.json"  # written last: a directory without it is an interrupted write, prepared again
SPLITS = ("train", "eval")
# Rows a saved record batch holds: few batches, because mapping a file reads each batch's header, and the
# kernel reads 64 KB around each (a 1M-row file in datasets' 1,000-row batches: 70 MB resident at once).
SAVED_BATCH_ROWS = 65_536
_CODE = Path(__file__).parent


def data_cache_dir() -> Path:
    return cache_dir() / "data"


def _code_version() -> str:
    """A hash of the data package's code: a change to how rows are converted invalidates prepared data."""
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(_CODE.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(settings: DataSettings, loader: str) -> str:
    """The prepared data's key: the sources' content, the settings that shape the result, ``loader`` and the code."""
    described = dataclasses.asdict(settings)
    for unchanging in ("num_proc", "cache"):  # neither changes the rows
        described.pop(unchanging, None)
    contents = [sources.content_fingerprint(source, f"data.{group}[{index}]")
                for group in ("train", "eval") for index, source in enumerate(getattr(settings, group) or [])]
    text = json.dumps({"settings": described, "contents": contents, "loader": loader, "code": _code_version()},
                      sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def loader_name(load_data: Callable) -> str:
    """The loader as the same text in every process and run (never a repr with a memory address): its module
    and qualified name, with a partial's bound arguments (the stages pass ``partial(load_preference_data,
    kind="pairs")``)."""
    if isinstance(load_data, functools.partial):
        bound = [repr(arg) for arg in load_data.args] + [f"{k}={v!r}" for k, v in sorted(load_data.keywords.items())]
        return f"{loader_name(load_data.func)}({', '.join(bound)})"
    return f"{load_data.__module__}.{load_data.__qualname__}"


def prepare(settings: DataSettings, load_data: Callable[[DataSettings], PreparedData]) -> PreparedData:
    """``load_data(settings)`` (a :class:`alignkit.data.PreparedData`), from the cache when it holds the same
    data, else prepared and saved there. Under a launch of several processes the main one prepares first and
    the others read what it saved. The result's ``cache_key`` names the entry; ``from_cache`` says whether this
    process read it."""
    if not settings.cache or settings.streaming:  # a stream is read as the run goes, never prepared ahead
        return load_data(settings)
    key = cache_key(settings, loader_name(load_data))
    directory = data_cache_dir() / key
    with distributed.main_process_first():
        if (directory / DONE).exists():
            data = _read(directory)
            data.from_cache = True
        else:
            data = load_data(settings)
            data.from_cache = False
            if not distributed.launched() or distributed.is_main_process():
                try:
                    _write(directory, data)
                except OSError as err:  # a full or read-only disk costs the reuse, not the run
                    logger.warning("data: could not save the prepared data in %s (%s); it is prepared again on "
                                   "the next run", directory, err)
                else:
                    data = _read(directory)  # memory-mapped, with the fingerprint every later run will see
                    data.from_cache = False
        data.cache_key = key
    _record(data)
    logger.info("data: %s (cache key %s, %s)", "read from the cache" if data.from_cache else "prepared",
                key, directory)
    return data


def _write(directory: Path, data: PreparedData) -> None:
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    splits: dict[str, dict[str, str]] = {}
    rows_files: dict[tuple, str] = {}  # a stored table -> its rows file: a held-out split shares the mixture's
    for split in SPLITS:
        dataset = getattr(data, split)
        if dataset is None:
            continue
        stored = _identity(dataset.data.table)
        if stored not in rows_files:
            rows_files[stored] = f"rows-{len(rows_files)}.arrow"
            _save_rows(dataset, partial / rows_files[stored])
        splits[split] = {"rows": rows_files[stored], "order": f"{split}-order.arrow"}
        _save_order(dataset, partial / splits[split]["order"])
    reports = [{"where": report.where, **report.to_dict()} for report in data.reports]
    (partial / DONE).write_text(json.dumps({"splits": splits, "reports": reports}, indent=1) + "\n")
    if (directory / DONE).exists():  # another run wrote the same data meanwhile
        shutil.rmtree(partial, ignore_errors=True)
        return
    shutil.rmtree(directory, ignore_errors=True)  # an interrupted write
    try:
        partial.rename(directory)
    except OSError:  # another run renamed its copy first
        shutil.rmtree(partial, ignore_errors=True)


def _identity(table) -> tuple:
    """What a ``pyarrow.Table`` holds, by where its memory is: two datasets selected from one table (a split's
    two sides) have the same, though ``datasets`` gives each its own ``Table`` object (with its features in its
    schema's metadata), and two tables over the same memory hold the same rows. Its schema (without the
    metadata), its rows and the addresses of its first column's buffers."""
    first = table.column(0).chunks if table.num_columns else []
    buffers = tuple((chunk.offset, len(chunk), tuple(b.address if b is not None else 0 for b in chunk.buffers()))
                    for chunk in first)
    return str(table.schema.remove_metadata()), table.num_rows, buffers


def _save_rows(dataset, path: Path) -> None:
    """Every row the dataset's table stores, in stored order, as one Arrow stream file (the format
    ``datasets.Dataset.from_file`` maps); the dataset's own order is saved apart (:func:`_save_order`).

    Not gathered into the dataset's order, nor written from the memory-mapped table: either touches every
    page of the map's output files, and each page a process touches counts in its resident memory (under a
    launch of several processes the main process never reads the converted rows otherwise). The rows are read
    again from those files with :func:`alignkit.data.arrow_files.stored_pieces` and written in batches of
    :data:`SAVED_BATCH_ROWS` rows."""
    import pyarrow as pa

    schema = dataset.features.arrow_schema  # the columns' types, with the features in its metadata
    written, pending = 0, []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for piece in arrow_files.stored_pieces(dataset.data):
            pending.append(piece.replace_schema_metadata(schema.metadata))
            if sum(table.num_rows for table in pending) >= SAVED_BATCH_ROWS:
                writer.write_table(pa.concat_tables(pending).combine_chunks())
                written, pending = written + sum(table.num_rows for table in pending), []
        if pending:
            writer.write_table(pa.concat_tables(pending).combine_chunks())
            written += sum(table.num_rows for table in pending)
    if written != dataset.data.num_rows:  # a table kind stored_pieces misjudged: never save wrong rows
        raise RuntimeError(f"data cache: wrote {written} rows of a table of {dataset.data.num_rows}")


def _save_order(dataset, path: Path) -> None:
    """The dataset's order: for each of its rows, the row of its stored table (its indices mapping: a shuffle,
    a weighted selection, a split), as an Arrow stream file of one ``indices`` column, the form ``datasets``
    keeps an indices mapping in (read back memory-mapped, not as a million Python integers, which
    ``Dataset.select`` makes of an array: 70 MB for 1M rows)."""
    import pyarrow as pa

    indices = dataset._indices  # no public accessor; None when the rows are stored in order
    order = (pa.chunked_array([pa.array(range(len(dataset)), pa.uint64())]) if indices is None
             else indices.column(0).cast(pa.uint64()))
    table = pa.table({"indices": order}).combine_chunks()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 20)


def _read(directory: Path) -> PreparedData:
    """The entry's splits, memory-mapped, each with the same fingerprint in every run and process (``datasets``
    makes it from the files' paths, which hold the key, and modification times), which TRL's tokenisation map
    keys its own cache by; and its reports."""
    from datasets import Dataset

    saved = json.loads((directory / DONE).read_text())
    reports = [SourceReport(where=entry["where"], path=entry["path"], format=entry["format"],
                            rows_read=entry["rows_read"], rows_kept=entry["rows_kept"],
                            skipped=Counter(entry["skipped"]), first_bad_row=entry["first_bad_row"])
               for entry in saved["reports"]]
    splits = {}
    for split, files in saved["splits"].items():
        splits[split] = Dataset.from_file(str(directory / files["rows"]),
                                          indices_filename=str(directory / files["order"]))
    return PreparedData(train=splits.get("train"), eval=splits.get("eval"), reports=reports)


def _record(data: PreparedData) -> None:
    record = os.environ.get(RECORD_ENV)
    if record:
        rank = os.environ.get("RANK", "0")
        Path(record, f"data-{rank}.json").write_text(json.dumps({"key": data.cache_key,
                                                                 "from_cache": data.from_cache}))
