"""Next-token cross-entropy over the trained positions only, in chunks, without the full logits tensor.

Only positions with a label (labels != -100) go through lm_head, in chunks of `chunk` rows, so memory holds at most
one chunk of (chunk, vocab) logits at a time. The gradient comes one of two ways:

- In the forward (LoRA training's case: lm_head a plain frozen nn.Linear without bias, tied to the embedding or
  not). Per chunk: logits = h W^T in the model dtype, one kernel turns them in place into softmax - onehot(target)
  plus the loss rows (phi3/ops.py's cross_entropy_grad), and d hidden = that @ W goes into an (n, H) buffer; the
  backward only scales it by the incoming gradient. Recomputing the chunk in the backward instead would cost its
  lm_head GEMM again (10 TFLOP per 4096 rows at Phi-4-mini's 200,064-token vocabulary) and several passes over its
  fp32 logits. Rounding differs from the reference (lm_head in bf16, .float(), F.cross_entropy) in one place:
  softmax - onehot is rounded to the model dtype before the product through W, and the incoming gradient (1 / the
  step's tokens) is applied after it rather than before that rounding: one rounding more.
- By recompute (everything else: LoRA on lm_head, a trainable lm_head or embedding, autocast): each chunk's fp32
  logits and F.cross_entropy run again in the backward (activation checkpointing), and autograd gives whatever
  weight gradients lm_head needs. Without gradients (eval) each chunk runs once, plainly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from phi3.ops import cross_entropy_grad

IGNORE = -100
fused_linear_loss = True  # False: every case recomputes (bench_train's ours-checkpointed-loss measures what this buys)


def _chunk_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden)  # (n, vocab); the loss upcasts, as the reference does (fp64 stays fp64)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def _chunk_loss_and_grad(h, weight, targets, dh) -> torch.Tensor:
    """One chunk's loss sum, its d hidden (for a gradient of 1) written into dh (rows, H). The logits buffer becomes
    their gradient: one (rows, V) tensor in the model dtype is all the chunk holds, freed on return."""
    logits = F.linear(h, weight)  # (rows, V), as lm_head computes them
    loss, grad = cross_entropy_grad(logits, targets)
    torch.mm(grad, weight, out=dh)
    return loss.sum()


class LinearCrossEntropyFunction(torch.autograd.Function):
    """sum_i CE(h_i W^T, t_i) for W frozen; h (n, H) and W (V, H) of one dtype, targets (n,) in [0, V).

    Gradient, computed in the forward chunk by chunk (saved: dh (n, H) only):
        d h = grad_output * (softmax(h W^T) - onehot(t)) W          (none for W: frozen)
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        dh = torch.empty_like(h)
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            total = total + _chunk_loss_and_grad(h[rows], weight, targets[rows], dh[rows])
        ctx.save_for_backward(dh)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (dh,) = ctx.saved_tensors
        return dh * grad_output, None, None, None  # in dh's dtype (a 0-dim fp32 factor does not promote)


def _gradient_in_forward(lm_head: torch.nn.Module, h: torch.Tensor) -> bool:
    """A plain frozen lm_head in h's dtype: adapters' wrappers and fully_shard change the module's type, a trained
    weight needs autograd's weight gradient, and autocast would compute lm_head in a dtype of its own."""
    weight = lm_head.weight if type(lm_head) is torch.nn.Linear else None
    return (fused_linear_loss and weight is not None and lm_head.bias is None and not weight.requires_grad
            and weight.dtype == h.dtype and torch.is_grad_enabled() and h.requires_grad
            and not torch.is_autocast_enabled(h.device.type))


def cross_entropy_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                      chunk: int = 4096) -> torch.Tensor:
    """Sum of token losses over labelled positions. hidden (B, T, H), labels (B, T) already shifted."""
    keep = labels.reshape(-1) != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[keep]  # (n_trained, H)
    targets = labels.reshape(-1)[keep]
    if _gradient_in_forward(lm_head, h):
        return LinearCrossEntropyFunction.apply(h, lm_head.weight, targets, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        args = (lm_head, h[start:start + chunk], targets[start:start + chunk])
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args)
    return total
