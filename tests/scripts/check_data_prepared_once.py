"""Run under `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` by tests/test_data_cache.py:
both processes ask for the same data, as every process of a training launch does in ``training.fit``
(``alignkit.data.prepare``). Each records whether it converted the data or read the main process's copy
(``ALIGNKIT_RECORD_DATA_PREPARATION``), and writes the training prompts it got to OUT_DIR/prompts-<rank>.json.

Usage: check_data_prepared_once.py DATA_FILE OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkit import distributed
from alignkit.data import load_sft_data, prepare
from alignkit.recipe.settings import DataSettings, DataSource


def main(data_file: str, out_dir: str) -> None:
    distributed.join_processes()
    data = prepare(DataSettings(train=[DataSource(path=data_file)], eval_size=2), load_sft_data)
    prompts = [row["messages"][0]["content"] for row in data.train]
    Path(out_dir, f"prompts-{distributed.process_index()}.json").write_text(json.dumps(prompts))
    distributed.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
