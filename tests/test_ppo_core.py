"""PPO's arithmetic on hand-made batches: the invariants issue 5 names, checked without a model."""

from __future__ import annotations

import pytest
import torch

from alignkit.stages.ppo.core import (
    apply_missing_eos_penalty,
    gae,
    kl_per_token,
    last_token_index,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from alignkit.stages.ppo.sampling import RowGumbelSampler, row_seeds

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


def test_whitening_a_batch_in_parts_with_reduce_is_whitening_the_whole():
    """Each process whitens its rows with the whole batch's statistics (reduce = a sum across processes)."""
    values = torch.cat([random_like_mask(12) * 5 + 3, random_like_mask(13)])
    mask = torch.cat([MASK, MASK.flip(1)])
    parts = [(values[:2], mask[:2]), (values[2:], mask[2:])]
    mean = (values * mask).sum() / mask.sum()
    # What all_reduce hands every part, in the order masked_whiten asks: token count, sum, squared deviations.
    sums = [sum(pick(v, m) for v, m in parts) for pick in (lambda v, m: m.sum(), lambda v, m: (v * m).sum(),
                                                           lambda v, m: ((v - mean) ** 2 * m).sum())]
    for shift_mean in (True, False):
        whole = masked_whiten(values, mask, shift_mean)
        for index, (part_values, part_mask) in enumerate(parts):
            answers = iter(sums)
            whitened = masked_whiten(part_values, part_mask, shift_mean,
                                     reduce=lambda _local, answers=answers: next(answers))
            assert torch.allclose(whitened, whole[2 * index:2 * index + 2], atol=1e-6)


def test_token_weighted_losses_of_the_parts_add_up_to_the_whole():
    """Micro-batches and processes each divide by the minibatch's token count: their losses sum to its mean."""
    mask = torch.cat([MASK, MASK.flip(1), MASK[:1]])
    logprobs, old = torch.randn(mask.shape), torch.randn(mask.shape)
    advantages, values, returns = torch.randn(mask.shape), torch.randn(mask.shape), torch.randn(mask.shape)
    tokens = mask.sum()
    for loss_of in (lambda rows, n: policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], 0.2, n),
                    lambda rows, n: value_loss(values[rows], old[rows], returns[rows], mask[rows], 0.2, n)):
        whole, whole_stats = loss_of(slice(None), None)
        parts = [loss_of(rows, tokens) for rows in (slice(0, 1), slice(1, 4), slice(4, 5))]
        assert sum(loss for loss, _ in parts).item() == pytest.approx(whole.item(), abs=1e-6)
        for key, value in whole_stats.items():
            assert sum(stats[key] for _, stats in parts).item() == pytest.approx(value.item(), abs=1e-6)


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")])


def _chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    expected = probabilities * counts.sum()
    real = probabilities > 0
    return float(((counts[real] - expected[real]) ** 2 / expected[real]).sum())


def test_gumbel_sampling_with_a_seed_per_row_samples_softmax_of_the_tempered_logits():
    """argmax(logits / T + Gumbel) is an exact draw from softmax(logits / T): 20000 rows, one token each, against
    the tempered distribution (chi-square, 4 degrees of freedom: 18.5 is the 0.1% critical value); torch's own
    multinomial sampler on the same distribution lands in the same range, and the untempered distribution (what
    sampling would follow if the temperature were applied twice or not at all) is far off."""
    rows, temperature = 20000, 0.7
    sampler = RowGumbelSampler(row_seeds(42, range(rows)), temperature)
    tokens = sampler(None, LOGITS.expand(rows, -1)).argmax(-1)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).float()
    tempered = torch.softmax(LOGITS / temperature, -1)
    assert counts[-1] == 0  # a -inf logit is never drawn
    assert _chi_square(counts, tempered) < 18.5
    multinomial = torch.multinomial(tempered, rows, replacement=True, generator=torch.Generator().manual_seed(0))
    assert _chi_square(torch.bincount(multinomial, minlength=len(LOGITS)).float(), tempered) < 18.5
    assert _chi_square(counts, torch.softmax(LOGITS, -1)) > 100


def test_a_rows_tokens_depend_on_its_seed_not_on_the_batch_it_is_drawn_in():
    """Row i's noise comes from its own generator: drawn alone or between others, token after token, the same."""
    seeds = row_seeds(7, [10, 11, 12])
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    together, alone = RowGumbelSampler(seeds, 0.7), RowGumbelSampler(seeds[1:2], 0.7)
    for _step in range(3):
        assert torch.equal(together(None, logits)[1], alone(None, logits[1:2])[0])
    assert not torch.equal(together(None, logits)[0], together(None, logits)[0])  # the noise moves on each token
    assert row_seeds(7, [10]) != row_seeds(8, [9])  # no seed + position collisions
