"""Text-generation metrics shipped with alignkit as ``evaluate`` modules that load offline.

Each metric lives in its own standalone module file next to this one (``rouge.py``, ``bleu.py``, ``chrf.py``,
``exact_match.py``), so it can be used through the ordinary ``evaluate`` API (``evaluate.load``, ``evaluate.combine``,
``add_batch``) without fetching anything from the Hugging Face Hub::

    import evaluate
    from alignkit import metrics

    rouge = metrics.load("rouge")                      # same as evaluate.load(metrics.module_path("rouge"))
    both = evaluate.combine([metrics.load("bleu"), metrics.load("chrf")])
    metrics.compute(["rouge", "bleu"], predictions, references)   # {"rouge1": ..., ..., "bleu": ...}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.errors import AlignkitError
from alignkit.suggest import did_you_mean

if TYPE_CHECKING:
    import evaluate

__all__ = ["METRICS", "compute", "load", "module_path"]

METRICS = ("rouge", "bleu", "chrf", "exact_match")

# The flat score keys each metric contributes to ``compute``; the other outputs (bleu's precisions, the sacreBLEU
# signatures, ...) stay available through ``load(name).compute(...)``.
_SCORE_KEYS: dict[str, tuple[str, ...]] = {
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("bleu",),
    "chrf": ("chrf",),
    "exact_match": ("exact_match",),
}

_HERE = Path(__file__).resolve().parent


def module_path(name: str) -> str:
    """Absolute path of the module file for metric ``name``, suitable for ``evaluate.load``.

    Raises:
        AlignkitError: ``name`` is not one of ``METRICS`` (the message suggests the closest name).
    """
    if name not in METRICS:
        raise AlignkitError(f"unknown metric '{name}'; available: {', '.join(METRICS)}.{did_you_mean(name, METRICS)}")
    return str(_HERE / f"{name}.py")


def load(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load metric ``name`` with ``evaluate.load(module_path(name), **kwargs)``, without network access.

    ``kwargs`` are ``evaluate.load``'s (``keep_in_memory``, ``cache_dir``, ``experiment_id``, ...); metric options
    such as ``use_stemmer`` or ``tokenize`` are passed to the returned module's ``compute``.
    """
    # Imported here so that ``import alignkit.metrics`` (names, paths) stays cheap; evaluate pulls in datasets/arrow.
    import evaluate

    # No offline switch is needed, and none is set: for a path to an existing ``.py`` file, evaluate.load goes
    # straight to its LocalEvaluationModuleFactory, which only checks that the file's imports are installed and copies
    # it into the local modules cache (HF_MODULES_CACHE); the Hub lookup and the download-count ping happen only for
    # bare names like "rouge". Setting HF_EVALUATE_OFFLINE around the call would not help anyway: evaluate reads it
    # once, at import time, and mutating os.environ is process-wide. tests/test_metrics.py checks this with sockets
    # disabled.
    return evaluate.load(module_path(name), **kwargs)


def compute(
    names: Iterable[str] | str,
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """Score ``predictions`` against ``references`` with each metric in ``names``; flat score keys.

    Args:
        names: metric names from ``METRICS`` (a single name is accepted too); duplicates are scored once.
        predictions: one generated text per example.
        references: one reference string per example, or a sequence of reference strings per example
            (multi-reference); the two forms may be mixed.
        options: per-metric keyword options for that module's ``compute``, e.g.
            ``{"rouge": {"use_stemmer": True}, "bleu": {"tokenize": "intl"}}``.

    Returns:
        ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum`` (rouge, each in [0, 1]), ``bleu`` (0-100), ``chrf`` (0-100),
        ``exact_match`` ([0, 1]), for the metrics asked only.

    Raises:
        AlignkitError: an unknown metric name, or options for a metric not asked for.
        ValueError: no predictions, or predictions and references of different lengths.
    """
    wanted = list(dict.fromkeys([names] if isinstance(names, str) else names))
    for name in wanted:
        module_path(name)  # Fail on a bad name before loading anything.
    options = dict(options or {})
    for name in options:
        if name not in wanted:
            raise AlignkitError(
                f"options given for metric '{name}', which is not computed.{did_you_mean(name, wanted)}"
            )
    if not predictions:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")

    # One list of strings per example: evaluate picks a single schema from the first example, so mixed
    # single/multi-reference input would otherwise be mis-encoded (a bare string split into characters).
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    preds = list(predictions)

    scores: dict[str, float] = {}
    for name in wanted:
        # keep_in_memory: nothing to share between processes here, so skip evaluate's on-disk Arrow cache and locks.
        result = load(name, keep_in_memory=True).compute(predictions=preds, references=refs, **options.get(name, {}))
        scores.update({key: float(result[key]) for key in _SCORE_KEYS[name] if key in result})
    return scores
