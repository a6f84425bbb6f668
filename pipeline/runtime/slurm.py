"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, made to be trusted.

What it adds to `hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher`:
- before submitting, it checks that SLURM accounting answers (`sacct`): submitit follows its
  jobs with sacct, and without it a cancelled job would leave the sweep waiting forever;
- an sbatch that refuses the jobs (a GPU request on a partition without GPUs, too many CPUs)
  is one `error:` line saying what to change, exit 2, not a traceback;
- in the job, it takes TERM, USR1 and USR2 at once (runtime/preemption.py; submitit only logs
  TERM), and a job that fails ends with a non-zero exit code, so that SLURM records it FAILED
  (`sacct`, `--dependency=afterok`); submitit records its error for the sweep;
- the sweep waits for every job, then names each one that failed or ended without a result
  (cancelled, timed out), with its reason and log, and exits 1.
`gpus_per_node` follows the trainer (conf/hydra/launcher/slurm.yaml): `trainer.devices` GPUs
when `trainer.accelerator` is gpu or cuda (or auto on a partition with GPUs), none otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as SubmititSlurmLauncher,
)

# A job that has left the queue without a result is given up after this long (a result file
# can lag behind on a network file system).
GONE_AFTER_S = 120.0
QUEUE_POLL_S = 30.0
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "DEADLINE"}


def gpus_per_node(accelerator: Any, devices: Any, partition: Any = None) -> int | None:
    """hydra.launcher.gpus_per_node from the trainer: trainer.devices GPUs for gpu / cuda, and
    for auto when the partition has GPUs (sinfo); none otherwise (a CPU partition refuses any
    GPU request)."""
    accelerator = str(accelerator or "auto").lower()
    if accelerator not in ("gpu", "cuda", "auto"):
        return None
    if accelerator == "auto" and not partition_has_gpus(partition):
        return None
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    if isinstance(devices, (list, tuple)) or (
        hasattr(devices, "__len__") and not isinstance(devices, str)
    ):
        return len(devices)
    return None


def partition_has_gpus(partition: Any = None) -> bool:
    """Whether any node of the partition (default: SBATCH_PARTITION, else SLURM's default
    partition) offers GPUs as a generic resource."""
    partition = partition or os.environ.get("SBATCH_PARTITION")
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return False
    for line in proc.stdout.splitlines():
        name, _, gres = line.partition("|")
        default = name.endswith("*")
        ours = name.rstrip("*") == partition if partition else default
        if ours and "gpu" in gres:
            return True
    return False


