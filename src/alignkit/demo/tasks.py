"""Demo tasks: small, deterministic datasets that a ~1M-parameter model can learn on a CPU.

Every dataset is generated from a fixed seed, so the same name always yields the same rows, and the
held-out split never shares a prompt with the train split. Recipes name them as ``demo:<task>/<kind>``
(for example ``demo:reverse/sft``); later stages add kinds (preference pairs, prompt-only sets) to the
same registry without touching the loaders.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar

from alignkit.demo.rewards import REVERSE_INSTRUCTION, completion_words, reversal_answer
from alignkit.recipe.settings.judge_text import answer_instruction, judge_question

T = TypeVar("T")

# A closed vocabulary keeps the tokenizer tiny (every word becomes one token) and makes "learning the
# task" the only thing the model has to do.
WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "green", "table", "music", "light", "house", "bread",
    "water", "plant", "chair", "horse", "smile", "dream", "night", "sugar", "paper", "glass",
    "tiger", "lemon", "ocean", "field", "storm", "grape", "piano", "tower", "flame", "honey",
    "eagle", "frost", "maple", "coral", "pearl", "spoon", "train", "wheel", "candle", "garden",
    "forest", "silver", "orange", "rabbit", "window", "button", "rocket", "castle", "pencil", "mirror",
    "basket", "violin", "island", "desert", "planet", "carpet", "bottle", "jacket", "turtle", "summer",
    "winter", "autumn", "spring", "yellow", "purple", "copper", "marble", "meadow", "valley", "harbor",
    "bridge", "lantern", "blanket", "thunder", "morning", "evening", "crystal", "feather", "pillow", "kettle",
    "cactus", "dolphin", "giraffe", "penguin", "pepper", "cherry", "banana", "melon", "peach", "olive",
    "cotton", "velvet", "shadow", "sunset", "meteor", "comet", "breeze", "pebble", "canyon", "glacier",
)

# Instructions the demo *base* model is pretrained on (see demo.build), so it knows the words, the chat
# format and how to end a turn, but has never seen the tasks that recipes teach it.
PRETRAIN_INSTRUCTIONS: tuple[str, ...] = ("copy:", "first:", "last:")
TASK_INSTRUCTIONS: tuple[str, ...] = (REVERSE_INSTRUCTION, *PRETRAIN_INSTRUCTIONS)

_SPLIT_SIZES = {"train": 4000, "test": 200}
_SPLIT_SEEDS = {"train": 1234, "test": 98765}


def _random_phrase(rng: random.Random, min_words: int = 3, max_words: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(min_words, max_words))


def _unique_draws(split: str, draw: Callable[[random.Random], T], seed_offset: int = 0) -> list[T]:
    """``draw`` repeated for ``split`` until it has enough distinct results; held-out draws exclude train's.

    Results are compared by their ``repr`` so lists and dicts count as equal when their contents are.
    """
    excluded: set[str] = set()
    if split == "test":
        excluded = {repr(item) for item in _unique_draws("train", draw, seed_offset)}
    rng = random.Random(_SPLIT_SEEDS[split] + seed_offset)
    items: list[T] = []
    seen: set[str] = set()
    while len(items) < _SPLIT_SIZES[split]:
        item = draw(rng)
        key = repr(item)
        if key in seen or key in excluded:
            continue
        seen.add(key)
        items.append(item)
    return items


def pretraining_conversations(count: int, seed: int = 7) -> list[list[dict]]:
    """Conversations for the demo base model: copy the words, name the first word, name the last word."""
    rng = random.Random(seed)
    answers = {"copy:": lambda p: p, "first:": lambda p: p[:1], "last:": lambda p: p[-1:]}
    conversations = []
    for _ in range(count):
        instruction = rng.choice(PRETRAIN_INSTRUCTIONS)
        phrase = _random_phrase(rng, 2, 7)
        conversations.append([
            {"role": "user", "content": f"{instruction} {' '.join(phrase)}"},
            {"role": "assistant", "content": " ".join(answers[instruction](phrase))},
        ])
    return conversations


def reverse_sft(split: str) -> list[dict]:
    """Word reversal as chat SFT rows: ``reverse: a b c`` -> ``c b a``."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"{REVERSE_INSTRUCTION} {' '.join(phrase)}"},
                {"role": "assistant", "content": " ".join(reversed(phrase))},
            ]
        }
        for phrase in _unique_draws(split, _random_phrase)
    ]


