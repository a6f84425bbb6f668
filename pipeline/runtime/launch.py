"""Starting a job's DDP ranks ourselves, one fresh process group per job.

Lightning's own DDP launcher re-executes the Hydra script in every rank, and under `-m` each rank
then re-runs the whole sweep. Instead, the Hydra job resolves its config once, writes it to a
temporary file and starts one `python -m pipeline.rank FILE` process per device with the same
environment torchrun sets; Lightning sees an externally launched world and starts nothing.
Under srun (SLURM tasks) or torchrun the processes already exist and nothing is started here.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

log = logging.getLogger("pipeline")


def externally_launched() -> bool:
    """True inside torchrun / our own ranks, or a SLURM job step with several tasks."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


# Strategies that run one process per device. Lightning would start those processes itself by
# re-executing the command (and so re-run a whole -m sweep in every rank): we start them instead.
MULTI_PROCESS = ("ddp", "fsdp", "deepspeed")
# Lightning's start methods that spawn or fork from inside the Trainer: with ranks started from
# outside they are plain "ddp" (Lightning would otherwise spawn again in every rank).
SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")
_warned_switch: list[str] = []  # the switch is logged once per process


def device_count(trainer_cfg: Any) -> int:
    """trainer.devices as a number of processes per node."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if devices in (-1, "auto"):
        import torch

        if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.cuda.device_count()
        if "ddp" in str(trainer_cfg.get("strategy", "auto")):
            raise UserError(
                "trainer.devices=auto with ddp on CPU: give a number, e.g. trainer.devices=2"
            )
        return 1
    if isinstance(devices, str) and "," in devices:  # "0,1": device ids
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, Sequence):  # device ids (a list; str is handled above)
        return len(devices)
    return int(devices)


def lightning_strategy(trainer_cfg: Any) -> str:
    """The strategy name the Trainer gets. A spawning variant becomes plain ddp because the
    ranks exist already; the switch is logged, never silent."""
    strategy = str(trainer_cfg.get("strategy", "auto"))
    for name in SPAWNING:
        if strategy.startswith(name):
            replaced = "ddp" + strategy[len(name) :]
            if not _warned_switch:
                _warned_switch.append(strategy)
                log.warning(
                    "trainer.strategy=%s: running it as %s, one process per device started by "
                    "the pipeline (or srun / torchrun), so that no rank re-runs the command",
                    strategy,
                    replaced,
                )
            return replaced
    return strategy


def ranks_to_start(trainer_cfg: Any) -> int:
    """How many rank processes this job must start itself (0: run in this process)."""
    if externally_launched():
        return 0
    strategy = lightning_strategy(trainer_cfg)
    if strategy != "auto" and not strategy.startswith(MULTI_PROCESS):
        return 0
    n = device_count(trainer_cfg)
    if int(trainer_cfg.get("num_nodes", 1)) > 1:
        raise UserError(
            "trainer.num_nodes > 1 needs one process per device started by srun or torchrun "
            "(see docs/cluster.md, or use hydra/launcher=slurm)"
        )
    if n > 1 and int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        raise UserError(
            "hydra/launcher=submitit_local with tasks_per_node > 1: keep "
            "hydra.launcher.tasks_per_node=1, the job starts its trainer.devices ranks itself"
        )
    if n > 1 and strategy == "auto":
        log.info("trainer.strategy=auto with %d devices: running DDP (strategy ddp)", n)
    return n if n > 1 else 0


def lightning_settings(trainer_cfg: Any) -> dict[str, Any]:
    """Strategy and cluster plugins for the Lightning Trainer in this process.

    Under SLURM tasks (srun, submitit) Lightning would pick SLURMEnvironment with auto-requeue
    on USR1; the pipeline handles the requeue signal itself (runtime.preemption), so Lightning
    gets SLURMEnvironment(auto_requeue=False). Inside torchrun or the pipeline's own ranks
    Lightning picks TorchElasticEnvironment, which never requeues.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    strategy: Any = lightning_strategy(trainer_cfg)
    if strategy == "ddp" and trainer_cfg.get("accelerator") == "cpu":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    plugins: list[Any] = []
    if SLURMEnvironment.detect() and not TorchElasticEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return {"strategy": strategy, "plugins": plugins}


