"""Gradient checkpointing that knows when it is recomputing.

torch's non-reentrant checkpoint runs a layer twice: in the forward pass, keeping only its inputs, and again in the
backward pass, to make the tensors the layer's backward needs (stopping once the last of them is made). The second
run's outputs are thrown away, so work whose result nothing saves is wasted there. The MLP's down projection is such
work: its output is only added to the residual stream, and the next layer's input is already kept. Its frozen GEMM
is a fifth of a Phi-3 layer's GEMM work, so in a recompute the LoRA layer computes only what its backward saves
(phi3/lora_layers.py `backward_inputs`): 1.043x the whole Phi-3-mini step on an H100 (bench/README.md).

    x = checkpoint_layer(layer, x, cos, sin, ...)     # in the layer:  if recomputing(): ...
"""
from __future__ import annotations

import contextvars

from torch.utils.checkpoint import checkpoint

# a context variable, not a global: the backward pass (and with it the recompute) runs on autograd's own threads
_recomputing = contextvars.ContextVar("recomputing", default=False)


def recomputing() -> bool:
    """Whether the code running is a checkpointed function's second run (the backward pass's recompute)."""
    return _recomputing.get()


def checkpoint_layer(function, *args):
    """checkpoint(function, *args) (non-reentrant) with recomputing() true while it runs again in the backward pass
    (and inside whatever it runs then: a checkpoint nested in a recompute is a recompute too)."""
    runs = 0

    def run(*args):
        nonlocal runs
        runs += 1
        token = _recomputing.set(runs > 1 or recomputing())
        try:
            return function(*args)
        finally:
            _recomputing.reset(token)

    return checkpoint(run, *args, use_reentrant=False)
