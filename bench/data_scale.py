"""Data preparation at scale: alignkit's SFT data preparation against a plain `datasets` script doing the
same conversion, on synthetic chat JSON Lines like the demo's (reverse the words of a phrase).

Each measurement runs in a fresh process and reports its wall time and peak resident memory (ru_maxrss of
the process; with several processes, also the largest worker's):
  * alignkit: `alignkit.data.prepare(DataSettings(train=[file], eval_size=0.01, num_proc=P), load_sft_data)`,
    what every training stage, `alignkit plan` and `alignkit validate` call;
  * plain:    `datasets.load_dataset("json")`, a batched map checking each conversation as alignkit does
    (roles, string contents, an assistant answer), shuffle and `train_test_split`, with `num_proc=P`.
First run: alignkit's prepared-data cache and `datasets`' cache empty. Second run: both as the first left
them (alignkit reads its prepared data; the plain script hits `datasets`' load and map caches).

    .venv/bin/python bench/data_scale.py [--rows 100000 1000000] [--processes 1 2] [--work /tmp/alignkit-data-scale]

Writes WORK/data_scale.json and prints a markdown table (docs/benchmarks.md#data-preparation-at-scale).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "amber", "forest", "silver", "candle", "meadow", "harbor", "lantern",
         "thunder", "velvet", "orchard", "compass", "falcon", "glacier", "marble", "pepper", "blanket", "dream",
         "meteor", "comet"]


def write_chat(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` demo-like conversations, one JSON object per line."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            words = rng.sample(WORDS, rng.randint(3, 6))
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": "reverse: " + " ".join(words)},
                {"role": "assistant", "content": " ".join(reversed(words))}]}) + "\n")


ALIGNKIT = """
from alignkit.data import load_sft_data, prepare
from alignkit.recipe.settings import DataSettings, DataSource
data = prepare(DataSettings(train=[DataSource(path={path!r})], eval_size=0.01, num_proc={processes}), load_sft_data)
rows = (len(data.train), len(data.eval))
"""

PLAIN = """
import datasets
ROLES = ("system", "user", "assistant", "tool")
def check(batch):
    kept = []
    for messages in batch["messages"]:
        ok = isinstance(messages, list) and bool(messages) and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)
        ok = ok and any(m["role"] == "assistant" and m["content"].strip() for m in messages)
        kept.append([{{"role": m["role"], "content": m["content"]}} for m in messages] if ok else None)
    return {{"messages": kept}}
raw = datasets.load_dataset("json", data_files={path!r}, split="train")
options = {{"num_proc": {processes}}} if {processes} > 1 else {{}}
converted = raw.map(check, batched=True, **options).filter(lambda b: [m is not None for m in b["messages"]],
                                                          batched=True, **options)
split = converted.shuffle(seed=42).train_test_split(test_size=0.01, seed=42)
rows = (len(split["train"]), len(split["test"]))
"""

MEASURE = """
import json, resource, sys, time
start = time.perf_counter()
{body}
print(json.dumps({{"wall_s": time.perf_counter() - start, "rows": rows,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
"""


def measure(kind: str, path: Path, processes: int, work: Path) -> dict:
    body = (ALIGNKIT if kind == "alignkit" else PLAIN).format(path=str(path), processes=processes)
    env = dict(os.environ, ALIGNKIT_CACHE=str(work / "alignkit-cache"), HF_DATASETS_CACHE=str(work / "hf-cache"),
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    # Timed from inside, after Python starts; imports included (alignkit imports datasets as the script does).
    result = subprocess.run([sys.executable, "-c", MEASURE.format(body=body)], env=env, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/alignkit-data-scale"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        path = args.work / f"chat-{rows}.jsonl"
        if not path.exists():
            write_chat(path, rows)
        for processes in args.processes:
            for kind in ("plain", "alignkit"):
                for cache in ("alignkit-cache", "hf-cache"):  # a first run starts with both caches empty
                    shutil.rmtree(args.work / cache, ignore_errors=True)
                first = measure(kind, path, processes, args.work)
                second = measure(kind, path, processes, args.work)
                results.append({"rows": rows, "processes": processes, "kind": kind, "first": first, "second": second})
                print(json.dumps(results[-1]), flush=True)
    (args.work / "data_scale.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n| rows | processes | | first run wall | first run peak RSS | second run wall | second run peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for entry in results:
        first, second = entry["first"], entry["second"]
        print(f"| {entry['rows']:,} | {entry['processes']} | {entry['kind']} | {first['wall_s']:.1f} s | "
              f"{first['peak_rss_mb']:.0f} MB | {second['wall_s']:.1f} s | {second['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
