#!/usr/bin/env bash
# Create bench/.venv-trl112: a separate virtual environment with TRL 1.12, the last TRL release that
# still ships a PPOTrainer (under trl.experimental.ppo; TRL 1.13 removed it). alignkit's own venv pins
# a newer TRL, so the TRL side of the PPO benchmark needs its own interpreter.
#
# torch is pinned to 2.13.0, the version alignkit uses: on CPU-only machines that is the local CPU wheel,
# while letting pip pick torch freely can pull a multi-GB CUDA build. transformers, accelerate, datasets
# etc. are whatever pip resolves for trl 1.12 under that pin.
#
# Idempotent: when the venv already holds trl 1.12.x with torch 2.13.0 it only prints the versions.
#
# Usage: bench/setup_trl112_venv.sh            (from anywhere; paths are relative to this file)
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${BENCH_DIR}/.venv-trl112"
PY="${VENV}/bin/python"
TORCH_SPEC="torch==2.13.0"
TRL_SPEC="trl==1.12.*"

print_versions() {
    "${PY}" - <<'EOF'
import importlib.metadata as md

for name in ("trl", "torch", "transformers", "accelerate", "datasets", "peft"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
EOF
}

# Already set up? Check the installed distributions rather than importing (importing torch is slow).
if [[ -x "${PY}" ]] && "${PY}" - <<'EOF' 2>/dev/null
import importlib.metadata as md
import sys

ok = md.version("trl").startswith("1.12.") and md.version("torch").split("+")[0] == "2.13.0"
sys.exit(0 if ok else 1)
EOF
then
    echo "bench/.venv-trl112 already has trl 1.12 and torch 2.13.0; nothing to do."
    print_versions
    exit 0
fi

if [[ ! -x "${PY}" ]]; then
    python3 -m venv "${VENV}"
fi

# The constraints file keeps every later resolution from replacing torch (e.g. with a CUDA build).
CONSTRAINTS="${VENV}/bench-constraints.txt"
echo "${TORCH_SPEC}" > "${CONSTRAINTS}"

"${PY}" -m pip install --quiet --upgrade pip
# torch first, on its own, so pip takes the local CPU wheel before anything else asks for torch.
"${PY}" -m pip install --quiet -c "${CONSTRAINTS}" "${TORCH_SPEC}"
"${PY}" -m pip install --quiet -c "${CONSTRAINTS}" "${TRL_SPEC}"

print_versions
