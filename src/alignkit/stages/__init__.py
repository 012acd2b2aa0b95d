"""The stage registry: ``alignkit <stage> RECIPE`` looks the stage up here by name.

A stage module defines ``STAGE = Stage(...)``: its TRL config class (for the ``train`` section), any
recipe sections of its own, its data, ``run(recipe, run_dir) -> metrics`` and what the planner, merge and
the launch check need to know about it. ``Stage`` is the only description of a stage: the CLI, recipe
validation, the planner, merge and ``training.check_launch`` all ask it, and the Makefile's ``STAGES`` list
is kept equal to ``STAGES`` below by a test. Adding a stage is its module plus one line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.errors import RecipeError
from alignkit.suggest import did_you_mean

STAGES: dict[str, str] = {
    "sft": "alignkit.stages.sft",
    "eval": "alignkit.stages.eval",
    "rm": "alignkit.stages.rm",
    "dpo": "alignkit.stages.dpo",
    "kto": "alignkit.stages.kto",
    "orpo": "alignkit.stages.orpo",
    "ppo": "alignkit.stages.ppo",
    "grpo": "alignkit.stages.grpo",
    "rloo": "alignkit.stages.rloo",
    "rest": "alignkit.stages.rest",
    "rlaif": "alignkit.stages.rlaif",
}


@dataclass(frozen=True)
class Stage:
    """What the CLI and the recipe validator need to know about a stage."""

    name: str
    help: str
    train_config: Callable[[], type]  # returns the TRL config class; a callable so imports stay lazy
    run: Callable[..., dict[str, Any]]  # run(recipe, run_dir) -> flat metrics
    sections: dict[str, type] = field(default_factory=dict)
    required_data: tuple[str, ...] = ("train",)  # data groups the stage cannot run without
    required_sections: tuple[str, ...] = ()  # stage sections the stage cannot run without
    # Checks of the validated ``train`` section that the TRL config only makes once training has started
    # (an unknown DPO loss type, say); raises RecipeError.
    check_train: Callable[[dict[str, Any]], None] | None = None
    # For a stage whose ``train`` section depends on another section (rlaif: DPO or reward-model training):
    # the config class for the raw recipe, used instead of ``train_config`` when validating.
    train_config_of: Callable[[dict[str, Any]], type] | None = None
    # The rows the stage reads (alignkit.data.formats.FORMATS): its data sources' ``format`` is one of these.
    rows: Literal["sft", "preference", "prompt"] = "sft"
    # For a stage that builds its TRL configs other than from the train section as it is (rest and rlaif train
    # without evaluation; rlaif's revision step runs SFT): ``train_configs(recipe)`` lists them as
    # (recipe key, config class, values). Validation builds each, so what a config refuses fails there.
    train_configs: Callable[[Any], list[tuple[str, type, dict[str, Any]]]] | None = None
    # ``load_data(recipe.data) -> PreparedData``: the loader the stage trains on (the planner counts its rows).
    load_data: Callable[[Any], Any] | None = None
    # ---- what the memory planner, merge and the launch check know about the stage ---------------------------
    trains: bool = True  # False for a stage that trains nothing (eval): there is no training run to plan
    head: Literal["causal_lm", "reward"] = "causal_lm"  # the model the run trains and merge loads back
    sequences_per_row: int = 1  # what one row puts through the model: 2 for preference pairs (chosen, rejected)
    fused_head: bool = False  # TRL's SFT trainer computes its loss with the fused (chunked) output layer
    # The models the stage holds besides the trained one: a frozen reference for a full fine-tune (an adapter
    # is disabled instead), or PPO's critic and reference.
    extra_models: Literal["none", "reference", "critic_and_reference"] = "none"
    # Which rows the stage's TRL trainer drops for ``train.max_length`` (training.DROPPED_FOR_LENGTH):
    # "conversation" (rm: chosen or rejected, whole, must fit), "first_answer" (sft: the prompt before the
    # first answer leaves no answer token), "prompt" (dpo, kto: the prompt alone fills it), or None.
    dropped_for_length: Literal["conversation", "first_answer", "prompt"] | None = None
    # How the stage runs under a sharded launch (an accelerate config asking for FSDP or DeepSpeed):
    #   "accelerate"  its TRL trainer shards the model through accelerate's plugins (FSDP, ZeRO-3; GPUs only);
    #   "fsdp"        the stage shards its own models with torch's fully_shard under an FSDP launch, on GPUs and
    #                 CPU processes alike (PPO's own loop); DeepSpeed launches are refused;
    #   "none"        DDP only: sharded launches are refused, and the planner offers none.
    sharded_launch: Literal["accelerate", "fsdp", "none"] = "accelerate"
    # Whether the planner offers QLoRA as a fix for a recipe that already trains an adapter (not for PPO).
    plan_offers_qlora: bool = True

    def config_class(self, raw: dict[str, Any]) -> type:
        """The TRL config class of the ``train`` section of the raw recipe ``raw``."""
        return self.train_config_of(raw) if self.train_config_of is not None else self.train_config()

    def configs(self, recipe: Any) -> list[tuple[str, type, dict[str, Any]]]:
        """The TRL configs a run of the validated ``recipe`` builds: (recipe key, config class, values)."""
        if self.train_configs is not None:
            return self.train_configs(recipe)
        return [("train", self.train_config(), recipe.train)]


def get_stage(name: str) -> Stage:
    """The registered stage called ``name``."""
    if name not in STAGES:
        raise RecipeError(f"unknown stage '{name}'.{did_you_mean(name, STAGES)} Stages: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).STAGE
