"""Corpus BLEU as a standalone ``evaluate`` metric module, computed with ``sacrebleu.metrics.BLEU``.

This file is loaded by ``evaluate.load(<path to this file>)``, which copies it into evaluate's modules cache and
imports it from there, so it must not import alignkit: only evaluate, datasets, sacrebleu and the stdlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
from sacrebleu.metrics import BLEU

_DESCRIPTION = """\
Corpus-level BLEU computed by sacreBLEU (``sacrebleu.metrics.BLEU.corpus_score``), which tokenizes detokenized text
itself so scores are comparable across papers. The sacreBLEU signature (tokenizer, smoothing, casing, number of
references, version) is returned with the score so a result can be reproduced.

Several references per example are supported, and examples may have different numbers of them: references are
transposed into sacreBLEU's reference streams (stream i holds every example's i-th reference) and an example with
fewer references is padded with None, which sacreBLEU skips. Padding with "" would instead count as a real, empty
reference and change the brevity penalty. An empty string given as a reference is kept as a real reference.
"""

_CITATION = """\
@inproceedings{papineni-etal-2002-bleu,
    title = "{B}leu: a Method for Automatic Evaluation of Machine Translation",
    author = "Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing",
    booktitle = "Proceedings of the 40th Annual Meeting of the Association for Computational Linguistics",
    year = "2002",
    url = "https://aclanthology.org/P02-1040",
    pages = "311--318",
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
    predictions (list of str): detokenized generated texts.
    references (list of str, or list of list of str): one or more detokenized references per prediction.
        Use one form for the whole call: evaluate picks the schema from the first example, and a bare string
        under the list schema would be split into characters.
    tokenize (str, optional): sacreBLEU tokenizer ("13a", "intl", "zh", "char", "none", ...). None lets sacreBLEU
        choose its default ("13a", or a language-specific one when trg_lang is given).
    lowercase (bool, default False): lowercase predictions and references first.
    smooth_method (str, default "exp"): "none", "floor", "add-k" or "exp".
    smooth_value (float, optional): the value for "floor" / "add-k" smoothing.
    max_ngram_order (int, default 4).
    effective_order (bool, default False): ignore n-gram orders with no match (meant for sentence-level BLEU).
    trg_lang (str, default ""): target language code, used to pick the default tokenizer.
Returns:
    bleu (float, 0-100): the sacreBLEU score.
    precisions (list of float, 0-100): modified n-gram precisions, order 1 first.
    brevity_penalty (float).
    sys_len (int), ref_len (int): hypothesis and effective reference lengths in tokens.
    signature (str): the sacreBLEU signature of this computation.
Examples:
    >>> bleu = evaluate.load("path/to/bleu.py")
    >>> bleu.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on the mat"]])["bleu"]
    100.00000000000004
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


class Bleu(evaluate.Metric):
    """Corpus BLEU via sacreBLEU, with its signature."""

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
            reference_urls=["https://aclanthology.org/P02-1040", "https://www.aclweb.org/anthology/W18-6319"],
        )

    def _compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str | Sequence[str]],
        tokenize: str | None = None,
        lowercase: bool = False,
        smooth_method: str = "exp",
        smooth_value: float | None = None,
        max_ngram_order: int = 4,
        effective_order: bool = False,
        trg_lang: str = "",
    ) -> dict[str, Any]:
        if not predictions:
            raise ValueError("No predictions to score.")
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
        metric = BLEU(
            lowercase=lowercase,
            tokenize=tokenize,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            max_ngram_order=max_ngram_order,
            effective_order=effective_order,
            trg_lang=trg_lang,
        )
        score = metric.corpus_score(list(predictions), reference_streams(references))
        return {
            "bleu": float(score.score),
            "precisions": [float(p) for p in score.precisions],
            "brevity_penalty": float(score.bp),
            "sys_len": int(score.sys_len),
            "ref_len": int(score.ref_len),
            # The signature is only complete after corpus_score, which records the number of references.
            "signature": str(metric.get_signature()),
        }
