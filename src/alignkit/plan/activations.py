"""Activation memory of a training forward pass, measured on the meta device: no weights, no memory, any size.

The recipe's model (with its adapter) runs one forward pass of the backbone on meta tensors of the real
batch shape, and every tensor autograd saves for the backward pass is recorded through
``torch.autograd.graph.saved_tensors_hooks``: what is actually saved, for this architecture, adapter, dtype,
batch and sequence length, with nothing derived by hand per model family. Parameters autograd keeps (the
weights of a linear layer) are counted once as weights, not here; tensors saved by several operations
(the normalised input that q, k and v projections share) are counted once.

Attention is the one operation whose meta version misleads: on meta tensors PyTorch's scaled dot-product
attention runs its reference ("math") path, which saves the full (batch, heads, length, length) probability
matrix. The kernels training uses (FlashAttention, memory-efficient attention, PyTorch's CPU flash kernel)
save the query, key, value, output and one float32 log-sum-exp per query instead, so the trace replaces the
call with an operation that saves exactly those. A recipe that asks for ``attn_implementation: eager``
keeps the probabilities, as eager attention does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ActivationTrace:
    """Bytes saved for backward by one forward pass of the backbone."""

    layers: tuple[int, ...]   # saved inside each decoder layer
    layer_input: int          # one decoder layer's input (hidden states): what checkpointing keeps per layer
    outside_layers: int       # saved by the embeddings, the final norm and anything else outside the layers

    @property
    def total(self) -> int:
        return sum(self.layers) + self.outside_layers

    def checkpointed(self) -> int:
        """Saved with activation checkpointing: each layer keeps only its input, and the layer being
        recomputed in the backward pass holds its full activations for as long as its backward runs."""
        return len(self.layers) * self.layer_input + max(self.layers, default=0) + self.outside_layers


def trace_activations(model, batch: int, length: int) -> ActivationTrace:
    """Run ``model``'s backbone (a meta model, adapter attached, in train mode) on a (batch, length) batch of
    token ids and return what autograd saved, split by decoder layer."""
    import torch

    backbone = _backbone(model)
    layers = decoder_layers(backbone)
    params = {_storage_key(p) for p in model.parameters()}
    seen: set = set()
    saved_by: list[int] = [0] * (len(layers) + 1)  # the last slot: outside the layers
    current = [len(layers)]
    layer_input = [0]

    def pack(tensor):
        key = _storage_key(tensor)
        if key not in params and key not in seen:
            seen.add(key)
            saved_by[current[0]] += tensor.untyped_storage().nbytes()
        return tensor

    def enter(index):
        def hook(module, args, kwargs):
            current[0] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            layer_input[0] = max(layer_input[0], hidden.untyped_storage().nbytes())
        return hook

    def leave(module, args, output):
        current[0] = len(layers)

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave))
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _memory_efficient_attention():
            # With a cache, transformers builds the causal mask from shapes alone; without one it inspects the
            # position ids for packed sequences, which meta tensors cannot answer. The cache saves nothing.
            backbone(input_ids=ids, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return ActivationTrace(layers=tuple(saved_by[:-1]), layer_input=layer_input[0], outside_layers=saved_by[-1])


def _storage_key(tensor) -> int:
    """Identity of the memory behind ``tensor`` (views share it), valid on the meta device too."""
    return tensor.untyped_storage()._cdata


def _backbone(model):
    """The transformer body without the output layer: a peft model's base, then the model's base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix, base)


def decoder_layers(model) -> list:
    """The repeated blocks of the body (the largest ``nn.ModuleList``): the units traced, and what FSDP wraps."""
    import torch

    lists = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


class _SavesLikeFusedAttention:
    """Stands in for ``scaled_dot_product_attention`` on meta tensors: an output shaped like the query, and
    saved for backward what fused attention kernels save (q, k, v, the output, a float32 log-sum-exp)."""

    def __init__(self):
        import torch

        class Attention(torch.autograd.Function):
            @staticmethod
            def forward(ctx, query, key, value):
                output = query.new_empty(*query.shape[:-1], value.shape[-1])
                logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
                ctx.save_for_backward(query, key, value, output, logsumexp)
                return output

            @staticmethod
            def backward(ctx, grad):
                raise RuntimeError("the activation trace runs forward only")

        self.attention = Attention

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, **kwargs):
        return self.attention.apply(query, key, value)


@contextlib.contextmanager
def _memory_efficient_attention():
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _SavesLikeFusedAttention()
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
