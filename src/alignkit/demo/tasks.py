"""Demo tasks: small, deterministic datasets that a ~1M-parameter model can learn on a CPU.

Every dataset is generated from a fixed seed, so the same name always yields the same rows, and the
held-out split never shares an input with the train split. Recipes name them as ``demo:<task>/<kind>``
(for example ``demo:reverse/sft``); later stages add kinds (preference pairs, prompt-only sets) to the
same registry without touching the loaders.

Tasks:
  ``reverse/sft``      chat rows, ``reverse: a b c`` -> ``c b a`` (scored by exact match)
  ``summarize/raw``    ``{"document", "summary"}``: a document of key words and filler words; the summary
                       is its key words in order (an extractive summary, scored by ROUGE)
  ``translate/raw``    ``{"source", "target"}``: a sentence and its translation into Zorbish, a made-up
                       language: word by word through a fixed dictionary, each pair of words swapped
                       (scored by BLEU / chrF)
Raw sets carry no instruction: a recipe supplies the prompt through ``templates`` and maps the target
column to ``completion`` through ``columns``, as it would for a real dataset.
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

# Filler words of the summarisation documents: the words a summary leaves out. None is in WORDS.
FILLERS: tuple[str, ...] = (
    "the", "a", "very", "near", "with", "and", "quite", "some", "of", "in", "on", "by", "so", "just", "really", "over",
)

# Zorbish, the made-up language of the translation task: WORDS[i] translates to ZORBISH[i]. Two syllables
# and a coda each (generated once from a syllable inventory, then frozen here so the dictionary is
# readable and can never drift); none is an English word, a demo word or a filler.
ZORBISH: tuple[str, ...] = (
    "dretex", "thousuk", "drithux", "nizvain", "glanaiz", "krailuk", "thazair", "kraloun", "shizouk", "vothish",
    "nouthek", "sougliz", "thukiz", "rekrik", "nidruz", "vaikrouk", "gamak", "krairik", "krusosh", "thaithez",
    "gitik", "sukok", "rizoux", "duzvox", "kouzvoush", "bukuk", "zvaiva", "nunaik", "kredrin", "kraikroux",
    "nokrour", "bavai", "rouglox", "dekrur", "zvoudon", "buvun", "mekouz", "visok", "zoukror", "vedou",
    "kithaik", "glaikax", "vulesh", "kokux", "sozvez", "raglak", "mouruz", "kraikor", "tigluk", "rouzer",
    "krutix", "nozvan", "glevix", "zvoulou", "glekrun", "teglox", "sasaiz", "glethek", "kasoun", "shoukez",
    "retaik", "shaiken", "thivuz", "rasok", "zvelouk", "koglo", "kritox", "krudain", "glaizvik", "mokrish",
    "raivaish", "naizvox", "rivin", "dezvoush", "zavoun", "glamaz", "bozour", "ravoush", "kribaix", "glokrek",
    "kuthor", "droraz", "krouglou", "soukix", "zvouzan", "drudroux", "saithaiz", "rouglaix", "gediz", "zaglish",
    "maziz", "louzish", "kogoux", "maikrex", "shusouz", "lezaik", "lobaix", "lithaiz", "raithoz", "kaisun",
)
TO_ZORBISH: dict[str, str] = dict(zip(WORDS, ZORBISH, strict=True))

REVERSE_INSTRUCTION = "reverse:"
# Instructions the demo *base* model is pretrained on (see demo.build), so it knows the words, the chat
# format and how to end a turn, but has never seen the tasks that recipes teach it.
PRETRAIN_INSTRUCTIONS: tuple[str, ...] = ("copy:", "first:", "last:")
TASK_INSTRUCTIONS: tuple[str, ...] = (REVERSE_INSTRUCTION, *PRETRAIN_INSTRUCTIONS)

_SPLIT_SIZES = {"train": 4000, "test": 200}
_SPLIT_SEEDS = {"train": 1234, "test": 98765}  # reverse/sft
_SUMMARIZE_SEEDS = {"train": 2468, "test": 13579}
_TRANSLATE_SEEDS = {"train": 4321, "test": 86420}

Sampler = Callable[[random.Random], list[str]]


def _random_phrase(rng: random.Random, min_words: int = 3, max_words: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(min_words, max_words))


def _random_foreign_phrase(rng: random.Random, min_words: int = 2, max_words: int = 7) -> list[str]:
    return rng.sample(ZORBISH, rng.randint(min_words, max_words))


def _random_document(rng: random.Random, min_keys: int = 2, max_keys: int = 4, min_fillers: int = 6,
                     max_fillers: int = 12) -> list[str]:
    """Distinct key words from WORDS, in order, scattered among filler words (8-16 words by default).

    Two to four key words in eight to sixteen makes the summary a real compression (about a quarter of the
    document), so echoing the document back scores well below a summary on ROUGE.
    """
    keys = rng.sample(WORDS, rng.randint(min_keys, max_keys))
    fillers = [rng.choice(FILLERS) for _ in range(rng.randint(min_fillers, max_fillers))]
    length = len(keys) + len(fillers)
    key_slots = set(rng.sample(range(length), len(keys)))
    key_words, filler_words = iter(keys), iter(fillers)
    return [next(key_words) if slot in key_slots else next(filler_words) for slot in range(length)]


def _unique_samples(split: str, sample: Sampler, seeds: dict[str, int]) -> list[list[str]]:
    """``sample``'s word lists for ``split``, without repeats; the test split excludes every train input,
    so held-out means unseen."""
    excluded: set[tuple[str, ...]] = set()
    if split == "test":
        excluded = {tuple(p) for p in _unique_samples("train", sample, seeds)}
    rng = random.Random(seeds[split])
    samples: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    while len(samples) < _SPLIT_SIZES[split]:
        words = sample(rng)
        key = tuple(words)
        if key in seen or key in excluded:
            continue
        seen.add(key)
        samples.append(words)
    return samples


def _unique_phrases(split: str) -> list[list[str]]:
    """The reversal phrases of ``split`` (3-6 distinct words)."""
    return _unique_samples(split, _random_phrase, _SPLIT_SEEDS)


def summarize(document: list[str]) -> list[str]:
    """The summary rule: a document's key words (everything but the fillers), in their order."""
    return [word for word in document if word not in FILLERS]


