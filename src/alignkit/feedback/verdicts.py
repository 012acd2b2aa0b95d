"""An on-disk cache of judge verdicts, so that a repeated or resumed run never pays for the same judgement twice.

A verdict is keyed by everything that decides it: the endpoint's model, the exact question asked (which holds
the template, the constitution, the option labels, the prompt and both answers in their shown order) and how
it was asked (chain of thought and its settings, logprobs or not). The store is one SQLite file: safe to share
between the processes of a launch and between runs, and a run killed mid-write leaves every committed
verdict readable. Nothing secret goes in: no key, no URL.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

FILE_NAME = "verdicts.sqlite"


def verdict_key(**decided_by: Any) -> str:
    """The cache key of a verdict: a hash of everything that decides it (JSON-serialisable values)."""
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class VerdictCache:
    """Verdicts (small JSON objects) by key, in ``directory/verdicts.sqlite``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / FILE_NAME
        self._lock = threading.Lock()
        # A generous busy timeout: the processes of a launch write to the same file.
        self._db = sqlite3.connect(self.path, timeout=120, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM verdicts WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store a verdict, committed at once (a run killed later keeps it)."""
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO verdicts (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
