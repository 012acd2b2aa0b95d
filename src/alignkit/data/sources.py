"""Opening a data source as a ``datasets`` dataset: local files and directories, hub datasets, the demo sets.

A source opens as a :class:`RawSource`: a dataset and how its rows are stored. JSON Lines files (and the demo
sets) open as one line of text per row (column :data:`LINE`, blank lines included, so a row's index is its
line number minus one) and are parsed inside the conversion map: Arrow needs one type per column, so a file
read by Arrow's JSON reader fails as a whole on a single row whose field has another type, where alignkit
counts that row as one bad row. Every other source opens with its own columns, typed by ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.demo.tasks import DEMO_DATASETS, DEMO_SPLITS
from alignkit.errors import DataError
from alignkit.recipe.settings import DataSource
from alignkit.suggest import nearest

DEMO_PREFIX = "demo:"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
LINE = "_line"  # the column of a source read as lines of JSON


@dataclass
class RawSource:
    """A source's rows before conversion: ``dataset`` (``datasets.Dataset``, or ``IterableDataset`` when
    streaming) holds JSON text in :data:`LINE` when ``lines`` is true, else the source's own columns."""

    dataset: Any
    lines: bool


def is_demo(path: str) -> bool:
    return path.startswith(DEMO_PREFIX)


def is_local(path: str) -> bool:
    """A local path (as opposed to a hub id): it exists, or it can only be meant as a path."""
    return Path(path).expanduser().exists() or path.startswith(("/", ".", "~")) or Path(path).suffix in FILE_BUILDERS


def check_exists(source: DataSource, where: str) -> None:
    """Fail early, before any model loads, when a local source or a demo set does not exist."""
    if is_demo(source.path):
        _demo_generator(source, where)
    elif is_local(source.path) and not Path(source.path).expanduser().exists():
        raise DataError(f"{where}: data file not found: {Path(source.path).expanduser().absolute()}")


def open_source(source: DataSource, where: str, streaming: bool = False) -> RawSource:
    """The source's rows as a dataset (see :class:`RawSource`), read lazily when ``streaming``."""
    check_exists(source, where)
    if is_demo(source.path):
        raw = _as_lines([json.dumps(row) for row in _demo_generator(source, where)(source.split)])
        return RawSource(raw.to_iterable_dataset() if streaming else raw, lines=True)
    path = Path(source.path).expanduser()
    if path.is_file() and source.split != "train":
        raise DataError(f"{where}: split '{source.split}' given for a single file ({path}); splits apply to "
                        "hub datasets, directories and demo sets")
    if path.is_file() and path.stat().st_size == 0:  # datasets refuses a file with no data; it is a source of no rows
        return RawSource(_as_lines([]), lines=True)
    if path.is_file() and path.suffix == ".jsonl":
        return RawSource(_load(source, where, "text", data_files=str(path), streaming=streaming, features=_lines(),
                               # utf-8-sig drops a byte-order mark. A line that is not UTF-8 must become one bad
                               # row, not a failed file: backslashreplace turns each undecodable byte into `\xNN`,
                               # which is never valid JSON (JSON has no \x escape), so the row fails to parse.
                               encoding="utf-8-sig", encoding_errors="backslashreplace"), lines=True)
    if path.is_file():
        options: dict[str, Any] = {}
        if path.suffix == ".csv":
            # Every cell is text, as written: pandas would read an answer "4" as a number and "None" or "NA"
            # as missing, and the row would then be rejected for a field that is not a string.
            options = {"features": _csv_text_columns(path, source, where), "keep_default_na": False,
                       "na_filter": False, "encoding": "utf-8-sig"}
        return RawSource(_load(source, where, FILE_BUILDERS.get(path.suffix, "json"), data_files=str(path),
                               streaming=streaming, **options), lines=False)
    local = is_local(source.path)
    return RawSource(_load(source, where, str(path if local else source.path), name=source.name,
                           split_name=source.split, revision=source.revision, streaming=streaming), lines=False)


def mentions_tools(raw: RawSource) -> bool:
    """Whether the source may hold tool calls, tool turns or tool lists, so that its messages need the columns
    for them (see :func:`alignkit.data.columns.message`): its schema names them, or (JSON lines) some line
    mentions them, found by Arrow's substring search rather than by parsing. A false alarm only adds null
    columns; streaming sources are judged by their first rows."""
    import pyarrow.compute as pc

    names = ("tool_calls", "tool_call_id", "tools", "tool")
    if not raw.lines:
        described = str(raw.dataset.features) + " " + " ".join(raw.dataset.column_names or [])
        return any(name in described for name in names[:3])
    pattern = "|".join(f'"{name}"' for name in names)
    if not hasattr(raw.dataset, "data"):  # streaming
        lines = [row[LINE] for row, _ in zip(raw.dataset, range(1000))]
        return any(f'"{name}"' in line for line in lines for name in names)
    return len(raw.dataset) > 0 and pc.any(pc.match_substring_regex(raw.dataset.data.column(LINE), pattern)).as_py()


def _lines():
    from datasets import Features, Value

    return Features({LINE: Value("string")})


def _csv_text_columns(path: Path, source: DataSource, where: str):
    """Every column of a CSV file typed as text (from its header row)."""
    import csv

    from datasets import Features, Value

    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{where}: could not read '{source.path}' as a UTF-8 CSV file: {err}") from None
    return Features({name: Value("string") for name in header})


def _as_lines(texts: list[str]):
    from datasets import Dataset

    return Dataset.from_dict({LINE: texts}, features=_lines())


def _load(source: DataSource, where: str, builder: str, *, split_name: str = "train", streaming: bool = False,
          **options: Any):
    import datasets

    if is_local(source.path) and not streaming:
        # datasets keys its copy of a local file by path and modification time, so an edit that keeps the time
        # (a copy with `cp -p`, a file restored from an archive) would be read as the old rows: read it anew.
        # The prepared-data cache (alignkit.data.cache), keyed by content, is what saves the reading.
        options["download_mode"] = "force_redownload"
    try:
        return datasets.load_dataset(builder, split=split_name, streaming=streaming, **options)
    except Exception as err:  # datasets raises many types (network, schema, encoding, missing split); one message
        if isinstance(err, UnicodeDecodeError):
            what = f"could not read '{source.path}' as UTF-8 text: {err}"
        else:
            kind = "local dataset" if is_local(source.path) else "hub dataset"
            what = f"could not load {kind} '{source.path}' (split '{source.split}'): {type(err).__name__}: {err}"
        raise DataError(f"{where}: {what}") from None


def _demo_generator(source: DataSource, where: str):
    name = source.path.removeprefix(DEMO_PREFIX)
    if name not in DEMO_DATASETS:
        match = nearest(name, DEMO_DATASETS)  # suggested as the recipe must say it, prefix included
        hint = f" Did you mean '{DEMO_PREFIX}{match}'?" if match else ""
        raise DataError(f"{where}: unknown demo dataset '{source.path}'.{hint} "
                        f"Available: {', '.join(DEMO_PREFIX + n for n in DEMO_DATASETS)}")
    if source.split not in DEMO_SPLITS:
        raise DataError(f"{where}: demo datasets have splits {', '.join(DEMO_SPLITS)}, not '{source.split}'")
    return DEMO_DATASETS[name]


def content_fingerprint(source: DataSource, where: str) -> str:
    """A hash of what the source holds, for the prepared-data cache key.

    Local files and directories: a SHA-256 hash of every file's bytes (with its path inside a directory), read
    in full: a size, a modification time or a sample would miss an edit that keeps them. Demo sets: a hash of
    the rows the demo generator makes. Hub datasets: ``datasets``' own fingerprint of the split as loaded,
    which changes with the dataset's revision.
    """
    check_exists(source, where)
    # SHA-256, not BLAKE2: every run that reads prepared data hashes the whole file first, and with the SHA
    # instructions of current x86 and ARM cores it hashes 2.5x faster (1.3 GB/s against 0.5 GB/s here).
    digest = hashlib.sha256()
    digest.update(json.dumps([source.path, source.split, source.name, source.revision]).encode())
    if is_demo(source.path):
        for row in _demo_generator(source, where)(source.split):
            digest.update(json.dumps(row, sort_keys=True).encode())
        return digest.hexdigest()
    path = Path(source.path).expanduser()
    if is_local(source.path):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            digest.update(str(file.relative_to(path) if file != path else "").encode())
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()
    digest.update(open_source(source, where).dataset._fingerprint.encode())
    return digest.hexdigest()
