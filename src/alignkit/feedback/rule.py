"""The rule judge: a reward function (TRL's signature) scores both answers; the higher score wins.

Any function usable as a ``reward:`` source works, named by import path, e.g.
``alignkit.demo.rewards:reversal_reward``: ``f(prompts, completions, **columns) -> list[float]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignkit.feedback.base import JudgeStats, Messages, check_lengths, sigmoid
from alignkit.feedback.rewards import load_reward_functions
from alignkit.recipe.settings.reward import RewardSettings, RewardSource


@dataclass
class RuleJudge:
    """A judge from a rule. Without ``temperature`` the preference is hard: 1.0 when the first answer scores
    higher, 0.0 when lower, 0.5 on equal scores. With a temperature ``T`` it is ``sigmoid((s1 - s2) / T)``,
    graded by how far apart the scores are (a small T approaches the hard rule).

    Every answer is scored, empty ones included: the rule decides what an empty answer is worth. A pair the
    rule returns None for (TRL's "does not apply") gets 0.5 and is counted in ``stats.skipped['no_score']``.
    """

    function: Callable[..., list[float]]
    temperature: float | None = None
    stats: JudgeStats = field(default_factory=JudgeStats)

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"a rule judge's temperature must be > 0 (or null for 1 / 0.5 / 0), "
                             f"got {self.temperature}")

    @classmethod
    def from_path(cls, path: str, temperature: float | None = None) -> RuleJudge:
        """The judge of the reward function named ``module:function``, imported and checked as a ``reward:``
        source is (a RecipeError naming what is missing, with a did-you-mean)."""
        [function] = load_reward_functions(RewardSettings(sources=[RewardSource(function=path)]))
        return cls(function=function, temperature=temperature)

    def compare(self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str],
                **columns: Sequence[Any]) -> list[float]:
        """Per prompt, the probability that ``first`` is better; ``columns`` (a reference answer...) are passed
        on to the reward function as keyword lists, as TRL does."""
        check_lengths(prompts, first, second)
        first_scores = self._scores(prompts, first, columns)
        second_scores = self._scores(prompts, second, columns)
        # TRL lets a reward function return None for a sample it does not apply to: no opinion, counted.
        unscored = sum(a is None or b is None for a, b in zip(first_scores, second_scores))
        self.stats.skip("no_score", unscored)
        self.stats.compared += len(prompts) - unscored
        return [0.5 if a is None or b is None else self._preference(a, b) for a, b in zip(first_scores, second_scores)]

    def _scores(self, prompts: Sequence[Messages], answers: Sequence[str], columns: dict) -> list[float | None]:
        scores = self.function(prompts=list(prompts), completions=list(answers), **columns)
        if len(scores) != len(answers):
            name = getattr(self.function, "__name__", "the rule")
            raise ValueError(f"{name} returned {len(scores)} scores for {len(answers)} answers")
        return [None if score is None else float(score) for score in scores]

    def _preference(self, first: float, second: float) -> float:
        if self.temperature is not None:
            return sigmoid((first - second) / self.temperature)
        return 1.0 if first > second else 0.0 if first < second else 0.5
