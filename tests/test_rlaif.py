"""RLAIF (the ``rlaif`` stage): pairing sampled answers, keeping the judge's confident labels, the section's
validation, DPO on pairs labelled by the demo's LLM judge raising the rule reward, a reward model trained on
AI labels, and resuming an interrupted run."""

from __future__ import annotations

import json
import random

import pytest
from conftest import REPO, kill_when_written, metrics_of, run_cli, run_ok

from alignkit.errors import RecipeError
from alignkit.feedback import RewardModel
from alignkit.feedback.revision import RevisionSettings, critique_and_revise
from alignkit.recipe.loading import load_recipe
from alignkit.stages.rlaif.pairs import Pair, confident_pairs, label_agreement, make_pairs, preference_row

DEMO_RLAIF = str(REPO / "recipes/demo/rlaif.yaml")
RULE_JUDGE = "rlaif.judge={kind: rule, function: 'alignkit.demo.rewards:reversal_reward'}"
PROMPT = [{"role": "user", "content": "reverse: a b c"}]


# --------------------------------------------------------------------------------------------------
# Pairs and labels
# --------------------------------------------------------------------------------------------------


def test_pairs_are_distinct_non_empty_answers_to_the_same_prompt():
    prompts = [PROMPT] * 4 + [[{"role": "user", "content": "reverse: x y"}]] * 4
    answers = ["c b a", " c b a", "a b c", "", "y x", "y x", "y x", "   "]
    pairing = make_pairs(prompts, answers, 4, None, random.Random(0), rewards=[1, 1, 0.3, 0, 1, 1, 1, 0])
    # Prompt 0 has two distinct answers ("c b a" twice, once with a space): one pair. Prompt 1 has one: none.
    assert len(pairing.pairs) == 1 and pairing.empty_answers == 2 and pairing.unpaired_prompts == 1
    [pair] = pairing.pairs
    assert {pair.first, pair.second} == {"c b a", "a b c"} and pair.prompt == PROMPT and pair.prompt_index == 0
    assert {pair.first_reward, pair.second_reward} == {1.0, 0.3}
    with pytest.raises(ValueError, match="7 answers to 7 prompts is not 4 per prompt"):
        make_pairs(prompts[:7], answers[:7], 4, None, random.Random(0))


def test_pairs_per_prompt_caps_the_pairs_and_the_order_shown_is_random():
    answers = [f"answer {i}" for i in range(5)] * 40  # 40 prompts, 5 distinct answers each: 10 pairs each
    prompts = [PROMPT] * len(answers)
    assert len(make_pairs(prompts, answers, 5, None, random.Random(0)).pairs) == 400
    capped = make_pairs(prompts, answers, 5, 3, random.Random(0)).pairs
    assert len(capped) == 120 and all(sum(p.prompt_index == i for p in capped) == 3 for i in range(40))
    # Which answer is shown first does not follow the sampling order (a judge's position bias would).
    first_sampled_first = sum(p.first < p.second for p in capped)
    assert 40 < first_sampled_first < 80


def test_only_confident_decided_pairs_are_kept_with_the_preferred_answer_chosen():
    pairs = [Pair(0, PROMPT, "c b a", "a b c", preference=p, first_reward=1.0, second_reward=0.0)
             for p in (0.95, 0.3, 0.5, 0.55, 0.0)]
    assert [p.confidence for p in pairs] == pytest.approx([0.9, 0.4, 0.0, 0.1, 1.0])
    assert confident_pairs(pairs, 0.0) == [pairs[0], pairs[1], pairs[3], pairs[4]]  # a tie is never a label
    assert confident_pairs(pairs, 0.4) == [pairs[0], pairs[1], pairs[4]]
    row = preference_row(pairs[1])  # the judge preferred the second answer
    assert row["chosen"] == [{"role": "assistant", "content": "a b c"}] and row["rejected"][0]["content"] == "c b a"
    assert row["prompt"] == PROMPT and row["confidence"] == pytest.approx(0.4)
    # The monitoring reward agrees with the labels of pairs 0 and 3 and disagrees with 1 and 4.
    assert label_agreement(confident_pairs(pairs, 0.0)) == 0.5
    assert label_agreement([Pair(0, PROMPT, "a", "b", 0.9)]) is None  # no reward to compare with


@pytest.mark.parametrize(("overrides", "message"), [
    (["rlaif.judge=null"], "needs a judge"),
    (["rlaif.samples_per_prompt=1"], "samples_per_prompt must be >= 2"),
    (["rlaif.min_confidence=1.0"], "min_confidence must lie in [0, 1)"),
    (["rlaif.objective=rm", "train={output_dir: runs/x}"], "objective rm trains a reward model"),
    (["rlaif.objective=ppo"], "expects one of 'dpo', 'rm'"),
    (["rlaif.generation.do_sample=false"], "generation.do_sample must be true"),
    (["rlaif.pair_per_prompt=2"], "Did you mean 'pairs_per_prompt'?"),
    (["rlaif.judge.swapp=false"], "Did you mean 'swap'?"),
    (["rlaif=null"], "missing section 'rlaif'"),
    # The train section is TRL's DPOConfig, or RewardConfig for a reward model: each knows its own options.
    (["rlaif.objective=rm", "rlaif.iterations=1"], "unknown key 'beta' in section 'train'"),
    (["train.loss_type=[sigmoidd]"], "unknown DPO loss 'sigmoidd'"),
])
def test_section_errors_name_the_problem(overrides, message):
    with pytest.raises(RecipeError) as caught:
        load_recipe(DEMO_RLAIF, overrides)
    assert message in str(caught.value)


def test_reward_model_objective_takes_the_reward_trainers_options():
    recipe = load_recipe(DEMO_RLAIF, ["rlaif.objective=rm", "rlaif.iterations=1", "train={output_dir: runs/x, "
                                      "center_rewards_coefficient: 0.01}", "model.run_adapter=merge",
                                      "adapter={method: lora, r: 8}"])
    assert recipe.sections["rlaif"].objective == "rm" and recipe.train["center_rewards_coefficient"] == 0.01


# --------------------------------------------------------------------------------------------------
# The stage on the demo
# --------------------------------------------------------------------------------------------------


def test_demo_rlaif_dpo_on_pairs_labelled_by_the_llm_judge_raises_the_rule_reward(noisy_sft_run, demo_judge_run,
                                                                                  tmp_path):
    """recipes/demo/rlaif.yaml as shipped: the demo LLM judge labels pairs of the noisy policy's answers (the
    rule only monitors). Observed on 2 cores (the judge trained 2,000 steps): held-out greedy rule reward
    0.186 -> 0.539 -> 0.637 over the two iterations, keeping 255 and 455 of ~980 judged pairs, of which 91% and
    88% agree with the rule. (Earlier, with a judge of 0.94 agreement: 0.171 -> 0.523 -> 0.578; with the rule
    itself as judge, every label right: 0.171 -> 0.439 -> 0.582.)"""
    run_dir = tmp_path / "run"
    run_ok("rlaif", DEMO_RLAIF, f"model.name_or_path={noisy_sft_run}", f"rlaif.judge.model={demo_judge_run}",
           f"train.output_dir={run_dir}", "train.save_strategy=no")
    metrics = metrics_of(run_dir)
    log = [json.loads(line) for line in (run_dir / "rlaif_log.jsonl").read_text().splitlines()]
    print(f"rlaif demo: {metrics}\n{log}")
    start = metrics["rlaif/eval_reward_start"]
    assert start < 0.3
    assert all(entry["eval_reward"] >= start + 0.2 for entry in log)
    assert metrics["rlaif/eval_reward_end"] >= start + 0.25
    # The labels come from the judge, not the rule; most of them agree with it.
    assert all(entry["label_agreement"] >= 0.65 and entry["judge_skipped"] == 0 for entry in log)


def test_rlaif_with_a_rule_judge_revises_then_writes_the_labelled_pairs_and_trains(noisy_sft_run, tmp_path):
    """One iteration with the critique -> revision step first. The tiny demo policy cannot critique anything:
    this checks the data flow (rewrites written, the policy fine-tuned on them, then sampled, paired, judged,
    filtered and trained with DPO)."""
    run_dir = tmp_path / "run"
    run_ok("rlaif", DEMO_RLAIF, f"model.name_or_path={noisy_sft_run}", f"train.output_dir={run_dir}", RULE_JUDGE,
           "rlaif.iterations=1", "rlaif.prompts_per_iteration=64", "train.max_steps=8", "train.save_strategy=no",
           "evaluate.max_samples=16", "rlaif.revision={prompts: 16, generation: {max_new_tokens: 8}, "
           "sft: {max_steps: 3, save_strategy: 'no'}}")
    # The revision step: 16 answers critiqued and rewritten, the SFT rows are the non-empty rewrites.
    rows = [json.loads(line) for line in (run_dir / "revision" / "revisions.jsonl").read_text().splitlines()]
    revised = [json.loads(line) for line in (run_dir / "revision" / "revised.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(len(row["critiques"]) == 1 for row in rows if row["answer"].strip())
    assert [r["messages"][-1]["content"] for r in revised] == [row["revisions"][-1] for row in rows
                                                                if row["revisions"] and row["revisions"][-1].strip()]
    log = [json.loads(line) for line in (run_dir / "rlaif_log.jsonl").read_text().splitlines()]
    assert [entry["iteration"] for entry in log] == [0, 1] and log[0]["train_steps"] == 3
    state = json.loads((run_dir / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["history"][0]["step"] == "revision"  # iteration 1 sampled from the revised policy

    # The iteration: samples, every judged pair, the kept ones as preference rows.
    iteration = run_dir / "iteration-1"
    samples = [json.loads(line) for line in (iteration / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (iteration / "pairs.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in (iteration / "preferences.jsonl").read_text().splitlines()]
    counts = json.loads((iteration / "label_counts.json").read_text())
    assert len(samples) == 64 * 4 == counts["samples"]
    assert 0 < len(pairs) <= 64 * 2 and counts["judge_compared"] == len(pairs)
    # The rule judge is certain wherever the rewards differ, and calls a tie where they do not.
    for pair in pairs:
        decided = pair["first_reward"] != pair["second_reward"]
        assert pair["confidence"] == (1.0 if decided else 0.0)
    assert len(kept) == sum(p["confidence"] >= 0.2 for p in pairs)
    metrics = metrics_of(run_dir)
    assert metrics["rlaif/pairs_kept_end"] == len(kept) and metrics["rlaif/label_agreement_end"] == 1.0
    assert metrics["rlaif/revised_answers"] == len(revised) > 0
    assert {"rlaif/eval_reward_start", "rlaif/eval_reward_end"} <= set(metrics)
    # The run dir is the policy: the iteration's adapter, on the original base.
    adapter = "adapter_model.safetensors"
    assert (run_dir / adapter).read_bytes() == (iteration / adapter).read_bytes()
    assert (run_dir / "reward.png").is_file() and "rlaif/eval_reward" in (run_dir / "report.md").read_text()


def test_rlaif_reward_model_objective_learns_the_ai_labels(noisy_sft_run, tmp_path):
    run_dir = tmp_path / "rm"
    run_ok("rlaif", DEMO_RLAIF, f"model.name_or_path={noisy_sft_run}", RULE_JUDGE, "rlaif.objective=rm",
           "rlaif.iterations=1", "rlaif.prompts_per_iteration=200", "model.run_adapter=merge",
           "adapter={method: lora, r: 16, lora_alpha: 32, target_modules: all-linear}",
           # A reward model's train section is RewardConfig's: the demo's DPO one is replaced whole.
           f"train={{output_dir: '{run_dir}', max_steps: 60, learning_rate: 3.0e-3, save_strategy: 'no', "
           "per_device_train_batch_size: 32, max_length: 64, bf16: false, activation_checkpointing: false, "
           "report_to: none, logging_steps: 10}")
    kept = [json.loads(line) for line in (run_dir / "iteration-1" / "preferences.jsonl").read_text().splitlines()]
    scorer = RewardModel.load(run_dir)  # the run dir is a reward model, as a ppo reward source loads it
    chosen = scorer.score([row["prompt"] for row in kept], [row["chosen"][0]["content"] for row in kept])
    rejected = scorer.score([row["prompt"] for row in kept], [row["rejected"][0]["content"] for row in kept])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(kept)
    print(f"reward model on its {len(kept)} AI-labelled pairs: accuracy {accuracy:.3f}")
    assert accuracy >= 0.75
    assert "rlaif/eval_reward_end" not in metrics_of(run_dir)  # a reward model has no answers to monitor


def test_killed_rlaif_run_resumes_after_its_last_iteration(noisy_sft_run, tmp_path):
    run_dir = tmp_path / "run"
    args = ["rlaif", DEMO_RLAIF, f"model.name_or_path={noisy_sft_run}", f"train.output_dir={run_dir}", RULE_JUDGE,
            "rlaif.iterations=3", "rlaif.prompts_per_iteration=32", "train.max_steps=4", "train.save_strategy=no",
            "evaluate.max_samples=8"]
    kill_when_written(args, run_dir / "checkpoint-1" / "trainer_state.json", tmp_path / "first.log")
    first_pairs = (run_dir / "iteration-1" / "pairs.jsonl").read_text()

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rlaif: resuming after iteration 1" in resumed.stderr
    log = [json.loads(line) for line in (run_dir / "rlaif_log.jsonl").read_text().splitlines()]
    assert [entry["iteration"] for entry in log] == [1, 2, 3]  # each once, none lost or repeated
    assert (run_dir / "iteration-1" / "pairs.jsonl").read_text() == first_pairs  # iteration 1 was not redone
    assert metrics_of(run_dir)["rlaif/iterations"] == 3


# --------------------------------------------------------------------------------------------------
# Critique -> revision (Constitutional AI's supervised stage)
# --------------------------------------------------------------------------------------------------


def test_critique_then_revision_continues_the_conversation_round_by_round(monkeypatch):
    asked: list[list[dict]] = []

    def scripted(model, tokenizer, conversations, settings):
        # Critiques name the answer they read; revisions append "+"; the answer "stop" gets an empty critique.
        replies = []
        for conversation in conversations:
            asked.append(conversation)
            if conversation[-1]["content"].startswith("Critique"):
                latest = conversation[-2]["content"]
                replies.append("" if latest == "stop" else f"critique of {latest}")
            else:
                replies.append(conversation[-4]["content"] + "+")
        return replies

    monkeypatch.setattr("alignkit.generation.generate", scripted)
    settings = RevisionSettings(constitution="Be right.", critique_request="Critique by: {constitution}",
                                revision_request="Revise by: {constitution}", rounds=2)
    [revised, stopped, empty] = critique_and_revise(None, None, [PROMPT] * 3, ["c a b", "stop", " "], settings)
    assert revised.critiques == ["critique of c a b", "critique of c a b+"]
    assert revised.revisions == ["c a b+", "c a b++"] and revised.final == "c a b++"
    assert stopped.critiques == [""] and stopped.revisions == [] and stopped.final == ""
    assert empty.critiques == [] and empty.final == ""  # an empty answer is not critiqued
    # The second round's revision request: the prompt, the latest answer (round 1's revision), the critique
    # request, its critique, the revision request.
    assert asked[-1] == [*PROMPT, {"role": "assistant", "content": "c a b+"},
                         {"role": "user", "content": "Critique by: Be right."},
                         {"role": "assistant", "content": "critique of c a b+"},
                         {"role": "user", "content": "Revise by: Be right."}]
    with pytest.raises(RecipeError, match="unknown key 'max_step' in section 'rlaif.revision.sft'"):
        RevisionSettings(sft={"max_step": 3})
