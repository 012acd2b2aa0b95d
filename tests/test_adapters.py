"""Every shipped adapter recipe trains on CPU: the loss falls and exactly the expected parameters change."""

from __future__ import annotations

import pytest
import torch
from conftest import RECIPES

from alignkit.models import adapters
from alignkit.recipe.loading import load_recipe
from alignkit.stages import sft
from alignkit.stages.training import run_stage


class RecordingTrainer(sft.SFTTrainer):
    """SFTTrainer that snapshots every parameter when built and when training ends, so a test can see what
    training changed. (Not later: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place for its
    inference kernel the first time the evaluation generates, which changes their bytes but not their values.)"""

    last: RecordingTrainer | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial = self._snapshot()
        RecordingTrainer.last = self

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        self.trained = self._snapshot()
        return result

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def changed_parameters(self) -> set[str]:
        return {name for name, p in self.trained.items() if not torch.equal(p, self.initial[name])}

    def trainable_parameters(self) -> set[str]:
        return {name for name, p in self.model.named_parameters() if p.requires_grad}


# recipe -> a predicate every changed parameter name must satisfy
EXPECTED_CHANGES = {
    "sft-qlora.yaml": lambda name: "lora_A" in name or "lora_B" in name,
    "sft-8bit.yaml": lambda name: "lora_A" in name or "lora_B" in name,
    "sft-ia3.yaml": lambda name: "ia3_l" in name,
    "sft-prompt-tuning.yaml": lambda name: "prompt_encoder" in name,
    "sft-full.yaml": lambda name: True,
    "sft.yaml": lambda name: "lora_A" in name or "lora_B" in name,
}


@pytest.mark.parametrize("recipe_name", sorted(EXPECTED_CHANGES))
def test_adapter_recipe_trains_only_its_parameters(recipe_name, tmp_path, monkeypatch, demo_model_path):
    monkeypatch.setattr(sft, "SFTTrainer", RecordingTrainer)
    recipe = load_recipe(RECIPES / "demo" / recipe_name, [
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=60", "train.logging_steps=10",
        "train.eval_strategy=no", "train.save_strategy=no", "evaluate.max_samples=16",
    ])
    metrics = run_stage(recipe)
    trainer = RecordingTrainer.last

    assert metrics["train/loss_end"] < 0.85 * metrics["train/loss_start"], metrics

    changed, trainable = trainer.changed_parameters(), trainer.trainable_parameters()
    assert changed, "training changed no parameter"
    unexpected = sorted(name for name in changed if not EXPECTED_CHANGES[recipe_name](name))
    assert not unexpected, f"parameters outside the adapter changed: {unexpected[:5]}"
    assert changed == trainable, "every trainable parameter should move, and nothing else"
    if recipe_name != "sft-full.yaml":
        assert metrics["model/trainable_params"] < 0.2 * metrics["model/total_params"]
    else:
        assert metrics["model/trainable_params"] == metrics["model/total_params"]


def test_lora_trainable_count_matches_the_architecture(demo_model_path):
    """LoRA r on all-linear adds r * (in + out) per projection: checks the count alignkit reports."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(demo_model_path)
    spec = adapters.validate_adapter({"method": "lora", "r": 8})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model_path), adapters.build_peft_config(spec))
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = 8 * ((h + h) + (h + kv) * 2 + (h + h) + 2 * (h + i) + (i + h))  # q, k, v, o, gate, up, down
    trainable, _ = adapters.trainable_parameters(model)
    assert trainable == per_layer * config.num_hidden_layers


def test_qlora_requires_a_4bit_model(tmp_path):
    from alignkit.errors import RecipeError

    with pytest.raises(RecipeError, match="qlora"):
        load_recipe(RECIPES / "demo" / "sft-qlora.yaml", ["model.quantization=null"])
