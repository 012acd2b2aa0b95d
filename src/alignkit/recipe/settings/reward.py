"""The ``reward`` section of the RL stages (and ``evaluate.reward``): reward models, rule functions and rating
models behind an API, with their weights, as plain data; ``alignkit.feedback.rewards`` loads what they name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from alignkit.recipe.settings.endpoint import EndpointSettings
from alignkit.recipe.settings.judge_text import DEFAULT_CONSTITUTION
from alignkit.recipe.settings.rating_text import DEFAULT_RATING_TEMPLATE, check_rating_template

# module.path:attribute (the attribute may be dotted, e.g. a method of a class in the module)
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class RewardSource:
    """One reward: a reward model, a rule function or a rating model behind an API, with its weight in the sum."""

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
    api: EndpointSettings | None = field(
        default=None,
        metadata={"help": "A model behind an OpenAI-compatible endpoint that rates each answer from 0 to 9: {base_url, "
                  "model, api_key_env, ...}; the reward is the expected rating / 9 (from top_logprobs, else the parsed "
                  "digit; 0.5 when there is neither, counted)."},
    )
    template: str = field(
        default=DEFAULT_RATING_TEMPLATE,
        metadata={"help": "With api: the rating question, with {prompt}, {answer} and {constitution}; the request "
                  "for a 0-9 digit is appended."},
    )
    constitution: str = field(
        default=DEFAULT_CONSTITUTION,
        metadata={"help": "With api: the principles the answer is rated by; fills {constitution}."},
    )
    weight: float = field(default=1.0, metadata={"help": "Weight of this source in the summed reward."})
    batch_size: int = field(default=32, metadata={"help": "Answers scored per forward pass (reward models)."})

    def __post_init__(self) -> None:
        if sum(source is not None for source in (self.model, self.function, self.api)) != 1:
            raise ValueError("give exactly one of 'model' (a reward model), 'function' (module:function) or 'api' (a "
                             "rating model behind an OpenAI-compatible endpoint)")
        check_rating_template(self.template)
        if self.function is not None and not _IMPORT_PATH.match(self.function):
            raise ValueError(f"function '{self.function}' is not an import path of the form module:function "
                             "(e.g. alignkit.demo.rewards:reversal_reward)")

    @property
    def name(self) -> str:
        if self.api is not None:
            return f"api_rating({self.api.model})"
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