def reverse_sft_noisy(split: str) -> list[dict]:
    """Reversal SFT rows from an unreliable annotator: two answers in three just echo the phrase unreversed.

    The prompts are reverse/sft's. A policy fine-tuned on these learns both behaviours and prefers the
    echo, so it answers wrongly most of the time while still sampling the reversal now and then: the
    starting point of the RL demos, where the rule reward has to teach it which of its habits is right.
    """
    rows = reverse_sft(split)
    for index, row in enumerate(rows):
        if index % 3:
            user, answer = row["messages"]
            answer["content"] = user["content"].removeprefix(REVERSE_INSTRUCTION).strip()
    return rows


# Summarisation-like task: a "document" scatters a few content words (things) among filler words (colours,
# materials, seasons, times of day); its "summary" keeps the content words in order. Every word is one the
# base model was pretrained to copy, so the fine-tune only has to learn which words matter.
SUMMARY_FILLERS: tuple[str, ...] = (
    "green", "yellow", "purple", "orange", "silver", "copper", "marble", "cotton", "velvet", "crystal",
    "summer", "winter", "autumn", "spring", "morning", "evening", "night", "sunset", "light", "shadow",
)
SUMMARY_KEYWORDS: tuple[str, ...] = tuple(word for word in WORDS if word not in SUMMARY_FILLERS)


def _draw_document(rng: random.Random) -> dict[str, str]:
    keywords = rng.sample(SUMMARY_KEYWORDS, rng.randint(2, 4))
    document: list[str] = []
    for keyword in keywords:
        document += rng.sample(SUMMARY_FILLERS, rng.randint(1, 3)) + [keyword]
    document += rng.sample(SUMMARY_FILLERS, rng.randint(0, 2))
    return {"document": " ".join(document), "summary": " ".join(keywords)}


def summarize_raw(split: str) -> list[dict]:
    """Raw summarisation rows ``{document, summary}``: the summary is the document's content words in order."""
    return _unique_draws(split, _draw_document, seed_offset=1)


# Translation-like task: "Zorbish" is a made-up language whose words are spelled like demo words; a fixed
# dictionary maps each of 50 English words to one of the other 50, and Zorbish puts each pair of words the
# other way round (adjective-noun order, as French does), so translating means a lexicon *and* reordering.
# The base model can emit every Zorbish word (pretraining copies all of them) but has never seen the
# dictionary.
ZORBISH_SOURCE_WORDS: tuple[str, ...] = WORDS[:50]
TO_ZORBISH: dict[str, str] = dict(
    zip(ZORBISH_SOURCE_WORDS, random.Random(31).sample(WORDS[50:], 50), strict=True)
)


def translate_to_zorbish(words: list[str]) -> list[str]:
    """Word-by-word dictionary lookup, then each pair (1st, 2nd), (3rd, 4th), ... swapped."""
    glossed = [TO_ZORBISH[word] for word in words]
    for i in range(0, len(glossed) - 1, 2):
        glossed[i], glossed[i + 1] = glossed[i + 1], glossed[i]
    return glossed


def _draw_sentence(rng: random.Random) -> dict[str, str]:
    words = rng.sample(ZORBISH_SOURCE_WORDS, rng.randint(3, 6))
    return {"source": " ".join(words), "target": " ".join(translate_to_zorbish(words))}


def translate_raw(split: str) -> list[dict]:
    """Raw translation rows ``{source, target}``: English demo words and their Zorbish translation."""
    return _unique_draws(split, _draw_sentence, seed_offset=2)


# Preference data for the reversal task: the correct reversal against a corrupted one. The corruptions are
# the mistakes a half-trained model makes: echoing the input, two words out of order, a word dropped, a
# word repeated in place of another.
CORRUPTIONS: tuple[str, ...] = ("unreversed", "swap", "drop", "repeat")


