"""ReST / best-of-N (the ``rest`` stage): the sample filters, the schedule's validation, learning on the demo
(the held-out reward rises after every improve step), and resuming an interrupted run."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, kill_when_written, metrics_of, run_cli

from alignkit.demo.rewards import reversal_reward
from alignkit.errors import RecipeError
from alignkit.feedback import round_robin_scores
from alignkit.recipe.loading import load_recipe
from alignkit.stages.rest.selection import RestSettings, Sample, keep_samples

DEMO_REST = str(REPO / "recipes/demo/rest.yaml")
PROMPT = [{"role": "user", "content": "reverse: a b"}]


def _samples(rewards_by_prompt: list[list[float]]) -> list[Sample]:
    return [Sample(prompt_index=p, prompt=PROMPT, completion=f"answer {p}-{i}", reward=r)
            for p, rewards in enumerate(rewards_by_prompt) for i, r in enumerate(rewards)]


def _kept(samples: list[Sample], step: int = 1, **settings) -> list[tuple[int, float]]:
    return [(s.prompt_index, s.reward) for s in keep_samples(samples, RestSettings(**settings), step)]


def test_threshold_filter_raises_its_bar_each_improve_step():
    samples = _samples([[0.2, 0.6, 1.0], [0.5, 0.9, 0.1]])
    settings = dict(improve_steps=3, thresholds=[0.5, 0.8, 1.0])
    assert _kept(samples, 1, **settings) == [(0, 0.6), (0, 1.0), (1, 0.5), (1, 0.9)]
    assert _kept(samples, 2, **settings) == [(0, 1.0), (1, 0.9)]
    assert _kept(samples, 3, **settings) == [(0, 1.0)]


def test_percentile_filter_is_relative_to_each_prompts_own_samples():
    # Prompt 1's rewards are all low, yet its best sample is kept: the bar is that prompt's own percentile.
    samples = _samples([[0.2, 0.6, 1.0, 0.4], [0.01, 0.03, 0.02, 0.0]])
    assert _kept(samples, 1, improve_steps=1, filter="percentile", percentiles=[75]) == [(0, 1.0), (1, 0.03)]
    assert _kept(samples, 1, improve_steps=1, filter="percentile", percentiles=[50]) == \
        [(0, 0.6), (0, 1.0), (1, 0.03), (1, 0.02)]


def test_best_of_n_keeps_each_prompts_top_k_above_the_floor():
    samples = _samples([[0.2, 0.6, 1.0], [0.5, 0.9, 0.1], [0.0, 0.05, 0.02]])
    assert _kept(samples, filter="best_of_n", improve_steps=1) == [(0, 1.0), (1, 0.9), (2, 0.05)]
    assert _kept(samples, filter="best_of_n", improve_steps=1, top_k=2, min_reward=0.3) == \
        [(0, 0.6), (0, 1.0), (1, 0.5), (1, 0.9)]


def test_empty_answers_and_repeats_are_not_kept_twice_or_at_all():
    samples = [Sample(0, PROMPT, "b a", 1.0), Sample(0, PROMPT, " b a ", 1.0), Sample(0, PROMPT, "", 1.0),
               Sample(0, PROMPT, "b", float("nan")), Sample(1, PROMPT, "b a", 1.0)]
    kept = keep_samples(samples, RestSettings(improve_steps=1, thresholds=[0.5]), 1)
    assert kept == [samples[0], samples[4]]  # one copy per prompt; other prompts' copies stay
    kept = keep_samples(samples, RestSettings(improve_steps=1, thresholds=[0.5], deduplicate=False), 1)
    assert kept == [samples[0], samples[1], samples[4]]


@pytest.mark.parametrize(("overrides", "message"), [
    (["rest.thresholds=[0.5, 0.9]"], "thresholds has 2 values for improve_steps=3"),
    (["rest.improve_steps=2", "rest.thresholds=[0.9, 0.5]"], "thresholds must not decrease"),
    (["rest.thresholds=null"], "filter threshold needs thresholds"),
    (["rest.filter=percentile"], "filter percentile needs percentiles"),
    (["rest.filter=percentile", "rest.percentiles=[50, 90, 150]"], "percentiles must lie in [0, 100]"),
    (["rest.generation.do_sample=false"], "generation.do_sample must be true"),
    (["rest.samples_per_prompt=0"], "samples_per_prompt must be >= 1"),
    (["rest.grow_step=2"], "Did you mean 'grow_steps'?"),
    (["rest=null"], "missing section 'rest'"),
])
def test_schedule_errors_name_the_problem(overrides, message):
    with pytest.raises(RecipeError) as caught:
        load_recipe(DEMO_REST, overrides)
    assert message in str(caught.value)


def test_demo_rest_raises_the_held_out_reward_after_every_improve_step(noisy_sft_run, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("rest", DEMO_REST, f"model.name_or_path={noisy_sft_run}", f"train.output_dir={run_dir}",
                     "train.save_strategy=no")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = metrics_of(run_dir)
    log = [json.loads(line) for line in (run_dir / "rest_log.jsonl").read_text().splitlines()]
    assert [(e["grow"], e["improve"], e["bar"]) for e in log] == [(1, 1, 0.3), (1, 2, 0.6), (1, 3, 1.0)]
    rewards = [metrics["rest/eval_reward_start"], *(e["eval_reward"] for e in log)]
    # Observed on 2 cores: 0.171 -> 0.324 -> 0.605 -> 0.693.
    assert all(later > earlier + 0.02 for earlier, later in zip(rewards, rewards[1:])), rewards
    # The rising bar keeps fewer and better samples of the one grow step, every kept one at or above it.
    kept = [e["kept"] for e in log]
    assert kept == sorted(kept, reverse=True) and kept[-1] > 0, kept
    assert all(e["kept_reward"] >= e["bar"] for e in log)
    assert len((run_dir / "grow-1" / "samples.jsonl").read_text().splitlines()) == 4000
    for step, count in enumerate(kept, start=1):
        assert len((run_dir / f"improve-{step}" / "kept.jsonl").read_text().splitlines()) == count
    # The run's model is the last improve step's adapter, on the original base.
    assert json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("tiny-llama")
    assert (run_dir / "adapter_model.safetensors").read_bytes() == \
        (run_dir / "improve-3" / "adapter_model.safetensors").read_bytes()
    assert (run_dir / "reward.png").is_file()
    history = json.loads((run_dir / "log_history.json").read_text())
    assert [entry["step"] for entry in history] == [0, 1, 2, 3] and "eval_reward" in history[0]


def test_killed_rest_run_resumes_after_its_last_improve_step(noisy_sft_run, tmp_path):
    run_dir = tmp_path / "run"
    # Three grow steps of one improve step each: the resumed run must redo neither grow 1 nor improve step 1.
    args = ["rest", DEMO_REST, f"model.name_or_path={noisy_sft_run}", f"train.output_dir={run_dir}",
            "rest.grow_steps=3", "rest.improve_steps=1", "rest.thresholds=[0.0]", "rest.prompts_per_grow=32",
            "train.max_steps=4", "train.save_strategy=no", "evaluate.max_samples=8"]
    kill_when_written(args, run_dir / "checkpoint-1" / "trainer_state.json", tmp_path / "first.log")
    first_samples = (run_dir / "grow-1" / "samples.jsonl").read_text()

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after improve step 1" in resumed.stderr
    log = [json.loads(line) for line in (run_dir / "rest_log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["grow"]) for e in log] == [(1, 1), (2, 2), (3, 3)]  # each once, none lost or repeated
    assert (run_dir / "grow-1" / "samples.jsonl").read_text() == first_samples  # grow 1 was not redone
    assert metrics_of(run_dir)["rest/improve_steps"] == 3


# --------------------------------------------------------------------------------------------------
# Scoring samples with a judge
# --------------------------------------------------------------------------------------------------


class CountingJudge:
    """Prefers the longer answer (1 / 0 / 0.5) and counts the pairs it was asked about."""

    def __init__(self) -> None:
        self.asked = 0

    def compare(self, prompts, first, second):
        self.asked += len(prompts)
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]


def test_a_judge_scores_each_sample_by_its_mean_preference_over_its_siblings():
    judge = CountingJudge()
    answers = ["a", "a b c", "a b", "a b", "x", "x", "x y", "x y z w"]
    scores = round_robin_scores(judge, [PROMPT] * 8, answers, 4)
    # Prompt 0: "a b c" beats all three (1.0); each "a b" beats "a", loses to "a b c", ties the other (0.5).
    assert scores[:4] == pytest.approx([0.0, 1.0, 0.5, 0.5])
    assert scores[4:] == pytest.approx([0.5 / 3, 0.5 / 3, 2 / 3, 1.0])
    assert judge.asked == 10  # 12 pairs, of which two hold identical answers: tied without asking
    with pytest.raises(ValueError, match="7 answers to 7 prompts is not 4"):
        round_robin_scores(judge, [PROMPT] * 7, answers[:7], 4)


def rule_win_rates(samples: list[dict], group_size: int) -> list[float]:
    """Each sample's win rate (ties half) under the reversal rule against the other samples of its prompt
    (``group_size`` consecutive samples per prompt): the score a rule judge's round robin must give it."""
    rule = [reversal_reward([s["prompt"]], [s["completion"]])[0] for s in samples]
    rates = []
    for index in range(len(samples)):
        first = index - index % group_size
        others = [j for j in range(first, first + group_size) if j != index]
        rates.append(sum(1.0 if rule[index] > rule[j] else 0.0 if rule[index] < rule[j] else 0.5
                         for j in others) / len(others))
    return rates


def test_rest_with_a_judge_keeps_the_samples_it_ranks_highest(noisy_sft_run, tmp_path):
    run_dir = tmp_path / "run"
    judge = "rest.judge={kind: rule, function: 'alignkit.demo.rewards:reversal_reward'}"
    args = ["rest", DEMO_REST, f"model.name_or_path={noisy_sft_run}", f"train.output_dir={run_dir}", judge,
            "rest.improve_steps=1", "rest.filter=best_of_n", "rest.prompts_per_grow=32", "train.max_steps=4",
            "train.save_strategy=no", "evaluate.max_samples=8"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (run_dir / "grow-1" / "samples.jsonl").read_text().splitlines()]
    # Each sample's score is its win rate against its prompt's three other samples under the rule.
    assert [s["reward"] for s in samples] == pytest.approx(rule_win_rates(samples, 4))
    # The reward section still monitors the held-out answers.
    assert "rest/eval_reward_end" in metrics_of(run_dir)

    nothing = run_cli(*args[:3], f"train.output_dir={tmp_path / 'unscored'}", "reward=null")
    assert nothing.returncode != 0 and "rest needs something to score samples with" in nothing.stderr
