"""``alignkit merge``: a QLoRA run folded into its dequantised base loads with plain transformers and answers
exactly as base + adapter; the model card, the run-dir checks and the Hub push only when asked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_ok
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.models import merge as merge_module
from alignkit.models.modeling import (
    base_settings_of_adapter,
    keep_4bit_layout_trainable,
    load_for_inference,
    load_model,
)
from alignkit.recipe.settings import ModelSettings


def held_out_prompts(count: int = 24) -> list[str]:
    """User turns of the demo's held-out reversal conversations."""
    from alignkit.data import load_sft_data
    from alignkit.recipe.loading import load_recipe

    held_out = load_sft_data(load_recipe("recipes/demo/sft-qlora.yaml").data).eval
    return [row["messages"][0]["content"] for row in held_out.select(range(count))]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> Path:
    """The demo QLoRA SFT (4-bit NF4 base, double quantisation, LoRA on every linear layer), shortened."""
    run_dir = tmp_path_factory.mktemp("merge") / "qlora"
    run_ok("sft", "recipes/demo/sft-qlora.yaml", f"train.output_dir={run_dir}", "train.max_steps=400",
           "train.save_strategy=no", "train.eval_strategy=no", "evaluate=null")
    return run_dir


def greedy(model, tokenizer, prompts: list[str]) -> list[str]:
    """Plain transformers greedy generation, left-padded, from the chat template."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [text.strip() for text in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)]


def test_merged_qlora_model_loads_with_plain_transformers_and_answers_like_base_plus_adapter(qlora_run):
    result = run_cli("merge", str(qlora_run))
    assert result.returncode == 0, result.stderr[-3000:]
    merged_dir = qlora_run.with_name("qlora-merged")
    assert "(dequantised)" in result.stdout and str(merged_dir) in result.stdout

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # no peft, no bitsandbytes
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert not (merged_dir / "adapter_config.json").exists()
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # the recipe's model dtype

    prompts = held_out_prompts()
    with_adapter, run_tokenizer = load_for_inference(ModelSettings(name_or_path=str(qlora_run)))
    expected = greedy(with_adapter.eval(), run_tokenizer, prompts)
    assert greedy(merged, tokenizer, prompts) == expected
    assert sum(answer == " ".join(reversed(p.removeprefix("reverse: ").split())) for p, answer in
               zip(prompts, expected)) >= len(prompts) // 2  # a trained adapter, not near-ties of an untrained one

    # The logits agree too, not only their argmax: against base + adapter computed with the 4-bit weights
    # dequantised to float32 (bitsandbytes' inference kernel on AVX512-BF16 CPUs computes in bfloat16).
    exact, _ = load_for_inference(ModelSettings(name_or_path=str(qlora_run)))
    keep_4bit_layout_trainable(exact)
    batch = tokenizer([tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts[:1]],
                      return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        difference = (merged(**batch).logits - exact.eval()(**batch).logits).abs().max().item()
    assert difference < 1e-4

    # The adapter mattered: the bare 4-bit base answers differently.
    base_settings = base_settings_of_adapter(qlora_run, ModelSettings(name_or_path=str(qlora_run)))
    assert base_settings.quantization is not None and base_settings.quantization.bits == 4
    base = load_model(base_settings, for_training=False)
    assert greedy(base.eval(), run_tokenizer, prompts) != expected


def test_the_model_card_records_base_adapter_data_recipe_and_metrics(qlora_run):
    merged_dir = qlora_run.with_name("qlora-merged")
    if not merged_dir.exists():
        run_ok("merge", str(qlora_run))
    card = (merged_dir / "README.md").read_text()
    assert card.startswith("---\nbase_model: demo:tiny-llama\n")
    assert "dequantised before merging" in card and "qlora, r 16" in card
    assert "demo:reverse/sft" in card and "4,000 rows" in card
    assert "| train/loss |" in card and "stage: sft" in card


def test_merge_refuses_to_overwrite_and_explains_what_it_needs(qlora_run, tmp_path):
    merged_dir = qlora_run.with_name("qlora-merged")
    if not merged_dir.exists():
        run_ok("merge", str(qlora_run))
    again = run_cli("merge", str(qlora_run))
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    missing = run_cli("merge", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "run dir not found" in missing.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    full = run_cli("merge", str(tmp_path / "full"))
    assert full.returncode == 2 and "holds no adapter" in full.stderr


def test_push_happens_only_when_asked(qlora_run, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(merge_module, "push", lambda path, repo, private=True: calls.append((path, repo, private)))
    from alignkit.cli import main

    assert main(["merge", str(qlora_run), "--output", str(tmp_path / "a")]) == 0
    assert calls == []
    assert main(["merge", str(qlora_run), "--output", str(tmp_path / "b"), "--push", "me/model"]) == 0
    assert calls == [(tmp_path / "b", "me/model", True)]  # private unless --public