def corrupt_reversal(phrase: list[str], kind: str, rng: random.Random) -> list[str]:
    """A wrong answer to ``reverse: <phrase>`` of the given ``kind`` (always different from the right one)."""
    answer = list(reversed(phrase))
    if kind == "unreversed":
        return list(phrase)
    position = rng.randrange(len(answer) - 1)
    if kind == "swap":
        answer[position], answer[position + 1] = answer[position + 1], answer[position]
    elif kind == "drop":
        del answer[rng.randrange(len(answer))]
    elif kind == "repeat":
        answer[position + 1] = answer[position]
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return answer


def _reverse_prompt(phrase: list[str]) -> list[dict]:
    return [{"role": "user", "content": f"{REVERSE_INSTRUCTION} {' '.join(phrase)}"}]


def _answer(words: list[str]) -> list[dict]:
    return [{"role": "assistant", "content": " ".join(words)}]


def reverse_preference(split: str) -> list[dict]:
    """Conversational preference pairs: ``chosen`` reverses the words, ``rejected`` is a corruption."""
    rng = random.Random(f"reverse-preference-{split}")
    rows = []
    for phrase in _unique_draws(split, _random_phrase):
        kind = CORRUPTIONS[len(rows) % len(CORRUPTIONS)]
        rows.append({"prompt": _reverse_prompt(phrase), "chosen": _answer(list(reversed(phrase))),
                     "rejected": _answer(corrupt_reversal(phrase, kind, rng))})
    return rows


