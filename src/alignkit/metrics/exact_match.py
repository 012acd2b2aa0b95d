"""Exact match as a standalone ``evaluate`` metric module, with multi-reference support.

This file is loaded by ``evaluate.load(<path to this file>)``, which copies it into evaluate's modules cache and
imports it from there, so it must not import alignkit: only evaluate, datasets and the stdlib.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import datasets
import evaluate

_DESCRIPTION = """\
The fraction of predictions that equal at least one of their references after normalisation. Normalisation, in this
order: drop punctuation (``ignore_punctuation``: every Unicode character whose category starts with "P", so "¿", "。"
and "«" count as well as ASCII punctuation), case-fold (``ignore_case``: ``str.casefold``, so "Straße" matches
"STRASSE"), strip leading and trailing whitespace (``strip``, on by default). Inner whitespace is left as it is.
"""

_CITATION = ""

_INPUTS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str, or list of list of str): one or more references per prediction; a prediction counts
        as a match when it equals any of them.
        Use one form for the whole call: evaluate picks the schema from the first example, and a bare string
        under the list schema would be split into characters.
    strip (bool, default True): strip leading and trailing whitespace.
    ignore_case (bool, default False): compare case-folded text.
    ignore_punctuation (bool, default False): remove Unicode punctuation before comparing.
Returns:
    exact_match (float in [0, 1]): the fraction of matching predictions.
Examples:
    >>> exact_match = evaluate.load("path/to/exact_match.py")
    >>> exact_match.compute(predictions=["Paris ", "rome"], references=[["Paris", "Paris, France"], ["Rome"]])
    {'exact_match': 0.5}
"""


def _reference_list(refs: str | Sequence[str | None] | None, index: int) -> list[str]:
    """One example's references as a list; a single string counts as one reference.

    None entries (nulls from the Arrow cache when examples have different numbers of references) are dropped; an
    example with no reference at all is an input error rather than a silent miss.
    """
    found = [refs] if isinstance(refs, str) else [r for r in (refs or []) if r is not None]
    if not found:
        raise ValueError(f"Example {index} has no reference.")
    return found


def normalize(text: str, *, strip: bool = True, ignore_case: bool = False, ignore_punctuation: bool = False) -> str:
    """``text`` normalised as described in this module's description."""
    if ignore_punctuation:
        # Before stripping, so that "answer ." loses its trailing space once the dot is gone.
        text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    if ignore_case:
        text = text.casefold()
    if strip:
        text = text.strip()
    return text


class ExactMatch(evaluate.Metric):
    """Fraction of predictions equal to any of their references after normalisation."""

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
        )

    def _compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str | Sequence[str]],
        strip: bool = True,
        ignore_case: bool = False,
        ignore_punctuation: bool = False,
    ) -> dict[str, float]:
        if not predictions:
            raise ValueError("No predictions to score.")
        options = {"strip": strip, "ignore_case": ignore_case, "ignore_punctuation": ignore_punctuation}
        hits = 0
        for i, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
            wanted = {normalize(r, **options) for r in _reference_list(refs, i)}
            hits += normalize(prediction, **options) in wanted
        return {"exact_match": hits / len(predictions)}
