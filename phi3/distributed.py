"""Data parallelism under torchrun: one process per GPU, DDP summing gradients across processes during backward.

    torchrun --nproc_per_node 2 train.py --data chat.jsonl --model ~/Phi-3-mini-4k-instruct

Every process builds the same batches (same seed) and takes its own share of each optimizer step's
micro-batches, so N processes with --grad-accum G train exactly like one process with --grad-accum N*G. DDP sums
the trained parameters' gradients in buckets while the last micro-batch's backward runs (with LoRA, tens of MB).
Without torchrun (WORLD_SIZE unset) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


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


def _sum_gradients(state, bucket):  # (no annotations: DDP checks them, and they are strings in this file)
    """DDP communication hook: sum a bucket of gradients across processes (DDP's default divides the sum by the
    number of processes; our loss is already divided by the trained tokens of the whole step, all processes')."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def data_parallel(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module itself in one process; under torchrun, DDP around it, summing gradients while backward runs.
    Every process loaded the same weights and the same seeded LoRA init, so nothing is broadcast at the start."""
    if world.size == 1:
        return module
    ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None, init_sync=False)  # (no buffers)
    ddp.register_comm_hook(None, _sum_gradients)
    return ddp


def no_sync(module: nn.Module, skip: bool):
    """Inside: backward accumulates locally without reducing (all but the last micro-batch of a step)."""
    return module.no_sync() if skip and isinstance(module, DDP) else contextlib.nullcontext()


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
