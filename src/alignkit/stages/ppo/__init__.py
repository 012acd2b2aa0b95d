"""PPO (actor-critic RLHF) on alignkit's own trainer; TRL removed its PPOTrainer in 1.13.

recipe -> PPOConfig (``train``) -> prompt-only data -> reward sources (``reward``) -> policy, reference and
critic (one base when the policy has an adapter) -> PPO updates -> run dir with the policy adapter (or
model), ``ppo_log.jsonl`` (every update's statistics), ``samples.jsonl``, ``metrics.json`` and report.md
(reward and KL curves):

  ppo/reward_start, ppo/reward_end  mean reward of the rollouts over the first / last updates (a window of
                                    a tenth of the updates, 1 to 10, smooths the noise of single batches)
  ppo/kl_end                        mean KL(policy || reference) per answer over the last updates
  ppo/eval_reward_start, _end       mean reward of greedy answers to the held-out prompts, before and after

Modules: ``config`` (``PPOConfig``, TRL 1.12's names), ``core`` (the arithmetic on padded response batches:
GAE, KL estimators, rewards, clipped losses), ``sampling`` (batch-independent per-answer sampling, where an
answer stops), ``scores`` (from the reward sources' rewards to the score: running normalisation, clipping),
``models`` (policy, reference and critic), ``trainer`` (rollouts, updates, checkpoints).
"""

from __future__ import annotations

from alignkit import distributed
from alignkit.data import load_prompt_data, prepare
from alignkit.feedback.rewards import load_reward_functions
from alignkit.recipe.loading import Recipe
from alignkit.recipe.settings import RewardSettings
from alignkit.runs.rundir import RunDir
from alignkit.stages import Stage, training
from alignkit.stages.ppo import sharding
from alignkit.stages.ppo.config import PPOConfig
from alignkit.stages.ppo.models import build_actor_critic
from alignkit.stages.ppo.scores import RewardSources
from alignkit.stages.ppo.trainer import PPOTrainer, checkpoint_to_resume
from alignkit.stages.rl_common import eval_generation, held_out_prompts


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    trainer = build_trainer(recipe, run_dir)
    return training.parameter_metrics(trainer.models.policy) | trainer.train()


def build_trainer(recipe: Recipe, run_dir: RunDir) -> PPOTrainer:
    """Everything up to the first update: config, checkpoint to resume from, data (before any model, to fail
    fast), rewards, models."""
    from transformers import set_seed

    args = training.training_args(recipe, PPOConfig, run_dir.path)
    sharded = distributed.uses_fsdp() and distributed.world_size() > 1
    if sharded:
        sharding.check_options(args)
        sharding.load_whole_on_every_process()
    run_dir.resume_from = checkpoint_to_resume(args, run_dir)  # the option wins over the run dir's own choice
    data = prepare(recipe.data, load_prompt_data)
    training.record_data(run_dir, data)
    settings: RewardSettings = recipe.sections["reward"]
    functions = load_reward_functions(settings)
    reward = RewardSources(functions, settings.weights)

    # What the models create at random as they load (new adapters, a critic's head) follows train.seed.
    set_seed(args.seed)
    models, tokenizer = build_actor_critic(recipe, args, functions)
    if sharded:
        sharding.shard(models, functions)
    return PPOTrainer(models, tokenizer, args, reward, data.train, run_dir,
                      eval_prompts=held_out_prompts(data.eval, recipe),
                      eval_generation=eval_generation(recipe, args.response_length))


STAGE = Stage(name="ppo", help="PPO with a critic (alignkit's trainer): reward models and rule rewards",
              train_config=lambda: PPOConfig, run=run, sections={"reward": RewardSettings},
              required_sections=("reward",), rows="prompt",
              load_data=load_prompt_data, extra_models="critic_and_reference", sharded_launch="fsdp",
              plan_offers_qlora=False)
