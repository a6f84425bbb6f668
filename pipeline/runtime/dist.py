"""Process-group helpers. The pipeline starts its own ranks (see launch.py) or runs under srun /
torchrun; either way every rank runs the same stage code and only rank 0 writes shared files."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as torch_dist


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def rank() -> int:
    if torch_dist.is_initialized():
        return torch_dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's value on every rank (e.g. a decision taken after reading files)."""
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's value, in rank order, on every rank."""
    if not torch_dist.is_initialized():
        return [obj]
    out: list[object] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(value: float) -> float:
    """The sum of `value` over the ranks (every rank gets it)."""
    if not torch_dist.is_initialized():
        return value
    return float(sum(all_gather_object(value)))  # type: ignore[arg-type]


def init_from_environment(accelerator: str) -> None:
    """Join the process group described by the environment, if there is one and not yet joined.

    The group exists before the first Trainer so that the stage can meet at barriers around
    file writes; Lightning's DDP strategy finds it initialised and uses it.
    """
    if torch_dist.is_initialized():
        return
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
    elif SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        env = SLURMEnvironment()
        os.environ.setdefault("MASTER_ADDR", env.main_address)
        os.environ.setdefault("MASTER_PORT", str(env.main_port))
    else:
        return
    if env.world_size() <= 1:
        return
    use_cuda = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank())
    torch_dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        rank=env.global_rank(),
        world_size=env.world_size(),
        timeout=datetime.timedelta(minutes=30),
    )
