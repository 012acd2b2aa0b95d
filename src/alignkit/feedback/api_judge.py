"""The pairwise LLM judge behind an OpenAI-compatible endpoint (a hosted model, vLLM, TGI, llama.cpp,
``alignkit serve``).

It asks the questions the local :class:`~alignkit.feedback.llm.LLMJudge` asks (same template, constitution,
option labels, both orders with ``swap``, chain of thought as a second turn), one chat completion each. The
verdict is read, in order of preference:

1. from the ``top_logprobs`` of the answer's first token: P(option 1) normalised over the two labels, the
   calibrated number the local judge reads, when the endpoint returns logprobs and a label is among them;
2. else from the answer's text: the first option label standing as a word decides (1.0 or 0.0);
3. else there is no verdict: the question counts as ``unparseable``, and a pair with no verdict in any order
   gets 0.5 and is skipped (counted) like the local judge's skips.

Every verdict is cached on disk (:mod:`alignkit.feedback.verdicts`) as soon as it arrives, so a repeated or
resumed run asks only for the verdicts it has not paid for. ``stats`` counts requests, retries, cache hits
and how each verdict was read.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.demo.build import cache_dir
from alignkit.feedback.base import JudgeStats, Messages, check_lengths
from alignkit.feedback.endpoint import ChatEndpoint, Refused, Reply
from alignkit.feedback.verdicts import VerdictCache, ask_cached, verdict_key
from alignkit.recipe.settings.judge import JudgeSettings
from alignkit.recipe.settings.judge_text import (
    DEFAULT_CONSTITUTION,
    DEFAULT_TEMPLATE,
    REASONING_INSTRUCTION,
    answer_instruction,
    check_template,
    judge_question,
)

logger = logging.getLogger(__name__)

VERDICT_TOKENS = 16  # room for "Answer 2" and the like where the verdict has to be parsed from the text
TOP_LOGPROBS = 20  # the protocol's maximum: the two labels are nearly always among them


@dataclass
class Verdict:
    """One question's verdict: P(the answer shown first is better), or None, and how it was read."""

    first: float | None
    how: str  # "logprobs", "parsed", "unparseable" or "refused"
    option_mass: float | None = None  # with logprobs: the probability the two labels took together


def read_verdict(reply: Reply, options: Sequence[str]) -> Verdict:
    """The verdict in an endpoint's reply: from its first token's logprobs if a label is among them, else parsed
    from its text (the first label that stands as a word), else unparseable."""
    if reply.first_token_logprobs:
        mass = [sum(math.exp(logprob) for token, logprob in reply.first_token_logprobs if token.strip() == label)
                for label in options]
        if sum(mass) > 0:
            return Verdict(first=mass[0] / sum(mass), how="logprobs", option_mass=sum(mass))
    found = [(match.start(), index) for index, label in enumerate(options)
             for match in [re.search(rf"(?<!\w){re.escape(label)}(?!\w)", reply.content)] if match]
    if found:
        return Verdict(first=1.0 if min(found)[1] == 0 else 0.0, how="parsed")
    return Verdict(first=None, how="unparseable")


