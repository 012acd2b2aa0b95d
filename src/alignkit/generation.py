"""Batched generation from chat prompts, shared by evaluation, the judges and the RL stages.

Under a multi-process launch every process calls ``generate`` with the same prompts (``map_shared``: a call
whose processes pass different prompts stops with an error); each answers its own block of them and the
answers are gathered, so every process returns all of them, in order.
"""

from __future__ import annotations

from collections.abc import Sequence

from alignkit import distributed
from alignkit.recipe.settings import GenerationSettings


def generate(model, tokenizer, prompts: Sequence[list[dict[str, str]]], settings: GenerationSettings,
             stop_token_ids: Sequence[int] = ()) -> list[str]:
    """Completions for conversational ``prompts`` (message lists ending with a user turn), each ending at the
    tokenizer's EOS or the first of ``stop_token_ids``.

    The chat template is applied exactly as in training, with the generation prompt; batches are
    left-padded so every prompt ends where generation starts. Returns decoded completions without
    special tokens, stripped. With several processes, every one passes the same prompts; each generates for
    its block of them and all get every answer (see the module docstring).
    """
    # A model sharded across the processes (FSDP, ZeRO-3) runs each forward pass with all of them: every
    # process then takes as many prompts and keeps stepping until all are done (``synced_gpus``).
    sharded = distributed.is_sharded(model)
    return distributed.map_shared(lambda block: _generate(model, tokenizer, block, settings, sharded, stop_token_ids),
                                  list(prompts), equal_shards=sharded)


def _generate(model, tokenizer, prompts: Sequence[list[dict[str, str]]], settings: GenerationSettings,
              synced: bool, stop_token_ids: Sequence[int] = ()) -> list[str]:
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature if settings.do_sample else None,
        top_k=settings.top_k if settings.do_sample else None,
        top_p=settings.top_p if settings.do_sample else None,
        num_beams=settings.num_beams,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=[tokenizer.eos_token_id, *stop_token_ids] if stop_token_ids else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    outputs: list[str] = []
    try:
        for start in range(0, len(texts), settings.batch_size):
            # The template already holds every special token, so the tokenizer must not add a BOS again.
            batch = tokenizer(texts[start:start + settings.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            with torch.no_grad():
                generated = model.generate(**batch, generation_config=config, synced_gpus=synced)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs
