"""Datasets for every stage: sources -> normalised rows -> weighted mixture -> train / eval splits.

SFT data becomes ``{"messages": [...]}`` rows (:func:`load_sft_data`); preference data becomes TRL's
conversational pairs or unpaired rows (:func:`load_preference_data`); prompt data for the RL stages becomes
``{"prompt": [...], **columns}`` rows whose other columns reach the reward functions (:func:`load_prompt_data`).
:mod:`alignkit.data.formats` lists the row formats each accepts.

Bad rows never stop a run: each source's rows that do not fit its format are counted by reason and
reported (with the first offending row number); a source left with no valid rows is an error.

Everything runs in Arrow: sources open through ``datasets`` (:mod:`~alignkit.data.sources`), rows are
converted by a batched ``Dataset.map`` (:mod:`~alignkit.data.convert`), mixed and split by index selection
(:mod:`~alignkit.data.mixing`); :func:`prepare` caches the result by content (:mod:`~alignkit.data.cache`);
``data.streaming`` reads SFT sources as the run goes (:mod:`~alignkit.data.streaming`). The ``load_*_source``
functions return one source's rows as Python lists, for tests and small tools.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from alignkit.data import columns, convert, formats, sources, streaming
from alignkit.data.cache import prepare
from alignkit.data.convert import pick_template
from alignkit.data.mixing import apply_weight, mix, split_eval
from alignkit.data.prepared import PreparedData, SourceReport
from alignkit.errors import DataError
from alignkit.recipe.settings import DataSettings, DataSource

logger = logging.getLogger(__name__)

__all__ = ["PreparedData", "SourceReport", "apply_weight", "check_sources", "countable", "load_preference_data",
           "load_preference_source", "load_prompt_data", "load_prompt_source", "load_sft_data", "load_sft_source",
           "pick_template", "prepare", "split_eval"]


def _convert_source(raw: sources.RawSource, source: DataSource, where: str, known_formats,
                    converter_for: Callable[[str], convert.RowConverter], features_for: Callable[[str], Any],
                    num_proc: int | None):
    """An opened source's format settled and its rows converted by a batched map: (converted dataset, format)."""
    fmt = convert.detect_format(raw, source, where, known_formats)
    return convert.convert(raw, source, converter_for(fmt), features_for(fmt), num_proc), fmt


def _sft_converters(system_prompt: str | None) -> Callable[[str], convert.RowConverter]:
    """``converter_for(format)`` of SFT rows (:func:`formats.sft_row`)."""
    return lambda fmt: lambda row, _row_number: formats.sft_row(fmt, row, system_prompt)


def sft_source(source: DataSource, where: str, system_prompt: str | None = None,
               num_proc: int | None = None) -> tuple[Any, SourceReport]:
    """One source's SFT rows as a dataset (``{"messages": [...]}``, or ``{"text": ...}`` for raw text), and its
    report."""
    raw = sources.open_source(source, where)
    tools = sources.mentions_tools(raw)
    converted, fmt = _convert_source(raw, source, where, formats.SFT_FORMATS, _sft_converters(system_prompt),
                                     lambda fmt: columns.sft(fmt, tools), num_proc)
    report = convert.report_of(converted, where, source, fmt)
    return convert.kept_rows(converted, report), report


def load_sft_source(source: DataSource, where: str, system_prompt: str | None = None) -> tuple[list, SourceReport]:
    """Normalised conversations of one source (as Python lists) and its report."""
    dataset, report = sft_source(source, where, system_prompt)
    return dataset["text" if "text" in dataset.column_names else "messages"], report


def load_sft_data(settings: DataSettings) -> PreparedData:
    """The SFT mixture as ``{"messages": [...]}`` (or raw ``{"text": ...}``) datasets, with a held-out split;
    streamed (``IterableDataset`` for training) when ``settings.streaming``."""
    kinds: dict[str, str] = {}  # where -> "raw text" or "conversations"

    def load(source: DataSource, where: str) -> tuple[Any, SourceReport]:
        if settings.streaming:
            dataset, report = streaming.stream_source(source, where, formats.SFT_FORMATS,
                                                      _sft_converters(settings.system_prompt), columns.sft)
        else:
            dataset, report = sft_source(source, where, settings.system_prompt, settings.num_proc)
        kinds[f"{where} ({source.path})"] = "raw text" if report.format == "text" else "conversations"
        if len(set(kinds.values())) > 1:
            found = "; ".join(f"{kind} in {name}" for name, kind in kinds.items())
            raise DataError(f"raw text and conversations cannot be mixed in one SFT dataset ({found}): TRL trains "
                            "on one or the other; convert one of them, or train them in two steps")
        return dataset, report

    return streaming.prepare_stream(settings, load) if settings.streaming else _prepare(settings, load)


