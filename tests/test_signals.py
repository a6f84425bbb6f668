"""A signal at any moment of a stage: USR2 (the time limit is near) and TERM (preemption,
`scontrol requeue`, `scancel`) stop the run cleanly, saving what training has done, and the
same command resumes it (pipeline/runtime/preemption.py). No SLURM needed: the signal is sent
by the run to itself at a chosen moment (PROBE), or by the test."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time

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


# --- TERM in a SLURM job: SLURM's decision stands (runtime/requeue.py settle_term) -------------

# A stand-in for scontrol: it logs its arguments to $FAKE_SLURM/calls, prints the job's fields
# (job.N for the N-th `show job` if that file exists, else job) and the partition's, and
# answers `requeue` with the exit code in requeue_rc.
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_SLURM/calls"
case "$1 $2" in
"show job")
    n=$(grep -c '^show job' "$FAKE_SLURM/calls")
    if [ -f "$FAKE_SLURM/job.$n" ]; then cat "$FAKE_SLURM/job.$n"; else cat "$FAKE_SLURM/job"; fi ;;
"show partition") cat "$FAKE_SLURM/partition" ;;
requeue*)
    rc=$(cat "$FAKE_SLURM/requeue_rc")
    [ "$rc" = 0 ] || echo "scontrol: error: Requested operation is presently disabled" >&2
    exit "$rc" ;;
esac
"""
GRACE = "PreemptTime=2026-12-06T03:02:55 EndTime={end}"


