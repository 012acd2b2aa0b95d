"""An on-disk cache of judge verdicts, so that a repeated or resumed run never pays for the same judgement twice.

A verdict is keyed by everything that decides it: the endpoint's model, the exact question asked (which holds
the template, the constitution, the option labels, the prompt and both answers in their shown order) and how
it was asked (chain of thought and its settings, logprobs or not). The store is one SQLite file: safe to share
between the processes of a launch and between runs, and a run killed mid-write leaves every committed
verdict readable. Nothing secret goes in: no key, no URL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from alignkit.feedback.base import JudgeStats
from alignkit.feedback.endpoint import ChatEndpoint

logger = logging.getLogger(__name__)

V = TypeVar("V")

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


def ask_cached(endpoint: ChatEndpoint, cache: VerdictCache, questions: Sequence[str], keys: Sequence[str],
               ask: Callable[[str], V], kind: type[V], stats: JudgeStats) -> list[V]:
    """The answer to each question: from ``cache``, else ``ask(question)`` (each distinct key once, the endpoint's
    ``max_concurrency`` at a time), cached as it arrives.

    Answers are dataclasses of type ``kind`` with a ``how`` field; a ``refused`` one is returned but not cached
    (nothing was paid for, and the cause may be fixed). ``stats`` counts ``cache_hits``, ``requests``,
    ``retries`` and ``<how>`` for each answer asked (``verdicts_logprobs``...)."""
    found: dict[str, V] = {}
    for key in dict.fromkeys(keys):
        cached = cache.get(key)
        if cached is not None:
            found[key] = kind(**cached)
    stats.count("cache_hits", sum(key in found for key in keys))
    asked = {key: question for key, question in zip(keys, questions) if key not in found}
    asked_keys = list(asked)
    requests, retries, refused = endpoint.requests, endpoint.retries, 0
    try:
        for index, answer in endpoint.map_as_completed(ask, list(asked.values())):
            found[asked_keys[index]] = answer
            stats.count(f"verdicts_{answer.how}")
            if answer.how == "refused":
                refused += 1
            else:
                cache.put(asked_keys[index], dataclasses.asdict(answer))
    finally:
        stats.count("requests", endpoint.requests - requests)
        stats.count("retries", endpoint.retries - retries)
    if refused:
        logger.warning("%s: the endpoint refused %d of %d questions", endpoint.url, refused, len(asked))
    return [found[key] for key in keys]
