"""Datasets for every stage: sources -> normalised rows -> weighted mixture -> train / eval splits.

SFT data becomes ``{"messages": [...]}`` rows (:func:`load_sft_data`); preference data becomes TRL's
conversational pairs or unpaired rows (:func:`load_preference_data`); prompt data for the RL stages becomes
``{"prompt": [...], **columns}`` rows whose other columns reach the reward functions (:func:`load_prompt_data`).
:mod:`alignkit.data.formats` lists the row formats each accepts.

Bad rows never stop a run: each source's rows that do not fit its format are counted by reason and
reported (with the first offending row number); a source left with no valid rows is an error.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.data import formats, sources
from alignkit.errors import DataError
from alignkit.recipe.settings import DataSettings, DataSource
from alignkit.suggest import did_you_mean

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
    return _normalise(rows, source, where, _sft_converter, formats.SFT_FORMATS,
                      lambda messages: formats.add_system_prompt(messages, system_prompt))


def _sft_converter(fmt: str) -> Callable[[dict, int], list]:
    convert = formats.SFT_FORMATS[fmt]
    return lambda row, _row_number: convert(row)


def _normalise(rows, source: DataSource, where: str, converter_for: Callable[[str], Callable[[dict, int], Any]],
               known_formats, finish: Callable = lambda x: x,
               settle: Callable[[list], list] | None = None) -> tuple[list, SourceReport]:
    """Convert a source's rows with the converter of its format (named, or detected from the columns).

    ``converter_for(format)`` returns ``convert(row, row_number)``; the row number lets a converter make
    per-row random choices that repeat on every run. ``settle``, if given, judges the converted rows
    together (for rules about the whole source) and returns each one, possibly changed, or a RowError.
    """
    if source.format != "auto" and source.format not in known_formats:
        raise DataError(f"{where}: unknown format '{source.format}'.{did_you_mean(source.format, known_formats)} "
                        f"Choose auto or one of: {', '.join(known_formats)}")
    report = SourceReport(where=where, path=source.path, format=source.format)
    convert = None if source.format == "auto" else converter_for(source.format)
    kept: list[tuple[int, Any]] = []  # (row number, converted row)
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
                detected = formats.detect_format(row, known_formats)
                if detected is None:
                    # A JSON Lines row may just lack a field: judge it once a later row reveals the format.
                    undetected.append((row_number, row))
                    continue
                report.format, convert = detected, converter_for(detected)
            kept.append((row_number, finish(convert(row, row_number))))
        except formats.RowError as err:
            _skip(report, err, row_number)
    if undetected and convert is None:
        raise DataError(f"{where}: cannot tell the format of '{source.path}' from its columns "
                        f"({', '.join(undetected[0][1])}); set format: to one of {', '.join(known_formats)}")
    for row_number, row in undetected:
        try:
            kept.append((row_number, finish(convert(row, row_number))))
        except formats.RowError as err:
            _skip(report, err, row_number)
    if settle is not None:
        settled = settle([item for _, item in kept])
        for (row_number, _), outcome in zip(kept, settled):
            if isinstance(outcome, formats.RowError):
                _skip(report, outcome, row_number)
        kept = [(row_number, outcome) for (row_number, _), outcome in zip(kept, settled)
                if not isinstance(outcome, formats.RowError)]
    report.rows_kept = len(kept)
    if report.skipped:
        logger.warning(report.summary())
    if not kept:
        detail = f": {report.summary()}" if report.rows_read else " (it is empty)"
        raise DataError(f"{where}: no usable rows in '{source.path}'{detail}")
    return [item for _, item in kept], report


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


def _mix(settings: DataSettings, load_source: Callable, to_row: Callable,
         expand: Callable[[Any], list] | None = None) -> PreparedData:
    """Weight, shuffle and split the sources' rows; ``expand``, if given, turns each row into several."""
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
    if expand is not None:
        # After the split, so the rows made from one source row (a pair's two halves) never end up on both
        # sides; shuffled again so they are not neighbours: TRL's KTO trainer takes each row's neighbour's
        # completion as the mismatched sample of its KL estimate.
        train_rows = [out for row in train_rows for out in expand(row)]
        eval_rows = [out for row in eval_rows for out in expand(row)]
        rng.shuffle(train_rows)
        rng.shuffle(eval_rows)

    as_dataset = lambda rows: Dataset.from_list([to_row(r) for r in rows])  # noqa: E731
    return PreparedData(train=as_dataset(train_rows), eval=as_dataset(eval_rows) if eval_rows else None,
                        reports=reports)


PreferenceKind = Literal["pairs", "unpaired"]
PAIR_STAGES_MESSAGE = "unpaired rows (completion/label) are for the kto stage; rm/dpo/orpo need pairs"


def load_preference_source(source: DataSource, where: str, kind: PreferenceKind,
                           pairing: formats.Pairing = "best_vs_random",
                           system_prompt: str | None = None) -> tuple[list[dict[str, Any]], SourceReport]:
    """Normalised preference rows of one source (see :data:`formats.PREFERENCE_FORMATS`) and its report.

    Rows are pairs ``{"prompt", "chosen", "rejected"}`` (plus ``"margin"`` when the source has one), or,
    for an ``unpaired`` source with ``kind="unpaired"``, ``{"prompt", "completion", "label"}``. Pairs are
    split for KTO only once the mixture is made (:func:`load_preference_data`), so weights count pairs.
    """
    if source.templates and source.format == "implicit_preference":
        raise DataError(f"{where}: templates write a 'prompt' column, but implicit_preference rows take their "
                        "prompt from chosen/rejected; remove templates or use format: preference")

    def converter_for(fmt: str) -> Callable[[dict, int], dict[str, Any]]:
        if fmt == "unpaired" and kind == "pairs":
            raise DataError(f"{where}: '{source.path}' is in the unpaired format; {PAIR_STAGES_MESSAGE} "
                            "(prompt/chosen/rejected, chosen/rejected conversations, or rated completions)")
        convert = formats.PREFERENCE_FORMATS[fmt]
        return lambda row, row_number: convert(row, row_number, pairing)

    rows = sources.read_rows(source, where)
    return _normalise(rows, source, where, converter_for, formats.PREFERENCE_FORMATS,
                      lambda row: formats.with_system_prompt(row, system_prompt),
                      _settle_margins if kind == "pairs" else None)


def _settle_margins(pairs: list[dict[str, Any]]) -> list[dict[str, Any] | formats.RowError]:
    # A source has margins when any of its pairs has one; then every pair needs one, because TRL's reward
    # trainer applies the margin column to whole batches.
    if not any("margin" in pair for pair in pairs):
        return pairs
    settled: list[dict[str, Any] | formats.RowError] = []
    for pair in pairs:
        if "margin" not in pair:
            settled.append(formats.RowError("'margin' is missing"))
        elif (margin := formats.as_number(pair["margin"])) is None:
            settled.append(formats.RowError("'margin' is not a number"))
        else:
            settled.append({**pair, "margin": margin})
    return settled


def load_preference_data(settings: DataSettings, kind: PreferenceKind) -> PreparedData:
    """The preference mixture in TRL's conversational format, with a held-out split.

    ``kind="pairs"`` (reward model, DPO, ORPO): rows ``{"prompt": [...], "chosen": [...], "rejected": [...]}``,
    plus ``"margin"`` when the sources have one (all of them or none). ``kind="unpaired"`` (KTO): rows
    ``{"prompt": [...], "completion": [...], "label": bool}``; paired sources are accepted too, each pair
    giving a desirable (chosen) and an undesirable (rejected) row. Rated sources are paired by
    ``settings.pairing``. The prompt gets ``settings.system_prompt`` unless it has a system message.
    """
    if kind not in ("pairs", "unpaired"):
        raise ValueError(f"kind must be 'pairs' or 'unpaired', not {kind!r}")
    loaded: dict[str, tuple[list, SourceReport]] = {}  # where -> rows and report; _mix takes them from here
    for group in ("train", "eval"):
        for index, source in enumerate(getattr(settings, group) or []):
            where = f"data.{group}[{index}]"
            loaded[where] = load_preference_source(source, where, kind, settings.pairing, settings.system_prompt)
    if kind == "pairs":
        _check_margins_agree(loaded)
    return _mix(settings, lambda source, where: loaded[where], lambda row: row,
                formats.to_unpaired if kind == "unpaired" else None)


