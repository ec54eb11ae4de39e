"""Gradient checkpointing that knows when it is recomputing.

torch's non-reentrant checkpoint runs a layer twice: in the forward pass, keeping only its inputs, and again in the
backward pass, to make the tensors the layer's backward needs (stopping once the last of them is made). The second
run's outputs are thrown away, so work whose result nothing saves is wasted there. The MLP's down projection is such
work: its output is only added to the residual stream, and the next layer's input is already kept. Its frozen GEMM
is a fifth of a Phi-3 layer's GEMM work, so in a recompute the LoRA layer computes only what its backward saves
(phi3/lora_layers.py `backward_inputs`): 1.043x the whole Phi-3-mini step on an H100 (bench/README.md).

A layer's first run can also leave its LoRA layers' results for the recompute (`Kept`): S = dropout(x) A^T always
(M x r: a few MB a layer, and its pass over x, with the dropout mask's random numbers, is the recompute's costliest
skinny kernel), and where the layer is given the memory, every frozen GEMM's output y too (as large as the
activations of qkv, o and gate_up: the recompute then runs no GEMM, only norms, RoPE and SwiGLU again). The
recompute takes them back in call order; what it takes is bit for bit what it would have computed. On an H100 at
Phi-4-mini's shapes, batch 4 x 2048, all 32 layers keeping: 1.205x the step for 0.375 GiB a layer (bench/README.md).

    x = checkpoint_layer(layer, x, cos, sin, ..., kept=Kept(outputs=True))   # in the layer:  if recomputing(): ...
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch.utils.checkpoint import checkpoint

# a context variable, not a global: the backward pass (and with it the recompute) runs on autograd's own threads
_recomputing = contextvars.ContextVar("recomputing", default=False)
_kept = contextvars.ContextVar("kept", default=None)


def recomputing() -> bool:
    """Whether the code running is a checkpointed function's second run (the backward pass's recompute)."""
    return _recomputing.get()


class Kept:
    """What one checkpointed layer's first run leaves for its recompute: per LoRA layer call, in call order, that
    call's S and (with `outputs`) its output y. The recompute takes each entry once: its tensors then belong to the
    recompute's own graph, freed as the backward pass goes, and a second recompute (a second backward through the
    same forward) finds nothing and computes again."""

    def __init__(self, outputs: bool):
        self.outputs = outputs
        self.entries: list[tuple[object, object, object]] = []  # (the layer module, S, y or None)
        self.taken = 0

    def keep(self, module, s, y) -> None:
        self.entries.append((module, s, y.detach() if self.outputs and y is not None else None))

    def take(self, module):
        """(S, y or None) that `module`'s call in the first run kept, or None once there is none."""
        if self.taken >= len(self.entries):
            return None
        owner, s, y = self.entries[self.taken]
        if owner is not module:  # the recompute runs the layer's calls in the first run's order, or this is a bug
            raise RuntimeError("a recompute called the LoRA layers in another order than the layer's first run")
        self.entries[self.taken] = (None, None, None)
        self.taken += 1
        return s, y


def kept_slot():
    """(the current layer's Kept, whether this run is its recompute), or None outside a layer that keeps."""
    return _kept.get()


@contextlib.contextmanager
def inner_run(recompute: bool):
    """For code that a checkpointed layer's own autograd node runs rather than the layer (phi3/tiles.py): it keeps
    nothing for the layer's recompute and takes nothing from it, and recomputing() says `recompute`."""
    token, slot = _recomputing.set(recompute), _kept.set(None)
    try:
        yield
    finally:
        _kept.reset(slot)
        _recomputing.reset(token)


def checkpoint_layer(function, *args, kept: Kept | None = None):
    """checkpoint(function, *args) (non-reentrant) with recomputing() true while it runs again in the backward pass
    (and inside whatever it runs then: a checkpoint nested in a recompute is a recompute too); kept: what the first
    run leaves for the recompute (see the module docstring)."""
    runs = 0

    def run(*args):
        nonlocal runs
        runs += 1
        token = _recomputing.set(runs > 1 or recomputing())
        slot = _kept.set((kept, runs > 1) if kept is not None else None)
        try:
            return function(*args)
        finally:
            _kept.reset(slot)
            _recomputing.reset(token)

    return checkpoint(run, *args, use_reentrant=False)


