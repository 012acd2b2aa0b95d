"""Predicted vs measured peak memory of SFT: `alignkit plan`'s estimate against real training runs.

A randomly initialised ~100M-parameter Llama (hidden 768, 12 layers, vocabulary 16,000; the demo tokenizer)
is fine-tuned for a few steps with full fine-tuning, LoRA and QLoRA (and variants: activation checkpointing,
an 8-bit optimizer), each run in a fresh process through alignkit's own SFT stage, and the process's peak
memory while training is compared with `alignkit plan`'s prediction for the same recipe.

Measured peak:
  * CPU: the kernel's resident-set high-water mark (VmHWM) above the resident set just before the model is
    loaded; the mark is reset (/proc/self/clear_refs) after a warm-up run on the demo model has imported
    and initialised everything the stage touches, so the figure is what the model, adapter, optimizer and
    activations add. Taken before the final save (serialising a model is not training).
  * GPU: torch.cuda.max_memory_allocated() over the same span.

    .venv/bin/python bench/memory_plan.py [--work /tmp/alignkit-bench-memory] [--only full,lora]

Writes WORK/memory_plan.json and prints a markdown table (docs/benchmarks.md#memory-planner).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

MODEL_CONFIG = {  # ~100M parameters, Llama architecture
    "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 16000, "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
BATCH, LENGTH, STEPS = 4, 512, 3

LORA = {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
QUANT_4BIT = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
RUNS: dict[str, dict] = {
    "full": {"adapter": {"method": "none"}},
    "full-checkpointing": {"adapter": {"method": "none"}, "train": {"activation_checkpointing": True}},
    "full-adamw-8bit": {"adapter": {"method": "none"}, "train": {"optim": "adamw_bnb_8bit"}},
    "lora": {"adapter": LORA},
    "lora-checkpointing": {"adapter": LORA, "train": {"activation_checkpointing": True}},
    "qlora": {"adapter": dict(LORA, method="qlora"), "model": {"quantization": QUANT_4BIT}},
}


def build_model(directory: Path) -> Path:
    """The random model and the demo tokenizer, saved once."""
    if (directory / "model.safetensors").is_file():
        return directory
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.demo.build import demo_model_dir

    demo = demo_model_dir("demo:tiny-llama")
    config = AutoConfig.from_pretrained(demo)
    for key, value in MODEL_CONFIG.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Stored in bfloat16 so that loading in float32 copies the weights into the process's own memory: weights
    # loaded in the file's dtype stay file pages of a memory map, which the measure (anonymous memory) misses.
    model.to(torch.bfloat16).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo / name, directory / name)
    return directory


def write_data(path: Path, rows: int = 64) -> Path:
    """Conversations longer than LENGTH tokens, so every batch is BATCH x LENGTH after truncation."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent / "model")
    words = [w for w in tokenizer.get_vocab() if w.isalpha()]
    rng = random.Random(0)
    with path.open("w") as out:
        for _ in range(rows):
            user, answer = (" ".join(rng.choices(words, k=LENGTH)) for _ in range(2))
            out.write(json.dumps({"messages": [{"role": "user", "content": user},
                                               {"role": "assistant", "content": answer}]}) + "\n")
    return path


def recipe(work: Path, name: str, model: str, data: Path) -> dict:
    run = RUNS[name]
    train = {"output_dir": str(work / "runs" / name), "max_steps": STEPS, "per_device_train_batch_size": BATCH,
             "gradient_accumulation_steps": 1, "max_length": LENGTH, "bf16": False,
             "activation_checkpointing": False, "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no",
             "report_to": "none", "seed": 0, "dataloader_num_workers": 0} | run.get("train", {})
    return {"stage": "sft", "model": {"name_or_path": model, "dtype": "float32"} | run.get("model", {}),
            "adapter": run["adapter"], "data": {"train": [{"path": str(data)}]}, "train": train}


# ---- the measuring process ----------------------------------------------------------------------------


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


class AnonymousMemoryPeak:
    """The process's anonymous resident memory (RssAnon: tensors, not file pages), sampled every millisecond
    in a thread; the kernel keeps no high-water mark of it. Memory-mapped model files are left out on
    purpose: a 4-bit model keeps the file it was quantised from mapped, and those pages are reclaimable cache."""

    def __init__(self):
        import threading

        self.peak = self.start = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))
        return self.peak - self.start