def _check_margins_agree(loaded: dict[str, tuple[list, SourceReport]]) -> None:
    # One dataset needs one set of columns, and a margin that only some batches carry would make the
    # reward loss differ from batch to batch.
    with_margin = [f"{where} ({report.path})" for where, (rows, report) in loaded.items() if "margin" in rows[0]]
    without = [f"{where} ({report.path})" for where, (rows, report) in loaded.items() if "margin" not in rows[0]]
    if with_margin and without:
        raise DataError(f"some sources have a margin column and some do not: with: {', '.join(with_margin)}; "
                        f"without: {', '.join(without)}. Give every source a margin, or none")


def load_prompt_source(source: DataSource, where: str,
                       system_prompt: str | None = None) -> tuple[list[dict[str, Any]], SourceReport]:
    """Normalised prompt rows of one source (see :data:`formats.PROMPT_FORMATS`) and its report.

    Rows are ``{"prompt": [...], **columns}``, plus ``"reference"`` for the prompt_completion and messages
    formats. Within a source a column holds one kind of value (see :func:`formats.value_kind`; None fits
    any): the kind most of its rows have, the others being bad rows. Columns in
    :data:`formats.RESERVED_COLUMNS` are dropped with a warning.
    """
    dropped: set[str] = set()

    def converter_for(fmt: str) -> Callable[[dict, int], dict[str, Any]]:
        if fmt == "messages" and source.templates:
            raise DataError(f"{where}: templates write a 'prompt' column, but messages rows take their prompt from "
                            "the conversation; remove templates or use format: prompt_only")
        convert = formats.PROMPT_FORMATS[fmt]

        def run(row: dict, _row_number: int) -> dict[str, Any]:
            dropped.update(formats.RESERVED_COLUMNS.intersection(row))
            return convert(row)

        return run

    rows = sources.read_rows(source, where)
    kept, report = _normalise(rows, source, where, converter_for, formats.PROMPT_FORMATS,
                              lambda row: formats.with_system_prompt(row, system_prompt), _settle_column_kinds)
    if dropped:
        logger.warning("%s (%s): dropped the column(s) %s: TRL passes reward functions arguments of these names "
                       "itself; rename a column (columns: {old: new}) to keep it", where, source.path,
                       ", ".join(sorted(dropped)))
    return kept, report


def _settle_column_kinds(rows: list[dict[str, Any]]) -> list[dict[str, Any] | formats.RowError]:
    # Arrow stores a column as one type: a source whose `answer` is mostly text but a number in a few rows
    # keeps the text rows and counts the others as bad, instead of failing as a whole.
    kinds: dict[str, Counter] = {}
    for row in rows:
        for column, value in row.items():
            if column != "prompt" and (kind := formats.value_kind(value)) is not None:
                kinds.setdefault(column, Counter())[kind] += 1
    expected = {column: counts.most_common(1)[0][0] for column, counts in kinds.items()}  # first seen on ties
    settled: list[dict[str, Any] | formats.RowError] = []
    for row in rows:
        odd = next(((column, kind) for column, value in row.items() if column in expected
                    and (kind := formats.value_kind(value)) not in (None, expected[column])), None)
        if odd is None:
            settled.append(row)
        else:
            settled.append(formats.RowError(f"'{odd[0]}' is a {odd[1]} (a {expected[odd[0]]} in most rows)"))
    return settled