def _prepare(settings: DataSettings, load_source: Callable[[DataSource, str], tuple[Any, SourceReport]],
             expand: Callable[[Any], Any] | None = None) -> PreparedData:
    """Every source loaded, then mixed and split (:func:`alignkit.data.mixing.mix`)."""
    reports, loaded = [], {}
    for group in ("train", "eval"):
        for index, source in enumerate(getattr(settings, group) or []):
            where = f"data.{group}[{index}]"
            loaded[where], report = load_source(source, where)
            reports.append(report)
    aligned = dict(zip(loaded, _aligned(list(loaded.values()))))
    train = [dataset for where, dataset in aligned.items() if where.startswith("data.train")]
    eval_sets = [dataset for where, dataset in aligned.items() if where.startswith("data.eval")]
    train_set, eval_set = mix(settings, train, eval_sets, expand)
    return PreparedData(train=train_set, eval=eval_set, reports=reports)


PreferenceKind = Literal["pairs", "unpaired"]
PAIR_STAGES_MESSAGE = "unpaired rows (completion/label) are for the kto stage; rm/dpo/orpo need pairs"


def preference_source(source: DataSource, where: str, kind: PreferenceKind,
                      pairing: formats.Pairing = "best_vs_random", system_prompt: str | None = None,
                      num_proc: int | None = None) -> tuple[Any, SourceReport]:
    """One source's preference rows as a dataset (see :func:`load_preference_source`) and its report."""
    if source.templates and source.format == "implicit_preference":
        raise DataError(f"{where}: templates write a 'prompt' column, but implicit_preference rows take their "
                        "prompt from chosen/rejected; remove templates or use format: preference")

    def converter_for(fmt: str) -> convert.RowConverter:
        if fmt == "unpaired" and kind == "pairs":
            raise DataError(f"{where}: '{source.path}' is in the unpaired format; {PAIR_STAGES_MESSAGE} "
                            "(prompt/chosen/rejected, chosen/rejected conversations, or rated completions)")
        to_row = formats.PREFERENCE_FORMATS[fmt]

        def run(row: dict, row_number: int) -> dict[str, Any]:
            converted = formats.with_system_prompt(to_row(row, row_number, pairing), system_prompt)
            if "margin" in converted:  # judged per source once every row is converted (_settle_margins)
                margin = formats.as_number(converted["margin"])
                converted |= {"margin": margin, columns.MARGIN_STATE: "not a number" if margin is None else "number"}
            return converted

        return run

    raw = sources.open_source(source, where)
    tools = sources.mentions_tools(raw)
    converted, fmt = _convert_source(raw, source, where, formats.PREFERENCE_FORMATS, converter_for,
                                     lambda fmt: columns.preference(fmt, tools), num_proc)
    if fmt != "unpaired":
        converted = _settle_margins(converted, keep=kind == "pairs")
    report = convert.report_of(converted, where, source, fmt)
    return convert.kept_rows(converted, report), report


def load_preference_source(source: DataSource, where: str, kind: PreferenceKind,
                           pairing: formats.Pairing = "best_vs_random",
                           system_prompt: str | None = None) -> tuple[list[dict[str, Any]], SourceReport]:
    """Normalised preference rows of one source (see :data:`formats.PREFERENCE_FORMATS`) and its report.

    Rows are pairs ``{"prompt", "chosen", "rejected"}`` (plus ``"margin"`` when the source has one), or,
    for an ``unpaired`` source with ``kind="unpaired"``, ``{"prompt", "completion", "label"}``. Pairs are
    split for KTO only once the mixture is made (:func:`load_preference_data`), so weights count pairs.
    """
    dataset, report = preference_source(source, where, kind, pairing, system_prompt)
    return dataset.to_list(), report


