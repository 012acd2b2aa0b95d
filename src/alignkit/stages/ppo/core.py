"""PPO's arithmetic on padded batches of response tokens, following "The N+ implementation details of
RLHF with PPO" (Huang et al. 2024): score on the last real token, per-token KL, GAE, whitening, clipping.

Every tensor is ``(batch, response_length)`` with a 0/1 ``mask`` of real response tokens (1 up to and
including the last real token, 0 on padding). Functions are pure so the invariants in issue 5 can be
tested on hand-made tensors.

A batch may be one part of a larger one (a micro-batch of a minibatch, one process's share of the rollout):
``masked_whiten`` takes the batch's statistics over all parts through ``reduce`` (a sum across processes), and
the losses take the whole's token count as ``tokens``, so the parts' losses add up to the whole's token mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]
# Sums a tensor over every part of the batch (all_reduce across processes); the identity for a whole batch.
Reduce = Callable[[torch.Tensor], torch.Tensor]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean over the real tokens only; with ``tokens``, the masked sum divided by that count instead of the mask's
    own (this batch's share of the mean of a larger batch with ``tokens`` real tokens)."""
    count = mask.sum().clamp(min=1) if tokens is None else tokens
    return (values * mask).sum() / count


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  reduce: Reduce | None = None) -> torch.Tensor:
    """Normalise to unit variance over the real tokens (and zero mean if ``shift_mean``); padding stays 0. With
    ``reduce`` (a sum across processes), mean and variance are those of the real tokens of every process's batch,
    so each process's share is whitened as one batch would be."""
    reduce = reduce or (lambda tensor: tensor)
    count = reduce(mask.sum()).clamp(min=1)
    mean = reduce((values * mask).sum()) / count
    variance = reduce((((values - mean) ** 2) * mask).sum()) / count
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                 estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimates from sampled tokens; exactly 0 on padding.

    k1 = log p - log q (unbiased, can be negative); k3 = (r - 1) - log r with r = q / p (unbiased,
    never negative, lower variance; Schulman 2020).
    """
    log_ratio = (logprobs - ref_logprobs) * mask
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return ((torch.exp(-log_ratio) - 1) + log_ratio) * mask
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (rows with no real token point at 0)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask).argmax(dim=1)


def apply_missing_eos_penalty(scores: torch.Tensor, ends_with_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Scores with ``penalty`` subtracted from completions that hit the length limit without EOS."""
    if penalty is None:
        return scores
    return torch.where(ends_with_eos, scores, scores - penalty)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL on every real token, plus the sequence score on the last real one."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's real tokens: (advantages, returns).

    Value after the last real token is 0 (the episode ends there); padding gets 0 advantage.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], device=rewards.device, dtype=rewards.dtype)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        real = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * real
        # Padding after the end passes nothing back; a real token becomes the "next" of the one before.
        next_value = torch.where(real.bool(), values[:, t], next_value * 0)
        next_advantage = torch.where(real.bool(), advantage, next_advantage * 0)
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float, tokens: torch.Tensor | float | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss and its statistics (ratio mean, clip fraction, approximate KL), token means
    over the batch, or this batch's share of them for a whole of ``tokens`` real tokens (see ``masked_mean``)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, tokens)
    stats = {
        "ratio": masked_mean(ratio, mask, tokens),
        "clipfrac": masked_mean((clipped > unclipped).float(), mask, tokens),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask, tokens),
    }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float, tokens: torch.Tensor | float | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (the larger of the clipped and unclipped squared errors), halved; a token mean as in
    ``policy_loss``."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask, tokens)
    return loss, {"value_clipfrac": masked_mean((clipped > unclipped).float(), mask, tokens)}
