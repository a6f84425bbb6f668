"""Starting a job's DDP ranks ourselves, one fresh process group per job.

Lightning's own DDP launcher re-executes the Hydra script in every rank, and under `-m` each rank
then re-runs the whole sweep. Instead, the Hydra job resolves its config once, writes it to a
temporary file and starts one `python -m pipeline.rank FILE` process per device with the same
environment torchrun sets; Lightning sees an externally launched world and starts nothing.
Under srun (SLURM tasks) or torchrun the processes already exist and nothing is started here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserError


def externally_launched() -> bool:
    """True inside torchrun / our own ranks, or a SLURM job step with several tasks."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def ranks_to_start(trainer_cfg: Any) -> int:
    """How many rank processes this job must start itself (0: run in this process)."""
    if "ddp" not in str(trainer_cfg.get("strategy", "auto")) or externally_launched():
        return 0
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if devices in (-1, "auto"):
        import torch

        if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            devices = torch.cuda.device_count()
        else:
            raise UserError(
                "trainer.devices=auto with ddp on CPU: give a number, e.g. trainer.devices=2"
            )
    n = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    if int(trainer_cfg.get("num_nodes", 1)) > 1:
        raise UserError(
            "trainer.num_nodes > 1 needs one process per device started by srun or torchrun "
            "(see the README's cluster section, or use hydra/launcher=submitit_slurm)"
        )
    return n if n > 1 else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(cfg: DictConfig, n: int) -> int:
    """Run the job in `n` rank processes; return the job's exit code (2 if any rank said the
    input is bad, 1 if any failed otherwise). If one rank fails the others are stopped."""
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-ranks-"))
    path = tmp / "config.yaml"
    OmegaConf.save(cfg, path, resolve=True)
    port = free_port()
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
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.rank", str(path)], env=env))

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {
        s: signal.signal(s, forward)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    }
    try:
        codes: list[int | None] = [None] * n
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                codes[i] = p.poll()
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                time.sleep(2)  # let the others report, then stop them
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    p.wait()
                codes = [p.returncode for p in procs]
                break
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        shutil.rmtree(tmp, ignore_errors=True)
    if all(c == 0 for c in codes):
        return 0
    return 2 if 2 in codes else 1
