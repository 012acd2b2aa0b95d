"""alignkit PPO vs TRL 1.12 PPO: same inputs, same hyperparameters, time and reward of both, one command.

    python bench/ppo_vs_trl112.py --work runs/bench/ppo-vs-trl112 --updates 40

Run it with alignkit's interpreter (``.venv/bin/python``); the TRL side runs in ``bench/.venv-trl112``
(made by ``bench/setup_trl112_venv.sh`` when missing). Steps, each skipped when its output is in --work:

1. Inputs, made with alignkit's own CLI on the embedded demo:
   * ``sft-noisy/``: ``alignkit sft recipes/demo/sft-noisy.yaml`` (LoRA on the demo tiny Llama, trained on
     reversal demonstrations two thirds of which echo the phrase: the policy mostly echoes);
   * ``sft/`` then ``rm/``: ``alignkit sft recipes/demo/sft.yaml`` and ``alignkit rm recipes/demo/rm.yaml``
     on it (the reward model: right reversals above echoes and corruptions);
   * ``policy/`` and ``reward-model/``: both LoRA runs merged into full model dirs (causal LM; sequence
     classifier with one label and ``pad_token_id``), checked against the run dirs they come from;
   * ``prompts-train.jsonl``: demo:reverse/prompts, train split, as ``{"prompt": [messages]}`` rows.
2. TRL side: ``bench/trl112_ppo.py`` (TRL 1.12's ``trl.experimental.ppo.PPOTrainer``) on those inputs.
3. alignkit side: ``alignkit ppo bench/ppo_trl112_match.yaml`` on the same inputs. That recipe holds the
   shared hyperparameters; the script passes the same values to the TRL side.
4. Measures of both: seconds per update (the first, which includes warm-up, apart), the reward-model
   score of the rollouts (after the missing-EOS penalty) over the first and last 5 updates, the KL to the
   reference over the last 5, and a check that depends on neither trainer: the demo's rule reward
   (``alignkit.demo.rewards.reversal_reward``) of greedy answers to the held-out prompts
   (demo:reverse/prompts, test split), for the starting policy and each side's final policy.

Writes a JSON report (--out) and prints a markdown table. Both trainers run in their own process with the
same number of torch threads (--threads: OMP_NUM_THREADS and MKL_NUM_THREADS for both, plus
``--threads`` for the TRL script). Time only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RECIPE = BENCH / "ppo_trl112_match.yaml"
TRL_SCRIPT = BENCH / "trl112_ppo.py"
TRL_SETUP = BENCH / "setup_trl112_venv.sh"
TRL_PYTHON = BENCH / ".venv-trl112" / "bin" / "python"

# Hyperparameters bench/trl112_ppo.py takes (TRL 1.12 PPOConfig names) whose values come from the recipe's
# `train` section, so the two sides cannot drift apart. whiten_rewards and gradient_checkpointing are flags.
SHARED_HYPERPARAMETERS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs",
    "learning_rate", "lr_scheduler_type", "kl_coef", "kl_estimator", "cliprange", "cliprange_value", "vf_coef",
    "gamma", "lam", "response_length", "temperature", "missing_eos_penalty", "local_rollout_forward_batch_size",
)
WINDOW = 5  # updates averaged at the start and at the end of a run (fewer when a run has < 10)
CHECK_ROWS = 8  # rows compared between a merged model and the run dir it comes from
TOLERANCE = 1e-4  # largest difference accepted there (merging LoRA reorders float32 arithmetic)


# ---- command line ------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench/ppo-vs-trl112",
                        help="where inputs (reused when present), runs and the report go (default: %(default)s)")
    parser.add_argument("--updates", type=int, default=40, help="PPO updates on each side (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads on each side (default: all cores, %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed of both sides (default: the recipe's)")
    parser.add_argument("--eval-prompts", type=int, default=200,
                        help="held-out prompts for the rule-reward check (default: all %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: WORK/ppo_vs_trl112.json)")
    args = parser.parse_args(argv)
    for name in ("updates", "threads", "eval_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.work = args.work.resolve()
    args.out = (args.out or args.work / "ppo_vs_trl112.json").resolve()
    return args


# ---- subprocesses ------------------------------------------------------------------------------------------

def run_logged(command: Sequence[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run ``command`` with its output in ``log``; its wall time in seconds. Fails with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(str(part) for part in command)}\n  (output: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call([str(part) for part in command], stdout=handle, stderr=subprocess.STDOUT,
                               cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    if code:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed with exit code {code} after {seconds:.0f}s; end of {log}:\n{tail}")
    print(f"  done in {seconds:.0f}s", flush=True)
    return seconds


def child_env(threads: int) -> dict[str, str]:
    """The environment of both trainers: the same thread count, no tokenizer thread pool."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false"}


def alignkit_command(stage: str, recipe: Path | str, *overrides: str) -> list[str]:
    """``alignkit STAGE RECIPE overrides...``, with this interpreter's alignkit (the CLI users run)."""
    return [sys.executable, "-m", "alignkit", stage, str(recipe), *overrides]


# ---- 1. inputs ---------------------------------------------------------------------------------------------

def is_complete_run(path: Path) -> bool:
    run_file = path / "run.json"
    return run_file.is_file() and json.loads(run_file.read_text()).get("status") == "complete"


def ensure_run(stage: str, recipe: Path | str, output_dir: Path, *overrides: str, env: dict[str, str]) -> None:
    """An alignkit run dir, trained unless already complete (an interrupted one resumes)."""
    if is_complete_run(output_dir):
        print(f"reusing {output_dir}")
        return
    run_logged(alignkit_command(stage, recipe, *overrides, f"train.output_dir={output_dir}"),
               output_dir.parent / "logs" / f"{output_dir.name}.log", env)


def noisy_sft_recipe() -> tuple[str, list[str]]:
    """recipes/demo/sft-noisy.yaml, or the same run spelt as overrides of sft.yaml where it is missing."""
    recipe = REPO / "recipes/demo/sft-noisy.yaml"
    if recipe.is_file():
        return str(recipe), []
    return str(REPO / "recipes/demo/sft.yaml"), ["data.train=[{path: demo:reverse/sft-noisy, split: train}]"]


def build_inputs(work: Path, env: dict[str, str]) -> dict[str, Path]:
    """Train (or reuse) the SFT, noisy SFT and RM runs, merge them into full model dirs, write the prompts."""
    paths = {"sft_noisy_run": work / "sft-noisy", "sft_run": work / "sft", "rm_run": work / "rm",
             "policy": work / "policy", "reward_model": work / "reward-model",
             "prompts": work / "prompts-train.jsonl"}
    recipe, overrides = noisy_sft_recipe()
    ensure_run("sft", recipe, paths["sft_noisy_run"], *overrides, env=env)
    ensure_run("sft", REPO / "recipes/demo/sft.yaml", paths["sft_run"], env=env)
    ensure_run("rm", REPO / "recipes/demo/rm.yaml", paths["rm_run"], f"model.name_or_path={paths['sft_run']}",
               env=env)
    if not (paths["policy"] / "config.json").is_file():
        merge_run(paths["sft_noisy_run"], paths["policy"], head="causal_lm")
    if not (paths["reward_model"] / "config.json").is_file():
        merge_run(paths["rm_run"], paths["reward_model"], head="reward")
    if not paths["prompts"].is_file():
        write_prompts(paths["prompts"])
    return paths


def merge_run(run_dir: Path, out_dir: Path, head: Literal["causal_lm", "reward"]) -> None:
    """Save ``run_dir``'s base with its LoRA adapter folded in, plus its tokenizer, as a full model dir.

    alignkit's loader merges a run dir given as a plain model (``modeling.load_model`` ->
    ``merge_adapter``), following the run's recipe back to its base (for the RM: the demo base, the SFT
    adapter merged, then the RM adapter with its trained score head). The result is checked against the run
    dir before it is kept: the RM's scores against ``RewardModel.load(run_dir)``, the policy's logits
    against the base + adapter model.
    """
    from alignkit.models import modeling
    from alignkit.recipe.settings import ModelSettings

    print(f"merging {run_dir} -> {out_dir}", flush=True)
    settings = ModelSettings(name_or_path=str(run_dir), dtype="float32")
    model = modeling.load_model(settings, for_training=False, head=head)
    tokenizer = modeling.load_tokenizer(settings)  # the run dir's tokenizer and chat template
    if head == "reward":
        model.config.num_labels = 1
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True  # the training loader turns the KV cache off; generation wants it
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    difference = check_rm(run_dir, partial) if head == "reward" else check_policy(run_dir, partial)
    (partial / "merge_check.json").write_text(json.dumps(
        {"from_run": str(run_dir), "max_abs_difference": difference, "rows": CHECK_ROWS}, indent=2) + "\n")
    partial.rename(out_dir)  # only a checked merge counts as present on the next run


