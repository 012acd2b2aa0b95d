"""Data preparation at scale: alignkit's data preparation against a plain `datasets` script doing the same
conversion, on synthetic JSON Lines like the demo's (reverse the words of a phrase).

Three parts (--parts), each measurement in a fresh process reporting its wall time and peak resident memory
(ru_maxrss of the process; with several processes, also the largest worker's):

  sft         chat rows {"messages": [user, assistant]}.
              alignkit: `prepare(DataSettings(train=[file], eval_size=0.01, num_proc=P), load_sft_data)`, what
              the sft stage, `alignkit plan` and `alignkit validate` call;
              plain: `datasets.load_dataset("json")`, a batched map checking each conversation as alignkit does
              (roles, string contents, an assistant answer), a filter, shuffle and `train_test_split`.
  preference  conversational pairs {"prompt": [user], "chosen": [assistant], "rejected": [assistant]}.
              alignkit: `prepare(..., partial(load_preference_data, kind="pairs"))`, what the rm, dpo and orpo
              stages call; plain: the same with a map checking each pair as alignkit does (roles, string
              contents, a prompt ending with a non-empty user turn, non-empty assistant answers, chosen and
              rejected not identical).
  streaming   the chat rows read as a stream (data.streaming: true), in one process: every training row
              iterated once, as the sft stage's trainer reads them.
              alignkit: `prepare(DataSettings(train=[file], eval_size=100, streaming=True), load_sft_data)`,
              then `data.train` iterated; plain: `load_dataset("json", streaming=True)`, the sft map, a
              row filter, 100 rows held out, a 10,000-row shuffle buffer, iterated.

sft and preference run twice: first with alignkit's prepared-data cache and `datasets`' cache empty, then
with both as the first run left them (alignkit reads its prepared data; the plain script hits `datasets`'
load and map caches). A stream is read anew every time, so streaming runs once.

    .venv/bin/python bench/data_scale.py [--parts sft preference streaming] [--rows 100000 1000000]
        [--processes 1 2] [--work /tmp/alignkit-data-scale]

Results are merged into WORK/data_scale.json (a measurement replaces an earlier one of the same part, rows,
processes and side, so a long run can be split by --parts, --rows and --processes); the tables printed at
the end cover everything in that file (docs/benchmarks.md#data-preparation-at-scale).
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
PARTS = ("sft", "preference", "streaming")
KINDS = ("plain", "alignkit")
STREAM_HELD_OUT = 100


def _message(role: str, words: list[str], prefix: str = "") -> dict[str, str]:
    return {"role": role, "content": prefix + " ".join(words)}


def write_chat(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` demo-like conversations, one JSON object per line."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            words = rng.sample(WORDS, rng.randint(3, 6))
            handle.write(json.dumps({"messages": [_message("user", words, "reverse: "),
                                                  _message("assistant", words[::-1])]}) + "\n")


def write_preference(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` demo-like conversational pairs: the reversal chosen, a corruption rejected (the phrase as
    given, or the reversal with two neighbouring words swapped: two of the demo's corruptions)."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for index in range(rows):
            words = rng.sample(WORDS, rng.randint(3, 6))
            wrong = list(words)
            if index % 2:
                wrong = words[::-1]
                position = rng.randrange(len(wrong) - 1)
                wrong[position], wrong[position + 1] = wrong[position + 1], wrong[position]
            handle.write(json.dumps({"prompt": [_message("user", words, "reverse: ")],
                                     "chosen": [_message("assistant", words[::-1])],
                                     "rejected": [_message("assistant", wrong)]}) + "\n")


# The measured programs. Each gets the data file as `path` and the process count as `processes`, and sets
# `rows` (training rows, held-out rows).
ALIGNKIT_IMPORTS = """
from functools import partial
from alignkit.data import load_preference_data, load_sft_data, prepare
from alignkit.recipe.settings import DataSettings, DataSource
"""

PLAIN_SFT_CHECK = """
import datasets
ROLES = ("system", "user", "assistant", "tool")
def check(batch):
    kept = []
    for messages in batch["messages"]:
        ok = isinstance(messages, list) and bool(messages) and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)
        ok = ok and any(m["role"] == "assistant" and m["content"].strip() for m in messages)
        kept.append([{"role": m["role"], "content": m["content"]} for m in messages] if ok else None)
    return {"messages": kept}
def good(batch):
    return [m is not None for m in batch["messages"]]
"""

PLAIN_PREFERENCE_CHECK = """
import datasets
ROLES = ("system", "user", "assistant", "tool")
def messages_of(value, default_role):
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]
def answer_of(value):
    messages = messages_of(value, "assistant")
    if messages is None or any(m["role"] != "assistant" for m in messages):
        return None
    return messages if any(m["content"].strip() for m in messages) else None
def check(batch):
    out = {"prompt": [], "chosen": [], "rejected": []}
    for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
        prompt, chosen, rejected = messages_of(prompt, "user"), answer_of(chosen), answer_of(rejected)
        ok = (prompt is not None and prompt[-1]["role"] in ("user", "tool") and bool(prompt[-1]["content"].strip())
              and chosen is not None and rejected is not None
              and [m["content"].strip() for m in chosen] != [m["content"].strip() for m in rejected])
        for column, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            out[column].append(value if ok else None)
    return out
def good(batch):
    return [p is not None for p in batch["prompt"]]
"""

PLAIN_PREPARED = """
raw = datasets.load_dataset("json", data_files=path, split="train")
options = {"num_proc": processes} if processes > 1 else {}
converted = raw.map(check, batched=True, **options).filter(good, batched=True, **options)
split = converted.shuffle(seed=42).train_test_split(test_size=0.01, seed=42)
rows = (len(split["train"]), len(split["test"]))
"""

PROGRAMS = {
    ("sft", "alignkit"): ALIGNKIT_IMPORTS + """
data = prepare(DataSettings(train=[DataSource(path=path)], eval_size=0.01, num_proc=processes), load_sft_data)
rows = (len(data.train), len(data.eval))
""",
    ("sft", "plain"): PLAIN_SFT_CHECK + PLAIN_PREPARED,
    ("preference", "alignkit"): ALIGNKIT_IMPORTS + """
data = prepare(DataSettings(train=[DataSource(path=path)], eval_size=0.01, num_proc=processes),
               partial(load_preference_data, kind="pairs"))
rows = (len(data.train), len(data.eval))
""",
    ("preference", "plain"): PLAIN_PREFERENCE_CHECK + PLAIN_PREPARED,
    ("streaming", "alignkit"): ALIGNKIT_IMPORTS + f"""
data = prepare(DataSettings(train=[DataSource(path=path)], eval_size={STREAM_HELD_OUT}, streaming=True), load_sft_data)
rows = (sum(1 for _ in data.train), len(data.eval))
""",
    ("streaming", "plain"): PLAIN_SFT_CHECK + f"""
