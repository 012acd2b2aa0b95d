"""RLOO (REINFORCE leave-one-out) on TRL's RLOOTrainer, rewarded by the recipe's ``reward:`` section.

Every prompt is answered ``num_generations`` times; an answer's advantage is its reward minus the mean reward
of the other answers to its prompt, so no critic is trained. The KL to the reference is a penalty on the
reward (``beta``, 0.05 by default). Run, metrics (``rloo/eval_reward_start``, ``rloo/eval_reward_end``,
``rloo/reward_start``, ``rloo/reward_end``) and the reference model: see :mod:`alignkit.stages.rl_common`.
"""

from __future__ import annotations

from trl import RLOOConfig, RLOOTrainer

from alignkit.stages.rl_common import make_stage

STAGE = make_stage("rloo", "RLOO, critic-free RL (TRL RLOOTrainer): reward models and rule rewards",
                   RLOOConfig, RLOOTrainer)
