"""Rollout sampling whose randomness belongs to each answer, not to the process or the batch it is drawn in, and
where an answer stops (:class:`AnswerStops`: EOS, ``stop_token_ids``, ``stop_strings``).

``torch.multinomial`` on a batch draws every row's token from one random stream, so an answer depends on which
rows share its batch and on the process that drew it: the same recipe run as 1 x 16 or 2 x 8 prompts per
update samples different answers from the first token on, and no two such runs can be compared answer by answer.
Here each answer has a ``torch.Generator`` of its own, seeded from the run's seed and the prompt's position in
the run's stream of prompts, and decoding is greedy over Gumbel-perturbed logits:

    argmax_v (logits_v / T + G_v),  G_v = -log E_v,  E_v ~ Exp(1) i.i.d.

is an exact sample from softmax(logits / T) (the Gumbel-max trick), so the answers follow the distribution that
PPO's log-probabilities score (the same logits divided by the same temperature), while an answer is the same
function of its own noise however the prompts are split across processes or batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, StoppingCriteria

from alignkit.errors import RecipeError


def row_seeds(seed: int, positions: Sequence[int]) -> list[int]:
    """A 64-bit seed per row from (``seed``, the row's position): numpy's SeedSequence hashes the pair, so nearby
    seeds and positions give unrelated streams (``seed + position`` would give run 42's answer 1 the noise of
    run 43's answer 0)."""
    return [int(np.random.SeedSequence([seed, position]).generate_state(1, dtype=np.uint64)[0] >> 1)
            for position in positions]


class RowGumbelSampler(LogitsProcessor):
    """Logits processor for greedy decoding that makes it sample at ``temperature``: adds Gumbel noise drawn from
    each row's own generator to its temperature-scaled logits. Every call draws one vocabulary's worth of noise per
    row, so row i's k-th token uses the k-th draw of seed i, whatever the other rows in the batch are."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.seeds, self.temperature = list(seeds), temperature
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.seeds) != scores.shape[0]:
            raise ValueError(f"{len(self.seeds)} row seeds for a batch of {scores.shape[0]} rows")
        if self.generators is None:  # made on the logits' device at the first token, then advanced token by token
            self.generators = [torch.Generator(scores.device).manual_seed(seed) for seed in self.seeds]
        exponential = torch.stack([torch.empty(scores.shape[1], device=scores.device).exponential_(generator=g)
                                   for g in self.generators])
        # A draw of exactly 0 (probability ~2^-24) would give its token infinite noise, and NaN on a -inf logit.
        return scores.float() / self.temperature - exponential.clamp_(min=torch.finfo(torch.float32).tiny).log()


class AnswerStops:
    """What ends an answer: the first of its ``token_ids`` (the tokenizer's EOS and ``stop_token_ids``) or the
    token that completes the first of its ``strings`` in the answer's text (``stop_strings``). The answer is cut
    after it: that token is the answer's last real token, where the score lands, and the answer counts as
    finished (no missing-EOS penalty). The text the reward sources read ends before the stop string, as it ends
    before the EOS token (vLLM's ``stop`` gives the same text).

    Stop strings are matched in the text as the rewards read it (decoded without special tokens, so a special
    token must be given by id)."""

    def __init__(self, tokenizer, token_ids: Sequence[int], strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.token_ids = list(dict.fromkeys(token_ids))
        self.strings = [string for string in strings if string]

    @classmethod
    def for_tokenizer(cls, tokenizer, stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()
                      ) -> AnswerStops:
        """The stops of a recipe (``train.stop_token_ids``, ``train.stop_strings``) with the tokenizer's EOS; a
        RecipeError for an id the tokenizer does not have or a stop string that the rewards' text cannot hold."""
        size = len(tokenizer)
        unknown = [token_id for token_id in stop_token_ids if not 0 <= token_id < size]
        if unknown:
            raise RecipeError(f"train.stop_token_ids: {unknown} are not ids of the tokenizer's {size} tokens")
        for string in stop_strings:
            special = next((token for token in tokenizer.all_special_tokens if token in string), None)
            if special is not None:
                raise RecipeError(f"train.stop_strings: {string!r} holds the special token {special!r}, which the "
                                  "answer's text leaves out, so the string would never be found: give the token's id "
                                  f"in train.stop_token_ids ({tokenizer.convert_tokens_to_ids(special)})")
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        return cls(tokenizer, [*eos, *stop_token_ids], stop_strings)

    def text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def cut_text(self, text: str) -> str:
        """``text`` up to the first stop string (an answer generated without this cut, e.g. a held-out one)."""
        starts = [index for string in self.strings if (index := text.find(string)) >= 0]
        return text[:min(starts)].strip() if starts else text

    def string_end(self, tokens: Sequence[int]) -> tuple[int, str] | None:
        """(index of the token that completes the first stop string, the text before that string), or None when
        the text of ``tokens`` holds no stop string."""
        text = self.text(tokens)
        found = [(index, string) for string in self.strings if (index := text.find(string)) >= 0]
        if not found:
            return None
        start, string = min(found, key=lambda item: (item[0], -len(item[1])))
        # The shortest prefix whose text holds that occurrence: a longer prefix's text extends a shorter one's.
        low, high = 0, len(tokens) - 1
        while low < high:
            middle = (low + high) // 2
            if self.text(tokens[:middle + 1]).find(string, 0, start + len(string)) == start:
                high = middle
            else:
                low = middle + 1
        return low, text[:start]

    def cut(self, responses: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        list[str]]:
        """(responses with pad after their stop, mask of real tokens up to and including the stop, whether each
        answer stopped, each answer's text as the rewards read it)."""
        length = responses.shape[1]
        is_stop = torch.isin(responses, torch.tensor(self.token_ids, device=responses.device))
        stopped = is_stop.any(dim=1)
        ends = torch.where(stopped, is_stop.int().argmax(dim=1), torch.full_like(stopped, length - 1, dtype=torch.long))
        texts = []
        for row, tokens in enumerate(responses.tolist()):
            end = int(ends[row])
            found = self.string_end(tokens[:end + 1]) if self.strings else None
            if found is not None:
                ends[row], stopped[row] = found[0], True
                texts.append(found[1].strip())
            else:
                texts.append(self.text(tokens[:end + 1]).strip())
        positions = torch.arange(length, device=responses.device).expand_as(responses)
        mask = positions <= ends.unsqueeze(1)
        return responses.masked_fill(~mask, pad_token_id), mask.float(), stopped, texts


class StopStringCriteria(StoppingCriteria):
    """Ends a row's generation once its answer's text holds one of ``stops.strings``. Only a saving: the answer is
    cut where :meth:`AnswerStops.cut` finds the string, and a row ended here holds it, so the cut finds it. Each
    step decodes only the answer's last ``window`` tokens (one more than the longest stop string has characters):
    they hold a string the last token completed whenever each token decodes to a character or more; where not (a
    special token, part of a multi-byte character), generation goes on and the cut still finds the string."""

    def __init__(self, stops: AnswerStops, prompt_length: int):
        self.stops, self.prompt_length = stops, prompt_length
        self.window = max(len(string) for string in stops.strings) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None,
                 **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, max(self.prompt_length, input_ids.shape[1] - self.window):].tolist()
        done = [any(string in self.stops.text(tail) for string in self.stops.strings) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
