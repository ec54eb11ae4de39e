"""One token through a 4-bit linear (decoding): y = W x + scale * (s B)^T ... as a matrix-vector product.

At one token a GEMM's tile of 16 rows is 15 rows of padding and its few column tiles leave most of the GPU idle, so
the 4-bit base decoded slower than the bf16 one (bench/README.md). Here each program takes BLOCK_N rows of W and all
of K, on the CUDA cores, and reads W as 32-bit words of eight 4-bit codes: at one token the work is W's bytes and
the instructions that unpack each weight, so those are kept few. A word's eight codes are shifted out of the
register one after another (no byte loads, no per-byte address), each looked up in the 16-entry table (64 bytes of
L1) and multiplied into a running sum per word; the 64-block's absmax multiplies a word's sum, not each value, and
the sums over words and blocks happen once, after the loop. The weight is used in fp32, not rounded to x's dtype
first (more exact than the GEMM, within its rounding), so fused multiply-adds are allowed here.

    y[n] = sum_b absmax[n, b] sum_w sum_q code[nibble q of word (n, 8 b + w)] x[64 b + 8 w + e(q)]
           + scale * sum_r S[r] B^T[r, n]

Word w of a 64-block is bytes 4w .. 4w + 3 (little-endian); byte j holds value 2j in its high nibble and 2j + 1 in
its low one, so the nibble at bits 4q is value e(q) = q + 1 for even q and q - 1 for odd q. S (the forward's
dropout(x) A^T, fp32) and B^T as the GEMM's epilogue takes them (R_PAD = 0: no low-rank term).
"""
import triton
import triton.language as tl

from .nf4_gemm import _absmax


@triton.jit
def _nf4_gemv_kernel(x_ptr, words_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
                     s_ptr, r_ptr, y_ptr, N, K, R, scale, stride_xk, stride_sr, stride_rr, stride_rn,
                     R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
    """y (N,) for x (K,), W (N, K) in NF4 with K % 64 == 0 (whole 64-blocks per row), rows offs_n per program,
    BLOCKS 64-blocks of each row per step."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)  # rows past N read the last one; never stored
    blocks_per_row = K // 64
    w = tl.arange(0, 8)  # the words of a 64-block
    acc = tl.zeros((BLOCK_N, BLOCKS, 8), tl.float32)  # per word: its absmax times its eight products
    for b0 in range(0, blocks_per_row, BLOCKS):
        blk = b0 + tl.arange(0, BLOCKS)
        inside = blk < blocks_per_row  # blocks past the row read its last one, against x = 0
        blocks = rows[:, None] * blocks_per_row + tl.minimum(blk, blocks_per_row - 1)[None, :]  # (BLOCK_N, BLOCKS)
        words = tl.load(words_ptr + blocks[:, :, None] * 8 + w[None, None, :])  # (BLOCK_N, BLOCKS, 8) int32
        col = blk[:, None] * 64 + w[None, :] * 8  # (BLOCKS, 8): each word's first column
        sums = tl.zeros((BLOCK_N, BLOCKS, 8), tl.float32)
        for q in tl.static_range(8):
            x_q = tl.load(x_ptr + (col + q + 1 - 2 * (q % 2)) * stride_xk, mask=inside[:, None], other=0.0)
            sums += tl.load(code_ptr + ((words >> (4 * q)) & 15)) * x_q.to(tl.float32)[None, :, :]
        acc += sums * _absmax(absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, offset, blocks)[:, :, None]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    dt = y_ptr.dtype.element_ty
    if R_PAD > 0:  # the low-rank term, both factors rounded to x's dtype as the GEMM's epilogue rounds them
        offs_r = tl.arange(0, R_PAD)
        s = tl.load(s_ptr + offs_r * stride_sr, mask=offs_r < R, other=0.0)
        b = tl.load(r_ptr + offs_r[None, :] * stride_rr + rows[:, None] * stride_rn, mask=offs_r[None, :] < R,
                    other=0.0)  # (BLOCK_N, R_PAD): B^T's columns of these rows
        y += tl.sum(s.to(dt).to(tl.float32)[None, :] * (b * scale).to(dt).to(tl.float32), axis=1)
    tl.store(y_ptr + offs_n, y.to(dt), mask=offs_n < N)
