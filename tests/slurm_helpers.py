"""Helpers for tests/test_slurm.py: a real SLURM cluster on this machine
(scripts/slurm_cluster.sh), jobs submitted with sbatch, their states read from squeue, scontrol
and sacct. Everything polls with a deadline; nothing sleeps blindly.

Environment:
- PIPELINE_REPO: the checkout whose pipeline the jobs run (default: this one);
- SLURM_TEST_PARTITION / SLURM_TEST_HIGH_PARTITION / SLURM_TEST_GRACE_PARTITION: the partition
  the jobs run in ("low"), the one that preempts it ("high"), and a preemptable one with a
  GraceTime ("lowgrace"), as scripts/slurm/slurm.conf.in defines them;
- CI=true: a cluster that is missing or cannot be started fails the tests instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # this checkout: scripts/, tests/
REPO = Path(os.environ.get("PIPELINE_REPO") or ROOT).resolve()  # the pipeline the jobs run
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
PARTITION = os.environ.get("SLURM_TEST_PARTITION", "low")
HIGH_PARTITION = os.environ.get("SLURM_TEST_HIGH_PARTITION", "high")
GRACE_PARTITION = os.environ.get("SLURM_TEST_GRACE_PARTITION", "lowgrace")
IN_CI = os.environ.get("CI") == "true"

# A job in one of these states has ended for good (PREEMPTED and REQUEUED have not: the job is
# queued again). sacct writes "CANCELLED by 0": the first word is the state.
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
}


def sh(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    details: Callable[[], str] = lambda: "",
    poll: float = 1.0,
):
    """Poll predicate until it returns something truthy (returned); fail after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen in {timeout:.0f} s\n{details()}")
        time.sleep(poll)


# --- the cluster --------------------------------------------------------------------------------


def node_states() -> dict[str, str] | str:
    """{node: state} of the test partition from sinfo, or why sinfo did not answer."""
    try:
        proc = sh(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t"], timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo did not answer ({e})"
    if proc.returncode != 0:
        return f"sinfo did not answer: {(proc.stderr or proc.stdout).strip()}"
    states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    return states or f"sinfo shows no node in partition {PARTITION!r}"


def cluster_problem() -> str | None:
    """None when the cluster answers and every node of the partition is idle; else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (no sinfo/sbatch on PATH)"
    states = node_states()
    if isinstance(states, str):
        return states
    partitions = sh(["sinfo", "-h", "-o", "%P"], timeout=30).stdout.split()
    if GRACE_PARTITION not in (p.rstrip("*") for p in partitions):
        # A cluster started from an older scripts/slurm/slurm.conf.in: `start` rewrites the
        # config and reconfigures it.
        return f"no partition {GRACE_PARTITION!r} (sinfo shows {partitions})"
    busy = {n: s for n, s in states.items() if s != "idle"}
    if busy:
        queue = sh(["squeue"], timeout=30).stdout
        return f"nodes not idle: {busy}\n{queue}"
    return None


def ensure_cluster() -> tuple[str | None, bool]:
    """Make sure the cluster is up: (None, started_by_us) when it is, (why not, False) else.

    A cluster that is installed but not running is started with scripts/slurm_cluster.sh (root
    only). Under CI=true a machine without SLURM gets it installed first (apt-get)."""
    problem = cluster_problem()
    if problem is None:
        return None, False
    if problem.startswith("nodes not idle"):  # jobs of an earlier run: give them time to end
        try:
            wait_until(lambda: cluster_problem() is None, 120, "idle nodes", poll=2)
            return None, False
        except AssertionError:
            return cluster_problem(), False
    hint = f"start it with: sudo bash {CLUSTER_SCRIPT.relative_to(ROOT)} install && sudo bash {CLUSTER_SCRIPT.relative_to(ROOT)} start"
    if os.geteuid() != 0 or not CLUSTER_SCRIPT.exists():
        return f"{problem}; {hint}", False
    steps = ["start"]
    if shutil.which("sinfo") is None:
        if not IN_CI:
            return f"{problem}; {hint}", False
        steps = ["install", "start"]
    for step in steps:
        proc = sh(["bash", str(CLUSTER_SCRIPT), step], timeout=900)
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr)[-3000:]
            return (
                f"{problem}; `slurm_cluster.sh {step}` failed (exit {proc.returncode}):\n{out}",
                False,
            )
    return cluster_problem(), True


def stop_cluster() -> None:
    sh(["bash", str(CLUSTER_SCRIPT), "stop"], timeout=300)


# --- jobs ---------------------------------------------------------------------------------------


def job_env(**extra: str) -> dict[str, str]:
    """The environment for sbatch and for the sweeps that submit jobs (sbatch exports it to the
    job): none of a surrounding job's SLURM_* variables, this Python first on PATH, the pipeline
    from REPO, one intra-op thread.

    MASTER_ADDR=127.0.0.1: the emulated nodes n1 and n2 do not resolve (on a real cluster
    Lightning takes the first node's name)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SUBMITIT_"))
    }
    pythonpath = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=pythonpath,
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
    )
    env.update(extra)
    return env


def pipeline_command(*overrides: str) -> str:
    """`python -m pipeline OVERRIDES` as one shell-quoted line for a batch script."""
    return shlex.join([sys.executable, "-m", "pipeline", *overrides])


