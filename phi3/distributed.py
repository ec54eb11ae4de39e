"""Data parallelism under torchrun: one process per GPU, gradients summed across processes after backward.

    torchrun --nproc_per_node 2 train.py --data chat.jsonl --model ~/Phi-3-mini-4k-instruct

Every process builds the same batches (same seed) and takes its own share of each optimizer step's
micro-batches, so N processes with --grad-accum G train exactly like one process with --grad-accum N*G. With
LoRA only the adapter gradients (tens of MB) cross the wire, so a plain all-reduce after backward is enough; no
DDP wrapper, hooks or bucketing. Without torchrun (WORLD_SIZE unset) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def device_problems(device: str) -> list[str]:
    """Why --device cannot work here (empty when it can): only "auto", "cpu", "cuda" and "cuda:N" exist."""
    if device == "auto":
        return []
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        return [f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N"]
    if d.type == "cpu":
        return []
    if d.type != "cuda":
        return [f"--device {device!r}: only cpu and cuda are supported"]
    if not torch.cuda.is_available():
        return [f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu (or auto)"]
    if d.index is not None and d.index >= torch.cuda.device_count():
        return [f"--device {device}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0..)"]
    return []


def init(device: str) -> tuple[World, torch.device]:
    """Join the torchrun process group if there is one; returns (world, this process's device)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if size == 1:
        return World(), torch.device(("cuda" if want_cuda else "cpu") if device == "auto" else device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if want_cuda else "gloo")
    return World(dist.get_rank(), size), torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")


def all_reduce_sum_(tensors: list[torch.Tensor], world: World) -> None:
    """Sum tensors across processes in place, as one flat buffer (one collective per call)."""
    if world.size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_scalars(values: list[float], world: World, device) -> list[float]:
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
