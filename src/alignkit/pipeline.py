"""Pipelines: stage recipes run in order as one job (``alignkit pipeline RECIPE``).

A pipeline recipe has ``stage: pipeline``, an ``output_dir`` for its report, and ``steps``: each a ``name``
and a ``recipe`` (a file, relative to the pipeline file, or a recipe written inline), with optional
``overrides`` (``key: value``, as on the command line). A later step names an earlier step's run dir as
``${<name>.output}``, e.g. ``model.name_or_path: ${sft.output}``::

    stage: pipeline
    output_dir: runs/my-pipeline
    steps:
      - {name: sft, recipe: sft.yaml}
      - {name: rm, recipe: rm.yaml, overrides: {model.name_or_path: "${sft.output}"}}

Every step is validated before the first one starts. Running a pipeline again skips the steps whose run
dir is complete and resumes an interrupted one from its last checkpoint (the run dir rules of
``alignkit.runs.rundir``), so a killed or preempted pipeline is continued by running the same command.
Command-line overrides address a step by name: ``sft.train.max_steps=100``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit import distributed
from alignkit.errors import RecipeError, RunDirError
from alignkit.recipe.loading import Recipe, apply_override, check_output_dir, deep_merge, load_raw, validate
from alignkit.runs import reports
from alignkit.runs.rundir import METRICS_FILE, RECIPE_FILE, RUN_FILE, diff_keys, locked
from alignkit.stages import training
from alignkit.suggest import did_you_mean

logger = logging.getLogger(__name__)

PIPELINE_STAGE = "pipeline"
PIPELINE_KEYS = ("stage", "output_dir", "steps")
STEP_KEYS = ("name", "recipe", "overrides")
PIPELINE_FILE = "pipeline.json"
REFERENCE = re.compile(r"\$\{([^}.]+)\.output\}")
# Metrics that describe the run rather than what it learned, left out of the report's table.
BOOKKEEPING = ("model/", "run/", "train/runtime", "train/global_step", "train/global_batch_size")


@dataclass
class Step:
    name: str
    recipe: Recipe


@dataclass
class Pipeline:
    source: Path
    output_dir: Path
    steps: list[Step] = field(default_factory=list)


def is_pipeline(path: str | Path) -> bool:
    """Whether the recipe file at ``path`` is a pipeline."""
    return load_raw(Path(path)).get("stage") == PIPELINE_STAGE


def load_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> Pipeline:
    """Read and validate the pipeline at ``path`` and every step in it. ``overrides`` are ``step.key=value``
    (or ``output_dir=...`` for the pipeline itself)."""
    path = Path(path)
    raw = load_raw(path)
    for key in raw:
        if key not in PIPELINE_KEYS:
            raise RecipeError(f"{path}: unknown key '{key}' in a pipeline.{did_you_mean(key, PIPELINE_KEYS)}")
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise RecipeError(f"{path}: a pipeline needs 'steps': a list of {{name, recipe}}")
    names = [step.get("name") if isinstance(step, dict) else None for step in steps_raw]
    by_step: dict[str, list[str]] = {}
    declared = raw.get("output_dir")
    if declared is not None and not isinstance(declared, str):
        raise RecipeError(f"{path}: 'output_dir' expects a directory path, got {declared!r}")
    output_dir = Path(declared if declared is not None else Path("runs") / path.stem)
    for override in overrides:
        key, _, value = override.partition("=")
        step, _, rest = key.partition(".")
        if key == "output_dir":
            output_dir = Path(value)
        elif step in names and rest:
            by_step.setdefault(step, []).append(f"{rest}={value}")
        else:
            raise RecipeError(f"bad override '{override}': a pipeline takes <step>.<key>=value with a step of "
                              f"{', '.join(map(str, names))}{did_you_mean(step, [str(n) for n in names])}")
    try:
        check_output_dir(str(output_dir), "output_dir")  # the pipeline's report goes there
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    pipeline = Pipeline(source=path, output_dir=output_dir)
    outputs: dict[str, str] = {}
    for index, entry in enumerate(steps_raw):
        where = f"{path}: step {index + 1}"
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: expected {{name, recipe, overrides}}, got {entry!r}")
        for key in entry:
            if key not in STEP_KEYS:
                raise RecipeError(f"{where}: unknown key '{key}'.{did_you_mean(key, STEP_KEYS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise RecipeError(f"{where}: 'name' must be letters, digits, '-' or '_', got {name!r}")
        if name in outputs:
            raise RecipeError(f"{where}: two steps are called '{name}'")
        recipe = _load_step(path, name, entry, outputs, by_step.get(name, []), output_dir)
        run_dir = str(recipe.output_dir)
        if run_dir in outputs.values():
            raise RecipeError(f"{where}: '{name}' writes {run_dir}, as an earlier step does; give it its own "
                              "train.output_dir")
        if recipe.output_dir.resolve() == output_dir.resolve():
            raise RecipeError(f"{where}: '{name}' writes {run_dir}, the pipeline's own output_dir (its report); "
                              "give the step its own train.output_dir")
        outputs[name] = run_dir
        pipeline.steps.append(Step(name=name, recipe=recipe))
    return pipeline


def _load_step(path: Path, name: str, entry: dict, outputs: dict[str, str], overrides: list[str],
               output_dir: Path) -> Recipe:
    where = f"{path}: step '{name}'"
    source = entry.get("recipe")
    if isinstance(source, str):
        step_path = path.parent / source
        raw = load_raw(step_path)
    elif isinstance(source, dict):
        step_path = path
        inline = _substitute(dict(source), outputs, where)
        parent = inline.pop("extends", None)
        own_run_dir = (inline.get("train") or {}).get("output_dir")
        raw = deep_merge(load_raw(path.parent / parent), inline) if parent else inline
        # An inline step writes under the pipeline's output dir unless it names a run dir itself (not one
        # inherited through `extends`, which would be the shipped recipe's own run dir).
        raw.setdefault("train", {})["output_dir"] = own_run_dir or str(output_dir / name)
    else:
        raise RecipeError(f"{where}: 'recipe' must be a recipe file or a recipe written inline")
    step_overrides = [f"{key}={_as_override_text(_substitute(value, outputs, where))}"
                      for key, value in (entry.get("overrides") or {}).items()]
    for override in [*step_overrides, *overrides]:
        apply_override(raw, override)
    try:
        return validate(raw, source=step_path)
    except RecipeError as err:
        raise RecipeError(f"{where}: {str(err).removeprefix(f'{step_path}: ')}") from None


def _as_override_text(value: Any) -> str:
    """A YAML value as the command line would write it: text as is, anything else in JSON (valid YAML:
    null, true, numbers, lists and mappings)."""
    return value if isinstance(value, str) else json.dumps(value)


def _substitute(value: Any, outputs: dict[str, str], where: str) -> Any:
    """``${step.output}`` replaced by that earlier step's run dir, in strings, lists and mappings."""
    if isinstance(value, dict):
        return {key: _substitute(item, outputs, where) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, outputs, where) for item in value]
    if not isinstance(value, str):
        return value

    def output_of(match: re.Match) -> str:
        step = match.group(1)
        if step not in outputs:
            earlier = ", ".join(outputs) or "none"
            raise RecipeError(f"{where}: ${{{step}.output}} names no earlier step (earlier steps: {earlier})")
        return outputs[step]

    return REFERENCE.sub(output_of, value)


