"""The GEMMs of the QLoRA linear (kernels/qlora_linear.py): W stays in bitsandbytes' NF4 format (kernels/nf4_weight.py)
and is dequantized tile by tile inside the K loop, so no 16-bit copy of W is ever written:

    C = A_op W_op + scale * L R     forward: x W^T + S (s B)^T      backward: dy W + (G A) * mask
    W[n, k] = code[nibble(i)] * absmax[i // 64],  i = n K + k       fp32 product, rounded once to x's dtype

`_nf4_gemm_kernel` is `_lora_gemm_kernel` (kernels/gemm.py: pointer loads, grouped tile order, fp32 accumulator, the
same low-rank epilogue) with the W tile made from NF4 in registers before each tl.dot. Two layouts of that tile:
  K % 64 == 0 (every Phi shape): each row of W holds whole 64-blocks, so a tile of 64-multiple columns is whole
    blocks: one absmax per (row, block), and each row's bytes are contiguous, loaded as (rows, blocks, 32) and split
    into their two nibbles in registers (tl.join + reshape: the high nibble is the even element).
  any K: a 64-block may straddle two rows: the absmax of the (at most COLS / 64 + 1) blocks a row's columns touch,
    per row, then per element its byte, nibble and block among those.
The 16 NF4 values and a row's absmax are looked up in registers (tl.gather: warp shuffles). Gathers from memory
would be staged through shared memory by Triton's pipeliner, 4 bytes per value per stage (196 to 450 KB of it per
program in the sm90 IR of an earlier version); the only per-element load is the packed byte.
`_nf4_dequantize_kernel` writes W dense (the "nf4-cublas" kind: then cuBLAS; and qlora_linear.dequantize).

Bit-exactness with dequantize_reference: absmax = nested_code[q] * nested_absmax + offset must round twice, as torch
computes it, so the launches pass enable_fp_fusion=False (no fused multiply-add; tl.dot is unaffected). Flat indices
are int32 (the launcher checks N K < 2^31). Tile elements outside W read a clamped, valid index (a finite value):
in the K direction the other operand is zero there, in the output direction they are never stored.
"""
import triton
import triton.language as tl

from . import nf4_weight
from .gemm import _add_low_rank, _tile_coords

NESTED_BLOCK = tl.constexpr(nf4_weight.NESTED_BLOCK)  # absmax values per nested absmax


@triton.jit
def _absmax(absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, offset, blocks):
    """The fp32 scale of each 64-block index in `blocks` (valid indices), from its double-quantized form; without
    one (nested_code_ptr None: a compile-time constant) absmax_code_ptr holds the fp32 absmax itself."""
    if nested_code_ptr is None:
        absmax = tl.load(absmax_code_ptr + blocks)
    else:
        q = tl.load(absmax_code_ptr + blocks).to(tl.int32)
        absmax = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + blocks // NESTED_BLOCK) + offset
    return absmax


@triton.jit
def _nibbles(byte, scale, code):
    """code[nibble] * scale for both 4-bit codes of each byte of `byte` (rows, blocks, 32): (rows, blocks, 32, 2),
    the high nibble first (it is the even flat index); scale broadcasts. `code` (16,) is in registers and tl.gather
    reads it by warp shuffles: a gather from memory would be staged through shared memory by the pipeliner, 4 bytes
    per value and stage."""
    byte = byte.to(tl.int32)
    table = tl.broadcast_to(code[None, None, :], (byte.shape[0], byte.shape[1], 16))
    return tl.join(tl.gather(table, byte >> 4, 2) * scale, tl.gather(table, byte & 15, 2) * scale)


@triton.jit
def _tile_whole_blocks(packed_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code, offset,
                       rows, col0, n_cols, COLS: tl.constexpr):
    """W[rows, col0 : col0 + COLS] (len(rows), COLS) fp32 where n_cols % 64 == 0 and col0, COLS are multiples of 64:
    block b of a row is bytes 32 b .. 32 b + 31, so the tile is (rows, COLS / 64 blocks, 32 bytes). Blocks past the
    row's end (the last K step) read block 0."""
    blocks_per_row = n_cols // 64
    blk = col0 // 64 + tl.arange(0, COLS // 64)
    blocks = tl.where(blk[None, :] < blocks_per_row, rows[:, None] * blocks_per_row + blk[None, :], 0)  # (rows, nb)
    scale = _absmax(absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, offset, blocks)
    byte = tl.load(packed_ptr + blocks[:, :, None] * 32 + tl.arange(0, 32)[None, None, :])  # (rows, nb, 32)
    return tl.reshape(_nibbles(byte, scale[:, :, None], code), (rows.shape[0], COLS))


