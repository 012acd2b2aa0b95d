"""``alignkit score``: metrics for an existing predictions file (JSON Lines).

Each line holds ``prediction`` and either ``reference`` (a string) or ``references`` (a list of strings).
Lines that do not fit are skipped and reported with their line numbers; a file with no usable line is
an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.errors import DataError
from alignkit.metrics import compute


@dataclass
class PredictionFile:
    predictions: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def _references(row: dict) -> list[str]:
    if "references" in row:
        refs = row["references"]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError("'references' is not a non-empty list of strings")
        return refs
    if "reference" not in row:
        raise ValueError("no 'reference' or 'references'")
    if not isinstance(row["reference"], str):
        raise ValueError("'reference' is not a string")
    return [row["reference"]]


def read_prediction_file(path: Path) -> PredictionFile:
    """Read ``path``; rows that do not fit are recorded in ``bad_lines`` rather than raised."""
    if not path.is_file():
        raise DataError(f"predictions file not found: {path.absolute()}")
    result = PredictionFile()
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                if not isinstance(row.get("prediction"), str):
                    raise ValueError("'prediction' is missing" if "prediction" not in row
                                     else "'prediction' is not a string")
                references = _references(row)
            except json.JSONDecodeError:
                result.bad_lines.append((line_number, "not valid JSON"))
                continue
            except ValueError as err:
                result.bad_lines.append((line_number, str(err)))
                continue
            result.predictions.append(row["prediction"])
            result.references.append(references)
    return result


def score_file(path: Path, metrics: list[str]) -> tuple[dict[str, float], PredictionFile]:
    """Scores of the predictions in ``path`` (flat metric keys) and what was read."""
    data = read_prediction_file(path)
    if not data.predictions:
        reason = "it has no rows" if not data.bad_lines else f"none of its {len(data.bad_lines)} rows is usable"
        raise DataError(f"{path}: nothing to score: {reason}" + _bad_line_summary(data))
    return compute(metrics, data.predictions, data.references), data


def _bad_line_summary(data: PredictionFile, shown: int = 5) -> str:
    if not data.bad_lines:
        return ""
    listed = "; ".join(f"line {n}: {reason}" for n, reason in data.bad_lines[:shown])
    more = f"; and {len(data.bad_lines) - shown} more" if len(data.bad_lines) > shown else ""
    return f" ({listed}{more})"


def bad_line_report(data: PredictionFile) -> str | None:
    """A one-line warning about skipped rows, or None."""
    if not data.bad_lines:
        return None
    total = len(data.bad_lines) + len(data.predictions)
    return f"skipped {len(data.bad_lines)} of {total} rows" + _bad_line_summary(data)