def load_prompt_data(settings: DataSettings) -> PreparedData:
    """The prompt mixture for the RL stages (ppo, grpo, rloo), with a held-out split.

    Rows are ``{"prompt": [...], "reference": str, **columns}`` in TRL's conversational prompt-only form:
    the prompt is messages ending with a user turn, with ``settings.system_prompt`` added unless it has a
    system message. ``reference`` (from prompt_completion and messages sources) and every other column of
    the sources are kept for the reward functions, which TRL calls with the dataset's columns as keyword
    arguments. Train and eval rows all get the same columns: a column that some sources lack is filled
    with None in their rows (with a warning, since reward functions then see None there); a column that
    holds different kinds of value in different sources is a :class:`DataError`.
    """
    loaded: dict[str, tuple[list, SourceReport]] = {}  # where -> rows and report; _mix takes them from here
    for group in ("train", "eval"):
        for index, source in enumerate(getattr(settings, group) or []):
            where = f"data.{group}[{index}]"
            loaded[where] = load_prompt_source(source, where, settings.system_prompt)
    columns = _prompt_columns(loaded)
    to_row = lambda row: {"prompt": row["prompt"], **{column: row.get(column) for column in columns}}  # noqa: E731
    import pyarrow as pa

    try:
        return _mix(settings, lambda source, where: loaded[where], to_row)
    except pa.ArrowException as err:  # kinds agree, but their insides do not (lists of text and of numbers)
        raise DataError(f"the prompt data cannot be stored as one dataset: {_unstorable(loaded, columns, err)}"
                        ) from None


def _prompt_columns(loaded: dict[str, tuple[list, SourceReport]]) -> list[str]:
    """The columns besides ``prompt`` of every prompt row: ``reference`` first, then the others as first seen."""
    kinds: dict[str, dict[str, str]] = {}  # column -> source -> kind of its values (None-only sources left out)
    present: dict[str, list[str]] = {}  # column -> sources that have it
    for where, (rows, report) in loaded.items():
        name = f"{where} ({report.path})"
        for row in rows:
            for column, value in row.items():
                if column == "prompt":
                    continue
                if name not in present.setdefault(column, []):
                    present[column].append(name)
                if (kind := formats.value_kind(value)) is not None:
                    kinds.setdefault(column, {}).setdefault(name, kind)
    for column, by_source in kinds.items():
        if len(set(by_source.values())) > 1:
            found = "; ".join(f"a {kind} in {name}" for name, kind in by_source.items())
            raise DataError(f"column '{column}' holds different kinds of value: {found}. One dataset needs one kind "
                            "per column: rename it in some sources (columns: {old: new}) or drop those sources")
    names = [f"{where} ({report.path})" for where, (_, report) in loaded.items()]
    for column, having in present.items():
        lacking = [name for name in names if name not in having]
        if lacking:
            logger.warning("column '%s' is missing from %s; their rows get None there, and so do the reward "
                           "functions that read it", column, ", ".join(lacking))
    return sorted(present, key=lambda column: column != "reference")  # stable: the rest keep their order


def _unstorable(loaded: dict[str, tuple[list, SourceReport]], columns: list[str], error: Exception) -> str:
    """Which column Arrow cannot store, and why."""
    import pyarrow as pa

    for column in columns:
        try:
            pa.array([row.get(column) for rows, _ in loaded.values() for row in rows])
        except pa.ArrowException as err:
            return f"column '{column}' holds values Arrow cannot store together ({err}); make them alike"
    return str(error)


def check_sources(settings: DataSettings) -> None:
    """Fail before any model loads if a local data file or a demo set named in the recipe does not exist."""
    for group in ("train", "eval"):
        for index, source in enumerate(getattr(settings, group) or []):
            sources.check_exists(source, f"data.{group}[{index}]")
