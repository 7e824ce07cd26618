"""What the training loop needs to know about the other processes of a launch (accelerate, torchrun,
DeepSpeed): all no-ops in a single process, so the local backend runs exactly as before."""

from __future__ import annotations

import torch


def active() -> bool:
    """True inside a launch of more than one process, once the Trainer has set up the process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def agree(flags: list[bool]) -> list[bool]:
    """Every rank gets True for a flag that is True on any rank (an all-reduce with MAX).

    Stopping, checkpointing and time-based saves must happen at the same step on every rank: a rank that
    saves or leaves the loop alone leaves the others waiting forever in their next collective.
    """
    if not active():
        return list(flags)
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