def _settle_margins(converted, keep: bool):
    # A source has margins when any of its pairs has one; then every pair needs one, because TRL's reward
    # trainer applies the margin column to whole batches. Judged with Arrow compute over the map's output.
    import pyarrow as pa
    import pyarrow.compute as pc

    state = converted.data.column(columns.MARGIN_STATE)
    if keep and pc.any(pc.is_valid(state)).as_py():
        reason = converted.data.column(convert.REASON)
        judged = pc.if_else(pc.is_valid(reason), reason,
                            pc.if_else(pc.is_null(state), pa.scalar("'margin' is missing"),
                                       pc.if_else(pc.equal(state, "number"), pa.scalar(None, pa.string()),
                                                  pa.scalar("'margin' is not a number"))))
        converted = converted.remove_columns(convert.REASON).add_column(convert.REASON, judged.combine_chunks())
        return converted.remove_columns(columns.MARGIN_STATE)
    return converted.remove_columns(["margin", columns.MARGIN_STATE])


def _to_unpaired(dataset):
    """KTO rows from a mixture of pairs (each giving a desirable and an undesirable row) and unpaired rows."""
    features = columns.unpaired(_has_tools(dataset))

    def split_pairs(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": [], "completion": [], "label": []}
        for position, prompt in enumerate(batch["prompt"]):
            if batch.get("label") is not None and batch["label"][position] is not None:
                row = {"prompt": prompt, "completion": batch["completion"][position], "label": batch["label"][position]}
            else:
                row = {"prompt": prompt, "chosen": batch["chosen"][position], "rejected": batch["rejected"][position]}
            for unpaired in formats.to_unpaired(row):
                for column in out:
                    out[column].append(unpaired[column])
        return out

    return dataset.map(split_pairs, batched=True, remove_columns=dataset.column_names, features=features,
                       desc="Splitting pairs for KTO")


def _has_tools(dataset) -> bool:
    return "tool_calls" in str(dataset.features["prompt"])


def _aligned(datasets_: list) -> list:
    """Datasets given the same columns, so they concatenate: a column some lack is added as null (KTO's
    mixture of pairs and unpaired rows), and messages without tool columns get them (null) when another
    source's messages have them."""
    from datasets import Features

    features: dict[str, Any] = {}
    for dataset in datasets_:
        for name, feature in dataset.features.items():
            if name not in features or ("tool_calls" in str(feature) and "tool_calls" not in str(features[name])):
                features[name] = feature
    aligned = []
    for dataset in datasets_:
        for name, feature in features.items():
            if name not in dataset.column_names:
                dataset = dataset.add_column(name, [None] * len(dataset), feature=feature)
        dataset = dataset.select_columns(list(features))
        if dataset.features != Features(features):
            dataset = dataset.cast(Features(features))
        aligned.append(dataset)
    return aligned


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
    loaded: dict[str, tuple[Any, SourceReport]] = {}  # where -> dataset and report; _prepare takes them from here
    for group in ("train", "eval"):
        for index, source in enumerate(getattr(settings, group) or []):
            where = f"data.{group}[{index}]"
            loaded[where] = preference_source(source, where, kind, settings.pairing, settings.system_prompt,
                                              settings.num_proc)
    if kind == "pairs":
        _check_margins_agree(loaded)
    return _prepare(settings, lambda source, where: loaded[where], _to_unpaired if kind == "unpaired" else None)


def _check_margins_agree(loaded: dict[str, tuple[Any, SourceReport]]) -> None:
    # One dataset needs one set of columns, and a margin that only some batches carry would make the
    # reward loss differ from batch to batch.
    named = {f"{where} ({report.path})": "margin" in dataset.column_names
             for where, (dataset, report) in loaded.items()}
    with_margin = [name for name, has in named.items() if has]
    without = [name for name, has in named.items() if not has]
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

    Prompt rows keep every column of their source, of any type, so they are converted with the same batched
    function as the other formats but in this process, as Python rows: Arrow could only store them once the
    column kinds are settled over the whole source. Prompt sets (prompts only, for RL) are small.
    """
    dropped: set[str] = set()

    def converter_for(fmt: str) -> convert.RowConverter:
        if fmt == "messages" and source.templates:
            raise DataError(f"{where}: templates write a 'prompt' column, but messages rows take their prompt from "
                            "the conversation; remove templates or use format: prompt_only")
        to_row = formats.PROMPT_FORMATS[fmt]

        def run(row: dict, _row_number: int) -> dict[str, Any]:
            dropped.update(formats.RESERVED_COLUMNS.intersection(row))
            return {"row": formats.with_system_prompt(to_row(row), system_prompt)}

        return run

    raw = convert.first_rows(sources.open_source(source, where), source.max_rows)
    fmt = convert.detect_format(raw, source, where, formats.PROMPT_FORMATS)
    convert_batch = convert.batch_converter(raw, source, converter_for(fmt), ("row",))
    report = SourceReport(where=where, path=source.path, format=fmt)
    kept: list[tuple[int, dict[str, Any]]] = []
    for start in range(0, len(raw.dataset), convert.BATCH_SIZE):
        batch = raw.dataset[start:start + convert.BATCH_SIZE]
        out = convert_batch(batch, list(range(start, start + len(next(iter(batch.values()))))))
        for row_number, reason, row in zip(out[convert.ROW], out[convert.REASON], out["row"]):
            report.rows_read += 1
            if reason is None:
                kept.append((row_number, row))
            else:
                report.add(reason, row_number)
    settled = _settle_column_kinds([row for _, row in kept])
    for (row_number, _), outcome in zip(kept, settled):
        if isinstance(outcome, formats.RowError):
            report.add(str(outcome), row_number)
    rows = [outcome for outcome in settled if not isinstance(outcome, formats.RowError)]
    report.rows_kept = len(rows)
    if dropped:
        logger.warning("%s (%s): dropped the column(s) %s: TRL passes reward functions arguments of these names "
                       "itself; rename a column (columns: {old: new}) to keep it", where, source.path,
                       ", ".join(sorted(dropped)))
    if report.skipped:
        logger.warning(report.summary())
    if not rows:
        detail = f": {report.summary()}" if report.rows_read else " (it is empty)"
        raise DataError(f"{where}: no usable rows in '{source.path}'{detail}")
    return rows, report


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
    import pyarrow as pa
    from datasets import Dataset

    loaded: dict[str, tuple[list, SourceReport]] = {}  # where -> rows and report
    for group in ("train", "eval"):
        for index, source in enumerate(getattr(settings, group) or []):
            where = f"data.{group}[{index}]"
            loaded[where] = load_prompt_source(source, where, settings.system_prompt)
    names = _prompt_columns(loaded)
    try:  # all sources in one dataset, so that every column gets one Arrow type; then one slice per source
        everything = Dataset.from_list([{"prompt": row["prompt"], **{column: row.get(column) for column in names}}
                                        for rows, _ in loaded.values() for row in rows])
    except pa.ArrowException as err:  # kinds agree, but their insides do not (lists of text and of numbers)
        raise DataError(f"the prompt data cannot be stored as one dataset: {_unstorable(loaded, names, err)}"
                        ) from None
    as_datasets, start = {}, 0
    for where, (rows, report) in loaded.items():
        as_datasets[where] = (everything.select(range(start, start + len(rows))), report)
        start += len(rows)
    return _prepare(settings, lambda source, where: as_datasets[where])


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


def countable(settings: DataSettings) -> bool:
    """Whether every source can be read here without a download (local files and demo sets), so that
    ``alignkit plan`` and ``alignkit validate`` prepare the data and count its rows (a stream is not counted)."""
    every = [*settings.train, *(settings.eval or [])]
    return (bool(settings.train) and not settings.streaming
            and all(sources.is_local(s.path) or sources.is_demo(s.path) for s in every))


def check_sources(settings: DataSettings) -> None:
    """Fail before any model loads if a local data file or a demo set named in the recipe does not exist."""
    for group in ("train", "eval"):
        for index, source in enumerate(getattr(settings, group) or []):
            sources.check_exists(source, f"data.{group}[{index}]")
