"""Rollout sampling whose randomness belongs to each answer, not to the process or the batch it is drawn in.

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
from transformers import LogitsProcessor


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
