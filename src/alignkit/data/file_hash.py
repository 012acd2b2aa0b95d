"""SHA-256 hashes of local data files, remembered with the file's status so an unchanged file is not read again.

The prepared-data cache is keyed by content (:func:`alignkit.data.sources.content_fingerprint`), so every run
would read its whole source before it can look its prepared data up (a 248 MB file: 0.26 s of a 1.3 s rerun).
As git's index does, a hash is kept with the file's device, inode, size, modification time and status-change
time (``ctime``), and reused only while all five are unchanged. ``ctime`` cannot be set by a program: an edit
that keeps the size and puts the modification time back (``cp -p``, ``touch -d``, ``os.utime``) still changes
it. A timestamp has a granularity, though, so a file changed in the same tick as it was hashed could keep
every one of them: a hash is trusted only when both times are older than the moment the reading began by
:data:`RACY_MARGIN_NS` (git's "racily clean" rule); a file written just before it was hashed is read again
next time, and then remembered for good.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from alignkit.demo.build import cache_dir

logger = logging.getLogger("alignkit.data")

# Longer than any filesystem's timestamp granularity (FAT: 2 s; Linux's coarse clock: a few ms) and than a
# network filesystem's small clock skew, short enough that a file written by the step before a run is
# remembered by the run after.
RACY_MARGIN_NS = 3_000_000_000
CHUNK = 1 << 20


def hashes_dir() -> Path:
    return cache_dir() / "data" / "file-hashes"


def sha256_of_file(path: Path) -> str:
    """The file's SHA-256, reading it in full."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _status(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"device": stat.st_dev, "inode": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns}


def _record_path(path: Path) -> Path:
    name = hashlib.blake2b(str(path).encode(), digest_size=16).hexdigest()
    return hashes_dir() / f"{name}.json"


def _remembered(record_path: Path, path: Path, status: dict[str, int]) -> str | None:
    """The remembered hash if the record is of this file in this very state and was not racy, else None."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("path") != str(path) or record.get("status") != status:
        return None
    trusted_before = record.get("hashed_at_ns", 0) - RACY_MARGIN_NS
    if status["mtime_ns"] >= trusted_before or status["ctime_ns"] >= trusted_before:
        return None  # changed too close to the hashing to be sure a later change would show
    return record.get("sha256")


def file_sha256(path: Path) -> str:
    """``path``'s SHA-256: remembered from an earlier call when the file's status says it is unchanged (see the
    module's docstring), else read in full and remembered."""
    path = path.expanduser().resolve()
    record_path = _record_path(path)
    status = _status(path)
    if (remembered := _remembered(record_path, path, status)) is not None:
        return remembered
    hashed_at_ns = time.time_ns()  # before the reading starts: a change while it reads counts as racy
    digest = sha256_of_file(path)
    if _status(path) == status:  # not changed while being read
        _remember(record_path, {"path": str(path), "status": status, "hashed_at_ns": hashed_at_ns,
                                "sha256": digest})
    return digest


def _remember(record_path: Path, record: dict) -> None:
    partial = record_path.with_name(f"{record_path.name}.{os.getpid()}.partial")
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(record))
        partial.replace(record_path)  # atomic: a concurrent reader sees the old record or the new one
    except OSError as err:  # a read-only cache costs the reuse, not the run
        logger.debug("data: could not remember the hash of %s (%s)", record["path"], err)
        partial.unlink(missing_ok=True)
