"""A reward from a model behind an OpenAI-compatible endpoint: it rates each answer from 0 to 9, and the
reward is the expected rating / 9, in [0, 1].

The rating is read as the API judge's verdict is (:mod:`alignkit.feedback.api_judge`): from the
``top_logprobs`` of the digit tokens when the endpoint returns them (the expectation over the ten digits,
normalised over their mass), else from the first digit standing alone in the reply, else 0.5 (counted as
unparseable). Ratings are cached on disk like verdicts, so a resumed run pays for none twice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.demo.build import cache_dir
from alignkit.feedback.base import JudgeStats, Messages
from alignkit.feedback.endpoint import ChatEndpoint, Refused, Reply
from alignkit.feedback.verdicts import VerdictCache, ask_cached, verdict_key
from alignkit.recipe.settings.judge_text import DEFAULT_CONSTITUTION
from alignkit.recipe.settings.rating_text import DEFAULT_RATING_TEMPLATE, RATINGS, rating_question
from alignkit.recipe.settings.reward import RewardSource

RATING_TOKENS = 8
TOP_LOGPROBS = 20
NO_RATING = 0.5  # the middle of the scale: no opinion


@dataclass
class Rating:
    """One answer's rating scaled to [0, 1], or None, and how it was read."""

    value: float | None
    how: str  # "logprobs", "parsed", "unparseable" or "refused"


def read_rating(reply: Reply) -> Rating:
    """The rating in an endpoint's reply: the expected digit from the first token's logprobs when a digit is among
    them, else the first digit standing alone in the text, else none."""
    if reply.first_token_logprobs:
        mass = [sum(math.exp(lp) for token, lp in reply.first_token_logprobs if token.strip() == digit)
                for digit in RATINGS]
        if sum(mass) > 0:
            expected = sum(int(digit) * p for digit, p in zip(RATINGS, mass)) / sum(mass)
            return Rating(value=expected / 9, how="logprobs")
    found = re.search(r"(?<!\d)[0-9](?!\d)", reply.content)
    if found:
        return Rating(value=int(found.group()) / 9, how="parsed")
    return Rating(value=None, how="unparseable")


@dataclass
class APIRater:
    """Rates answers with a model behind an endpoint; ``score`` gives rewards in [0, 1]."""

    endpoint: ChatEndpoint
    cache: VerdictCache
    template: str = DEFAULT_RATING_TEMPLATE
    constitution: str = DEFAULT_CONSTITUTION
    stats: JudgeStats = field(default_factory=JudgeStats)

    @classmethod
    def from_source(cls, source: RewardSource) -> APIRater:
        """The rater a ``reward.sources`` entry with ``api:`` describes."""
        api = source.api
        directory = Path(api.cache_dir).expanduser() if api.cache_dir else cache_dir() / "verdicts"
        return cls(endpoint=ChatEndpoint(api), cache=VerdictCache(directory), template=source.template,
                   constitution=source.constitution)

    def score(self, prompts: Sequence[Messages], answers: Sequence[str]) -> list[float]:
        """Each answer's reward: its expected rating / 9 (0.5 where the endpoint gave no rating, counted)."""
        questions = [rating_question(p, a, template=self.template, constitution=self.constitution)
                     for p, a in zip(prompts, answers, strict=True)]
        keys = [verdict_key(kind="rating", model=self.endpoint.settings.model, question=q,
                            logprobs=self.endpoint.settings.logprobs, tokens=RATING_TOKENS) for q in questions]
        ratings = ask_cached(self.endpoint, self.cache, questions, keys, self._ask, Rating, self.stats)
        self.stats.skip("unrated", sum(r.value is None for r in ratings))
        return [NO_RATING if r.value is None else r.value for r in ratings]

    def _ask(self, question: str) -> Rating:
        logprobs = TOP_LOGPROBS if self.endpoint.settings.logprobs else None
        reply = self.endpoint.chat([{"role": "user", "content": question}], max_tokens=RATING_TOKENS,
                                   top_logprobs=logprobs)
        return Rating(value=None, how="refused") if isinstance(reply, Refused) else read_rating(reply)
