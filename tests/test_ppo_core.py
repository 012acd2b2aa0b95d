"""PPO's arithmetic on hand-made batches: the invariants issue 5 names, checked without a model; the score made
from the reward sources (normalisation, clipping) and where an answer stops (issue 20)."""

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
from alignkit.stages.ppo.sampling import AnswerStops, RowGumbelSampler, StopStringCriteria, row_seeds
from alignkit.stages.ppo.scores import RewardSources, RunningMoments, Scorer

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


# ---- scores: running normalisation and clipping (issue 20) ----------------------------------------------------

def _constant_sources(count: int, weights: list[float] | None = None) -> RewardSources:
    """Reward sources that are never called here: the scorer is handed their rewards directly."""
    functions = [lambda prompts, completions, **_: [0.0] * len(completions) for _ in range(count)]
    for index, function in enumerate(functions):
        function.__name__ = f"source{index}"
    return RewardSources(functions, weights or [1.0] * count)


def test_running_moments_of_batches_are_those_of_everything_seen():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(size, 2, generator=generator) * torch.tensor([1.0, 50.0]) + torch.tensor([3.0, -7.0])
               for size in (5, 1, 12)]
    moments = RunningMoments(2)
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches).double()
    assert moments.count == 18
    assert torch.allclose(moments.mean, everything.mean(0))
    assert torch.allclose(moments.std, everything.std(0, correction=0))
    # Restored from its plain-number state (trainer_state.json), it goes on identically.
    restored = RunningMoments(2)
    restored.load_state_dict(moments.state_dict())
    for running in (moments, restored):
        running.update(torch.ones(3, 2))
    assert restored.count == moments.count and torch.equal(restored.mean, moments.mean)
    assert torch.equal(restored.std, moments.std)


def test_per_source_normalisation_gives_each_source_mean_0_std_1_over_the_running_statistics():
    """Two sources on scales 1000x apart, equal weights: each one's contribution to the summed score is its reward
    standardised with its running statistics (mean 0, std 1 over every answer seen), so neither drowns the other;
    the plain sum is the large source alone, give or take."""
    generator = torch.Generator().manual_seed(1)
    scorer = Scorer(_constant_sources(2), normalize_reward_per_source=True)
    seen, scores = [], []
    for _update in range(3):
        rewards = torch.stack([torch.rand(16, generator=generator), 1000 * torch.randn(16, generator=generator) + 500],
                              dim=1)
        seen.append(rewards)
        scores.append(scorer(rewards, torch.ones(16, dtype=torch.bool)).scores)
    everything = torch.cat(seen).double()
    contributions = scorer.per_source.normalize(everything)
    assert torch.allclose(contributions.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(contributions.std(0, correction=0), torch.ones(2, dtype=torch.float64))
    # The last batch was scored with the statistics of all three: its scores are its contributions' sum.
    assert torch.allclose(scores[-1].double(), contributions[-16:].sum(1), atol=1e-5)
    small_share = contributions[:, 0].abs().mean() / contributions.abs().sum(1).mean()
    assert 0.3 < small_share < 0.7
    assert Scorer(_constant_sources(2))(seen[0], torch.ones(16, dtype=torch.bool)).scores.double().allclose(
        seen[0].double().sum(1), atol=1e-3)  # without it, the raw sum


def test_normalize_reward_standardises_the_sum_and_keeps_the_logged_reward_raw():
    scorer = Scorer(_constant_sources(2, weights=[1.0, 0.5]), normalize_reward=True, missing_eos_penalty=2.0)
    rewards = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0], [0.0, 0.0]])
    stopped = torch.tensor([True, True, True, False])
    scored = scorer(rewards, stopped)
    summed = rewards.double() @ torch.tensor([1.0, 0.5], dtype=torch.float64)
    standardised = (summed - summed.mean()) / summed.std(correction=0)
    # The penalty comes after the normalisation (in its units), on the answer that did not stop.
    assert torch.allclose(scored.scores.double(), standardised - torch.tensor([0, 0, 0, 2.0], dtype=torch.float64),
                          atol=1e-6)
    assert torch.allclose(scored.raw_rewards.double(), summed - torch.tensor([0, 0, 0, 2.0], dtype=torch.float64))
    assert scorer.statistics() == pytest.approx({"reward/running_mean": summed.mean().item(),
                                                 "reward/running_std": summed.std(correction=0).item()})


def test_reward_clipping_keeps_every_score_inside_the_range():
    generator = torch.Generator().manual_seed(2)
    scorer = Scorer(_constant_sources(1), missing_eos_penalty=5.0, reward_clip_range=(-1.0, 2.0))
    rewards = 10 * torch.randn(200, 1, generator=generator)
    stopped = torch.rand(200, generator=generator) > 0.3
    scored = scorer(rewards, stopped)
    assert scored.scores.min() >= -1.0 and scored.scores.max() <= 2.0
    unclipped = torch.where(stopped, rewards[:, 0], rewards[:, 0] - 5.0)
    outside = (unclipped < -1.0) | (unclipped > 2.0)
    assert outside.any() and torch.equal(scored.clipped, outside)
    assert torch.equal(scored.scores[~outside], unclipped[~outside].float())
    assert torch.equal(scored.raw_rewards, unclipped.float())  # the log keeps the unclipped reward


def test_normalisation_of_a_constant_reward_gives_zero_and_of_a_missing_one_an_error():
    scorer = Scorer(_constant_sources(1), normalize_reward=True, normalize_reward_per_source=True)
    assert torch.equal(scorer(torch.full((4, 1), 0.5), torch.ones(4, dtype=torch.bool)).scores, torch.zeros(4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        scorer(torch.tensor([[1.0], [float("nan")]]), torch.ones(2, dtype=torch.bool))


def test_reward_sources_give_each_sources_rewards_and_their_weighted_sum():
    def length(prompts, completions, **_):
        return [len(c) for c in completions]

    def has_x(prompts, completions, **_):
        return [float("x" in c) for c in completions]

    sources = RewardSources([length, has_x, length], [1.0, 2.0, 0.5])
    rewards = sources.per_source(["p", "q"], ["ab", "xyz"], {})
    assert rewards.tolist() == [[2.0, 0.0, 2.0], [3.0, 1.0, 3.0]]
    assert sources.weighted_sum(rewards).tolist() == [3.0, 6.5]
    assert sources.names == ["length", "has_x", "length_2"]  # logged apart
    # Called as PPO's reward function always was: the weighted sum and each source's mean.
    assert sources(["p", "q"], ["ab", "xyz"], {}) == ([3.0, 6.5], {"length": 2.5, "has_x": 0.5, "length_2": 2.5})


# ---- where an answer stops (issue 20) --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_tokenizer(demo_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_path)


def _answers(tokenizer, *texts: str, length: int = 14) -> torch.Tensor:
    """Token ids of ``texts`` (which may hold the EOS token's text), cut or right-padded to ``length``."""
    rows = [tokenizer(text, add_special_tokens=False).input_ids[:length] for text in texts]
    return torch.tensor([row + [tokenizer.pad_token_id] * (length - len(row)) for row in rows])


def test_stop_strings_and_stop_token_ids_cut_the_answer(demo_tokenizer):
    tokenizer = demo_tokenizer
    eos, pad = tokenizer.eos_token, tokenizer.pad_token_id
    comma = [tokenizer.convert_tokens_to_ids(",")]
    stops = AnswerStops.for_tokenizer(tokenizer, stop_token_ids=comma, stop_strings=["wo", "END"])
    texts = ["hello world. bye", "hello, world", f"hi{eos} there END", "bye now END more", "plain answer"]
    responses = _answers(tokenizer, *texts)
    cut, mask, stopped, answers = stops.cut(responses, pad)
    # "wo" spans the tokens " w" and "or", "END" three tokens: the text before the string is the answer, the
    # token that completed it the last real one. A stop token's text stays unless it is a special token (vLLM's
    # rule for stop_token_ids).
    assert answers == ["hello", "hello,", "hi", "bye now", "plain answer"]
    assert stopped.tolist() == [True, True, True, True, False]
    # Text generated without the cut (held-out answers) is cut at the first stop string alike.
    assert [stops.cut_text(text) for text in ("hello world. bye", "bye now END more", "plain")] == [
        "hello", "bye now", "plain"]
    for row, (tokens, row_mask) in enumerate(zip(cut.tolist(), mask)):
        real = int(row_mask.sum())
        assert all(token == pad for token in tokens[real:]) and (row_mask[:real] == 1).all()
        kept = tokenizer.decode(tokens[:real], skip_special_tokens=True)
        if row == 1:
            assert tokens[real - 1] == comma[0]  # the stop token is the answer's last
        elif row == 2:
            assert tokens[real - 1] == tokenizer.eos_token_id  # EOS comes before the stop string
        elif row == 4:
            assert real == 14  # no stop: every token up to the length limit is the answer's
        else:  # the stop string is complete with the last real token, and not one token earlier
            string = "wo" if row == 0 else "END"
            assert string in kept and string not in tokenizer.decode(tokens[:real - 1], skip_special_tokens=True)


def test_an_answer_without_a_stop_keeps_every_token_and_counts_as_unfinished(demo_tokenizer):
    stops = AnswerStops.for_tokenizer(demo_tokenizer, stop_strings=["zzz"])
    responses = _answers(demo_tokenizer, "hello world", length=4)  # 4 tokens of it: cut by the length limit
    cut, mask, stopped, answers = stops.cut(responses, demo_tokenizer.pad_token_id)
    assert mask.tolist() == [[1.0] * 4] and stopped.tolist() == [False] and torch.equal(cut, responses)
    assert answers == [demo_tokenizer.decode(responses[0]).strip()]


def test_the_stop_string_criterion_ends_only_rows_whose_answer_holds_a_stop_string(demo_tokenizer):
    stops = AnswerStops.for_tokenizer(demo_tokenizer, stop_strings=["END"])
    prompt = demo_tokenizer("prompt with END in it", add_special_tokens=False).input_ids
    answers = [demo_tokenizer(text, add_special_tokens=False).input_ids for text in ("ok END", "ok fine")]
    width = max(map(len, answers))
    rows = torch.tensor([prompt + answer + [demo_tokenizer.pad_token_id] * (width - len(answer)) for answer in answers])
    # The prompt's own "END" does not count: only the answer is read.
    assert StopStringCriteria(stops, len(prompt))(rows).tolist() == [True, False]


@pytest.mark.parametrize("ids, strings, message", [
    ([10**6], (), "are not ids of the tokenizer's"),
    ((), ["done<|end|>"], r"holds the special token '<\|end\|>'.*stop_token_ids \(4\)"),
])
def test_stops_the_tokenizer_cannot_honour_are_recipe_errors(demo_tokenizer, ids, strings, message):
    from alignkit.errors import RecipeError

    with pytest.raises(RecipeError, match=message):
        AnswerStops.for_tokenizer(demo_tokenizer, ids, strings)
