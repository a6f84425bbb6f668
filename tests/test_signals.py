"""A signal at any moment of a stage: USR2 (the time limit is near) and TERM (preemption,
`scontrol requeue`, `scancel`) stop the run cleanly, saving what training has done, and the
same command resumes it (pipeline/runtime/preemption.py). No SLURM needed: the signal is sent
by the run to itself at a chosen moment (PROBE), or by the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import FAST, REPO, run_cli, stop_mid_epoch_and_resume

THREADS = {"OMP_NUM_THREADS": "1"}
TINY = [*FAST, "train.epochs=2", "train.min_steps=30", "trainer.num_threads=1"]

# Runs the CLI with one method wrapped so that, the first time it is called, the process sends
# itself a signal (before or after the call): a signal at that very moment of the stage.
PROBE = r"""
import importlib, os, runpy, signal, sys
target, when, signame = sys.argv.pop(1), sys.argv.pop(1), sys.argv.pop(1)
module_name, cls_name, method = target.rsplit(".", 2)
cls = getattr(importlib.import_module(module_name), cls_name)
original = getattr(cls, method)
sent = []

def wrapped(*args, **kwargs):
    if when == "before" and not sent:
        sent.append(1)
        os.kill(os.getpid(), getattr(signal, signame))
    out = original(*args, **kwargs)
    if when == "after" and not sent:
        sent.append(1)
        os.kill(os.getpid(), getattr(signal, signame))
    return out

setattr(cls, method, wrapped)
sys.argv[0] = "pipeline"
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""

MOMENTS = {
    # Lightning builds the training loaders (bug: "Please call iter(combined_loader) first")
    "training loaders": "torch.utils.data.DataLoader.__iter__ before",
    "test pass": "pipeline.engine.datamodule.ImageDataModule.test_dataloader before",
    "labelling pass": "pipeline.engine.datamodule.ImageDataModule.predict_dataloader before",
    "between two steps": "pipeline.runtime.rundir.Step.finish after",  # round_0 just finished
    "starting": "pipeline.runtime.rundir.RunDir.begin after",  # config.yaml written
}


def probe_run(where: str, signame: str, *overrides: str) -> subprocess.CompletedProcess:
    target, when = MOMENTS[where].split()
    return subprocess.run(
        [sys.executable, "-c", PROBE, target, when, signame, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **THREADS, "PYTHONUNBUFFERED": "1"},
    )


CASES = [
    ("training loaders", "SIGUSR2"),
    ("training loaders", "SIGTERM"),
    ("test pass", "SIGTERM"),
    ("labelling pass", "SIGUSR2"),
    ("between two steps", "SIGTERM"),
    ("starting", "SIGUSR2"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("where", "signame"), CASES)
def test_a_signal_at_any_moment_stops_cleanly_and_the_rerun_finishes(tmp_path, where, signame):
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"run_dir={run_dir}"]
    first = probe_run(where, signame, *overrides)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "Traceback" not in first.stderr, first.stderr[-3000:]
    assert f"stopped by {signame} after saving the run's state: re-run the same command" in (
        first.stderr
    ), first.stderr[-3000:]
    assert not (run_dir / "summary.json").exists()
    last = run_dir / "round_0" / "checkpoints" / "last.ckpt"
    if where == "training loaders":  # saved at the first step after the signal
        assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1
    if where == "between two steps":
        assert (run_dir / "round_0" / "metrics.json").is_file()

    again = run_cli(*overrides, env=THREADS)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    if where == "training loaders":
        assert "resuming training from" in again.stdout + again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_sigterm_during_training_saves_mid_epoch_and_the_rerun_resumes(tmp_path, devices):
    """TERM (what SLURM sends on preemption, scontrol requeue and scancel) mid-training, in one
    process or to a job that started 2 DDP ranks: every rank saves last.ckpt at the next step,
    the job exits 1 naming the signal; Lightning's own TERM handling (stop without saving, exit
    0) is off. The same command resumes."""
    stderr = stop_mid_epoch_and_resume(
        tmp_path,
        signal.SIGTERM,
        f"trainer.devices={devices}",
        "trainer.strategy=ddp",
        env=THREADS,
    )
    assert "stopped by SIGTERM after saving the run's state" in stderr, stderr[-3000:]


@pytest.mark.slow
def test_sigterm_stops_a_sweep_before_its_next_job(tmp_path):
    """A -m sweep run in one process (Hydra's basic launcher): TERM during job 0 stops job 0
    cleanly and no further job starts."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            *MOMENTS["test pass"].split(),
            "SIGTERM",
            "-m",
            "seed=0,1",
            *TINY,
            "stage=train",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **THREADS, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("stopped by SIGTERM") == 1, proc.stderr[-3000:]
    (job,) = [p for p in sweep_dir.iterdir() if p.is_dir()]  # job 1 never started
    assert "seed: 0\n" in (job / "config.yaml").read_text()
    assert not (job / "summary.json").exists()


def test_the_checkpoint_callbacks_state_key_is_lightnings_own(tmp_path):
    """CachedKeyCheckpoint formats its state key once (Lightning formats it per hook, per
    step): the key must stay ModelCheckpoint's, or a last.ckpt written by one would not restore
    the other's state."""
    import datetime

    from lightning.pytorch.callbacks import ModelCheckpoint

    from pipeline.engine.trainer import CachedKeyCheckpoint

    for kwargs in (
        {"filename": "last", "save_top_k": 1, "every_n_epochs": 1},
        {"filename": "last", "train_time_interval": datetime.timedelta(seconds=60)},
        {"filename": "best", "monitor": "val_accuracy", "mode": "max", "save_weights_only": True},
    ):
        ours = CachedKeyCheckpoint(dirpath=tmp_path, **kwargs)
        assert ours.state_key == ModelCheckpoint(dirpath=tmp_path, **kwargs).state_key
        assert ours.state_key.startswith("ModelCheckpoint{")
        assert ours.state_key is ours.state_key  # formatted once
