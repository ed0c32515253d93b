"""torch.distributed set-up for runs launched with ``torchrun`` (DDP: gloo on CPU, nccl on GPU), and the few
collectives the trainer needs. A plain ``python -m finetune`` run is a world of one and needs no process group."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run. ``owns_group``: we created the process group and must destroy it."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU; ``cuda`` means this process's GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} asked for, but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ValueError(f"device {requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def setup_distributed(requested_device: str, timeout_minutes: float = 30.0) -> DistributedContext:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size == 1:
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=device, owns_group=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
        owns_group = True
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        owns_group=owns_group,
    )


def cleanup_distributed(context: DistributedContext) -> None:
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def any_process(flag: bool, context: DistributedContext) -> bool:
    """True on every process when ``flag`` is true on at least one (e.g. a stop request, a non-finite loss)."""
    if not context.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def sum_over_processes(values: list[float], context: DistributedContext) -> list[float]:
    if not context.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_object(value: Any, context: DistributedContext, source: int = 0) -> Any:
    """Rank ``source``'s ``value`` on every process (pickled; for small objects)."""
    if not context.distributed:
        return value
    holder = [value if context.rank == source else None]
    dist.broadcast_object_list(holder, src=source, device=context.device if context.device.type == "cuda" else None)
    return holder[0]


def gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    """Every process's ``value``, in rank order, on every process."""
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(context: DistributedContext) -> None:
    if context.distributed:
        dist.barrier()
