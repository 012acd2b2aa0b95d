"""The ``evaluate`` section (generation-based evaluation after training) and the generation knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignkit.metrics import METRICS  # the names only: alignkit.metrics loads a metric's code when it scores
from alignkit.recipe.settings.judge import JudgeSettings
from alignkit.recipe.settings.reward import RewardSettings
from alignkit.suggest import did_you_mean


@dataclass
class GenerationSettings:
    """Generation knobs, named as in transformers' GenerationConfig."""

    max_new_tokens: int = field(default=64, metadata={"help": "Upper bound on generated tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy / beam search."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int | None = field(default=None, metadata={"help": "Sample from the k most likely tokens."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling mass."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (1: no beam search)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeating tokens."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per generate() call."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling, so sampled runs repeat."})


@dataclass
class EvaluateSettings:
    """Generation-based evaluation run after training (on data.eval, or the split-off eval set)."""

    metrics: list[str] = field(default_factory=lambda: ["exact_match"], metadata={"help": "Metrics to report."})
    max_samples: int | None = field(default=200, metadata={"help": "Evaluate on at most this many rows."})
    generation: GenerationSettings = field(default_factory=GenerationSettings, metadata={"help": "Generation knobs."})
    metric_options: dict[str, dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "Options per metric, e.g. {rouge: {use_stemmer: true}, bleu: {tokenize: intl}}."},
    )
    compare: str | None = field(
        default=None,
        metadata={"help": "A second model answering the same prompts, shown side by side in report.md: `base` "
                  "(the model before training), a hub id, a local dir or a run dir."},
    )
    report_samples: int = field(default=5, metadata={"help": "Sample prompts shown in report.md."})
    judge: JudgeSettings | None = field(
        default=None,
        metadata={"help": "A judge of the model's answers against the comparison model's (with `compare`) or else "
                  "the references: eval/win_rate, eval/tie_rate, eval/loss_rate. A path or hub id is a reward model "
                  "(an rm run dir); a mapping is any judge: {kind: llm | reward_model | rule, model | function, ...} "
                  "(see alignkit.feedback.JudgeSettings)."},
    )
    reward: RewardSettings | None = field(
        default=None,
        metadata={"help": "Score every model's answers with these reward sources (reward models, rule functions; as "
                  "the RL stages' reward section): eval/reward (and compare/reward) is their mean weighted sum."},
    )
    tie_margin: float = field(
        default=0.0,
        metadata={"help": "Judge preferences within 0.5 +- tie_margin (probabilities that the model's answer is "
                  "better) count as ties in the win rate."},
    )

    def __post_init__(self) -> None:
        for name in self.metrics:
            if name not in METRICS:
                raise ValueError(f"unknown metric '{name}'.{did_you_mean(name, METRICS)} Metrics: {', '.join(METRICS)}")
