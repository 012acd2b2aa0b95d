#!/bin/bash
# The multi-process paths that cannot run on CPUs (accelerate runs FSDP and DeepSpeed on GPUs only), checked
# on the demo on whatever GPUs this machine has: FSDP2 with LoRA, FSDP2 full fine-tuning, FSDP-QLoRA (4-bit
# weights stored in bf16), DDP-QLoRA; each run dir is then loaded back by `alignkit eval`. With one GPU,
# FSDP runs as one process: that checks the FSDP code path (DTensor weights, sharded checkpoints, the final
# model gathered and saved whole), not the traffic between GPUs.
#
#   bench/gpu_multiprocess_check.sh [OUT_DIR]      (after `make setup`; ~5 min on one GPU)
#
# Writes OUT_DIR/results.jsonl: per check, the exit code, seconds, world size, final loss, held-out exact
# match, and the eval stage's exact match on the reloaded run dir; logs in OUT_DIR/<check>.log.
set -uo pipefail
OUT=${1:-runs/gpu-multiprocess-check}
GPUS=$(nvidia-smi --list-gpus | wc -l)
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
BF16=(model.dtype=bfloat16 train.bf16=true)

check() {
    local name=$1 config=$2 recipe=$3
    shift 3
    local start=$SECONDS
    .venv/bin/accelerate launch --config_file "$config" --num_processes "$GPUS" -m alignkit sft "$recipe" \
        "train.output_dir=$OUT/$name" train.max_steps=300 train.save_steps=150 --overwrite "$@" \
        > "$OUT/$name.log" 2>&1
    local code=$? seconds=$((SECONDS - start)) reload=null
    if [ $code -eq 0 ]; then
        .venv/bin/alignkit eval recipes/demo/eval.yaml "model.name_or_path=$OUT/$name" \
            "train.output_dir=$OUT/$name-eval" evaluate.compare=null --overwrite >> "$OUT/$name.log" 2>&1 \
            && reload=$(.venv/bin/python -c "import json; print(json.load(open('$OUT/$name-eval/metrics.json'))['eval/exact_match'])")
    fi
    .venv/bin/python - "$OUT" "$name" "$config" "$code" "$seconds" "$reload" <<'PY'
import json, sys
from pathlib import Path
out, name, config, code, seconds, reload = sys.argv[1:]
metrics_file = Path(out) / name / "metrics.json"
metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
row = {"check": name, "config": config, "exit_code": int(code), "seconds": int(seconds),
       "world_size": metrics.get("run/world_size"), "train_loss_end": metrics.get("train/loss_end"),
       "eval_exact_match": metrics.get("eval/exact_match"),
       "reloaded_exact_match": None if reload == "null" else float(reload)}
with open(Path(out) / "results.jsonl", "a") as results:
    results.write(json.dumps(row) + "\n")
print(json.dumps(row))
PY
}

check fsdp-lora accelerate_configs/fsdp.yaml recipes/demo/sft.yaml "${BF16[@]}"
check fsdp-full accelerate_configs/fsdp.yaml recipes/demo/sft-full.yaml "${BF16[@]}"
check fsdp-qlora accelerate_configs/fsdp_qlora.yaml recipes/demo/sft-qlora.yaml "${BF16[@]}" \
    model.quantization.compute_dtype=bfloat16 model.quantization.quant_storage=bfloat16
check ddp-qlora accelerate_configs/ddp.yaml recipes/demo/sft-qlora.yaml "${BF16[@]}"
