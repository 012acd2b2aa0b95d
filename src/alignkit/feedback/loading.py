"""``load_judge``: the judge a recipe's ``JudgeSettings`` describe (alignkit.recipe.settings.judge), built; and
``LazyJudge``, which builds it when first asked and shares its work out across processes.

A recipe names a judge in a mapping (``evaluate.judge``, ``rlaif.judge``, ``rest.judge``)::

    judge:
      kind: llm                        # llm | reward_model | rule
      model: runs/demo-judge           # llm and reward_model: a run dir, local dir or hub id
      constitution: The right answer has the words in reverse order.
      swap: true                       # ask in both orders, cancelling position bias

    judge:                             # an LLM judge behind an OpenAI-compatible endpoint (kind llm implied)
      api: {base_url: http://127.0.0.1:8000/v1, model: runs/demo-judge, api_key_env: JUDGE_API_KEY}
      swap: true

    judge: {kind: rule, function: alignkit.demo.rewards:reversal_reward}
    judge: runs/demo-rm                # short for {kind: reward_model, model: runs/demo-rm}

Nothing is loaded until ``load_judge`` runs, so a recipe validates without touching a model.
"""

from __future__ import annotations

from alignkit.distributed import map_shared
from alignkit.feedback.api_judge import APIJudge
from alignkit.feedback.base import Judge, JudgeStats
from alignkit.feedback.llm import LLMJudge
from alignkit.feedback.reward_model import RewardModel, RewardModelJudge
from alignkit.feedback.rule import RuleJudge
from alignkit.recipe.settings.judge import JudgeSettings


def load_judge(settings: JudgeSettings) -> Judge:
    """The judge ``settings`` describe, with its model loaded or its function imported."""
    if settings.kind == "rule":
        return RuleJudge.from_path(settings.function, temperature=settings.temperature)
    if settings.api is not None:
        return APIJudge.from_settings(settings)
    if settings.kind == "reward_model":
        return RewardModelJudge(RewardModel.load(settings.model, batch_size=settings.batch_size))
    return LLMJudge.load(settings.model, template=settings.template, constitution=settings.constitution,
                         options=tuple(settings.options), swap=settings.swap,
                         chain_of_thought=settings.chain_of_thought,
                         reasoning_instruction=settings.reasoning_instruction, max_new_tokens=settings.max_new_tokens,
                         batch_size=settings.batch_size, max_length=settings.max_length)


class LazyJudge:
    """The judge ``settings`` describe, loaded the first time it is asked to compare (a resumed run whose pairs
    are all judged never loads it). With several processes every one passes the same pairs (the stages judge
    pairs built from gathered answers): each judges its block of them and all get every preference;
    ``take_stats`` adds up their counts."""

    def __init__(self, settings: JudgeSettings) -> None:
        self.settings = settings
        self.judge: Judge | None = None

    def compare(self, prompts, first, second) -> list[float]:
        """The loaded judge's ``compare``, shared out across the processes (which pass the same pairs)."""
        if self.judge is None:
            self.judge = load_judge(self.settings)
        return map_shared(self.judge.compare, list(prompts), list(first), list(second))

    def take_stats(self) -> dict[str, float]:
        """The judge's counts since the last call, over every process (compared, skipped by reason,
        diagnostics), then reset. Every process must call it."""
        from accelerate.utils import gather_object  # accelerate loads torch: only when a run gathers

        stats = getattr(self.judge, "stats", None)  # alignkit's judges count what they skip; a Judge need not
        if stats is None:
            return {}
        summary = JudgeStats.merged(gather_object([stats])).summary()  # each process's own counts
        self.judge.stats = type(stats)()
        return summary
