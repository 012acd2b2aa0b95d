"""Reward-model scores with several processes, and PPO's reference and critic where the start or the reward
model could silently differ from the policy.

Each process of PPO, GRPO and RLOO scores *its own* answers (PPO's rollouts, the completions TRL hands a reward
function on each process); held-out answers are the same in every process. Every score must belong to its
answer: the runs here record every (prompt, answer, score) each process scored (``ALIGNKIT_RECORD_SCORES``)
and the test rescores them in one process. The reward model is trained once per module from the noisy SFT run
(recipes/demo/rm.yaml, 120 steps: held-out accuracy ~0.88), so its scores differ from answer to answer.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import REPO, metrics_of, run_cli, run_ok
from test_multiprocess import CPU_CONFIG, accelerate_launch, jsonl, launch_ok
from test_ppo import DEMO_PPO, FROM_BASE, QUICK

from alignkit.errors import RecipeError
from alignkit.feedback.reward_model import RECORD_SCORES_ENV
from alignkit.recipe.loading import load_recipe
from alignkit.runs.rundir import RunDir


@pytest.fixture(scope="module")
def reward_model_run(noisy_sft_run, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("rm") / "run"
    run_ok("rm", "recipes/demo/rm.yaml", f"model.name_or_path={noisy_sft_run}", f"train.output_dir={run_dir}",
           "train.max_steps=120", "train.warmup_steps=10", "train.save_strategy=no", "train.eval_strategy=no")
    return run_dir


@pytest.fixture(scope="module")
def scorer(reward_model_run):
    """The reward model in this one process: the scores every process's must equal."""
    from alignkit.feedback import RewardModel

    return RewardModel.load(reward_model_run)


def assert_scores_match(scorer, prompts: list, answers: list[str], scores: list[float]) -> None:
    assert len(scores) == len(answers)
    assert scores == pytest.approx(scorer.score(prompts, answers), abs=1e-5)


def recorded(directory: Path, rank: int) -> list[dict]:
    return jsonl(directory / f"scores-{rank}.jsonl")


def assert_recorded_scores_match(scorer, directory: Path) -> tuple[list[dict], list[dict]]:
    """Every row both processes scored got its own score; returns each process's rows."""
    first, second = recorded(directory, 0), recorded(directory, 1)
    for rows in (first, second):
        assert_scores_match(scorer, [row["prompt"] for row in rows], [row["answer"] for row in rows],
                            [row["score"] for row in rows])
    return first, second


def test_each_process_gets_the_scores_of_the_rows_it_passed(reward_model_run, scorer, tmp_path):
    """Processes passing their own rows (4 and 4, 5 and 3, 3 and none), the same rows, through RewardModel.score,
    TRL's reward-function call and shared_reward. Before the fix, half of each process's 4 scores were the other
    process's (differences up to 0.42 here) and uneven counts came back with the wrong number of scores."""
    result = accelerate_launch(CPU_CONFIG, str(REPO / "tests" / "scripts" / "check_scoring.py"), str(reward_model_run),
                               str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [{call["call"]: call for call in json.loads((tmp_path / f"scored-{rank}.json").read_text())}
             for rank in (0, 1)]
    for process in calls:
        for call in process.values():
            assert_scores_match(scorer, call["prompts"], call["answers"], call["scores"])
    assert calls[0]["own_rows"]["answers"] != calls[1]["own_rows"]["answers"]  # the processes' rows differ
    assert [len(calls[rank]["own_rows_uneven"]["scores"]) for rank in (0, 1)] == [5, 3]
    assert calls[1]["own_rows_one_empty"]["scores"] == []
    assert calls[0]["same_rows"]["scores"] == calls[1]["same_rows"]["scores"]


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_two_process_grpo_and_rloo_score_each_answer_with_its_own_reward(noisy_sft_run, reward_model_run, scorer,
                                                                         tmp_path, monkeypatch, stage):
    records = tmp_path / "scores"
    monkeypatch.setenv(RECORD_SCORES_ENV, str(records))
    run_dir = tmp_path / stage
    launch_ok(stage, f"recipes/demo/{stage}.yaml", f"model.name_or_path={noisy_sft_run}",
              f"reward.sources=[{{model: {reward_model_run}}}]", f"train.output_dir={run_dir}", "train.max_steps=2",
              "train.num_generations=4", "train.per_device_train_batch_size=8", "train.max_completion_length=8",
              "train.logging_steps=1", "train.save_strategy=no", "evaluate.max_samples=8")
    assert metrics_of(run_dir)["run/world_size"] == 2
    first, second = assert_recorded_scores_match(scorer, records)
    # The 8 held-out answers before and after, shared out (4 scored in each process), and 2 steps of 8 answers
    # of each process's own (2 prompts x 4 generations): the processes scored different answers.
    assert len(first) == len(second) == 4 + 2 * 8 + 4
    assert {row["answer"] for row in first[4:-4]} != {row["answer"] for row in second[4:-4]}


def test_two_process_ppo_with_a_reward_model_scores_its_own_rollouts_and_learns_as_one_process(
        noisy_sft_run, reward_model_run, scorer, tmp_path, monkeypatch):
    """Same global batch (1 x 16 and 2 x 8 prompts per update), same seed, 20 updates on the reward model.

    Each answer is sampled with noise of its own (seeded by the run's seed and the prompt's position), so the
    two runs roll out the same answers; each process scores its own answers with the reward model, and every
    recorded score must equal the one-process score of that answer. The held-out reward before training, the
    prompts of the first update and the whole curve (rollout reward, losses, KL per update) are compared."""
    args = (DEMO_PPO, f"model.name_or_path={noisy_sft_run}", f"reward.sources=[{{model: {reward_model_run}}}]",
            "evaluate.max_samples=16", "train.max_steps=20", "train.save_strategy=no")
    one, two = tmp_path / "one", tmp_path / "two"
    monkeypatch.setenv(RECORD_SCORES_ENV, str(tmp_path / "scores-one"))
    single = run_cli("ppo", *args, f"train.output_dir={one}", "train.per_device_train_batch_size=16")
    assert single.returncode == 0, single.stderr[-3000:]
    monkeypatch.setenv(RECORD_SCORES_ENV, str(tmp_path / "scores-two"))
    launch_ok("ppo", *args, f"train.output_dir={two}", "train.per_device_train_batch_size=8")

    first, second = assert_recorded_scores_match(scorer, tmp_path / "scores-two")
    alone = recorded(tmp_path / "scores-one", 0)
    # 16 held-out answers before and after; 20 updates of 8 rollouts per process (16 alone).
    assert len(first) == len(second) == 16 + 20 * 8 + 16 and len(alone) == 16 + 20 * 16 + 16
    assert first[:16] == second[:16] and [row["answer"] for row in first[:16]] == [row["answer"] for row in alone[:16]]
    # The first update's global batch: the same prompts, shared out between the processes.
    prompt = lambda row: json.dumps(row["prompt"])  # noqa: E731
    assert sorted(map(prompt, first[16:24] + second[16:24])) == sorted(map(prompt, alone[16:32]))
    assert not {prompt(row) for row in first[16:24]} & {prompt(row) for row in second[16:24]}

    metrics = metrics_of(one), metrics_of(two)
    assert [m["train/global_batch_size"] for m in metrics] == [16, 16]
    assert metrics[1]["ppo/eval_reward_start"] == pytest.approx(metrics[0]["ppo/eval_reward_start"], abs=1e-5)
    curves = [[entry["reward"] for entry in jsonl(run / "ppo_log.jsonl")] for run in (one, two)]
    seen = {key: [m[key] for m in metrics] for key in ("ppo/eval_reward_start", "ppo/eval_reward_end",
                                                       "ppo/reward_start", "ppo/reward_end", "ppo/kl_end")}
    seen["mean_reward"] = [statistics.mean(curve) for curve in curves]
    assert metrics[0]["ppo/eval_reward_end"] > metrics[0]["ppo/eval_reward_start"] + 0.3, seen  # one process learns
    # Per-answer sampling noise, whole-batch whitening, minibatches and token-mean losses: the same updates up to
    # float rounding. Rounding differs between one process and two (gradients summed across processes), and once a
    # sampled token lands on the other side of a near-tie the two runs roll out different answers: compared update
    # by update for the first 10 (measured here, seed 42: all 20 rollout rewards equal, losses within 4e-5, KL
    # within 5e-4; on CI's machine the first 12 matched, then rewards drifted by up to 0.18), then as a whole.
    logs = [jsonl(run / "ppo_log.jsonl") for run in (one, two)]
    for key in ("reward", "loss/policy", "loss/value", "kl"):
        assert [e[key] for e in logs[1][:10]] == pytest.approx([e[key] for e in logs[0][:10]], rel=0.02, abs=1e-3), key
    assert seen["mean_reward"][1] == pytest.approx(seen["mean_reward"][0], abs=0.1), seen
    assert metrics[1]["ppo/eval_reward_end"] > metrics[1]["ppo/eval_reward_start"] + 0.3, seen  # two processes learn


def test_ppo_from_a_merged_run_adapter_starts_at_kl_zero(noisy_sft_run, tmp_path):
    """run_adapter: merge folds the SFT run's adapter into the base and trains a new one: the reference is that
    merged base (the new adapter off), so policy and reference agree before the first update. Loading the run's
    adapter again as the reference (base + twice its change) gave a KL far from 0 here."""
    from alignkit.stages.ppo import build_trainer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = load_recipe(DEMO_PPO, [f"model.name_or_path={noisy_sft_run}", "model.run_adapter=merge",
                                    "adapter={method: lora, r: 8, lora_alpha: 16, target_modules: all-linear}",
                                    *QUICK, f"train.output_dir={run_dir}"])
    trainer = build_trainer(recipe, RunDir(path=run_dir))
    assert trainer.models.reference is None and trainer.models.reference_adapter is None
    rollout = trainer.rollout(trainer._prompts_for(1), seed=1)
    assert rollout.mask.sum() > 0
    assert rollout.kl.abs().max() < 1e-6
    assert (rollout.logprobs - rollout.ref_logprobs).abs().max() < 1e-6


def test_a_critic_from_a_reward_model_with_another_tokenizer_is_a_recipe_error(demo_model_path, tmp_path):
    """The critic would read the policy's token ids with the reward model's embeddings: refused before training."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward_model = tmp_path / "rm"
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    tokenizer.add_tokens(["<reward>"])  # one token more: a vocabulary the policy's ids do not index alike
    AutoModelForSequenceClassification.from_pretrained(demo_model_path, num_labels=1).save_pretrained(reward_model)
    tokenizer.save_pretrained(reward_model)
    from alignkit.stages.ppo import build_trainer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = load_recipe(DEMO_PPO, [*FROM_BASE, f"reward.sources=[{{model: {reward_model}}}]",
                                    "train.critic_init=reward_model", f"train.output_dir={run_dir}"])
    with pytest.raises(RecipeError, match=r"its tokenizer is not the policy's .*'<reward>'.*critic_init: policy"):
        build_trainer(recipe, RunDir(path=run_dir))