def job_line(
    state: str = "RUNNING", grace: bool = True, requeue: int = 1, restarts: int = 0, end_in=20
) -> str:
    """One `scontrol show job -o` line; the grace time ends `end_in` s from now."""
    end = datetime.datetime.now().replace(microsecond=0) + datetime.timedelta(seconds=end_in)
    extra = GRACE.format(end=end.isoformat()) if grace else "PreemptTime=None EndTime=Unknown"
    return (
        f"JobId=123 JobName=x UserId=root(0) JobState={state} Reason=None Requeue={requeue} "
        f"Restarts={restarts} Partition=lowgrace {extra}\n"
    )


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """scontrol on PATH is FAKE_SCONTROL; returns its folder (job, partition, calls)."""
    from pipeline.runtime import preemption, requeue

    folder = tmp_path / "slurm"
    (folder / "bin").mkdir(parents=True)
    scontrol = folder / "bin" / "scontrol"
    scontrol.write_text(FAKE_SCONTROL)
    scontrol.chmod(0o755)
    (folder / "job").write_text(job_line())
    (folder / "partition").write_text("PartitionName=lowgrace GraceTime=20 PreemptMode=REQUEUE\n")
    (folder / "requeue_rc").write_text("0")
    (folder / "calls").write_text("")
    monkeypatch.setenv("PATH", f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    monkeypatch.setattr(requeue, "SLURM_POLL_S", 0.05)
    monkeypatch.setattr(preemption, "_max_requeues", 20)
    monkeypatch.setattr(preemption, "_requested", [])
    return folder


def calls(folder) -> list[str]:
    return (folder / "calls").read_text().splitlines()


@pytest.mark.parametrize("state", ["CANCELLED", "COMPLETING", "PREEMPTED", "TIMEOUT"])
def test_term_after_slurm_decided_stops_at_once(fake_slurm, state):
    """scancel, scontrol requeue, the time limit, a preemption without a grace time: SLURM has
    decided before it sent TERM (the job is no longer RUNNING); the job stops at once."""
    from pipeline.runtime import requeue

    (fake_slurm / "job").write_text(job_line(state))
    said = requeue.settle_term("123", may_requeue=True)
    assert said.startswith("SLURM job 123 is requeued by SLURM if it was preempted"), said
    assert calls(fake_slurm) == ["show job -o 123"]


def test_a_term_that_is_not_slurms_stops_at_once(fake_slurm):
    """RUNNING without a PreemptTime: a `kill` inside the job, not SLURM; nothing to wait for."""
    from pipeline.runtime import requeue

    (fake_slurm / "job").write_text(job_line(grace=False))
    said = requeue.settle_term("123", may_requeue=True)
    assert said == "re-run the same command, or requeue the job, to resume"
    assert calls(fake_slurm) == ["show job -o 123"]


def test_preempted_with_a_grace_time_the_job_requeues_itself(fake_slurm):
    from pipeline.runtime import requeue

    said = requeue.settle_term("123", may_requeue=True)
    assert said == (
        "SLURM job 123 was preempted with a grace time: requeued it (restart 1); it resumes "
        "from the saved state"
    )
    assert calls(fake_slurm) == ["show job -o 123", "show partition -o lowgrace", "requeue 123"]


@pytest.mark.parametrize(
    "why", ["other rank", "not requeueable", "cancel mode", "max_requeues", "requeue refused"]
)
def test_preempted_with_a_grace_time_the_job_waits_for_slurm_otherwise(
    fake_slurm, monkeypatch, capsys, why
):
    """Where the job may not requeue itself it waits, doing nothing, until SLURM acts at the end
    of the grace time (here: the job's state reads PREEMPTED from the 3rd look on)."""
    from pipeline.runtime import preemption, requeue

    line = job_line()
    if why == "not requeueable":
        line = job_line(requeue=0)
    if why == "max_requeues":
        line = job_line(restarts=2)
        monkeypatch.setattr(preemption, "_max_requeues", 2)
    if why == "cancel mode":
        (fake_slurm / "partition").write_text("PartitionName=lowgrace PreemptMode=CANCEL\n")
    if why == "requeue refused":
        (fake_slurm / "requeue_rc").write_text("1")
    (fake_slurm / "job").write_text(line.replace("JobState=RUNNING", "JobState=PREEMPTED"))
    (fake_slurm / "job.1").write_text(line)
    (fake_slurm / "job.2").write_text(line)
    said = requeue.settle_term("123", may_requeue=why != "other rank")
    assert said == "SLURM ended job 123 (PREEMPTED): stopping"
    made = calls(fake_slurm)
    assert made.count("requeue 123") == (1 if why == "requeue refused" else 0), made
    assert made.count("show job -o 123") == 3, made
    told = capsys.readouterr().err
    if why == "other rank":
        assert told == ""  # rank 0 speaks for the job
    else:
        reason = {
            "not requeueable": "the job is not requeueable (--requeue)",
            "cancel mode": "its partition's PreemptMode is not REQUEUE",
            "max_requeues": "it has restarted 2 times (max_requeues=2)",
            "requeue refused": "scontrol requeue failed: scontrol: error: Requested operation",
        }[why]
        assert told.startswith(
            "stopped by SIGTERM after saving the run's state: SLURM job 123 was preempted with "
            "a grace time (until "
        ), told
        assert f"not requeued by the job ({reason}" in told, told


def test_the_wait_ends_on_slurms_next_signal(fake_slurm, monkeypatch):
    """SLURM acts at the end of the grace time with CONT + TERM: the wait ends on that signal
    (the state is not read again after the first look: SLURM_POLL_S is long here)."""
    from pipeline.runtime import preemption, requeue

    monkeypatch.setattr(requeue, "SLURM_POLL_S", 60.0)
    monkeypatch.setattr(preemption, "_owner_pid", os.getpid())
    (fake_slurm / "job").write_text(job_line(requeue=0))
    previous = signal.signal(signal.SIGTERM, preemption._on_signal)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    started = time.monotonic()
    try:
        timer.start()
        said = requeue.settle_term("123", may_requeue=True)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert said == "SLURM acted on job 123 (SIGTERM): stopping"
    assert 0.3 <= time.monotonic() - started < 5
    assert not preemption._waiting_for_slurm


def test_the_wait_gives_up_after_the_grace_time(fake_slurm, monkeypatch):
    """A SLURM that never acts (its controller gone): the job stops SLURM_LATE_S after the end
    of its grace time instead of hanging."""
    from pipeline.runtime import requeue

    (fake_slurm / "job").write_text(job_line(requeue=0, end_in=-1))
    monkeypatch.setattr(requeue, "SLURM_LATE_S", 1.0)
    said = requeue.settle_term("123", may_requeue=True)
    assert said == "SLURM did not act on job 123 by the end of its grace time: stopping"
