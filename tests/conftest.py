"""Shared fixtures. The demo model is built once per machine (in alignkit's cache) and reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    from alignkit.demo.build import demo_model_dir

    return demo_model_dir()


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python -m alignkit ARGS`` in a subprocess, as a user would; returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
