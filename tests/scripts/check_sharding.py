"""Run under `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` by tests/test_multiprocess.py:
checks alignkit.distributed's helpers with real processes and writes what each process saw to OUT_DIR."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkit import distributed
from alignkit.feedback import JudgeStats


def main(out_dir: Path) -> None:
    distributed.join_processes()
    rank, processes = distributed.process_index(), distributed.world_size()
    seen: dict[str, list] = {"calls": []}

    def square(values: list[int]) -> list[int]:
        seen["calls"].append(list(values))
        return [value * value for value in values]

    def with_nested(values: list[int]) -> list[int]:
        # A nested call inside a block runs on the block as given (a judge generating its reasoning).
        return distributed.map_sharded(square, values)

    results = {
        "processes": processes,
        "odd": distributed.map_sharded(square, list(range(7))),
        "padded": distributed.map_sharded(square, list(range(5)), equal_shards=True),
        "fewer_rows_than_processes": distributed.map_sharded(square, [3]),
        "empty": distributed.map_sharded(square, []),
        "nested": distributed.map_sharded(with_nested, list(range(6))),
        "two_columns": distributed.map_sharded(lambda a, b: [x + y for x, y in zip(a, b)], [1, 2, 3], [10, 20, 30]),
        "mean": distributed.mean_across_processes(float(rank)),
    }
    stats = JudgeStats()
    stats.compared = 2 + rank
    stats.skip("too_long", rank)
    stats.add_mean("option_mass", [1.0] if rank == 0 else [0.5, 0.5])
    results["judge_stats"] = JudgeStats.merged(distributed.gather_objects(stats)).summary()
    results["calls"] = seen["calls"]
    distributed.write_text(out_dir / "written-once.txt", f"written by process {rank}\n")
    (out_dir / f"process-{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
