"""recipe.adapter -> peft config. Shared by every stage.

The ``adapter`` section is ``method`` plus the arguments of that method's peft config class, under peft's
own names (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_dora``, ``use_rslora``,
``num_virtual_tokens``...), validated against the class so any peft option works and typos are caught.

Methods: ``none`` (full fine-tune), ``lora``, ``qlora`` (LoRA on a 4-bit base; the model section must
quantise to 4 bits), ``ia3``, ``prompt_tuning``.
"""

from __future__ import annotations

import importlib
from typing import Any

from alignkit.errors import RecipeError
from alignkit.recipe import schema
from alignkit.suggest import did_you_mean

# method -> peft config class (module, name), imported only when used.
METHODS: dict[str, tuple[str, str] | None] = {
    "none": None,
    "lora": ("peft", "LoraConfig"),
    "qlora": ("peft", "LoraConfig"),
    "ia3": ("peft", "IA3Config"),
    "prompt_tuning": ("peft", "PromptTuningConfig"),
}

# alignkit's defaults where peft's differ: the QLoRA paper's practice of adapting every linear layer.
DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
    "qlora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
    "prompt_tuning": {"num_virtual_tokens": 16},
}

# Set by alignkit from the stage and the model, not by the recipe.
_MANAGED_FIELDS = {"task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}


def config_class(method: str) -> type | None:
    """The peft config class for ``method`` (None for a full fine-tune)."""
    if method not in METHODS:
        raise RecipeError(f"unknown adapter method '{method}'.{did_you_mean(method, METHODS)} "
                          f"Choose one of: {', '.join(METHODS)}")
    target = METHODS[method]
    return None if target is None else getattr(importlib.import_module(target[0]), target[1])


def validate_adapter(raw: Any) -> dict[str, Any]:
    """Check the adapter section; return ``{"method": ..., **typed peft arguments}`` with defaults filled."""
    if not isinstance(raw, dict):
        raise RecipeError(f"'adapter' must be a mapping with a 'method' key, got {raw!r}")
    options = dict(raw)
    method = schema.coerce(options.pop("method", "none"), str, "adapter.method")
    cls = config_class(method)
    if cls is None:
        if options:
            raise RecipeError(f"adapter method 'none' (full fine-tune) takes no options, got {', '.join(options)}")
        return {"method": "none"}
    allowed = {k: v for k, v in schema.init_fields(cls).items() if k not in _MANAGED_FIELDS}
    schema.check_keys(options, allowed, f"section 'adapter' ({cls.__name__}, method {method})")
    hints = schema.type_hints(cls)
    typed = {key: schema.coerce(value, hints.get(key, Any), f"adapter.{key}") for key, value in options.items()}
    return {"method": method, **DEFAULTS.get(method, {}), **typed}


def build_peft_config(adapter: dict[str, Any], task_type: str = "CAUSAL_LM", tokenizer_path: str | None = None):
    """The peft config for a validated adapter section, or None for a full fine-tune."""
    options = dict(adapter)
    cls = config_class(options.pop("method"))
    if cls is None:
        return None
    if cls.__name__ == "PromptTuningConfig" and str(options.get("prompt_tuning_init", "")).upper().endswith("TEXT"):
        options.setdefault("tokenizer_name_or_path", tokenizer_path)
    try:
        return cls(task_type=task_type, **options)
    except (ValueError, TypeError) as err:  # peft's checks across options, in __post_init__
        raise RecipeError(schema.config_error(err, cls, "adapter")) from None


def check_adapter(adapter: dict[str, Any], tokenizer_path: str | None = None) -> None:
    """Build the peft config of a validated adapter section as the run will, so that what peft refuses
    (options that do not go together) is refused by validation. Nothing is loaded."""
    build_peft_config(adapter, tokenizer_path=tokenizer_path)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights counted by their element count, not packed size."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if hasattr(param, "quant_state"):  # bitsandbytes Params4bit store two values per byte
            count = param.quant_state.shape.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