def check_rm(run_dir: Path, merged: Path) -> float:
    """Largest |score difference| between the merged RM and the RM run dir on held-out preference rows."""
    from alignkit.demo.tasks import reverse_preference
    from alignkit.feedback import RewardModel

    rows = reverse_preference("test")[:CHECK_ROWS // 2]
    prompts = [row["prompt"] for row in rows] * 2
    answers = [row["chosen"][0]["content"] for row in rows] + [row["rejected"][0]["content"] for row in rows]
    expected = RewardModel.load(run_dir).score(prompts, answers)
    got = RewardModel.load(merged).score(prompts, answers)
    difference = max(abs(a - b) for a, b in zip(expected, got))
    print(f"  RM check: {len(got)} scores, max |merged - run dir| = {difference:.2e}; "
          f"chosen {statistics.fmean(got[:len(rows)]):.3f} vs rejected {statistics.fmean(got[len(rows):]):.3f}")
    if difference > TOLERANCE:
        raise SystemExit(f"the merged reward model scores differ from {run_dir}'s by {difference}")
    return difference


def check_policy(run_dir: Path, merged: Path) -> float:
    """Largest |logit difference| between the merged policy and the run dir's base + adapter on prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.demo.tasks import reverse_sft
    from alignkit.models import modeling
    from alignkit.recipe.settings import ModelSettings

    adapter_model, tokenizer = modeling.load_for_inference(ModelSettings(name_or_path=str(run_dir), dtype="float32"))
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in reverse_sft("test")[:CHECK_ROWS]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        expected = adapter_model.eval()(**batch).logits
        got = merged_model(**batch).logits
    real = batch["attention_mask"].bool()
    difference = float((expected - got).abs()[real].max())
    print(f"  policy check: logits of {CHECK_ROWS} conversations, max |merged - run dir| = {difference:.2e}")
    if difference > TOLERANCE:
        raise SystemExit(f"the merged policy's logits differ from {run_dir}'s by {difference}")
    return difference


def write_prompts(path: Path) -> None:
    from alignkit.demo.tasks import reverse_prompts

    rows = reverse_prompts("train")
    path.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in rows))
    print(f"wrote {len(rows)} prompts to {path}")


# ---- 2. and 3. the two trainers ----------------------------------------------------------------------------

def shared_hyperparameters(seed: int | None) -> dict[str, Any]:
    """The recipe's values of the hyperparameters both sides take (and the seed, the recipe's or ``seed``)."""
    train = yaml.safe_load(RECIPE.read_text())["train"]
    values = {name: train[name] for name in SHARED_HYPERPARAMETERS}
    values["whiten_rewards"] = bool(train.get("whiten_rewards", False))
    values["gradient_checkpointing"] = bool(train.get("activation_checkpointing", False))
    values["seed"] = train["seed"] if seed is None else seed
    return values


def run_trl(paths: dict[str, Path], work: Path, args: argparse.Namespace, hparams: dict[str, Any],
            env: dict[str, str]) -> dict[str, Any]:
    """bench/trl112_ppo.py on the inputs; its JSON report plus the wall time of the whole process."""
    if not TRL_PYTHON.is_file():
        run_logged(["bash", TRL_SETUP], work / "logs" / "setup_trl112_venv.log")
    report, save_dir = work / "trl112.json", work / "trl112-ppo"
    shutil.rmtree(save_dir, ignore_errors=True)
    report.unlink(missing_ok=True)
    flags: list[str] = []
    for name, value in hparams.items():
        if isinstance(value, bool):
            flags += [f"--{name}"] if value else []
        else:
            flags += [f"--{name}", str(value)]
    wall = run_logged([TRL_PYTHON, TRL_SCRIPT, "--policy", paths["policy"], "--reward-model", paths["reward_model"],
                       "--prompts", paths["prompts"], "--out", report, "--updates", str(args.updates),
                       "--threads", str(args.threads), "--save-dir", save_dir, *flags],
                      work / "logs" / "trl112-ppo.log", env)
    result = json.loads(report.read_text())
    return {"report": result, "process_seconds": wall, "policy_dir": save_dir}


def run_alignkit(paths: dict[str, Path], work: Path, args: argparse.Namespace, hparams: dict[str, Any],
                 env: dict[str, str]) -> dict[str, Any]:
    """``alignkit ppo`` with the bench recipe on the inputs; its per-update log and metrics, and wall time."""
    run_dir = work / "alignkit-ppo"
    overrides = [
        f"model.name_or_path={paths['policy']}",
        f"reward={{sources: [{{model: {paths['reward_model']}}}]}}",
        f"data.train=[{{path: {paths['prompts']}}}]",
        f"train.output_dir={run_dir}",
        f"train.max_steps={args.updates}",
        f"train.seed={hparams['seed']}",
    ]
    wall = run_logged([*alignkit_command("ppo", RECIPE, *overrides), "--overwrite"],
                      work / "logs" / "alignkit-ppo.log", env)
    log = [json.loads(line) for line in (run_dir / "ppo_log.jsonl").read_text().splitlines() if line.strip()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"log": log, "metrics": metrics, "process_seconds": wall, "policy_dir": run_dir}


# ---- 4. measures -------------------------------------------------------------------------------------------

def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarise(scores: Sequence[float], kls: Sequence[float], seconds: Sequence[float]) -> dict[str, Any]:
    """Per-side figures from per-update scores (RM, after the EOS penalty), KL and wall seconds."""
    window = max(1, min(WINDOW, len(scores) // 2))  # short (smoke) runs: the two windows do not overlap
    start, end = _mean(scores[:window]), _mean(scores[-window:])
    return {
        "updates": len(scores),
        "seconds_first_update": seconds[0] if seconds else None,
        "seconds_per_update": _mean(seconds[1:]),  # the first includes one-off warm-up
        "seconds_per_update_stdev": statistics.stdev(seconds[1:]) if len(seconds) > 2 else None,
        "window": window,
        "rm_score_start": start,
        "rm_score_end": end,
        "reward_gain": None if start is None or end is None else end - start,
        "kl_end": _mean(kls[-window:]),
        "per_update": {"rm_score": list(scores), "kl": list(kls), "seconds": list(seconds)},
    }


def held_out_rule_reward(policy_dir: Path, count: int) -> dict[str, float]:
    """Mean rule reward and exact-reversal rate of greedy answers to the first ``count`` held-out prompts.

    Same code for every policy, independent of both trainers: transformers' generate through
    ``alignkit.generation.generate`` (chat template, left padding), up to 16 new tokens, no sampling.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.demo.rewards import exact_reversal_reward, reversal_reward
    from alignkit.demo.tasks import reverse_prompts
    from alignkit.generation import generate
    from alignkit.recipe.settings import GenerationSettings

    prompts = [row["prompt"] for row in reverse_prompts("test")[:count]]
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    answers = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=16, do_sample=False))
    return {"reversal_reward": statistics.fmean(reversal_reward(prompts, answers)),
            "exact_reversal": statistics.fmean(exact_reversal_reward(prompts, answers)),
            "prompts": len(prompts), "examples": [{"prompt": p[-1]["content"], "answer": a}
                                                   for p, a in zip(prompts[:3], answers[:3])]}


