"""The planner's parameter counts (alignkit.plan.planner), from config.json alone on the meta device, checked
exactly against each architecture's formula and the published sizes, with and without adapters.

The fixtures in tests/fixtures/configs are the config.json files of real models (no weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.plan.planner import count_parameters, meta_model, model_config, recipe_parameters
from alignkit.recipe.loading import load_recipe
from alignkit.recipe.settings import ModelSettings

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
LORA_16 = {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
FULL = {"method": "none"}


def config(name: str):
    return model_config(ModelSettings(name_or_path=str(CONFIGS / name)))


def decoder_linear_shapes(c) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one Llama-style decoder layer: q, k, v, o, gate, up, down."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv, h, i = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim, c.hidden_size, \
        c.intermediate_size
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def llama_style_formula(c, qkv_bias: bool) -> dict[str, int]:
    """Embeddings V*h; per layer the seven linear weights, q/k/v biases (Qwen2), two RMSNorms of h; a final
    norm; an output layer V*h unless tied to the embeddings."""
    shapes = decoder_linear_shapes(c)
    linear = sum(i * o for i, o in shapes)
    bias = sum(o for _, o in shapes[:3]) if qkv_bias else 0
    layer = linear + bias + 2 * c.hidden_size
    embeddings = c.vocab_size * c.hidden_size
    total = embeddings + c.num_hidden_layers * layer + c.hidden_size + (0 if c.tie_word_embeddings else embeddings)
    lora = c.num_hidden_layers * sum(16 * (i + o) for i, o in shapes)
    return {"total": total, "quantizable": c.num_hidden_layers * linear, "layer": layer, "lora": lora}


@pytest.mark.parametrize("name, qkv_bias, published", [
    ("llama-3.1-8b", False, 8_030_261_248),
    ("mistral-7b-v0.1", False, 7_241_732_096),
    ("qwen2.5-0.5b", True, 494_032_768),
])
def test_llama_style_models_count_exactly_as_their_formula_and_published_size(name, qkv_bias, published):
    c = config(name)
    expected = llama_style_formula(c, qkv_bias)
    full = count_parameters(meta_model(c), FULL)
    assert full.total == expected["total"] == published
    assert full.trainable == full.total  # a full fine-tune trains everything
    assert full.quantizable == expected["quantizable"]
    assert full.largest_layer == expected["layer"]
    lora = count_parameters(meta_model(c), LORA_16)
    assert lora.trainable == expected["lora"]  # r * (in + out) for every linear layer but the output layer
    assert lora.total == published + expected["lora"]


def test_gpt2_counts_exactly_as_its_formula_with_tied_embeddings_and_conv1d_layers():
    c = config("gpt2")
    h, v, positions, layers = c.n_embd, c.vocab_size, c.n_positions, c.n_layer
    linear = h * 3 * h + h * h + h * 4 * h + 4 * h * h  # c_attn, attn c_proj, c_fc, mlp c_proj (Conv1D)
    biases = 3 * h + h + 4 * h + h
    layer = linear + biases + 2 * 2 * h  # two LayerNorms with weight and bias
    counts = count_parameters(meta_model(c), FULL)
    assert counts.total == v * h + positions * h + layers * layer + 2 * h == 124_439_808  # output tied to wte
    assert counts.quantizable == layers * linear
    assert counts.largest_layer == layer


def test_a_reward_head_replaces_the_output_layer_with_one_score():
    c = config("qwen2.5-0.5b")
    counts = count_parameters(meta_model(c, head="reward"), FULL, head="reward")
    # The body without the (tied) output layer, plus a score head of h weights (no bias).
    assert counts.total == 494_032_768 + c.hidden_size


def test_a_recipe_is_counted_from_its_models_config_alone(tmp_path):
    recipe = load_recipe("recipes/qwen2.5-0.5b/sft-qlora.yaml",
                         [f"model.name_or_path={CONFIGS / 'qwen2.5-0.5b'}", f"train.output_dir={tmp_path}"])
    counts = recipe_parameters(recipe)
    expected = llama_style_formula(config("qwen2.5-0.5b"), qkv_bias=True)
    assert counts.trainable == expected["lora"]  # the recipe's r=16 on all linear layers
    assert counts.total == 494_032_768 + expected["lora"]
