"""Shared fixtures. The demo model is built once per machine (in alignkit's cache) and reused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    from alignkit.demo.build import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def demo_sft_run(tmp_path_factory) -> Path:
    """The demo SFT run (recipes/demo/sft.yaml as shipped: LoRA on the demo model, word reversal, exact match
    ~1.0; ~1 min on 2 cores), trained once per test session for the tests that start from it or talk to it
    (the preference stages, chat, serve). Read it, never write into it."""
    run_dir = tmp_path_factory.mktemp("demo-sft") / "run"
    run_ok("sft", "recipes/demo/sft.yaml", f"train.output_dir={run_dir}", "train.save_strategy=no",
           "train.eval_strategy=no", "evaluate=null")
    return run_dir


@pytest.fixture(scope="session")
def noisy_sft_run(tmp_path_factory) -> Path:
    """The RL demos' starting policy: recipes/demo/sft-noisy.yaml as shipped (~1 min on 2 cores), trained once
    per test session. Observed: greedy, it echoes nearly every held-out phrase (exact match 0.015, rule reward
    0.171); sampled at temperature 0.7 it reverses now and then (rollout reward ~0.25)."""
    run_dir = tmp_path_factory.mktemp("noisy-sft") / "run"
    run_ok("sft", "recipes/demo/sft-noisy.yaml", f"train.output_dir={run_dir}", "train.save_strategy=no",
           "train.eval_strategy=no")
    return run_dir


@pytest.fixture(scope="session")
def demo_judge_run(tmp_path_factory) -> Path:
    """The demo LLM judge: recipes/demo/judge.yaml as shipped (full fine-tuning with chain of thought), trained
    once per test session; its evaluation (the label after the right check) is kept."""
    run_dir = tmp_path_factory.mktemp("demo-judge") / "run"
    run_ok("sft", "recipes/demo/judge.yaml", f"train.output_dir={run_dir}", "train.save_strategy=no",
           "train.eval_strategy=no")
    return run_dir


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python -m alignkit ARGS`` in a subprocess, as a user would; returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def kill_when_written(args: list[str], marker: Path, log: Path, timeout: float = 300) -> None:
    """Run the CLI until ``marker`` exists, then SIGKILL it: a run interrupted as a preemption leaves it.
    Fails the test if the run exits first or writes nothing within ``timeout`` seconds."""
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "alignkit", *args], cwd=REPO, stdout=out, stderr=out,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.time() + timeout
        while not marker.exists():
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.time() < deadline, f"no {marker.name} within {timeout:.0f} s"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait()


def free_port() -> int:
    """A localhost port free now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(model: str | Path, log: Path, key_env: str, key: str, *options: str, timeout: float = 180) -> Iterator[str]:
    """``alignkit serve MODEL [OPTIONS]`` on a free localhost port with its API key in ``key_env``, as a subprocess;
    yields its base URL (without /v1) once /health answers, stops it afterwards. Fails the test if its output
    (``log``) ever shows the key."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{key_env: key})
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "alignkit", "serve", str(model), "--port", str(port),
                                    "--api-key-env", key_env, *options], cwd=REPO, env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"the server did not answer /health within {timeout:.0f} s"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert key not in log.read_text(), "the API key appeared in the server's output"


def run_ok(*args: str) -> None:
    """Run the CLI and fail the test with the end of its stderr unless it exits 0."""
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]


def metrics_of(run_dir: Path) -> dict:
    """A finished run's metrics.json."""
    return json.loads((run_dir / "metrics.json").read_text())


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One line per row: dicts as JSON, strings written verbatim (to plant broken lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path
