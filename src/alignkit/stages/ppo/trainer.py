"""alignkit's PPO trainer: rollouts, rewards, advantages, then clipped policy and value updates.

One PPO update:
  1. Rollout: a batch of prompts, ``n_samples_per_prompt`` sampled answers each (policy, ``temperature``), cut
     after the first stop (EOS, ``stop_token_ids``, ``stop_strings``). Each answer's randomness is its own,
     seeded by the run's seed and the answer's position in the run (:mod:`alignkit.stages.ppo.sampling`).
  2. No-grad forwards: the policy's and the reference's log-probabilities of the answer tokens (logits
     divided by the same temperature) and the critic's values.
  3. Rewards: the reward sources score each answer, and :mod:`alignkit.stages.ppo.scores` makes the score
     (normalised, summed, ``missing_eos_penalty`` for answers that did not stop, clipped); the score lands on
     the last real token, every token pays ``kl_coef`` * KL(policy || reference).
  4. GAE advantages and returns, advantages whitened over the batch.
  5. ``num_ppo_epochs`` passes over the batch in shuffled minibatches (gradient accumulation over
     micro-batches): clipped policy loss + ``vf_coef`` * clipped value loss, each a mean over the minibatch's
     answer tokens, gradient clipping, the optimizer named by ``optim`` (built by transformers' own factory),
     LR schedule (``critic_learning_rate`` for the critic). For the first ``freezing_actor_steps`` updates only
     the value loss trains (critic warm-up): the policy is not stepped.

With ``bf16`` / ``fp16`` every forward of the policy, reference and critic (sampling, scoring, training) runs
under ``torch.autocast`` (fp16 with a gradient scaler); the weights keep their dtype. Rollouts run with the
models in eval mode (dropout is off in both modes, so the log-probabilities are the same), training in train
mode, where ``activation_checkpointing`` applies.

Several processes (``accelerate launch``) each roll out their own block of every update's prompts, and
compute what one process would compute for the whole batch: advantages are whitened with the statistics of
the whole batch, the minibatches are drawn from the whole batch (each process trains on its rows of each), the
losses are divided by the minibatch's token count over all processes and the gradients summed across them,
and the logged statistics are those of the whole batch. With the per-answer sampling above, a run on N
processes follows the 1-process run at the same global batch up to float rounding (tested). The arithmetic
lives in :mod:`alignkit.stages.ppo.core`.

Under an FSDP launch the models are sharded across the processes (:mod:`alignkit.stages.ppo.sharding`). The
loop is the same, with three differences, all because every forward pass of a sharded model needs every
process: generation runs with ``synced_gpus``; a process with fewer rows of a minibatch than another runs
zero-weight micro-batches until both have run as many; FSDP sums the gradients (reduce-scatter) instead of
``_sum_gradients``. Checkpoints hold the shards (``torch.distributed.checkpoint``), and the final policy is
gathered and saved whole.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit import generation
from alignkit.errors import RecipeError
from alignkit.models.modeling import is_quantized
from alignkit.runs.reports import write_history
from alignkit.runs.rundir import RunDir, checkpoint_dirs, last_checkpoint
from alignkit.stages.ppo import core, sharding
from alignkit.stages.ppo.config import PPOConfig
from alignkit.stages.ppo.models import POLICY, ActorCritic
from alignkit.stages.ppo.optimizer_layout import (
    has_role_groups,
    regroup_optimizer_state,
    regroup_scheduler_state,
    set_scheduled_learning_rates,
)
from alignkit.stages.ppo.sampling import AnswerStops, RowGumbelSampler, StopStringCriteria, row_seeds
from alignkit.stages.ppo.scores import RewardSources, Scorer

logger = logging.getLogger(__name__)

STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE = "trainer_state.json", "trainable.safetensors", "optimizer.pt"
# A sharded run's checkpoint: the trained weights and optimizer states as torch.distributed.checkpoint shards,
# and the schedule (learning rate, loss scale), the same in every process.
SHARDED_DIR, SCHEDULE_FILE = "sharded", "schedule.pt"
LOG_FILE, SAMPLES_FILE, EVAL_SAMPLES_FILE = "ppo_log.jsonl", "samples.jsonl", "eval_samples.jsonl"
SAMPLES_PER_LOG = 4
# What _backward returns for a part of a minibatch: its share of the minibatch's token means.
MINIBATCH_STATS = ("loss/policy", "loss/value", "policy/ratio", "policy/clipfrac", "policy/approx_kl",
                   "policy/entropy", "value/clipfrac")


@dataclass
class Rollout:
    """One batch of prompts, answers and everything PPO computes from them; tensors are (batch, ...)."""

    input_ids: torch.Tensor        # prompt (left-padded) + answer (right-padded)
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    query_length: int              # answer tokens start here
    responses: torch.Tensor        # (batch, response_length), pad after the first stop
    mask: torch.Tensor             # 1.0 on real answer tokens (up to and including the stop)
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor           # what PPO trains on (scores.Scorer: normalised, penalised, clipped)
    raw_rewards: torch.Tensor      # the sources' weighted sum less the missing-EOS penalty (logged as reward)
    clipped: torch.Tensor          # whether reward_clip_range changed the score
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor               # per-token estimate
    ends_with_eos: torch.Tensor    # the answer stopped (EOS, a stop token or a stop string)
    prompts: list                  # one per answer: each prompt n_samples_per_prompt times in a row
    completions: list[str]
    source_rewards: torch.Tensor   # (batch, sources): each reward source's own reward


class PPOTrainer:
    """Trains ``models`` with PPO on ``train_prompts`` (rows ``{"prompt": messages, ...columns}``)."""

    def __init__(self, models: ActorCritic, tokenizer, args: PPOConfig, reward: RewardSources, train_prompts,
                 run: RunDir, eval_prompts=None, eval_generation=None):
        from accelerate import PartialState

        self.models, self.tokenizer, self.args, self.reward = models, tokenizer, args, reward
        self.train_prompts, self.eval_prompts, self.eval_generation = train_prompts, eval_prompts, eval_generation
        self.run = run
        # TrainingArguments sets up the process state as the Trainer's is (use_cpu, ddp_backend, ddp_timeout).
        self.device = args.device
        self.state = args.distributed_state or PartialState()
        self.world_size = self.state.num_processes
        self.updates = self._count_updates()
        self.kl_coef = args.kl_coef
        self.scorer = Scorer(reward, normalize_reward=args.normalize_reward,
                             normalize_reward_per_source=args.normalize_reward_per_source,
                             missing_eos_penalty=args.missing_eos_penalty, reward_clip_range=args.reward_clip_range)
        self.stops = AnswerStops.for_tokenizer(tokenizer, args.stop_token_ids or (), args.stop_strings or ())
        self.history: list[dict[str, float]] = []
        self.policy_frozen = False  # during the critic warm-up (freezing_actor_steps): only the critic trains
        self.eval_reward_start: float | None = None
        # Statistics of every minibatch of the latest update, in order (the first one shows the ratio is 1).
        self.minibatch_stats: list[dict[str, float]] = []
        self._place_models()
        self.parameters = list(models.trainable.values())
        self.optimizer = self._build_optimizer()
        from transformers import get_scheduler

        optimizer_steps = self.updates * args.num_ppo_epochs * args.num_mini_batches
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=args.get_warmup_steps(optimizer_steps),
                                       num_training_steps=optimizer_steps,
                                       scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        if args.freezing_actor_steps:
            delay_policy_schedule(self.scheduler, args.freezing_actor_steps * optimizer_steps // self.updates)
        # fp16 gradients underflow without loss scaling; disabled (every call a pass-through) otherwise.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=bool(args.fp16))
        self._init_reporting()

    # ---- the loop --------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Run every update (resuming from the run dir's last checkpoint), save the policy, return metrics."""
        start = self._resume() if self.run.resume_from else 0
        self.reporting.on_train_begin(self.args, self.trainer_state, self.control)
        if start == 0 and self.eval_prompts is not None:
            self.eval_reward_start = self.evaluate()
            self._report({"eval_reward": self.eval_reward_start}, 0)
        sample_every = max(1, self.updates // self.args.num_sample_generations) if self.args.num_sample_generations \
            else 0
        for update in range(start + 1, self.updates + 1):
            began = time.perf_counter()
            rollout = self.rollout(self._prompts_for(update), self.args.seed, self._positions_for(update))
            stats = self.optimise(rollout)
            stats.update(self._rollout_stats(rollout))
            stats.update(update=update, kl_coef=self.kl_coef, lr=self.scheduler.get_last_lr()[0],
                         seconds=time.perf_counter() - began)
            self._adapt_kl_coef(stats["kl"])
            self._log(stats)
            if sample_every and (update % sample_every == 0 or update == 1):
                self._write_samples(update, rollout)
            if self._saves_at(update):
                self._save_checkpoint(update)
        return self._finish()

    def rollout(self, rows: Sequence[dict], seed: int, positions: Sequence[int] | None = None) -> Rollout:
        """Answer ``rows``' prompts with the policy, ``n_samples_per_prompt`` times each (answers to a prompt next
        to each other), and score everything PPO needs (no gradients). Answer j to row i is sampled with noise
        seeded by (``seed``, ``positions[i] * n_samples_per_prompt + j``) (default position: i), whatever the
        batch."""
        args = self.args
        samples = args.n_samples_per_prompt
        positions = range(len(rows)) if positions is None else positions
        rows = [row for row in rows for _ in range(samples)]
        prompts = [row["prompt"] for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        queries = self._tokenize(prompts)
        query_length = queries["input_ids"].shape[1]
        seeds = row_seeds(seed, [position * samples + sample for position in positions for sample in range(samples)])
        self._set_training(False)
        responses = torch.cat([self._generate(queries["input_ids"][chunk], queries["attention_mask"][chunk],
                                              seeds[chunk]) for chunk in self._chunks(len(rows))])
        responses, mask, ends_with_eos, completions = self.stops.cut(responses, self.tokenizer.pad_token_id)
        input_ids = torch.cat([queries["input_ids"], responses], dim=1)
        attention_mask = torch.cat([queries["attention_mask"], mask.long()], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)

        logprobs, ref_logprobs, values = [], [], []
        with torch.no_grad(), self._autocast():
            for chunk in self._chunks(len(rows)):
                inputs = (input_ids[chunk], attention_mask[chunk], position_ids[chunk])
                logprobs.append(self._answer_logprobs(self.models.policy_logits(*inputs), responses[chunk],
                                                      query_length)[0])
                ref_logprobs.append(self._answer_logprobs(self.models.reference_logits(*inputs), responses[chunk],
                                                          query_length)[0])
                values.append(self.models.values(*inputs)[:, query_length - 1:-1])
        logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)

        source_rewards = self.reward.per_source(prompts, completions, columns).to(self.device)
        # Normalised with the statistics of the whole batch (every process's answers), as one process would.
        scored = self.scorer(self._gather(source_rewards), self._gather(ends_with_eos.float()).bool())
        mine = slice(self.state.process_index * len(rows), (self.state.process_index + 1) * len(rows))
        scores, raw_rewards, clipped = (tensor[mine].to(self.device) for tensor in (scored.scores, scored.raw_rewards,
                                                                                     scored.clipped))

        kl = core.kl_per_token(logprobs, ref_logprobs, mask, args.kl_estimator)
        rewards = core.token_rewards(scores, kl, mask, self.kl_coef)
        if args.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False, reduce=self._sum_across_processes)
        advantages, returns = core.gae(rewards, values * mask, mask, args.gamma, args.lam)
        advantages = core.masked_whiten(advantages, mask, reduce=self._sum_across_processes)
        return Rollout(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       query_length=query_length, responses=responses, mask=mask, logprobs=logprobs,
                       ref_logprobs=ref_logprobs, values=values * mask, scores=scores, advantages=advantages,
                       returns=returns, kl=kl, ends_with_eos=ends_with_eos, prompts=prompts,
                       completions=completions, source_rewards=source_rewards, raw_rewards=raw_rewards,
                       clipped=clipped)

    def optimise(self, rollout: Rollout) -> dict[str, float]:
        """``num_ppo_epochs`` passes of clipped policy + value updates over the rollout; mean statistics.

        The minibatches are shuffled from the whole batch of every process (the same permutation everywhere);
        each process trains on its rows of each, dividing by the minibatch's token count over all processes,
        and the gradients are summed across processes: the step is the one a single process would take."""
        args = self.args
        generator = torch.Generator().manual_seed(args.seed + len(self.history))  # the same in every process
        local_rows = len(rollout.completions)
        first_row = self.state.process_index * local_rows  # this process holds rows [first_row, +local_rows)
        tokens = self._gather(rollout.mask.sum(1))  # every answer's token count, in the whole batch's order
        # Critic warm-up: the first freezing_actor_steps updates train the value loss only (see _backward).
        self.policy_frozen = policy_frozen = len(self.history) < args.freezing_actor_steps
        self.minibatch_stats = []
        self._set_training(True)
        for _epoch in range(args.num_ppo_epochs):
            order = torch.randperm(len(tokens), generator=generator)
            for minibatch in order.split(len(tokens) // args.num_mini_batches):
                minibatch_tokens = tokens[minibatch].sum().clamp(min=1)
                stats = dict.fromkeys(MINIBATCH_STATS, 0.0)
                for micro, weight in self._micro_batches(minibatch, first_row, local_rows):
                    for key, value in self._backward(rollout, micro.to(self.device), minibatch_tokens,
                                                     weight).items():
                        stats[key] += value
                # Summed while still scaled: every process sees the same overflow and skips the same steps.
                self._sum_gradients()
                if policy_frozen:  # no gradient at all: the optimizer leaves the policy (and its state) alone
                    for group in self._policy_groups():
                        for parameter in group["params"]:
                            parameter.grad = None
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
                grad_norm = self._clip_gradients()
                self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
                self.scaler.update()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.minibatch_stats.append(self._sum_stats(stats) | {"grad_norm": float(grad_norm)})
        means = {key: sum(s[key] for s in self.minibatch_stats) / len(self.minibatch_stats)
                 for key in self.minibatch_stats[0]}
        # Before its first step the policy is the one that sampled: ratio 1 and nothing clipped, or the
        # rollout and training log-probabilities disagree (dropout, temperature, padding...).
        first = self.minibatch_stats[0]
        return means | {"policy/ratio_first_minibatch": first["policy/ratio"],
                        "policy/clipfrac_first_minibatch": first["policy/clipfrac"],
                        "policy/frozen": float(policy_frozen)}

    def _micro_batches(self, minibatch: torch.Tensor, first_row: int,
                       local_rows: int) -> list[tuple[torch.Tensor, float]]:
        """(rows, weight) of each forward/backward this process runs for ``minibatch`` (row indices of the whole
        batch): its own rows, ``per_device_train_batch_size`` at a time, weight 1. With sharded models every
        process runs as many as the process with the most rows of the minibatch (each knows every process's
        count: the permutation is the same everywhere); the extra ones run its first row at weight 0, which adds
        nothing to the gradients or statistics."""
        size = self.args.per_device_train_batch_size
        mine = minibatch[(minibatch >= first_row) & (minibatch < first_row + local_rows)] - first_row
        parts = [(rows, 1.0) for rows in mine.split(size)]
        if self.models.sharded:
            owners = torch.div(minibatch, local_rows, rounding_mode="floor")
            most = max(math.ceil(int((owners == process).sum()) / size) for process in range(self.world_size))
            parts += [(torch.zeros(1, dtype=torch.long), 0.0)] * (most - len(parts))
        return parts

    def _backward(self, rollout: Rollout, rows: torch.Tensor, minibatch_tokens: torch.Tensor,
                  weight: float = 1.0) -> dict[str, float]:
        """Forward and backward of ``rows``, a part of a minibatch of ``minibatch_tokens`` answer tokens (over all
        processes): the losses and statistics are this part's share of the minibatch's token means, times
        ``weight`` (0 for a sharded model's padding pass)."""
        inputs = (rollout.input_ids[rows], rollout.attention_mask[rows], rollout.position_ids[rows])
        mask = rollout.mask[rows]
        with self._autocast():
            # Critic warm-up: the policy's forward without gradients, so only the value loss trains; it still
            # gives the policy's statistics.
            with torch.set_grad_enabled(not self.policy_frozen):
                logits = self.models.policy_logits(*inputs)
            values = self.models.values(*inputs)
        logprobs, entropy = self._answer_logprobs(logits, rollout.responses[rows], rollout.query_length,
                                                  with_entropy=True)
        values = values[:, rollout.query_length - 1:-1]
        pg_loss, pg_stats = core.policy_loss(logprobs, rollout.logprobs[rows], rollout.advantages[rows], mask,
                                             self.args.cliprange, tokens=minibatch_tokens)
        vf_loss, vf_stats = core.value_loss(values, rollout.values[rows], rollout.returns[rows], mask,
                                            self.args.cliprange_value, tokens=minibatch_tokens)
        # Token-weighted: the parts' losses add up to the minibatch's token mean however it is split.
        self.scaler.scale(weight * (pg_loss + self.args.vf_coef * vf_loss)).backward()
        value = lambda tensor: weight * float(tensor.detach())  # noqa: E731
        return {"loss/policy": value(pg_loss), "loss/value": value(vf_loss), "policy/ratio": value(pg_stats["ratio"]),
                "policy/clipfrac": value(pg_stats["clipfrac"]), "policy/approx_kl": value(pg_stats["approx_kl"]),
                "policy/entropy": value(core.masked_mean(entropy, mask, minibatch_tokens)),
                "value/clipfrac": value(vf_stats["value_clipfrac"])}

    # ---- evaluation and results ----------------------------------------------------------------------------

    def evaluate(self, record: Path | None = None) -> float:
        """Mean reward of the policy's answers to the held-out prompts (greedy unless the recipe says otherwise);
        with ``record``, every (prompt, answer, reward) is written there as JSON lines (the final policy's)."""
        rows = self.eval_prompts
        prompts = list(rows["prompt"])
        columns = {key: list(rows[key]) for key in rows.column_names if key != "prompt"}
        self._set_training(False)
        with self.models._adapter(POLICY), self._autocast():
            completions = generation.generate(self.models.policy, self.tokenizer, prompts, self.eval_generation,
                                              stop_token_ids=self.args.stop_token_ids or ())
        # Ended at the rollouts' stops; scored as the recipe weighs the sources, unnormalised (comparable across runs).
        completions = [self.stops.cut_text(completion) for completion in completions]
        rewards, _ = self.reward(prompts, completions, columns)
        if record is not None and self.state.is_main_process:
            record.write_text("".join(json.dumps({"prompt": prompt, "completion": completion, "reward": reward}) + "\n"
                                      for prompt, completion, reward in zip(prompts, completions, rewards)))
        return sum(rewards) / len(rewards)

    def _finish(self) -> dict[str, Any]:
        # Sharded: gathered whole into the main process's memory (every process takes part), saved from there.
        whole = sharding.full_policy_state(self.models) if self.models.sharded else None
        if self.state.is_main_process:
            self.models.save_policy(self.run.path, state_dict=whole)
            self.tokenizer.save_pretrained(str(self.run.path))
        del whole
        self.state.wait_for_everyone()
        window = max(1, min(10, len(self.history) // 10))  # smooths the single-batch noise of one update
        mean = lambda entries, key: sum(e[key] for e in entries) / len(entries)  # noqa: E731
        metrics: dict[str, Any] = {
            "ppo/updates": len(self.history),
            "train/global_batch_size": self.args.local_rollout_batch_size * self.world_size,  # prompts per update
            "ppo/reward_start": mean(self.history[:window], "reward"),
            "ppo/reward_end": mean(self.history[-window:], "reward"),
            "ppo/kl_end": mean(self.history[-window:], "kl"),
            "ppo/eos_rate_end": mean(self.history[-window:], "eos_rate"),
            "ppo/seconds_per_update": mean(self.history, "seconds"),
            "ppo/average_window": window,
        }
        # The report's curves: one entry per update, and the held-out reward before the first and after the last.
        curves = [{"step": entry["update"], **entry} for entry in self.history]
        if self.eval_prompts is not None:
            metrics["ppo/eval_reward_start"] = self.eval_reward_start
            metrics["ppo/eval_reward_end"] = self.evaluate(record=self.run.path / EVAL_SAMPLES_FILE)
            self._report({"eval_reward": metrics["ppo/eval_reward_end"]}, len(self.history))
            metrics["ppo/eval_prompts"] = len(self.eval_prompts)
            curves = [{"step": 0, "eval_reward": self.eval_reward_start}, *curves,
                      {"step": len(self.history), "eval_reward": metrics["ppo/eval_reward_end"]}]
        write_history(self.run.path, curves)
        self.reporting.on_train_end(self.args, self.trainer_state, self.control)
        return metrics

    # ---- rollout helpers -----------------------------------------------------------------------------------

    def _tokenize(self, prompts: list) -> dict[str, torch.Tensor]:
        texts = [self.tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:  # the template holds the special tokens already; the answer starts right after every prompt
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        return {key: value.to(self.device) for key, value in batch.items()}

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Sampled answers (``temperature``, the full distribution: PPOConfig refuses top_k / top_p) as greedy
        decoding over per-row Gumbel noise (:class:`RowGumbelSampler`), right-padded to ``response_length``."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        args = self.args
        # transformers fills what a config leaves unset from the model's generation_config, where a chat model
        # may set a repetition penalty: it would reshape the sampled distribution (in greedy mode too) away from
        # the one PPO's log-probabilities score, so the penalties are set off here.
        config = GenerationConfig(max_new_tokens=args.response_length, min_new_tokens=0, do_sample=False,
                                  repetition_penalty=1.0, no_repeat_ngram_size=0,
                                  eos_token_id=self.stops.token_ids or None, pad_token_id=self.tokenizer.pad_token_id,
                                  use_cache=True)
        sampler = LogitsProcessorList([RowGumbelSampler(seeds, args.temperature)])
        stopping = StoppingCriteriaList([StopStringCriteria(self.stops, input_ids.shape[1])] if self.stops.strings
                                        else [])
        with torch.no_grad(), self._autocast():
            # Sharded: every process keeps stepping until all processes' answers are done (each step is collective).
            output = self.models.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                          logits_processor=sampler, stopping_criteria=stopping,
                                          synced_gpus=self.models.sharded)
        answers = output[:, input_ids.shape[1]:]
        padding = args.response_length - answers.shape[1]
        return torch.nn.functional.pad(answers, (0, padding), value=self.tokenizer.pad_token_id)

    def _answer_logprobs(self, logits: torch.Tensor, responses: torch.Tensor, query_length: int,
                         with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities (and entropies) of the answer tokens under temperature-scaled logits, the
        distribution they were sampled from. Logits at position t predict token t + 1."""
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        logits = logits[:, query_length - 1:-1].float() / self.args.temperature
        logprobs = selective_log_softmax(logits, responses)
        return logprobs, entropy_from_logits(logits.detach()) if with_entropy else None

    def _chunks(self, rows: int) -> list[slice]:
        size = self.args.local_rollout_forward_batch_size
        return [slice(start, start + size) for start in range(0, rows, size)]

    def _positions_for(self, update: int) -> list[int]:
        """Positions in the run's stream of prompts of this process's block of ``update``'s global batch
        (process k holds the k-th block, so the whole batch is the processes' blocks in order)."""
        global_batch = self.args.local_rollout_batch_size * self.world_size
        first = (update - 1) * global_batch
        with self.state.split_between_processes(list(range(first, first + global_batch))) as positions:
            return positions

    def _prompts_for(self, update: int) -> list[dict]:
        """This process's prompts for ``update``: a seeded reshuffle of the data per pass, so a resumed run
        sees exactly the prompts it would have seen, and processes take disjoint blocks."""
        count = len(self.train_prompts)
        positions = self._positions_for(update)
        orders: dict[int, list[int]] = {}
        indices = []
        for position in positions:
            epoch = position // count
            if epoch not in orders:
                orders[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(self.args.seed + epoch)
                                               ).tolist()
            indices.append(orders[epoch][position % count])
        return [self.train_prompts[i] for i in indices]

    def _rollout_stats(self, rollout: Rollout) -> dict[str, float]:
        """Statistics of the whole batch (every process's rollouts): the same numbers in every process."""
        mask = rollout.mask
        rewards, kl_per_answer = self._gather(rollout.raw_rewards), self._gather(rollout.kl.sum(1))
        scores = self._gather(rollout.scores)
        tokens = self._sum_across_processes(mask.sum()).clamp(min=1)
        masked_sum = lambda values: self._sum_across_processes((values * mask).sum())  # noqa: E731
        stats = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "score": float(scores.mean()),  # what PPO trained on: normalised and clipped as the recipe asks
            "score/clipped": float(self._gather(rollout.clipped.float()).mean()),
            "kl": float(kl_per_answer.mean()),
            "non_score_reward": float((-self.kl_coef * kl_per_answer).mean()),
            "eos_rate": float(self._gather(rollout.ends_with_eos.float()).mean()),
            "response_length": float(self._gather(mask.sum(1)).mean()),
            "value/mean": float(masked_sum(rollout.values) / tokens),
            "advantage/mean": float(masked_sum(rollout.advantages) / tokens),
        }
        means = self._gather(rollout.source_rewards).mean(dim=0)
        stats.update({f"reward/{name}": float(value) for name, value in zip(self.reward.names, means)})
        return stats | self.scorer.statistics()

    # ---- bookkeeping -----------------------------------------------------------------------------------------

    def _count_updates(self) -> int:
        args = self.args
        global_batch = args.local_rollout_batch_size * self.world_size
        if args.max_steps and args.max_steps > 0:
            return args.max_steps
        if args.total_episodes:  # answers
            return math.ceil(args.total_episodes / (global_batch * args.n_samples_per_prompt))
        return max(1, math.ceil(args.num_train_epochs * len(self.train_prompts) / global_batch))

    def _place_models(self) -> None:
        models = self.models
        for model in (models.policy, models.reference, models.critic_model, models.value_head):
            # Sharded models are already on the process's device: fully_shard put them there.
            if model is not None and not models.sharded and not getattr(model, "hf_device_map", None) \
                    and not _is_quantized(model):
                model.to(self.device)
        self._set_training(True)
        if models.reference is not None:
            models.reference.eval()

    def _set_training(self, training: bool) -> None:
        """Train mode for the updates, eval mode for rollouts and evaluation: activation checkpointing acts in
        train mode only, where it would also switch off the KV cache that generation.generate() relies on, and a no-grad
        forward has no activations to spare. Dropout is off in both modes (models._freeze_all_but), so both
        compute the same log-probabilities and the first minibatch's ratio is 1."""
        for model in (self.models.policy, self.models.critic_model, self.models.value_head):
            model.train(training)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """``bf16`` / ``fp16``: mixed precision for a forward, as transformers' Trainer runs its forwards (through
        accelerate's autocast); the weights keep their dtype, and log-probabilities are taken in float32."""
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer named by ``optim``, from transformers' own factory (the Trainer's names, classes and
        keyword arguments: optim_args, betas, eps, 8-bit and paged bitsandbytes states), with the Trainer's
        parameter groups (no weight decay on biases and norms), the policy's and the critic's apart: the critic's
        at ``critic_learning_rate``, and the policy's first (its learning rate is the one logged)."""
        from transformers import Trainer

        optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
        decay = self._decayed_parameter_ids()
        critic_learning_rate = self.args.critic_learning_rate or self.args.learning_rate
        groups = []
        for role, learning_rate in (("policy", self.args.learning_rate), ("critic", critic_learning_rate)):
            trained = [p for name, p in self.models.trainable.items() if _role(name) == role]
            groups += [{"params": [p for p in trained if id(p) in decay], "weight_decay": self.args.weight_decay,
                        "lr": learning_rate, "role": role},
                       {"params": [p for p in trained if id(p) not in decay], "weight_decay": 0.0,
                        "lr": learning_rate, "role": role}]
        optimizer = optimizer_class([group for group in groups if group["params"]], **kwargs)
        if kwargs.get("optim_bits") == 8:
            # As the Trainer does: embeddings keep 32-bit optimizer states (8-bit ones destabilise them).
            import bitsandbytes

            manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
            for module in self._trained_modules():
                for embedding in (m for m in module.modules() if isinstance(m, torch.nn.Embedding)):
                    manager.register_module_override(embedding, "weight", {"optim_bits": 32})
        return optimizer

    def _decayed_parameter_ids(self) -> set[int]:
        """The ids of the trained parameters with weight decay: the Trainer's choice (not biases and norms)."""
        from transformers import Trainer

        decay: set[int] = set()
        for module in self._trained_modules():
            # get_decay_parameter_names reads nothing of the Trainer instance, only the module.
            names = set(Trainer.get_decay_parameter_names(None, module))
            decay |= {id(parameter) for name, parameter in module.named_parameters() if name in names}
        return decay

    def _groups_before_roles(self) -> list[list[torch.nn.Parameter]]:
        """The parameter groups of PPO's optimizer before critic_learning_rate (the policy's and the critic's
        together), which checkpoints of that time were saved with: with weight decay, then without."""
        decay = self._decayed_parameter_ids()
        groups = [[p for p in self.parameters if id(p) in decay], [p for p in self.parameters if id(p) not in decay]]
        return [group for group in groups if group]

    def _load_optimizer_state(self, saved: dict[str, Any], checkpoint: Path) -> None:
        """The optimizer's and the schedule's state from a checkpoint, also one written before the policy and the
        critic had optimizer groups of their own (regrouped parameter by parameter: see optimizer_layout)."""
        if has_role_groups(saved["optimizer"]):
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            return
        optimizer_state, sources = regroup_optimizer_state(saved["optimizer"], self._groups_before_roles(),
                                                           self.optimizer, checkpoint)
        scheduler_state = regroup_scheduler_state(saved["scheduler"], sources, self.scheduler, checkpoint)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(scheduler_state)
        set_scheduled_learning_rates(self.scheduler)
        logger.info("ppo: %s was saved before the policy and the critic had optimizer groups of their own; its "
                    "optimizer state was regrouped parameter by parameter", checkpoint.name)

    def _policy_groups(self) -> list[dict]:
        return [group for group in self.optimizer.param_groups if group["role"] == "policy"]

    def _trained_modules(self) -> list[torch.nn.Module]:
        models = self.models
        return list({id(m): m for m in (models.policy, models.critic_model, models.value_head)}.values())

    def _saves_at(self, update: int) -> bool:
        args = self.args
        strategy = getattr(args.save_strategy, "value", args.save_strategy)
        return (strategy == "steps" and bool(args.save_steps) and update % int(args.save_steps) == 0
                and update < self.updates)

    def _sum_gradients(self) -> None:
        """Sum the gradients across processes: each process's loss is its share of the minibatch's mean. Sharded
        models had theirs summed by FSDP in the backward pass (reduce-scattered to each process's shards)."""
        if self.world_size == 1 or self.models.sharded:
            return
        import torch.distributed as dist

        for parameter in self.parameters:  # every process reduces every tensor, in the same order
            if parameter.grad is None:  # no rows of this minibatch here, or a part the loss did not reach
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the gradient norm to ``max_grad_norm`` (0 or None: no clipping, as in transformers' Trainer);
        returns the norm before clipping either way, for the log."""
        limit = self.args.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, limit if limit and limit > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded: the norm over all shards

    def _sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every process (itself with one)."""
        if self.world_size == 1:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor, reduction="sum")

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (same shape everywhere) concatenated in process order: the whole batch."""
        if self.world_size == 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor)

    def _sum_stats(self, shares: dict[str, float]) -> dict[str, float]:
        """A minibatch's statistics from every process's share of them (see ``_backward``)."""
        keys = sorted(shares)
        totals = self._sum_across_processes(torch.tensor([shares[key] for key in keys], dtype=torch.float64,
                                                         device=self.device))
        return dict(zip(keys, totals.tolist()))

    def _adapt_kl_coef(self, kl: float) -> None:
        """Ziegler et al. (2019): move the coefficient by at most 20% of its step towards the KL target."""
        if self.args.kl_target is None:
            return
        error = min(max(kl / self.args.kl_target - 1, -0.2), 0.2)
        episodes = self.args.local_rollout_answers * self.world_size
        self.kl_coef *= 1 + error * episodes / self.args.kl_horizon

    def _init_reporting(self) -> None:
        """transformers' logging integrations named by ``report_to`` (TensorBoard, W&B, MLflow...), driven as the
        Trainer drives them: begin, one log per update, end."""
        from transformers.integrations import get_reporting_integration_callbacks
        from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

        callbacks = [callback() for callback in get_reporting_integration_callbacks(self.args.report_to)]
        self.reporting = CallbackHandler(callbacks, self.models.policy, self.tokenizer, self.optimizer, self.scheduler)
        self.trainer_state = TrainerState(is_local_process_zero=self.state.is_local_main_process,
                                          is_world_process_zero=self.state.is_main_process, max_steps=self.updates)
        self.control = TrainerControl()

    def _report(self, values: dict[str, float], update: int) -> None:
        self.trainer_state.global_step = update
        self.reporting.on_log(self.args, self.trainer_state, self.control, logs=dict(values))

    def _log(self, stats: dict[str, float]) -> None:
        self.history.append(stats)
        self._report(stats, int(stats["update"]))
        if not self.state.is_main_process:
            return
        with (self.run.path / LOG_FILE).open("a") as log:
            log.write(json.dumps(stats) + "\n")
        update = int(stats["update"])
        if update % max(1, int(self.args.logging_steps)) == 0 or update == self.updates:
            logger.info("ppo update %d/%d: reward %.3f  kl %.3f  entropy %.3f  clipfrac %.3f  value loss %.4f  "
                        "approx kl %.4f  eos %.2f  (%.1fs)", update, self.updates, stats["reward"], stats["kl"],
                        stats["policy/entropy"], stats["policy/clipfrac"], stats["loss/value"],
                        stats["policy/approx_kl"], stats["eos_rate"], stats["seconds"])

    def _write_samples(self, update: int, rollout: Rollout) -> None:
        if not self.state.is_main_process:
            return
        with (self.run.path / SAMPLES_FILE).open("a") as samples:
            for prompt, completion, score in list(zip(rollout.prompts, rollout.completions,
                                                      rollout.raw_rewards.tolist()))[:SAMPLES_PER_LOG]:
                samples.write(json.dumps({"update": update, "prompt": prompt[-1]["content"],
                                          "completion": completion, "reward": score}) + "\n")
                logger.info("  sample: %s -> %r (reward %.3f)", prompt[-1]["content"], completion, score)

    def _save_checkpoint(self, update: int) -> None:
        from safetensors.torch import save_file

        path = self.run.path / f"checkpoint-{update}"
        if self.models.sharded:
            # Each process writes its shards; the policy is not gathered into every checkpoint (only at the end).
            sharding.save_checkpoint(self.models, self.optimizer, path / SHARDED_DIR)
            self.state.wait_for_everyone()
        if self.state.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            schedule = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
            if self.models.sharded:
                torch.save(schedule, path / SCHEDULE_FILE)
            else:
                self.models.save_policy(path)
                save_file(self.models.trainable_state(), str(path / WEIGHTS_FILE))
                torch.save({"optimizer": self.optimizer.state_dict(), **schedule}, path / OPTIMIZER_FILE)
            # Written last: a checkpoint without it was cut off mid-save and is never resumed from.
            (path / STATE_FILE).write_text(json.dumps({
                "update": update, "kl_coef": self.kl_coef, "eval_reward_start": self.eval_reward_start,
                "reward_statistics": self.scorer.state_dict(), "history": self.history}, indent=1))
            self._rotate_checkpoints()
        self.state.wait_for_everyone()

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        for old in checkpoint_dirs(self.run.path)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> int:
        from safetensors.torch import load_file

        path = self.run.resume_from
        assert path is not None
        if (path / SHARDED_DIR).is_dir() != self.models.sharded:
            raise RecipeError(f"{path} is a {'sharded' if (path / SHARDED_DIR).is_dir() else 'whole'} PPO checkpoint "
                              f"and this run's models are {'sharded' if self.models.sharded else 'whole'}: resume "
                              "it under the kind of launch that wrote it (FSDP or not)")
        if self.models.sharded:  # sharded checkpoints were all written with the policy's and critic's own groups
            sharding.load_checkpoint(self.models, self.optimizer, path / SHARDED_DIR)
            saved = torch.load(path / SCHEDULE_FILE, map_location=self.device, weights_only=True)
            self.scheduler.load_state_dict(saved["scheduler"])
        else:
            self.models.load_trainable_state(load_file(str(path / WEIGHTS_FILE)))
            saved = torch.load(path / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
            self._load_optimizer_state(saved, path)
        if saved.get("scaler"):  # checkpoints of fp16 runs
            self.scaler.load_state_dict(saved["scaler"])
        state = json.loads((path / STATE_FILE).read_text())
        self.kl_coef, self.history = state["kl_coef"], state["history"]
        self.eval_reward_start = state["eval_reward_start"]
        if "reward_statistics" in state:  # written since normalize_reward: older checkpoints trained without it
            self.scorer.load_state_dict(state["reward_statistics"])
        logger.info("ppo: resumed at update %d of %d from %s", state["update"], self.updates, path.name)
        if self.state.is_main_process:  # the log keeps exactly the updates the resumed run stands on
            (self.run.path / LOG_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in self.history))
        return int(state["update"])


def checkpoint_to_resume(args: PPOConfig, run: RunDir) -> Path | None:
    """The checkpoint a run continues from: ``train.resume_from_checkpoint`` (a checkpoint directory, or true for
    the last complete one in the run dir), else the one the run dir chose (an unfinished run's last)."""
    option = args.resume_from_checkpoint
    if option is None or option is False:
        return run.resume_from
    if option is True:
        found = last_checkpoint(run.path)
        if found is None:
            raise RecipeError(f"train.resume_from_checkpoint is true, but {run.path} holds no complete PPO "
                              "checkpoint (checkpoint-N with trainer_state.json); give a checkpoint's path, or "
                              "remove the option to start a new run")
        return found
    path = Path(option).expanduser()
    parts = (STATE_FILE, SCHEDULE_FILE, SHARDED_DIR) if (path / SHARDED_DIR).is_dir() else \
        (STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE)
    missing = [name for name in parts if not (path / name).exists()]
    if missing:
        raise RecipeError(f"train.resume_from_checkpoint: {path} is not a complete PPO checkpoint (it lacks "
                          f"{', '.join(missing)}); give a checkpoint-N directory of a ppo run dir")
    return path


def delay_policy_schedule(scheduler, steps: int) -> None:
    """Start the policy's learning-rate schedule ``steps`` optimizer steps late (after the critic warm-up), as if
    its steps began there, so its warmup_steps warm up the policy's first real steps; the critic's schedule runs
    from the first step. A schedule by step (transformers' LambdaLR) is needed."""
    if not hasattr(scheduler, "lr_lambdas"):
        raise RecipeError(f"train.freezing_actor_steps needs a learning-rate schedule by step, which "
                          f"{type(scheduler).__name__} is not: use another lr_scheduler_type, e.g. linear")
    for index, group in enumerate(scheduler.optimizer.param_groups):
        if group["role"] == "policy":
            schedule = scheduler.lr_lambdas[index]
            scheduler.lr_lambdas[index] = functools.partial(_delayed, schedule, steps)


def _delayed(schedule, steps: int, step: int) -> float:
    return schedule(max(0, step - steps))


def _role(name: str) -> str:
    """``policy`` or ``critic``: which model a name of ``ActorCritic.trainable`` belongs to."""
    return "policy" if name.startswith("policy.") else "critic"


def _is_quantized(model) -> bool:
    return is_quantized(model) or is_quantized(getattr(model, "get_base_model", lambda: model)())

