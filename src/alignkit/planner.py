"""What a recipe's model holds, counted without its weights: the first part of ``alignkit plan``.

The model is built from its ``config.json`` on the meta device (shapes, no memory, no download of weights),
the recipe's adapter is attached with peft exactly as training attaches it, and the parameters are counted:
all of them, the trainable ones, and the weights bitsandbytes would quantise (the linear layers of the body;
the output layer and embeddings stay in the model's dtype). The memory estimate builds on these counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit import adapters, modeling
from alignkit.errors import AlignkitError
from alignkit.recipe import ModelSettings, Recipe, is_run_with_adapter


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model with its adapter (tied weights counted once)."""

    total: int            # every parameter, adapter included
    trainable: int        # what the optimizer updates: the adapter, or everything for a full fine-tune
    quantizable: int      # weights of the body's linear layers: 4 / 8 bits when the recipe quantises
    largest_layer: int    # parameters of the biggest decoder layer: what FSDP gathers at once


def model_config(settings: ModelSettings):
    """The transformers config of the recipe's model (a run dir's base for a run dir), from config.json only."""
    from transformers import AutoConfig

    path = modeling.resolve_path(settings.name_or_path)
    if is_run_with_adapter(path):
        path = modeling.resolve_path(modeling.base_settings_of_adapter(Path(path), settings).name_or_path)
    try:
        return AutoConfig.from_pretrained(path, revision=settings.revision,
                                          trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise AlignkitError(f"could not read the config of '{settings.name_or_path}': {err}") from None


def meta_model(config, head: modeling.Head = "causal_lm"):
    """The model ``config`` describes, on the meta device: every parameter's shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if head == "reward":
            config.num_labels = 1
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model, adapter: dict[str, Any], head: modeling.Head = "causal_lm") -> ParameterCounts:
    """Counts for ``model`` (a meta model) with the recipe's ``adapter`` section attached as peft attaches it."""
    quantizable = _quantizable_weights(model)
    largest = max((_numel(layer) for layer in _decoder_layers(model)), default=0)
    if adapter["method"] != "none":
        from peft import get_peft_model

        task_type = "SEQ_CLS" if head == "reward" else "CAUSAL_LM"
        model = get_peft_model(model, adapters.build_peft_config(adapter, task_type=task_type))
    total = _numel(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParameterCounts(total=total, trainable=trainable, quantizable=quantizable, largest_layer=largest)


def recipe_parameters(recipe: Recipe, head: modeling.Head = "causal_lm") -> ParameterCounts:
    """``count_parameters`` for the recipe's model and adapter, from the model's config alone."""
    return count_parameters(meta_model(model_config(recipe.model), head), recipe.adapter, head)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())  # torch yields a tied parameter once


def _quantizable_weights(model) -> int:
    """Weights bitsandbytes replaces with 4/8-bit ones: every linear layer (nn.Linear, GPT-2's Conv1D) except
    the output layer (transformers keeps the output embeddings unquantised), counted once if tied."""
    import torch
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    seen: set[int] = set()
    count = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output and id(module.weight) not in seen:
            seen.add(id(module.weight))
            count += module.weight.numel()
    return count


def _decoder_layers(model) -> list:
    """The repeated blocks of the body (the largest ``nn.ModuleList``): the units FSDP wraps."""
    import torch

    lists = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []
