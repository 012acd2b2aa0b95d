"""One source's rows converted to alignkit's normalised rows as a batched ``Dataset.map``, bad rows counted.

The map turns every row into the normalised columns plus ``_row`` (its 1-based row or line number) and
``_reason`` (why it does not fit its format; null for a good row), so a bad row is a row of the map's output
like any other and its count, reason and number come from Arrow (:func:`report_of`) instead of a Python loop.
The conversion of one row (renames, template, format, system prompt) is the format's Python function, run
inside the map, in ``num_proc`` processes for large sources.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from alignkit.data import formats, mixing
from alignkit.data.prepared import SourceReport
from alignkit.data.sources import LINE, RawSource
from alignkit.errors import DataError
from alignkit.recipe.settings import DataSource
from alignkit.suggest import did_you_mean

logger = logging.getLogger("alignkit.data")

ROW, REASON = "_row", "_reason"
BATCH_SIZE = 1000
# Below this many rows a second process costs more to start than it saves (measured: a demo-sized source of
# 4,000 rows converts in ~0.3 s in one process).
PARALLEL_FROM_ROWS = 50_000

RowConverter = Callable[[dict, int], dict[str, Any]]  # (row, row number) -> normalised row; raises RowError


def default_num_proc(rows: int) -> int:
    """Processes for converting ``rows`` rows when the recipe does not say: one for small sources, else one
    per core up to 8 (beyond that the map's writing, not the conversion, is the limit)."""
    return 1 if rows < PARALLEL_FROM_ROWS else max(1, min(os.cpu_count() or 1, 8))


def pick_template(templates: list[str], row_number: int) -> str:
    """One of ``templates`` for a row: random per row, but the same row always gets the same phrasing."""
    return templates[random.Random(f"template-{row_number}").randrange(len(templates))]


def parse_line(text: str) -> dict | None:
    """A JSON Lines row as a mapping, or None when the line is not a JSON object."""
    try:
        row = json.loads(text)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def raw_rows(raw: RawSource) -> Iterator[tuple[int, dict | None]]:
    """``(row number, row)`` of a source in order, blank lines left out; ``row`` is None for a line that is not a
    JSON object. For format detection (which usually needs one row) and for small sources converted in Python."""
    for index, row in enumerate(raw.dataset):
        if raw.lines:
            if row[LINE].strip():
                yield index + 1, parse_line(row[LINE])
        else:
            yield index + 1, row


def prepare_row(row: dict | None, row_number: int, source: DataSource) -> dict:
    """A row as its format sees it: a JSON object, columns renamed, the prompt template applied."""
    if row is None:
        raise formats.RowError("not a JSON object")
    if source.columns:
        row = {source.columns.get(key, key): value for key, value in row.items()}
    if source.templates:
        row = formats.apply_template(row, pick_template(source.templates, row_number))
    return row


def detect_format(raw: RawSource, source: DataSource, where: str, known_formats: Iterable[str]) -> str:
    """The source's format: as named, or (``auto``) that of its first row whose columns fit one.

    Rows before that row are judged by the same format in the map. When no row fits, a source with JSON
    objects is an error asking for a format; one with none gets any format, so the map counts its bad rows.
    """
    known = tuple(known_formats)
    if source.format != "auto":
        if source.format not in known:
            raise DataError(f"{where}: unknown format '{source.format}'.{did_you_mean(source.format, known)} "
                            f"Choose auto or one of: {', '.join(known)}")
        return source.format
    first_undetected: dict | None = None
    for row_number, row in raw_rows(raw):
        try:
            row = prepare_row(row, row_number, source)
        except formats.RowError:
            continue
        if (detected := formats.detect_format(row, known)) is not None:
            if detected == "rated" and "labels" in row and "ratings" not in row:
                raise DataError(f"{where}: '{source.path}' holds TRL's stepwise supervision rows (prompt, completions, "
                                "labels per step), which train process reward models; no alignkit stage does")
            return detected
        first_undetected = first_undetected or row
        if source.max_rows is not None and row_number >= source.max_rows and not raw.lines:
            break
    if first_undetected is not None:
        raise DataError(f"{where}: cannot tell the format of '{source.path}' from its columns "
                        f"({', '.join(first_undetected)}); set format: to one of {', '.join(known)}")
    return known[0]


def first_rows(raw: RawSource, max_rows: int | None) -> RawSource:
    """The source cut to its first ``max_rows`` rows (blank lines do not count), with Arrow compute."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if max_rows is None:
        return raw
    dataset = raw.dataset
    if not hasattr(dataset, "select"):  # streaming: the rows are counted as they come
        return raw
    end = min(max_rows, len(dataset))
    if raw.lines:
        filled = pc.not_equal(pc.utf8_trim_whitespace(dataset.data.column(LINE)), "")
        seen = pc.cumulative_sum(pc.cast(filled, pa.int64()))
        found = pc.index(seen, pa.scalar(max_rows, pa.int64())).as_py()
        end = len(dataset) if found < 0 else found + 1
    return RawSource(dataset.select(range(end)), raw.lines)


def batch_converter(raw: RawSource, source: DataSource, convert: RowConverter,
                    columns: tuple[str, ...]) -> Callable[[dict, list[int]], dict[str, list]]:
    """The batched map function: a batch of raw rows -> ``_row``, ``_reason`` and ``columns`` (null when bad)."""
    lines = raw.lines

    def convert_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {ROW: [], REASON: [], **{column: [] for column in columns}}
        names = list(batch)
        for position, index in enumerate(indices):
            if lines:
                text = batch[LINE][position]
                if not text.strip():  # a blank line is no row
                    continue
                row: dict | None = parse_line(text)
            else:
                row = {name: batch[name][position] for name in names}
            row_number = index + 1
            try:
                value, reason = convert(prepare_row(row, row_number, source), row_number), None
            except formats.RowError as err:
                value, reason = {}, str(err)
            out[ROW].append(row_number)
            out[REASON].append(reason)
            for column in columns:
                out[column].append(value.get(column))
        return out

    return convert_batch


def convert(raw: RawSource, source: DataSource, convert_row: RowConverter, features, num_proc: int | None = None):
    """The source's rows through ``convert_row`` as a batched map whose output has ``features`` (a
    ``datasets.Features`` of the normalised columns) plus ``_row`` and ``_reason``."""
    from datasets import Dataset, Features, Value

    raw = first_rows(raw, source.max_rows)
    dataset = raw.dataset
    columns = tuple(features)
    out_features = Features({ROW: Value("int64"), REASON: Value("string"), **features})
    if hasattr(dataset, "select") and len(dataset) == 0:  # datasets returns an empty dataset unmapped
        return Dataset.from_dict({name: [] for name in out_features}, features=out_features)
    function = batch_converter(raw, source, convert_row, columns)
    # A stream of a typed file may not know its columns before its first row.
    names = dataset.column_names if dataset.column_names is not None else list(next(iter(dataset), {}))
    options: dict[str, Any] = {"batched": True, "batch_size": BATCH_SIZE, "with_indices": True,
                               "remove_columns": names, "features": out_features}
    if hasattr(dataset, "select"):  # in memory or memory-mapped; streaming maps lazily and in one process
        options["num_proc"] = num_proc or default_num_proc(len(dataset))
        options["desc"] = f"Converting {source.path}"
        if options["num_proc"] == 1:
            options.pop("num_proc")
    return dataset.map(function, **options)


def report_of(converted, where: str, source: DataSource, fmt: str) -> SourceReport:
    """The source's report from the map's ``_row`` and ``_reason`` columns."""
    import pyarrow.compute as pc

    report = SourceReport(where=where, path=source.path, format=fmt, rows_read=len(converted))
    reasons = converted.data.column(REASON)  # a map's output: its table is its rows, no indices mapping
    bad = pc.is_valid(reasons)
    for entry in pc.value_counts(pc.filter(reasons, bad)).to_pylist():
        report.skipped[entry["values"]] = entry["counts"]
    if report.skipped:
        report.first_bad_row = pc.min(pc.filter(converted.data.column(ROW), bad)).as_py()
    report.rows_kept = report.rows_read - sum(report.skipped.values())
    return report


def kept_rows(converted, report: SourceReport):
    """The good rows of a converted source, without ``_row`` and ``_reason``; warns about the bad ones and
    fails when none is left."""
    import pyarrow.compute as pc

    if report.skipped:
        logger.warning(report.summary())
    if not report.rows_kept:
        detail = f": {report.summary()}" if report.rows_read else " (it is empty)"
        raise DataError(f"{report.where}: no usable rows in '{report.path}'{detail}")
    if report.skipped:
        good = pc.indices_nonzero(pc.is_null(converted.data.column(REASON)))
        converted = mixing.select_rows(converted, good.to_pylist())
    return converted.remove_columns([ROW, REASON])
