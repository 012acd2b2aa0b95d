"""Resuming a PPO checkpoint whose optimizer state has the layout of alignkit before ``critic_learning_rate``.

That optimizer had the Trainer's parameter groups over every trained parameter, policy's and critic's together:
those with weight decay, then those without (an empty one left out). Now the policy's and the critic's parameters
have groups of their own, each tagged with its ``role`` (see ``PPOTrainer._build_optimizer``). torch loads an
optimizer state only into the layout it was saved from, so an older checkpoint is first rewritten into the
current layout, parameter by parameter: each parameter keeps its own moments and step count.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import RunDirError


def has_role_groups(saved_optimizer: dict[str, Any]) -> bool:
    """Whether an optimizer state dict has the current layout (groups tagged with the policy's or critic's role)."""
    return all("role" in group for group in saved_optimizer["param_groups"])


def regroup_optimizer_state(saved: dict[str, Any], old_groups: Sequence[Sequence[torch.nn.Parameter]],
                            optimizer: torch.optim.Optimizer, checkpoint: Path) -> tuple[dict[str, Any], list[int]]:
    """``saved``, an optimizer state dict whose groups held ``old_groups``' parameters (in that order), rewritten
    for ``optimizer``'s groups over the same parameters, and for each of ``optimizer``'s groups the index of the
    old group its parameters come from.

    Each group keeps the saved group's settings (betas, eps, weight decay...) but takes its learning rates
    (``lr``, ``initial_lr``) from ``optimizer``: the recipe's, the critic's at ``critic_learning_rate``.
    Raises RunDirError when the checkpoint's groups do not hold as many parameters as ``old_groups``.
    """
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    expected_sizes = [len(group) for group in old_groups]
    if saved_sizes != expected_sizes:
        raise RunDirError(
            f"cannot resume from {checkpoint}: its optimizer state, written by alignkit before PPO's "
            f"critic_learning_rate, holds {sum(saved_sizes)} parameters in groups of {saved_sizes}, but this run "
            f"trains {sum(expected_sizes)} in groups of {expected_sizes}. Resume it with the recipe it was written "
            "with (same model, adapter and critic settings), or start a new run without resume_from_checkpoint")
    # Where each parameter was: its old group, and its index in the saved state.
    was = {id(parameter): (group_index, saved_id)
           for group_index, (parameters, saved_group) in enumerate(zip(old_groups, saved["param_groups"]))
           for parameter, saved_id in zip(parameters, saved_group["params"])}
    state: dict[int, Any] = {}
    param_groups: list[dict[str, Any]] = []
    sources: list[int] = []
    next_id = 0  # torch numbers the parameters of a state dict in the order of its groups
    for group in optimizer.param_groups:
        old_indices = {was[id(parameter)][0] for parameter in group["params"]}
        # The new groups split the old ones by role (weight decay or not, then policy or critic): never across.
        assert len(old_indices) == 1, f"a {group['role']} optimizer group mixes old groups {old_indices}"
        source = old_indices.pop()
        new_ids = list(range(next_id, next_id + len(group["params"])))
        next_id += len(new_ids)
        for parameter, new_id in zip(group["params"], new_ids):
            saved_id = was[id(parameter)][1]
            if saved_id in saved["state"]:  # a parameter that never had a gradient has no state yet
                state[new_id] = saved["state"][saved_id]
        settings = {key: value for key, value in saved["param_groups"][source].items() if key != "params"}
        param_groups.append(settings | {"lr": group["lr"], "initial_lr": group.get("initial_lr", group["lr"]),
                                        "role": group["role"], "params": new_ids})
        sources.append(source)
    return {"state": state, "param_groups": param_groups}, sources


def regroup_scheduler_state(saved: dict[str, Any], sources: Sequence[int], scheduler, checkpoint: Path
                            ) -> dict[str, Any]:
    """The state dict of a learning-rate schedule by step (transformers' LambdaLR) over the old groups, for
    ``scheduler``'s groups, each of which comes from old group ``sources[i]``: the saved step, the groups' base
    learning rates from ``scheduler``'s optimizer (already regrouped)."""
    if not hasattr(scheduler, "lr_lambdas") or "base_lrs" not in saved:
        raise RunDirError(f"cannot resume from {checkpoint}: its optimizer state was written by alignkit before "
                          f"PPO's critic_learning_rate, and a {type(scheduler).__name__} schedule cannot be moved "
                          "to the new optimizer groups; use a schedule by step (e.g. lr_scheduler_type: linear) "
                          "or start a new run without resume_from_checkpoint")
    regrouped = dict(saved, base_lrs=[group["initial_lr"] for group in scheduler.optimizer.param_groups])
    if saved.get("lr_lambdas") is not None:
        regrouped["lr_lambdas"] = [saved["lr_lambdas"][source] for source in sources]
    regrouped.pop("_last_lr", None)  # set by set_scheduled_learning_rates once loaded
    return regrouped


def set_scheduled_learning_rates(scheduler) -> None:
    """Every group's learning rate where ``scheduler``'s schedule puts it at its current step, as its own step
    would have set it (each group's base rate times its own schedule's factor)."""
    rates = [base * schedule(scheduler.last_epoch) for base, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates
