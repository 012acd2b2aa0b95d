"""What preparing data gives: the datasets a stage trains and evaluates on, and a report per source."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


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

    def add(self, reason: str, row_number: int) -> None:
        """Count one bad row."""
        self.skipped[reason] += 1
        self.first_bad_row = row_number if self.first_bad_row is None else min(self.first_bad_row, row_number)


@dataclass
class PreparedData:
    """Train and eval datasets in TRL's format, a report per source, and where they came from: the
    prepared-data cache key (None when not cached) and whether this process read them from the cache."""

    train: object  # datasets.Dataset (IterableDataset when streaming)
    eval: object | None
    reports: list[SourceReport]
    cache_key: str | None = None
    from_cache: bool = False
