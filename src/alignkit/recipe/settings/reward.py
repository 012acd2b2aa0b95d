"""The ``reward`` section of the RL stages (and ``evaluate.reward``): reward models and rule functions with
their weights, as plain data; ``alignkit.feedback.rewards`` loads the functions they name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# module.path:attribute (the attribute may be dotted, e.g. a method of a class in the module)
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class RewardSource:
    """One reward: a reward model or a rule function, with its weight in the sum."""

    model: str | None = field(
        default=None,
        metadata={"help": "Reward model scoring (prompt, answer): an rm run dir, a local directory or a hub id of a "
                  "sequence classifier with one label."},
    )
    function: str | None = field(
        default=None,
        metadata={"help": "A rule reward by import path, module:function (e.g. alignkit.demo.rewards:reversal_reward), "
                  "called as f(prompts, completions, **columns) -> list of floats, TRL's reward-function signature."},
    )
    weight: float = field(default=1.0, metadata={"help": "Weight of this source in the summed reward."})
    batch_size: int = field(default=32, metadata={"help": "Answers scored per forward pass (reward models)."})

    def __post_init__(self) -> None:
        if (self.model is None) == (self.function is None):
            raise ValueError("give exactly one of 'model' (a reward model) or 'function' (module:function)")
        if self.function is not None and not _IMPORT_PATH.match(self.function):
            raise ValueError(f"function '{self.function}' is not an import path of the form module:function "
                             "(e.g. alignkit.demo.rewards:reversal_reward)")

    @property
    def name(self) -> str:
        return self.function.rsplit(":", 1)[1] if self.function else f"reward_model({self.model})"


@dataclass
class RewardSettings:
    """The reward of the RL stages: the weighted sum of its sources."""

    sources: list[RewardSource] = field(
        default_factory=list, metadata={"help": "Reward models and rule functions; the reward is their weighted sum."}
    )

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("give at least one source, e.g. sources: [{function: module:function}]")

    @property
    def weights(self) -> list[float]:
        return [source.weight for source in self.sources]
