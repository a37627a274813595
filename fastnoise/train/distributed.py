"""Data-parallel runs under ``torchrun``.

``torchrun --nproc_per_node N -m fastnoise.cli train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on CUDA, gloo on CPU). Every
rank builds the same model after the same ``fastnoise.manual_seed``, so layer ids and call
counters, hence the noise of every step, are the same on every rank: one simulated chip per
step, as in a single-process run with the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "check_device", "all_reduce_sum", "barrier", "broadcast_object",
           "all_objects"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def setup(device=None) -> DistInfo:
    """Join the process group if ``torchrun`` started us (idempotent); pick the device.

    ``device``: None picks ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device is None:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = check_device(device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def check_device(device, local_rank: int = 0) -> torch.device:
    """``device`` as a ``torch.device`` (``cuda`` gets this process's index); a device that is not
    one, or that this machine lacks, is a :class:`~fastnoise.train.recipes.ConfigError`."""
    from .errors import ConfigError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device!r}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s)")
    return dev


def all_reduce_sum(values, info: DistInfo) -> list[float]:
    """Sum a list of floats over ranks (a no-op in one process)."""
    values = [float(v) for v in values]
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