@dataclass
class APIJudge:
    """A pairwise judge asking an OpenAI-compatible endpoint. ``compare`` returns P(first is better)."""

    endpoint: ChatEndpoint
    cache: VerdictCache
    template: str = DEFAULT_TEMPLATE
    constitution: str = DEFAULT_CONSTITUTION
    options: tuple[str, str] = ("1", "2")
    swap: bool = True
    chain_of_thought: bool = False
    reasoning_instruction: str = REASONING_INSTRUCTION
    max_new_tokens: int = 256
    stats: JudgeStats = field(default_factory=JudgeStats)

    def __post_init__(self) -> None:
        self.options = tuple(self.options)
        check_template(self.template, self.constitution)

    @classmethod
    def from_settings(cls, settings: JudgeSettings) -> APIJudge:
        """The judge a recipe's ``judge: {api: {...}, ...}`` describes."""
        api = settings.api
        directory = Path(api.cache_dir).expanduser() if api.cache_dir else cache_dir() / "verdicts"
        return cls(endpoint=ChatEndpoint(api), cache=VerdictCache(directory), template=settings.template,
                   constitution=settings.constitution, options=tuple(settings.options), swap=settings.swap,
                   chain_of_thought=settings.chain_of_thought, reasoning_instruction=settings.reasoning_instruction,
                   max_new_tokens=settings.max_new_tokens)

    def compare(self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str]) -> list[float]:
        """Per prompt, the probability that ``first`` is the better answer (0.5 for a pair without a verdict)."""
        check_lengths(prompts, first, second)
        judged = [i for i in range(len(prompts)) if first[i].strip() and second[i].strip()]
        self.stats.skip("empty_answer", len(prompts) - len(judged))
        orders = [(i, first[i], second[i]) for i in judged]
        if self.swap:
            orders += [(i, second[i], first[i]) for i in judged]
        verdicts = self.verdicts([self.question(prompts[i], a, b) for i, a, b in orders])
        straight, swapped = verdicts[:len(judged)], verdicts[len(judged):] or [None] * len(judged)
        preferences = [0.5] * len(prompts)
        biases = []
        for i, shown_first, shown_second in zip(judged, straight, swapped):
            # P(first is better) from each order that has a verdict; shown second, it is 1 - P(shown first).
            readings = [shown_first.first] if shown_first.first is not None else []
            if shown_second is not None and shown_second.first is not None:
                readings.append(1.0 - shown_second.first)
            if not readings:
                refused = "refused" in (shown_first.how, getattr(shown_second, "how", None))
                self.stats.skip("refused" if refused else "unparseable")
                continue
            preferences[i] = sum(readings) / len(readings)
            self.stats.compared += 1
            if len(readings) == 2:
                biases.append((shown_first.first + shown_second.first) / 2 - 0.5)
        if biases:
            self.stats.add_mean("first_position_bias", biases)
        return preferences

    def question(self, prompt: Messages, answer_1: str, answer_2: str) -> str:
        """The first user turn asked about two answers shown in this order."""
        return judge_question(prompt, answer_1, answer_2, template=self.template, constitution=self.constitution,
                              options=self.options, reasoning=self.chain_of_thought,
                              reasoning_instruction=self.reasoning_instruction)

    def verdicts(self, questions: Sequence[str]) -> list[Verdict]:
        """A verdict per question: from the cache, else asked (each distinct question once, ``max_concurrency``
        at a time) and cached as it arrives."""
        verdicts = ask_cached(self.endpoint, self.cache, questions, [self._key(q) for q in questions], self._ask,
                              Verdict, self.stats)
        masses = [v.option_mass for v in verdicts if v.option_mass is not None]
        if masses:
            self.stats.add_mean("option_mass", masses)
        return verdicts

    def _ask(self, question: str) -> Verdict:
        messages = [{"role": "user", "content": question}]
        if self.chain_of_thought:
            reasoning = self.endpoint.chat(messages, max_tokens=self.max_new_tokens)
            if isinstance(reasoning, Refused):
                logger.info("API judge: refused (%d): %s", reasoning.status, reasoning.message)
                return Verdict(first=None, how="refused")
            messages += [{"role": "assistant", "content": reasoning.content.strip()},
                         {"role": "user", "content": answer_instruction(self.options)}]
        logprobs = TOP_LOGPROBS if self.endpoint.settings.logprobs else None
        reply = self.endpoint.chat(messages, max_tokens=VERDICT_TOKENS, top_logprobs=logprobs)
        if isinstance(reply, Refused):
            logger.info("API judge: refused (%d): %s", reply.status, reply.message)
            return Verdict(first=None, how="refused")
        return read_verdict(reply, self.options)

    def _key(self, question: str) -> str:
        thinking = {"max_new_tokens": self.max_new_tokens, "then": answer_instruction(self.options)}
        return verdict_key(model=self.endpoint.settings.model, question=question, options=list(self.options),
                           chain_of_thought=thinking if self.chain_of_thought else None,
                           logprobs=self.endpoint.settings.logprobs, verdict_tokens=VERDICT_TOKENS)
