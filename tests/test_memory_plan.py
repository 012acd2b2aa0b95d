"""The memory planner (alignkit.plan.memory, alignkit.plan.activations, ``alignkit plan``): each part of the estimate
against the sizes it must have for real architectures (config.json fixtures), the activation trace's
behaviour, sharding, the fit verdict and the cheapest change, and the command's output and errors.

How close the predicted peak comes to measured training runs is a benchmark, not a test:
bench/memory_plan.py, docs/benchmarks.md#memory-planner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.plan import memory, planner
from alignkit.plan.activations import trace_activations
from alignkit.recipe.loading import load_recipe
from alignkit.recipe.settings import ModelSettings

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
LORA = {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
GIB = 2**30


def write_recipe(tmp_path: Path, model: str = "llama-3.1-8b", adapter: dict | None = None, quantization=None,
                 stage: str = "sft", dtype: str = "bfloat16", sections: dict | None = None, **train) -> Path:
    model_section = {"name_or_path": str(CONFIGS / model), "dtype": dtype}
    if quantization:
        model_section["quantization"] = quantization
    recipe = {"stage": stage, "model": model_section, "adapter": adapter or {"method": "none"},
              "data": {"train": [{"path": "org/remote-dataset"}]},
              "train": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 1, "max_length": 512,
                        "activation_checkpointing": False, "bf16": True} | train} | (sections or {})
    recipe["train"] = {key: value for key, value in recipe["train"].items() if value is not None}
    path = tmp_path / f"{stage}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def estimate(path: Path, launch: memory.Launch | None = None):
    return planner.estimate_memory(load_recipe(path), launch or memory.Launch())


def test_full_fine_tune_in_float32_is_the_16_bytes_per_parameter_rule_of_thumb(tmp_path):
    counts, _, est = estimate(write_recipe(tmp_path, "gpt2", dtype="float32", bf16=False, optim="adamw_torch_fused"))
    assert est.weights == est.gradients == 4 * counts.total
    assert est.optimizer == 8 * counts.total  # AdamW: two float32 states
    assert est.weights + est.gradients + est.optimizer == 16 * counts.total


def test_qlora_weights_are_half_a_byte_plus_constants_and_float32_for_what_stays_unquantised(tmp_path):
    path = write_recipe(tmp_path, adapter=dict(LORA, method="qlora"),
                        quantization={"bits": 4, "double_quant": True, "compute_dtype": "bfloat16"})
    counts, _, est = estimate(path)
    unquantised = counts.total - counts.trainable - counts.quantizable  # embeddings, norms, output layer
    expected = math.ceil(counts.quantizable * (0.5 + 1 / 64 + 4 / (64 * 256)))  # per-layer rounding: < 1 byte each
    expected += 4 * unquantised + 2 * counts.trainable  # prepare_model_for_kbit_training; TRL's bf16 adapter
    assert abs(est.weights - expected) <= 7 * 32  # at most one byte of rounding per quantised matrix
    assert est.gradients == 2 * counts.trainable
    # Llama-3.1-8B QLoRA: 3.4 GiB of 4-bit weights + 3.9 GiB for its 1.05 B embedding and output-layer
    # parameters, which peft's preparation casts to float32.
    assert 7.2 * GIB < est.weights < 7.5 * GIB
    without_double_quant = estimate(write_recipe(tmp_path, adapter=dict(LORA, method="qlora"),
                                                 quantization={"bits": 4, "double_quant": False}))[2]
    assert without_double_quant.weights - est.weights == pytest.approx(counts.quantizable * (4 / 64 - 1 / 64
                                                                       - 4 / (64 * 256)), rel=1e-6)


def test_eight_bit_weights_are_one_byte_plus_a_float32_scale_per_row(tmp_path):
    counts, _, est = estimate(write_recipe(tmp_path, adapter=LORA, quantization={"bits": 8}))
    c = planner.model_config(load_recipe(write_recipe(tmp_path)).model)
    rows_per_layer = (c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim
                      + c.hidden_size + 2 * c.intermediate_size + c.hidden_size)
    unquantised = counts.total - counts.trainable - counts.quantizable
    assert est.weights == counts.quantizable + 4 * rows_per_layer * c.num_hidden_layers + 4 * unquantised \
        + 2 * counts.trainable


@pytest.mark.parametrize("optim, bytes_per_parameter", [
    ("adamw_torch_fused", 4), ("adamw_bnb_8bit", 2), ("paged_adamw_32bit", 8), ("sgd", 0)])
def test_optimizer_state_per_trainable_parameter(tmp_path, optim, bytes_per_parameter):
    counts, _, est = estimate(write_recipe(tmp_path, "qwen2.5-0.5b", optim=optim))
    # bf16 weights: AdamW keeps its states in the parameter dtype; bitsandbytes 8-bit states (+ absmax per 256,
    # 32-bit for tensors under 4,096 values: the norms and biases) and 32-bit paged states are their own.
    assert est.optimizer == pytest.approx(bytes_per_parameter * counts.trainable, rel=0.02)


def test_activations_grow_linearly_with_tokens_not_with_length_squared():
    config = planner.model_config(ModelSettings(name_or_path=str(CONFIGS / "qwen2.5-0.5b")))
    model = planner.meta_model(config).train()
    one = trace_activations(model, batch=1, length=256)
    batch_four = trace_activations(model, batch=4, length=256)
    long = trace_activations(model, batch=1, length=1024)
    assert batch_four.total == pytest.approx(4 * one.total, rel=0.02)
    # fused attention saves no length x length matrix: four times the length is four times the memory
    assert long.total == pytest.approx(4 * one.total, rel=0.05)
    assert len(one.layers) == config.num_hidden_layers
    assert len(set(one.layers[1:])) == 1  # identical layers (the first also saves the shared rotary tables)
    assert one.checkpointed() < one.total / 4


def _demo_like_recipe() -> Path:
    return Path(__file__).parents[1] / "recipes" / "demo" / "sft.yaml"


def test_activation_checkpointing_and_a_smaller_batch_lower_the_peak(tmp_path):
    # LoRA: the activations, not the gradients, decide the peak
    plain = estimate(write_recipe(tmp_path, adapter=LORA, per_device_train_batch_size=4))[2]
    checkpointed = estimate(write_recipe(tmp_path, adapter=LORA, per_device_train_batch_size=4,
                                         activation_checkpointing=True))[2]
    smaller = estimate(write_recipe(tmp_path, adapter=LORA, per_device_train_batch_size=2))[2]
    assert checkpointed.activations < plain.activations / 5
    assert smaller.activations == pytest.approx(plain.activations / 2, rel=0.02)
    assert checkpointed.peak < plain.peak and smaller.peak < plain.peak
    assert plain.weights == checkpointed.weights == smaller.weights


def test_accumulated_gradients_stay_during_the_next_forward_pass(tmp_path):
    one = estimate(write_recipe(tmp_path, "qwen2.5-0.5b", per_device_train_batch_size=4))[2]
    accumulating = estimate(write_recipe(tmp_path, "qwen2.5-0.5b", per_device_train_batch_size=4,
                                         gradient_accumulation_steps=4))[2]
    assert accumulating.peak == one.peak + one.gradients


def test_fsdp_and_zero3_shard_weights_gradients_and_optimizer_ddp_copies_them(tmp_path):
    path = write_recipe(tmp_path)
    single = estimate(path)[2]
    ddp = estimate(path, memory.Launch(4, "ddp"))[2]
    fsdp = estimate(path, memory.Launch(4, "fsdp"))[2]
    zero3 = estimate(path, memory.Launch(4, "zero3"))[2]
    assert ddp.weights == single.weights and ddp.sharding_buffers == single.gradients  # DDP's gradient buckets
    assert fsdp.weights == math.ceil(single.weights / 4)
    assert fsdp.gradients == math.ceil(single.gradients / 4) and fsdp.optimizer == math.ceil(single.optimizer / 4)
    assert fsdp.activations == single.activations  # each device still runs its own batch
    counts = planner.recipe_parameters(load_recipe(path))
    assert fsdp.sharding_buffers == 2 * 2 * counts.largest_layer  # two bf16 layers gathered at a time
    assert zero3.optimizer > fsdp.optimizer  # DeepSpeed's float32 master weights
    assert fsdp.peak < single.peak / 2


def test_plan_says_whether_it_fits_and_the_cheapest_change_that_would(tmp_path, capsys):
    path = write_recipe(tmp_path, per_device_train_batch_size=4, max_length=2048)
    assert main(["plan", str(path), "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "parameters   8,030,261,248 (trainable 8,030,261,248" in out
    assert "fits: no" in out
    # The first change on the cheapest-first list that fits: checkpointing (full bf16 AdamW is ~60 GiB).
    assert "cheapest change that fits" in out and "train.activation_checkpointing=true" in out
    assert main(["plan", str(path), "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    # No single change is enough: the fewest of them, applied together, that are.
    fix = out.split("cheapest change that fits")[1]
    assert "fits: no" in out and ("adapter=" in fix or "QLoRA" in fix or "devices with FSDP" in fix)
    assert "batch_size=2 " not in fix  # superseded by batch 1, and dropped
    assert main(["plan", str(path), "--gpu-memory", "1TB"]) == 0
    assert "fits: yes" in capsys.readouterr().out


def test_plan_json_has_every_part_and_a_fix_that_fits(tmp_path, capsys):
    path = write_recipe(tmp_path, per_device_train_batch_size=4, max_length=2048)
    assert main(["plan", str(path), "--gpu-memory", "40GB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    parts = result["memory"]
    assert set(parts) >= {"weights", "gradients", "optimizer", "activations", "workspace", "peak"}
    assert result["fits"] is False
    assert result["fix"]["memory"]["peak"] <= result["budget"] == 40 * GIB
    assert result["shape"]["batch"] == 4 and result["shape"]["length"] == 2048


def test_plan_counts_rows_and_steps_of_local_data(capsys):
    assert main(["plan", str(_demo_like_recipe()), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"]["train_rows"] == 4000 and result["data"]["global_batch"] == 32
    assert result["data"]["steps"] == load_recipe(_demo_like_recipe()).train["max_steps"]
    assert result["fits"] is None  # no GPU here and no --gpu-memory: no verdict


def test_plan_rejects_a_memory_size_it_cannot_read(tmp_path, capsys):
    assert main(["plan", str(write_recipe(tmp_path)), "--gpu-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpu-memory:") and "80GB" in err and "Traceback" not in err


@pytest.mark.parametrize("text, size", [("80GB", 80 * GIB), ("24GiB", 24 * GIB), ("512MB", 512 * 2**20),
                                        ("1.5T", int(1.5 * 2**40))])
def test_memory_sizes_read_as_gpu_makers_write_them(text, size):
    assert memory.parse_size(text) == size


def test_a_later_pipeline_step_is_planned_from_the_recipe_that_writes_its_run_dir(capsys):
    demo = Path(__file__).parents[1] / "recipes" / "demo"
    # dpo.yaml continues the adapter of runs/demo-sft, which recipes/demo/sft.yaml writes
    assert main(["plan", str(demo / "dpo.yaml"), "--device", "cpu", "--json"]) == 0
    dpo = json.loads(capsys.readouterr().out)
    assert main(["plan", str(demo / "sft.yaml"), "--device", "cpu", "--json"]) == 0
    sft = json.loads(capsys.readouterr().out)
    assert dpo["model"] == "runs/demo-sft (base: demo:tiny-llama)"
    assert dpo["parameters"] == sft["parameters"]  # the SFT adapter, trained further
    assert dpo["shape"]["sequences_per_row"] == 2  # chosen and rejected in one batch
    assert dpo["memory"]["extra_models"] == 0  # the reference is the adapter switched off, not a copy


def test_ppo_plans_the_critic_and_reference_and_eval_has_nothing_to_plan(tmp_path, capsys):
    demo = Path(__file__).parents[1] / "recipes" / "demo"
    reward = {"reward": {"sources": [{"function": "alignkit.demo.rewards:reversal_reward"}]}}
    full = write_recipe(tmp_path, "qwen2.5-0.5b", stage="ppo", sections=reward, per_device_train_batch_size=4,
                        max_length=None)
    _, _, ppo = estimate(full)
    # No adapter: a trainable critic copy (weights, gradients, optimizer) and a frozen reference copy
    assert ppo.extra_models >= 2 * ppo.weights + ppo.gradients + ppo.optimizer
    assert any("critic" in note for note in ppo.notes)
    assert main(["plan", str(demo / "eval.yaml"), "--device", "cpu"]) == 2
    assert "eval stage trains nothing" in capsys.readouterr().err


def test_ppo_under_fsdp_plans_policy_critic_and_reference_sharded(tmp_path, capsys):
    """The shipped 8-GPU FSDP PPO template (Llama-3.1-8B, full fine-tune in float32 with bf16 autocast): under
    FSDP on 8 GPUs PPO shards its critic and reference too, so they take 1/8 of what they take under DDP
    (the critic's activations, its own batch's, stay whole)."""
    template = Path(__file__).parents[1] / "recipes" / "llama-3.1-8b" / "ppo-fsdp.yaml"
    offline = [f"model.name_or_path={CONFIGS / 'llama-3.1-8b'}"]
    recipe = load_recipe(template, offline)
    _, _, ddp = planner.estimate_memory(recipe, memory.Launch(8, "ddp"))
    _, _, fsdp = planner.estimate_memory(recipe, memory.Launch(8, "fsdp"))
    assert fsdp.weights == math.ceil(ddp.weights / 8) and fsdp.optimizer == math.ceil(ddp.optimizer / 8)
    assert fsdp.extra_models == math.ceil((ddp.extra_models - ddp.activations) / 8) + ddp.activations
    assert any("critic and reference sharded 8 ways" in note for note in fsdp.notes)
    # Float32 policy and critic (16 bytes a parameter each) and reference (4): ~36 bytes x 8.03 B parameters,
    # 269 GiB, 33.7 GiB a GPU, plus activations and the output layer's workspace. Fits 80 GB; DDP does not.
    assert 60 * GIB < fsdp.peak < 75 * GIB < 300 * GIB < ddp.peak
    assert main(["plan", str(template), *offline, "--strategy", "fsdp", "--gpus", "8", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "8 x FSDP" in out and "fits: yes" in out
    # PPO shards its own models with FSDP; a ZeRO-3 plan would promise a launch PPO refuses.
    assert main(["plan", str(template), *offline, "--strategy", "zero3", "--gpus", "8"]) == 2
    assert "runs under DDP or FSDP (it shards its own models), not ZeRO-3" in capsys.readouterr().err
