"""One token through a 4-bit linear (decoding): y = W x + scale * (s B)^T ... as a matrix-vector product.

At one token a GEMM's tile of 16 rows is 15 rows of padding and its few column tiles leave most of the GPU idle
(Phi-3-mini's o_proj: 48 tiles of 64 columns on 132 SMs), so the 4-bit base decoded slower than the bf16 one
(bench/README.md). Here each program takes BLOCK_N rows of W and a K range, and each weight is read as its 4 bits and
used once, on the CUDA cores. Reading W at the memory's speed needs tens of KB in flight on every SM; a row block
per program gave Phi-3-mini's o_proj and down_proj 384 programs for 132 SMs, each walking K one dependent load after
another. So K is split among programs (grid (row blocks, splits), the launcher picks the splits): each stores its
partial sums and the last of a row block's splits to arrive adds them in split order (lowrank._summed:
deterministic, no second launch) and finishes the row block. W is read as int32 words, 8 codes each, and x in
runs of 8 contiguous values: the first version read bytes and x's even and odd values apart, one load instruction
per byte and per value, and took 1.16x as long (bench/README.md). Both still run at about a quarter of the memory's
speed: the kernel is bound by its instructions (shift, mask, lookup, multiply-add per value), not by the bytes.
A 64-block's absmax multiplies the block's sum, not each of its values; each code is looked up in the 16-entry table
(from memory, one L1 line); the weight is used in fp32, not rounded to x's dtype first (more exact than the GEMM,
within its rounding).

    y[n] = sum_b absmax[n, b] sum_j code[nibble(n, 64 b + j)] x[64 b + j]  +  scale * sum_r S[r] B^T[r, n]

S (the forward's dropout(x) A^T, fp32) and B^T as the GEMM's epilogue takes them (R_PAD = 0: no low-rank term).
"""
import triton
import triton.language as tl

from .lowrank import _summed
from .nf4_gemm import _absmax


@triton.jit
def _nf4_gemv_kernel(x_ptr, words_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
                     s_ptr, r_ptr, y_ptr, partial_ptr, count_ptr, N, K, R, scale, blocks_per_split,
                     stride_xk, stride_sr, stride_rr, stride_rn,
                     R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (N,) for x (K,), W (N, K) in NF4 with K % 64 == 0 (whole 64-blocks per row), read as int32 words (8 codes
    each; a 64-block is 8 words): rows offs_n, 64-blocks blocks_per_split * split .. of them per program
    (blocks_per_split a multiple of BLOCK_K / 64)."""
    NB: tl.constexpr = BLOCK_K // 64  # 64-blocks per step
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)  # rows past N read the last one; never stored
    blocks_per_row = K // 64
    word = tl.arange(0, 8)  # word of a 64-block
    value = tl.arange(0, 8)  # value of a word: 2i is byte i's high nibble (bitsandbytes' order), 2i + 1 its low one
    shift = (value // 2) * 8 + 4 * (1 - value % 2)  # little-endian words: byte i is bits 8i..8i+7
    acc = tl.zeros((BLOCK_N,), tl.float32)
    split = tl.program_id(1)
    for b0 in range(split * blocks_per_split, min((split + 1) * blocks_per_split, blocks_per_row), NB):
        blk = b0 + tl.arange(0, NB)
        inside = blk < blocks_per_row
        blocks = rows[:, None] * blocks_per_row + tl.where(inside, blk, 0)[None, :]  # (BLOCK_N, NB)
        words = tl.load(words_ptr + blocks[:, :, None] * 8 + word[None, None, :])  # (BLOCK_N, NB, 8)
        w = tl.load(code_ptr + ((words[:, :, :, None] >> shift[None, None, None, :]) & 15))  # (BLOCK_N, NB, 8, 8)
        k = blk[:, None, None] * 64 + word[None, :, None] * 8 + value[None, None, :]  # (NB, 8, 8): contiguous
        x = tl.load(x_ptr + k * stride_xk, mask=inside[:, None, None], other=0.0).to(tl.float32)
        block_sums = tl.sum(tl.sum(w * x[None], axis=3), axis=2)  # (BLOCK_N, NB)
        acc += tl.sum(block_sums * _absmax(absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, offset, blocks), axis=1)
    last, acc = _summed(acc, partial_ptr, N, offs_n, offs_n < N, count_ptr + tl.program_id(0), tl.num_programs(1),
                        split)
    if last:
        _finish(acc, s_ptr, r_ptr, y_ptr, offs_n, rows, N, R, scale, stride_sr, stride_rr, stride_rn, R_PAD)


@triton.jit
def _finish(acc, s_ptr, r_ptr, y_ptr, offs_n, rows, N, R, scale, stride_sr, stride_rr, stride_rn, R_PAD: tl.constexpr):
    """y[offs_n] = acc + the low-rank term, in y's dtype."""
    dt = y_ptr.dtype.element_ty
    if R_PAD > 0:  # the low-rank term, both factors rounded to x's dtype as the GEMM's epilogue rounds them
        offs_r = tl.arange(0, R_PAD)
        s = tl.load(s_ptr + offs_r * stride_sr, mask=offs_r < R, other=0.0)
        b = tl.load(r_ptr + offs_r[None, :] * stride_rr + rows[:, None] * stride_rn, mask=offs_r[None, :] < R,
                    other=0.0)  # (BLOCK_N, R_PAD): B^T's columns of these rows
        acc += tl.sum(s.to(dt).to(tl.float32)[None, :] * (b * scale).to(dt).to(tl.float32), axis=1)
    tl.store(y_ptr + offs_n, acc.to(dt), mask=offs_n < N)
