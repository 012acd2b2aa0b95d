"""Loading models and tokenizers, shared by every stage.

``model.name_or_path`` may be a hub id, a local model directory, or an embedded demo model
(``demo:tiny-llama``). Quantisation goes through bitsandbytes; ``trust_remote_code`` is off unless the
recipe turns it on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Literal

import yaml

from alignkit import distributed
from alignkit.demo.build import demo_model_dir, is_demo_model
from alignkit.errors import AlignkitError, RecipeError
from alignkit.recipe import schema
from alignkit.recipe.settings import ModelSettings, QuantizationSettings, is_future_run, is_run_with_adapter

Head = Literal["causal_lm", "reward"]

logger = logging.getLogger(__name__)


def resolve_path(name_or_path: str) -> str:
    """A demo model's built directory, an existing local directory, or the hub id unchanged."""
    if is_demo_model(name_or_path):
        return str(demo_model_dir(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.exists():
        return str(local)
    if name_or_path.startswith(("/", ".", "~")):
        raise AlignkitError(f"model directory not found: {local.absolute()}")
    if is_future_run(name_or_path):
        raise AlignkitError(f"model directory not found: {local.absolute()} (a run dir: run the recipe that "
                            f"writes it first, e.g. `make sft` for runs/demo-sft)")
    return name_or_path


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` is passed through for transformers to resolve."""
    import torch

    return name if name == "auto" else getattr(torch, name)


def _compute_dtype(quant: QuantizationSettings, model_dtype: str):
    import torch

    if quant.compute_dtype != "auto":
        return torch_dtype(quant.compute_dtype)
    if model_dtype not in ("auto", "float32"):
        return torch_dtype(model_dtype)
    # bf16 matmuls where the GPU has them; on CPUs bf16 is emulated and ~10x slower than float32.
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def quantization_config(settings: ModelSettings):
    """transformers' BitsAndBytesConfig for the model section, or None."""
    quant = settings.quantization
    if quant is None:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=quant.skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=_compute_dtype(quant, settings.dtype),
        bnb_4bit_quant_storage=torch_dtype(quant.quant_storage) if quant.quant_storage else None,
        llm_int8_skip_modules=quant.skip_modules,
    )


def load_tokenizer(settings: ModelSettings):
    """The tokenizer with a pad token and a chat template (the recipe's, else the tokenizer's own)."""
    from transformers import AutoTokenizer

    path = resolve_path(settings.tokenizer or settings.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=settings.revision,
                                              trust_remote_code=settings.trust_remote_code)
    if settings.chat_template:
        tokenizer.chat_template = read_chat_template(settings.chat_template)
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss and attention, so reusing EOS is safe and needs no new embedding.
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise AlignkitError(f"the tokenizer of '{settings.name_or_path}' has no chat template; set "
                            "model.chat_template to Jinja text or to a .jinja file")
    return tokenizer


def read_chat_template(value: str) -> str:
    """A template given inline, or read from the file it names."""
    if value.endswith((".jinja", ".j2", ".txt")) and "{" not in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise RecipeError(f"model.chat_template: file not found: {path.absolute()}")
        return path.read_text()
    return value


def load_model(settings: ModelSettings, *, for_training: bool = True, head: Head = "causal_lm"):
    """The model with a language-model head (``causal_lm``) or a scalar reward head (``reward``: a sequence
    classifier with one label), quantised if the recipe says so; on this process's device when quantised or
    loaded for inference (``for_training=False``), else left for the trainer to place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict = {
        "revision": settings.revision,
        "dtype": torch_dtype(settings.dtype),
        "trust_remote_code": settings.trust_remote_code,
    }
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    quant = quantization_config(settings)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if torch.cuda.is_available() and not (for_training and distributed.uses_fsdp()):
            # Quantised weights are placed at load time; each process keeps its own full copy (DDP) on its GPU.
            # Under FSDP the trainer places them, shard by shard (quant_storage lets it shard them).
            kwargs["device_map"] = {"": distributed.state().local_process_index}
    path = resolve_path(settings.name_or_path)
    if is_run_with_adapter(path):
        # A run dir as a plain base (the start of a run_adapter: merge run): its base with its adapter folded in.
        base = load_model(base_settings_of_adapter(Path(path), settings), for_training=for_training, head=head)
        return merge_adapter(base, path)
    try:
        if head == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise AlignkitError(f"could not load model '{settings.name_or_path}': {err}") from None
    if for_training:
        model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
        if quant is not None:
            keep_4bit_layout_trainable(model)
    elif quant is None:
        model.to(distributed.device())  # generation and scoring run on this process's GPU; trainers place their own
    return model


def keep_4bit_layout_trainable(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for a faster inference kernel the
    first time it runs in eval mode without gradients (an evaluation, a PPO rollout), and from then on computes
    every CPU forward with that kernel, through which no gradient flows back to the layers below: the LoRA
    adapters under it stop learning. A model that trains keeps the trainable layout."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_for_kbit_training(model, gradient_checkpointing: bool):
    """QLoRA's preparation of a quantised base (fp32 norms, input grads for checkpointing); no-op otherwise."""
    if not is_quantized(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def base_settings_of_adapter(path: Path, settings: ModelSettings) -> ModelSettings:
    """Model settings of the base an adapter was trained on: the run's own recipe when alignkit made it
    (so quantisation and dtype match training), else the base named in adapter_config.json."""
    recipe_file = path / "recipe.yaml"
    if recipe_file.is_file():
        saved = (yaml.safe_load(recipe_file.read_text()) or {}).get("model", {})
        base = schema.build(ModelSettings, saved, f"{recipe_file} model")
        if is_run_with_adapter(base.name_or_path) and base.run_adapter == "continue":
            # The run trained its starting run's adapter further: this adapter holds both, so the base is
            # that run's base (loaded the way this run loaded it).
            inner = base_settings_of_adapter(Path(base.name_or_path), base)
            base = dataclasses.replace(inner, dtype=base.dtype, quantization=base.quantization,
                                       attn_implementation=base.attn_implementation)
    else:
        base = dataclasses.replace(settings, name_or_path=_base_named_in_adapter_config(path),
                                   tokenizer=settings.tokenizer or str(path))
    if base.name_or_path == settings.name_or_path:
        raise AlignkitError(f"{path}: the adapter names itself as its base")
    return base


def _base_named_in_adapter_config(path: Path) -> str:
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise AlignkitError(f"{path}/adapter_config.json does not name its base model")
    return base


def load_run_for_training(settings: ModelSettings, head: Head, gradient_checkpointing: bool):
    """(model, tokenizer, keeps_adapter) for training on top of the adapter in the run dir ``settings.name_or_path``.

    The base is the run's base model, loaded with *this* recipe's options (dtype, quantisation: a DPO-QLoRA
    recipe may start from a LoRA SFT run); the tokenizer (and chat template) is the run's own. With
    ``run_adapter: continue`` the adapter is returned trainable (``keeps_adapter`` True); with ``merge`` it
    is folded into the base weights and the caller attaches the recipe's adapter.
    """
    from peft import PeftModel

    path = Path(resolve_path(settings.name_or_path))
    base = dataclasses.replace(base_settings_of_adapter(path, settings), dtype=settings.dtype,
                               quantization=settings.quantization, attn_implementation=settings.attn_implementation,
                               tokenizer=str(path), chat_template=None)
    tokenizer = load_tokenizer(base)
    model = prepare_for_kbit_training(load_model(base, head=head), gradient_checkpointing)
    if settings.run_adapter == "continue":
        return PeftModel.from_pretrained(model, str(path), is_trainable=True), tokenizer, True
    return merge_adapter(model, path), tokenizer, False


def merge_adapter(model, path: str | Path):
    """``model`` with the adapter saved at ``path`` folded into its weights.

    The adapter may come from another head: a reward model starts from an SFT run, whose adapter was saved
    for a causal LM. The transformer body is shared, so the adapter is loaded as a task-agnostic peft model.
    """
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(path))
    if config.task_type == "CAUSAL_LM" and not hasattr(model, "prepare_inputs_for_generation"):
        config.task_type = None
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    merged = PeftModel.from_pretrained(model, str(path), config=config).merge_and_unload()
    # peft froze the base to load the adapter; the merged model is a plain model again and trains as the one
    # passed in would (a full fine-tune from a run dir needs its weights trainable; a new adapter freezes them).
    for name, param in merged.named_parameters():
        param.requires_grad_(trainable.get(name, param.requires_grad))
    return merged


def load_for_inference(settings: ModelSettings):
    """(model, tokenizer) ready to generate: a plain model, or a base with the adapter of a run dir."""
    path = resolve_path(settings.name_or_path)
    if not is_run_with_adapter(path):
        return load_model(settings, for_training=False), load_tokenizer(settings)
    from peft import PeftModel

    base_settings = base_settings_of_adapter(Path(path), settings)
    model = PeftModel.from_pretrained(load_model(base_settings, for_training=False), path)
    # The run dir holds the tokenizer used in training (chat template included).
    tokenizer = load_tokenizer(dataclasses.replace(base_settings, tokenizer=path, chat_template=None))
    return model, tokenizer
