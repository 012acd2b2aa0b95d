"""The ``rest:`` section of a rest recipe: ReST's Grow / Improve schedule (Gulcehre et al. 2023).

    rest:
      grow_steps: 1              # G: sample a fresh dataset from the current policy this many times
      improve_steps: 3           # I: filter + fine-tune passes over each grown dataset
      samples_per_prompt: 4
      filter: threshold          # threshold | percentile | best_of_n
      thresholds: [0.5, 0.8, 1.0]   # one per improve step, rising: the bar goes up as the policy improves

``best_of_n`` keeps each prompt's ``top_k`` highest-rewarded samples (RAFT, best-of-N rejection sampling);
with one improve step per grow step it is the usual iterated rejection-sampling fine-tune.

Samples are scored by the recipe's ``reward:`` section (reward models, rule functions), or, with
``rest.judge``, by a pairwise judge: each sample's score is then its mean preference over the other samples of
its prompt (``alignkit.feedback.round_robin_scores``, in [0, 1]), and a ``reward:`` section, if any, only
monitors the held-out answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignkit.recipe.settings import GenerationSettings, JudgeSettings


def _sampling() -> GenerationSettings:
    return GenerationSettings(do_sample=True, temperature=1.0, max_new_tokens=64)


@dataclass
class RestSettings:
    """ReST's loop: G grow steps (sample and score), each followed by I improve steps (filter, fine-tune)."""

    grow_steps: int = field(
        default=1, metadata={"help": "Grow steps G: each samples a new dataset from the current policy."}
    )
    improve_steps: int = field(
        default=3, metadata={"help": "Improve steps I per grow step: filter the grown samples, fine-tune on them."}
    )
    samples_per_prompt: int = field(default=4, metadata={"help": "Answers sampled per prompt in a grow step."})
    prompts_per_grow: int | None = field(
        default=None,
        metadata={"help": "Prompts sampled in each grow step, drawn afresh from the training prompts every grow step "
                  "(null: all of them)."},
    )
    filter: Literal["threshold", "percentile", "best_of_n"] = field(
        default="threshold",
        metadata={"help": "Which samples an improve step keeps: threshold (reward >= thresholds[i]), percentile "
                  "(reward >= the percentiles[i]-th percentile of the same prompt's samples), best_of_n (each prompt's "
                  "top_k, RAFT)."},
    )
    thresholds: list[float] | None = field(
        default=None, metadata={"help": "filter threshold: the reward bar of each improve step, non-decreasing."}
    )
    percentiles: list[float] | None = field(
        default=None,
        metadata={"help": "filter percentile: per improve step, the percentile (0-100) of a prompt's own sample "
                  "rewards a sample must reach; non-decreasing."},
    )
    top_k: int = field(default=1, metadata={"help": "filter best_of_n: samples kept per prompt."})
    min_reward: float | None = field(
        default=None, metadata={"help": "A floor every kept sample must also reach (any filter; null: none)."}
    )
    deduplicate: bool = field(
        default=True,
        metadata={"help": "Keep one copy of an answer sampled several times for the same prompt, so easy prompts do "
                  "not dominate the fine-tuning set."},
    )
    generation: GenerationSettings = field(
        default_factory=_sampling, metadata={"help": "How grow steps sample (do_sample true; temperature, top_p...)."}
    )
    judge: JudgeSettings | None = field(
        default=None,
        metadata={"help": "Score samples with a pairwise judge instead of the reward section: a sample's score is its "
                  "mean preference over its prompt's other samples, in [0, 1] (null: the reward section scores)."},
    )

    def __post_init__(self) -> None:
        for name in ("grow_steps", "improve_steps", "samples_per_prompt", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.judge is not None and self.samples_per_prompt < 2:
            raise ValueError("a judge ranks a prompt's samples against each other: samples_per_prompt must be >= 2")
        if self.prompts_per_grow is not None and self.prompts_per_grow < 1:
            raise ValueError(f"prompts_per_grow must be >= 1 or null, got {self.prompts_per_grow}")
        if not self.generation.do_sample:
            raise ValueError("generation.do_sample must be true: a grow step samples several different answers")
        schedule_name = {"threshold": "thresholds", "percentile": "percentiles"}.get(self.filter)
        if schedule_name is None:
            return
        schedule = getattr(self, schedule_name)
        if not schedule:
            raise ValueError(f"filter {self.filter} needs {schedule_name}: one per improve step, e.g. "
                             f"{schedule_name}: {[0.5, 0.8, 1.0] if self.filter == 'threshold' else [50, 75, 90]}")
        if len(schedule) != self.improve_steps:
            raise ValueError(f"{schedule_name} has {len(schedule)} values for improve_steps={self.improve_steps}; give "
                             "one per improve step")
        if any(b < a for a, b in zip(schedule, schedule[1:])):
            raise ValueError(f"{schedule_name} must not decrease (ReST raises the bar each improve step), "
                             f"got {schedule}")
        if self.filter == "percentile" and not all(0 <= p <= 100 for p in schedule):
            raise ValueError(f"percentiles must lie in [0, 100], got {schedule}")

    def bar(self, improve_step: int) -> float | None:
        """The threshold or percentile of improve step ``improve_step`` (1-based); None for best_of_n."""
        schedule = self.thresholds if self.filter == "threshold" else self.percentiles
        return None if schedule is None or self.filter == "best_of_n" else float(schedule[improve_step - 1])


@dataclass
class Sample:
    """One grown answer: the index of its prompt in the grow step, the prompt, the answer and its reward."""

    prompt_index: int
    prompt: list[dict[str, str]]
    completion: str
    reward: float


def keep_samples(samples: list[Sample], settings: RestSettings, improve_step: int) -> list[Sample]:
    """The samples improve step ``improve_step`` (1-based) fine-tunes on, in their original order.

    Empty answers are never kept (there is nothing to imitate), nor are rewards that are not numbers.
    """
    by_prompt: dict[int, list[Sample]] = {}
    for sample in samples:
        if sample.completion.strip() and sample.reward == sample.reward:  # NaN != NaN
            by_prompt.setdefault(sample.prompt_index, []).append(sample)
    kept: set[int] = set()
    bar = settings.bar(improve_step)
    for group in by_prompt.values():
        if settings.filter == "threshold":
            chosen = [s for s in group if s.reward >= bar]
        elif settings.filter == "percentile":
            cut = _percentile(sorted(s.reward for s in group), bar)
            chosen = [s for s in group if s.reward >= cut]
        else:  # best_of_n: the top_k, ties broken by sampling order
            chosen = sorted(group, key=lambda s: -s.reward)[:settings.top_k]
        if settings.min_reward is not None:
            chosen = [s for s in chosen if s.reward >= settings.min_reward]
        if settings.deduplicate:
            chosen = list({s.completion.strip(): s for s in reversed(chosen)}.values())
        kept.update(id(s) for s in chosen)
    return [s for s in samples if id(s) in kept]


def _percentile(ordered: list[float], percentile: float) -> float:
    """Linear-interpolation percentile of sorted values (numpy's default method)."""
    position = (len(ordered) - 1) * percentile / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
