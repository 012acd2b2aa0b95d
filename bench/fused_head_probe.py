"""Peak memory of TRL's fused output layer (the chunked log-softmax TRL's SFT uses instead of full logits),
forward and backward, in units of one tile (min(tokens, 4096) x min(vocab, 32768) float32 values): the
figure behind alignkit.plan.memory.FUSED_HEAD_TILES on CPU.

    MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python bench/fused_head_probe.py --vocab 16000 --tokens 2044

The mmap threshold makes freed tensors go back to the system, so the resident-set high-water mark follows
the live tensors (see bench/memory_plan.py).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

from alignkit.plan.memory import FUSED_HEAD_TOKENS


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--tokens", type=int, default=2044)
    parser.add_argument("--hidden", type=int, default=768)
    args = parser.parse_args()
    weight = torch.nn.Parameter(torch.randn(args.vocab, args.hidden) * 0.02)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.tokens,))
    tile = min(args.tokens, FUSED_HEAD_TOKENS) * min(args.vocab, _CHUNKED_LOGPROB_CHUNK_SIZE) * 4
    for attempt in range(2):  # the second pass, after the allocator has settled, is the one reported
        Path("/proc/self/clear_refs").write_text("5")
        start = _status("VmRSS")
        outputs = _ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                None, 1.0, ("log_probs", "entropy", "is_top1"))
        forward = _status("VmHWM") - start
        (-outputs[0].sum()).backward()
        backward = _status("VmHWM") - start
        weight.grad = hidden.grad = None
        if attempt:
            print(f"vocab {args.vocab}, tokens {args.tokens}: tile {tile / 2**20:.1f} MiB; forward peak "
                  f"{forward / tile:.2f} tiles, backward peak {backward / tile:.2f} tiles")


if __name__ == "__main__":
    main()
