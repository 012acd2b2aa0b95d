"""Run directories: never overwrite silently, never delete what alignkit did not write, one run at a time,
resume interrupted runs, record what ran and how it ended.

A run dir holds ``recipe.yaml`` (the resolved recipe), ``run.json`` (status, versions, world size),
``run.lock`` (who holds the dir), ``checkpoint-*/`` while training, then the final adapter or model, the
tokenizer and ``metrics.json``.

What happens when ``train.output_dir`` already has content:
  * empty or missing                      -> a new run
  * an unfinished alignkit run             -> resumed from its last complete checkpoint if its recipe is
                                             unchanged (``--resume`` resumes with a changed recipe, e.g. more
                                             steps); a damaged checkpoint is named and the one before used
  * a finished alignkit run                -> error, unless ``--overwrite`` (which deletes it first)
  * anything else                          -> error, always: alignkit deletes only what it wrote
  * a run in progress (``run.lock`` held)  -> error, always
The current directory, the directories above it, the home directory (and those above it) and ``/`` are
never a run dir. ``run.json`` ends as ``complete``, ``failed`` (with the error) or ``interrupted`` (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from alignkit import __version__
from alignkit.distributed import is_main_process, world_size
from alignkit.errors import AlignkitError, RunDirError
from alignkit.recipe.loading import Recipe, shared_directory

logger = logging.getLogger(__name__)

RECIPE_FILE, RUN_FILE, METRICS_FILE, LOCK_FILE = "recipe.yaml", "run.json", "metrics.json", "run.lock"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files of a checkpoint that a cut-off write leaves unreadable, and how to tell cheaply (headers only).
_SAFETENSORS, _TORCH_ZIP = ("*.safetensors",), ("*.pt", "*.pth", "*.bin")


@dataclass
class RunDir:
    """An opened run directory and the checkpoint to resume from, if any."""

    path: Path
    resume_from: Path | None = None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if is_main_process():
            _write_atomic(self.path / name, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str) -> dict[str, Any]:
        return json.loads((self.path / name).read_text())

    def finish(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json`` and mark the run complete (after which it is never resumed)."""
        self.write_json(METRICS_FILE, metrics)
        self._set_status("complete", finished=_now())

    def mark_stopped(self, err: BaseException) -> RunStop:
        """Record in ``run.json`` that the run ended early: ``interrupted`` (Ctrl-C) or ``failed`` with the
        error's first line. Main process only, no barrier: the other processes may be gone already."""
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        with contextlib.suppress(OSError, ValueError):  # reporting the stop must not hide its cause
            self._set_status(status, stopped=_now(), error=None if status == "interrupted" else one_line(err))
        checkpoint = last_checkpoint(self.path, warn=False)
        return RunStop(path=self.path, status=status, checkpoint=checkpoint.name if checkpoint else None)

    def _set_status(self, status: str, **values: Any) -> None:
        if is_main_process():
            record = self.read_json(RUN_FILE)
            record.update(status=status, **values)
            self.write_json(RUN_FILE, record)


@dataclass(frozen=True)
class RunStop:
    """How a run that ended early left its run dir: what the CLI tells the user next to the error."""

    path: Path
    status: str               # "interrupted" or "failed"
    checkpoint: str | None    # the last complete checkpoint, which a rerun resumes from

    def describe(self) -> str:
        where = (f"a rerun resumes from {self.checkpoint}" if self.checkpoint
                 else "it saved no checkpoint, so a rerun starts it again")
        return f"the run in {self.path} is marked {self.status} in {RUN_FILE}; {where}"


def one_line(err: BaseException) -> str:
    """The first line of an error, with its type unless it is one of alignkit's own messages."""
    text = (str(err).strip().splitlines() or [""])[0][:500]
    return text if isinstance(err, AlignkitError) else f"{type(err).__name__}: {text}".rstrip(": ")


def checkpoint_dirs(path: Path) -> list[Path]:
    """The ``checkpoint-<step>`` directories in ``path``, complete or not, by step (oldest first); other names
    (a user's ``checkpoint-old``) are not checkpoints and are never resumed from or rotated away."""
    steps = [(int(match.group(1)), child) for child in path.glob("checkpoint-*")
             if (match := _CHECKPOINT.match(child.name)) and child.is_dir()]
    return [child for _, child in sorted(steps)]


