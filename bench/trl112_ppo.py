"""TRL 1.12 side of the "alignkit PPO vs TRL 1.12" benchmark: train TRL's PPOTrainer, report time and reward.

Run it with the interpreter of ``bench/.venv-trl112`` (made by ``bench/setup_trl112_venv.sh``): TRL 1.13
removed ``PPOTrainer``, and alignkit's own venv has a newer TRL. The script imports nothing from alignkit.

    bench/.venv-trl112/bin/python bench/trl112_ppo.py --policy DIR --reward-model DIR \
        --prompts prompts.jsonl --out trl112.json --updates 20 [--save-dir DIR]

``bench/ppo_vs_trl112.py`` runs this script as the TRL side of the whole comparison.

Setup, as in TRL's own PPO example: the value model is a second copy of the reward model, the reference
model a second copy of the policy; full fine-tuning in float32; prompts are tokenized with the chat
template plus generation prompt and left-padded (TRL's rollout code assumes left padding).

Batch sizes follow TRL 1.12's definitions, which are NOT "per_device * grad_accum * num_mini_batches":
    prompts per update (rollout batch) = per_device_train_batch_size * gradient_accumulation_steps
    minibatch                          = rollout batch / num_mini_batches
    optimizer steps per update         = num_ppo_epochs * num_mini_batches   (when gradient_accumulation_steps=1)
The defaults below (32, 1, 2) therefore give 32 prompts per update in 2 minibatches of 16, 8 optimizer
steps per update. Keep gradient_accumulation_steps at 1: TRL's micro-batch loop steps by
per_device_train_batch_size inside each minibatch while accelerate steps the optimizer every
gradient_accumulation_steps micro-batches, so e.g. (16, 2, 2) accumulates across minibatches (4 optimizer
steps per update, not 8) and its logged averages (policy/*, loss/*, val/*) are diluted by unfilled zeros.
The JSON records the sizes TRL derived and the optimizer steps it actually took.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Quiet TRL's "experimental API" warning: importing trl.experimental is the point of this script.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402  (after the environment variable above)
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

# Metric names PPOTrainer logs once per update.
SCORES_KEY = "objective/scores"
KL_KEY = "objective/kl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; PPO hyperparameters keep the names of TRL 1.12's PPOConfig fields."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--policy", type=Path, required=True, help="causal-LM model dir (with tokenizer + chat template)")
    io.add_argument("--reward-model", type=Path, required=True,
                    help="sequence-classification model dir, num_labels=1, same tokenizer as the policy")
    io.add_argument("--prompts", type=Path, required=True,
                    help='jsonl, one {"prompt": [{"role": "user", "content": ...}]} per line')
    io.add_argument("--out", type=Path, required=True, help="JSON report to write")
    io.add_argument("--updates", type=int, required=True, help="number of PPO updates (rollout batches) to train")
    io.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default: all)")
    io.add_argument("--save-dir", type=Path, default=None,
                    help="also save the trained policy (model + tokenizer) here, after the timed training")

    hp = parser.add_argument_group("PPO hyperparameters (TRL 1.12 PPOConfig names)")
    # 32 rather than 16: in TRL 1.12 the rollout batch is per_device * grad_accum (num_mini_batches splits it),
    # so 32 gives the intended 32 prompts per update in 2 minibatches of 16.
    hp.add_argument("--per_device_train_batch_size", type=int, default=32)
    hp.add_argument("--gradient_accumulation_steps", type=int, default=1)
    hp.add_argument("--num_mini_batches", type=int, default=2)
    hp.add_argument("--num_ppo_epochs", type=int, default=4)
    hp.add_argument("--learning_rate", type=float, default=1e-4)
    hp.add_argument("--lr_scheduler_type", default="linear",
                    help="TRL's default, linear decay to 0 over the run; 'constant' keeps the rate fixed")
    hp.add_argument("--kl_coef", type=float, default=0.05)
    hp.add_argument("--kl_estimator", choices=("k1", "k3"), default="k1")
    hp.add_argument("--cliprange", type=float, default=0.2)
    hp.add_argument("--cliprange_value", type=float, default=0.2)
    hp.add_argument("--vf_coef", type=float, default=0.1)
    hp.add_argument("--gamma", type=float, default=1.0)
    hp.add_argument("--lam", type=float, default=0.95)
    hp.add_argument("--whiten_rewards", action="store_true")
    hp.add_argument("--response_length", type=int, default=16)
    hp.add_argument("--temperature", type=float, default=0.7)
    hp.add_argument("--missing_eos_penalty", type=float, default=1.0)
    hp.add_argument("--stop_token", choices=("eos",), default="eos")
    hp.add_argument("--local_rollout_forward_batch_size", type=int, default=64)
    hp.add_argument("--gradient_checkpointing", action="store_true",
                    help="off by default (TRL's default is on): the benchmark times plain training")
    hp.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.updates < 1:
        parser.error("--updates must be >= 1")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def load_prompts(path: Path, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Prompts as TRL's PPO example feeds them: ``input_ids`` of the chat template plus generation prompt."""
    rows: list[dict[str, list[int]]] = []
    with path.open() as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            messages = json.loads(line)["prompt"]
            if not isinstance(messages, list):
                raise ValueError(f"{path}:{line_number}: 'prompt' must be a list of chat messages")
            # transformers 5 returns a BatchEncoding here (return_dict defaults to True); ask for it explicitly
            # so the code reads the same on either major version.
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
            rows.append({"input_ids": list(encoded["input_ids"])})
    return Dataset.from_list(rows)


