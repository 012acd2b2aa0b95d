"""Peak memory per device of a training recipe, predicted from the model's config alone.

The baseline is the rule of thumb for full fine-tuning with AdamW in float32: 4 bytes of weights, 4 of
gradients and 8 of optimizer state per parameter, plus activations. Every term is refined from the recipe:

  weights      each parameter in the dtype training holds it in: the model dtype; 4-bit weights at half a byte
               plus their quantisation constants (a float32 absmax per 64 weights, or with double quantisation
               one byte per 64 and a float32 per 16,384); 8-bit weights at one byte plus a float32 scale per
               row; the parameters a quantised model keeps unquantised in float32 (peft's
               prepare_model_for_kbit_training); adapters in float32 (peft), or bfloat16 on a quantised base
               (TRL's QLoRA cast).
  gradients    one per trainable parameter, in its dtype.
  optimizer    per trainable tensor: AdamW two states in the parameter's dtype; bitsandbytes 8-bit AdamW one
               byte per state and a float32 absmax per 256 (tensors under 4,096 values keep 32-bit states);
               paged optimizers the same sizes, in memory the driver may page out to the CPU; Adafactor its
               factored row and column statistics; SGD none.
  activations  what autograd saves in one forward pass, traced on the meta device for the real batch shape
               (``alignkit.plan.activations``); with activation checkpointing each layer's input plus one layer.
  workspace    the largest short-lived allocation on top of the activations: the output layer's (a fused,
               tiled log-softmax in TRL's SFT; full logits and their log-softmax in the other stages), or a
               layer's backward.

Peak = weights + optimizer + the larger of (activations + workspace [+ gradients when they accumulate over
micro-batches]) and (gradients + the larger of one layer's backward and the optimizer step's temporaries);
the optimizer states exist from the first step on, so the peak is that of the second.
Across devices: DDP keeps everything per device plus gradient buckets; FSDP and ZeRO-3 divide weights,
gradients and optimizer states by the device count and gather a layer (two with prefetching) at a time.
Validated against measured peaks on CPU: bench/memory_plan.py, docs/benchmarks.md#memory-planner.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Strategy = Literal["ddp", "fsdp", "zero3"]

# TRL's fused output layer (SFT) works on tiles of at most 4,096 tokens x 32,768 vocabulary entries. Measured
# on CPU (PyTorch path) its backward holds ~8.7 tiles at once; on CUDA TRL's Triton kernels keep one tile
# buffer and the gradient tile (3 is allowed for): not yet measured on a GPU.
FUSED_HEAD_TOKENS, FUSED_HEAD_VOCAB = 4096, 32768
FUSED_HEAD_TILES = {"cpu": 8.7, "cuda": 3.0}
# bitsandbytes: 4-bit blocks of 64 weights; with double quantisation the absmax values are stored in 8 bits,
# with a float32 constant per 256 of them.
FOUR_BIT_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
EIGHT_BIT_MIN_SIZE, EIGHT_BIT_BLOCK = 4096, 256  # bitsandbytes 8-bit optimizers
EIGHT_BIT_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adam_8bit", "paged_adam_8bit")
THIRTY_TWO_BIT_BNB = ("paged_adamw_32bit", "paged_adamw", "adamw_32bit")
FOREACH_OPTIMIZERS = ("adamw_torch", "adamw_hf", "adamw_torch_xla")  # keep a parameter-sized temporary in step


@dataclass(frozen=True)
class Launch:
    """Where the run goes: how many devices, how they share the model, and what kind they are."""

    devices: int = 1
    strategy: Strategy = "ddp"
    device_type: Literal["cuda", "cpu"] = "cuda"


@dataclass(frozen=True)
class Shape:
    """The training options memory depends on, resolved from the recipe's TRL config."""

    batch: int                      # per device
    length: int                     # tokens per sequence (the longest batch is padded to it)
    gradient_accumulation: int
    checkpointing: bool
    optimizer: str
    mixed_precision: str | None     # "bf16" / "fp16" autocast, or None
    sequences_per_row: int = 1      # preference stages run chosen and rejected together
    fused_head: bool = False        # TRL's SFT never builds the full logits
    vocab_head: bool = True         # False for a reward model's scalar head

    @property
    def tokens(self) -> int:
        return self.batch * self.sequences_per_row * self.length


@dataclass
class ParameterBytes:
    """Bytes of a model's parameters as training holds them."""

    weights: int = 0
    trainable: int = 0              # bytes of the trainable parameters (= their gradients)
    optimizer: int = 0
    step_temporaries: int = 0
    largest_layer: int = 0          # bytes of the biggest decoder layer: what FSDP / ZeRO-3 gather at once


