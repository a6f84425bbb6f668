"""Stopping when the cluster asks: save last.ckpt, requeue the job, resume when it restarts.

SLURM warns a job before its time limit, or before a preemption, with a signal
(`--signal=USR2@120`); submitit asks for USR2 and its handler requeues the job. The pipeline
takes USR1 and USR2 alike:
- during training, every rank learns of it at the next step (one one-element all-reduce), all
  ranks save `checkpoints/last.ckpt` together and stop;
- outside training (short evaluation and labelling passes) the job stops at once: artifacts are
  written atomically, so nothing half-written is left.
Then global rank 0 requeues the job: through submitit's handler when submitit started it (it
counts time limits against max_num_timeout), else with `scontrol requeue` under SLURM, else the
user re-runs the command. The restarted job resumes from its artifacts and last.ckpt.
Lightning's own SLURM auto-requeue (USR1, hpc_ckpt files) is switched off (see
launch.lightning_settings) so that the two never fight.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger("pipeline")

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# Exit code of a rank started by runtime.launch that stopped on a signal after saving: its
# launcher then requeues the job (or tells the user to re-run it).
PREEMPTED_EXIT = 3

_requested: list[int] = []  # the signal received while training, if any
_fitting = False
_previous: dict[int, Any] = {}  # the handlers found before ours (submitit's), by signal


class Preempted(Exception):
    """Raised on every rank to stop the stage after a requeue signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def install() -> None:
    """Take USR1 and USR2 in this process, keeping the handler found there (submitit's) to
    requeue with. Main thread only (Python's rule for signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if current is not _on_signal:
            _previous[signum] = current
            signal.signal(signum, _on_signal)


def _on_signal(signum: int, _frame: Any) -> None:
    who = f"rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0))}"
    name = signal.Signals(signum).name
    if _fitting:
        log.warning(
            "%s got %s: saving last.ckpt at the next training step, then stopping", who, name
        )
        _requested.append(signum)
        return
    log.warning("%s got %s outside training: stopping now (finished artifacts are kept)", who, name)
    raise Preempted(signum)


class CheckpointOnSignal(L.Callback):
    """During fit: once any rank got a requeue signal, all ranks save `path` and stop."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        global _fitting
        _fitting = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        global _fitting
        _fitting = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exc: Any) -> None:
        global _fitting
        _fitting = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        trainer.save_checkpoint(self.path)  # collective: rank 0 writes, all meet at a barrier
        if trainer.is_global_zero:
            log.warning("saved %s at step %d", self.path, trainer.global_step)
        global _fitting
        _fitting = False
        raise Preempted(signum)

    @staticmethod
    def _agreed_signal(trainer: L.Trainer) -> int:
        """The signal any rank received (0: none). Ranks may get it a step apart, so they agree
        on it every step; the same kind of one-element collective Lightning does for SIGTERM."""
        mine = _requested[-1] if _requested else 0
        if trainer.world_size <= 1:
            return mine
        flag = torch.tensor([mine], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def requeued_job() -> bool:
    """True in a SLURM job that was requeued (it must resume, even with overwrite=true)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(signum: int, previous: Any = None) -> str:
    """Put this job back in the queue (global rank 0 only); returns what was done, for the log.

    `previous` is the handler that was installed before ours: submitit's requeues the job and
    exits this process (it counts time limits against max_num_timeout)."""
    previous = previous if previous is not None else _previous.get(signum)
    if callable(previous):
        previous(signum, None)  # submitit: requeue and sys.exit (rank 0); returns elsewhere
        return "handed over to the job's own handler"
    job = slurm_job_id()
    if job and re.fullmatch(r"[0-9_]+", job):
        try:
            subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
            return f"requeued SLURM job {job}"
        except (OSError, subprocess.SubprocessError) as e:
            return f"could not requeue SLURM job {job} ({e}); re-submit it to resume"
    return "re-run the same command to resume"


def stopped(signum: int, started_rank: bool, is_rank_zero: bool) -> int:
    """After Preempted reached the entry point: requeue (rank 0) and return the exit code."""
    if started_rank:
        return PREEMPTED_EXIT  # the launcher that started this rank requeues
    if not is_rank_zero:
        return 1
    outcome = requeue(signum)
    print(
        f"stopped by {signal.Signals(signum).name} after saving the run's state: {outcome}",
        file=sys.stderr,
        flush=True,
    )
    return 1
