"""Builds the embedded demo model: a tiny Llama with a BPE tokenizer trained in-process.

Nothing is downloaded. The build is deterministic (fixed seeds, fixed corpus) and takes a few seconds;
the result is cached on disk and reused, keyed by ``DEMO_VERSION`` so that a change to the recipe for
the model never mixes with an old cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from alignkit.demo.tasks import pretraining_conversations, tokenizer_corpus
from alignkit.errors import AlignkitError
from alignkit.suggest import did_you_mean

DEMO_VERSION = "2"
DEMO_MODEL_PREFIX = "demo:"
DEMO_MODELS = ("tiny-llama",)

# Special tokens of the demo chat format. <|end|> closes every turn and is the EOS token, so a model
# that learned to answer also learned to stop.
PAD, USER, ASSISTANT, SYSTEM, END = "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"

# The assistant turn, including its closing <|end|>, sits inside {% generation %} markers: TRL's
# assistant_only_loss then trains exactly the tokens the model must produce, stop token included.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "{{ message['content'] }}" + END +
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}" + END +
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT +
    "{% generation %}{{ message['content'] }}" + END + "{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def cache_dir() -> Path:
    """Root of alignkit's on-disk cache (``$ALIGNKIT_CACHE``, else ``~/.cache/alignkit``)."""
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit")).expanduser()


def is_demo_model(name_or_path: str) -> bool:
    return name_or_path.startswith(DEMO_MODEL_PREFIX)


def demo_model_dir(name: str = "tiny-llama") -> Path:
    """Path of a built demo model, building it first if needed. ``name`` may carry the ``demo:`` prefix."""
    name = name.removeprefix(DEMO_MODEL_PREFIX)
    if name not in DEMO_MODELS:
        raise AlignkitError(f"unknown demo model 'demo:{name}'.{did_you_mean(name, DEMO_MODELS)}")
    target = cache_dir() / "demo" / f"v{DEMO_VERSION}" / name
    if not (target / "config.json").exists():
        _build_atomically(target)
    return target


def _build_atomically(target: Path) -> None:
    import torch

    # Build in a sibling temp dir and rename, so a parallel process (two test workers, two ranks)
    # never sees a half-written model.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # The build seeds torch's global generator and draws from it. A run that resolves demo:tiny-llama after
        # train.seed was set (PPO's critic head, a reward model's new head) must draw the same weights whether
        # the model was cached or built just now, so the build works on a copy of the generator's state.
        # CPU only (devices=[]): the build never touches an accelerator.
        with torch.random.fork_rng(devices=[]):
            build_tiny_llama(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the demo corpus; every demo word becomes one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=[PAD, USER, ASSISTANT, SYSTEM, END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=END,
        chat_template=DEMO_CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(output_dir: Path, seed: int = 0) -> Path:
    """Write a randomly initialised ~1M-parameter Llama and its tokenizer to ``output_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer, seed=seed)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def pretrain(model, tokenizer, steps: int = 600, batch_size: int = 32, seed: int = 0) -> None:
    """Give the random model what a base model has: the demo vocabulary, the chat format, stopping.

    Next-token training on the assistant turns of copy / first-word / last-word conversations (about 30 s
    on 2 CPU cores). Reversal is not among them, so the base scores ~0 on the reversal task that the SFT
    recipes teach, while an adapter has real features to build on, as with any pretrained base.
    """
    import torch

    torch.manual_seed(seed)
    conversations = pretraining_conversations(steps * batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        batch = tokenizer.apply_chat_template(
            conversations[step * batch_size:(step + 1) * batch_size], return_dict=True, return_tensors="pt",
            padding=True, return_assistant_tokens_mask=True,
        )
        labels = batch["input_ids"].masked_fill(batch.pop("assistant_masks") == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
