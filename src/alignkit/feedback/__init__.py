"""Feedback on generated answers, the one home of "scoring an answer": reward functions (rule functions and
reward models, weighted), reward models as scorers, and judges that compare two answers.

Every judge has ``compare(prompts, first, second) -> list[float]``: per prompt (a message list), the
probability that ``first`` is the better answer, 0.5 for a tie. They are used by the evaluation's win rate,
the ``rlaif`` stage (labelling pairs) and the ``rest`` stage (ranking samples).

- ``RewardModelJudge``: a reward model (``RewardModel.load(run_dir)``), ``sigmoid(r_first - r_second)``.
- ``LLMJudge``: a causal LM asked which answer is better under a constitution, read from the
  probabilities of the option tokens, in both orders to cancel position bias.
- ``RuleJudge``: a reward function by import path (TRL's signature), the higher score wins.
- ``APIJudge``: the LLM judge's questions asked of an OpenAI-compatible endpoint, read from the option tokens'
  ``top_logprobs`` or else the parsed verdict, with retries, bounded concurrency and an on-disk verdict cache.

``round_robin_scores`` turns any judge into a scorer of several answers per prompt (each answer's mean
preference over its siblings), which is how ReST ranks samples with a judge.

A recipe describes one with ``JudgeSettings``; ``load_judge`` builds it, ``LazyJudge`` builds it when first
used and shares its work out across the processes of a multi-process launch.

Modules: ``base`` (protocol, stats, win rates), ``rewards`` (a ``reward:`` section's sources as TRL reward
functions), ``reward_model``, ``llm``, ``rule``, ``api_judge`` (with ``endpoint``, the HTTP client, and
``verdicts``, the cache), ``api_reward`` (a rating model behind an endpoint as a reward source), ``loading``
(``load_judge``, ``LazyJudge``), ``revision`` (critique and revise). The settings a recipe writes
(``JudgeSettings``, ``RewardSettings``) and the LLM judge's question text live in
:mod:`alignkit.recipe.settings`, which imports nothing from here. Models and torch load only when a judge or
reward model is used, so importing this package stays cheap.
"""

from alignkit.feedback.api_judge import APIJudge
from alignkit.feedback.base import Judge, JudgeStats, Messages, round_robin_scores, win_rates
from alignkit.feedback.llm import LLMJudge, option_tokens
from alignkit.feedback.loading import LazyJudge, load_judge
from alignkit.feedback.reward_model import RewardModel, RewardModelJudge
from alignkit.feedback.rule import RuleJudge
from alignkit.recipe.settings.judge import JudgeSettings
from alignkit.recipe.settings.judge_text import DEFAULT_CONSTITUTION, DEFAULT_TEMPLATE, judge_question

__all__ = [
    "APIJudge",
    "DEFAULT_CONSTITUTION",
    "DEFAULT_TEMPLATE",
    "Judge",
    "JudgeSettings",
    "JudgeStats",
    "LLMJudge",
    "LazyJudge",
    "Messages",
    "RewardModel",
    "RewardModelJudge",
    "RuleJudge",
    "judge_question",
    "load_judge",
    "option_tokens",
    "round_robin_scores",
    "win_rates",
]
