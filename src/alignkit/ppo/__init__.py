"""alignkit's PPO (actor-critic RLHF on current TRL, which removed its PPOTrainer in 1.13).

``core`` holds the arithmetic on padded response batches (GAE, KL estimators, rewards, clipped losses);
the trainer and the ``ppo`` stage are built on it (issue 5).
"""
