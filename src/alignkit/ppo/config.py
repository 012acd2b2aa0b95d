"""``PPOConfig``: the ``train`` section of a ppo recipe.

It extends transformers' ``TrainingArguments`` (learning rate, schedule, warmup, seed, logging, saving,
max_grad_norm, bf16...) with PPO's own options. Names follow TRL 1.12's ``PPOConfig`` where it had the
option, so a TRL PPO script's settings carry over: ``num_ppo_epochs``, ``num_mini_batches``,
``response_length``, ``kl_coef``, ``kl_estimator``, ``cliprange``, ``cliprange_value``, ``vf_coef``,
``gamma``, ``lam``, ``whiten_rewards``, ``missing_eos_penalty``, ``total_episodes``.

Batch sizes, per process and per PPO update, as TRL 1.12 defined them:
  rollout batch = per_device_train_batch_size * gradient_accumulation_steps prompts, each answered once;
  minibatch     = rollout batch / num_mini_batches rows: one optimizer step each;
  micro-batch   = at most per_device_train_batch_size rows: one forward/backward, accumulated per minibatch.
One update makes ``num_ppo_epochs * num_mini_batches`` optimizer steps. ``max_steps`` counts updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments


@dataclass
class PPOConfig(TrainingArguments):
    """Options of alignkit's PPO trainer (every transformers TrainingArguments option is accepted too)."""

    # Overridden TrainingArguments defaults: PPO is run in updates, logged and saved per update.
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate (policy and critic)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every this many PPO updates."})
    save_steps: float = field(default=50, metadata={"help": "Save a checkpoint every this many PPO updates."})
    max_steps: int = field(
        default=-1,
        metadata={"help": "Number of PPO updates (each a fresh rollout batch). -1: from total_episodes, else from "
                  "num_train_epochs over the prompts."},
    )

    # Rollouts
    response_length: int = field(default=53, metadata={"help": "Maximum number of tokens generated per answer."})
    temperature: float = field(
        default=0.7,
        metadata={"help": "Sampling temperature of the rollouts. The training log-probabilities divide the logits "
                  "by the same temperature, so the ratio is taken between the distributions that were sampled."},
    )
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens (0: no limit)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: no limit)."})
    total_episodes: int | None = field(
        default=None, metadata={"help": "Number of answers to train on in total (sets the number of updates)."}
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per generate() call and per no-grad forward pass during rollouts."}
    )
    num_sample_generations: int = field(
        default=10,
        metadata={"help": "How many times over the run to write a few (prompt, answer, reward) samples to the log "
                  "and samples.jsonl (0: never)."},
    )

    # Reward shaping
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of answers that hit response_length without an EOS token, "
                  "so the policy learns to finish its answers (null: no penalty)."},
    )
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty to the reference."})
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1",
        metadata={"help": "Per-token KL estimate: k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - "
                  "log(q/p) (unbiased, never negative, lower variance)."},
    )
    kl_target: float | None = field(
        default=None,
        metadata={"help": "Adaptive KL coefficient (Ziegler et al. 2019): aim the per-answer KL at this value by "
                  "scaling kl_coef after every update (null: fixed kl_coef)."},
    )
    kl_horizon: int = field(
        default=10000, metadata={"help": "Adaptive KL: episodes over which the coefficient moves by its full step."}
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten the per-token rewards (over the batch) before GAE."}
    )

    # Actor-critic and losses
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches (optimizer steps) per PPO epoch."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value prediction."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    critic_init: Literal["auto", "reward_model", "policy"] = field(
        default="auto",
        metadata={"help": "Where the critic starts. reward_model: a trainable copy of the (first) reward model, "
                  "reward head as value head (Huang et al. 2024); policy: the policy's base with a new adapter "
                  "and a new value head, sharing the base with the policy when the policy has an adapter; auto: "
                  "reward_model when the reward has one, else policy."},
    )

    @property
    def local_rollout_batch_size(self) -> int:
        """Prompts answered per PPO update on this process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def local_mini_batch_size(self) -> int:
        """Rows per optimizer step on this process."""
        return self.local_rollout_batch_size // self.num_mini_batches

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("response_length", "num_ppo_epochs", "num_mini_batches", "local_rollout_forward_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_rollout_batch_size % self.num_mini_batches:
            raise ValueError(f"the rollout batch (per_device_train_batch_size * gradient_accumulation_steps = "
                             f"{self.local_rollout_batch_size}) must split into num_mini_batches="
                             f"{self.num_mini_batches} equal minibatches")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the rollouts sample), got {self.temperature}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"kl_target must be > 0, got {self.kl_target}")
