"""The ``model`` section: which model loads and how; and what a ``name_or_path`` that is a path means."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class QuantizationSettings:
    """bitsandbytes quantisation of the base model (QLoRA when combined with a LoRA adapter)."""

    bits: Literal[4, 8] = field(metadata={"help": "4 (QLoRA-style NF4/FP4) or 8 (LLM.int8)."})
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    double_quant: bool = field(default=True, metadata={"help": "Quantise the 4-bit quantisation constants too."})
    compute_dtype: Dtype = field(
        default="auto",
        metadata={"help": "dtype of the 4-bit matmuls: auto (bfloat16 on GPUs that have it, else float32), "
                  "float32, bfloat16 or float16."},
    )
    quant_storage: Dtype | None = field(
        default=None,
        metadata={"help": "dtype the 4-bit weights are packed in. Set it to the model dtype (e.g. bfloat16) "
                  "for FSDP + QLoRA, so FSDP can shard quantised and regular weights alike."},
    )
    skip_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules left unquantised (e.g. [lm_head])."}
    )


@dataclass
class ModelSettings:
    """Which model to load and how."""

    name_or_path: str = field(
        metadata={"help": "Hub id (Qwen/Qwen2.5-0.5B-Instruct), local directory, a previous alignkit run dir, "
                  "or an embedded demo model (demo:tiny-llama)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: Dtype = field(
        default="auto", metadata={"help": "Weights dtype: auto (as saved), float32, bfloat16 or float16."}
    )
    quantization: QuantizationSettings | None = field(
        default=None, metadata={"help": "bitsandbytes 4-bit or 8-bit loading; null for none."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa, flash_attention_2, ... (null: transformers' default)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the Hub. Only for repositories you trust."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer to load, if not the model's own."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template to use instead of the tokenizer's: Jinja text or a path to a .jinja file."},
    )
    run_adapter: Literal["continue", "merge"] = field(
        default="continue",
        metadata={"help": "When name_or_path is an alignkit run dir holding an adapter (e.g. DPO from an SFT run): "
                  "continue = train that adapter further (DPO/KTO use a frozen copy of it as the reference); "
                  "merge = fold it into the base weights, then attach the recipe's adapter (unquantised bases only)."},
    )


def is_run_with_adapter(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a local directory holding a peft adapter (an alignkit run dir, say)."""
    return (Path(name_or_path) / "adapter_config.json").is_file()


def is_future_run(name_or_path: str) -> bool:
    """A run dir that an earlier step of the user's pipeline has not written yet (``runs/demo-sft`` before
    ``make sft``): recipes that continue its adapter validate now and are checked again when it loads."""
    return name_or_path.startswith(("runs/", "./", "../", "/")) and not Path(name_or_path).exists()
