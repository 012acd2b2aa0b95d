"""Reading raw rows from a data source: local files, hub datasets, or the embedded demo sets."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from alignkit.demo.tasks import DEMO_DATASETS, DEMO_SPLITS
from alignkit.errors import DataError
from alignkit.recipe.settings import DataSource
from alignkit.suggest import nearest

DEMO_PREFIX = "demo:"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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


def read_rows(source: DataSource, where: str) -> Iterator[tuple[int, dict | None]]:
    """Yield ``(row_number, row)`` pairs, 1-based; ``row`` is None for a line that is not valid JSON."""
    check_exists(source, where)
    if is_demo(source.path):
        yield from enumerate(_demo_generator(source, where)(source.split), start=1)
        return
    path = Path(source.path).expanduser()
    if path.is_file() and source.split != "train":
        raise DataError(f"{where}: split '{source.split}' given for a single file ({path}); splits apply to "
                        "hub datasets, directories and demo sets")
    if path.is_file() and path.suffix == ".jsonl":
        yield from _read_jsonl(path)
        return
    if path.is_file() and path.suffix == ".csv":
        yield from _read_csv(path, where)
        return
    dataset = _load_with_datasets(source, path if is_local(source.path) else None, where)
    yield from enumerate(dataset, start=1)


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


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict | None]]:
    # Read line by line rather than through datasets: Arrow needs one schema for the whole file, so a
    # single row with a wrong type would fail the file instead of being counted as one bad row.
    with path.open("rb") as handle:  # bytes: a line that is not UTF-8 is one bad row, not a failed file
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:  # JSONDecodeError or UnicodeDecodeError
                row = None
            yield line_number, row if isinstance(row, dict) else None


def _read_csv(path: Path, where: str) -> Iterator[tuple[int, dict]]:
    # Every cell is text, as written: pandas (under datasets) would read an answer "4" as a number and
    # "None" or "NA" as missing, and the row would then be rejected for a field that is not a string.
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            yield from enumerate(csv.DictReader(handle), start=1)
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{where}: could not read '{path}' as a UTF-8 CSV file: {err}") from None


def _load_with_datasets(source: DataSource, local_path: Path | None, where: str):
    import datasets

    try:
        if local_path is not None and local_path.is_file():
            return datasets.load_dataset(FILE_BUILDERS.get(local_path.suffix, "json"), data_files=str(local_path),
                                         split="train")
        return datasets.load_dataset(str(local_path or source.path), source.name, split=source.split,
                                     revision=source.revision)
    except Exception as err:  # datasets raises many types (network, schema, missing split); report them as one
        kind = "local dataset" if local_path is not None else "hub dataset"
        raise DataError(f"{where}: could not load {kind} '{source.path}' (split '{source.split}'): "
                        f"{type(err).__name__}: {err}") from None
