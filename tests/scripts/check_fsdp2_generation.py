"""Run under `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` by tests/test_multiprocess.py:
the demo model sharded with torch's FSDP2 (each decoder layer one unit, as accelerate_configs/fsdp.yaml wraps
it) over two CPU processes, then alignkit's generation and reward scoring on it. Every forward pass of a
sharded model needs both processes, so these are the paths that would hang or scramble answers if the shares
were uneven or the steps out of step, whether the processes pass the same rows or each its own. Writes what
each process got to OUT_DIR/fsdp2-<rank>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkit import distributed


def main(out_dir: Path) -> None:
    distributed.join_processes()
    import torch
    from torch.distributed.fsdp import fully_shard

    from alignkit.feedback import RewardModel
    from alignkit.generation import generate
    from alignkit.models.modeling import load_model, load_tokenizer
    from alignkit.recipe.settings import GenerationSettings, ModelSettings

    settings = ModelSettings(name_or_path="demo:tiny-llama", dtype="float32")
    tokenizer = load_tokenizer(settings)
    prompts = [[{"role": "user", "content": f"reverse: {' '.join(words)}"}]
               for words in (["a", "b"], ["c d e"], ["f"], ["g h"], ["i j k l"])]  # 5: the shares are 3 and 2
    greedy = GenerationSettings(max_new_tokens=12, do_sample=False, batch_size=2)

    # Answered by each process alone with an unsharded copy: what the sharded model must reproduce.
    plain = load_model(settings, for_training=False)
    with_plain = [generate_alone(plain, tokenizer, prompt, greedy) for prompt in prompts]

    sharded = load_model(settings, for_training=False)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    result = {"is_sharded": distributed.is_sharded(sharded), "plain": with_plain,
              "sharded": generate(sharded, tokenizer, prompts, greedy)}
    torch.manual_seed(0)  # the new reward head is initialised alike in both processes before it is sharded
    scorer = RewardModel(model=load_model(settings, for_training=False, head="reward"), tokenizer=tokenizer,
                         batch_size=2)
    scorer.model.config.pad_token_id = tokenizer.pad_token_id
    answers = [answer or "x" for answer in result["plain"]]
    result["scores_alone"] = scorer._score_block(prompts, answers)
    for layer in scorer.model.model.layers:
        fully_shard(layer)
    fully_shard(scorer.model)
    result["scores_sharded"] = scorer.score(prompts, answers)
    # Each process its own rows (PPO's rollouts): 3 and 2, which at 2 per batch would be 2 and 1 forward
    # passes; the sharded model needs both processes in each, so both must score as many rows.
    own = slice(0, 3) if distributed.process_index() == 0 else slice(3, 5)
    result["own_rows"] = [own.start, own.stop]
    result["scores_own_rows"] = scorer.score(prompts[own], answers[own])
    (out_dir / f"fsdp2-{distributed.process_index()}.json").write_text(json.dumps(result))


def generate_alone(model, tokenizer, prompt, settings) -> str:
    from alignkit.generation import _generate

    return _generate(model, tokenizer, [prompt], settings, synced=False)[0]


if __name__ == "__main__":
    main(Path(sys.argv[1]))
