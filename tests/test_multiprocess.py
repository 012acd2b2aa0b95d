"""Several processes through accelerate: the launch configs, the Makefile and Slurm wrappers, the helpers
that share work out and gather it back, and SFT, DPO, PPO, ReST and RLAIF run for real with 2 CPU processes
(DDP over gloo) through accelerate_configs/cpu_2proc.yaml.

FSDP and ZeRO-3 training of the TRL stages is not run here: accelerate runs them on GPUs only (checked on a GPU
machine, see docs/multi-gpu.md). What is checked: a launch asking for them on a CPU machine stops with a clear
error, and a model sharded with torch's FSDP2 on CPU processes generates and scores in step through alignkit's
helpers. PPO, which shards its own models, trains under FSDP on CPU processes in tests/test_ppo_sharded.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, metrics_of, run_cli

from alignkit.errors import RecipeError
from alignkit.recipe.loading import load_recipe
from alignkit.stages import training

CPU_CONFIG = REPO / "accelerate_configs" / "cpu_2proc.yaml"
CONFIGS = REPO / "accelerate_configs"
QUICK_SFT = ("train.eval_strategy=no", "train.save_strategy=no", "train.logging_steps=10")


def free_port() -> int:
    """A port nothing listens on: each launch meets at its own, so a stuck earlier launch cannot block it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(config: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file CONFIG --num_processes 2 ARGS`` on a free port, one thread per process;
    on a timeout the launcher and both processes are killed, not left holding the port."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               "2", "--main_process_port", str(free_port()), *args]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"the launch did not finish within {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def launch(*args: str, config: Path = CPU_CONFIG, timeout: int = 900) -> subprocess.CompletedProcess:
    """``alignkit ARGS`` launched as two processes with ``config``."""
    return accelerate_launch(config, "-m", "alignkit", *args, timeout=timeout)


def launch_ok(*args: str) -> subprocess.CompletedProcess:
    result = launch(*args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "terminate called" not in result.stderr  # the process group is destroyed before the interpreter ends
    return result


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# Sharing work out and gathering it back
# --------------------------------------------------------------------------------------------------


def test_two_processes_share_the_rows_and_gather_them_back_in_order(tmp_path):
    result = accelerate_launch(CPU_CONFIG, str(REPO / "tests" / "scripts" / "check_sharding.py"), str(tmp_path),
                               timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr  # gloo's threads are stopped before the interpreter ends
    first, second = (json.loads((tmp_path / f"process-{rank}.json").read_text()) for rank in (0, 1))
    for seen in (first, second):  # every process ends with every result, in row order
        assert seen["processes"] == 2
        assert seen["odd"] == [i * i for i in range(7)]
        assert seen["padded"] == [i * i for i in range(5)]
        assert seen["fewer_rows_than_processes"] == [9] and seen["empty"] == []
        assert seen["nested"] == [i * i for i in range(6)]
        assert seen["two_columns"] == [11, 22, 33]
        assert seen["mean"] == 0.5
        # Counts add up; running means are weighted by how many values each process saw: (1 + 0.5 + 0.5) / 3.
        assert seen["judge_stats"] == pytest.approx({"compared": 5, "skipped": 1, "skipped_too_long": 1,
                                                     "option_mass": 2 / 3})
    # Each process its own rows (map_local): each gets the results of exactly the rows it passed.
    assert first["local"] == first["local_padded"] == first["local_none_padded"] == [100, 121, 144]
    assert second["local"] == second["local_padded"] == [400] and second["local_none_padded"] == []
    assert first["local_same_rows"] == second["local_same_rows"] == [1, 4, 9, 16, 25]
    # map_shared refuses rows that differ between the processes, in every process, before computing them.
    assert first["shared_with_different_rows"] == second["shared_with_different_rows"]
    assert "passed different rows" in first["shared_with_different_rows"]
    # Each process computed only its own block: 7 rows as 4 + 3; 5 rows padded to 3 + 3 for a sharded model;
    # the nested call ran on its block without being split again. map_local computed each process's own rows,
    # padded to the longest share (3) for a sharded model, with a row of the other process when it had none;
    # the same rows passed by both were shared out (3 + 2).
    assert first["calls"] == [[0, 1, 2, 3], [0, 1, 2], [3], [0, 1, 2], [10, 11, 12], [10, 11, 12], [10, 11, 12],
                              [1, 2, 3]]
    assert second["calls"] == [[4, 5, 6], [3, 4, 4], [3, 4, 5], [20], [20, 20, 20], [10, 10, 10], [4, 5]]
    assert (tmp_path / "written-once.txt").read_text() == "written by process 0\n"


def test_a_model_sharded_with_fsdp2_generates_and_scores_in_step_across_processes(tmp_path):
    """torch's FSDP2 runs on CPU processes (accelerate only routes FSDP to GPUs): the demo model sharded layer by
    layer answers 5 prompts (shares of 3 and 2, padded to 3 each, answers of different lengths) exactly as an
    unsharded copy does, and a sharded reward model scores as the whole one does, whether both processes pass
the same answers or each its own (3 and 2: padded so both run as many forward passes)."""
    result = accelerate_launch(CPU_CONFIG, str(REPO / "tests" / "scripts" / "check_fsdp2_generation.py"),
                               str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"fsdp2-{rank}.json").read_text())
        assert seen["is_sharded"]
        assert seen["sharded"] == seen["plain"]
        assert len({len(answer.split()) for answer in seen["plain"]}) > 1  # they stopped at different steps
        assert seen["scores_sharded"] == pytest.approx(seen["scores_alone"], abs=1e-4)
        start, stop = seen["own_rows"]  # each process its own rows, of different counts: its own scores
        assert seen["scores_own_rows"] == pytest.approx(seen["scores_alone"][start:stop], abs=1e-4)


# --------------------------------------------------------------------------------------------------
# Stages with two processes
# --------------------------------------------------------------------------------------------------


def test_two_process_sft_matches_one_process_at_the_same_global_batch(tmp_path):
    """Same global batch (1 x 32 and 2 x 16), same seed: the processes take alternate batches of the same
    shuffled order and the loss is normalised over both, so the runs train alike. Tolerance: 2% on the last
    logged loss (a mean over 10 steps); measured: 0.2515 and 0.2512 at 150 steps, 0.1% apart."""
    args = ("recipes/demo/sft.yaml", *QUICK_SFT, "train.max_steps=150", "evaluate.max_samples=24")
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_cli("sft", *args, f"train.output_dir={one}")
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch_ok("sft", *args, f"train.output_dir={two}", "train.per_device_train_batch_size=16")

    alone, shared = metrics_of(one), metrics_of(two)
    assert (alone["run/world_size"], shared["run/world_size"]) == (1, 2)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert alone["train/global_batch_size"] == shared["train/global_batch_size"] == 32
    assert shared["train/loss_start"] == pytest.approx(alone["train/loss_start"], rel=1e-4)  # the same first batch
    assert shared["train/loss_end"] == pytest.approx(alone["train/loss_end"], rel=0.02)
    assert shared["train/loss_end"] < 0.5 * shared["train/loss_start"]  # it learned
    # Each process answered half of the held-out prompts; the gathered answers are in the held-out order.
    predictions = jsonl(two / "predictions.jsonl")
    assert [p["prompt"] for p in predictions] == [p["prompt"] for p in jsonl(one / "predictions.jsonl")]
    assert shared["eval/samples"] == 24
    # The main process reports; the other only trains.
    assert double.stdout.count("sft finished") == 1


def test_two_process_dpo_trains_and_evaluates_both_models_on_shared_prompts(noisy_sft_run, tmp_path):
    run_dir = tmp_path / "dpo"
    launch_ok("dpo", "recipes/demo/dpo.yaml", f"model.name_or_path={noisy_sft_run}", f"train.output_dir={run_dir}",
              "train.max_steps=30", "train.per_device_train_batch_size=8", "train.save_strategy=no",
              "evaluate.max_samples=16", f"evaluate.compare={noisy_sft_run}")
    metrics = metrics_of(run_dir)
    assert metrics["run/world_size"] == 2 and metrics["train/global_batch_size"] == 16
    assert metrics["dpo/margin"] > 0  # the held-out pairs, evaluated across both processes
    assert metrics["eval/samples"] == 16 and "compare/exact_match" in metrics
    assert len(jsonl(run_dir / "predictions.jsonl")) == len(jsonl(run_dir / "predictions-compare.jsonl")) == 16
    assert (run_dir / "adapter_model.safetensors").is_file()


def test_two_process_ppo_averages_its_updates_and_logs_them_once(tmp_path):
    from test_ppo import DEMO_PPO, FROM_BASE, QUICK

    run_dir = tmp_path / "run"
    launch_ok("ppo", DEMO_PPO, *FROM_BASE, *QUICK, f"train.output_dir={run_dir}", "train.max_steps=2")
    metrics = metrics_of(run_dir)
    assert metrics["run/world_size"] == 2
    assert metrics["ppo/updates"] == 2 and metrics["train/global_batch_size"] == 16  # 8 prompts per process
    log = jsonl(run_dir / "ppo_log.jsonl")
    assert [entry["update"] for entry in log] == [1, 2]  # written once, by the main process
    assert log[0]["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["ppo/eval_prompts"] == 16 and "ppo/eval_reward_end" in metrics


def test_two_process_rest_samples_and_judges_in_shares_and_writes_everything_once(noisy_sft_run, tmp_path):
    from test_rest import rule_win_rates

    run_dir = tmp_path / "rest"
    judge = "rest.judge={kind: rule, function: 'alignkit.demo.rewards:reversal_reward'}"
    launch_ok("rest", "recipes/demo/rest.yaml", f"model.name_or_path={noisy_sft_run}", f"train.output_dir={run_dir}",
              judge, "rest.grow_steps=2", "rest.improve_steps=1", "rest.thresholds=[0.5]", "rest.prompts_per_grow=24",
              "train.max_steps=4", "train.save_strategy=no", "evaluate.max_samples=10")
    metrics = metrics_of(run_dir)
    assert metrics["run/world_size"] == 2 and metrics["rest/improve_steps"] == 2
    assert [entry["step"] for entry in jsonl(run_dir / "rest_log.jsonl")] == [1, 2]  # one line per step
    for grow in (1, 2):
        samples = jsonl(run_dir / f"grow-{grow}" / "samples.jsonl")
        assert len(samples) == 24 * 4 and [s["prompt_index"] for s in samples[::4]] == list(range(24))
        # Every score is the sample's win rate over its siblings under the rule, though the pairs were judged
        # half by each process: the gathered preferences are in the order asked.
        assert [s["reward"] for s in samples] == pytest.approx(rule_win_rates(samples, 4))


def test_two_process_rlaif_with_the_llm_judge_keeps_labels_that_agree_with_the_rule(noisy_sft_run, demo_judge_run,
                                                                                    tmp_path):
    run_dir = tmp_path / "rlaif"
    launch_ok("rlaif", "recipes/demo/rlaif.yaml", f"model.name_or_path={noisy_sft_run}",
              f"rlaif.judge.model={demo_judge_run}", f"train.output_dir={run_dir}", "rlaif.iterations=1",
              "rlaif.prompts_per_iteration=48", "train.max_steps=4", "train.save_strategy=no",
              "evaluate.max_samples=10")
    metrics = metrics_of(run_dir)
    counts = json.loads((run_dir / "iteration-1" / "label_counts.json").read_text())
    pairs = jsonl(run_dir / "iteration-1" / "pairs.jsonl")
    assert metrics["run/world_size"] == 2 and counts["samples"] == 48 * 4
    # The judge's counts are the sum over both processes: every pair once.
    assert counts["judge_compared"] + counts.get("judge_skipped", 0) == len(pairs) == metrics["rlaif/pairs_judged_end"]
    # The judge (0.94 agreement alone) reasoned about half the pairs in each process; had the gathered
    # preferences come back out of order, the kept labels would agree with the rule about half the time.
    assert metrics["rlaif/label_agreement_end"] >= 0.75, metrics


# --------------------------------------------------------------------------------------------------
# Launch configs and wrappers
# --------------------------------------------------------------------------------------------------


def test_launch_configs_are_accelerate_configs_with_the_documented_settings():
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = {path.stem: load_config_from_file(str(path)) for path in CONFIGS.glob("*.yaml")}
    assert set(loaded) == {"cpu_2proc", "ddp", "fsdp", "fsdp_qlora", "zero3"}
    assert {name: config.distributed_type.value for name, config in loaded.items()} == {
        "cpu_2proc": "MULTI_GPU", "ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp_qlora": "FSDP", "zero3": "DEEPSPEED"}
    assert loaded["cpu_2proc"].num_processes == 2 and not loaded["cpu_2proc"].use_cpu
    for name in ("fsdp", "fsdp_qlora"):
        fsdp = loaded[name].fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["fsdp_cpu_ram_efficient_loading"]
    assert loaded["zero3"].deepspeed_config["zero_stage"] == 3


def test_make_wraps_accelerate_launch():
    def dry_run(*variables: str) -> str:
        # Without the flags of an enclosing make (`make test` runs this), which would add directory lines.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        result = subprocess.run(["make", "--no-print-directory", "-n", "sft", "RECIPE=recipes/demo/sft.yaml",
                                 *variables], cwd=REPO, capture_output=True, text=True, check=True, env=env)
        [command] = [line for line in result.stdout.splitlines() if " alignkit" in line or "/alignkit " in line]
        return command.strip()

    assert dry_run() == ".venv/bin/alignkit sft recipes/demo/sft.yaml"
    assert dry_run("ACCELERATE_CONFIG=accelerate_configs/fsdp.yaml", "NUM_PROCESSES=4").split() == [
        ".venv/bin/accelerate", "launch", "--config_file", "accelerate_configs/fsdp.yaml", "--num_processes", "4",
        "-m", "alignkit", "sft", "recipes/demo/sft.yaml"]


def test_slurm_script_starts_one_launch_per_node_meeting_at_the_first(tmp_path):
    # Stand-ins for srun (runs the node command as node 1 of 2) and accelerate (prints its arguments).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nSLURM_NODEID=1 "$@"\n')
    (bin_dir / "accelerate").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    for tool in ("srun", "accelerate"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2", GPUS_PER_NODE="8",
               MAIN_HOST="node01", ACCELERATE="accelerate")
    script = str(CONFIGS / "slurm_multinode.sh")
    result = subprocess.run([script, "sft", "recipes/demo/sft.yaml", "accelerate_configs/fsdp.yaml",
                             "adapter={method: lora, r: 8}"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "launch", "--config_file", "accelerate_configs/fsdp.yaml", "--num_machines", "2", "--num_processes", "16",
        "--machine_rank", "1", "--main_process_ip", "node01", "--main_process_port", "29500", "-m", "alignkit", "sft",
        "recipes/demo/sft.yaml", "adapter={method: lora, r: 8}"]
    missing = subprocess.run([script, "sft", "recipes/nope.yaml"], cwd=REPO, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "file not found: recipes/nope.yaml" in missing.stderr


def test_sharded_launches_on_a_machine_without_gpus_stop_with_a_clear_error(tmp_path):
    result = launch("sft", "recipes/demo/sft.yaml", f"train.output_dir={tmp_path / 'run'}",
                    config=CONFIGS / "fsdp.yaml")
    assert result.returncode != 0  # torchrun reports its processes' exit code 2 as a failed launch
    assert "error: the accelerate config asks for FSDP, which accelerate runs on GPUs only" in result.stderr
    assert not (tmp_path / "run").exists()  # stopped before the run dir


def test_fsdp_launch_checks_the_recipe_before_anything_loads(monkeypatch):
    import torch

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    qlora = load_recipe("recipes/demo/sft-qlora.yaml")
    with pytest.raises(RecipeError, match="accelerate runs on GPUs only"):
        training.check_launch(qlora)
    # PPO shards its own models (torch's fully_shard), on CPU processes too; not a 4-bit base.
    training.check_launch(load_recipe("recipes/demo/ppo.yaml"))
    with pytest.raises(RecipeError, match="shards full-precision weights only"):
        training.check_launch(load_recipe("recipes/demo/ppo-qlora.yaml"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks a GPU machine gets to
    with pytest.raises(RecipeError, match="set model.dtype and model.quantization.quant_storage to the same dtype"):
        training.check_launch(qlora)
    stored = load_recipe("recipes/demo/sft-qlora.yaml", ["model.dtype=bfloat16",
                                                          "model.quantization.quant_storage=bfloat16"])
    training.check_launch(stored)  # 4-bit weights stored in the model dtype shard
    with pytest.raises(RecipeError, match="FSDP shards 4-bit"):
        training.check_launch(load_recipe("recipes/demo/sft-8bit.yaml"))
    ppo = load_recipe("recipes/demo/ppo.yaml")  # loaded first: with DeepSpeed asked for, transformers imports it
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RecipeError, match="shards its models with torch's FSDP2 itself.*accelerate_configs/fsdp.yaml"):
        training.check_launch(ppo)


def test_shipped_fsdp_qlora_recipe_stores_its_4bit_weights_in_the_model_dtype():
    raw = yaml.safe_load((REPO / "recipes" / "qwen2.5-7b" / "sft-qlora-fsdp.yaml").read_text())
    assert raw["model"]["quantization"]["quant_storage"] == raw["model"]["dtype"] == "bfloat16"
