"""A judge as a recipe names it (``evaluate.judge``, ``rlaif.judge``, ``rest.judge``): plain data;
``alignkit.feedback.load_judge`` builds the judge it describes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignkit.recipe.settings.endpoint import EndpointSettings
from alignkit.recipe.settings.judge_text import (
    DEFAULT_CONSTITUTION,
    DEFAULT_TEMPLATE,
    REASONING_INSTRUCTION,
    check_template,
)
from alignkit.recipe.settings.reward import RewardSource

JudgeKind = Literal["llm", "reward_model", "rule"]


@dataclass
class JudgeSettings:
    """Which judge compares two answers, and how (see alignkit.feedback)."""

    SHORTHAND_FIELD = "model"  # `judge: runs/demo-rm` is short for `judge: {model: runs/demo-rm}`

    kind: JudgeKind | None = field(
        default=None,
        metadata={"help": "llm: a language model asked which answer is better (a local model, read from its "
                  "option-token probabilities, or an OpenAI-compatible endpoint, `api`); reward_model: sigmoid of "
                  "the reward difference (Bradley-Terry); rule: a reward function's scores compared. null: from "
                  "what is given (function: rule, api: llm, model: reward_model)."},
    )
    model: str | None = field(
        default=None,
        metadata={"help": "The judge model (kind llm or reward_model): an alignkit run dir, a local dir or a hub id."},
    )
    api: EndpointSettings | None = field(
        default=None,
        metadata={"help": "An LLM judge behind an OpenAI-compatible endpoint: {base_url, model, api_key_env, ...}. The "
                  "judge options (template, constitution, options, swap, chain_of_thought) apply as to a local one."},
    )
    function: str | None = field(
        default=None,
        metadata={"help": "The rule (kind rule): a reward function by import path, module:function, with TRL's "
                  "signature f(prompts, completions, **columns) -> list of floats."},
    )
    constitution: str = field(
        default=DEFAULT_CONSTITUTION,
        metadata={"help": "Principles the LLM judge is asked to judge by; fills {constitution} in the template."},
    )
    template: str = field(
        default=DEFAULT_TEMPLATE,
        metadata={"help": "The LLM judge's question, with {constitution}, {prompt}, {answer_1}, {answer_2}, "
                  "{option_1}, {option_2}; the judge appends 'Reply <option_1> or <option_2>.' itself. Write {{ "
                  "and }} for literal braces."},
    )
    options: list[str] = field(
        default_factory=lambda: ["1", "2"],
        metadata={"help": "The two labels the LLM judge answers with; each must be one token of its vocabulary."},
    )
    swap: bool = field(
        default=True,
        metadata={"help": "LLM judge: ask in both orders and average, cancelling a preference for a position "
                  "(twice the cost)."},
    )
    chain_of_thought: bool = field(
        default=False,
        metadata={"help": "LLM judge: have it explain first (greedy, up to max_new_tokens), then read its verdict."},
    )
    reasoning_instruction: str = field(
        default=REASONING_INSTRUCTION,
        metadata={"help": "LLM judge with chain_of_thought: how the question asks for the explanation that comes "
                  "before the verdict."},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "LLM judge: longest chain-of-thought explanation."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "LLM judge: longer questions are skipped (counted, preference 0.5); null: the tokenizer's "
                  "model_max_length."},
    )
    temperature: float | None = field(
        default=None,
        metadata={"help": "Rule judge: null gives 1 / 0.5 / 0 from comparing the two scores; a temperature T gives "
                  "sigmoid((s1 - s2) / T)."},
    )
    batch_size: int = field(default=16, metadata={"help": "Questions (or answers) per forward pass."})

    def __post_init__(self) -> None:
        if self.kind is None:
            self.kind = "rule" if self.function is not None else "llm" if self.api is not None else "reward_model"
        given = [name for name in ("model", "function", "api") if getattr(self, name) is not None]
        takes = {"rule": ("function",), "reward_model": ("model",), "llm": ("model", "api")}[self.kind]
        wanted = " or ".join(f"'{name}'" for name in takes)
        extra = [f"'{name}'" for name in given if name not in takes]
        if extra:
            raise ValueError(f"a judge of kind '{self.kind}' takes {wanted}, not {', '.join(extra)}")
        if not given:
            raise ValueError(f"a judge of kind '{self.kind}' needs {wanted}")
        if len(given) > 1:
            raise ValueError(f"a judge of kind '{self.kind}' takes 'model' (a local model) or 'api' (an endpoint), "
                             "not both")
        if self.function is not None:
            RewardSource(function=self.function)  # checks the module:function form, with an example
        if len(self.options) != 2 or not all(label.strip() for label in self.options):
            raise ValueError(f"options must be two non-empty labels, got {self.options}")
        if self.options[0] == self.options[1]:
            raise ValueError(f"the two option labels must differ, got '{self.options[0]}' twice")
        check_template(self.template, self.constitution)
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (or null), got {self.temperature}")

    @property
    def label(self) -> str:
        """How reports name this judge: its model or function (LLM judges marked as such)."""
        if self.api is not None:
            return f"{self.api.model} at {self.api.base_url} (LLM judge)"
        if self.kind == "llm":
            return f"{self.model} (LLM judge)"
        return str(self.model if self.kind == "reward_model" else self.function)
