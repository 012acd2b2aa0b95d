"""Run directories: never overwrite silently, resume interrupted runs, record what ran.

A run dir holds ``recipe.yaml`` (the resolved recipe), ``run.json`` (status, versions, world size),
``checkpoint-*/`` while training, then the final adapter or model, the tokenizer and ``metrics.json``.

What happens when ``train.output_dir`` already has content:
  * empty or missing                     -> a new run
  * an unfinished alignkit run            -> resumed from its last checkpoint if its recipe is unchanged
                                            (``--resume`` resumes with a changed recipe, e.g. more steps)
  * a finished run, or anything else      -> error, unless ``--overwrite`` (which deletes it first)
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit import __version__
from alignkit.distributed import is_main_process, wait_for_everyone, world_size
from alignkit.errors import RunDirError
from alignkit.recipe import Recipe

logger = logging.getLogger(__name__)

RECIPE_FILE, RUN_FILE, METRICS_FILE = "recipe.yaml", "run.json", "metrics.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class RunDir:
    """An opened run directory and the checkpoint to resume from, if any."""

    path: Path
    resume_from: Path | None = None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if is_main_process():
            (self.path / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str) -> dict[str, Any]:
        return json.loads((self.path / name).read_text())

    def finish(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json`` and mark the run complete (after which it is never resumed)."""
        self.write_json(METRICS_FILE, metrics)
        status = self.read_json(RUN_FILE)
        status.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.write_json(RUN_FILE, status)


def last_checkpoint(path: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``path``, or None.

    The trainer writes ``trainer_state.json`` last, so a checkpoint without it was cut off mid-save
    (the process was killed) and must not be resumed from.
    """
    steps = [
        (int(match.group(1)), child)
        for child in path.glob("checkpoint-*")
        if (match := _CHECKPOINT.match(child.name)) and (child / "trainer_state.json").is_file()
    ]
    return max(steps)[1] if steps else None


def open_run_dir(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> RunDir:
    """Create, resume or refuse ``recipe.output_dir`` (see the module docstring) and record the recipe."""
    path = recipe.output_dir
    resolved = recipe.to_dict()
    # Every process decides from the same files before any process changes them.
    resume_from = _decide(path, resolved, overwrite=overwrite, resume=resume)
    wait_for_everyone()
    if is_main_process():
        if overwrite and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / RECIPE_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
        status = {
            "stage": recipe.stage,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "resumed_from": resume_from.name if resume_from else None,
            "world_size": world_size(),
            "versions": package_versions(),
        }
        (path / RUN_FILE).write_text(json.dumps(status, indent=2) + "\n")
    wait_for_everyone()
    if resume_from:
        logger.info("resuming %s from %s", path, resume_from.name)
    return RunDir(path=path, resume_from=resume_from)


def _decide(path: Path, resolved: dict, *, overwrite: bool, resume: bool) -> Path | None:
    if overwrite or not path.exists() or not any(path.iterdir()):
        return None
    status_file = path / RUN_FILE
    if not status_file.exists():
        raise RunDirError(f"output dir {path} is not empty and is not an alignkit run; choose another "
                          "train.output_dir or pass --overwrite to delete its contents")
    status = json.loads(status_file.read_text())
    if status.get("status") == "complete":
        raise RunDirError(f"output dir {path} holds a finished {status.get('stage')} run "
                          f"({status.get('finished')}); choose another train.output_dir, or pass --overwrite "
                          "to replace it")
    checkpoint = last_checkpoint(path)
    if checkpoint is None:
        return None  # interrupted before its first checkpoint: nothing to keep, start again
    saved = yaml.safe_load((path / RECIPE_FILE).read_text()) if (path / RECIPE_FILE).exists() else None
    if saved != resolved and not resume:
        changed = sorted(diff_keys(saved or {}, resolved))
        raise RunDirError(f"output dir {path} holds an unfinished run (last checkpoint {checkpoint.name}) made "
                          f"with a different recipe (changed: {', '.join(changed) or 'unknown'}); pass --resume "
                          "to continue it with this recipe, or --overwrite to start over")
    return checkpoint


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
