"""Checkpointed layer inputs kept in pinned CPU memory between the forward and the backward pass.

With per-layer gradient checkpointing, what the GPU holds from the forward to the backward pass is each layer's input
(B, T, hidden): 1.5 GiB at batch 4 x 2048 on Phi-3-mini, 26 GiB at 131,072 tokens. Here each one is copied to pinned
host memory on a side stream while the next layers compute, its GPU memory is freed, and it comes back one layer
ahead of the backward pass that recomputes that layer: the copies (PCIe, tens of GB/s each way) hide behind the
layers' compute, and the GPU holds about two layer inputs instead of all of them.

    offload = CheckpointOffload(device)
    saved = offload.new_pass(len(layers), x.numel() * x.element_size())   # one per forward pass (micro-batch)
    for i, layer in enumerate(layers):
        with saved.layer_input(x, i) if saved.moves(i) else nullcontext():   # hooks checkpoint's saving of x
            x = checkpoint(layer, x, ...)
    saved.prefetch_last()                       # the last layer's input is needed first in backward

Only the tensor named in layer_input moves (checkpoint also saves cos/sin, shared by all layers, which stay). On the
CPU (tests) the same code runs with plain copies and no streams. Results are bit for bit those without offloading:
the values make a round trip, nothing is recomputed differently.

Host memory bounds it: a pass moves layer inputs only while they fit in half of the machine's RAM
(`host_limit_bytes`, divided among the processes torchrun runs on the machine; 26 GiB of inputs on a 32 GiB machine
would leave it swapping or killed); the later layers' inputs then stay on the GPU, and a note says so once.

A layer whose input waits here can also leave what it computed once for its recompute to take back instead of
computing it again (`keep` / `take_kept`: attention's output and log-sum-exp, phi3/attention.py). Those tensors
travel with the layer's input: they come back together, one layer ahead of the backward pass. They are as large as
the inputs (26 GiB more at 131k tokens on Phi-3-mini), so a pass keeps them only while the layer inputs and they fit
in half of the machine's memory (`host_limit_bytes`); past that, layers compute attention again as without keeping.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch


def physical_memory_bytes() -> int:
    """This machine's RAM; 0 where the OS does not say (then nothing beyond the layer inputs is kept)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return 0


