"""A GEMM output scaled per column: y = (L * g).to(L.dtype), L (..., N) 16-bit or fp32, g (N,) fp32 (phi3/ops.py:
column_scale; its torch spec column_scale_reference). DoRA's layer is g * L(x), L the fused LoRA layer's output and
g = m / ||W + s B A|| its per-row magnitude factor (phi3/ops.py dora_linear).

Why a kernel: torch's `(L * g).to(dtype)` makes an fp32 copy of L forward; its backward makes three more full fp32
passes (the cast's gradient, dy * g, and dy * L for g's gradient): about 12 bytes per element forward and 34 back
against 4 and 6 here. At Phi-3-mini's shapes (8192 tokens, 31,744 output columns per layer) that is ~150 ms of a
DoRA step.

Forward: one read of L, one write of y. Backward: one read of dy and L, one write of dL = (dy g).to(dtype) and of
each row block's partial column sums of dy * L (fp32), which one small torch sum over the row blocks finishes:
no atomics, so a resumed run repeats bit for bit.
"""
import torch
import triton
import triton.language as tl

from . import launch

_BLOCK_M, _BLOCK_N = 32, 256  # 8K elements a program: 16 KiB of each 16-bit operand, 16-byte loads per thread


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's element offsets (int64: L passes 2^31 elements past 65,536 tokens of 32K columns), its
    columns and the in-bounds mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = tl.cast(rows, tl.int64)[:, None] * N + cols[None, :]
    return offs, cols, (rows[:, None] < M) & (cols[None, :] < N)


@triton.jit
def _scale_fwd_kernel(l_ptr, g_ptr, y_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = (L * g).to(dtype): the product in fp32, one rounding."""
    offs, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    g = tl.load(g_ptr + cols, mask=cols < N, other=0.0)
    L = tl.load(l_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (L * g[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_bwd_kernel(dy_ptr, l_ptr, g_ptr, dl_ptr, part_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dL = (dy * g).to(dtype); part[row block, n] = sum over the block's rows of dy * L, fp32."""
    offs, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    g = tl.load(g_ptr + cols, mask=cols < N, other=0.0)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    L = tl.load(l_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dl_ptr + offs, (dy * g[None, :]).to(dl_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + tl.program_id(0) * N + cols, tl.sum(dy * L, axis=0), mask=cols < N)


# ------------------------------------------------------------------------------- host side: launches, autograd
class ColumnScaleFunction(torch.autograd.Function):
    """y = (L * g).to(L.dtype). Gradients: dL = (dy g).to(dtype), dg = sum over rows of dy * L (fp32)."""

    @staticmethod
    def forward(ctx, L, g):
        N = L.shape[-1]
        L2, g = L.reshape(-1, N).contiguous(), g.float().contiguous()
        y = launch.empty(*L2.shape, dtype=L.dtype, device=L.device)
        grid = (launch.cdiv(L2.shape[0], _BLOCK_M), launch.cdiv(N, _BLOCK_N))
        with launch.on_device(L):
            launch.run(_scale_fwd_kernel, grid, (L2, g, y, L2.shape[0], N), dict(BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N))
        ctx.save_for_backward(L2, g)
        return y.view(L.shape)

    @staticmethod
    def backward(ctx, dy):
        L2, g = ctx.saved_tensors
        (M, N), dy2 = L2.shape, dy.reshape(L2.shape).contiguous()
        dL = launch.empty(M, N, dtype=L2.dtype, device=L2.device)
        parts = launch.empty(launch.cdiv(M, _BLOCK_M), N, dtype=torch.float32, device=L2.device)
        with launch.on_device(L2):
            launch.run(_scale_bwd_kernel, (parts.shape[0], launch.cdiv(N, _BLOCK_N)), (dy2, L2, g, dL, parts, M, N),
                       dict(BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N))
        return dL.view(dy.shape), parts.sum(0)