raw = datasets.load_dataset("json", data_files=path, split="train", streaming=True)
# A row filter: a batched step after a batched map costs a batch's worth of work per row in datasets 5.2
# (each row's key is its batch's list of indices, joined as text by the next batched step).
converted = raw.map(check, batched=True).filter(lambda row: row["messages"] is not None)
held_out = datasets.Dataset.from_list(list(converted.take({STREAM_HELD_OUT})))
train = converted.skip({STREAM_HELD_OUT}).shuffle(seed=42, buffer_size=10_000)
rows = (sum(1 for _ in train), len(held_out))
""",
}

MEASURE = """
import json, resource, sys, time
path, processes = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
{program}
print(json.dumps({{"wall_s": time.perf_counter() - start, "rows": rows,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
"""


def measure(part: str, kind: str, path: Path, processes: int, work: Path) -> dict:
    """One fresh process running the measured program; its figures."""
    env = dict(os.environ, ALIGNKIT_CACHE=str(work / "alignkit-cache"), HF_DATASETS_CACHE=str(work / "hf-cache"),
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    # Timed from inside, after Python starts; imports included (alignkit imports datasets as the script does).
    program = MEASURE.format(program=PROGRAMS[part, kind])
    result = subprocess.run([sys.executable, "-c", program, str(path), str(processes)], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{part}/{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def data_file(part: str, rows: int, work: Path) -> Path:
    """The part's synthetic file of ``rows`` rows, written on first use."""
    name, write = ("preference", write_preference) if part == "preference" else ("chat", write_chat)
    path = work / f"{name}-{rows}.jsonl"
    if not path.exists():
        partial = path.with_suffix(".partial")
        write(partial, rows)
        partial.rename(path)
    return path


def run_part(part: str, rows: int, processes: int, work: Path) -> list[dict]:
    """Both sides of one part at one size: first and second run (one run for streaming)."""
    path = data_file(part, rows, work)
    results = []
    for kind in KINDS:
        entry = {"part": part, "rows": rows, "processes": processes, "kind": kind}
        if part == "streaming":
            entry["first"] = measure(part, kind, path, processes, work)
        else:
            for cache in ("alignkit-cache", "hf-cache"):  # a first run starts with both caches empty
                shutil.rmtree(work / cache, ignore_errors=True)
            entry["first"] = measure(part, kind, path, processes, work)
            entry["second"] = measure(part, kind, path, processes, work)
        print(json.dumps(entry), flush=True)
        results.append(entry)
    return results


def _key(entry: dict) -> tuple:
    return entry["part"], entry["rows"], entry["processes"], entry["kind"]


def merged(saved: Path, new: list[dict]) -> list[dict]:
    """The results saved by earlier runs with ``new`` replacing those with the same key, in a stable order."""
    by_key = {_key(entry): entry for entry in (json.loads(saved.read_text()) if saved.exists() else [])}
    by_key.update({_key(entry): entry for entry in new})
    return sorted(by_key.values(), key=lambda e: (PARTS.index(e["part"]), e["rows"], e["processes"],
                                                  KINDS.index(e["kind"])))


def _mb(value: float) -> str:
    return f"{value:.0f} MB"


def print_tables(results: list[dict]) -> None:
    """Markdown tables: prepared data (both runs), alignkit / plain ratios, streaming, growth with rows."""
    prepared = [e for e in results if e["part"] != "streaming"]
    by_key = {_key(e): e for e in results}
    if prepared:
        print("\n| data | rows | processes | | first run wall | first run peak RSS | second run wall | "
              "second run peak RSS | largest worker's peak RSS |")
        print("|---|---|---|---|---|---|---|---|---|")
        for e in prepared:
            first, second = e["first"], e["second"]
            workers = _mb(first["worker_peak_rss_mb"]) if e["processes"] > 1 else "-"
            print(f"| {e['part']} | {e['rows']:,} | {e['processes']} | {e['kind']} | {first['wall_s']:.1f} s | "
                  f"{_mb(first['peak_rss_mb'])} | {second['wall_s']:.1f} s | {_mb(second['peak_rss_mb'])} | "
                  f"{workers} |")
        print("\nalignkit / plain (targets: first run <= 1.1, second run <= 1.2, peak RSS <= 1.1):\n")
        print("| data | rows | processes | first run wall | second run wall | first run peak RSS | "
              "second run peak RSS |")
        print("|---|---|---|---|---|---|---|")
        for e in prepared:
            plain = by_key.get((e["part"], e["rows"], e["processes"], "plain"))
            if e["kind"] != "alignkit" or plain is None:
                continue
            ratios = [e[run][figure] / plain[run][figure]
                      for run, figure in (("first", "wall_s"), ("second", "wall_s"), ("first", "peak_rss_mb"),
                                          ("second", "peak_rss_mb"))]
            print(f"| {e['part']} | {e['rows']:,} | {e['processes']} | " + " | ".join(f"{r:.2f}" for r in ratios)
                  + " |")
    streamed = [e for e in results if e["part"] == "streaming"]
    if streamed:
        print("\n| streaming | rows | wall | rows per second | peak RSS |")
        print("|---|---|---|---|---|")
        for e in streamed:
            run = e["first"]
            print(f"| {e['kind']} | {e['rows']:,} | {run['wall_s']:.1f} s | {e['rows'] / run['wall_s']:,.0f} | "
                  f"{_mb(run['peak_rss_mb'])} |")
    sizes = sorted({e["rows"] for e in results})
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        print(f"\nGrowth from {small:,} to {large:,} rows ({large / small:.0f}x), first run:\n")
        print("| data | processes | | wall | peak RSS |")
        print("|---|---|---|---|---|")
        for e in results:
            base = by_key.get((e["part"], small, e["processes"], e["kind"]))
            if e["rows"] != large or base is None:
                continue
            print(f"| {e['part']} | {e['processes']} | {e['kind']} | "
                  f"{e['first']['wall_s'] / base['first']['wall_s']:.1f}x | "
                  f"{e['first']['peak_rss_mb'] / base['first']['peak_rss_mb']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="processes converting the rows (streaming always reads in one)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/alignkit-data-scale"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    new = []
    for part in args.parts:
        for rows in args.rows:
            for processes in [1] if part == "streaming" else args.processes:
                new += run_part(part, rows, processes, args.work)
    saved = args.work / "data_scale.json"
    results = merged(saved, new)
    saved.write_text(json.dumps(results, indent=1) + "\n")
    print_tables(results)


if __name__ == "__main__":
    main()