@dataclass
class MemoryEstimate:
    """Per-device bytes of each part and the predicted peak."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    workspace: int
    extra_models: int = 0
    sharding_buffers: int = 0
    peak: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parameter_bytes(model, quantization, optimizer: str, quantized_weights: set[int]) -> ParameterBytes:
    """Weights, gradients and optimizer bytes of ``model`` (a meta model with the dtypes training gives its
    parameters). ``quantized_weights`` holds the ids of the weights bitsandbytes stores in 4 or 8 bits."""
    result = ParameterBytes()
    for parameter in model.parameters():
        numel = parameter.numel()
        if id(parameter) in quantized_weights:
            if quantization.bits == 4:
                result.weights += math.ceil(numel * FOUR_BIT_BYTES[quantization.double_quant])
            else:
                result.weights += numel + 4 * parameter.shape[0]  # int8 + a float32 scale per output row
            continue
        size = numel * parameter.element_size()
        result.weights += size
        if parameter.requires_grad:
            result.trainable += size
            result.optimizer += optimizer_state_bytes(optimizer, parameter)
            if optimizer in FOREACH_OPTIMIZERS:
                result.step_temporaries += size
    return result


def optimizer_state_bytes(optimizer: str, parameter) -> int:
    """Bytes of optimizer state ``optimizer`` (TRL's ``optim`` names) keeps for one trainable tensor."""
    numel, own = parameter.numel(), parameter.numel() * parameter.element_size()
    if optimizer in EIGHT_BIT_OPTIMIZERS:
        if numel < EIGHT_BIT_MIN_SIZE:
            return 8 * numel
        return 2 * (numel + 4 * math.ceil(numel / EIGHT_BIT_BLOCK))
    if optimizer in THIRTY_TWO_BIT_BNB:
        return 8 * numel
    if optimizer.startswith("adafactor"):
        if parameter.dim() >= 2:
            rows, columns = parameter.shape[-2], parameter.shape[-1]
            return 4 * (numel // (rows * columns)) * (rows + columns)
        return 4 * numel
    if optimizer.startswith("sgd"):
        return 0
    if optimizer.startswith("lion"):
        return numel if optimizer.endswith("8bit") else own
    return 2 * own  # AdamW and its torch variants: exp_avg and exp_avg_sq like the parameter


def head_workspace(shape: Shape, vocab: int, hidden_bytes: int, device_type: str) -> int:
    """The output layer's short-lived memory around the switch from forward to backward."""
    if not shape.vocab_head:
        return 0
    tokens = shape.tokens
    if shape.fused_head:
        tile = min(tokens, FUSED_HEAD_TOKENS) * min(vocab, FUSED_HEAD_VOCAB) * hidden_bytes
        return int(FUSED_HEAD_TILES[device_type] * tile)
    # The logits, their float32 copy, the saved log-softmax and its gradient.
    return tokens * vocab * (hidden_bytes + 4 + 4 + 4)


def combine(params: ParameterBytes, activations: int, workspace: int, shape: Shape, launch: Launch,
            extra_models: int = 0, layer_backward: int = 0) -> MemoryEstimate:
    """Per-device estimate from the parts, with the launch's sharding applied."""
    weights, gradients, optimizer = params.weights, params.trainable, params.optimizer
    buffers, notes = 0, []
    devices = launch.devices
    if devices > 1 and launch.strategy in ("fsdp", "zero3"):
        weights, gradients, optimizer = (math.ceil(x / devices) for x in (weights, gradients, optimizer))
        buffers = 2 * params.largest_layer  # the layer computing and the next one prefetched, unsharded
        if launch.strategy == "zero3":
            # DeepSpeed keeps a float32 master copy of what it trains (mixed precision), sharded.
            master = params.trainable * 2 if shape.mixed_precision else 0
            optimizer += math.ceil(master / devices)
    elif devices > 1:
        buffers = gradients  # DDP's gradient buckets: a second copy of the gradients, allocated up front
    if shape.optimizer.startswith("paged"):
        notes.append("paged optimizer: its states are counted, but can be paged out to CPU RAM under pressure")
    accumulates = shape.gradient_accumulation > 1
    forward_backward = activations + workspace + (gradients if accumulates else 0)
    # Late in the backward pass nearly every gradient exists while the first layers still run theirs; then
    # the optimizer step may add temporaries the size of the parameters.
    step = gradients + max(layer_backward, params.step_temporaries)
    peak = weights + optimizer + buffers + extra_models + max(forward_backward, step)
    return MemoryEstimate(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
                          workspace=workspace, extra_models=extra_models, sharding_buffers=buffers, peak=peak,
                          notes=notes)


def parse_size(text: str) -> int:
    """``"80GB"``, ``"80GiB"``, ``"24G"``, ``"512MB"`` -> bytes (GB read as GiB, as GPU makers mean it)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"'{text}' is not a memory size; write it like 80GB, 24GiB or 512MB")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


def format_size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"
