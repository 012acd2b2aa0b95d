"""Reward sources for the RL stages (ppo, grpo, rloo): reward models, rule functions and rating models behind an
API, weighted.

A recipe names its rewards in a ``reward:`` section; nothing in it is executed until the run starts::

    reward:
      sources:
        - {function: alignkit.demo.rewards:reversal_reward}   # a rule, by import path
        - {model: runs/demo-rm, weight: 0.5}                 # an rm run dir, a local dir or a hub id
        - {api: {base_url: http://127.0.0.1:8000/v1, model: m}}   # a model behind an API rates each answer 0-9

Every source becomes a *reward function* with TRL's signature, ``f(prompts, completions, **columns) ->
list[float]``: prompts are message lists, completions are the decoded answers (strings), and the other
columns of the prompt dataset arrive as keyword lists (a reference answer, a test case...). TRL's GRPO and
RLOO trainers take these functions as they are; alignkit's PPO adds them up with their weights.

With several processes a reward function is called by every process on *its own* rows (TRL's per-process
completions, PPO's rollouts), so a reward model's function scores the rows it is given (``map_local``).
Rows every process holds alike (held-out answers, the samples ReST and RLAIF gather) go through
``shared_reward``, which scores each process's block of them and gathers the rewards (``map_shared``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

from alignkit.distributed import map_shared
from alignkit.errors import RecipeError
from alignkit.feedback.api_reward import APIRater
from alignkit.feedback.reward_model import RewardModel
from alignkit.recipe.settings.reward import RewardSettings, RewardSource
from alignkit.suggest import did_you_mean

RewardFunction = Callable[..., list[float]]

def import_function(path: str) -> RewardFunction:
    """The callable named by ``module:attribute``; an error naming what is missing otherwise."""
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise RecipeError(f"reward function '{path}': cannot import module '{module_name}' ({err})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = [name for name in dir(target) if not name.startswith("_")]
            raise RecipeError(f"reward function '{path}': '{module_name}' has no '{attribute}'."
                              f"{did_you_mean(part, public)}")
        target = getattr(target, part)
    if not callable(target):
        raise RecipeError(f"reward function '{path}' is a {type(target).__name__}, not a function")
    return target


def reward_model_function(path: str, batch_size: int = 32) -> RewardFunction:
    """A reward function scoring each (prompt, answer) with the reward model at ``path``: the scores of the
    rows this process passes, whatever the other processes pass (``RewardModel.score``)."""
    scorer = RewardModel.load(path, batch_size=batch_size)

    def score(prompts: Sequence, completions: Sequence, **_columns) -> list[float]:
        return scorer.score([_as_messages(p) for p in prompts], [_as_text(c) for c in completions])

    score.__name__ = f"reward_model_{_slug(path)}"  # TRL logs each function's reward under its name
    # PPO may start its critic from this reward model.
    score.reward_model = scorer  # type: ignore[attr-defined]
    score.reward_model_path = path  # type: ignore[attr-defined]
    return score


def api_rating_function(source: RewardSource) -> RewardFunction:
    """A reward function asking the model behind ``source.api`` to rate each (prompt, answer) from 0 to 9: the
    expected rating / 9 (``APIRater``). Its counts (requests, cache hits, unrated answers) are in ``.stats``."""
    rater = APIRater.from_source(source)

    def score(prompts: Sequence, completions: Sequence, **_columns) -> list[float]:
        return rater.score([_as_messages(p) for p in prompts], [_as_text(c) for c in completions])

    score.__name__ = f"api_rating_{_slug(source.api.model)}"  # TRL logs each function's reward under its name
    score.stats = rater.stats  # type: ignore[attr-defined]
    return score


def load_reward_functions(settings: RewardSettings) -> list[RewardFunction]:
    """One reward function per source, rule functions checked to take (prompts, completions, ...)."""
    functions = []
    for source in settings.sources:
        if source.function is not None:
            function = import_function(source.function)
            _check_signature(function, source.function)
            functions.append(function)
        elif source.api is not None:
            functions.append(api_rating_function(source))
        else:
            functions.append(reward_model_function(source.model, source.batch_size))
    return functions


def weighted_reward(functions: Sequence[RewardFunction], weights: Sequence[float], prompts: Sequence,
                    completions: Sequence[str], columns: dict[str, list] | None = None) -> tuple[list[float],
                                                                                             dict[str, float]]:
    """The weighted sum of every function's rewards, and each function's mean (for logging)."""
    total = [0.0] * len(completions)
    means: dict[str, float] = {}
    for function, weight in zip(functions, weights, strict=True):
        rewards = function(prompts=list(prompts), completions=list(completions), **(columns or {}))
        if len(rewards) != len(completions):
            raise ValueError(f"reward function {function.__name__} returned {len(rewards)} rewards for "
                             f"{len(completions)} completions")
        values = [float("nan") if r is None else float(r) for r in rewards]
        means[function.__name__] = sum(values) / len(values)
        total = [t + weight * v for t, v in zip(total, values)]
    return total, means


def shared_reward(functions: Sequence[RewardFunction], weights: Sequence[float]) -> Callable[..., list[float]]:
    """``reward(prompts, completions, columns) -> rewards``, the weighted sum of ``functions``, for rows that every
    process passes alike (held-out answers, gathered samples): each process scores its block of them and all
    get every reward (``distributed.map_shared``, which refuses rows that differ between processes)."""
    def reward(prompts: list, completions: list[str], columns: dict[str, list]) -> list[float]:
        names = list(columns)

        def score_block(prompts: list, completions: list[str], *values: list) -> list[float]:
            return weighted_reward(functions, weights, prompts, completions, dict(zip(names, values)))[0]

        return map_shared(score_block, list(prompts), list(completions), *(list(columns[name]) for name in names))

    return reward


def monitoring_reward(settings: RewardSettings | None) -> Callable[..., list[float]] | None:
    """``shared_reward`` of the ``reward:`` section's sources (imported now, so a bad import path fails before
    any model loads); None without a section. Every process passes the same rows (see ``shared_reward``)."""
    if settings is None:
        return None
    return shared_reward(load_reward_functions(settings), settings.weights)


def _check_signature(function: RewardFunction, path: str) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    parameters = signature.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    missing = [name for name in ("prompts", "completions") if name not in parameters and not takes_kwargs]
    if missing:
        raise RecipeError(f"reward function '{path}' must accept prompts and completions as keyword arguments "
                          f"(TRL's signature f(prompts, completions, **kwargs)); it lacks {', '.join(missing)}")


def _as_messages(prompt: Any) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _as_text(completion: Any) -> str:
    # TRL passes conversational completions as [{"role": "assistant", "content": ...}].
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


def _slug(path: str) -> str:
    return re.sub(r"\W+", "_", str(path)).strip("_")
