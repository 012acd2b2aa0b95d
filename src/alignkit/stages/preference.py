"""What the preference objectives check before a run, shared by their stages (dpo, rm) and by rlaif, which
trains with either one."""

from __future__ import annotations

from alignkit.errors import RecipeError
from alignkit.recipe.loading import Recipe
from alignkit.recipe.settings import is_run_with_adapter
from alignkit.suggest import did_you_mean

# The loss types of TRL 1.16's DPOTrainer (its DPOConfig docs); TRL itself only rejects an unknown one at
# the first training step, after the model has loaded.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def check_dpo_train(train: dict) -> None:
    """Every ``train.loss_type`` must be one TRL knows."""
    loss_types = train.get("loss_type") or []
    for name in [loss_types] if isinstance(loss_types, str) else loss_types:
        if name not in LOSS_TYPES:
            raise RecipeError(f"train.loss_type: unknown DPO loss '{name}'.{did_you_mean(name, LOSS_TYPES)} "
                              f"Loss types: {', '.join(LOSS_TYPES)}")


def check_starts_new_head(recipe: Recipe, who: str) -> None:
    """A reward model starts a new reward head: a language-model adapter has none to continue, so a run dir
    with an adapter must be merged into its base (RecipeError otherwise, naming ``who``)."""
    if is_run_with_adapter(recipe.model.name_or_path) and recipe.model.run_adapter == "continue":
        raise RecipeError(f"{who} starts a new reward head: to start from a run dir with an adapter, set "
                          "model.run_adapter: merge (and give the reward model its own adapter section)")
