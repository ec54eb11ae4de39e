"""DoRA's two kernels: its weight norm in one pass over W, never writing W + s B A, and its output scale g * L.

The weight norm (phi3/ops.py: dora_weight_norm; its torch spec dora_weight_norm_reference):

    norm[n] = || W[n, :] + s B[n, :] A ||_2      (out,) fp32, for every output row n
    W (out, in) bf16 / fp16 / fp32, or an NF4Weight dequantized in registers (nf4_gemm's tiles: the fp32 values
    dequantize_reference(W, float32) gives); A (r, in), B (out, r) the LoRA factors (a per-slice B is just a dense,
    block-diagonal one); s a float.

A program owns BLOCK_N rows and a split of the columns. Each BLOCK_K step makes v = W + s B A for its tile by one
tl.dot (W the addend): the program's rows of s B (BLOCK_N, r) are loaded once, A's (r, BLOCK_K) columns per step
(staged by Triton's pipeliner); the squares of v are summed per row in fp32. The rank is padded to 16 and taken in
chunks of 64; past 64 (r > 64) the other chunks are an inner loop re-reading their rows of s B from cache, which
costs the K loop its pipelining but keeps shared memory at one chunk's tiles for any rank (a dot-bound case anyway).
W itself is loaded one step ahead by hand: the pipeliner stages only loads that feed a dot's operands.
Splits: out = 3072 (o, down) is 48 row blocks of 64, too few programs to keep an H100's 132 SMs reading, so `in` is
split until the grid is about SKINNY_WAVES waves; each program stores its partial sums and the last of a row block's
programs to finish adds them in order and takes the square root (lowrank's `_summed`: one launch, deterministic).

Precision: the dot runs as 3xTF32 (input_precision "tf32x3": A and s B split into a tf32 head and tail, three
tensor-core dots), ~2^-21 relative per product. Plain tf32 keeps 10 of A's and s B's 23 mantissa bits: where s B A
is as large as W (the tests' inputs) the norm is off by ~6000 fp32 ulps with the operands truncated, ~1400 with them
rounded, against ~2 for torch's fp32 (emulated on the CPU at Phi-3-mini shapes; 3xTF32: ~1). "ieee" fp32 would run
on the CUDA cores: 2 r FLOPs per weight, their whole rate at r = 16 with bf16 W at memory speed. 3xTF32 costs
6 r_pad tensor-core FLOPs per weight: bf16 W stays memory-bound up to r ~ 32 on an H100; NF4 W (4x fewer bytes) and
large ranks are bound by the dots (and NF4's dequantization) instead.

The output scale (phi3/ops.py: column_scale; its torch spec column_scale_reference): y = (L * g).to(L.dtype), L
(..., N) the fused LoRA layer's output, g = m / ||W + s B A|| (N,) fp32. In torch, `(L * g).to(dtype)` makes an fp32
copy of L forward; its backward makes three more full fp32 passes (the cast's gradient, dy * g, and dy * L for g's
gradient): about 12 bytes per element forward and 34 back against 4 and 6 here (with the norm kept for the recompute,
a DoRA step with dropout at Phi-3-mini's shapes went from 1.04 to 0.84 s on an H100: bench/README.md). Forward: one
read of L, one write of y. Backward: one read of dy and L, one write of dL = (dy g).to(dtype) and of each row block's
partial column sums of dy * L (fp32), which one small torch sum over the row blocks finishes: no atomics, so a resumed
run repeats bit for bit.
"""
import torch
import triton
import triton.language as tl

from . import choices, launch
from .lora_linear import SKINNY_WAVES, _r_blocks, _split
from .lowrank import _summed
from .nf4_gemm import _w_tile
from .nf4_weight import NF4Weight
from .qlora_linear import _nf4


@triton.jit
def _w_cols(w_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, stride_wn, offs_n, k0, N, K,
            NF4: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, k0 : k0 + BLOCK_K] in W's dtype (NF4: fp32), k0 < K, zero past column K (rows past N: never
    stored)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    if NF4:  # dequantized in registers, from clamped (valid) rows and columns
        code = tl.load(code_ptr + tl.arange(0, 16))
        w = _w_tile(w_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code, offset,
                    tl.minimum(offs_n, N - 1), k0, K, BLOCK_K, WHOLE_BLOCKS)
        w = tl.where(cols[None, :] < K, w, 0.0)
    else:
        rows = tl.cast(offs_n, tl.int64) * stride_wn  # int64: no W is too large for its offsets
        w = tl.load(w_ptr + rows[:, None] + cols[None, :], mask=(offs_n[:, None] < N) & (cols[None, :] < K),
                    other=0.0)
    return w


@triton.jit
def _scaled_b(b_ptr, offs_n, r0, N, R, scale, stride_bn, stride_br, BLOCK_R: tl.constexpr):
    """s B[offs_n, r0 : r0 + BLOCK_R] fp32, zero past row N and rank R (the rank padding)."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
    return b.to(tl.float32) * scale


@triton.jit
def _a_cols(a_ptr, r0, k0, R, K, stride_ar, stride_ak, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """A[r0 : r0 + BLOCK_R, k0 : k0 + BLOCK_K] fp32, zero past rank R and column K."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    cols = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=(offs_r[:, None] < R) & (cols[None, :] < K), other=0.0)
    return a.to(tl.float32)


