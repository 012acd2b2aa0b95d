"""The mixture as Arrow operations: weighted sources (``select`` of row indices), concatenated, shuffled,
and the held-out split (``select`` of ranges), without copying a row into Python."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from alignkit.errors import DataError
from alignkit.recipe.settings import DataSettings


def weighted_indices(size: int, weight: float, rng: random.Random) -> list[int]:
    """Row indices that up- or down-sample ``size`` rows to ``round(size * weight)``: whole copies, then a
    random remainder (without repeats)."""
    target = max(1, round(size * weight))
    copies, remainder = divmod(target, size)
    return list(range(size)) * copies + rng.sample(range(size), remainder)


def apply_weight(rows: Any, weight: float, rng: random.Random) -> Any:
    """``rows`` (a list or a ``datasets.Dataset``) weighted by :func:`weighted_indices`."""
    indices = weighted_indices(len(rows), weight, rng)
    if isinstance(rows, list):
        return [rows[index] for index in indices]
    return rows if indices == list(range(len(rows))) else rows.select(indices)


def shuffled(rows: Any, rng: random.Random) -> Any:
    """``rows`` (a ``datasets.Dataset``) in a random order drawn from ``rng``: Python's shuffle of the row
    indices, so a seed gives the same order as it always has (and as a list of the same rows would get), the
    rows themselves untouched (an indices mapping over the Arrow table)."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    return rows.select(order)


def split_eval(rows: Any, eval_size: float) -> tuple[Any, Any]:
    """Hold out ``eval_size`` rows (a fraction if < 1, else a count) from already-shuffled ``rows`` (a list or a
    ``datasets.Dataset``): the first ones are held out."""
    count = round(len(rows) * eval_size) if eval_size < 1 else int(eval_size)
    if count >= len(rows):
        raise DataError(f"data.eval_size={eval_size} would leave no training rows (the mixture has {len(rows)})")
    if isinstance(rows, list):
        return rows[count:], rows[:count]
    return rows.select(range(count, len(rows))), rows.select(range(count))


def mix(settings: DataSettings, train: Sequence[Any], eval_sets: Sequence[Any],
        expand: Callable[[Any], Any] | None = None) -> tuple[Any, Any | None]:
    """The training mixture (sources weighted as ``settings.train`` says, shuffled) and the held-out set
    (``eval_sets`` in order and unweighted, or ``settings.eval_size`` rows split off the mixture).

    ``expand``, if given, maps a dataset to one with several rows per row; it runs after the split, so the rows
    made from one source row (a pair's two halves) never end up on both sides, and the result is shuffled again
    so they are not neighbours: TRL's KTO trainer takes each row's neighbour's completion as the mismatched
    sample of its KL estimate.
    """
    from datasets import Dataset, concatenate_datasets

    rng = random.Random(settings.seed)
    weighted = [apply_weight(dataset, source.weight, rng) for dataset, source in zip(train, settings.train)]
    if weighted:
        train_set = shuffled(concatenate_datasets(weighted), rng)
    else:  # an evaluation recipe: held-out sources only, no training rows (with the held-out rows' columns)
        train_set = eval_sets[0].select([]) if eval_sets else Dataset.from_dict({})
    eval_set = concatenate_datasets(list(eval_sets)) if eval_sets else None
    if eval_set is None and settings.eval_size > 0:
        train_set, eval_set = split_eval(train_set, settings.eval_size)
    if expand is not None:
        train_set = shuffled(expand(train_set), rng)
        eval_set = shuffled(expand(eval_set), rng) if eval_set is not None else None
    return train_set, eval_set
