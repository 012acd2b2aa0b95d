"""alignkit.metrics: the shipped evaluate modules agree with rouge-score / sacrebleu and load offline."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import evaluate
import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

from alignkit import metrics
from alignkit.errors import AlignkitError

# A fixed set covering: several references (and a different number of them per example), an empty prediction,
# accents, CJK and emoji, and multi-sentence texts (newline-separated, as rougeLsum expects).
PREDICTIONS = [
    "the cat sat on the mat",
    "",
    "Le café était très bon, merci !",
    "我喜欢自然语言处理 🚀",
    "The quick brown fox jumps over the dog.\nIt was fast.\nThe dog did not move.",
    "hello there world",
]
REFERENCES = [
    ["the cat is on the mat", "there is a cat on the mat"],
    ["nothing was generated here"],
    ["Le café est très bon !"],
    ["我喜欢自然语言处理 🚀🚀", "我 爱 自然 语言 处理"],
    [
        "The dog did not move.\nA quick brown fox jumped over the dog.\nIt was very fast.",
        "The quick fox jumps over the lazy dog.\nFast it was.",
    ],
    ["hello world", "hello there world", "hi world"],
]
# The same references as sacreBLEU reference streams, written out by hand: stream k holds every example's k-th
# reference, None where an example has fewer (sacreBLEU skips None).
STREAMS = [
    [
        "the cat is on the mat",
        "nothing was generated here",
        "Le café est très bon !",
        "我喜欢自然语言处理 🚀🚀",
        "The dog did not move.\nA quick brown fox jumped over the dog.\nIt was very fast.",
        "hello world",
    ],
    [
        "there is a cat on the mat",
        None,
        None,
        "我 爱 自然 语言 处理",
        "The quick fox jumps over the lazy dog.\nFast it was.",
        "hello there world",
    ],
    [None, None, None, None, None, "hi world"],
]
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ALL_KEYS = {*ROUGE_KEYS, "bleu", "chrf", "exact_match"}


def _direct_rouge(use_stemmer: bool = False, tokenizer: object = None) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=use_stemmer, tokenizer=tokenizer)
    per_example = [scorer.score_multi(refs, pred) for pred, refs in zip(PREDICTIONS, REFERENCES, strict=True)]
    return {key: sum(s[key].fmeasure for s in per_example) / len(per_example) for key in ROUGE_KEYS}


@pytest.fixture(scope="module")
def loaded() -> dict[str, evaluate.EvaluationModule]:
    return {name: metrics.load(name, keep_in_memory=True) for name in metrics.METRICS}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Offline mode flags on, and any DNS lookup or socket connect fails (and is recorded)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.setenv(var, "1")
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_module_paths_are_absolute_files_named_after_the_metric() -> None:
    for name in metrics.METRICS:
        path = Path(metrics.module_path(name))
        assert path.is_absolute() and path.is_file()
        assert path.name == f"{name}.py"


def test_module_files_do_not_import_alignkit() -> None:
    # evaluate copies each file into its own cache and imports it from there, where alignkit may not be importable.
    for name in metrics.METRICS:
        source = Path(metrics.module_path(name)).read_text(encoding="utf-8")
        assert re.search(r"^\s*(import|from)\s+(alignkit|\.)", source, flags=re.MULTILINE) is None
        assert re.search(r"^import evaluate$", source, flags=re.MULTILINE)


def test_rouge_matches_rouge_score(loaded: dict[str, evaluate.EvaluationModule]) -> None:
    expected = _direct_rouge()
    result = loaded["rouge"].compute(predictions=PREDICTIONS, references=REFERENCES)
    assert set(result) == set(ROUGE_KEYS)
    for key in ROUGE_KEYS:
        assert result[key] == pytest.approx(expected[key], abs=1e-9)
    assert 0 < result["rouge1"] < 1


def test_rouge_stemmer_and_per_example_scores(loaded: dict[str, evaluate.EvaluationModule]) -> None:
    stemmed = loaded["rouge"].compute(predictions=PREDICTIONS, references=REFERENCES, use_stemmer=True)
    expected = _direct_rouge(use_stemmer=True)
    for key in ROUGE_KEYS:
        assert stemmed[key] == pytest.approx(expected[key], abs=1e-9)
    # "jumps"/"jumped" only match once stemmed.
    assert stemmed["rouge1"] > _direct_rouge()["rouge1"]

    per_example = loaded["rouge"].compute(predictions=PREDICTIONS, references=REFERENCES, use_aggregator=False)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS))
    for i, (pred, refs) in enumerate(zip(PREDICTIONS, REFERENCES, strict=True)):
        direct = scorer.score_multi(refs, pred)
        for key in ROUGE_KEYS:
            assert per_example[key][i] == pytest.approx(direct[key].fmeasure, abs=1e-9)
    assert per_example["rouge1"][1] == 0.0  # the empty prediction


def test_rouge_lsum_uses_newline_sentences(loaded: dict[str, evaluate.EvaluationModule]) -> None:
    pred, refs = PREDICTIONS[4], REFERENCES[4]
    result = loaded["rouge"].compute(predictions=[pred], references=[refs])
    direct = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"]).score_multi(refs, pred)
    assert result["rougeLsum"] == pytest.approx(direct["rougeLsum"].fmeasure, abs=1e-9)
    assert result["rougeL"] == pytest.approx(direct["rougeL"].fmeasure, abs=1e-9)
    # Reordered sentences: summary-level LCS over lines scores higher than one LCS over the whole text.
    assert result["rougeLsum"] > result["rougeL"]
    flat = loaded["rouge"].compute(
        predictions=[pred.replace("\n", " ")], references=[[r.replace("\n", " ") for r in refs]]
    )
    assert flat["rougeLsum"] == pytest.approx(flat["rougeL"], abs=1e-9)


def test_rouge_custom_tokenizer_for_unicode(loaded: dict[str, evaluate.EvaluationModule]) -> None:
    class Whitespace:
        def tokenize(self, text: str) -> list[str]:
            return text.split()

    result = loaded["rouge"].compute(predictions=PREDICTIONS, references=REFERENCES, tokenizer=str.split)
    expected = _direct_rouge(tokenizer=Whitespace())
    for key in ROUGE_KEYS:
        assert result[key] == pytest.approx(expected[key], abs=1e-9)
    # The default tokenizer drops CJK entirely; whitespace tokens keep "我喜欢自然语言处理".
    cjk = loaded["rouge"].compute(predictions=[PREDICTIONS[3]], references=[REFERENCES[3]], tokenizer=str.split)
    assert cjk["rouge1"] == pytest.approx(0.5, abs=1e-9)


def test_bleu_matches_sacrebleu(loaded: dict[str, evaluate.EvaluationModule]) -> None:
    direct_metric = BLEU()
    direct = direct_metric.corpus_score(PREDICTIONS, STREAMS)
    result = loaded["bleu"].compute(predictions=PREDICTIONS, references=REFERENCES)
    assert result["bleu"] == pytest.approx(direct.score, abs=1e-9)
    assert result["precisions"] == pytest.approx(direct.precisions, abs=1e-9)
    assert result["brevity_penalty"] == pytest.approx(direct.bp, abs=1e-9)
    assert (result["sys_len"], result["ref_len"]) == (direct.sys_len, direct.ref_len)
    assert result["signature"] == str(direct_metric.get_signature())
    assert result["signature"].startswith("nrefs:var|")  # 1 to 3 references per example
    assert 0 < result["bleu"] < 100


def test_bleu_options_are_passed_to_sacrebleu(loaded: dict[str, evaluate.EvaluationModule]) -> None:
    options = {"tokenize": "intl", "lowercase": True, "smooth_method": "add-k", "smooth_value": 1.0}
    direct_metric = BLEU(**options)
    direct = direct_metric.corpus_score(PREDICTIONS, STREAMS)
    result = loaded["bleu"].compute(predictions=PREDICTIONS, references=REFERENCES, **options)
    assert result["bleu"] == pytest.approx(direct.score, abs=1e-9)
    assert result["signature"] == str(direct_metric.get_signature())
    assert "tok:intl" in result["signature"] and "case:lc" in result["signature"]


def test_bleu_pads_missing_references_with_none_not_empty_string(loaded: dict[str, evaluate.EvaluationModule]) -> None:
    preds = ["a b c d e f", "a"]
    refs = [["a b c d e f", "a b c d e f g h"], ["a b c"]]
    result = loaded["bleu"].compute(predictions=preds, references=refs)
    with_none = BLEU().corpus_score(preds, [["a b c d e f", "a b c"], ["a b c d e f g h", None]])
    assert result["bleu"] == pytest.approx(with_none.score, abs=1e-9)
    assert result["brevity_penalty"] == pytest.approx(with_none.bp, abs=1e-9)
    assert result["ref_len"] == with_none.ref_len == 6 + 3
    # An "" pad would be a real empty reference: for the 1-token "a", length 0 is closer than 3 and would be used.
    with_empty = BLEU().corpus_score(preds, [["a b c d e f", "a b c"], ["a b c d e f g h", ""]])
    assert with_empty.ref_len == 6 + 0


def test_chrf_matches_sacrebleu(loaded: dict[str, evaluate.EvaluationModule]) -> None:
    direct_metric = CHRF()
    direct = direct_metric.corpus_score(PREDICTIONS, STREAMS)
    result = loaded["chrf"].compute(predictions=PREDICTIONS, references=REFERENCES)
    assert result["chrf"] == pytest.approx(direct.score, abs=1e-9)
    assert result["signature"] == str(direct_metric.get_signature())
    assert 0 < result["chrf"] < 100

    plus_metric = CHRF(word_order=2, beta=1, char_order=4)
    plus = plus_metric.corpus_score(PREDICTIONS, STREAMS)
    result = loaded["chrf"].compute(predictions=PREDICTIONS, references=REFERENCES, word_order=2, beta=1, char_order=4)
    assert result["chrf"] == pytest.approx(plus.score, abs=1e-9)
    assert result["signature"] == str(plus_metric.get_signature())
    assert "nw:2" in result["signature"]


def test_single_reference_strings_equal_one_element_lists(loaded: dict[str, evaluate.EvaluationModule]) -> None:
    single = [refs[0] for refs in REFERENCES]
    wrapped = [[ref] for ref in single]
    for name in metrics.METRICS:
        as_strings = loaded[name].compute(predictions=PREDICTIONS, references=single)
        as_lists = loaded[name].compute(predictions=PREDICTIONS, references=wrapped)
        assert as_strings == as_lists
    direct = BLEU().corpus_score(PREDICTIONS, [single])
    assert loaded["bleu"].compute(predictions=PREDICTIONS, references=single)["bleu"] == pytest.approx(
        direct.score, abs=1e-9
    )


def test_add_batch_then_compute(loaded: dict[str, evaluate.EvaluationModule]) -> None:
    chrf = loaded["chrf"]
    chrf.add_batch(predictions=PREDICTIONS[:3], references=REFERENCES[:3])
    chrf.add_batch(predictions=PREDICTIONS[3:], references=REFERENCES[3:])
    assert chrf.compute()["chrf"] == pytest.approx(CHRF().corpus_score(PREDICTIONS, STREAMS).score, abs=1e-9)


@pytest.mark.parametrize(
    ("predictions", "references", "options", "expected"),
    [
        (["Paris", "rome"], ["Paris", "Rome"], {}, 0.5),
        (["Paris", "rome"], ["Paris", "Rome"], {"ignore_case": True}, 1.0),
        (["  Paris\n", "Rome "], ["Paris", " Rome"], {}, 1.0),
        (["  Paris\n"], ["Paris"], {"strip": False}, 0.0),
        (["New  York"], ["New York"], {}, 0.0),  # inner whitespace is kept
        (["Paris!", "¿Qué?"], ["Paris", "Qué"], {"ignore_punctuation": True}, 1.0),
        (["Paris!"], ["Paris"], {}, 0.0),
        (["STRASSE"], ["Straße"], {"ignore_case": True}, 1.0),
        (["Lyon", "Nice", "x"], [["Paris", "Lyon"], ["Nice"], ["y", "z"]], {}, 2 / 3),
        (["", "a"], [["", "b"], ["b"]], {}, 0.5),
        (["東京 🚀", "café"], [["東京 🚀"], ["cafe"]], {}, 0.5),
    ],
)
def test_exact_match(
    loaded: dict[str, evaluate.EvaluationModule],
    predictions: list[str],
    references: list[str] | list[list[str]],
    options: dict[str, bool],
    expected: float,
) -> None:
    result = loaded["exact_match"].compute(predictions=predictions, references=references, **options)
    assert result == {"exact_match": pytest.approx(expected, abs=1e-9)}


def test_compute_flat_keys_match_direct_calls() -> None:
    result = metrics.compute(metrics.METRICS, PREDICTIONS, REFERENCES)
    assert set(result) == ALL_KEYS
    assert all(isinstance(value, float) for value in result.values())
    rouge = _direct_rouge()
    for key in ROUGE_KEYS:
        assert result[key] == pytest.approx(rouge[key], abs=1e-9)
    assert result["bleu"] == pytest.approx(BLEU().corpus_score(PREDICTIONS, STREAMS).score, abs=1e-9)
    assert result["chrf"] == pytest.approx(CHRF().corpus_score(PREDICTIONS, STREAMS).score, abs=1e-9)
    assert result["exact_match"] == pytest.approx(1 / 6, abs=1e-9)  # only "hello there world"


def test_compute_only_requested_metrics_and_options() -> None:
    assert set(metrics.compute(["bleu"], PREDICTIONS, REFERENCES)) == {"bleu"}
    assert set(metrics.compute("exact_match", PREDICTIONS, REFERENCES)) == {"exact_match"}
    stemmed = metrics.compute(["rouge"], PREDICTIONS, REFERENCES, options={"rouge": {"use_stemmer": True}})
    assert set(stemmed) == set(ROUGE_KEYS)
    assert stemmed["rouge1"] == pytest.approx(_direct_rouge(use_stemmer=True)["rouge1"], abs=1e-9)


def test_compute_accepts_mixed_single_and_multi_references() -> None:
    # Raw evaluate would pick the list schema from the first example and split "Rome" into characters.
    result = metrics.compute(["exact_match"], ["Paris", "R"], [["Paris", "Paris, France"], "Rome"])
    assert result == {"exact_match": pytest.approx(0.5, abs=1e-9)}


def test_compute_rejects_bad_input() -> None:
    with pytest.raises(AlignkitError, match="options given for metric 'rouge'"):
        metrics.compute(["bleu"], ["a"], ["a"], options={"rouge": {"use_stemmer": True}})
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.compute(["bleu"], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.compute(["bleu"], [], [])


@pytest.mark.parametrize(("name", "suggestion"), [("rogue", "rouge"), ("blue", "bleu"), ("exact-match", "exact_match")])
def test_unknown_metric_suggests_the_closest(name: str, suggestion: str) -> None:
    with pytest.raises(AlignkitError, match=f"Did you mean '{suggestion}'\\?") as info:
        metrics.module_path(name)
    assert f"unknown metric '{name}'" in str(info.value)
    with pytest.raises(AlignkitError, match=f"Did you mean '{suggestion}'"):
        metrics.load(name)
    with pytest.raises(AlignkitError, match=f"Did you mean '{suggestion}'"):
        metrics.compute(["chrf", name], ["a"], ["a"])


def test_unknown_metric_without_close_match_lists_the_metrics() -> None:
    with pytest.raises(AlignkitError) as info:
        metrics.module_path("perplexity")
    assert "Did you mean" not in str(info.value)
    assert "rouge, bleu, chrf, exact_match" in str(info.value)


def test_combine_works_offline(no_network: list[object], tmp_path: Path) -> None:
    with pytest.raises(OSError):  # the guard is live
        socket.create_connection(("huggingface.co", 443), timeout=1)
    no_network.clear()

    # Loaded while the network is refused, into a fresh metrics cache dir (not in memory: exercises the Arrow cache).
    modules = [metrics.load(name, cache_dir=str(tmp_path)) for name in metrics.METRICS]
    combined = evaluate.combine(modules)
    result = combined.compute(predictions=PREDICTIONS, references=REFERENCES)

    assert no_network == []
    assert set(result) >= ALL_KEYS
    # bleu and chrf both return "signature"; evaluate.combine prefixes duplicate keys with the module name.
    assert {"bleu_signature", "chrf_signature", "precisions", "brevity_penalty", "sys_len", "ref_len"} <= set(result)
    assert result["bleu"] == pytest.approx(BLEU().corpus_score(PREDICTIONS, STREAMS).score, abs=1e-9)
    assert result["chrf"] == pytest.approx(CHRF().corpus_score(PREDICTIONS, STREAMS).score, abs=1e-9)
    assert result["rougeLsum"] == pytest.approx(_direct_rouge()["rougeLsum"], abs=1e-9)
    assert result["exact_match"] == pytest.approx(1 / 6, abs=1e-9)
