"""``PPOConfig``: the ``train`` section of a ppo recipe.

It extends transformers' ``TrainingArguments`` (learning rate, schedule, warmup, seed, logging, saving,
max_grad_norm, bf16...) with PPO's own options. Names follow TRL 1.12's ``PPOConfig`` where it had the
option, so a TRL PPO script's settings carry over: ``num_ppo_epochs``, ``num_mini_batches``,
``response_length``, ``kl_coef``, ``kl_estimator``, ``cliprange``, ``cliprange_value``, ``vf_coef``,
``gamma``, ``lam``, ``whiten_rewards``, ``missing_eos_penalty``, ``total_episodes``. What TRL 1.12's PPO
lacked takes the name users know from elsewhere: OpenRLHF's (``n_samples_per_prompt``, ``normalize_reward``,
``reward_clip_range``, ``critic_learning_rate``, ``freezing_actor_steps``), transformers' generation option
``stop_strings``, and vLLM's ``stop_token_ids`` (TRL 1.12's ``stop_token_id``, for several ids).

Batch sizes, per process and per PPO update, as TRL 1.12 defined them:
  rollout batch = per_device_train_batch_size * gradient_accumulation_steps prompts, each answered
                  n_samples_per_prompt times (once by default, as in TRL 1.12);
  minibatch     = rollout batch's answers / num_mini_batches rows: one optimizer step each;
  micro-batch   = at most per_device_train_batch_size rows: one forward/backward, accumulated per minibatch.
One update makes ``num_ppo_epochs * num_mini_batches`` optimizer steps. ``max_steps`` counts updates.

Of ``TrainingArguments`` PPO takes only what its own loop honours (:data:`HONOURED_TRAINING_ARGUMENTS`); the rest
configure transformers' ``Trainer``, which PPO does not run, so setting one is an error that lists what PPO
honours, rather than an option accepted and silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

# The TrainingArguments options alignkit's PPO trainer reads, by what they drive in it.
HONOURED_TRAINING_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "updates and batches": ("output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                            "gradient_accumulation_steps"),
    "optimizer and schedule": ("learning_rate", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2",
                               "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs",
                               "warmup_steps"),
    "precision, memory and devices": ("bf16", "fp16", "activation_checkpointing", "activation_checkpointing_kwargs",
                                      "gradient_checkpointing", "gradient_checkpointing_kwargs", "use_cpu",
                                      "ddp_backend", "ddp_timeout"),
    "checkpoints": ("save_strategy", "save_steps", "save_total_limit", "resume_from_checkpoint", "seed"),
    # run_name, project and trackio_* are read by transformers' logging integrations, which PPO drives.
    "logging": ("logging_steps", "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
                "trackio_static_space_id"),
}
HONOURED = frozenset(name for names in HONOURED_TRAINING_ARGUMENTS.values() for name in names)

# ``optim`` values PPO builds through transformers' own factory (Trainer.get_optimizer_cls_and_kwargs): those
# that are a torch.optim.Optimizer over a list of parameters (torch's, transformers' Adafactor, bitsandbytes').
# Not these: GaLore / APOLLO (low-rank projections of one model's target modules), LOMO / AdaLOMO (the update is
# fused into the backward pass, before PPO averages and clips the gradients), schedule-free optimizers (need
# their train / eval mode switched around every evaluation), and the XLA / NPU / torchao variants.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
              "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit",
              "lion_32bit", "lion_8bit", "paged_lion_32bit", "paged_lion_8bit",
              "ademamix", "ademamix_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit",
              "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit")
SAVE_STRATEGIES = ("no", "steps")  # PPO has no epochs to save at and no held-out metric to pick a best by


class OptionError(ValueError):
    """An option PPO refuses. ``keys`` names the refused options, because the message names the accepted ones
    too (recipe validation puts the keys in front of the message)."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


@dataclass
class PPOConfig(TrainingArguments):
    """Options of alignkit's PPO trainer: its own, and the TrainingArguments options it honours."""

    # Overridden TrainingArguments defaults: PPO is run in updates, logged and saved per update.
    learning_rate: float = field(
        default=3e-6, metadata={"help": "Learning rate of the policy, and of the critic unless critic_learning_rate."}
    )
    optim: str = field(
        default="adamw_torch",
        metadata={"help": "The optimizer, by transformers' names (see OPTIMIZERS). Default: torch's AdamW "
                  "(adamw_torch), the one alignkit's PPO used before it took this option; transformers' own default "
                  "with torch >= 2.8, adamw_torch_fused, computes the same update with other rounding."},
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every this many PPO updates."})
    save_steps: float = field(default=50, metadata={"help": "Save a checkpoint every this many PPO updates."})
    resume_from_checkpoint: bool | str | None = field(
        default=None,
        metadata={"help": "Continue from a PPO checkpoint: its directory (checkpoint-N, from this run dir or "
                  "another), or true for the last complete checkpoint in output_dir (an error if there is none). "
                  "Null: an unfinished run in output_dir resumes from its last checkpoint anyway."},
    )
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
    top_k: int = field(
        default=0,
        metadata={"help": "Must stay 0 (no top-k cut). PPO's ratio and KL are ratios of log-probabilities under the "
                  "distribution the answers were sampled from; a top-k cut samples from a truncated distribution "
                  "whose support moves as the policy learns and is not the reference's, where a sampled token can "
                  "have probability 0 (an infinite KL). Shape the rollouts with temperature, which the training "
                  "log-probabilities apply too."},
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Must stay 1.0 (no nucleus cut), for the reason given for top_k."},
    )
    total_episodes: int | None = field(
        default=None, metadata={"help": "Number of answers to train on in total (sets the number of updates)."}
    )
    n_samples_per_prompt: int = field(
        default=1,
        metadata={"help": "Answers sampled per prompt in a rollout (OpenRLHF's name): the rollout batch holds this "
                  "many times per_device_train_batch_size * gradient_accumulation_steps answers, each with its own "
                  "sampling noise, and advantages stay per token, each answer's own. total_episodes counts answers. "
                  "(TRL's GRPO / RLOO num_generations is the same idea, but there the batch size counts answers.)"},
    )
    stop_token_ids: list[int] | None = field(
        default=None,
        metadata={"help": "Token ids that end an answer besides the tokenizer's EOS (vLLM's name; TRL 1.12's "
                  "stop_token_id, for several ids), e.g. a chat model's end-of-turn token: the answer is cut after "
                  "the first, which counts as its EOS for the score and missing_eos_penalty. As in vLLM, the text the "
                  "rewards read keeps the stop token's text unless it is a special token."},
    )
    stop_strings: list[str] | None = field(
        default=None,
        metadata={"help": "Strings that end an answer (transformers' generation option): the answer is cut after the "
                  "token that completes the first one in its text; that answer counts as finished (no "
                  "missing_eos_penalty), and the text the rewards read ends before the string. Matched in the text "
                  "without special tokens: give a special token by id, in stop_token_ids."},
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
        metadata={"help": "Subtracted from the score of answers that hit response_length without a stop (EOS, "
                  "stop_token_ids, stop_strings), so the policy learns to finish its answers (null: no penalty)."},
    )
    normalize_reward: bool = field(
        default=False,
        metadata={"help": "Standardise the score with the running mean and standard deviation of every score so far "
                  "(the summed reward, before missing_eos_penalty and reward_clip_range); the statistics are saved "
                  "in checkpoints. OpenRLHF's name; there the statistics are the reward model's, fixed when it was "
                  "trained (TRL <= 0.11 called running ones use_score_scaling + use_score_norm)."},
    )
    normalize_reward_per_source: bool = field(
        default=False,
        metadata={"help": "Standardise each reward source's reward with its own running mean and standard deviation "
                  "before the weighted sum, so sources on different scales weigh in by their weight alone; saved in "
                  "checkpoints."},
    )
    reward_clip_range: tuple[float, float] | None = field(
        default=None,
        metadata={"help": "[low, high]: clamp every score PPO trains on into this range, after normalisation and "
                  "missing_eos_penalty (OpenRLHF's name; there it defaults to [-10, 10]; null: no clipping)."},
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
    critic_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the critic (its adapter or model, and value head), OpenRLHF's name; null: "
                  "learning_rate. The schedule (lr_scheduler_type, warmup_steps) scales both alike."},
    )
    freezing_actor_steps: int = field(
        default=0,
        metadata={"help": "Critic warm-up (OpenRLHF's name): for this many first PPO updates only the critic "
                  "trains, so the advantages the policy first learns from come from a critic that fits the "
                  "returns; the policy's learning-rate schedule starts when the policy does. 0: none."},
    )
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
    def local_rollout_answers(self) -> int:
        """Answers sampled per PPO update on this process."""
        return self.local_rollout_batch_size * self.n_samples_per_prompt

    @property
    def local_mini_batch_size(self) -> int:
        """Rows (answers) per optimizer step on this process."""
        return self.local_rollout_answers // self.num_mini_batches

    def __post_init__(self) -> None:
        super().__post_init__()
        self._refuse_unhonoured()
        for name in ("response_length", "num_ppo_epochs", "num_mini_batches", "local_rollout_forward_batch_size",
                     "n_samples_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_rollout_answers % self.num_mini_batches:
            raise ValueError(f"the rollout batch (per_device_train_batch_size * gradient_accumulation_steps * "
                             f"n_samples_per_prompt = {self.local_rollout_answers} answers) must split into "
                             f"num_mini_batches={self.num_mini_batches} equal minibatches")
        self._check_reward_and_stop_options()
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the rollouts sample), got {self.temperature}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"kl_target must be > 0, got {self.kl_target}")

    def _check_reward_and_stop_options(self) -> None:
        if self.reward_clip_range is not None:
            low, high = self.reward_clip_range
            if not low < high:
                raise OptionError(f"reward_clip_range=[{low}, {high}] must be [low, high] with low < high, e.g. "
                                  "[-10, 10]", ["reward_clip_range"])
        if self.critic_learning_rate is not None and not self.critic_learning_rate > 0:
            raise OptionError(f"critic_learning_rate must be > 0 (or null: learning_rate), got "
                              f"{self.critic_learning_rate}", ["critic_learning_rate"])
        if self.freezing_actor_steps < 0:
            raise OptionError(f"freezing_actor_steps must be >= 0 (0: no critic warm-up), got "
                              f"{self.freezing_actor_steps}", ["freezing_actor_steps"])
        if any(token_id < 0 for token_id in self.stop_token_ids or ()):
            raise OptionError(f"stop_token_ids must be token ids (>= 0), got {self.stop_token_ids}", ["stop_token_ids"])
        if any(not string for string in self.stop_strings or ()):
            raise OptionError("stop_strings holds an empty string, which would end every answer before it starts",
                              ["stop_strings"])

    def _refuse_unhonoured(self) -> None:
        """Raise ValueError for every TrainingArguments option set here that PPO does not honour, and for the
        values of honoured ones that it cannot honour; the message says what PPO does honour."""
        ignored = unhonoured_options(self)
        if ignored:
            raise OptionError(_refusal(ignored), list(ignored))
        optim = getattr(self.optim, "value", self.optim)
        if optim not in OPTIMIZERS:
            raise OptionError(f"optim={optim} is not one PPO can build (its own loop needs an optimizer over a "
                              f"list of parameters); use one of {', '.join(OPTIMIZERS)}", ["optim"])
        save_strategy = getattr(self.save_strategy, "value", self.save_strategy)
        if save_strategy not in SAVE_STRATEGIES:
            raise OptionError(f"save_strategy={save_strategy}: PPO saves a checkpoint every save_steps updates "
                              "(steps) or never (no)", ["save_strategy"])
        cut = [name for name, unset in (("top_k", 0), ("top_p", 1.0)) if getattr(self, name) != unset]
        if cut:
            raise OptionError(f"top_k={self.top_k}, top_p={self.top_p}: PPO samples from the full distribution "
                              "(top_k 0, top_p 1.0), because its ratio and KL are only right for the distribution "
                              "that was sampled, and a cut one gives sampled tokens probability 0 under the "
                              "reference; shape the rollouts with temperature", cut)