def _fmt(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    sides = report["sides"]
    names = [("alignkit", "alignkit"), ("trl112", "TRL 1.12")]
    start = report["held_out"]["start"]
    window = sides["alignkit"]["window"]
    rows = [
        ("updates", lambda s: str(s["updates"])),
        ("first update (s, incl. warm-up)", lambda s: _fmt(s["seconds_first_update"], 2)),
        ("seconds per update (mean of updates 2..N)", lambda s: _fmt(s["seconds_per_update"], 2)),
        ("process wall time (s, incl. loading)", lambda s: _fmt(s["process_seconds"], 1)),
        (f"RM score, first {window} updates", lambda s: _fmt(s["rm_score_start"])),
        (f"RM score, last {window} updates", lambda s: _fmt(s["rm_score_end"])),
        ("reward gain (last - first)", lambda s: _fmt(s["reward_gain"], sign=True)),
        (f"KL to reference, last {window} updates", lambda s: _fmt(s["kl_end"])),
        (f"held-out rule reward, greedy (start {start['reversal_reward']:.3f})",
         lambda s: _fmt(s["held_out"]["reversal_reward"])),
        (f"held-out exact reversals (start {start['exact_reversal']:.3f})",
         lambda s: _fmt(s["held_out"]["exact_reversal"])),
    ]
    lines = ["| measure | " + " | ".join(label for _, label in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cell(sides[key]) for key, _ in names) + " |" for label, cell in rows]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {}
    for name in ("alignkit", "torch", "transformers", "trl", "peft", "accelerate"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# ---- main --------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)  # this process's merges and held-out generation
    env = child_env(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    paths = build_inputs(args.work, env)
    hparams = shared_hyperparameters(args.seed)
    trl = run_trl(paths, args.work, args, hparams, env)
    alignkit = run_alignkit(paths, args.work, args, hparams, env)

    trl_report = trl["report"]
    steps_expected = hparams["num_ppo_epochs"] * hparams["num_mini_batches"]
    if trl_report["optimizer_steps_per_update"] != steps_expected:
        print(f"warning: TRL took {trl_report['optimizer_steps_per_update']} optimizer steps per update, "
              f"alignkit takes {steps_expected}", file=sys.stderr)
    sides: dict[str, dict[str, Any]] = {
        "alignkit": summarise([e["reward"] for e in alignkit["log"]], [e["kl"] for e in alignkit["log"]],
                              [e["seconds"] for e in alignkit["log"]])
        | {"process_seconds": alignkit["process_seconds"], "run_dir": str(alignkit["policy_dir"]),
           "optimizer_steps_per_update": steps_expected, "metrics": alignkit["metrics"]},
        "trl112": summarise(trl_report["scores"], trl_report["kl"], trl_report["update_seconds"])
        | {"process_seconds": trl["process_seconds"], "policy_dir": str(trl["policy_dir"]),
           "optimizer_steps_per_update": trl_report["optimizer_steps_per_update"],
           "train_seconds_total": trl_report["seconds_total"], "trl_config": trl_report["config"],
           "versions": {key: trl_report[f"{key}_version"] for key in ("trl", "transformers", "torch")}},
    }
    print("held-out check: greedy answers of the start policy and both final policies", flush=True)
    held_out = {"start": held_out_rule_reward(paths["policy"], args.eval_prompts)}
    for key, side in (("alignkit", alignkit), ("trl112", trl)):
        sides[key]["held_out"] = held_out[key] = held_out_rule_reward(side["policy_dir"], args.eval_prompts)

    report = {
        "command": [sys.executable, *sys.argv],
        "updates": args.updates,
        "threads": args.threads,
        "hyperparameters": hparams | {"alignkit_max_grad_norm": yaml.safe_load(RECIPE.read_text())["train"]
                                      ["max_grad_norm"], "trl_max_grad_norm_applied": False},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "device": trl_report.get("device")},
        "alignkit_versions": versions(),
        "inputs": {key: str(path) for key, path in paths.items()}
        | {"merge_checks": {key: json.loads((paths[key] / "merge_check.json").read_text())
                            for key in ("policy", "reward_model")},
           # The input runs' own held-out figures: rebuilt inputs need not be bit-identical.
           "run_metrics": {key: json.loads((paths[key] / "metrics.json").read_text())
                           for key in ("sft_noisy_run", "sft_run", "rm_run")}},
        "held_out": held_out,
        "sides": sides,
        "seconds_total": time.perf_counter() - began,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(report))
    print(f"\nwrote {args.out} ({report['seconds_total']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