def reverse_unpaired(split: str) -> list[dict]:
    """KTO-style unpaired rows: each prompt has one answer, labelled desirable (right) or not (corrupted)."""
    rng = random.Random(f"reverse-unpaired-{split}")
    rows = []
    for index, phrase in enumerate(_unique_draws(split, _random_phrase)):
        good = index % 2 == 0
        answer = list(reversed(phrase)) if good else corrupt_reversal(phrase, CORRUPTIONS[index // 2 % 4], rng)
        rows.append({"prompt": _reverse_prompt(phrase), "completion": _answer(answer), "label": good})
    return rows


def reverse_rated(split: str) -> list[dict]:
    """UltraFeedback-like rows: a prompt, four completions and a 1-10 rating each (right = 10, echo = 1)."""
    rng = random.Random(f"reverse-rated-{split}")
    ratings = {"right": 10, "swap": 6, "drop": 4, "repeat": 3, "unreversed": 1}
    rows = []
    for phrase in _unique_draws(split, _random_phrase):
        kinds = ["right", *rng.sample(CORRUPTIONS, 3)]
        rng.shuffle(kinds)
        completions = [" ".join(reversed(phrase)) if kind == "right" else " ".join(corrupt_reversal(phrase, kind, rng))
                       for kind in kinds]
        rows.append({"prompt": f"{REVERSE_INSTRUCTION} {' '.join(phrase)}", "completions": completions,
                     "ratings": [ratings[kind] for kind in kinds]})
    return rows


def reverse_prompts(split: str) -> list[dict]:
    """Prompt-only rows for the RL stages: ``reverse: a b c`` with no answer (the policy writes it and
    :func:`alignkit.demo.rewards.reversal_reward` scores it). The phrases are reverse/sft's, so the held-out
    prompts are unseen there too."""
    return [{"prompt": _reverse_prompt(phrase)} for phrase in _unique_draws(split, _random_phrase)]


# The demo judge (issue 6): the tiny model fine-tuned to answer "which answer reverses the words, 1 or 2?",
# an LLM judge that runs on a CPU. Its questions are built by the same code the LLMJudge asks with
# (alignkit.recipe.settings.judge_text), so it is trained on exactly what it is later asked. The short template and
# constitution are the demo's own (the default template costs the demo tokenizer, which spells English
# letter by letter, twice the tokens); a recipe using the judge must give the same text, with
# chain_of_thought on (the judge checks each answer before it names one, see judge_rationale).
DEMO_JUDGE_TEMPLATE = "{constitution}\n{prompt}\n{option_1}: {answer_1}\n{option_2}: {answer_2}"
DEMO_JUDGE_CONSTITUTION = "The right answer reverses the words."
# How the question asks for that check: short, because the demo tokenizer spells English letter by letter and
# the default instruction would be a third of every question.
DEMO_JUDGE_REASONING = "Check each answer."
# Longest check the judge writes: two lines of "k:", up to 6 words and a mark, and its <|end|>.
DEMO_JUDGE_MAX_NEW_TOKENS = 24


def reverse_judge_pairs(split: str) -> list[dict]:
    """Pairs for the demo judge: a reversal prompt, its right answer, a corrupted one (``kind``, in turn each of
    :data:`CORRUPTIONS`) and the order they are shown in (``right_first``; each kind is shown first as often as
    second). The phrases are reverse/sft's, so a held-out pair's prompt is in no training split of the reversal
    sets."""
    rng = random.Random(f"reverse-judge-{split}")
    pairs = []
    for index, phrase in enumerate(_unique_draws(split, _random_phrase)):
        kind = CORRUPTIONS[index % len(CORRUPTIONS)]
        pairs.append({"prompt": _reverse_prompt(phrase), "right": " ".join(reversed(phrase)),
                      "wrong": " ".join(corrupt_reversal(phrase, kind, rng)), "kind": kind,
                      "right_first": index // len(CORRUPTIONS) % 2 == 0})
    return pairs


def judge_rationale(prompt: list[dict] | str, answer_1: str, answer_2: str) -> str:
    """The demo judge's chain of thought: one line per answer, ``k:`` then the words of the answer that agree
    with the right reversal up to its first mistake, then ``+`` if the answer is the right reversal, else ``-``.

    For ``reverse: a b c`` with answers ``c b a`` and ``c a b``: ``"1: c b a+\n2: c-"``. It is dense,
    token-level supervision that a ~1M model learns from scratch: each word is the next word of the reversal
    where the answer agrees with it (a step of reversing and a step of copying the answer vote for the same
    word), and the mark is where they disagree; the verdict then only reads the marks.
    """
    right = reversal_answer(prompt)

    def line(option: str, answer: str) -> str:
        words, agreed = completion_words(answer), 0
        while agreed < min(len(words), len(right)) and words[agreed] == right[agreed]:
            agreed += 1
        return f"{option}:{''.join(' ' + word for word in words[:agreed])}{'+' if words == right else '-'}"

    return f"{line('1', answer_1)}\n{line('2', answer_2)}"


def reverse_judge(split: str) -> list[dict]:
    """Chain-of-thought SFT rows for the demo judge, each :func:`reverse_judge_pairs` pair in both orders (the
    shown order first): the LLM judge's question (:data:`DEMO_JUDGE_TEMPLATE`, :data:`DEMO_JUDGE_CONSTITUTION`,
    options "1" and "2", reasoning asked for with :data:`DEMO_JUDGE_REASONING`), the check of both answers
    (:func:`judge_rationale`), the judge's request for a label and, as the last answer, the right answer's
    label."""
    rows = []
    for pair in reverse_judge_pairs(split):
        for right_first in (pair["right_first"], not pair["right_first"]):
            shown = (pair["right"], pair["wrong"]) if right_first else (pair["wrong"], pair["right"])
            question = judge_question(pair["prompt"], *shown, template=DEMO_JUDGE_TEMPLATE,
                                      constitution=DEMO_JUDGE_CONSTITUTION, options=("1", "2"), reasoning=True,
                                      reasoning_instruction=DEMO_JUDGE_REASONING)
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": judge_rationale(pair["prompt"], *shown)},
                                      {"role": "user", "content": answer_instruction(("1", "2"))},
                                      {"role": "assistant", "content": "1" if right_first else "2"}]})
    return rows


# name -> generator(split) -> rows. Rows are in one of the formats the data layer normalises.
DEMO_DATASETS: dict[str, Callable[[str], list[dict]]] = {
    "reverse/sft": reverse_sft,
    "reverse/sft-noisy": reverse_sft_noisy,
    "summarize/raw": summarize_raw,
    "translate/raw": translate_raw,
    "reverse/preference": reverse_preference,
    "reverse/unpaired": reverse_unpaired,
    "reverse/rated": reverse_rated,
    "reverse/prompts": reverse_prompts,
    "reverse/judge": reverse_judge,
}

DEMO_SPLITS: tuple[str, ...] = tuple(_SPLIT_SIZES)


def tokenizer_corpus() -> list[str]:
    """Text the demo tokenizer is trained on: every word and instruction the demo tasks can emit."""
    return [" ".join(WORDS), " ".join(TASK_INSTRUCTIONS), *WORDS, *TASK_INSTRUCTIONS]