def processes_on_this_machine() -> int:
    """How many training processes share this machine's RAM: torchrun's LOCAL_WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _half_the_ram() -> str:
    ram, processes = physical_memory_bytes(), processes_on_this_machine()
    if not ram:
        return "the OS does not report its RAM"
    shared = f", shared by {processes} processes" if processes > 1 else ""
    return f"half of this machine's {ram / 2**30:.0f} GiB{shared}"


class CheckpointOffload:
    """Pinned host buffers (reused across passes and steps) and the copy stream of one device."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.free: list[torch.Tensor] = []  # flat host buffers not holding a layer input now
        self.allocated_bytes = 0  # host memory this offloader holds (for the log and tests)
        self.pinned = self.cuda  # False once pinning failed: pageable buffers then (slower copies, same results)
        # a pass's layer inputs + kept tensors (see above), this process's share when torchrun runs several on one
        # machine; 0: the OS does not say, then every input moves, and nothing more is kept
        self.host_limit_bytes = physical_memory_bytes() // 2 // processes_on_this_machine()
        self.told_limit = self.told_inputs = False

    def new_pass(self, layers: int, layer_bytes: int) -> "OffloadedPass":
        """A forward pass offering `layers` layer inputs of `layer_bytes` each: as many as fit in the host limit
        move (the first ones: the backward pass takes the last ones back first, freeing the GPU early), and kept
        tensors get what they leave of the limit."""
        moved = layers
        if self.host_limit_bytes > 0 and layers * layer_bytes > self.host_limit_bytes:
            moved = self.host_limit_bytes // layer_bytes
            if not self.told_inputs:
                self.told_inputs = True
                _note(f"host memory ({_half_the_ram()}) holds the checkpointed inputs of {moved} of {layers} layers "
                      "at this length; the others stay on the GPU")
        return OffloadedPass(self, moved, self.host_limit_bytes - moved * layer_bytes)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The smallest free buffer that fits (a micro-batch of fewer rows reuses a larger one), else a new one."""
        fits = [i for i, b in enumerate(self.free) if b.dtype == dtype and b.numel() >= numel]
        if fits:
            # by position: list.remove would compare tensors with ==, element by element
            buffer = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        else:
            buffer = None
            if self.pinned:
                try:
                    buffer = torch.empty(numel, dtype=dtype, pin_memory=True)
                except RuntimeError as e:  # the OS would not lock that much memory
                    self.pinned = False
                    _note(f"pinned host memory ran out after {self.allocated_bytes / 2**30:.1f} GiB ({e}); "
                          "further layer inputs wait in pageable memory (slower copies)")
            if buffer is None:
                buffer = torch.empty(numel, dtype=dtype)
            self.allocated_bytes += buffer.numel() * buffer.element_size()
        return buffer

    def copy_stream(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()


class _Saved:
    """One layer input: on the host after the forward, back on the device (`device_copy`) once prefetched."""

    def __init__(self, buffer: torch.Tensor, host: torch.Tensor, layer: int):
        self.buffer, self.host, self.shape = buffer, host, host.shape  # host: a view of the pooled flat buffer
        self.layer = layer
        self.device_copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None  # the host-to-device copy is done


class OffloadedPass:
    """The layer inputs of one forward pass (and what those layers keep), in layer order; the backward takes them
    back in reverse."""

    # kept tensors smaller than this stay on the device (attention's random-number state: a copy would cost more)
    small_bytes = 1 << 20

    def __init__(self, offload: CheckpointOffload, moved_layers: int, keep_budget_bytes: int):
        self.offload = offload
        self.moved_layers = moved_layers  # layers 0 .. moved_layers - 1 offer their input (`moves`)
        self.keep_budget_bytes = keep_budget_bytes  # host bytes left for kept tensors in this pass
        self.saved: list[_Saved] = []
        self.of_layer: dict[int, list[int]] = {}  # layer -> its entries in `saved`
        self.kept: dict[int, list] = {}  # layer -> what it keeps: entries in `saved` (int) or device tensors

    @contextlib.contextmanager
    def layer_input(self, x: torch.Tensor, layer: int):
        """While active, checkpoint's saving of exactly `x` goes to the host; anything else is kept as it is."""
        # x by its address, not by reference: autograd keeps the hooks as long as what they packed, and a hook that
        # referred to x would keep it on the GPU just the same
        key = (x.data_ptr(), x.shape, x.dtype)

        def pack(t: torch.Tensor):
            return self._to_host(t, layer) if (t.data_ptr(), t.shape, t.dtype) == key else t

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    def moves(self, layer: int) -> bool:
        """Whether this layer's input is to wait on the host (see CheckpointOffload.new_pass)."""
        return layer < self.moved_layers

    def holds_input_of(self, layer: int) -> bool:
        """Whether this layer's input waits here: only such layers keep anything (their recompute is certain)."""
        return layer in self.of_layer

    def keep(self, layer: int, tensors) -> None:
        """Tensors the layer computed in its forward, for `take_kept` in its recompute; the large ones wait here.
        All or none: past the host budget nothing is kept, and the recompute computes them again."""
        large = [t.numel() * t.element_size() >= self.small_bytes for t in tensors]
        size = sum(t.numel() * t.element_size() for t, big in zip(tensors, large) if big)
        if size > self.keep_budget_bytes:
            if not self.offload.told_limit:
                self.offload.told_limit = True
                _note(f"host memory ({_half_the_ram()}) does not hold every layer's attention output at this length; "
                      "the others compute attention again in their recompute (slower, same results)")
            return
        self.keep_budget_bytes -= size
        self.kept[layer] = [self._to_host(t, layer) if big else t for t, big in zip(tensors, large)]

    def take_kept(self, layer: int) -> list[torch.Tensor] | None:
        """What `keep` stored for this layer, back on the device, once; None if it kept nothing."""
        entries = self.kept.pop(layer, None)
        return None if entries is None else [self._take(e) if isinstance(e, int) else e for e in entries]

    def _to_host(self, t: torch.Tensor, layer: int) -> int:
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
        self.saved.append(_Saved(buffer, host, layer))
        self.of_layer.setdefault(layer, []).append(len(self.saved) - 1)
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

    def _prefetch_layer(self, layer: int) -> None:
        for index in self.of_layer.get(layer, ()):
            if self.saved[index].host is not None:  # not taken back yet
                self._prefetch(index)

    def prefetch_last(self) -> None:
        """Start bringing back the last layer's entries: the backward pass needs them first."""
        if self.of_layer:
            self._prefetch_layer(max(self.of_layer))

    def _unpack(self, packed):
        return self._take(packed) if isinstance(packed, int) else packed

    def _take(self, packed: int) -> torch.Tensor:
        self._prefetch(packed)  # no-op when prefetched, as it is in layer order
        entry = self.saved[packed]
        if entry.ready is not None:
            torch.cuda.current_stream(self.offload.device).wait_event(entry.ready)
        t, entry.device_copy = entry.device_copy, None
        # the host buffer is free again once its copy has run: later copies into it queue on the same stream
        self.offload.free.append(entry.buffer)
        entry.buffer = entry.host = None
        self._prefetch_layer(entry.layer - 1)  # overlaps this layer's recompute and backward
        return t
