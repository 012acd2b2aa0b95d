"""GRPO (group relative policy optimisation) on TRL's GRPOTrainer, rewarded by the recipe's ``reward:`` section.

Every prompt is answered ``num_generations`` times; an answer's advantage is its reward minus the mean of its
group (divided by the group's spread with ``scale_rewards: group``), so no critic is trained. The KL to the
reference is a term of the loss, off by default (``beta: 0.0``). Run, metrics (``grpo/eval_reward_start``,
``grpo/eval_reward_end``, ``grpo/reward_start``, ``grpo/reward_end``) and the reference model: see
:mod:`alignkit.stages.rl_common`.
"""

from __future__ import annotations

from trl import GRPOConfig, GRPOTrainer

from alignkit.stages.rl_common import make_stage

STAGE = make_stage("grpo", "GRPO, critic-free RL (TRL GRPOTrainer): reward models and rule rewards",
                   GRPOConfig, GRPOTrainer)
