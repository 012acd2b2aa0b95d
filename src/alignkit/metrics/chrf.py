"""Corpus chrF / chrF++ as a standalone ``evaluate`` metric module, computed with ``sacrebleu.metrics.CHRF``.

This file is loaded by ``evaluate.load(<path to this file>)``, which copies it into evaluate's modules cache and
imports it from there, so it must not import alignkit: only evaluate, datasets, sacrebleu and the stdlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
from sacrebleu.metrics import CHRF

_DESCRIPTION = """\
Corpus-level chrF computed by sacreBLEU (``sacrebleu.metrics.CHRF.corpus_score``): an F-score over character n-grams
(up to ``char_order``), plus word n-grams up to ``word_order`` (``word_order=2`` is chrF++). ``beta`` weighs recall
``beta`` times as much as precision. The sacreBLEU signature is returned with the score.

Several references per example are supported (sacreBLEU keeps the best-matching one per example); examples may have
different numbers of references: they are transposed into sacreBLEU's reference streams and padded with None, which
sacreBLEU skips (an "" pad would count as a real, empty reference).
"""

_CITATION = """\
@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    url = "https://aclanthology.org/W15-3049",
    pages = "392--395",
}
@inproceedings{popovic-2017-chrf,
    title = "chr{F}++: words helping character n-grams",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Second Conference on Machine Translation",
    year = "2017",
    url = "https://aclanthology.org/W17-4770",
    pages = "612--618",
}
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    url = "https://www.aclweb.org/anthology/W18-6319",
    pages = "186--191",
}
"""

_INPUTS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str, or list of list of str): one or more references per prediction.
        Use one form for the whole call: evaluate picks the schema from the first example, and a bare string
        under the list schema would be split into characters.
    char_order (int, default 6): character n-gram order.
    word_order (int, default 0): word n-gram order; 2 gives chrF++.
    beta (int, default 2): recall weight.
    lowercase (bool, default False): lowercase predictions and references first.
    whitespace (bool, default False): keep whitespace when extracting character n-grams.
    eps_smoothing (bool, default False): use sacreBLEU's epsilon smoothing instead of the chrF++.py behaviour.
Returns:
    chrf (float, 0-100): the corpus chrF (or chrF++) score.
    signature (str): the sacreBLEU signature of this computation.
Examples:
    >>> chrf = evaluate.load("path/to/chrf.py")
    >>> chrf.compute(predictions=["the cat sat"], references=[["the cat sat"]])["chrf"]
    100.0
"""


def _reference_list(refs: str | Sequence[str | None] | None, index: int) -> list[str]:
    """One example's references as a list; a single string counts as one reference.

    None entries (nulls from the Arrow cache when examples have different numbers of references) are dropped, so
    that padding is decided here, once; an example with no reference at all is an input error.
    """
    found = [refs] if isinstance(refs, str) else [r for r in (refs or []) if r is not None]
    if not found:
        raise ValueError(f"Example {index} has no reference.")
    return found


def reference_streams(references: Sequence[str | Sequence[str | None]]) -> list[list[str | None]]:
    """Per-example references transposed into sacreBLEU reference streams, padded with None."""
    per_example = [_reference_list(refs, i) for i, refs in enumerate(references)]
    width = max((len(refs) for refs in per_example), default=0)
    return [[refs[k] if k < len(refs) else None for refs in per_example] for k in range(width)]


class Chrf(evaluate.Metric):
    """Corpus chrF / chrF++ via sacreBLEU, with its signature."""

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
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
            reference_urls=["https://aclanthology.org/W15-3049", "https://aclanthology.org/W17-4770"],
        )

    def _compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str | Sequence[str]],
        char_order: int = 6,
        word_order: int = 0,
        beta: int = 2,
        lowercase: bool = False,
        whitespace: bool = False,
        eps_smoothing: bool = False,
    ) -> dict[str, Any]:
        if not predictions:
            raise ValueError("No predictions to score.")
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
        metric = CHRF(
            char_order=char_order,
            word_order=word_order,
            beta=beta,
            lowercase=lowercase,
            whitespace=whitespace,
            eps_smoothing=eps_smoothing,
        )
        score = metric.corpus_score(list(predictions), reference_streams(references))
        return {
            "chrf": float(score.score),
            # The signature is only complete after corpus_score, which records the number of references.
            "signature": str(metric.get_signature()),
        }
