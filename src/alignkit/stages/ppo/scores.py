"""From the reward sources' rewards to the score PPO trains on (the reward at an answer's last token).

For every answer of a rollout batch, in this order:

  1. each source's reward (``reward.sources``, in the recipe's order);
  2. ``normalize_reward_per_source``: each source's reward minus that source's running mean, over its running
     standard deviation, so that sources on different scales (a reward model's logits, a 0/1 rule) weigh in by
     their ``weight`` alone;
  3. the weighted sum of the sources (``reward.sources[*].weight``);
  4. ``normalize_reward``: the sum minus its running mean, over its running standard deviation;
  5. ``missing_eos_penalty``: subtracted from the answers that did not stop (no EOS, stop token or stop string);
  6. ``reward_clip_range``: clamped into [low, high], so no score PPO trains on is outside it.

The running statistics are those of every answer scored so far in the run, the current batch included (every
process's answers: the scorer is given the whole batch), and are saved in the checkpoints, so a resumed run
normalises as the uninterrupted run would. The logged ``reward`` stays the weighted sum of the sources' own
rewards less the missing-EOS penalty (step 3 without normalisation, then step 5): the run's reward curve keeps
the sources' scale; ``score`` is the mean of what PPO trains on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.feedback.rewards import RewardFunction, source_rewards
from alignkit.stages.ppo import core

# Below this standard deviation a column counts as constant: normalising leaves only its offset from the mean
# (0), instead of dividing float noise by almost nothing.
MIN_STD = 1e-8


class RunningMoments:
    """Mean and variance of every row seen so far, per column, merged batch by batch (Chan et al. 1979: exact,
    and stable however many batches), in float64."""

    def __init__(self, columns: int):
        self.count = 0
        self.mean = torch.zeros(columns, dtype=torch.float64)
        self.sum_of_squares = torch.zeros(columns, dtype=torch.float64)  # of the deviations from the mean

    def update(self, values: torch.Tensor) -> None:
        """Add the rows of ``values`` (rows, columns)."""
        values = values.detach().to("cpu", torch.float64)
        if not torch.isfinite(values).all():
            raise ValueError("a reward is NaN or infinite (a reward function returned None or a non-number), and "
                             "normalize_reward needs a number for every answer")
        count = values.shape[0]
        if count == 0:
            return
        batch_mean = values.mean(dim=0)
        batch_squares = ((values - batch_mean) ** 2).sum(dim=0)
        total = self.count + count
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * count / total
        self.sum_of_squares = self.sum_of_squares + batch_squares + delta**2 * self.count * count / total
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation of everything seen (0 before anything)."""
        return (self.sum_of_squares / max(self.count, 1)).sqrt()

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (rows, columns) standardised with the running statistics; a constant column becomes 0."""
        mean, std = self.mean.to(values), self.std.to(values)
        return torch.where(std > MIN_STD, (values - mean) / std.clamp(min=MIN_STD), torch.zeros_like(values))

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers (for trainer_state.json)."""
        return {"count": self.count, "mean": self.mean.tolist(), "sum_of_squares": self.sum_of_squares.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["mean"]) != len(self.mean):
            raise ValueError(f"saved reward statistics are for {len(state['mean'])} sources, this run has "
                             f"{len(self.mean)}")
        self.count = int(state["count"])
        self.mean = torch.tensor(state["mean"], dtype=torch.float64)
        self.sum_of_squares = torch.tensor(state["sum_of_squares"], dtype=torch.float64)


class RewardSources:
    """The ``reward.sources`` of a run as PPO calls them: each source's rewards for a batch of answers."""

    def __init__(self, functions: Sequence[RewardFunction], weights: Sequence[float]):
        if len(functions) != len(weights):
            raise ValueError(f"{len(functions)} reward functions and {len(weights)} weights")
        self.functions, self.weights = list(functions), torch.tensor(list(weights), dtype=torch.float64)
        self.names = _unique([function.__name__ for function in self.functions])

    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list]) -> tuple[list[float],
                                                                                               dict[str, float]]:
        """The recipe's reward of every answer (the weighted sum of the sources', nothing normalised) and each
        source's mean, by name."""
        rewards = self.per_source(prompts, completions, columns)
        means = dict(zip(self.names, rewards.mean(dim=0).tolist()))
        return self.weighted_sum(rewards).tolist(), means

    def per_source(self, prompts: list, completions: list[str], columns: dict[str, list]) -> torch.Tensor:
        """Every source's reward of every answer, (answers, sources), float64."""
        rewards = source_rewards(self.functions, prompts, completions, columns)
        return torch.tensor(rewards, dtype=torch.float64).reshape(len(self.functions), len(completions)).T

    def weighted_sum(self, rewards: torch.Tensor) -> torch.Tensor:
        """The recipe's reward: the sources' rewards (answers, sources) summed with their weights."""
        return rewards @ self.weights.to(rewards)


@dataclass
class Scores:
    """What the scorer makes of a batch's rewards; tensors are (answers,)."""

    scores: torch.Tensor       # what PPO trains on (steps 1-6)
    raw_rewards: torch.Tensor  # the weighted sum of the sources' own rewards less the missing-EOS penalty (logged)
    clipped: torch.Tensor      # whether reward_clip_range changed the score (bool)


class Scorer:
    """Steps 2-6 of the module docstring, with the running statistics they need (``state_dict`` for
    checkpoints)."""

    def __init__(self, sources: RewardSources, *, normalize_reward: bool = False,
                 normalize_reward_per_source: bool = False, missing_eos_penalty: float | None = None,
                 reward_clip_range: Sequence[float] | None = None):
        self.sources = sources
        self.normalize_reward, self.normalize_reward_per_source = normalize_reward, normalize_reward_per_source
        self.missing_eos_penalty = missing_eos_penalty
        self.clip_range = tuple(reward_clip_range) if reward_clip_range is not None else None
        self.per_source = RunningMoments(len(sources.names))
        self.total = RunningMoments(1)

    def __call__(self, rewards: torch.Tensor, stopped: torch.Tensor) -> Scores:
        """The scores of a whole rollout batch from each source's rewards (answers, sources) and whether each answer
        stopped; updates the running statistics with this batch first."""
        rewards = rewards.to(torch.float64)
        combined = rewards
        if self.normalize_reward_per_source:
            self.per_source.update(rewards)
            combined = self.per_source.normalize(rewards)
        summed = self.sources.weighted_sum(combined)
        if self.normalize_reward:
            self.total.update(summed[:, None])
            summed = self.total.normalize(summed[:, None])[:, 0]
        stopped = stopped.to(rewards.device)
        scores = core.apply_missing_eos_penalty(summed, stopped, self.missing_eos_penalty)
        clipped = torch.zeros_like(scores, dtype=torch.bool)
        if self.clip_range is not None:
            low, high = self.clip_range
            clipped = (scores < low) | (scores > high)
            scores = scores.clamp(low, high)
        logged = core.apply_missing_eos_penalty(self.sources.weighted_sum(rewards), stopped, self.missing_eos_penalty)
        return Scores(scores=scores.float(), raw_rewards=logged.float(), clipped=clipped)

    def statistics(self) -> dict[str, float]:
        """The running statistics in use, for the log."""
        stats: dict[str, float] = {}
        if self.normalize_reward_per_source:
            for name, mean, std in zip(self.sources.names, self.per_source.mean.tolist(),
                                       self.per_source.std.tolist()):
                stats[f"reward/{name}/running_mean"], stats[f"reward/{name}/running_std"] = mean, std
        if self.normalize_reward:
            stats["reward/running_mean"], stats["reward/running_std"] = float(self.total.mean), float(self.total.std)
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"per_source": self.per_source.state_dict(), "total": self.total.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.per_source.load_state_dict(state["per_source"])
        self.total.load_state_dict(state["total"])


def _unique(names: list[str]) -> list[str]:
    """``names`` with repeats told apart by a suffix (two sources calling the same function log separately)."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique
