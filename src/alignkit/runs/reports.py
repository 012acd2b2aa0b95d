"""The run dir's ``report.md`` and PNG charts of its curves, written when a stage finishes.

Every stage leaves ``log_history.json`` in its run dir: a list of logged entries, each with a ``step``
(the trainer's ``state.log_history`` for TRL stages; one entry per update for PPO, per improve step or
iteration for ReST and RLAIF). The report reads that file and ``metrics.json``; nothing here knows a stage.

report.md holds:
  * what ran (stage, model, adapter, data rows, steps, time);
  * **before and after**: every measure the run has at both ends: ``<name>_start`` against ``<name>_end`` or
    ``<name>`` in metrics.json (the training loss, PPO's held-out reward, and with ``train.eval_on_start:
    true`` the trainer's held-out measures before the first step, e.g. ``rm/accuracy_start``), and
    ``compare/<metric>`` (the comparison model: the base, or the run it started from) against ``eval/<metric>``;
  * the charts (``loss.png``, ``reward.png``, ``kl.png``, ``accuracy.png``, ``margin.png``: those the log has);
  * the generation evaluation (``evaluation.md``, when the stage evaluated by generation) and every metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit import distributed
from alignkit.recipe.settings import is_run_with_adapter
from alignkit.runs.plots import write_line_plot

HISTORY_FILE, EVALUATION_FILE, REPORT_FILE = "log_history.json", "evaluation.md", "report.md"


@dataclass(frozen=True)
class Chart:
    """One PNG chart: the log-history keys it draws (those present), under a file name and title."""

    name: str
    title: str
    ylabel: str
    keys: tuple[str, ...]


CHARTS = (
    Chart("loss", "Loss", "loss", ("loss", "eval_loss")),
    Chart("reward", "Reward", "reward", ("reward", "sample_reward", "eval_reward", "eval_sampled_reward")),
    Chart("kl", "KL to the reference", "KL (nats)", ("kl", "eval_kl")),
    Chart("accuracy", "Accuracy", "accuracy", ("accuracy", "eval_accuracy", "rewards/accuracies",
                                               "eval_rewards/accuracies", "mean_token_accuracy",
                                               "eval_mean_token_accuracy")),
    Chart("margin", "Reward margin (chosen - rejected)", "margin", ("margin", "eval_margin", "rewards/margins",
                                                                   "eval_rewards/margins")),
)


@dataclass(frozen=True)
class Change:
    """One measure at the start and at the end of a run."""

    name: str
    before: float
    after: float
    source: str  # where "before" comes from


def write_history(run_path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Save the run's log history (entries with a ``step``) as ``log_history.json``."""
    distributed.write_text(run_path / HISTORY_FILE, json.dumps(list(history), indent=1, default=float) + "\n")


def read_history(run_path: Path) -> list[dict[str, Any]]:
    path = run_path / HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def write_charts(run_path: Path, history: Sequence[dict[str, Any]]) -> list[str]:
    """One PNG per chart in ``CHARTS`` that the history has values for; the file names written."""
    written = []
    for chart in CHARTS:
        series = {}
        for key in chart.keys:
            entries = [e for e in history if _is_number(e.get(key)) and _is_number(e.get("step"))]
            if entries:
                series[key] = ([e["step"] for e in entries], [float(e[key]) for e in entries])
        if series and write_line_plot(run_path / f"{chart.name}.png", chart.title, series, ylabel=chart.ylabel):
            written.append(f"{chart.name}.png")
    return written


def before_and_after(metrics: dict[str, Any]) -> list[Change]:
    """Every measure the run has at its start and its end (see the module docstring)."""
    changes = []
    for key, value in metrics.items():
        name = key.removesuffix("_start")
        after = metrics.get(f"{name}_end", metrics.get(name))
        if key.endswith("_start") and _is_number(value) and _is_number(after):
            changes.append(Change(name, float(value), float(after), "the start of the run"))
    for key, value in metrics.items():
        name = "eval/" + key.removeprefix("compare/")
        if key.startswith("compare/") and _is_number(value) and _is_number(metrics.get(name)):
            changes.append(Change(name, float(value), float(metrics[name]), "the comparison model"))
    return changes


def write_report(run_path: Path, stage: str, recipe: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Write ``report.md`` and the charts for a finished run (the main process writes; see the module doc)."""
    if not distributed.is_main_process():
        return
    history = read_history(run_path)
    charts = write_charts(run_path, history)
    (run_path / REPORT_FILE).write_text(render(run_path, stage, recipe, metrics, charts))


def render(run_path: Path, stage: str, recipe: dict[str, Any], metrics: dict[str, Any],
           charts: Sequence[str]) -> str:
    """The markdown of report.md."""
    lines = [f"# {stage}: `{run_path}`", "", *_summary(recipe, metrics, run_path), ""]
    lines += ["## Before and after", ""] + render_changes(before_and_after(metrics))
    if charts:
        lines += ["", "## Curves", ""] + [f"![{name[:-4]}]({name})" for name in charts]
    evaluation = run_path / EVALUATION_FILE
    if evaluation.is_file():  # its headings go one level down, under this report's
        lines += ["", *("#" + line if line.startswith("#") else line
                        for line in evaluation.read_text().splitlines())]
    lines += ["", "## Metrics", "", *render_metrics(metrics)]
    tensorboard = run_path / "runs"
    if tensorboard.is_dir():
        lines += ["", f"TensorBoard: `tensorboard --logdir {tensorboard}`."]
    return "\n".join(lines) + "\n"


def render_changes(changes: Sequence[Change]) -> list[str]:
    """A before / after / change table, or a line saying why there is none."""
    if not changes:
        return ["Nothing was measured at both ends of this run (set `train.eval_on_start: true` to evaluate the "
                "held-out set before the first step, or add an `evaluate:` section with `compare`)."]
    lines = ["| measure | before | after | change | before is |", "|---|---:|---:|---:|---|"]
    lines += [f"| {c.name} | {c.before:.4f} | {c.after:.4f} | {c.after - c.before:+.4f} | {c.source} |"
              for c in changes]
    return lines


def render_metrics(metrics: dict[str, Any]) -> list[str]:
    """A metric / value table, sorted by name."""
    rows = (f"| {key} | {_number(value)} |" for key, value in sorted(metrics.items()))
    return ["| metric | value |", "|---|---|", *rows]


def _summary(recipe: dict[str, Any], metrics: dict[str, Any], run_path: Path) -> list[str]:
    model = recipe.get("model", {})
    lines = [f"- model: `{model.get('name_or_path')}`"]
    if "learning_rate" in recipe.get("train", {}) or metrics.get("train/global_step") is not None:  # it trains
        method = (recipe.get("adapter") or {}).get("method", "none")
        if method == "none" and model.get("run_adapter") == "continue" and is_run_with_adapter(model["name_or_path"]):
            method = "the run's adapter, trained further"
        lines.append(f"- adapter: {method}")
    data_file = run_path / "data.json"
    if data_file.is_file():
        data = json.loads(data_file.read_text())
        trained = data["train_rows"] if data["train_rows"] is not None else "streamed"
        lines.append(f"- data: {trained} training rows, {data['eval_rows']} held-out rows")
    steps = metrics.get("train/global_step", metrics.get("ppo/updates"))
    if steps is not None:
        lines.append(f"- steps: {steps}")
    if _is_number(metrics.get("train/runtime")):
        lines.append(f"- training time: {metrics['train/runtime']:.0f} s")
    return lines


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else f"`{value}`" if isinstance(value, str) else str(value)