def accounting_problem() -> str | None:
    """None when sacct answers; else what it said."""
    try:
        proc = subprocess.run(
            ["sacct", "-n", "-X", "-j", "1", "-o", "JobID"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except FileNotFoundError:
        return "sacct is not installed"
    except (OSError, subprocess.SubprocessError) as e:
        return f"sacct did not answer ({e})"
    if proc.returncode == 0:
        return None
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"sacct exited with {proc.returncode}"


def stop(message: str) -> None:
    """Bad input found by the launcher: the one-line contract of exit code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


HINTS = (
    (
        r"generic resource|gres",
        "the partition has no GPUs: pass trainer.accelerator=cpu (hydra.launcher.gpus_per_node "
        "follows it), or hydra.launcher.gpus_per_node=null",
    ),
    (
        r"partition",
        "pass hydra.launcher.partition=NAME (sinfo lists them) or export SBATCH_PARTITION",
    ),
    (r"account", "pass hydra.launcher.account=NAME or export SBATCH_ACCOUNT"),
    (
        r"processors|CPU|node configuration is not available|memory",
        "ask for less: hydra.launcher.cpus_per_task=, hydra.launcher.mem_gb=, trainer.devices= "
        "(tasks per node) or trainer.num_nodes= (sinfo -N -l shows what the nodes have)",
    ),
    (r"time limit", "pass a shorter hydra.launcher.timeout_min= (minutes)"),
)


def sbatch_refusal(text: str) -> str:
    """sbatch's error as one line, with what to change."""
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()] or [
        ln.strip() for ln in text.splitlines() if ln.strip()
    ]
    said = lines[-1] if lines else "no message"
    said = re.sub(r"^sbatch: error: ", "", said)
    hint = next((h for pattern, h in HINTS if re.search(pattern, said, re.I)), None)
    hint = hint or "check the hydra.launcher.* settings (--cfg hydra -p hydra.launcher shows them)"
    return f"sbatch refused the sweep's jobs: {said}; {hint}"


def queued_job_ids() -> set[str] | None:
    """The ids of this user's jobs in the queue (array tasks one by one); None if squeue did not
    answer."""
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return {line.strip() for line in proc.stdout.splitlines() if line.strip()}


def error_line(log: Path) -> str | None:
    """The job's own `error: ...` line (or the last line of its traceback) from its log."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    errors = [ln.strip() for ln in text.splitlines() if ln.startswith("error: ")]
    if errors:
        return errors[-1]
    raised = [
        ln.strip() for ln in text.splitlines() if re.match(r"^\w+(\.\w+)*(Error|Exception)\b", ln)
    ]
    return raised[-1] if raised else None


class SlurmLauncher(SubmititSlurmLauncher):
    """hydra/launcher=slurm (see the module docstring)."""

    # --- in the job -------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        from pipeline.runtime import preemption

        preemption.install()  # TERM / USR1 / USR2 from now on stop the job cleanly
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED:
            # Raised, submitit records the error for the sweep and the task exits non-zero:
            # SLURM records the job FAILED.
            raise ret._return_value
        return ret

    # --- in the sweep -----------------------------------------------------------------------

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        import submitit
        from hydra.core.singleton import Singleton

        assert self.config is not None
        problem = accounting_problem()
        if problem:
            stop(
                f"hydra/launcher=slurm follows its jobs with SLURM's accounting, and sacct does "
                f"not answer ({problem}); enable accounting (slurmdbd), or run each job with "
                "sbatch (scripts/sbatch_example.sh)"
            )
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=params.pop("submitit_folder"),
            slurm_max_num_timeout=params.pop("max_num_timeout"),
        )
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        base = {f.name for f in dataclasses.fields(BaseQueueConf)}
        executor.update_parameters(
            **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_params = [
            (
                list(overrides),
                "hydra.sweep.dir",
                initial_job_idx + i,
                f"job_id_for_{i}",
                Singleton.get_state(),
            )
            for i, overrides in enumerate(job_overrides)
        ]
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):  # submitit prints sbatch's stderr
                jobs = executor.map_array(self, *zip(*job_params, strict=True))
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
            stop(sbatch_refusal(f"{said.getvalue()}\n{e}"))
        for job, overrides in zip(jobs, job_overrides, strict=True):
            shown = " ".join(filter_overrides(overrides)) or "(no overrides)"
            print(f"submitted SLURM job {job.job_id}: {shown}", file=sys.stdout, flush=True)
        given_up = wait(jobs)
        returns, failures = [], []
        for job, overrides in zip(jobs, job_overrides, strict=True):
            if job.job_id in given_up:
                failures.append(failure(job, overrides, "left the queue without a result"))
                continue
            try:
                returns.append(job.results()[0])
            except Exception as e:  # the job failed, or ended without a result
                failures.append(failure(job, overrides, str(e)))
        if failures:
            for line in failures:
                print(line, file=sys.stderr, flush=True)
            print(
                f"{len(failures)} of {len(jobs)} SLURM jobs of the sweep did not finish "
                f"(sweep dir {sweep_dir}); finished jobs are kept: the same command runs "
                "only the others again",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
        return returns


def wait(jobs: list[Any]) -> set[str]:
    """Until every job has a result or has ended; returns the ids of jobs given up. submitit
    asks sacct (less and less often); a job that has left the queue without a result for
    GONE_AFTER_S is given up too, so that an accounting that stopped answering cannot keep the
    sweep waiting forever."""
    gone: dict[str, float] = {}
    checked = time.monotonic()
    while True:
        pending = [j for j in jobs if not j.done()]
        now = time.monotonic()
        if not pending or all(now - gone.get(j.job_id, now) > GONE_AFTER_S for j in pending):
            return {j.job_id for j in pending}
        if now - checked > QUEUE_POLL_S:
            checked = now
            queued = queued_job_ids()
            for job in pending:
                if queued is None or job.job_id in queued or job.paths.result_pickle.exists():
                    gone.pop(job.job_id, None)
                else:
                    gone.setdefault(job.job_id, now)
        time.sleep(1)


def failure(job: Any, overrides: Sequence[str], problem: str) -> str:
    """One line naming a job that failed or ended without a result, why, and its log."""
    shown = " ".join(filter_overrides(overrides)) or "(no overrides)"
    log = Path(job.paths.stderr)
    reason = error_line(log)
    state = ""
    with contextlib.suppress(Exception):
        state = job.watcher.get_state(job.job_id, mode="force")
    state = state.split()[0] if state else ""
    state = state if state in ENDED else ""  # a failed job may still be finishing
    if "has not produced any output" in problem or "without a result" in problem:
        what = f"ended {state} without a result" if state else "ended without a result"
        if reason:
            what += f" ({reason})"
    else:
        what = f"failed ({state})" if state else "failed"
        what += f": {reason}" if reason else ""
    return f"SLURM job {job.job_id} [{shown}] {what}; log: {log}"