class UpdateRecorder(TrainerCallback):
    """Collects, per PPO update, the metrics PPOTrainer logs and the wall time the update took.

    PPOTrainer logs once per update (with ``logging_steps=1``) and then calls ``on_step_end``, so the gap
    between consecutive ``on_step_end`` calls is one whole update: rollout, reward, GAE and the PPO epochs.
    """

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.update_seconds: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._last = time.perf_counter()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and SCORES_KEY in logs:
            self.logs.append(dict(logs))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.update_seconds.append(now - self._last)
        self._last = now


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_seed(args.seed)  # PPOTrainer seeds torch itself, but not numpy, which shuffles its minibatches

    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    # TRL's rollout treats the prompt block as [pad ... pad, prompt]: generation continues after the last
    # column, so prompts must be left-padded (TRL's example loads its tokenizer with padding_side="left").
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        raise SystemExit("the policy tokenizer has no pad token; TRL's PPO masks by pad_token_id")

    dataset = load_prompts(args.prompts, tokenizer)
    rollout_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if len(dataset) < rollout_batch:
        # TRL's dataloader drops the last incomplete batch, so fewer prompts would yield no batch at all.
        raise SystemExit(f"{len(dataset)} prompts < {rollout_batch} prompts per update")

    # float32 throughout: the models are loaded as such and bf16/fp16 stay off below.
    def causal_lm() -> transformers.PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)

    def scorer() -> transformers.PreTrainedModel:
        return AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1,
                                                                  dtype=torch.float32)

    policy, ref_model = causal_lm(), causal_lm()
    reward_model, value_model = scorer(), scorer()

    with tempfile.TemporaryDirectory(prefix="trl112-ppo-") as output_dir:
        config = PPOConfig(
            output_dir=output_dir,
            # total_episodes counts prompts; TRL runs ceil(total_episodes / rollout batch) updates.
            total_episodes=args.updates * rollout_batch,
            per_device_train_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_mini_batches=args.num_mini_batches,
            num_ppo_epochs=args.num_ppo_epochs,
            learning_rate=args.learning_rate,
            lr_scheduler_type=args.lr_scheduler_type,
            kl_coef=args.kl_coef,
            kl_estimator=args.kl_estimator,
            cliprange=args.cliprange,
            cliprange_value=args.cliprange_value,
            vf_coef=args.vf_coef,
            gamma=args.gamma,
            lam=args.lam,
            whiten_rewards=args.whiten_rewards,
            response_length=args.response_length,
            temperature=args.temperature,
            missing_eos_penalty=args.missing_eos_penalty,
            stop_token=args.stop_token,
            local_rollout_forward_batch_size=args.local_rollout_forward_batch_size,
            gradient_checkpointing=args.gradient_checkpointing,
            seed=args.seed,
            bf16=False,  # TRL's configs default bf16 to True
            fp16=False,
            report_to="none",
            logging_steps=1,  # one log (and so one score) per update
            save_strategy="no",  # nothing to disk: the timing is training only
            eval_strategy="no",
            num_sample_generations=0,  # no debugging generations between updates
            disable_tqdm=True,
        )
        recorder = UpdateRecorder()
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_model,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=dataset,
            eval_dataset=None,  # optional in 1.12; generate_completions returns early without one
            callbacks=[recorder],
        )

        # Count the optimizer steps that really happen: TRL calls step() once per micro-batch, and
        # accelerate's wrapper skips it while accumulating gradients, so the hook sits on the inner optimizer.
        optimizer_steps = 0

        def count_step(*_: Any) -> None:
            nonlocal optimizer_steps
            optimizer_steps += 1

        inner_optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        inner_optimizer.register_step_post_hook(count_step)

        start = time.perf_counter()
        trainer.train()
        seconds_total = time.perf_counter() - start

    if args.save_dir is not None:
        # The trained policy as a plain causal-LM dir (outside the timed part), for held-out evaluation.
        trained_policy = trainer.accelerator.unwrap_model(trainer.model).policy
        trained_policy.save_pretrained(args.save_dir)
        tokenizer.save_pretrained(args.save_dir)

    scores = [log[SCORES_KEY] for log in recorder.logs]
    kls = [log[KL_KEY] for log in recorder.logs]
    updates = trainer.state.global_step
    report: dict[str, Any] = {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "device": str(trainer.accelerator.device),
        "threads": torch.get_num_threads(),
        "saved_policy": str(args.save_dir) if args.save_dir is not None else None,
        "seconds_total": seconds_total,
        "updates": updates,
        "seconds_per_update": seconds_total / updates if updates else None,
        # Per-update wall time; the first includes one-off warm-up.
        "update_seconds": recorder.update_seconds,
        "optimizer_steps": optimizer_steps,
        "optimizer_steps_per_update": optimizer_steps / updates if updates else None,
        # objective/scores: mean reward-model score of the update's rollouts, after missing_eos_penalty.
        "scores": scores,
        "reward_start": _mean(scores[:3]),
        "reward_end": _mean(scores[-3:]),
        # objective/kl: per-answer KL to the reference (sum over tokens, mean over answers).
        "kl": kls,
        "logs": recorder.logs,
        "config": {
            **{key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
            "prompts_in_file": len(dataset),
            # What TRL derived from the arguments above (world_size 1 here).
            "prompts_per_update": config.batch_size,
            "mini_batch_size": config.mini_batch_size,
            "num_total_batches": config.num_total_batches,
            "total_episodes": config.total_episodes,
            "max_grad_norm_applied": False,  # TRL 1.12's PPO loop never clips gradients
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{updates} updates in {seconds_total:.1f}s ({report['seconds_per_update']:.2f}s/update), "
          f"reward {report['reward_start']} -> {report['reward_end']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
