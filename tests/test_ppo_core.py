"""PPO's arithmetic on hand-made batches: the invariants issue 5 names, checked without a model."""

from __future__ import annotations

import pytest
import torch

from alignkit.ppo.core import (
    apply_missing_eos_penalty,
    gae,
    kl_per_token,
    last_token_index,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

# Two responses: 3 real tokens then padding, and 5 real tokens.
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)


def random_like_mask(seed: int) -> torch.Tensor:
    return torch.randn(MASK.shape, generator=torch.Generator().manual_seed(seed))


def test_gae_with_lambda_0_and_gamma_1_is_one_step_td():
    rewards, values = random_like_mask(0) * MASK, random_like_mask(1) * MASK
    advantages, returns = gae(rewards, values, MASK, gamma=1.0, lam=0.0)
    # delta_t = r_t + V_{t+1} - V_t, with V after the last real token = 0.
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1)], dim=1) * torch.cat([MASK[:, 1:], torch.zeros(2, 1)], 1)
    expected = (rewards + next_values - values) * MASK
    assert torch.allclose(advantages, expected, atol=1e-6)
    # At the last real token that is r - V, as the issue states.
    last = last_token_index(MASK)
    rows = torch.arange(2)
    assert torch.allclose(advantages[rows, last], (rewards - values)[rows, last], atol=1e-6)
    assert torch.allclose(returns, (advantages + values) * MASK)


def test_gae_with_lambda_1_and_gamma_1_is_reward_to_go_minus_value():
    rewards, values = random_like_mask(2) * MASK, random_like_mask(3) * MASK
    advantages, _ = gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    reward_to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * MASK
    assert torch.allclose(advantages, (reward_to_go - values) * MASK, atol=1e-5)


def test_padding_gets_no_advantage_kl_or_reward():
    logprobs, ref = random_like_mask(4), random_like_mask(5)
    for estimator in ("k1", "k3"):
        kl = kl_per_token(logprobs, ref, MASK, estimator)
        assert torch.all(kl[MASK == 0] == 0)
    rewards = token_rewards(torch.tensor([1.0, 2.0]), kl_per_token(logprobs, ref, MASK), MASK, kl_coef=0.1)
    assert torch.all(rewards[MASK == 0] == 0)
    advantages, returns = gae(rewards, random_like_mask(6), MASK, gamma=1.0, lam=0.95)
    assert torch.all(advantages[MASK == 0] == 0) and torch.all(returns[MASK == 0] == 0)


def test_k3_is_non_negative_and_zero_when_policies_agree():
    logprobs = random_like_mask(7)
    assert torch.all(kl_per_token(logprobs, random_like_mask(8), MASK, "k3") >= 0)
    assert torch.all(kl_per_token(logprobs, logprobs, MASK, "k3") == 0)
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_per_token(logprobs, logprobs, MASK, "k2")


def test_the_score_lands_on_the_last_real_token():
    zero_kl = torch.zeros_like(MASK)
    rewards = token_rewards(torch.tensor([3.0, -2.0]), zero_kl, MASK, kl_coef=0.5)
    expected = torch.zeros_like(MASK)
    expected[0, 2], expected[1, 4] = 3.0, -2.0
    assert torch.equal(rewards, expected)


def test_kl_penalty_is_spread_over_every_real_token():
    kl = torch.full_like(MASK, 2.0) * MASK
    rewards = token_rewards(torch.zeros(2), kl, MASK, kl_coef=0.1)
    assert torch.allclose(rewards, -0.2 * MASK)


def test_missing_eos_penalty_applies_only_to_completions_without_eos():
    scores = torch.tensor([1.0, 1.0, 1.0])
    penalised = apply_missing_eos_penalty(scores, torch.tensor([True, False, True]), penalty=1.5)
    assert torch.equal(penalised, torch.tensor([1.0, -0.5, 1.0]))
    assert torch.equal(apply_missing_eos_penalty(scores, torch.tensor([False] * 3), None), scores)


def test_first_minibatch_of_an_update_has_ratio_one_and_nothing_clipped():
    # Before the first optimiser step the policy is the one that sampled: new and old log-probs are equal.
    logprobs = random_like_mask(9)
    advantages = masked_whiten(random_like_mask(10), MASK)
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, MASK, clip_range=0.2)
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0
    # With ratio 1 the loss is minus the mean advantage, which whitening made 0.
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_policy_loss_clips_large_ratios():
    old = torch.zeros_like(MASK)
    new = torch.full_like(MASK, 1.0)  # ratio e ~ 2.72, far outside 1 +- 0.2
    loss, stats = policy_loss(new, old, torch.ones_like(MASK), MASK, clip_range=0.2)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(-1.2)  # the clipped ratio times the advantage, negated


def test_value_loss_is_clipped_around_the_old_values():
    old = torch.zeros_like(MASK)
    returns = torch.full_like(MASK, 1.0) * MASK
    loss, stats = value_loss(torch.full_like(MASK, 1.0), old, returns, MASK, clip_range=0.2)
    # Unclipped error 0, clipped (0.2 - 1)^2 = 0.64: the larger one counts, halved.
    assert loss.item() == pytest.approx(0.32) and stats["value_clipfrac"].item() == pytest.approx(1.0)


def test_whitening_gives_zero_mean_unit_variance_over_real_tokens():
    values = random_like_mask(11) * 5 + 3
    whitened = masked_whiten(values, MASK)
    real = whitened[MASK == 1]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert (real**2).mean().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(whitened[MASK == 0] == 0)
    kept = masked_whiten(values, MASK, shift_mean=False)[MASK == 1]
    assert kept.mean().item() == pytest.approx(values[MASK == 1].mean().item(), abs=1e-4)