def last_checkpoint(path: Path, *, warn: bool = True) -> Path | None:
    """The complete, readable checkpoint with the highest step in ``path``, or None.

    The trainer writes ``trainer_state.json`` last, so a checkpoint without it was cut off mid-save (the
    process was killed) and is passed over silently. A checkpoint whose state does not parse, or one of whose
    weight / optimizer files is cut short (a full disk, a bad copy), is named in a warning and passed over for
    the one before: resuming from it would end in a raw deserialisation error.
    """
    steps = [child for child in reversed(checkpoint_dirs(path)) if (child / "trainer_state.json").is_file()]
    for index, checkpoint in enumerate(steps):
        damage = checkpoint_damage(checkpoint)
        if damage is None:
            return checkpoint
        if warn:
            earlier = steps[index + 1].name if index + 1 < len(steps) else None
            logger.warning("%s is damaged (%s); %s", checkpoint, damage,
                           f"resuming from {earlier} instead" if earlier else "no earlier checkpoint to resume from")
    return None


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What makes ``checkpoint`` unusable (the file and the error), or None if it reads.

    Cheap: safetensors headers are checked against the file size, torch files' zip directories are read (both
    sit at the ends of the files a cut-off write loses), no tensor is loaded.
    """
    from safetensors import safe_open

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json: {err}"
    for pattern in _SAFETENSORS:
        for file in sorted(checkpoint.glob(pattern)):
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as err:  # noqa: BLE001 - SafetensorError is not importable as a class everywhere
                return f"{file.name}: {err}"
    for pattern in _TORCH_ZIP:
        for file in sorted(checkpoint.glob(pattern)):
            try:
                with zipfile.ZipFile(file):
                    pass
            except (OSError, zipfile.BadZipFile) as err:
                return f"{file.name}: {err}"
    return None


@contextlib.contextmanager
def open_run_dir(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> Iterator[RunDir]:
    """Claim ``recipe.output_dir`` for the length of the ``with`` block: refuse it, create it, resume it or
    replace it (see the module docstring), lock it and record the recipe. A run that leaves the block by an
    exception or Ctrl-C is marked ``failed`` / ``interrupted`` in ``run.json``, and the exception carries a
    :class:`RunStop` (``err.run_stop``) saying where a rerun resumes."""
    path = recipe.output_dir
    lock = None
    try:
        # The main process decides and holds the lock; the others learn its verdict, so that every process
        # ends with the same error, or goes on with the same checkpoint.
        lock, resume_from = _on_main(lambda: _claim_run_dir(recipe, overwrite=overwrite, resume=resume))
        if resume_from:
            logger.info("resuming %s from %s", path, resume_from.name)
        run = RunDir(path=path, resume_from=resume_from)
        try:
            yield run
        except (Exception, KeyboardInterrupt) as err:
            stop = run.mark_stopped(err)
            with contextlib.suppress(AttributeError):  # an exception type with __slots__ carries no record
                err.run_stop = stop  # type: ignore[attr-defined]
            raise
    finally:
        if lock is not None:
            lock.close()  # releases the flock


def _claim_run_dir(recipe: Recipe, *, overwrite: bool, resume: bool) -> tuple[RunLock | None, Path | None]:
    """On the main process: check, lock and prepare the run dir. Returns the held lock and the checkpoint
    to resume from."""
    path = recipe.output_dir
    refuse_precious_dir(path, "train.output_dir")
    refuse_foreign_content(path, "train.output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create the output dir {path}: {err}") from None
    lock = RunLock.acquire(path)
    try:
        resolved = recipe.to_dict()
        resume_from = _decide(path, resolved, overwrite=overwrite, resume=resume)
        if overwrite:
            _empty_run_dir(path)
        (path / RECIPE_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
        _write_atomic(path / RUN_FILE, json.dumps({
            "stage": recipe.stage,
            "status": "running",
            "started": _now(),
            "resumed_from": resume_from.name if resume_from else None,
            "world_size": world_size(),
            "versions": package_versions(),
        }, indent=2) + "\n")
    except BaseException:
        lock.close()
        raise
    return lock, resume_from


def _on_main(claim: Callable[[], tuple[RunLock | None, Path | None]]) -> tuple[RunLock | None, Path | None]:
    """``claim()`` run on the main process, its checkpoint (or its error) shared with every process; the lock
    it returns stays with the main process (the others get None)."""
    from accelerate.utils import broadcast_object_list

    held, outcome = None, None
    if is_main_process():
        try:
            held, outcome = claim()
        except AlignkitError as err:
            outcome = err
        except Exception as err:
            if world_size() > 1:  # tell the others before failing, or they would wait for the verdict forever
                broadcast_object_list([RunDirError(f"the main process failed to open the run dir: {one_line(err)}")])
            raise
    if world_size() > 1:  # also the barrier that keeps the others from reading the run dir before it is ready
        outcome = broadcast_object_list([outcome])[0]
    if isinstance(outcome, AlignkitError):
        raise outcome
    return held, outcome


def refuse_precious_dir(path: Path, what: str) -> None:
    """A run dir is never the current directory, a directory above it, the home directory (or above it) or
    ``/``: ``--overwrite`` would empty it, and a run would litter it. Checked before anything is written, with
    the rule validation applies (``recipe.shared_directory``), for recipes built in code or older run dirs."""
    if str(path).strip() in ("", "."):
        raise RunDirError(f"{what} is empty or '.': give each run a directory of its own, e.g. runs/my-run")
    resolved = path.expanduser().resolve()
    if (kind := shared_directory(resolved)) is not None:
        raise RunDirError(f"{what} {path} is {kind} ({resolved}): give the run a directory of its own, "
                          "e.g. runs/my-run")


def refuse_foreign_content(path: Path, what: str) -> None:
    """Refuse a directory with content that no alignkit run wrote (no alignkit ``run.json``): nothing in it is
    touched, with or without ``--overwrite``."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {path} is a file, not a directory: choose another {what}")
    if not _has_content(path) or holds_run(path):
        return
    raise RunDirError(f"{what} {path} is not empty and is not an alignkit run (no {RUN_FILE} written by alignkit); "
                      f"alignkit never deletes what it did not write, --overwrite included: choose another {what}")


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds an alignkit run: a ``run.json`` as alignkit writes it (stage, status, versions)."""
    try:
        record = json.loads((path / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and {"stage", "status"} <= record.keys()
            and "alignkit" in (record.get("versions") or {}))


def _has_content(path: Path) -> bool:
    """Whether ``path`` holds anything besides an (empty-handed) lock file."""
    return path.is_dir() and any(child.name != LOCK_FILE for child in path.iterdir())


def _empty_run_dir(path: Path) -> None:
    """Delete a previous run (checked to be one by the caller), keeping the lock file this process holds:
    deleting it would let another run lock a new file of the same name."""
    for child in path.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _decide(path: Path, resolved: dict, *, overwrite: bool, resume: bool) -> Path | None:
    if not _has_content(path):
        return None
    status = json.loads((path / RUN_FILE).read_text())  # refuse_foreign_content has checked it is a run
    if overwrite:
        return None
    if status.get("status") == "complete":
        raise RunDirError(f"output dir {path} holds a finished {status.get('stage')} run "
                          f"({status.get('finished')}); choose another train.output_dir, or pass --overwrite "
                          "to replace it")
    checkpoint = last_checkpoint(path)
    if checkpoint is None:
        return None  # interrupted before its first complete checkpoint: nothing to keep, start again
    saved = yaml.safe_load((path / RECIPE_FILE).read_text()) if (path / RECIPE_FILE).exists() else None
    if saved != resolved and not resume:
        changed = sorted(diff_keys(saved or {}, resolved))
        raise RunDirError(f"output dir {path} holds an unfinished run (last checkpoint {checkpoint.name}) made "
                          f"with a different recipe (changed: {', '.join(changed) or 'unknown'}); pass --resume "
                          "to continue it with this recipe, or --overwrite to start over")
    return checkpoint


@dataclass
class RunLock:
    """An exclusive ``flock`` on ``<dir>/run.lock``, held while a run (or a pipeline) works in the dir.

    The kernel releases it when the holder's process ends, however it ends (a SIGKILL, a lost node's
    process reaped), so a dead run never blocks the next one. The file records the holder (pid, host, since)
    for the message that refuses a second run.
    """

    path: Path
    handle: IO[str] | None = field(default=None, repr=False)

    @classmethod
    def acquire(cls, directory: Path) -> RunLock:
        """Lock ``directory`` now, or raise a RunDirError naming the holder."""
        path = directory / LOCK_FILE
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise RunDirError(f"{directory} is in use by another alignkit run ({holder or 'holder unknown'}); wait "
                              "for it to finish, or choose another output dir") from None
        except OSError as err:  # a file system without flock (some NFS / Lustre mounts): warn, do not block
            logger.warning("cannot lock %s (%s): nothing stops a second run from using it at the same time",
                           directory, err)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {_now()}\n")
        handle.flush()
        return cls(path=path, handle=handle)

    def close(self) -> None:
        """Release the lock (closing the file releases the flock)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None


@contextlib.contextmanager
def locked(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory``'s lock for the ``with`` block (a pipeline's output dir): the main process locks it,
    and every process fails with the same error if another run holds it."""

    def claim():
        refuse_precious_dir(directory, what)
        directory.mkdir(parents=True, exist_ok=True)
        return RunLock.acquire(directory), None

    lock, _ = _on_main(claim)
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


def _write_atomic(path: Path, text: str) -> None:
    """Write through a side file, so a process killed mid-write never leaves half a ``run.json``."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def diff_keys(old: Any, new: Any, prefix: str = "") -> set[str]:
    """The dotted keys whose values differ between two resolved recipes."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: set[str] = set()
        for key in old.keys() | new.keys():
            keys |= diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return keys
    return set() if old == new else {prefix.rstrip(".")}


def package_versions() -> dict[str, str]:
    """Versions of the libraries a run depends on, for reproducing it."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"alignkit": __version__}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions
