"""Judges (alignkit.feedback): the demo LLM judge agrees with the ground truth, swapping the answers cancels
position bias exactly, reward-model and rule judges give preference probabilities, and bad settings or
answers are clear errors or counted skips.

Observed on 2 cores (recipes/demo/judge.yaml as shipped: 2,000 full fine-tuning steps of chain-of-thought SFT
from the base, ~3 min): held-out agreement with the rule 0.965 asked in both orders and 0.95 in the shown order
only; by kind (both orders) echoes 1.00, dropped words 1.00, repeats 1.00, swaps 0.86. Probability mass on the
two labels 0.9999, position bias 0.02. At 1,000 steps the reasoning copied the answers badly: 0.725.
(Trained on the bare label instead of checking first: 0.62, at chance on all but dropped words; with the
default, longer reasoning instruction: 0.77-0.80.)
"""

from __future__ import annotations

import math

import pytest
from conftest import metrics_of, run_ok

from alignkit.demo.rewards import reversal_reward, reversal_score
from alignkit.demo.tasks import (
    DEMO_JUDGE_CONSTITUTION,
    DEMO_JUDGE_MAX_NEW_TOKENS,
    DEMO_JUDGE_REASONING,
    DEMO_JUDGE_TEMPLATE,
    judge_rationale,
    reverse_judge,
    reverse_judge_pairs,
)
from alignkit.errors import RecipeError
from alignkit.feedback import (
    JudgeSettings,
    LLMJudge,
    RewardModelJudge,
    RuleJudge,
    judge_question,
    load_judge,
    option_tokens,
    win_rates,
)
from alignkit.recipe import schema
from alignkit.recipe.loading import load_recipe

REVERSAL_RULE = "alignkit.demo.rewards:reversal_reward"
# What the demo judge was trained on: its questions are asked with these.
DEMO_QUESTION = {"template": DEMO_JUDGE_TEMPLATE, "constitution": DEMO_JUDGE_CONSTITUTION}
# ... and it checks both answers before it names one.
DEMO_JUDGE = {**DEMO_QUESTION, "chain_of_thought": True, "reasoning_instruction": DEMO_JUDGE_REASONING,
              "max_new_tokens": DEMO_JUDGE_MAX_NEW_TOKENS}


# --------------------------------------------------------------------------------------------------
# Fixtures: the held-out pairs, the untrained demo model as a judge, the trained demo judge
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out() -> dict[str, list]:
    """The demo judge's held-out pairs (prompts unseen in its training), right answer first in half of them,
    and which answer the ground truth prefers."""
    pairs = reverse_judge_pairs("test")
    first = [p["right"] if p["right_first"] else p["wrong"] for p in pairs]
    second = [p["wrong"] if p["right_first"] else p["right"] for p in pairs]
    prompts = [p["prompt"] for p in pairs]
    truth = [reversal_score(p, a) > reversal_score(p, b) for p, a, b in zip(prompts, first, second)]
    return {"prompts": prompts, "first": first, "second": second, "first_is_better": truth}


@pytest.fixture(scope="module")
def base_judge() -> LLMJudge:
    """The untrained demo base model asked the judge's questions: a judge with no skill and a strong taste
    for one position, for the mechanics."""
    return LLMJudge.load("demo:tiny-llama", **DEMO_QUESTION)


@pytest.fixture(scope="module")
def judge_run(demo_judge_run):
    return demo_judge_run


def agreement(preferences: list[float], first_is_better: list[bool]) -> float:
    """Share of pairs where the judge prefers (p > 0.5) the answer the ground truth prefers; a tie disagrees."""
    return sum((p > 0.5 and truth) or (p < 0.5 and not truth)
               for p, truth in zip(preferences, first_is_better)) / len(preferences)


@pytest.fixture(scope="module")
def judge_agreement(judge_run, held_out) -> dict:
    """The trained demo judge's agreement with the ground truth on the held-out pairs, asked in both orders
    (swap) and in the shown order only, overall and per corruption kind."""
    kinds = [pair["kind"] for pair in reverse_judge_pairs("test")]
    result = {}
    for swap in (True, False):
        judge = load_judge(JudgeSettings(kind="llm", model=str(judge_run), swap=swap, **DEMO_JUDGE))
        preferences = judge.compare(held_out["prompts"], held_out["first"], held_out["second"])
        by_kind = {kind: agreement([p for p, k in zip(preferences, kinds) if k == kind],
                                   [t for t, k in zip(held_out["first_is_better"], kinds) if k == kind])
                   for kind in sorted(set(kinds))}
        result[swap] = {"agreement": agreement(preferences, held_out["first_is_better"]), "by_kind": by_kind,
                        "stats": judge.stats.summary()}
    print(f"demo judge on {len(kinds)} held-out pairs: {result}")
    return result