@dataclass
class Record:
    job_id: str
    state: str  # first word: "CANCELLED by 0" -> CANCELLED
    exit_code: str
    nodes: str
    raw_state: str

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def sacct_records(job: str, steps: bool = False) -> list[Record]:
    """Every allocation of the job (-D: the runs before each requeue too), oldest first; with
    steps=True, also its steps (JOBID.batch, JOBID.0, ...). Array jobs: one row per task."""
    cmd = ["sacct", "-n", "-P", "-D", "-j", job, "-o", "JobID,State,ExitCode,NodeList"]
    if not steps:
        cmd.insert(1, "-X")
    proc = sh(cmd, timeout=60)
    records = []
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 4:
            records.append(Record(parts[0], parts[1].split()[0], parts[2], parts[3], parts[1]))
    return records


def queue_entry(job: str) -> dict[str, str] | None:
    """The job as squeue shows it ({state, reason, nodes, id}), None when it is not queued."""
    proc = sh(["squeue", "-h", "-j", job, "-o", "%i|%T|%r|%N"], timeout=60)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    jid, state, reason, nodes = proc.stdout.splitlines()[0].split("|")
    return {"id": jid, "state": state, "reason": reason, "nodes": nodes}


def job_fields(job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (empty once the controller has forgotten the job)."""
    proc = sh(["scontrol", "show", "job", "-o", job], timeout=60)
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout.splitlines()[0] if proc.stdout else ""))


def restarts(job: str) -> int:
    return int(job_fields(job).get("Restarts", "0") or 0)


def release(job: str) -> None:
    """A requeued job waits 120 s (SLURM's fixed delay, Reason=BeginTime) before it may start
    again; let it start now."""
    sh(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=60)


@dataclass
class Jobs:
    """What one test submits: all under one job name, cancelled when the test ends."""

    name: str
    workdir: Path
    submitted: list[str] = field(default_factory=list)

    def log(self, job: str) -> Path:
        return self.workdir / f"job-{job}.out"

    def log_text(self, job: str, tail: int = 6000) -> str:
        path = self.log(job)
        return path.read_text(errors="replace")[-tail:] if path.exists() else "(no log)"

    def sbatch(
        self,
        body: str,
        *options: str,
        env: dict[str, str] | None = None,
        script: Path | None = None,
        args: Iterable[str] = (),
        cwd: Path | None = None,
    ) -> str:
        """Submit a batch script (body: the lines after the shebang, or script: a file) with
        the given sbatch options; returns the job id. Output goes to workdir/job-ID.out,
        appended across requeues."""
        if script is None:
            script = self.workdir / f"batch-{len(self.submitted)}.sh"
            script.write_text("#!/bin/bash\n" + body.rstrip() + "\n")
        cmd = [
            "sbatch",
            "--parsable",
            f"--job-name={self.name}",
            f"--output={self.workdir}/job-%j.out",
            "--open-mode=append",
            *options,
            str(script),
            *args,
        ]
        proc = sh(cmd, timeout=60, env=env or job_env(), cwd=cwd or self.workdir)
        assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stderr}"
        job = proc.stdout.strip().split(";")[0]
        self.submitted.append(job)
        return job

    def describe(self, job: str) -> str:
        """What a failed assertion shows: the queue entry, sacct with steps, the log's end."""
        records = "\n".join(
            f"  {r.job_id} {r.raw_state} {r.exit_code} {r.nodes}" for r in sacct_records(job, True)
        )
        return (
            f"squeue: {queue_entry(job)}\nsacct -D:\n{records}\n"
            f"--- {self.log(job)} ---\n{self.log_text(job)}"
        )

    def wait_done(self, job: str, timeout: float = 600, release_requeued: bool = True) -> Record:
        """Wait until the job has ended for good; returns its last sacct record. A requeued job
        waiting for its 120 s delay is released at once (release_requeued)."""

        def done() -> Record | None:
            entry = queue_entry(job)
            if entry is not None:
                if (
                    release_requeued
                    and entry["state"] == "PENDING"
                    and entry["reason"] == "BeginTime"
                ):
                    release(job)
                return None
            records = sacct_records(job)
            return records[-1] if records and records[-1].final else None

        return wait_until(done, timeout, f"job {job} ending", lambda: self.describe(job))

    def wait_running(self, job: str, timeout: float = 300) -> dict[str, str]:
        def running() -> dict[str, str] | None:
            entry = queue_entry(job)
            if entry is None:
                records = sacct_records(job)
                if records and records[-1].final:
                    raise AssertionError(
                        f"job {job} ended before it was seen running\n{self.describe(job)}"
                    )
                return None
            return entry if entry["state"] == "RUNNING" else None

        return wait_until(running, timeout, f"job {job} running", lambda: self.describe(job))

    def wait_requeued(self, job: str, timeout: float = 300) -> None:
        """Wait until the job's run has ended and the job is queued again (not released)."""

        def requeued() -> bool:
            entry = queue_entry(job)
            if entry is None:
                records = sacct_records(job)
                if records and records[-1].final:
                    raise AssertionError(
                        f"job {job} ended ({records[-1].raw_state} {records[-1].exit_code}) "
                        f"instead of being requeued\n{self.describe(job)}"
                    )
                return False
            return entry["state"] == "PENDING" and restarts(job) >= 1

        wait_until(requeued, timeout, f"job {job} requeued", lambda: self.describe(job))

    def cancel_all(self) -> None:
        """Cancel everything the test submitted under its name, and wait until it has left the
        queue (so that the next test starts on idle nodes)."""
        sh(["scancel", f"--name={self.name}"], timeout=60)
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: not sh(["squeue", "-h", f"--name={self.name}"], timeout=60).stdout.strip(),
                120,
                f"jobs named {self.name} leaving the queue",
                poll=2,
            )


def new_jobs(test_name: str, workdir: Path) -> Jobs:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", test_name)[:24].strip("-")
    return Jobs(name=f"pt-{slug}-{uuid.uuid4().hex[:6]}", workdir=workdir)


def read_step(ckpt: Path) -> int:
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