@triton.jit
def _dora_norm_kernel(w_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, stride_wn,
                      a_ptr, b_ptr, parts_ptr, count_ptr, norm_ptr, N, K, R, scale, k_per_split,
                      stride_ar, stride_ak, stride_bn, stride_br,
                      NF4: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, R_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """norm[n] = sqrt(sum_k v[n, k]^2), v = W + s B A: rows of row block program_id(0), columns of split program_id(1)
    ([split k_per_split, (split + 1) k_per_split), whole BLOCK_K steps); the last split of a row block to finish
    stores the norm. W: dense (NF4 False: w_ptr, its row stride) or NF4 (w_ptr = packed bytes, kernels/nf4_gemm.py).
    """
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    sb = _scaled_b(b_ptr, offs_n, 0, N, R, scale, stride_bn, stride_br, BLOCK_R)  # the first rank chunk, held
    acc = tl.zeros((BLOCK_N,), tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # W one step ahead (the pipeliner stages only A); the last step re-reads its own tile, from cache
    w_next = _w_cols(w_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, stride_wn, offs_n,
                     k_start, N, K, NF4, WHOLE_BLOCKS, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        w = w_next
        w_next = _w_cols(w_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, stride_wn,
                         offs_n, tl.where(k0 + BLOCK_K < k_end, k0 + BLOCK_K, k0), N, K, NF4, WHOLE_BLOCKS, BLOCK_K)
        v = tl.dot(sb, _a_cols(a_ptr, 0, k0, R, K, stride_ar, stride_ak, BLOCK_R, BLOCK_K), w.to(tl.float32),
                   input_precision="tf32x3")
        if R_PAD > BLOCK_R:  # r > 64: the other rank chunks, each re-reading its s B from cache
            for r0 in range(BLOCK_R, R, BLOCK_R):
                v = tl.dot(_scaled_b(b_ptr, offs_n, r0, N, R, scale, stride_bn, stride_br, BLOCK_R),
                           _a_cols(a_ptr, r0, k0, R, K, stride_ar, stride_ak, BLOCK_R, BLOCK_K), v,
                           input_precision="tf32x3")
        acc += tl.sum(v * v, axis=1)
    rows = offs_n < N
    last, total = _summed(acc, parts_ptr, N, offs_n, rows, count_ptr + pid_n, tl.num_programs(1), split)
    if last:
        tl.store(norm_ptr + offs_n, tl.sqrt_rn(total), mask=rows)


def _w_args(weight, K):
    """The kernel's W arguments: NF4's tensors and offset (qlora_linear._nf4), or the dense W (unit column stride)
    with no NF4 tensors; then W's row stride."""
    if isinstance(weight, NF4Weight):
        return *_nf4(weight), K
    w = launch.rows(weight, K)
    return w, None, None, None, None, 0.0, w.stride(0)


def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """|| W[n, :] + scale B[n, :] A ||_2 for every row n, (out,) fp32. weight: (out, in) dense or an NF4Weight,
    lora_A (r, in), lora_B (out, r), on one GPU (or the interpreter's CPU)."""
    (N, K), R = weight.shape, lora_A.shape[0]
    assert lora_A.shape == (R, K) and lora_B.shape == (N, R), "A (r, in) and B (out, r) must fit W (out, in)"
    w_args, nf4 = _w_args(weight, K), isinstance(weight, NF4Weight)
    norm = launch.empty(N, dtype=torch.float32, device=lora_A.device)
    r_pad, block_r = _r_blocks(R)
    # NF4: no fused multiply-add, so the absmax rounds twice as the spec computes it (kernels/nf4_gemm.py)
    meta = dict(NF4=nf4, WHOLE_BLOCKS=K % 64 == 0, R_PAD=r_pad, BLOCK_R=block_r, enable_fp_fusion=not nf4)

    def go(cfg):
        row_blocks = launch.cdiv(N, cfg["BLOCK_N"])
        per, splits = _split(K, launch.cdiv(SKINNY_WAVES * launch.num_sms(norm.device), row_blocks), cfg["BLOCK_K"])
        # one split stores no partial: norm stands in
        parts = torch.empty(splits, N, dtype=torch.float32, device=norm.device) if splits > 1 else norm
        args = (*w_args, lora_A, lora_B, parts, launch.counters(norm.device, row_blocks), norm, N, K, R, float(scale),
                per, lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1))
        launch.run(_dora_norm_kernel, (row_blocks, splits), args, {**meta, **cfg})

    with launch.on_device(norm):
        choices.launch_with("nf4.dora" if nf4 else "dora", "dora-norm", choices.key(1, N, K, R, False), w_args[0], go)
    return norm


# -------------------------------------------------------------------------------------------------- the output scale
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


class ColumnScaleFunction(torch.autograd.Function):
    """y = (L * g).to(L.dtype). Gradients: dL = (dy g).to(dtype), dg = sum over rows of dy * L (fp32)."""

    @staticmethod
    def forward(ctx, L, g):
        L2, g = L.reshape(-1, L.shape[-1]).contiguous(), g.float().contiguous()
        y = launch.empty(*L2.shape, dtype=L.dtype, device=L.device)
        _launch(_scale_fwd_kernel, L2, g, y)
        ctx.save_for_backward(L2, g)
        return y.view(L.shape)

    @staticmethod
    def backward(ctx, dy):
        L2, g = ctx.saved_tensors
        dL = launch.empty(*L2.shape, dtype=L2.dtype, device=L2.device)
        parts = launch.empty(launch.cdiv(L2.shape[0], _BLOCK_M), L2.shape[1], dtype=torch.float32, device=L2.device)
        _launch(_scale_bwd_kernel, dy.reshape(L2.shape).contiguous(), L2, g, dL, parts)
        return dL.view(dy.shape), parts.sum(0)


def _launch(kernel, *tensors):
    """One program per BLOCK_M x BLOCK_N tile of the (M, N) operands (the first tensor's shape)."""
    M, N = tensors[0].shape
    with launch.on_device(tensors[0]):
        launch.run(kernel, (launch.cdiv(M, _BLOCK_M), launch.cdiv(N, _BLOCK_N)), (*tensors, M, N),
                   dict(BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N))
