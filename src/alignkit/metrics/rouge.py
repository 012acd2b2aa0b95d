"""ROUGE-1/2/L/Lsum as a standalone ``evaluate`` metric module, computed with Google's ``rouge_score`` package.

This file is loaded by ``evaluate.load(<path to this file>)``, which copies it into evaluate's modules cache and
imports it from there, so it must not import alignkit: only evaluate, datasets, rouge_score and the stdlib.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """\
ROUGE (Recall-Oriented Understudy for Gisting Evaluation) compares a generated text with one or more references by
n-gram overlap (rouge1, rouge2), longest common subsequence over the whole text (rougeL) and summary-level LCS over
newline-separated sentences (rougeLsum). Scores come from ``rouge_score.rouge_scorer.RougeScorer``.

Aggregation: for each example the F-measure of every ROUGE type is taken (with several references, the best one per
type, as ``RougeScorer.score_multi`` does), and the reported value is the plain arithmetic mean of those per-example
F-measures. It is exact and deterministic, unlike Hugging Face's ``rouge`` metric, whose ``use_aggregator=True``
reports the median of bootstrap-resampled means (which is close to, but not exactly, the mean).

rougeLsum: ``rouge_score`` treats each newline-separated line as one sentence. Sentences are not split for you
(automatic splitting would need NLTK's punkt data, i.e. a download), so put a newline between sentences of
multi-sentence predictions and references; without newlines rougeLsum equals rougeL.

Tokenisation: ``rouge_score``'s default tokenizer lowercases and keeps only ``[a-z0-9]`` runs, so accented letters,
CJK and emoji are dropped. Pass ``tokenizer`` (a callable ``str -> list[str]``) for other scripts.
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    address = "Barcelona, Spain",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/W04-1013",
    pages = "74--81",
}
"""

_INPUTS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str, or list of list of str): one reference per prediction, or several; with several,
        each ROUGE type takes the reference with the highest F-measure for that example.
        Use one form for the whole call: evaluate picks the schema from the first example, and a bare string
        under the list schema would be split into characters.
    rouge_types (list of str, optional): any of "rouge1", "rouge2", ..., "rouge9", "rougeL", "rougeLsum".
        Defaults to ["rouge1", "rouge2", "rougeL", "rougeLsum"].
    use_aggregator (bool, default True): True returns the mean F-measure per type; False returns the list of
        per-example F-measures per type.
    use_stemmer (bool, default False): apply the Porter stemmer (English only) before matching. Off by default, as
        in Hugging Face's rouge metric, because it mangles non-English words.
    tokenizer (callable str -> list of str, optional): replaces rouge_score's default tokenizer.
Returns:
    rouge1, rouge2, rougeL, rougeLsum (only the types asked for): float in [0, 1], or a list of floats.
Examples:
    >>> rouge = evaluate.load("path/to/rouge.py")
    >>> rouge.compute(predictions=["the cat sat"], references=[["the cat sat", "a cat"]])["rouge1"]
    1.0
"""

_DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class _CallableTokenizer:
    """Adapts a plain ``str -> list[str]`` callable to the ``.tokenize`` interface RougeScorer expects."""

    def __init__(self, fn: Callable[[str], list[str]]) -> None:
        self._fn = fn

    def tokenize(self, text: str) -> list[str]:
        """Tokens of ``text``."""
        return list(self._fn(text))


def _reference_list(refs: str | Sequence[str | None] | None, index: int) -> list[str]:
    """One example's references as a list; a single string counts as one reference.

    None entries (nulls from the Arrow cache when examples have different numbers of references) are dropped;
    an example left with no reference has nothing to score against, which is an input error.
    """
    found = [refs] if isinstance(refs, str) else [r for r in (refs or []) if r is not None]
    if not found:
        raise ValueError(f"Example {index} has no reference.")
    return found


class Rouge(evaluate.Metric):
    """ROUGE via ``rouge_score``; the mean of per-example F-measures."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            # Multi-reference first, then single-reference: evaluate picks the first schema the first example fits.
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Value("string"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013"],
        )

    def _compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str | Sequence[str]],
        rouge_types: Sequence[str] | None = None,
        use_aggregator: bool = True,
        use_stemmer: bool = False,
        tokenizer: Callable[[str], list[str]] | None = None,
    ) -> dict[str, float | list[float]]:
        if not predictions:
            raise ValueError("No predictions to score.")
        types = list(rouge_types) if rouge_types is not None else list(_DEFAULT_TYPES)
        scorer = rouge_scorer.RougeScorer(
            types,
            use_stemmer=use_stemmer,
            # No automatic sentence splitting for rougeLsum: it needs NLTK data that may not be present offline;
            # rouge_score then splits on newlines, which is the documented input convention.
            split_summaries=False,
            tokenizer=_CallableTokenizer(tokenizer) if tokenizer is not None else None,
        )
        per_example: dict[str, list[float]] = {t: [] for t in types}
        for i, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
            # score_multi keeps, per ROUGE type, the reference with the best F-measure.
            scores = scorer.score_multi(_reference_list(refs, i), prediction)
            for t in types:
                per_example[t].append(float(scores[t].fmeasure))
        if not use_aggregator:
            return per_example
        return {t: sum(values) / len(values) for t, values in per_example.items()}