def run_status(run_dir: Path) -> str | None:
    """``complete``, ``running`` (started, not finished: resumable) or None (not started)."""
    status_file = run_dir / RUN_FILE
    if not status_file.is_file():
        return None
    return json.loads(status_file.read_text()).get("status")


def run_pipeline(pipeline: Pipeline, *, overwrite: bool = False, resume: bool = False) -> dict[str, dict]:
    """Run the steps in order, skipping complete ones; write the pipeline's report. Returns each step's
    metrics by name.

    The pipeline's output dir is locked for the whole pipeline, and each step's run dir while the step runs
    (a second pipeline or run into either is refused). ``overwrite`` replaces the steps' previous runs, never
    a directory that holds no alignkit run (see :mod:`alignkit.runs.rundir`).
    """
    _refuse_foreign_report(pipeline.output_dir)
    with locked(pipeline.output_dir, "the pipeline's output_dir"):
        return _run_steps(pipeline, overwrite=overwrite, resume=resume)


def _refuse_foreign_report(output_dir: Path) -> None:
    """The pipeline writes report.md and pipeline.json into its output dir: a report.md there that no pipeline
    wrote (no pipeline.json beside it) is the user's, and is not overwritten."""
    if (output_dir / "report.md").exists() and not (output_dir / PIPELINE_FILE).is_file():
        raise RunDirError(f"the pipeline's output_dir {output_dir} holds a report.md that no alignkit pipeline "
                          f"wrote (no {PIPELINE_FILE} beside it); choose another output_dir")


