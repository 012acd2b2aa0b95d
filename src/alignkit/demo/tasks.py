"""Demo tasks: small, deterministic datasets that a ~1M-parameter model can learn on a CPU.

Every dataset is generated from a fixed seed, so the same name always yields the same rows, and the
held-out split never shares a prompt with the train split. Recipes name them as ``demo:<task>/<kind>``
(for example ``demo:reverse/sft``); later stages add kinds (preference pairs, prompt-only sets) to the
same registry without touching the loaders.
"""

from __future__ import annotations

import random
from collections.abc import Callable

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

REVERSE_INSTRUCTION = "reverse:"
# Instructions the demo *base* model is pretrained on (see demo.build), so it knows the words, the chat
# format and how to end a turn, but has never seen the tasks that recipes teach it.
PRETRAIN_INSTRUCTIONS: tuple[str, ...] = ("copy:", "first:", "last:")
TASK_INSTRUCTIONS: tuple[str, ...] = (REVERSE_INSTRUCTION, *PRETRAIN_INSTRUCTIONS)

_SPLIT_SIZES = {"train": 4000, "test": 200}
_SPLIT_SEEDS = {"train": 1234, "test": 98765}


def _random_phrase(rng: random.Random, min_words: int = 3, max_words: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(min_words, max_words))


def _unique_phrases(split: str) -> list[list[str]]:
    """Phrases for ``split``; the test split excludes every train phrase so held-out means unseen."""
    excluded: set[tuple[str, ...]] = set()
    if split == "test":
        excluded = {tuple(p) for p in _unique_phrases("train")}
    rng = random.Random(_SPLIT_SEEDS[split])
    phrases: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    while len(phrases) < _SPLIT_SIZES[split]:
        phrase = _random_phrase(rng)
        key = tuple(phrase)
        if key in seen or key in excluded:
            continue
        seen.add(key)
        phrases.append(phrase)
    return phrases


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
        for phrase in _unique_phrases(split)
    ]


# name -> generator(split) -> rows. Rows are in one of the formats the data layer normalises.
DEMO_DATASETS: dict[str, Callable[[str], list[dict]]] = {
    "reverse/sft": reverse_sft,
}

DEMO_SPLITS: tuple[str, ...] = tuple(_SPLIT_SIZES)


def tokenizer_corpus() -> list[str]:
    """Text the demo tokenizer is trained on: every word and instruction the demo tasks can emit."""
    return [" ".join(WORDS), " ".join(TASK_INSTRUCTIONS), *WORDS, *TASK_INSTRUCTIONS]
