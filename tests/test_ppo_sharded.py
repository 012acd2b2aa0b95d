"""PPO with its models sharded by torch's FSDP2 across 2 CPU processes (gloo), launched as an FSDP launch
(tests/fixtures/cpu_2proc_fsdp.yaml): accelerate sets up each process as on GPUs, and alignkit's PPO shards the
policy, critic and reference itself (src/alignkit/stages/ppo/sharding.py). Checked against one process at the
same global batch and seed, through a kill and a resume from the sharded checkpoint, down to the saved policy
loaded back with plain ``from_pretrained``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port
from signal_rewards import ANSWER_LENGTH_REWARD

from alignkit.generation import generate
from alignkit.recipe.settings import GenerationSettings

FSDP_CPU_CONFIG = REPO / "tests" / "fixtures" / "cpu_2proc_fsdp.yaml"
DEMO_PPO = str(REPO / "recipes" / "demo" / "ppo.yaml")
# A full fine-tune from the bare demo base: the policy, a critic of its own (the base with a value head) and a
# frozen reference, all three sharded. The answer-length reward gives every update a gradient (signal_rewards);
# lr 3e-5 keeps the policy moving for all 10 updates instead of jumping to answers of maximal length.
FULL_FINE_TUNE = ("model.name_or_path=demo:tiny-llama", "adapter={method: none}", ANSWER_LENGTH_REWARD,
                  "train.learning_rate=3e-5", "train.num_mini_batches=2", "train.num_ppo_epochs=2",
                  "train.num_sample_generations=1", "evaluate.max_samples=16", "train.max_steps=10",
                  "train.save_steps=5")
UPDATES = 10


def _environment() -> dict[str, str]:
    """The CLI's environment: tests/ importable (the reward function lives there), one thread per process."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _sharded_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU_CONFIG),
            "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "alignkit", *args]


def _run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _kill_when_written(command: list[str], marker: Path, log: Path, timeout: float = 600) -> None:
    """Run ``command`` until ``marker`` exists, then SIGKILL the launcher and every process under it at once, as a
    preempted job is. By process, not by group: torchrun starts each worker in a session of its own."""
    import psutil

    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=_environment(), stdout=out, stderr=out)
        deadline = time.time() + timeout
        try:
            while not marker.exists():
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, f"no {marker} within {timeout:.0f} s"
                time.sleep(0.1)
        finally:
            tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ppo_log.jsonl").read_text().splitlines()]


def test_sharded_ppo_follows_one_process_resumes_after_a_kill_and_saves_a_whole_policy(tmp_path):
    """Same global batch (1 x 16 and 2 x 8) and seed. The sharded run is killed while it runs update 6 (as soon
    as checkpoint-5 is complete) and rerun: it resumes from the sharded checkpoint and finishes.

    Tolerance, update by update over all 10: rollout reward within 1e-3 (the mean answer length of 16 answers
    moves in steps of 1/160, so the same answers), KL within 1e-3 relative + 1e-4 (float rounding: the sharded
    run sums its gradients in another order). Measured: the same reward at every update; the KL's relative
    difference grows from 3e-6 (update 2) to 4.3e-5 (update 10), 20 times inside the bound."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "alignkit", "ppo", DEMO_PPO, *FULL_FINE_TUNE,
          "train.per_device_train_batch_size=16", f"train.output_dir={one}"])

    sharded = _sharded_command("ppo", DEMO_PPO, *FULL_FINE_TUNE, "train.per_device_train_batch_size=8",
                               f"train.output_dir={two}")
    _kill_when_written(sharded, two / "checkpoint-5" / "trainer_state.json", tmp_path / "killed.log")
    assert json.loads((two / "run.json").read_text())["status"] == "running"
    checkpoint = two / "checkpoint-5"
    # Each process wrote its own shards of the trained weights and optimizer states; no gathered copy.
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2
    assert (checkpoint / "schedule.pt").is_file() and not (checkpoint / "trainable.safetensors").exists()

    resumed = _run(sharded)
    assert "resumed at update 5" in resumed.stderr
    alone, together = _log(one), _log(two)
    assert [entry["update"] for entry in together] == list(range(1, UPDATES + 1))
    assert [entry["reward"] for entry in together] == pytest.approx([entry["reward"] for entry in alone], abs=1e-3)
    assert [entry["kl"] for entry in together] == pytest.approx([entry["kl"] for entry in alone], rel=1e-3,
                                                               abs=1e-4)
    assert together[-1]["reward"] != together[0]["reward"]  # the policy moved: the comparison is not of a constant
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["run/world_size"] == 2 and metrics["ppo/updates"] == UPDATES

    # The final policy was gathered and saved whole: plain transformers loads it, and it answers the held-out
    # prompts greedily exactly as the sharded policy did at the end of the run.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, loading = AutoModelForCausalLM.from_pretrained(two, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert json.loads((two / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    held_out = [json.loads(line) for line in (two / "eval_samples.jsonl").read_text().splitlines()]
    assert len(held_out) == 16
    answers = generate(model.eval(), AutoTokenizer.from_pretrained(two), [row["prompt"] for row in held_out],
                       GenerationSettings(max_new_tokens=16, do_sample=False))
    assert answers == [row["completion"] for row in held_out]