def _run_steps(pipeline: Pipeline, *, overwrite: bool, resume: bool) -> dict[str, dict]:
    results: dict[str, dict] = {}
    outcomes: dict[str, str] = {}
    for step in pipeline.steps:
        run_dir = step.recipe.output_dir
        status = run_status(run_dir)
        if status == "complete" and not overwrite:
            _check_same_recipe(step)
            logger.info("pipeline step '%s': %s is complete, skipped", step.name, run_dir)
            results[step.name] = json.loads((run_dir / METRICS_FILE).read_text())
            outcomes[step.name] = "complete before, skipped"
            continue
        logger.info("pipeline step '%s': %s %s", step.name, "resuming" if status else "running", run_dir)
        results[step.name] = training.run_stage(step.recipe, overwrite=overwrite, resume=resume)
        outcomes[step.name] = "resumed and completed" if status and not overwrite else "ran"
    report = render_report(pipeline, results, outcomes)
    distributed.write_text(pipeline.output_dir / "report.md", report)
    distributed.write_text(pipeline.output_dir / PIPELINE_FILE, json.dumps(
        {"source": str(pipeline.source), "steps": [{"name": s.name, "stage": s.recipe.stage,
                                                    "run_dir": str(s.recipe.output_dir),
                                                    "outcome": outcomes[s.name]} for s in pipeline.steps],
         "metrics": results}, indent=2, default=str) + "\n")
    return results


def _check_same_recipe(step: Step) -> None:
    """A complete run is skipped only if the step's recipe is the one that made it; otherwise the user changed
    the step and would silently get the old result."""
    import yaml

    saved_file = step.recipe.output_dir / RECIPE_FILE
    saved = yaml.safe_load(saved_file.read_text()) if saved_file.is_file() else None
    resolved = step.recipe.to_dict()
    if saved is not None and saved != resolved:
        changed = ", ".join(sorted(diff_keys(saved, resolved))) or "unknown"
        raise RunDirError(f"pipeline step '{step.name}': {step.recipe.output_dir} is complete but was made with a "
                          f"different recipe (changed: {changed}); pass --overwrite to run every step again, or "
                          "give this step another train.output_dir")


def render_report(pipeline: Pipeline, results: dict[str, dict], outcomes: dict[str, str]) -> str:
    """Markdown: each step's stage, run dir and what happened this time; then per step its measures before and
    after, its charts (linked from the step's run dir) and every metric."""
    lines = [f"# Pipeline {pipeline.source.name}", "", "| step | stage | run dir | this run |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.recipe.stage} | `{s.recipe.output_dir}` | {outcomes[s.name]} |"
              for s in pipeline.steps]
    for step in pipeline.steps:
        run_dir = step.recipe.output_dir
        metrics = {key: value for key, value in results[step.name].items()
                   if not key.startswith(BOOKKEEPING) and isinstance(value, (int, float))}
        lines += ["", f"## {step.name} ({step.recipe.stage})", ""]
        lines += reports.render_changes(reports.before_and_after(results[step.name]))
        charts = [chart for chart in reports.CHARTS if (run_dir / f"{chart.name}.png").is_file()]
        if charts:
            lines.append("")
            lines += [f"![{step.name}: {chart.name}]({_relative(run_dir / f'{chart.name}.png', pipeline.output_dir)})"
                      for chart in charts]
        if (run_dir / reports.REPORT_FILE).is_file():
            lines += ["", f"Details: `{run_dir / reports.REPORT_FILE}`."]
        lines += ["", *reports.render_metrics(metrics)]
    return "\n".join(lines) + "\n"


def _relative(path: Path, start: Path) -> str:
    """``path`` as a link from a file in ``start`` (markdown viewers resolve links from the file's folder)."""
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
