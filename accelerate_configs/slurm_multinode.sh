#!/bin/bash
# Multi-node training on Slurm: one `accelerate launch` per node, each starting one process per GPU; the
# nodes meet at the first node of the allocation (rendezvous address and machine ranks from Slurm).
#
#   sbatch --nodes=4 accelerate_configs/slurm_multinode.sh sft recipes/qwen2.5-7b/sft-qlora-fsdp.yaml \
#       accelerate_configs/fsdp_qlora.yaml train.learning_rate=1e-4
#   sbatch --nodes=2 accelerate_configs/slurm_multinode.sh sft recipes/qwen2.5-0.5b/sft-qlora.yaml   (DDP)
#
# Arguments: STAGE RECIPE [ACCELERATE_CONFIG (default accelerate_configs/ddp.yaml)] [key=value overrides...]
# The recipe must suit the config: under fsdp_qlora.yaml the 4-bit weights are stored in the model's dtype (as
# in recipes/qwen2.5-7b/sft-qlora-fsdp.yaml); alignkit checks this on every node before anything loads.
# Environment: GPUS_PER_NODE (default: the GPUs nvidia-smi lists), MAIN_PORT (default 29500),
# ACCELERATE (default: .venv/bin/accelerate if present, else accelerate on PATH),
# DRY_RUN=1 prints the command each node would run instead of running it; outside an allocation, give the
# values Slurm would:
#   DRY_RUN=1 SLURM_NNODES=4 GPUS_PER_NODE=8 MAIN_HOST=node01 accelerate_configs/slurm_multinode.sh sft \
#       recipes/qwen2.5-7b/sft-qlora-fsdp.yaml accelerate_configs/fsdp_qlora.yaml
# The global batch is per_device_train_batch_size x gradient_accumulation_steps x nodes x GPUS_PER_NODE:
# adjust gradient_accumulation_steps when the node count changes to keep it.
#SBATCH --job-name=alignkit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: sbatch [--nodes=N] $0 STAGE RECIPE [ACCELERATE_CONFIG] [key=value ...]" >&2
    exit 2
fi
STAGE=$1
RECIPE=$2
shift 2
CONFIG=accelerate_configs/ddp.yaml
if [ $# -gt 0 ] && [[ "$1" == *.yaml ]]; then
    CONFIG=$1
    shift
fi
for path in "$RECIPE" "$CONFIG"; do
    [ -f "$path" ] || { echo "error: file not found: $path" >&2; exit 2; }
done

NODES=${SLURM_NNODES:?run this script with sbatch (SLURM_NNODES is not set)}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
# sed reads the whole list: `head -n 1` would close the pipe early, and under pipefail scontrol's SIGPIPE
# (exit 141) would end the script.
MAIN_HOST=${MAIN_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}
MAIN_PORT=${MAIN_PORT:-29500}
if [ -z "${ACCELERATE:-}" ]; then
    if [ -x .venv/bin/accelerate ]; then ACCELERATE=.venv/bin/accelerate; else ACCELERATE=accelerate; fi
fi

# Paths and overrides are quoted for the inner shell: `adapter={method: lora, r: 8}` stays one argument.
OVERRIDES=""
if [ $# -gt 0 ]; then OVERRIDES=$(printf ' %q' "$@"); fi
# $SLURM_NODEID is expanded by each node's own shell (srun starts one task per node), so it is escaped here.
LAUNCH="$ACCELERATE launch --config_file $(printf %q "$CONFIG") --num_machines $NODES \
--num_processes $((NODES * GPUS_PER_NODE)) --machine_rank \$SLURM_NODEID \
--main_process_ip $MAIN_HOST --main_process_port $MAIN_PORT -m alignkit $STAGE $(printf %q "$RECIPE")$OVERRIDES"

if [ "${DRY_RUN:-0}" = "1" ]; then
    echo "srun --kill-on-bad-exit=1 bash -c '$LAUNCH'"
    exit 0
fi
srun --kill-on-bad-exit=1 bash -c "$LAUNCH"
