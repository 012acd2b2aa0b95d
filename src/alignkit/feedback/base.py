"""What every judge shares: the ``Judge`` protocol, its bookkeeping (``JudgeStats``) and win rates.

A judge compares two answers to the same prompt and returns, per prompt, the *probability* that the first
answer is the better one: 1.0 sure it is, 0.0 sure it is not, 0.5 a tie or no opinion. Probabilities (not
raw score differences) let reward models, rules and LLM judges stand in for one another: a win rate, an
AI-labelled preference pair or its confidence mean the same whichever judge produced them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

Messages = list[dict[str, str]]


class Judge(Protocol):
    """Compares two answers to each prompt."""

    def compare(self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str]) -> list[float]:
        """Per prompt, the probability that ``first`` is better than ``second`` (0.5: a tie)."""
        ...


@dataclass
class JudgeStats:
    """Running counts of a judge: pairs judged, pairs skipped by reason, other totals, and means of diagnostics.

    A skipped pair (an empty answer, a question too long for the judge model...) gets probability 0.5 and is
    counted here rather than raising, so one bad sample never stops an RLAIF or evaluation run.
    """

    compared: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    _sums: dict[str, tuple[float, int]] = field(default_factory=dict, repr=False)

    def skip(self, reason: str, count: int = 1) -> None:
        """Count ``count`` pairs skipped for ``reason``."""
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def count(self, name: str, count: int = 1) -> None:
        """Add ``count`` to the running total reported as ``name`` (requests sent, cache hits...)."""
        self.counts[name] = self.counts.get(name, 0) + count

    def add_mean(self, name: str, values: Sequence[float]) -> None:
        """Fold ``values`` into the running mean reported as ``name``."""
        total, count = self._sums.get(name, (0.0, 0))
        self._sums[name] = (total + sum(values), count + len(values))

    @classmethod
    def merged(cls, parts: Sequence[JudgeStats]) -> JudgeStats:
        """One judge's counts from the counts of its parts (the processes that each judged some pairs)."""
        total = cls()
        for part in parts:
            total.compared += part.compared
            for reason, count in part.skipped.items():
                total.skip(reason, count)
            for name, count in part.counts.items():
                total.count(name, count)
            for name, (value, count) in part._sums.items():
                old_value, old_count = total._sums.get(name, (0.0, 0))
                total._sums[name] = (old_value + value, old_count + count)
        return total

    def summary(self) -> dict[str, float]:
        """``compared``, ``skipped`` (all reasons), ``skipped_<reason>``, every running total and mean."""
        out: dict[str, float] = {"compared": self.compared, "skipped": sum(self.skipped.values())}
        out |= {f"skipped_{reason}": count for reason, count in self.skipped.items()}
        out |= dict(self.counts)
        out |= {name: total / count for name, (total, count) in self._sums.items() if count}
        return out


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large ``|x|``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def check_lengths(prompts: Sequence, first: Sequence, second: Sequence) -> None:
    """Raise ValueError unless there is one first and one second answer per prompt."""
    if not len(prompts) == len(first) == len(second):
        raise ValueError(f"{len(prompts)} prompts but {len(first)} first and {len(second)} second answers")


def round_robin_scores(judge: Judge, prompts: Sequence[Messages], answers: Sequence[str],
                       group_size: int) -> list[float]:
    """Score answers with a pairwise judge: each answer's mean preference over the other answers to its prompt
    (its expected win rate against them, in [0, 1]).

    ``prompts`` / ``answers`` hold ``group_size`` consecutive answers per prompt. Every two answers of a group
    are compared once, in one batch for all groups; two identical answers tie (0.5) without asking the judge.
    This is how ReST and best-of-N rank samples when the recipe names a judge instead of a reward.
    """
    if len(prompts) != len(answers) or group_size < 2 or len(answers) % group_size:
        raise ValueError(f"{len(answers)} answers to {len(prompts)} prompts is not {group_size} (>= 2) per prompt")
    asked = [(i, j) for start in range(0, len(answers), group_size)
             for i in range(start, start + group_size) for j in range(i + 1, start + group_size)
             if answers[i].strip() != answers[j].strip()]
    preferences = judge.compare([prompts[i] for i, _ in asked], [answers[i] for i, _ in asked],
                                [answers[j] for _, j in asked]) if asked else []
    totals = [0.5 * (group_size - 1)] * len(answers)  # every pair starts as a tie
    for (i, j), p in zip(asked, preferences):
        totals[i] += p - 0.5
        totals[j] += 0.5 - p
    return [total / (group_size - 1) for total in totals]


def win_rates(preferences: Sequence[float], tie_margin: float = 0.0) -> dict[str, float]:
    """Win / tie / loss rates of the first answers from a judge's preference probabilities.

    ``p > 0.5 + tie_margin`` is a win, ``p < 0.5 - tie_margin`` a loss, anything in between a tie.
    """
    if not preferences:
        raise ValueError("no comparisons to count")
    wins = sum(p > 0.5 + tie_margin for p in preferences)
    losses = sum(p < 0.5 - tie_margin for p in preferences)
    count = len(preferences)
    return {"win_rate": wins / count, "tie_rate": (count - wins - losses) / count, "loss_rate": losses / count}
