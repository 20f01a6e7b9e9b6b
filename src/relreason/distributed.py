"""One process per device under ``torchrun``; a plain single process otherwise."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from relreason.device import use_device
from relreason.errors import RelreasonError
from relreason.launch import launched_by_torchrun


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A CPU (gloo) group for small control decisions: under nccl a CPU flag cannot use the default group,
    # and a flag on the GPU would make every step wait for the device to read it. None: the default group.
    control_group: Any = field(default=None, compare=False, repr=False)
    # Whether init_distributed made the default process group (then it ends it), or the caller did.
    owns_process_group: bool = field(default=False, compare=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, shows progress and writes files."""
        return self.rank == 0


def refuse_several_processes(command: str) -> None:
    """A one-line error for a command that runs in one process, launched by torchrun with several: every rank would
    do all of its work and write the same files."""
    size = os.environ.get("WORLD_SIZE", "").strip()
    if launched_by_torchrun() and size.isdigit() and int(size) > 1:
        raise RelreasonError(f"`relreason {command}` runs in one process (every rank would do all its work); "
                             "launch it without torchrun: `relreason pretrain` alone trains on several")


def init_distributed(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA) and pick this rank's device."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        use_device(device)
        return DistributedContext(), device
    context = DistributedContext(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    if device.type == "cuda":
        if context.local_rank >= torch.cuda.device_count():
            raise RelreasonError(
                f"local rank {context.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # Made under gloo too, so that CPU runs (and their tests) take the same path as CUDA ones.
    context = dataclasses.replace(context, control_group=dist.new_group(backend="gloo"), owns_process_group=owns)
    return context, device


def shutdown_distributed(context: DistributedContext) -> None:
    """End what init_distributed started: the control group, and the default group only if it made it."""
    if not dist.is_initialized():
        return
    # Before torch 2.8 a gloo group is destroyed holding the GIL while its worker threads may still need the GIL to
    # free the last tensors of finished work (pytorch/pytorch#154976): a CPU run could hang as it ended (3 of 35
    # 2-process runs on torch 2.4.1). A moment without the GIL lets them finish first.
    time.sleep(0.05)
    if context.owns_process_group:
        dist.destroy_process_group()  # every group with it
    elif context.control_group is not None:
        dist.destroy_process_group(context.control_group)  # a caller's own group lives on for its own use


def all_reduce_mean(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= context.world_size
    return tensor


def max_over_ranks(value: int, context: DistributedContext) -> int:
    """The largest of every rank's ``value``, on every rank: one decision that all ranks act on alike."""
    if not context.enabled:
        return value
    vote = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=context.control_group)
    return int(vote.item())


def broadcast_object(value: Any, context: DistributedContext) -> Any:
    """Rank 0's ``value`` on every rank, so all ranks act on one decision (e.g. which checkpoint)."""
    if not context.enabled:
        return value
    holder = [value]
    # Over the CPU group: under NCCL the pickled object (a whole checkpoint) would otherwise pass through GPU memory.
    dist.broadcast_object_list(holder, src=0, group=context.control_group)
    return holder[0]


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier(group=context.control_group)  # a wait for files rank 0 writes: the CPU group suffices