def available_cpus() -> int:
    """The CPUs this job may use: SLURM's share for a task (SLURM_CPUS_PER_TASK, which a node
    does not always enforce), else the cores this process may run on."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_threads_per_rank(n: int) -> int:
    """This job's CPUs divided among n ranks, at least 1: n ranks each using every core would
    oversubscribe the CPU."""
    return max(1, available_cpus() // n)


def torch_threads(trainer_cfg: Any) -> int | None:
    """The intra-op threads this process should use (None: leave torch's choice): the
    configured trainer.num_threads, else SLURM_CPUS_PER_TASK in a SLURM job unless
    OMP_NUM_THREADS says otherwise (torch reads that itself; the ranks this job starts get it)."""
    threads = trainer_cfg.get("num_threads")
    if threads:
        return int(threads)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if "OMP_NUM_THREADS" not in os.environ and slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# After a signal, how long the ranks get to save last.ckpt and stop before they are stopped;
# SLURM's KillWait (30 s by default) may end them sooner.
PREEMPT_GRACE_S = 60.0


def start_ranks(config_text: str, num_threads: int | None, n: int) -> int:
    """Run the job in `n` rank processes, each reading its resolved config from `config_text`
    (YAML, what the entry point wrote), with `num_threads` CPU threads (trainer.num_threads;
    None: the cores divided among the ranks); return the job's exit code (2 if any rank said
    the input is bad, 1 if any failed otherwise). If one rank fails the others are stopped.

    USR1, USR2 and TERM are passed to the ranks, which save last.ckpt and stop; then this
    process raises Preempted and the entry point acts for the job (runtime.preemption)."""
    from pipeline.runtime import preemption

    tmp = Path(tempfile.mkdtemp(prefix="pipeline-ranks-"))
    path = tmp / "config.yaml"
    path.write_text(config_text, encoding="utf-8")
    port = free_port()
    threads = str(num_threads or cpu_threads_per_rank(n))
    procs = []
    for r in range(n):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(n),
            RANK=str(r),
            LOCAL_RANK=str(r),
            LOCAL_WORLD_SIZE=str(n),
            GROUP_RANK="0",
            NODE_RANK="0",
            TORCHELASTIC_RUN_ID=f"pipeline-{port}",
        )
        env.setdefault("OMP_NUM_THREADS", threads)  # as torchrun does; the user's value wins
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.rank", str(path)], env=env))

    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if signum in preemption.SIGNALS:
            received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {
        s: signal.signal(s, forward)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    }
    try:
        codes = wait_for_ranks(procs, received)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        shutil.rmtree(tmp, ignore_errors=True)
    if all(c == 0 for c in codes):
        if received:  # it came as the job finished: the work is done, no further job starts
            preemption.note(received[-1])
        return 0
    if received and all(c in (0, preemption.PREEMPTED_EXIT) or c < 0 for c in codes):
        # Saved and stopped (or stopped after the grace time: the last saved last.ckpt stays).
        raise preemption.Preempted(received[-1])
    return 2 if 2 in codes else 1


def wait_for_ranks(procs: list[subprocess.Popen], received: list[int]) -> list[int]:
    """Wait for every rank. When one fails, give the others 2 s to report, then stop them; after
    a requeue signal give them PREEMPT_GRACE_S to save and stop."""
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return [int(c) for c in codes]
        if deadline is None and received:
            deadline = time.monotonic() + PREEMPT_GRACE_S
        if deadline is None and any(c not in (None, 0) for c in codes):
            deadline = time.monotonic() + 2
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            return [int(p.returncode) for p in procs]
        time.sleep(0.1)
