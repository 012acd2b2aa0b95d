"""Run under `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` by tests/test_scoring_processes.py:
a reward model scores (prompt, answer) rows in two processes that each pass rows of their own, as PPO's
rollouts and TRL's per-process completions do, and rows both pass alike, as held-out answers are. Writes every
row each process passed with the score it got back to OUT_DIR/scored-<rank>.json; the test rescores them in
one process.

Usage: check_scoring.py REWARD_MODEL OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkit import distributed

PHRASES = ["red green blue", "one two", "sun moon star sky", "apple pear", "cat dog bird", "north south east",
           "up down", "left right front back"]


def rows_of(rank: int, count: int) -> tuple[list, list[str]]:
    """``count`` (prompt, answer) rows of process ``rank``'s own: its answers differ from the other's."""
    prompts, answers = [], []
    for i in range(count):
        words = PHRASES[(i + 3 * rank) % len(PHRASES)].split()
        prompts.append([{"role": "user", "content": f"reverse: {' '.join(words)}"}])
        answers.append(" ".join(reversed(words)) if (i + rank) % 2 else " ".join(words[: i % 3 + 1]))
    return prompts, answers


def main(reward_model: str, out_dir: Path) -> None:
    distributed.join_processes()
    from alignkit.feedback import RewardModel
    from alignkit.feedback.rewards import reward_model_function, shared_reward

    rank = distributed.process_index()
    scorer = RewardModel.load(reward_model, batch_size=2)
    function = reward_model_function(reward_model, batch_size=2)
    scored = []

    def record(name: str, prompts: list, answers: list[str], scores: list[float]) -> None:
        scored.append({"call": name, "prompts": prompts, "answers": answers, "scores": scores})

    # Each process its own rows, as many as the other (PPO, GRPO, RLOO): 4 and 4.
    prompts, answers = rows_of(rank, 4)
    record("own_rows", prompts, answers, scorer.score(prompts, answers))
    # TRL's call: conversational completions, the dataset's columns and TRL's extras as keywords.
    completions = [[{"role": "assistant", "content": answer}] for answer in answers]
    record("reward_function", prompts, answers, function(prompts=prompts, completions=completions,
                                                         trainer_state=None, answer=answers))
    # Own rows of different counts (5 and 3), and none in one process.
    prompts, answers = rows_of(rank, 5 if rank == 0 else 3)
    record("own_rows_uneven", prompts, answers, scorer.score(prompts, answers))
    prompts, answers = rows_of(rank, 3) if rank == 0 else ([], [])
    record("own_rows_one_empty", prompts, answers, scorer.score(prompts, answers))
    # The same rows in both processes (held-out answers): shared out, every process gets every score.
    prompts, answers = rows_of(0, 7)
    record("same_rows", prompts, answers, scorer.score(prompts, answers))
    record("shared_reward", prompts, answers, shared_reward([function], [1.0])(prompts, answers, {}))
    (out_dir / f"scored-{rank}.json").write_text(json.dumps(scored))
    distributed.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
