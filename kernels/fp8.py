"""FP8 operands for the frozen base's GEMMs (train.py --fp8, Hopper): e4m3 values with one fp32 scale per row.

    q[m, k] = rn_e4m3(x[m, k] / s[m]),   s[m] = max_k |x[m, k]| / 448    (448: e4m3's largest; s = 1 for a zero row)
    x W^T  ~  s_x[m] s_w[n] sum_k qx[m, k] qw[n, k]                      (Hopper's FP8 tensor cores: 2x bf16's rate)

A scale per token of x (per row of dy) and per output channel of W: the "rowwise" FP8 recipe (torchao's float8
rowwise), where one outlier spoils only its own row. FP8 tensor cores take both operands K-major, so dx = dy W needs
W with its other dimension contiguous: a second FP8 copy, W^T with a scale per input channel (FP8Weight). The two
copies weigh what the bf16 W weighs.

`_quantize_rows_kernel`: one program per row, two passes (the row's absolute max, then the scaled cast; the second
reads the row back from L2). The division is correctly rounded (div_rn) and the cast rounds to nearest even,
saturating: torch's bits (quantize_rows_reference), checked on the GPU. Triton's interpreter casts to FP8 with other
rounding, so the CPU tests quantize with the reference and run the GEMM (kernels/gemm.py, SCALED) on its output.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import launch

E4M3_MAX = 448.0


@dataclass(frozen=True)
class FP8Weight:
    """A frozen W (N, K) in e4m3 twice: w (N, K) with a scale per row (the forward's x W^T) and wt (K, N) with a
    scale per column of W (the backward's dy W)."""
    w: torch.Tensor
    w_scale: torch.Tensor  # fp32 (N,)
    wt: torch.Tensor
    wt_scale: torch.Tensor  # fp32 (K,)

    @property
    def shape(self) -> tuple:
        return tuple(self.w.shape)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) for x (M, K): q e4m3 (M, K), s fp32 (M,), as the module docstring defines them."""
    x = x.float()
    s = x.abs().amax(dim=1) / E4M3_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (x / s[:, None]).to(torch.float8_e4m3fn), s


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    row = tl.cast(tl.program_id(0), tl.int64)
    x_row, q_row = x_ptr + row * stride_xm, q_ptr + row * K
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
    scale = tl.max(amax) / 448.0
    scale = tl.where(scale > 0, scale, 1.0)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_row + offs, tl.math.div_rn(x, scale).to(tl.float8e4nv), mask=offs < K)
    tl.store(s_ptr + row, scale)


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_reference's (q, s) by the kernel; x2 (M, K), any strides. (The interpreter: the
    reference, whose bits the kernel's are on a GPU.)"""
    if launch.INTERPRET:
        return quantize_rows_reference(x2)
    x2 = launch.rows(x2, x2.shape[1])
    M, K = x2.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x2.device)
    s = torch.empty(M, dtype=torch.float32, device=x2.device)
    with launch.on_device(x2):
        launch.run(_quantize_rows_kernel, (M,), (x2, q, s, K, x2.stride(0)), dict(BLOCK_K=1024, num_warps=4))
    return q, s


def quantize_weight(weight: torch.Tensor) -> FP8Weight:
    """W (N, K) as FP8Weight (on W's device; the kernel on a GPU)."""
    quantize = quantize_rows if weight.is_cuda else quantize_rows_reference
    w, w_scale = quantize(weight)
    wt, wt_scale = quantize(weight.t().contiguous())
    return FP8Weight(w, w_scale, wt, wt_scale)
