"""What follows a stop by a signal: requeue the job where that is ours to do, or make SLURM's
decision stand (the signals themselves: runtime/preemption.py).

- USR2 (or USR1), `--signal=USR2@N`: the time limit is N s away. The job requeues itself:
  through submitit's handler when submitit started it (it counts time limits against
  `max_num_timeout`), else with `scontrol requeue` by global rank 0, at most `max_requeues`
  times (SLURM_RESTART_COUNT); outside SLURM the user re-runs the command;
- TERM: SLURM decides what follows (it requeues a preempted or requeued job, a cancelled one
  stays cancelled), and the job makes that decision stand: it saves, then asks SLURM
  (`scontrol show job`). Where SLURM has decided already (the job is no longer RUNNING: a
  cancel, a requeue, the time limit, a preemption without a grace time) it stops and exits
  non-zero, within SLURM's KillWait. Where the job was selected for preemption with a grace
  time (the partition's GraceTime: the job is still RUNNING, with a PreemptTime), ending now
  would end the job for good, FAILED and not requeued: global rank 0 requeues it
  (`scontrol requeue`) where the partition's PreemptMode is REQUEUE, the job is requeueable and
  it has restarted fewer than `max_requeues` times; otherwise every rank waits until SLURM acts
  at the end of the grace time (requeue, or cancel), that is until its next signal. submitit
  does the same in its own way: it ignores TERM and lets SLURM end the job.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from pipeline.runtime import preemption
from pipeline.runtime.preemption import (
    INTERRUPTED_EXIT,
    PREEMPTED_EXIT,
    REQUEUE_SIGNALS,
    STOPPED_EXIT,
)


def requeued_job() -> bool:
    """True in a SLURM job that was requeued (it must resume, even with overwrite=true)."""
    return restart_count() > 0


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def _submitit_handler(signum: int) -> Any:
    """submitit's requeue handler for this signal, if submitit installed one."""
    handler = preemption.previous_handler(signum)
    owner = getattr(handler, "__self__", None)
    if callable(handler) and type(owner).__module__.startswith("submitit"):
        return handler
    return None


def after_stop(signum: int) -> str:
    """What follows a stop by `signum` (global rank 0, or the process that started the ranks):
    requeue the job where that is ours to do; returns what was done, for the log.

    Under submitit, a time-limit signal goes to submitit's handler, which requeues the job and
    exits this process (or, after max_num_timeout time limits, ends it)."""
    job = slurm_job_id()
    if signum not in REQUEUE_SIGNALS:
        if job and signum == signal.SIGTERM:
            return settle_term(job, may_requeue=True)
        return "re-run the same command to resume"
    handler = _submitit_handler(signum)
    if handler is not None:
        _say(signum, "submitit requeues the job (a time limit counts against max_num_timeout)")
        handler(signum, None)  # requeues and exits; returns on ranks other than 0
        return "submitit's handler decided"
    if job and re.fullmatch(r"[0-9_]+", job):
        restarts, limit = restart_count(), preemption.max_requeues()
        if restarts >= limit:
            return (
                f"not requeued: SLURM job {job} has restarted {restarts} times "
                f"(max_requeues={limit}); submit it again to resume"
            )
        problem = _requeue(job)
        if problem is None:
            return f"requeued SLURM job {job} (restart {restarts + 1} of at most {limit})"
        return f"could not requeue SLURM job {job} ({problem}); submit it again to resume"
    return "re-run the same command to resume"


def _requeue(job: str) -> str | None:
    """`scontrol requeue JOB`: None when SLURM took it, else what went wrong."""
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60, capture_output=True)
    except subprocess.CalledProcessError as e:
        said = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        return said[-1] if said else f"scontrol exited with {e.returncode}"
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return None


# --- TERM in a SLURM job: make SLURM's decision stand (module docstring) ------------------------

# While waiting for SLURM to act on a job preempted with a grace time: how often its state is
# read (SLURM signals the job when it acts; the poll is only a safety net), and how long after
# the job's new end time (the grace time's end) the wait gives up. SLURM checks grace times on
# its own timer (every 30 s on 22.05), so it acts up to that long after the end time, and its
# KillWait follows.
SLURM_POLL_S = 10.0
SLURM_LATE_S = 120.0


def job_fields(job: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as {field: value}; empty when scontrol did not answer."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if proc.returncode != 0 or not proc.stdout.strip():
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout.splitlines()[0]))