# --------------------------------------------------------------------------------------------------
# The demo LLM judge
# --------------------------------------------------------------------------------------------------


def test_demo_judge_agrees_with_the_ground_truth_with_and_without_swapping(judge_agreement, judge_run):
    swapped, one_order = judge_agreement[True], judge_agreement[False]
    for result in (swapped, one_order):
        assert result["agreement"] >= 0.8, result  # issue 6's bar, asked in both orders and in one
        assert result["stats"]["compared"] >= 200 and result["stats"]["skipped"] == 0
        assert result["stats"]["option_mass"] > 0.9  # it answers with a label, as it was taught
        assert min(result["by_kind"].values()) >= 0.6, result  # no kind of mistake at chance
    assert swapped["agreement"] >= one_order["agreement"] - 0.03  # averaging both orders does not hurt
    # The training run's own greedy evaluation: after the reference check of both answers, the label it writes
    # is the right one (the verdict follows the reasoning; its own reasoning is what can be wrong).
    assert metrics_of(judge_run)["eval/exact_match"] >= 0.95


def test_demo_judge_is_trained_on_the_questions_the_judge_asks(base_judge):
    pairs, rows = reverse_judge_pairs("train"), reverse_judge("train")
    judge = LLMJudge(model=base_judge.model, tokenizer=base_judge.tokenizer, batch_size=8, **DEMO_JUDGE)
    for pair, row in zip(pairs[:8], rows[::2][:8]):
        shown = (pair["right"], pair["wrong"]) if pair["right_first"] else (pair["wrong"], pair["right"])
        [asked] = judge.questions([pair["prompt"]], [shown[0]], [shown[1]])
        question, rationale, follow_up, verdict = row["messages"]
        assert [question, follow_up] == [asked[0], asked[2]]  # the judge's own questions, around its reasoning
        assert rationale == {"role": "assistant", "content": judge_rationale(pair["prompt"], *shown)}
        assert verdict["content"] == ("1" if pair["right_first"] else "2")
    # The reasoning: per answer, its words that agree with the right reversal up to the first mistake, and a mark.
    prompt = [{"role": "user", "content": "reverse: apple river stone"}]
    assert judge_rationale(prompt, "stone river apple", "stone apple river") == "1: stone river apple+\n2: stone-"
    assert judge_rationale(prompt, "apple river stone", "stone river") == "1:-\n2: stone river-"
    labels = [row["messages"][-1]["content"] for row in rows]
    assert labels.count("1") == labels.count("2") == len(pairs)  # every pair in both orders
    held_out_prompts = {str(pair["prompt"]) for pair in reverse_judge_pairs("test")}
    assert len(held_out_prompts) >= 200 and not held_out_prompts & {str(pair["prompt"]) for pair in pairs}


def test_swapping_cancels_position_bias_exactly(base_judge, held_out):
    prompts, a, b = held_out["prompts"][:24], held_out["first"][:24], held_out["second"][:24]
    forward = base_judge.compare(prompts, a, b)
    backward = base_judge.compare(prompts, b, a)
    assert all(p == pytest.approx(1 - q, abs=1e-6) for p, q in zip(forward, backward))
    # The untrained model does prefer a position: asked one order only, its answers do not mirror.
    one_order = LLMJudge(model=base_judge.model, tokenizer=base_judge.tokenizer, swap=False, **DEMO_QUESTION)
    forward, backward = one_order.compare(prompts, a, b), one_order.compare(prompts, b, a)
    assert max(abs(p + q - 1) for p, q in zip(forward, backward)) > 0.01
    assert abs(base_judge.stats.summary()["first_position_bias"]) > 0.005