@triton.jit
def _tile_any(packed_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code, offset,
              rows, col0, n_cols, COLS: tl.constexpr):
    """W[rows, col0 : col0 + COLS] fp32 for any n_cols (a 64-block may straddle two rows): a row's COLS values lie
    in at most COLS / 64 + 1 blocks, whose absmax is found per row; each element then takes its byte (flat index
    i // 2), its nibble (high for even i) and the absmax of its block among the row's. Columns past n_cols read the
    row's last element."""
    cols = tl.minimum(col0 + tl.arange(0, COLS), n_cols - 1)
    flat = rows[:, None] * n_cols + cols[None, :]  # (rows, COLS)
    first = (rows * n_cols + col0) // 64  # the row's first block
    last = (rows * n_cols + n_cols - 1) // 64
    blocks = tl.minimum(first[:, None] + tl.arange(0, 2 * COLS // 64)[None, :], last[:, None])  # (rows, 2 COLS / 64)
    scales = _absmax(absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, offset, blocks)
    scale = tl.gather(scales, flat // 64 - first[:, None], 1)
    byte = tl.load(packed_ptr + flat // 2).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    return tl.gather(tl.broadcast_to(code[None, :], (rows.shape[0], 16)), nibble, 1) * scale


@triton.jit
def _w_tile(packed_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code, offset,
            rows, col0, n_cols, COLS: tl.constexpr, WHOLE_BLOCKS: tl.constexpr):
    """W[rows, col0 : col0 + COLS] fp32, rows valid indices, col0 < n_cols."""
    tl.static_assert(COLS % 64 == 0, "W tiles span whole multiples of 64 columns")
    if WHOLE_BLOCKS:
        w = _tile_whole_blocks(packed_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code, offset,
                               rows, col0, n_cols, COLS)
    else:
        w = _tile_any(packed_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code, offset,
                      rows, col0, n_cols, COLS)
    return w


@triton.jit(do_not_specialize=["seed"])
def _nf4_gemm_kernel(a_ptr, packed_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
                     l_ptr, r_ptr, c_ptr, M, N, K, R, scale, seed, p, inv_keep,
                     stride_am, stride_ak, stride_lm, stride_lr, stride_rr, stride_rn, stride_cm,
                     W_T: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, DOT_PREC: tl.constexpr, R_PAD: tl.constexpr,
                     BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (M, N) = A_op (M, K) W_op + scale * L R   with L (M, R) fp32, R (R, N), C contiguous; fp32 accumulator.

    W_T (the forward): W_op = W^T, W (N, K): the W tile is rows offs_n x the K step's columns, transposed.
    else (dx):         W_op = W,   W (K, N): the K step's rows x columns offs_n.
    The tile is dequantized to A_op's dtype (fp32 then one rounding) before the dot. R_PAD = 0: no low-rank term.
    """
    dt = c_ptr.dtype.element_ty
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows x stride passes 2^31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    code = tl.load(code_ptr + tl.arange(0, 16))  # the 16 NF4 values, held in registers
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        if W_T:
            w = tl.trans(_w_tile(packed_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code, offset,
                                 offs_n % N, k0, K, BLOCK_K, WHOLE_BLOCKS))
        else:  # rows past K clamped: A_op is zero there
            w = _w_tile(packed_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code, offset,
                        tl.minimum(k0 + offs_k, K - 1), pid_n * BLOCK_N, N, BLOCK_N, WHOLE_BLOCKS)
        acc = tl.dot(a, w.to(dt), acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
    acc = _add_low_rank(acc, l_ptr, r_ptr, offs_m, pid_n * BLOCK_N, M, N, R, scale, seed, p, inv_keep,
                        stride_lm, stride_lr, stride_rr, stride_rn, dt, DOT_PREC, R_PAD, BLOCK_R, DROPOUT)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(dt),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, out_ptr,
                           n, BLOCKS: tl.constexpr):
    """out[i] = W[i] for the flat index i < n = N K, in out's dtype: BLOCKS 64-blocks per program, each block's 32
    bytes split into nibbles in registers (the last block may be partial: its bytes and values are masked)."""
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    scale = _absmax(absmax_code_ptr, nested_absmax_ptr, nested_code_ptr, offset, tl.minimum(blocks, (n - 1) // 64))
    byte_idx = blocks[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (n + 1) // 2, other=0)  # (BLOCKS, 1, 32)
    w = tl.reshape(_nibbles(byte, scale[:, None, None], tl.load(code_ptr + tl.arange(0, 16))), (BLOCKS, 64))
    flat = blocks[:, None] * 64 + tl.arange(0, 64)[None, :]
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=flat < n)