def partition_requeues(partition: str) -> bool:
    """Whether preemption on this partition requeues its jobs (PreemptMode REQUEUE), as far as
    `scontrol show partition` says; False when it does not say (then SLURM decides)."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "partition", "-o", partition],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    mode = re.search(r"\bPreemptMode=(\S+)", proc.stdout)
    return bool(mode) and "REQUEUE" in mode.group(1).upper().split(",")


def preempted_with_grace(fields: dict[str, str]) -> bool:
    """The job was selected for preemption and runs out its grace time: still RUNNING, with a
    PreemptTime. (Once SLURM has acted the state is PREEMPTED, REQUEUED, COMPLETING, ...)"""
    running = fields.get("JobState") == "RUNNING"
    return running and fields.get("PreemptTime", "None") not in ("None", "Unknown", "")


def _end_time(fields: dict[str, str]) -> float | None:
    """The job's EndTime (the end of its grace time) as a Unix time, None if unknown."""
    try:
        return datetime.datetime.fromisoformat(fields.get("EndTime", "")).timestamp()
    except ValueError:
        return None


def settle_term(job: str, may_requeue: bool) -> str:
    """After TERM in SLURM job `job`, once the run is saved: make SLURM's decision stand, and
    return what happened, for the log. `may_requeue`: this process acts for the job (global
    rank 0); the other ranks only wait."""
    fields = job_fields(job)
    if not fields:
        return f"SLURM job {job}: scontrol did not answer; SLURM decides what follows"
    if not preempted_with_grace(fields):
        if fields.get("JobState") == "RUNNING":  # a TERM that is not SLURM's (a kill)
            return "re-run the same command, or requeue the job, to resume"
        return (
            f"SLURM job {job} is requeued by SLURM if it was preempted or requeued, and "
            "resumes then; a cancelled job stays cancelled"
        )
    restarts = int(fields.get("Restarts", "0") or 0)
    why_not = None
    if not may_requeue:
        why_not = "rank 0 acts for the job"
    elif fields.get("Requeue") != "1":
        why_not = "the job is not requeueable (--requeue)"
    elif not partition_requeues(fields.get("Partition", "")):
        why_not = "its partition's PreemptMode is not REQUEUE"
    elif restarts >= preemption.max_requeues():
        why_not = f"it has restarted {restarts} times (max_requeues={preemption.max_requeues()})"
    if why_not is None:
        problem = _requeue(job)
        if problem is None:
            return (
                f"SLURM job {job} was preempted with a grace time: requeued it (restart "
                f"{restarts + 1}); it resumes from the saved state"
            )
        why_not = f"scontrol requeue failed: {problem}"
    if may_requeue:
        _say(
            signal.SIGTERM,
            f"SLURM job {job} was preempted with a grace time (until "
            f"{fields.get('EndTime', '?')}); not requeued by the job ({why_not}): waiting for "
            "SLURM to end it, then SLURM requeues or cancels it",
        )
    return wait_for_slurm(job, _end_time(fields))


def wait_for_slurm(job: str, end_time: float | None) -> str:
    """Wait, doing nothing, until SLURM acts on the job: a signal comes, or its state leaves
    RUNNING; given up SLURM_LATE_S after end_time (so that a job never hangs)."""
    deadline = (end_time or time.time()) + SLURM_LATE_S
    seen = preemption.received()
    polled = time.monotonic()
    with preemption.waiting_for_slurm():
        while preemption.received() == seen:
            if time.time() > deadline:
                return f"SLURM did not act on job {job} by the end of its grace time: stopping"
            if time.monotonic() - polled >= SLURM_POLL_S:
                polled = time.monotonic()
                fields = job_fields(job)
                if fields and fields.get("JobState") != "RUNNING":
                    return f"SLURM ended job {job} ({fields.get('JobState')}): stopping"
            time.sleep(0.2)
    return f"SLURM acted on job {job} ({signal.Signals(preemption.pending()).name}): stopping"


def _say(signum: int, outcome: str) -> None:
    print(
        f"stopped by {signal.Signals(signum).name} after saving the run's state: {outcome}",
        file=sys.stderr,
        flush=True,
    )


def stopped(signum: int, started_rank: bool, is_rank_zero: bool) -> int:
    """After Preempted reached the entry point: act for the job (rank 0) and return the exit
    code."""
    preemption.record_stop(signum)
    if started_rank:
        return PREEMPTED_EXIT  # the launcher that started this rank acts for the job
    if is_rank_zero:
        outcome = after_stop(signum)
        if outcome != "submitit's handler decided":
            _say(signum, outcome)
    elif signum == signal.SIGTERM and slurm_job_id():
        # Another task of the job: ending now, within a grace time, would fail the job step
        # (srun --kill-on-bad-exit); it waits for SLURM as rank 0 does.
        settle_term(slurm_job_id() or "", may_requeue=False)
    return INTERRUPTED_EXIT if signum == signal.SIGINT else STOPPED_EXIT