def test_chain_of_thought_reads_the_verdict_after_a_generated_rationale(base_judge, held_out):
    judge = LLMJudge(model=base_judge.model, tokenizer=base_judge.tokenizer, chain_of_thought=True, max_new_tokens=6,
                     batch_size=8, **DEMO_QUESTION)
    prompts, a, b = held_out["prompts"][:6], held_out["first"][:6], held_out["second"][:6]
    [conversation] = judge.questions(prompts[:1], a[:1], b[:1])
    assert [m["role"] for m in conversation] == ["user", "assistant", "user"]
    assert conversation[0]["content"].endswith("give no verdict yet.") and conversation[2]["content"] == "Reply 1 or 2."
    forward, backward = judge.compare(prompts, a, b), judge.compare(prompts, b, a)
    assert all(0 < p < 1 for p in forward)
    assert all(p == pytest.approx(1 - q, abs=1e-5) for p, q in zip(forward, backward))


# --------------------------------------------------------------------------------------------------
# Reward-model and rule judges, win rates
# --------------------------------------------------------------------------------------------------


class FixedRewards:
    """A stand-in reward model: the reward of an answer is its number of words."""

    def score(self, prompts, answers):
        return [float(len(answer.split())) for answer in answers]


def test_reward_model_judge_gives_bradley_terry_probabilities():
    judge = RewardModelJudge(FixedRewards())
    prompts = [[{"role": "user", "content": "?"}]] * 4
    preferences = judge.compare(prompts, ["a b c", "a", "a b", "a " * 2000], ["a", "a b c", "c d", ""])
    assert preferences[:3] == [pytest.approx(1 / (1 + math.exp(-2))), pytest.approx(1 / (1 + math.exp(2))), 0.5]
    assert preferences[3] == 1.0  # a reward difference of 2000 neither overflows nor leaves [0, 1]
    assert win_rates(preferences) == {"win_rate": 0.5, "tie_rate": 0.25, "loss_rate": 0.25}
    assert win_rates(preferences, tie_margin=0.4) == {"win_rate": 0.25, "tie_rate": 0.75, "loss_rate": 0.0}
    assert judge.stats.compared == 4


def test_rule_judge_compares_the_rule_rewards(held_out):
    judge = load_judge(JudgeSettings(kind="rule", function=REVERSAL_RULE))
    prompts, first, second = held_out["prompts"], held_out["first"], held_out["second"]
    preferences = judge.compare(prompts, first, second)
    assert agreement(preferences, held_out["first_is_better"]) == 1.0
    assert set(preferences) == {0.0, 1.0}
    assert judge.compare(prompts[:2], first[:2], first[:2]) == [0.5, 0.5]  # equal scores: a tie

    graded = RuleJudge(function=reversal_reward, temperature=0.1)
    for p, a, b, preference in zip(prompts[:8], first[:8], second[:8], graded.compare(prompts[:8], first[:8],
                                                                                        second[:8])):
        difference = reversal_score(p, a) - reversal_score(p, b)
        assert preference == pytest.approx(1 / (1 + math.exp(-difference / 0.1)))


def test_rule_judge_import_errors_name_what_is_missing():
    with pytest.raises(RecipeError, match="has no 'reversal_rewrd'.*Did you mean 'reversal_reward'"):
        load_judge(JudgeSettings(kind="rule", function="alignkit.demo.rewards:reversal_rewrd"))
    with pytest.raises(RecipeError, match="cannot import module 'alignkit.demo.rewardz'"):
        load_judge(JudgeSettings(kind="rule", function="alignkit.demo.rewardz:reversal_reward"))
    with pytest.raises(RecipeError, match="not an import path of the form module:function"):
        schema.build(JudgeSettings, {"kind": "rule", "function": "alignkit.demo.rewards.reversal_reward"}, "judge")


# --------------------------------------------------------------------------------------------------
# Bad labels, bad answers, bad settings
# --------------------------------------------------------------------------------------------------


def test_option_labels_must_be_distinct_single_tokens(base_judge):
    tokenizer = base_judge.tokenizer
    # The demo tokenizer writes a lone "1" as a word-boundary token then "1": read after the shared prefix.
    tokens = option_tokens(tokenizer, ("1", "2"))
    assert tokenizer.convert_ids_to_tokens([*tokens.prefix, tokens.first, tokens.second]) == ["Ġ", "1", "2"]
    with pytest.raises(ValueError, match="'yes' is not a single token"):
        LLMJudge(model=base_judge.model, tokenizer=tokenizer, options=("yes", "no"))
    with pytest.raises(ValueError, match="must differ, got '1' twice"):
        option_tokens(tokenizer, ("1", "1"))
    with pytest.raises(ValueError, match="'1' and ' 1' are the same token"):
        option_tokens(tokenizer, ("1", " 1"))
    with pytest.raises(RecipeError, match="option labels must differ"):
        schema.build(JudgeSettings, {"kind": "llm", "model": "m", "options": ["A", "A"]}, "judge")


