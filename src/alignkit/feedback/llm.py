"""The pairwise LLM judge: a causal LM asked which of two answers is better, read from its next token.

The question (see :mod:`alignkit.recipe.settings.judge_text`) shows the constitution, the prompt and the two answers
under option labels ("1" and "2"); the judge's preference is the softmax over the log-probabilities of the
two label tokens at the position where its reply starts, not a parsed free-text verdict, so it is a
calibrated number and never fails to parse. Asked in both orders, ``P(first) = (p(first shown first) +
1 - p(second shown first)) / 2`` cancels the model's taste for one position. With chain of thought the
model writes its reasoning first (greedy) and is then asked for the label.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit import generation
from alignkit.feedback.base import JudgeStats, Messages, check_lengths
from alignkit.models import modeling
from alignkit.recipe.settings import GenerationSettings, ModelSettings
from alignkit.recipe.settings.judge_text import (
    DEFAULT_CONSTITUTION,
    DEFAULT_TEMPLATE,
    REASONING_INSTRUCTION,
    answer_instruction,
    check_template,
    judge_question,
)

logger = logging.getLogger(__name__)

# Tokenizers with an unbounded context report model_max_length as a huge sentinel (int(1e30)).
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class OptionTokens:
    """Where the two option labels are read: after ``prefix`` (tokens both labels start with, such as the
    word-boundary marker a byte-level BPE puts before a lone "1"), the token ids ``first`` and ``second``."""

    prefix: tuple[int, ...]
    first: int
    second: int


def option_tokens(tokenizer, options: Sequence[str]) -> OptionTokens:
    """The token ids of the two option labels as the model would write them at the start of its reply.

    Each label must be one token, possibly after shared whitespace tokens; a label that takes several
    tokens, or two labels that become the same token, raise ValueError naming the labels.
    """
    first, second = options
    if first == second:
        raise ValueError(f"the two judge option labels must differ, got '{first}' twice")
    context = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                            add_generation_prompt=True)
    context_ids = _ids(tokenizer, context)
    tails = []
    for label in options:
        ids = _ids(tokenizer, context + label)
        if ids[:len(context_ids)] != context_ids:
            raise ValueError(f"judge option label '{label}' merges with the end of the chat template's reply "
                             "prompt into other tokens; choose another label")
        tails.append(ids[len(context_ids):])
    for label, tail in zip(options, tails):
        prefix = tail[:-1]
        if not tail or tokenizer.decode(prefix).strip():
            pieces = tokenizer.convert_ids_to_tokens(tail)
            raise ValueError(f"judge option label '{label}' is not a single token of the judge's vocabulary (it "
                             f"is written as {len(tail)} tokens: {pieces}); choose labels such as '1' and '2' "
                             "or 'A' and 'B' that are one token each")
    if tails[0][:-1] != tails[1][:-1]:
        pieces = [tokenizer.convert_ids_to_tokens(tail) for tail in tails]
        raise ValueError(f"judge option labels '{first}' and '{second}' start with different tokens "
                         f"({pieces[0]} vs {pieces[1]})")
    if tails[0][-1] == tails[1][-1]:
        raise ValueError(f"judge option labels '{first}' and '{second}' are the same token of the judge's vocabulary")
    return OptionTokens(prefix=tuple(tails[0][:-1]), first=tails[0][-1], second=tails[1][-1])


def _ids(tokenizer, text: str) -> list[int]:
    # The chat template already holds every special token (BOS included, where the model has one).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class LLMJudge:
    """A pairwise judge from a causal LM with a chat template. ``compare`` returns P(first is better).

    Pairs with an empty answer, and questions longer than ``max_length`` tokens, are not shown to the
    model: they get 0.5 and are counted in ``stats.skipped`` (``empty_answer``, ``too_long``).
    ``stats`` also keeps the mean probability mass the model put on the two labels (``option_mass``: low
    means it would rather say something else, a sign of a template it does not understand) and, with
    ``swap``, its mean preference for the answer shown first (``first_position_bias``, 0 when unbiased).
    """

    model: Any
    tokenizer: Any
    template: str = DEFAULT_TEMPLATE
    constitution: str = DEFAULT_CONSTITUTION
    options: tuple[str, str] = ("1", "2")
    swap: bool = True
    chain_of_thought: bool = False
    reasoning_instruction: str = REASONING_INSTRUCTION
    max_new_tokens: int = 256
    batch_size: int = 16
    max_length: int | None = None
    stats: JudgeStats = field(default_factory=JudgeStats)

    def __post_init__(self) -> None:
        self.options = tuple(self.options)
        check_template(self.template, self.constitution)
        self._tokens = option_tokens(self.tokenizer, self.options)
        if self.max_length is None and self.tokenizer.model_max_length < _NO_LIMIT:
            self.max_length = self.tokenizer.model_max_length

    @classmethod
    def load(cls, name_or_path: str | Path, **settings: Any) -> LLMJudge:
        """The judge from a causal LM: an alignkit run dir (base + adapter, e.g. the demo judge's SFT run), a
        local directory or a hub id. ``settings`` are the other fields of LLMJudge."""
        model, tokenizer = modeling.load_for_inference(ModelSettings(name_or_path=str(name_or_path)))
        model.eval()
        return cls(model=model, tokenizer=tokenizer, **settings)

    def compare(self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str]) -> list[float]:
        """Per prompt, the probability that ``first`` is the better answer (0.5 for a skipped pair)."""
        check_lengths(prompts, first, second)
        judged = [i for i in range(len(prompts)) if first[i].strip() and second[i].strip()]
        self.stats.skip("empty_answer", len(prompts) - len(judged))
        # Each judged pair is shown in one or both orders; the orders of a pair stay side by side, so they
        # share a batch: the swapped call compare(p, b, a) then runs the very same batches and returns
        # exactly 1 - compare(p, a, b).
        shown = [((i, first[i], second[i]), (i, second[i], first[i])) if self.swap else ((i, first[i], second[i]),)
                 for i in judged]
        flat = [order for orders in shown for order in orders]
        ids = self.verdict_token_ids(self.questions([prompts[i] for i, _, _ in flat], [a for _, a, _ in flat],
                                                    [b for _, _, b in flat]))
        per_pair = len(shown[0]) if shown else 1
        pairs = [ids[k:k + per_pair] for k in range(0, len(ids), per_pair)]
        fitting = [k for k, rows in enumerate(pairs) if all(self._fits(row) for row in rows)]
        scored = self._first_option_probabilities([row for k in fitting for row in pairs[k]])
        preferences = [0.5] * len(prompts)
        biases = []
        for n, k in enumerate(fitting):
            straight = scored[n * per_pair]
            if self.swap:
                swapped = scored[n * per_pair + 1]  # P(the second answer is better), shown first
                preferences[judged[k]] = (straight + (1.0 - swapped)) / 2
                biases.append((straight + swapped) / 2 - 0.5)
            else:
                preferences[judged[k]] = straight
        too_long = len(judged) - len(fitting)
        self.stats.skip("too_long", too_long)
        self.stats.compared += len(fitting)
        if biases:
            self.stats.add_mean("first_position_bias", biases)
        if len(fitting) < len(prompts):
            logger.warning("LLM judge: %d of %d pairs skipped as ties (%d with an empty answer, %d longer than %s "
                           "tokens)", len(prompts) - len(fitting), len(prompts), len(prompts) - len(judged), too_long,
                           self.max_length)
        return preferences

    def questions(self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str]) -> list[Messages]:
        """The conversations whose next token is the verdict, for answers shown in the given order (with chain
        of thought, the model's reasoning is generated here, greedily)."""
        asked = [[{"role": "user", "content": judge_question(
            prompt, a, b, template=self.template, constitution=self.constitution, options=self.options,
            reasoning=self.chain_of_thought, reasoning_instruction=self.reasoning_instruction)}]
            for prompt, a, b in zip(prompts, first, second)]
        if not self.chain_of_thought or not asked:
            return asked
        reasons = generation.generate(self.model, self.tokenizer, asked,
                           GenerationSettings(max_new_tokens=self.max_new_tokens, batch_size=self._even_batch_size))
        follow_up = {"role": "user", "content": answer_instruction(self.options)}
        return [[*question, {"role": "assistant", "content": reason}, follow_up]
                for question, reason in zip(asked, reasons)]

    def verdict_token_ids(self, conversations: Sequence[Messages]) -> list[list[int]]:
        """Token ids of each conversation up to where the option label is read (reply prompt + label prefix)."""
        texts = [self.tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        return [_ids(self.tokenizer, text) + list(self._tokens.prefix) for text in texts]

    @property
    def _even_batch_size(self) -> int:
        # An even batch size keeps the two orders of a pair in one batch (see compare).
        return self.batch_size + self.batch_size % 2

    def _fits(self, ids: list[int]) -> bool:
        return self.max_length is None or len(ids) <= self.max_length

    def _first_option_probabilities(self, rows: Sequence[list[int]]) -> list[float]:
        """P(option 1), normalised over the two labels, after each row of token ids."""
        import torch

        device = next(self.model.parameters()).device
        # Only the last position's logits are needed: ask for just those where the model can (a large
        # vocabulary times every position of every question would dwarf the model's own activations).
        base_forward = getattr(self.model, "get_base_model", lambda: self.model)().forward
        keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base_forward).parameters else {}
        size = self._even_batch_size
        probabilities, masses = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(rows), size):
                batch = rows[start:start + size]
                width = max(len(ids) for ids in batch)
                # Left padding, so every question ends at the last position, where the verdict is read;
                # explicit position ids keep each question's positions what they are unpadded.
                input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, ids in enumerate(batch):
                    input_ids[row, width - len(ids):] = torch.tensor(ids)
                    attention_mask[row, width - len(ids):] = 1
                position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
                with torch.no_grad():
                    logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                        position_ids=position_ids.to(device), **keep_last).logits
                log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)
                log_probs = log_probs[:, [self._tokens.first, self._tokens.second]]
                probabilities += torch.softmax(log_probs, dim=-1)[:, 0].tolist()
                masses += log_probs.exp().sum(dim=-1).tolist()
        finally:
            self.model.train(was_training)
        if masses:
            self.stats.add_mean("option_mass", masses)
        return probabilities
