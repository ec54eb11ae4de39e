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
recompute takes them back in call order; what it takes is bit for bit what it would have computed.

    x = checkpoint_layer(layer, x, cos, sin, ..., kept=Kept(outputs=True))   # in the layer:  if recomputing(): ...
"""
from __future__ import annotations

import contextvars

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