def test_empty_answers_and_overlong_questions_are_counted_skips(base_judge, held_out):
    judge = LLMJudge(model=base_judge.model, tokenizer=base_judge.tokenizer, **DEMO_QUESTION)
    prompts, a, b = held_out["prompts"][:4], held_out["first"][:4], held_out["second"][:4]
    preferences = judge.compare(prompts, [a[0], "", a[2], "  "], [b[0], b[1], "", b[3]])
    assert preferences[1:] == [0.5, 0.5, 0.5] and preferences[0] != 0.5
    assert judge.stats.summary() | {"option_mass": 0, "first_position_bias": 0} == {
        "compared": 1, "skipped": 3, "skipped_empty_answer": 3, "option_mass": 0, "first_position_bias": 0}

    short = LLMJudge(model=base_judge.model, tokenizer=base_judge.tokenizer, max_length=40, **DEMO_QUESTION)
    assert short.compare(prompts, a, b) == [0.5] * 4
    assert short.stats.skipped == {"too_long": 4}


def test_judge_settings_are_validated_like_any_recipe_section():
    assert load_recipe("recipes/demo/eval.yaml", ["evaluate.judge=runs/demo-rm"]).evaluate.judge == JudgeSettings(
        kind="reward_model", model="runs/demo-rm")
    llm = load_recipe("recipes/demo/eval.yaml", ["evaluate.judge={kind: llm, model: runs/demo-judge, swap: false}"])
    assert llm.evaluate.judge.swap is False and llm.evaluate.judge.label == "runs/demo-judge (LLM judge)"
    bad = {
        "{kind: llm, model: m, swapp: false}": "unknown key 'swapp' in section 'evaluate.judge'.*Did you mean 'swap'",
        "{kind: lm, model: m}": "expects one of 'llm', 'reward_model', 'rule' \\(Did you mean 'llm'",
        "{kind: llm}": "a judge of kind 'llm' needs 'model'",
        f"{{kind: rule, function: '{REVERSAL_RULE}', model: m}}": "takes 'function', not 'model'",
        "{kind: llm, model: m, template: '{prompt} {answer_1} {anser_2}'}": "unknown placeholder '\\{anser_2\\}'.*"
                                                                            "Did you mean 'answer_2'",
        "{kind: llm, model: m, template: '{prompt} {answer_1}'}": "lacks \\{answer_2\\}",
    }
    for value, message in bad.items():
        with pytest.raises(RecipeError, match=message):
            load_recipe("recipes/demo/eval.yaml", [f"evaluate.judge={value}"])


def test_the_question_holds_the_constitution_the_prompt_and_both_labelled_answers():
    question = judge_question([{"role": "user", "content": "reverse: a b"}], "b a", "a b", constitution="Be right.",
                              options=("A", "B"))
    assert question == ("Which answer to the prompt is better?\nPrinciples: Be right.\nPrompt: reverse: a b\n"
                        "Answer A: b a\nAnswer B: a b\nReply A or B.")


# --------------------------------------------------------------------------------------------------
# Win rates in evaluation, with any judge
# --------------------------------------------------------------------------------------------------


def test_evaluation_win_rate_with_a_rule_judge(tmp_path):
    out = tmp_path / "eval"
    run_ok("eval", "recipes/demo/eval.yaml", "model.name_or_path=demo:tiny-llama", "evaluate.compare=null",
           "evaluate.max_samples=40", f"train.output_dir={out}",
           f"evaluate.judge={{kind: rule, function: '{REVERSAL_RULE}'}}")
    metrics = metrics_of(out)
    # The untrained base does not reverse: the references beat its answers.
    assert metrics["eval/loss_rate"] >= 0.9 and metrics["eval/win_rate"] == 0.0, metrics
    assert f"Judged by `{REVERSAL_RULE}`" in (out / "report.md").read_text()
