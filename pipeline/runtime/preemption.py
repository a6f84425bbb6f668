"""Stopping when the cluster asks: save last.ckpt, stop cleanly, resume when the job restarts.

Which signal means what (measured on SLURM 22.05, tests/test_slurm.py):
- USR2 (or USR1), `--signal=USR2@N`: the time limit is N s away. The job saves and requeues
  itself: through submitit's handler when submitit started it (it counts time limits against
  `max_num_timeout`), else with `scontrol requeue` by global rank 0, at most `max_requeues`
  times (SLURM_RESTART_COUNT); outside SLURM the user re-runs the command;
- TERM: preemption, `scontrol requeue`, `scancel`, the time limit itself (and `kill`). SLURM
  decides what follows (it requeues a preempted or requeued job, a cancelled one stays
  cancelled), and the job makes that decision stand: it saves, then asks SLURM
  (`scontrol show job`). Where SLURM has decided already (the job is no longer RUNNING: a
  cancel, a requeue, the time limit, a preemption without a grace time) it stops and exits
  non-zero, within SLURM's KillWait. Where the job was selected for preemption with a grace
  time (the partition's GraceTime: the job is still RUNNING, with a PreemptTime), ending now
  would end the job for good, FAILED and not requeued: global rank 0 requeues it
  (`scontrol requeue`) where the partition's PreemptMode is REQUEUE, the job is requeueable and
  it has restarted fewer than `max_requeues` times; otherwise every rank waits until SLURM acts
  at the end of the grace time (requeue, or cancel), that is until its next signal. submitit
  does the same in its own way: it ignores TERM and lets SLURM end the job. A TERM that is not
  SLURM's (a `kill` inside a running job) stops the job at once, as outside SLURM;
- INT (Ctrl-C): as TERM, with exit code 130 (the shell's code for it). A second Ctrl-C before
  the job has stopped stops it at once, without saving (the last saved state is kept).

Whatever the signal, the stage stops cleanly wherever it is:
- while Lightning runs (training, evaluation, labelling) the signal is only recorded; every
  rank learns of it at the next batch (one one-element all-reduce during training), training
  saves `checkpoints/last.ckpt` and the stage stops; a signal that came too late for a batch
  stops the stage when Lightning returns (training saves at its end first);
- anywhere else in a stage the job stops at once: artifacts are written atomically, so nothing
  half-written is left;
- outside a stage (the job finished, or has not begun) the signal is kept: a sweep running in
  this process stops before its next job.
The Lightning side (engine/trainer.py) records signals during fit / test / predict, saves and
stops at the next batch; Lightning's own signal handling is switched off: its SIGTERM handler ends
training at the next step without saving, with exit code 0; its SLURM auto-requeue (USR1,
hpc_ckpt files) would fight ours. DataLoader worker processes ignore the signals (the main
process stops them).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("pipeline")

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# "The time limit is near": the job requeues itself. TERM comes when SLURM itself has decided
# (preemption, scontrol requeue, scancel, the limit reached): the job only saves and stops.
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# Exit code of a rank started by runtime.launch that stopped on a signal after saving: its
# launcher then acts for the job.
PREEMPTED_EXIT = 3
# Exit code of a job stopped by a signal (docs/design.md); by Ctrl-C, the shell's 128 + SIGINT.
STOPPED_EXIT = 1
INTERRUPTED_EXIT = 128 + signal.SIGINT
DEFAULT_MAX_REQUEUES = 20

_requested: list[int] = []  # signals received and not acted upon yet
_deferring = 0  # > 0 while Lightning runs: act at its next batch, or when it returns
_armed = False  # a stage runs: outside Lightning a signal stops it at once
_owner_pid: int | None = None  # the process that installed the handlers (not a forked worker)
_previous: dict[int, Any] = {}  # the handlers found before ours (submitit's), by signal
_max_requeues = DEFAULT_MAX_REQUEUES
_stopped_by: list[int] = []  # the signal that stopped a job of this process
_interrupts = 0  # Ctrl-Cs received: the second one stops at once
_started_rank = False  # a rank started by runtime.launch (its launcher acts for the job)
_waiting_for_slurm = False  # saved after TERM, waiting for SLURM to end the job


class Preempted(BaseException):
    """Raised on every rank to stop the stage after a signal. A BaseException, like
    KeyboardInterrupt: a request to stop, never caught by the `except Exception` of a library
    (Hydra would record a failed job, submitit a result)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def install(max_requeues: int | None = None, started_rank: bool = False) -> None:
    """Take USR1, USR2, TERM and INT in this process, keeping the handlers found there
    (submitit's) to requeue with. Main thread only (Python's rule for signal handlers).

    `started_rank`: a rank started by runtime.launch leaves the terminal's process group, so
    that a Ctrl-C reaches it once, forwarded by its launcher (which gets it from the terminal),
    and not twice (from the terminal too), which would read as a second Ctrl-C."""
    global _owner_pid, _max_requeues, _started_rank
    if max_requeues is not None:
        _max_requeues = int(max_requeues)
    if threading.current_thread() is not threading.main_thread():
        return
    if started_rank and not _started_rank:
        _started_rank = True
        with contextlib.suppress(OSError):  # (already a group leader: nothing to leave)
            os.setpgid(0, 0)
    _owner_pid = os.getpid()
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if current is not _on_signal:
            _previous[signum] = current
            signal.signal(signum, _on_signal)


def _who() -> str:
    return f"rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0))}"


def _on_signal(signum: int, _frame: Any) -> None:
    global _interrupts
    if os.getpid() != _owner_pid:
        return  # a forked DataLoader worker: the main process stops the work
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
        _interrupts += 1
        if _interrupts > 1:
            _stop_at_once()
    _requested.append(signum)
    if _waiting_for_slurm:
        log.info("%s got %s: SLURM acts on the job, stopping", _who(), name)
        return
    if _armed and not _deferring:
        log.warning("%s got %s: stopping now (finished artifacts are kept)", _who(), name)
        raise Preempted(signum)
    if _deferring:
        log.warning(
            "%s got %s: stopping at the next batch (training saves last.ckpt)%s",
            _who(),
            name,
            "; Ctrl-C again stops at once, without saving" if signum == signal.SIGINT else "",
        )
    elif _stopped_by:  # SLURM ending a job that has saved and stopped (after its requeue)
        log.info("%s got %s: the job has stopped already", _who(), name)
    else:
        log.warning("%s got %s outside a stage: stopping before the next one", _who(), name)


def _stop_at_once() -> None:
    """A second Ctrl-C: stop now, without saving; what was saved stays (every file is written
    atomically, and a temporary a kill leaves is removed by the next run)."""
    if _who() == "rank 0":
        print(
            "stopped at once by a second SIGINT, without saving: the last saved state is kept; "
            "re-run the same command to resume from it",
            file=sys.stderr,
            flush=True,
        )
    if _started_rank:  # die by the signal itself: the launcher reads that as a stop
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(INTERRUPTED_EXIT)


def pending() -> int:
    """The signal received and not acted upon yet (0: none)."""
    return _requested[-1] if _requested else 0


def raise_if_pending() -> None:
    if _requested:
        raise Preempted(_requested[-1])


@contextlib.contextmanager
def stage() -> Iterator[None]:
    """A stage runs: from here a signal stops it (at once, or at Lightning's next batch); one
    that came before (between two jobs of a sweep) stops it before it begins."""
    global _armed
    raise_if_pending()
    _armed = True
    try:
        yield
    finally:
        _armed = False


def stage_running() -> bool:
    return _armed


@contextlib.contextmanager
def lightning_running() -> Iterator[None]:
    """Around trainer.fit / test / predict: signals are recorded, not raised (an exception
    while Lightning builds its loaders ends in an unrelated RuntimeError); the callbacks stop at
    the next batch; a signal that came too late for them stops the stage when Lightning
    returns."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _armed and not _deferring:
        raise_if_pending()


# --- what happens after the stop ---------------------------------------------------------------


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
    handler = _previous.get(signum)
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
        restarts = restart_count()
        if restarts >= _max_requeues:
            return (
                f"not requeued: SLURM job {job} has restarted {restarts} times "
                f"(max_requeues={_max_requeues}); submit it again to resume"
            )
        problem = _requeue(job)
        if problem is None:
            return f"requeued SLURM job {job} (restart {restarts + 1} of at most {_max_requeues})"
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
    elif restarts >= _max_requeues:
        why_not = f"it has restarted {restarts} times (max_requeues={_max_requeues})"
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
    global _waiting_for_slurm
    deadline = (end_time or time.time()) + SLURM_LATE_S
    seen = len(_requested)
    polled = time.monotonic()
    _waiting_for_slurm = True
    try:
        while len(_requested) == seen:
            if time.time() > deadline:
                return f"SLURM did not act on job {job} by the end of its grace time: stopping"
            if time.monotonic() - polled >= SLURM_POLL_S:
                polled = time.monotonic()
                fields = job_fields(job)
                if fields and fields.get("JobState") != "RUNNING":
                    return f"SLURM ended job {job} ({fields.get('JobState')}): stopping"
            time.sleep(0.2)
    finally:
        _waiting_for_slurm = False
    return f"SLURM acted on job {job} ({signal.Signals(_requested[-1]).name}): stopping"


def _say(signum: int, outcome: str) -> None:
    print(
        f"stopped by {signal.Signals(signum).name} after saving the run's state: {outcome}",
        file=sys.stderr,
        flush=True,
    )


def stopped(signum: int, started_rank: bool, is_rank_zero: bool) -> int:
    """After Preempted reached the entry point: act for the job (rank 0) and return the exit
    code."""
    _requested.clear()
    _stopped_by.append(signum)
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


def stopped_by() -> int:
    """The signal that stopped a job of this process (0: none)."""
    return _stopped_by[-1] if _stopped_by else 0


def note(signum: int) -> None:
    """A signal that came while the job's ranks finished their work: no further job starts."""
    _requested.append(signum)
