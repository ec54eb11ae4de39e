"""Checkpointed layer inputs kept in pinned CPU memory between the forward and the backward pass.

With per-layer gradient checkpointing, what the GPU holds from the forward to the backward pass is each layer's input
(B, T, hidden): 1.5 GiB at batch 4 x 2048 on Phi-3-mini, 26 GiB at 131,072 tokens. Here each one is copied to pinned
host memory on a side stream while the next layers compute, its GPU memory is freed, and it comes back one layer
ahead of the backward pass that recomputes that layer: the copies (PCIe, tens of GB/s each way) hide behind the
layers' compute, and the GPU holds about two layer inputs instead of all of them.

    offload = CheckpointOffload(device)
    saved = offload.new_pass()                 # one per forward pass (micro-batch)
    for layer in layers:
        with saved.layer_input(x):              # hooks torch.utils.checkpoint's saving of x
            x = checkpoint(layer, x, ...)
    saved.prefetch_last()                       # the last layer's input is needed first in backward

Only the tensor named in layer_input moves (checkpoint also saves cos/sin, shared by all layers, which stay). On the
CPU (tests) the same code runs with plain copies and no streams. Results are bit for bit those without offloading:
the values make a round trip, nothing is recomputed differently.
"""

from __future__ import annotations

import contextlib
import sys

import torch


class CheckpointOffload:
    """Pinned host buffers (reused across passes and steps) and the copy stream of one device."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.free: list[torch.Tensor] = []  # flat host buffers not holding a layer input now
        self.allocated_bytes = 0  # host memory this offloader holds (for the log and tests)
        self.pinned = self.cuda  # False once pinning failed: pageable buffers then (slower copies, same results)

    def new_pass(self) -> "OffloadedPass":
        return OffloadedPass(self)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The smallest free buffer that fits (a micro-batch of fewer rows reuses a larger one), else a new one."""
        fits = [b for b in self.free if b.dtype == dtype and b.numel() >= numel]
        if fits:
            buffer = min(fits, key=torch.Tensor.numel)
            self.free.remove(buffer)
        else:
            buffer = None
            if self.pinned:
                try:
                    buffer = torch.empty(numel, dtype=dtype, pin_memory=True)
                except RuntimeError as e:  # the OS would not lock that much memory
                    self.pinned = False
                    print(f"note: pinned host memory ran out after {self.allocated_bytes / 2**30:.1f} GiB ({e}); "
                          "further layer inputs wait in pageable memory (slower copies)", file=sys.stderr)
            if buffer is None:
                buffer = torch.empty(numel, dtype=dtype)
            self.allocated_bytes += buffer.numel() * buffer.element_size()
        return buffer

    def copy_stream(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()


class _Saved:
    """One layer input: on the host after the forward, back on the device (`device_copy`) once prefetched."""

    def __init__(self, buffer: torch.Tensor, host: torch.Tensor):
        self.buffer, self.host, self.shape = buffer, host, host.shape  # host: a view of the pooled flat buffer
        self.device_copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None  # the host-to-device copy is done


class OffloadedPass:
    """The layer inputs of one forward pass, in layer order; the backward takes them back in reverse."""

    def __init__(self, offload: CheckpointOffload):
        self.offload = offload
        self.saved: list[_Saved] = []

    @contextlib.contextmanager
    def layer_input(self, x: torch.Tensor):
        """While active, checkpoint's saving of exactly `x` goes to the host; anything else is kept as it is."""
        # x by its address, not by reference: autograd keeps the hooks as long as what they packed, and a hook that
        # referred to x would keep it on the GPU just the same
        key = (x.data_ptr(), x.shape, x.dtype)

        def pack(t: torch.Tensor):
            return self._to_host(t) if (t.data_ptr(), t.shape, t.dtype) == key else t

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    def _to_host(self, t: torch.Tensor) -> int:
        offload = self.offload
        buffer = offload.host_buffer(t.numel(), t.dtype)
        host = buffer[:t.numel()].view(t.shape)
        if offload.cuda:
            offload.stream.wait_stream(torch.cuda.current_stream(offload.device))  # t is written
            with offload.copy_stream():
                host.copy_(t, non_blocking=True)
            t.record_stream(offload.stream)  # its memory is reused only after the copy has read it
        else:
            host.copy_(t)
        self.saved.append(_Saved(buffer, host))
        return len(self.saved) - 1

    def _prefetch(self, index: int) -> None:
        entry = self.saved[index]
        if entry.device_copy is not None:
            return
        if entry.host is None:
            raise RuntimeError("a checkpointed layer input was taken back twice (a second backward through one "
                               "forward pass is not supported with offloading)")
        offload = self.offload
        # allocated on the compute stream (which uses and frees it); the copy stream first waits for that stream's
        # earlier work, which may still be reading the memory the allocator hands out
        entry.device_copy = torch.empty(entry.shape, dtype=entry.host.dtype, device=offload.device)
        if offload.cuda:
            offload.stream.wait_stream(torch.cuda.current_stream(offload.device))
            with offload.copy_stream():
                entry.device_copy.copy_(entry.host, non_blocking=True)
                entry.ready = torch.cuda.Event()
                entry.ready.record(offload.stream)
        else:
            entry.device_copy.copy_(entry.host)

    def prefetch_last(self) -> None:
        """Start bringing back the last layer input: the backward pass needs it first."""
        if self.saved:
            self._prefetch(len(self.saved) - 1)

    def _unpack(self, packed):
        if not isinstance(packed, int):
            return packed
        self._prefetch(packed)  # no-op when prefetched, as it is in layer order
        entry = self.saved[packed]
        if entry.ready is not None:
            torch.cuda.current_stream(self.offload.device).wait_event(entry.ready)
        t, entry.device_copy = entry.device_copy, None
        # the host buffer is free again once its copy has run: later copies into it queue on the same stream
        self.offload.free.append(entry.buffer)
        entry.buffer = entry.host = None
        if packed > 0:
            self._prefetch(packed - 1)  # overlaps this layer's recompute and backward
        return t
