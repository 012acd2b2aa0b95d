"""Run under `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` by tests/test_multiprocess.py:
checks alignkit.distributed's helpers with real processes and writes what each process saw to OUT_DIR."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate.utils import gather_object

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
        return distributed.map_shared(square, values)

    results = {
        "processes": processes,
        "odd": distributed.map_shared(square, list(range(7))),
        "padded": distributed.map_shared(square, list(range(5)), equal_shards=True),
        "fewer_rows_than_processes": distributed.map_shared(square, [3]),
        "empty": distributed.map_shared(square, []),
        "nested": distributed.map_shared(with_nested, list(range(6))),
        "two_columns": distributed.map_shared(lambda a, b: [x + y for x, y in zip(a, b)], [1, 2, 3], [10, 20, 30]),
        "mean": distributed.mean_across_processes(float(rank)),
    }
    # Each process its own rows: 3 on process 0, 1 on process 1 (then none on process 1); a sharded model
    # (equal_shards) makes both compute as many rows as the longest share.
    own = [10, 11, 12] if rank == 0 else [20]
    results["local"] = distributed.map_local(square, own)
    results["local_padded"] = distributed.map_local(square, own, equal_shards=True)
    results["local_none_padded"] = distributed.map_local(square, own if rank == 0 else [], equal_shards=True)
    results["local_same_rows"] = distributed.map_local(square, [1, 2, 3, 4, 5])  # shared out, as map_shared
    try:
        distributed.map_shared(square, own)
        results["shared_with_different_rows"] = "no error"
    except RuntimeError as error:
        results["shared_with_different_rows"] = str(error)
    stats = JudgeStats()
    stats.compared = 2 + rank
    stats.skip("too_long", rank)
    stats.add_mean("option_mass", [1.0] if rank == 0 else [0.5, 0.5])
    results["judge_stats"] = JudgeStats.merged(gather_object([stats])).summary()
    results["calls"] = seen["calls"]
    distributed.write_text(out_dir / "written-once.txt", f"written by process {rank}\n")
    (out_dir / f"process-{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