def ppo_options() -> list[str]:
    """The options PPOConfig adds to TrainingArguments, in the order they are declared."""
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f.name for f in dataclasses.fields(PPOConfig) if f.init and f.name not in inherited]


def unhonoured_options(config: TrainingArguments) -> dict[str, Any]:
    """The TrainingArguments options of ``config`` that PPO does not honour and that hold something else than
    they hold when left unset. Compared with a TrainingArguments built from the honoured options alone, not with
    the dataclass defaults: ``__post_init__`` fills some options in from others (use_cpu turns
    dataloader_pin_memory off) and from the environment."""
    unset = TrainingArguments(**{name: getattr(config, name) for name in HONOURED})
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainingArguments)
            if f.init and f.name not in HONOURED and getattr(config, f.name) != getattr(unset, f.name)}


def _refusal(ignored: dict[str, Any]) -> str:
    shown = ", ".join(f"{name}={_show(value)}" for name, value in ignored.items())
    upload = (" PPO uploads nothing: push the run dir (the final policy) to the Hub yourself."
              if any(name == "push_to_hub" or name.startswith("hub_") for name in ignored) else "")
    return (f"alignkit's PPO trainer does not use {shown}: TrainingArguments' other options configure "
            f"transformers' Trainer, which PPO does not run, so remove {'it' if len(ignored) == 1 else 'them'}."
            f"{upload} PPO honours these TrainingArguments options: {', '.join(sorted(HONOURED))}; and its own: "
            f"{', '.join(ppo_options())}")


def _show(value: Any) -> str:
    value = getattr(value, "value", value)  # transformers' enums
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)
