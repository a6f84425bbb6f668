"""Shared test helpers: run the real CLI as a subprocess, with small but real settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Small but real: a few epochs of the default model on the bundled digits, one student round.
FAST = [
    "progress=false",
    "train.epochs=4",
    "train.min_steps=40",
    "selftrain.rounds=1",
    "trainer.accelerator=cpu",
    "train.checkpoint_every_s=null",  # last.ckpt every epoch: the resume tests wait for it
]


def run_cli(
    *overrides: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
):
    """`python -m pipeline OVERRIDES...` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *overrides],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
