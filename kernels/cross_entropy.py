"""Cross-entropy rows and their gradient in one kernel, the gradient written over the logits (in place).

    x        = logits[i].float()                    fp32, as `F.cross_entropy(logits.float(), t)` sees them
    loss[i]  = log(sum_v exp(x_v - m)) - (x_t - m)  m = max_v x_v, t = targets[i]: torch's log_softmax order
    logits[i] <- (softmax(x) - onehot(t)).to(dtype) d(sum of losses)/d(logits), rounded once

phi3/loss.py runs this on one chunk of lm_head's output at a time inside its forward, so that the backward needs
neither the logits nor their recompute. Unfused, torch reads and writes (rows, V) fp32 tensors several times (the
upcast, log_softmax, its backward, the cast back); here one program per row reads its row twice (online max and
sum of exponentials, then the gradient) and writes it once, in the logits' own dtype. Any V: the vocabulary is
walked in blocks, the last one masked. Row offsets are int64 (rows x V passes 2^31 at 4096 rows of 200,064).
"""
import torch
import triton
import triton.language as tl

from . import launch

_MAX_BLOCK = 4096  # vocabulary columns per step: 16 fp32 values per thread at 8 warps (not tuned on a GPU yet)
_WARPS = 8


@triton.jit
def _cross_entropy_kernel(logits_ptr, targets_ptr, loss_ptr, V, stride, BLOCK: tl.constexpr):
    """One row. Pass 1: running max m and d = sum exp(x - m), rescaled when m grows (a block at a time). Then
    loss = log(d) - (x_t - m). Pass 2: logits <- exp(x - m) / d - (v == t). A target outside [0, V) reads
    nothing and makes the row's loss NaN (no out-of-bounds read; torch would raise)."""
    row = tl.cast(tl.program_id(0), tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    m = tl.full([], float("-inf"), tl.float32)
    d = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    x_t = tl.load(base + target, mask=(target >= 0) & (target < V), other=float("nan")).to(tl.float32)
    tl.store(loss_ptr + row, tl.log(d) - (x_t - m))
    for start in range(0, V, BLOCK):  # every read of the row above happens before its first write below
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        grad = tl.exp(x - m) / d - tl.where(cols == target, 1.0, 0.0)
        tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ host side
def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss rows (n,) fp32; logits (n, V) (unit column stride, any row stride) now hold their gradient."""
    n, V = logits.shape
    loss = launch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        with launch.on_device(logits):
            launch.run(_cross_entropy_kernel, (n,), (logits, targets, loss, V, logits.stride(0)),
                       dict(BLOCK=min(_MAX_BLOCK, launch.next_pow2(V)), num_warps=_WARPS))
    return loss
