"""Datasets for every stage: sources -> normalised rows -> weighted mixture -> train / eval splits.

Bad rows never stop a run: each source's rows that do not fit its format are counted by reason and
reported (with the first offending row number); a source left with no valid rows is an error.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from alignkit.data import formats, sources
from alignkit.errors import DataError
from alignkit.recipe import DataSettings, DataSource

logger = logging.getLogger(__name__)


@dataclass
class SourceReport:
    """What happened to one source's rows."""

    where: str
    path: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    first_bad_row: int | None = None

    def summary(self) -> str:
        reasons = ", ".join(f"{reason} ({count})" for reason, count in self.skipped.most_common())
        return (f"{self.where} ({self.path}, format {self.format}): skipped {sum(self.skipped.values())} of "
                f"{self.rows_read} rows: {reasons}; first bad row: {self.first_bad_row}")

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
                "skipped": dict(self.skipped), "first_bad_row": self.first_bad_row}


@dataclass
class PreparedData:
    """Train and eval datasets in TRL's format, and a report per source."""

    train: object  # datasets.Dataset
    eval: object | None
    reports: list[SourceReport]


def load_sft_source(source: DataSource, where: str, system_prompt: str | None = None) -> tuple[list, SourceReport]:
    """Normalised conversations of one source and its report."""
    rows = sources.read_rows(source, where)
    return _normalise(rows, source, where, lambda fmt: formats.SFT_FORMATS[fmt], formats.SFT_FORMATS,
                      lambda messages: formats.add_system_prompt(messages, system_prompt))


def _normalise(rows, source: DataSource, where: str, converter_for: Callable[[str], Callable],
               known_formats, finish: Callable = lambda x: x) -> tuple[list, SourceReport]:
    if source.format != "auto" and source.format not in known_formats:
        from alignkit.suggest import did_you_mean

        raise DataError(f"{where}: unknown format '{source.format}'.{did_you_mean(source.format, known_formats)} "
                        f"Choose auto or one of: {', '.join(known_formats)}")
    report = SourceReport(where=where, path=source.path, format=source.format)
    convert = None if source.format == "auto" else converter_for(source.format)
    kept = []
    undetected: list[tuple[int, dict]] = []  # auto: rows seen before the format is known whose columns fit none
    for row_number, row in rows:
        if source.max_rows is not None and report.rows_read >= source.max_rows:
            break
        report.rows_read += 1
        try:
            if row is None:
                raise formats.RowError("not a JSON object")
            if source.columns:
                row = {source.columns.get(key, key): value for key, value in row.items()}
            if source.templates:
                row = formats.apply_template(row, pick_template(source.templates, row_number))
            if convert is None:  # auto: the first row whose columns fit a format decides
                detected = formats.detect_format(row)
                if detected is None or detected not in known_formats:
                    # A JSON Lines row may just lack a field: judge it once a later row reveals the format.
                    undetected.append((row_number, row))
                    continue
                report.format, convert = detected, converter_for(detected)
            kept.append(finish(convert(row)))
        except formats.RowError as err:
            _skip(report, err, row_number)
    if undetected and convert is None:
        raise DataError(f"{where}: cannot tell the format of '{source.path}' from its columns "
                        f"({', '.join(undetected[0][1])}); set format: to one of {', '.join(known_formats)}")
    for row_number, row in undetected:
        try:
            kept.append(finish(convert(row)))
        except formats.RowError as err:
            _skip(report, err, row_number)
    report.rows_kept = len(kept)
    if report.skipped:
        logger.warning(report.summary())
    if not kept:
        detail = f": {report.summary()}" if report.rows_read else " (it is empty)"
        raise DataError(f"{where}: no usable rows in '{source.path}'{detail}")
    return kept, report


def pick_template(templates: list[str], row_number: int) -> str:
    """One of ``templates`` for a row: random per row, but the same row always gets the same phrasing."""
    return templates[random.Random(f"template-{row_number}").randrange(len(templates))]


def _skip(report: SourceReport, err: formats.RowError, row_number: int) -> None:
    report.skipped[str(err)] += 1
    report.first_bad_row = row_number if report.first_bad_row is None else min(report.first_bad_row, row_number)


def apply_weight(rows: list, weight: float, rng: random.Random) -> list:
    """Up- or down-sample ``rows`` to ``round(len(rows) * weight)``: whole copies, then a random remainder."""
    target = max(1, round(len(rows) * weight))
    copies, remainder = divmod(target, len(rows))
    return rows * copies + rng.sample(rows, remainder)


def split_eval(rows: list, eval_size: float) -> tuple[list, list]:
    """Hold out ``eval_size`` rows (a fraction if < 1, else a count) from already-shuffled ``rows``."""
    count = round(len(rows) * eval_size) if eval_size < 1 else int(eval_size)
    if count >= len(rows):
        raise DataError(f"data.eval_size={eval_size} would leave no training rows (the mixture has {len(rows)})")
    return rows[count:], rows[:count]


def load_sft_data(settings: DataSettings) -> PreparedData:
    """The SFT mixture as ``{"messages": [...]}`` datasets, with a held-out split."""
    load = lambda source, where: load_sft_source(source, where, settings.system_prompt)  # noqa: E731
    return _mix(settings, load, lambda messages: {"messages": messages})


def _mix(settings: DataSettings, load_source: Callable, to_row: Callable) -> PreparedData:
    from datasets import Dataset

    rng = random.Random(settings.seed)
    reports, train_rows = [], []
    for index, source in enumerate(settings.train):
        rows, report = load_source(source, f"data.train[{index}]")
        reports.append(report)
        train_rows += apply_weight(rows, source.weight, rng)
    rng.shuffle(train_rows)

    eval_rows: list = []
    if settings.eval:
        for index, source in enumerate(settings.eval):
            rows, report = load_source(source, f"data.eval[{index}]")
            reports.append(report)
            eval_rows += rows
    elif settings.eval_size > 0:
        train_rows, eval_rows = split_eval(train_rows, settings.eval_size)

    as_dataset = lambda rows: Dataset.from_list([to_row(r) for r in rows])  # noqa: E731
    return PreparedData(train=as_dataset(train_rows), eval=as_dataset(eval_rows) if eval_rows else None,
                        reports=reports)


def check_sources(settings: DataSettings) -> None:
    """Fail before any model loads if a local data file or a demo set named in the recipe does not exist."""
    for group in ("train", "eval"):
        for index, source in enumerate(getattr(settings, group) or []):
            sources.check_exists(source, f"data.{group}[{index}]")
