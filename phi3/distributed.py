"""Data parallelism under torchrun: one process per GPU, gradients summed across processes during backward.

    torchrun --nproc_per_node 2 train.py --data chat.jsonl --model ~/Phi-3-mini-4k-instruct
    torchrun --nproc_per_node 2 train.py --data chat.jsonl --model ~/Phi-3-mini-4k-instruct --full

Every process builds the same batches (same seed) and takes its own share of each optimizer step's
micro-batches, so N processes with --grad-accum G train like one process with --grad-accum N*G.
LoRA: every process holds the whole model; DDP sums the adapters' gradients in buckets while the last
micro-batch's backward runs (tens of MB). --full: FSDP2 shards every parameter, its gradient and its AdamW
moments over the processes (each holds 1/N); a layer's whole weights exist only while it runs, and each
micro-batch's gradients are summed and scattered back into the shards as its backward runs.
Without torchrun (WORLD_SIZE unset) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
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
    number of processes; our loss is already divided by the trained tokens of the whole step, all processes').

    The sum is waited for here and handed back as a finished future. A Python callback chained on the collective's
    future (`.then(...)`, as torch's own hooks do) is released by gloo's worker thread, which needs the GIL for it:
    when the DDP module was freed at that moment, the main thread, holding the GIL, joined that worker thread for
    ever (a hang seen in the test suite; gdb showed both threads). Waiting costs no overlap worth having: the
    adapter's gradients are a few MB, and under NCCL the wait only orders the CUDA streams."""
    buffer = bucket.buffer()
    dist.all_reduce(buffer)
    summed = torch.futures.Future()
    summed.set_result(buffer)
    return summed


def data_parallel(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module itself in one process or when it is sharded (FSDP reduces); under torchrun, DDP around it, summing
    gradients while backward runs. Every process loaded the same weights and the same seeded LoRA init, so nothing
    is broadcast at the start."""
    if world.size == 1 or isinstance(module, FSDPModule):
        return module
    ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None, init_sync=False)  # (no buffers)
    ddp.register_comm_hook(None, _sum_gradients)
    return ddp


def shard(module: nn.Module, layers: nn.ModuleList, world: World, device: torch.device) -> nn.Module:
    """Under torchrun, FSDP2 over `module` (in place): each of `layers` is one unit whose whole weights are gathered
    just before it runs and freed after (forward, and again in backward), the rest (embeddings, final norm, lm_head)
    belongs to `module`, the root, whose forward must be the entry point. Every process keeps 1/N of each parameter
    and of its gradient; build the optimizer afterwards, so that its moments are shards too. Every process built the
    same weights: each keeps its own part, nothing is sent. One process: unchanged."""
    if world.size == 1:
        return module
    mesh = init_device_mesh(device.type, (world.size,))
    _meshes.append(mesh)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for unit in module.modules():
        if isinstance(unit, FSDPModule):  # (both settings are per unit)
            # Sum the processes' gradients: FSDP would average them, but our loss is already divided by the trained
            # tokens of the whole step, all processes'. A plain SUM, not a pre-multiplied one: gloo has no PREMUL_SUM.
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return module


def no_sync(module: nn.Module, skip: bool):
    """Inside: backward accumulates locally without reducing (all but the last micro-batch of a step). DDP only:
    FSDP reduces every micro-batch, so that gradients stay sharded (skipping would hold whole gradients in between)."""
    return module.no_sync() if skip and isinstance(module, DDP) else contextlib.nullcontext()


def reshard(module: nn.Module) -> None:
    """After a forward with no backward (eval): FSDP keeps the root's weights gathered after its forward, for the
    backward that normally follows; free them, so that the module holds, and names, its shards again (a save reads
    the parameters by name)."""
    if isinstance(module, FSDPModule):
        module.reshard()  # (the root only: the layers free theirs after each forward)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: its shard when sharded, else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor; a sharded one is gathered, so every process must call this, in the same order."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def gather_to_cpu(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole CPU copies of the tensors where `keep` (the process that writes them), {} elsewhere. Every process calls
    it: each sharded tensor is gathered by all of them, one at a time, so a device holds at most one whole tensor
    beyond its shards."""
    out = {}
    for name, t in tensors.items():
        t = full_tensor(t.detach())
        if keep:
            out[name] = t.contiguous().cpu()
    return out


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor (every process read the same file) laid out as `like`: this process's shard of it when `like`
    is sharded, cut locally without communication; else `t` itself."""
    if not isinstance(like, DTensor):
        return t
    return distribute_tensor(t, like.device_mesh, like.placements, src_data_rank=None)


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
    """Frees the process group while the interpreter is whole, so that gloo's threads end here. Left to the
    interpreter's exit, a group still alive there aborted a finished run about once in 50 (SIGABRT, "terminate
    called without an active exception"): the run had saved everything and still exited non-zero."""
    if world.size > 1 and dist.is_initialized():
        _release_meshes()
        dist.destroy_process_group()
        gc.collect()  # DDP's and FSDP's reference cycles, the last holders of the group


_meshes: list[DeviceMesh] = []  # the ones shard() made


def _release_meshes() -> None:
    """DTensor's caches keep every DeviceMesh to the end, and a mesh keeps its process groups (torch 2.13:
    `_pg_registry`): drop those references, so that destroy_process_group() is the end of the groups."""
    for mesh in _meshes:
        registry = getattr(mesh, "_pg_registry", None)
        if isinstance(registry, dict):
            registry.clear()
    _meshes.clear()