def translate(sentence: list[str]) -> list[str]:
    """The translation rule: each word by its Zorbish word, and each pair of words swapped.

    Zorbish puts the second word of every pair first (``a b c d e`` -> ``B A D C E``), so a word-by-word
    gloss in English order is a partial translation: right words, wrong order, which BLEU's n-grams punish.
    """
    words = [TO_ZORBISH[word] for word in sentence]
    for i in range(0, len(words) - 1, 2):
        words[i], words[i + 1] = words[i + 1], words[i]
    return words


def pretraining_conversations(count: int, seed: int = 7) -> list[list[dict]]:
    """Conversations for the demo base model: copy the words, name the first word, name the last word.

    The words come from three pools: demo words (half the conversations), Zorbish words and documents of key
    words among fillers (a quarter each), so the base model has produced every word a task asks it to emit
    (LoRA cannot teach a model to emit tokens whose tied embeddings never learned, see docs/architecture.md).
    No conversation pairs an English word with its Zorbish one or a document with its summary: the mappings
    stay for the recipes to teach.
    """
    rng = random.Random(seed)
    answers = {"copy:": lambda p: p, "first:": lambda p: p[:1], "last:": lambda p: p[-1:]}
    pools: tuple[Sampler, ...] = (
        lambda r: _random_phrase(r, 2, 7), lambda r: _random_phrase(r, 2, 7), _random_foreign_phrase, _random_document,
    )
    conversations = []
    for _ in range(count):
        instruction = rng.choice(PRETRAIN_INSTRUCTIONS)
        phrase = rng.choice(pools)(rng)
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


def summarize_raw(split: str) -> list[dict]:
    """Extractive summarisation as raw rows: ``{"document": "the apple very near a river", "summary":
    "apple river"}``."""
    return [
        {"document": " ".join(document), "summary": " ".join(summarize(document))}
        for document in _unique_samples(split, _random_document, _SUMMARIZE_SEEDS)
    ]


def translate_raw(split: str) -> list[dict]:
    """Translation into Zorbish as raw rows: ``{"source": "apple river stone", "target": "thousuk dretex
    drithux"}`` (3-6 words)."""
    return [
        {"source": " ".join(sentence), "target": " ".join(translate(sentence))}
        for sentence in _unique_samples(split, _random_phrase, _TRANSLATE_SEEDS)
    ]


# name -> generator(split) -> rows. Rows are in one of the formats the data layer normalises, or raw
# columns (``*/raw``) that a recipe maps with ``columns`` and ``templates``.
DEMO_DATASETS: dict[str, Callable[[str], list[dict]]] = {
    "reverse/sft": reverse_sft,
    "summarize/raw": summarize_raw,
    "translate/raw": translate_raw,
}

DEMO_SPLITS: tuple[str, ...] = tuple(_SPLIT_SIZES)


def tokenizer_corpus() -> list[str]:
    """Text the demo tokenizer is trained on: every word and instruction the demo tasks can emit."""
    vocabulary = (*WORDS, *FILLERS, *ZORBISH, *TASK_INSTRUCTIONS)
    return [" ".join(WORDS), " ".join(FILLERS), " ".join(ZORBISH), " ".join(TASK_INSTRUCTIONS), *vocabulary]