class KeptOutputBudget:
    """How many checkpointed layers keep their GEMM outputs in each forward pass (Recompute.keep_outputs = None): as
    many as fit in the memory torch can still take beside what the pass needs anyway, less 1/16 of what it may hold
    (a margin against the allocator's fragmentation), and no more than the pass needs anyway (what is held at its
    start and its working set): keeping at most doubles a step's footprint, and a large card's rest stays free for
    whatever else runs on it (an evaluation, a second run).

    What a pass needs beyond the memory held at its start (its working set: the loss, a layer's backward) is measured,
    not guessed: the first pass keeps no outputs, and at the start of each pass the peak so far, less the memory held
    now and less what the last pass kept, bounds the last pass's working set from above (a peak from before, or one
    that torch's reset_peak_memory_stats lowered, only makes the bound larger or leaves the earlier one). Per token, the
    largest bound seen scales to this pass's tokens. So a card that only just fits a step keeps nothing, and a larger
    batch keeps fewer layers. On the CPU nothing is kept (the recompute is not where a CPU step's time goes)."""

    def __init__(self):
        self.working_per_token = None  # bytes, the largest bound measured
        self.last = None  # (bytes kept, tokens) of the last pass
        self.last_layers, self.ceiling = 0, None  # layers the last pass kept; at most this many (see back_off)

    def layers(self, checkpointed: int, layer_bytes: int, tokens: int, device: torch.device) -> int:
        if device.type != "cuda" or layer_bytes == 0:
            return 0
        peak, held = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        if self.last is not None:
            kept, last_tokens = self.last
            bound = max(0, peak - held - kept) / last_tokens
            self.working_per_token = max(self.working_per_token or 0.0, bound)
        keeping = 0
        if self.working_per_token is not None:
            available, capacity = available_bytes(device)
            working = self.working_per_token * tokens
            spare = min(available - working - capacity // 16, held + working)
            keeping = max(0, min(checkpointed, int(spare // layer_bytes),
                                  checkpointed if self.ceiling is None else self.ceiling))
        self.last, self.last_layers = (keeping * layer_bytes, tokens), keeping
        return keeping

    def back_off(self) -> None:
        """After a pass that ran out of memory while keeping: from now on keep at most half of what it kept (the
        allocator's fragmentation can take more than the margin)."""
        self.ceiling = self.last_layers // 2


def available_bytes(device: torch.device) -> tuple[int, int]:
    """(bytes torch can still allocate on a GPU, the most it may hold): the device's free memory and torch's own
    cached blocks, within torch's cap (set_per_process_memory_fraction: a smaller card, emulated)."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    cap = int(total * torch.cuda.get_per_process_memory_fraction(device))
    return max(0, min(free + reserved, cap) - allocated), cap


def keeping_less_where_memory_runs_out(budget: KeptOutputBudget | None, attempt, on_retry=lambda kept: None):
    """attempt() (a step's forward and backward passes, from its start), again while it runs out of GPU memory in a
    pass whose layers the budget let keep outputs: each time the budget keeps at most half as many (back_off). The
    results are the bits a first attempt would have given, where attempt() draws its random numbers the same way
    again. budget None (several processes, which cannot retry alone): no retry. on_retry(what the failed pass
    kept, in layers)."""
    while True:
        try:
            return attempt()
        except torch.OutOfMemoryError:
            kept = budget.last_layers if budget is not None else 0
            if not kept:
                raise
            budget.back_off()
        # here, out of the except clause, the failed attempt's tensors are freed with its traceback
        torch.cuda.empty_cache()  # and the fragments that caused it go back to the device
        on_retry(kept)