def measure(recipe_file: Path, warmup_file: Path) -> dict:
    """Run the recipe in this process and return its peak memory above the start (see the module doc)."""
    import gc

    import torch

    from alignkit.recipe.loading import load_recipe
    from alignkit.stages import training

    peak_before_save: dict[str, int] = {}
    save = training.save_final_model

    sampler: AnonymousMemoryPeak | None = None  # set once the warm-up is over

    def record_then_save(trainer, path):
        if sampler is None:
            return save(trainer, path)
        peak_before_save["cpu"] = sampler.stop()
        peak_before_save["cpu_hwm"] = _status("VmHWM")
        if torch.cuda.is_available():
            peak_before_save["gpu"] = torch.cuda.max_memory_allocated()
        save(trainer, path)

    training.save_final_model = record_then_save
    steps: list[dict] = []
    train = training.train

    def train_with_step_marks(trainer, run, eval_names):
        from transformers import TrainerCallback

        class StepMarks(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if sampler is not None:
                    steps.append({"step": state.global_step, "peak": sampler.peak, "anonymous": _status("RssAnon")})

        trainer.add_callback(StepMarks())
        return train(trainer, run, eval_names)

    training.train = train_with_step_marks
    training.run_stage(load_recipe(warmup_file), overwrite=True)  # imports, kernels, allocator pools
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    start = _status("VmRSS")
    sampler = AnonymousMemoryPeak()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    training.run_stage(load_recipe(recipe_file), overwrite=True)
    result = {"cpu_start": start, "cpu_peak": peak_before_save["cpu"],
              "cpu_resident_peak": peak_before_save["cpu_hwm"] - start, "seconds": time.perf_counter() - began,
              "cpu_steps": [{k: v - sampler.start if k != "step" else v for k, v in mark.items()}
                            for mark in steps]}
    if "gpu" in peak_before_save:
        result["gpu_peak"] = peak_before_save["gpu"]
    return result


# ---- the comparison -------------------------------------------------------------------------------------


def predict(recipe_file: Path, device: str) -> dict:
    """`alignkit plan`'s estimate for the recipe, as JSON."""
    output = subprocess.run([sys.executable, "-m", "alignkit", "plan", str(recipe_file), "--json", "--device",
                             device], capture_output=True, text=True, check=True, cwd=REPO).stdout
    return json.loads(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/alignkit-bench-memory"))
    parser.add_argument("--only", default=",".join(RUNS), help="comma-separated runs: " + ", ".join(RUNS))
    parser.add_argument("--measure", nargs=2, type=Path, help=argparse.SUPPRESS)  # RECIPE WARMUP: child mode
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = args.work.absolute()
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    model = build_model(work / "model")
    data = work / "train.jsonl"
    if not data.is_file():
        write_data(data)
    results = []
    for name in args.only.split(","):
        recipe_file = work / "recipes" / f"{name}.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe(work, name, str(model), data), sort_keys=False))
        warmup = recipe(work, name, "demo:tiny-llama", data)
        warmup["train"] |= {"max_steps": 1, "max_length": 64, "output_dir": str(work / "runs" / "warmup")}
        warmup_file = work / "recipes" / f"{name}-warmup.yaml"
        warmup_file.write_text(yaml.safe_dump(warmup, sort_keys=False))
        # A fixed mmap threshold makes glibc return every freed tensor to the system at once, so the resident
        # memory follows the live tensors (by default it keeps freed activations for reuse, and the resident
        # memory after a step says little about what the step needed).
        child = subprocess.run([sys.executable, __file__, "--measure", str(recipe_file), str(warmup_file)],
                               capture_output=True, text=True, cwd=REPO,
                               env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        if child.returncode != 0:
            sys.exit(f"{name}: the measuring run failed:\n{child.stderr[-3000:]}")
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        plan = predict(recipe_file, device)
        peak = measured["gpu_peak" if device == "cuda" else "cpu_peak"]
        results.append({"run": name, "measured": measured, "plan": plan, "measured_peak": peak,
                        "predicted_peak": plan["memory"]["peak"],
                        "error": plan["memory"]["peak"] / peak - 1})
        print(f"{name}: measured {peak / 2**30:.3f} GiB, predicted {plan['memory']['peak'] / 2**30:.3f} GiB "
              f"({results[-1]['error']:+.1%})", file=sys.stderr)
    (work / "memory_plan.json").write_text(json.dumps({"device": device, "batch": BATCH, "length": LENGTH,
                                                       "steps": STEPS, "results": results}, indent=2))
    print("| run | trainable | measured peak | predicted peak | error |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['run']} | {r['plan']['parameters']['trainable']:,} | {r['measured_peak'] / 2**30:.3f} GiB "
              f"| {r['predicted_peak'] / 2**30:.3f} GiB | {r['error']:+.1%} |")


if __name__ == "__main__":
    main()
