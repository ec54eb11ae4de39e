"""Fused LoRA linear: y = x W^T + s * (dropout(x) A^T) B^T, W frozen.

Shapes: x (..., in), W (out, in) frozen, A (r, in), B (out, r) (A, B usually fp32 master weights), s float.

Design (LoRAFusion-style; numbers in bench/NOTES-lora.md):
  forward   S  = dropout(x) A^T                    (M, r) fp32   skinny kernel, one pass over x
            y  = x W^T + S (s B)^T                 (M, out)      one GEMM; LoRA term added to the fp32
                                                                 accumulator after the K loop, y stored once
  backward  G  = s dy B,  dB = s dy^T S            one pass over dy (both skinny products)
            dx = dy W + G A                        one GEMM, same kernel as the forward (other strides)
            dA = G^T dropout(x)                    skinny kernel, one pass over x, mask regenerated from the seed
Saved for backward: x, S (M x r fp32) and the seed; never a W gradient, never an (out x in) temporary.
Dropout is Philox (tl.rand) keyed by (seed, row * in + col): `dropout_mask` materializes the same mask for tests.

GEMM choice (module switch GEMM, env LORA_GEMM): "triton" = the fused Triton GEMM above; "cublas" = the
low-rank term L R is written into the output by the same Triton kernel with K=0, then cuBLAS accumulates
x W^T into it in place (addmm_ with beta=1): one extra write + read of y, but cuBLAS's main loop.
"""
import contextlib
import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GEMM = os.environ.get("LORA_GEMM", "auto")  # "auto" | "tma" | "triton" (pointer loads) | "cublas" (hybrid)
AUTOTUNE = os.environ.get("LORA_AUTOTUNE", "1") == "1"  # False: first config of each list (fast GPU tests)
FAST_LAUNCH = os.environ.get("LORA_FAST_LAUNCH", "1") == "1"  # False: every launch through Triton's launcher
# Below this many tokens the first config is used untuned: tuning a small problem costs far more than it can win,
# and short unpadded batches (chat data) would otherwise tune every kernel for several small M buckets.
AUTOTUNE_MIN_M = 2048
POISON_OUTPUTS = False  # tests set True: kernel-written buffers are filled with NaN before launch


def _empty(*shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dropout(x, seed, offs_m, offs_k, n_cols, p, inv_keep, DROPOUT: tl.constexpr):
    """keep with probability 1-p, scale kept values by 1/(1-p); Philox counter = row * n_cols + col (int32)."""
    if DROPOUT:
        rnd = tl.rand(seed, offs_m[:, None] * n_cols + offs_k[None, :])
        x = tl.where(rnd >= p, x.to(tl.float32) * inv_keep, 0.0).to(x.dtype)
    return x


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(out_ptr, M, K, seed, p, inv_keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, k] = keep(seed, m, k) / (1 - p), the exact multiplier the other kernels apply to x."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ones = tl.full((BLOCK_M, BLOCK_K), 1.0, tl.float32)
    mask = _dropout(ones, seed, offs_m, offs_k, K, p, inv_keep, True)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], mask,
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit(do_not_specialize=["seed"])
def _lora_down_kernel(x_ptr, a_ptr, s_ptr, M, K, R, seed, p, inv_keep,
                      stride_xm, stride_xk, stride_ar, stride_ak, M_BUCKET,
                      DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """S[m, j] = sum_k dropout(x)[m, k] A[j, k]   (M, R) fp32; rank chunk of BLOCK_R per program axis 1.
    Persistent: the programs (a wave or two) walk the row tiles, so no partly filled last wave idles the GPU.
    (TMA loads were measured no faster than these pointer loads for the skinny kernels: bench/NOTES-lora.md.)"""
    dt = x_ptr.dtype.element_ty
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
            x = _dropout(x, seed, offs_m, ks, K, p, inv_keep, DROPOUT)
            a = tl.load(a_ptr + offs_r[None, :] * stride_ar + ks[:, None] * stride_ak,
                        mask=(offs_r[None, :] < R) & (ks[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R)
            acc = tl.dot(x, a.to(dt), acc, input_precision=DOT_PREC)
        tl.store(s_ptr + offs_m[:, None] * R + offs_r[None, :], acc,
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles walk the column tiles together, so they share B_op tiles in L2."""
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group) % group_m, (tile % group) // group_m


@triton.jit
def _add_low_rank(acc, l_ptr, r_ptr, offs_m, offs_n, M, N, R, scale, seed, p, inv_keep,
                  stride_lm, stride_lr, stride_rr, stride_rn, dt: tl.constexpr, DOT_PREC: tl.constexpr,
                  R_PAD: tl.constexpr, BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr):
    """GEMM epilogue: acc + scale * L[offs_m] R[:, offs_n], in the fp32 accumulator before the one store of C.
    DROPOUT (backward only): the low-rank term is multiplied by the dropout mask of element (m, n) of x."""
    rows = offs_m % M  # wrap out-of-range rows/cols onto valid memory; those elements are never stored
    cols = offs_n % N
    if DROPOUT:
        low = tl.zeros(acc.shape, tl.float32)
    else:
        low = acc  # accumulate straight into the main accumulator
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in tl.static_range(0, R_PAD, BLOCK_R):  # rank padded to >= 16 for tl.dot
        rs = r0 + offs_r
        lo = tl.load(l_ptr + rows[:, None] * stride_lm + rs[None, :] * stride_lr, mask=rs[None, :] < R, other=0.0)
        ro = tl.load(r_ptr + rs[:, None] * stride_rr + cols[None, :] * stride_rn, mask=rs[:, None] < R, other=0.0)
        low = tl.dot(lo.to(dt), (ro * scale).to(dt), low, input_precision=DOT_PREC)
    if DROPOUT:
        return acc + _dropout(low, seed, offs_m, offs_n, N, p, inv_keep, True)
    return low


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_kernel(a_ptr, b_ptr, l_ptr, r_ptr, c_ptr, M, N, K, R, scale, seed, p, inv_keep,
                      stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_rr, stride_rn,
                      stride_cm, stride_cn, M_BUCKET,
                      DOT_PREC: tl.constexpr, R_PAD: tl.constexpr, BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A_op B_op + scale * L R   with A_op (M, K), B_op (K, N), L (M, R) fp32, R (R, N); fp32 accumulator.

    forward:  A_op = x, B_op = W^T, L = S, R = B^T, scale = s.   backward: A_op = dy, B_op = W, L = G, R = A, scale = 1.
    Pointer loads: the portable GEMM (any strides, any GPU); _lora_gemm_tma_kernel is the Hopper one.
    """
    dt = c_ptr.dtype.element_ty
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = _add_low_rank(acc, l_ptr, r_ptr, offs_m, offs_n, M, N, R, scale, seed, p, inv_keep,
                        stride_lm, stride_lr, stride_rr, stride_rn, dt, DOT_PREC, R_PAD, BLOCK_R, DROPOUT)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(dt),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_tma_kernel(a_ptr, b_ptr, c_ptr, l_ptr, r_ptr, M, N, K, R, scale, seed, p, inv_keep,
                          stride_am, stride_b, stride_cm, stride_lm, stride_lr, stride_rr, stride_rn, M_BUCKET,
                          B_KMAJOR: tl.constexpr, DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, R_PAD: tl.constexpr,
                          BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr, NUM_SMS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          SUBTILE: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr):
    """The same C = A_op B_op + scale * L R, Hopper style: a persistent grid of NUM_SMS programs walking the
    tiles, operands fetched by the tensor-memory engine (TMA descriptors: async, pipelined num_stages deep, zero
    fill past the edges), C stored by TMA. B_KMAJOR: b_ptr holds B_op^T (N, K), i.e. W itself in the forward.
    SUBTILE stores C in two halves, which frees shared memory for one more pipeline stage. DTYPE: autotune key.
    The descriptors are built on the device (needs triton.set_allocator): host-built ones cost tens of
    microseconds of host time per launch."""
    dt = c_ptr.dtype.element_ty
    a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
    if B_KMAJOR:
        b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [stride_b, 1], [BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, [K, N], [stride_b, 1], [BLOCK_K, BLOCK_N])
    if SUBTILE:
        c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N // 2])
    else:
        c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_c = tl.program_id(0) - NUM_SMS  # epilogue's own tile counter (the loop's may be pipelined ahead)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            if B_KMAJOR:
                b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K]).T
            else:
                b = b_desc.load([ki * BLOCK_K, pid_n * BLOCK_N])
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        tile_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _add_low_rank(acc, l_ptr, r_ptr, offs_m, offs_n, M, N, R, scale, seed, p, inv_keep,
                            stride_lm, stride_lr, stride_rr, stride_rn, dt, DOT_PREC, R_PAD, BLOCK_R, DROPOUT)
        if SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            c0, c1 = tl.split(halves)
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], c0.to(dt))
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], c1.to(dt))
        else:
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(dt))


@triton.jit
def _lora_dy_kernel(dy_ptr, b_ptr, s_ptr, gp_ptr, dbp_ptr, M, N, R, scale, gn, cols_per_item,
                    stride_dym, stride_dyn, stride_bn, stride_br, M_BUCKET,
                    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One pass over dy for both skinny products. Work item (pm, pn) = row block pm, column range pn:
        Gp[pn]      = s dy[rows, cols] B[cols]      G accumulates in registers over the column loop
        dBp[pm][c]  = s dy[rows, c]^T S[rows]       one partial per (row block, column block), no read-modify-write
    The launcher sums Gp over pn (G = s dy B) and dBp over pm (dB = s dy^T S); the programs walk the items.
    """
    dt = dy_ptr.dtype.element_ty
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    for item in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * gn, tl.num_programs(0)):
        pm = item // gn
        pn = item % gn
        offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        mr = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        s = tl.load(s_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mr, other=0.0).to(dt)  # (BLOCK_M, BLOCK_R)
        g = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        n_start = pn * cols_per_item
        n_end = min(n_start + cols_per_item, N)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nr = (offs_n[:, None] < n_end) & (offs_r[None, :] < R)
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_end), other=0.0)
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=nr, other=0.0)
            g = tl.dot(dy, (b * scale).to(dt), g, input_precision=DOT_PREC)
            db = tl.dot(tl.trans(dy), s, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_R)
            tl.store(dbp_ptr + pm * N * R + offs_n[:, None] * R + offs_r[None, :], db * scale, mask=nr)
        tl.store(gp_ptr + pn * M * R + offs_m[:, None] * R + offs_r[None, :], g, mask=mr)


@triton.jit(do_not_specialize=["seed"])
def _lora_da_kernel(x_ptr, g_ptr, dap_ptr, M, K, R, seed, p, inv_keep, gm, rows_per_item,
                    stride_xm, stride_xk, M_BUCKET,
                    DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dAp[pm, j, k] = sum_{m in rows(pm)} G[m, j] dropout(x)[m, k]; the mask is regenerated from the seed.
    Work item (column block, pm); computed as dA^T tiles = dropout(x)^T G (BLOCK_K x BLOCK_R) so the tensor-core
    M dimension is BLOCK_K. The programs walk the items."""
    dt = x_ptr.dtype.element_ty
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    for item in tl.range(tl.program_id(0), tl.cdiv(K, BLOCK_K) * gm, tl.num_programs(0)):
        pm = item % gm
        offs_k = (item // gm) * BLOCK_K + tl.arange(0, BLOCK_K)
        m_start = pm * rows_per_item
        m_end = min(m_start + rows_per_item, M)
        acc = tl.zeros((BLOCK_K, BLOCK_R), tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=(offs_m[:, None] < m_end) & (offs_k[None, :] < K), other=0.0)
            x = _dropout(x, seed, offs_m, offs_k, K, p, inv_keep, DROPOUT)
            g = tl.load(g_ptr + offs_m[:, None] * R + offs_r[None, :],
                        mask=(offs_m[:, None] < m_end) & (offs_r[None, :] < R), other=0.0)  # (BLOCK_M, BLOCK_R)
            acc = tl.dot(tl.trans(x), g.to(dt), acc, input_precision=DOT_PREC)
        tl.store(dap_ptr + pm * R * K + offs_r[None, :] * K + offs_k[:, None], acc,
                 mask=(offs_r[None, :] < R) & (offs_k[:, None] < K))


# ---------------------------------------------------------------------------------------------- launchers
def _cfg(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def _prune_gemm(configs, named_args, **kw):  # drop tiles far larger than the problem (tests, small M)
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(128, named_args["M"])]
    return keep or configs[:1]


_GEMM_CONFIGS = [_cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
                 _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
                 _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                 _cfg(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                 _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)]
def _tma_cfg(num_warps, num_stages, bm, bn, bk, subtile=True, flatten=False, group=8, warp_spec=False):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, SUBTILE=subtile, FLATTEN=flatten,
                              WARP_SPEC=warp_spec),
                         num_warps=num_warps, num_stages=num_stages)


# 128 x 256 x 64 tiles, two consumer warpgroups: the shape cuBLAS-class Hopper GEMMs use for bf16
_TMA_CONFIGS = [_tma_cfg(8, 3, 128, 256, 64), _tma_cfg(8, 4, 128, 256, 64), _tma_cfg(8, 3, 128, 256, 64, subtile=False),
                _tma_cfg(8, 4, 256, 128, 64), _tma_cfg(8, 4, 128, 128, 64)]
_TMA_PLAIN = _TMA_CONFIGS[0]
_TMA_SMALL = _tma_cfg(1, 1, 32, 32, 32, subtile=True, flatten=True)  # interpreter
# memory-bound skinny kernels: many programs and deep pipelines keep enough bytes in flight
_DOWN_CONFIGS = [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(8, 3, BLOCK_M=64, BLOCK_K=256), _cfg(4, 4, BLOCK_M=32, BLOCK_K=256),
                 _cfg(4, 6, BLOCK_M=32, BLOCK_K=128)]
_DY_CONFIGS = [_cfg(8, 3, BLOCK_N=128), _cfg(8, 4, BLOCK_N=64), _cfg(4, 3, BLOCK_N=64)]  # BLOCK_M fixed: _DY_ROWS
_DA_CONFIGS = [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(8, 3, BLOCK_M=64, BLOCK_K=256), _cfg(4, 6, BLOCK_M=32, BLOCK_K=128)]
SKINNY_WAVES = 2  # persistent skinny kernels: programs = this many waves of the GPU's SMs
# rows per dy-pass work item, for outputs up to 4096 wide and wider: more rows = fewer dB partials to write and
# sum, fewer rows = more items, which narrow outputs need to fill the GPU (sets buffer sizes, so not autotuned)
_DY_ROWS_NARROW, _DY_ROWS = 256, 256
_SPLIT = 256  # per-program row/col ranges are multiples of every block size above
_tuned = {
    "gemm": triton.autotune(_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R_PAD", "DROPOUT"],
                            prune_configs_by={"early_config_prune": _prune_gemm})(_lora_gemm_kernel),
    "tma": triton.autotune(_TMA_CONFIGS, key=["M_BUCKET", "N", "K", "R_PAD", "DROPOUT", "B_KMAJOR", "DTYPE"],
                           prune_configs_by={"early_config_prune": _prune_gemm})(_lora_gemm_tma_kernel),
    "down": triton.autotune(_DOWN_CONFIGS, key=["M_BUCKET", "K", "R"])(_lora_down_kernel),
    "dy": triton.autotune(_DY_CONFIGS, key=["M_BUCKET", "N", "R"])(_lora_dy_kernel),
    "da": triton.autotune(_DA_CONFIGS, key=["M_BUCKET", "K", "R"])(_lora_da_kernel),
}
_KERNELS = {"gemm": _lora_gemm_kernel, "tma": _lora_gemm_tma_kernel, "down": _lora_down_kernel,
            "dy": _lora_dy_kernel, "da": _lora_da_kernel}
_SMALL = dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=4, BLOCK_M=32)  # interpreter: small blocks, no autotune
_best = {}  # autotune key -> chosen config, read once per key so later launches skip the autotuner


def _cdiv(a, b):
    return -(-a // b)  # plain ints: triton.cdiv is a constexpr function, microseconds per host-side call


def _next_pow2(n):
    return 1 << (n - 1).bit_length()


def _m_bucket(m: int) -> int:
    """Autotune key for the token count: powers of two, so batches of new lengths reuse a tuned config
    instead of re-running the autotuner (training on unpadded chat data sees a new M almost every step)."""
    return _next_pow2(max(int(m), 16))


def _plain_config(name, dtype):
    """The config used untuned: the first of each list; TMA by element size (fp32 tiles must fit shared memory)."""
    if name == "tma":
        return _TMA_SMALL if INTERPRET else _TMA_PLAIN
    cfg = _tuned[name].configs[0]
    if INTERPRET:
        return triton.Config({k: v for k, v in _SMALL.items() if k in cfg.kwargs})
    if dtype == torch.float32:  # tiles of <= 64 and two stages: fp32 tiles are twice the bytes of 16-bit ones
        small = {k: min(v, 64) if k.startswith("BLOCK_") else v for k, v in cfg.kwargs.items()}
        return triton.Config(small, num_warps=cfg.num_warps, num_stages=2)
    return cfg


def _launch(name, grid, args, meta, dtype):
    """Launch kernel `name`: autotuned on the GPU (keys: shapes only, M bucketed), a fixed config under the
    interpreter, with AUTOTUNE off, for small M and for fp32 (a correctness path: see _plain_config). The first launch per autotune key goes through
    the autotuner; later ones reuse its choice directly (the autotuner's per-call bookkeeping costs host time)."""
    fn = _KERNELS[name]
    cfg = None
    tuned = AUTOTUNE and not INTERPRET and meta["M_BUCKET"] >= AUTOTUNE_MIN_M and dtype != torch.float32
    if name == "tma" and not INTERPRET:
        # device-built TMA descriptors live in per-launch scratch memory from this allocator; Triton keeps it
        # per thread (a context variable) and autograd runs the backward on its own thread, so set it every time
        triton.set_allocator(_scratch)
    if tuned:
        tuner = _tuned[name]
        named = {**dict(zip(fn.arg_names, args)), **meta}
        key = (name, dtype) + tuple(named[k] for k in tuner.keys)
        cfg = _best.get(key)
        if cfg is None:
            tuner[grid](*args, **meta)
            _best[key] = tuner.best_config
            return
    cfg = cfg or _plain_config(name, dtype)
    full = {**meta, **cfg.kwargs}
    opts = {} if INTERPRET else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _run(fn, grid(full), args, full, opts)


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")  # current device: launches run under _on(x)


_compiled = {}  # (kernel, argument specialization, constexprs) -> compiled kernel


def _spec(v):
    """Launch-cache key of one argument: tensors by dtype and 16-byte alignment (what Triton specializes them on),
    everything else by value (a superset of Triton's integer specializations: a new value costs one pass through
    Triton's own launcher, which finds its compiled kernel)."""
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16 == 0
    return v


def _run(fn, grid, args, meta, opts):
    """fn[grid](*args, **meta, **opts); after the first launch of a specialization the compiled kernel is called
    directly, skipping Triton's per-launch argument binding (tens of microseconds of Python per launch, which
    for the smaller projections is as long as the GPU work). FAST_LAUNCH = False: always through Triton."""
    if INTERPRET or not FAST_LAUNCH:
        fn[grid](*args, **meta, **opts)
        return
    key = (fn, tuple(map(_spec, args)), tuple(meta.items()), tuple(opts.items()))
    hit = _compiled.get(key)
    if hit is None:
        kernel = fn[grid](*args, **meta, **opts)
        _compiled[key] = kernel, [meta[n] for n in fn.arg_names[len(args):]]  # constexprs follow the runtime args
        return
    kernel, tail = hit
    kernel[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 must not silently drop to tf32


def _r_blocks(r):
    r_pad = max(16, _next_pow2(r))
    return r_pad, min(r_pad, 64)


def _gemm(a, b_op, lo, ro, scale, out_dtype, seed=0, p=0.0):
    """C (M, N) = a (M, K) @ b_op (K, N) + scale * lo (M, R) @ ro (R, N); b_op/ro may be transposed views."""
    M, K = a.shape
    N, R = b_op.shape[1], lo.shape[1]
    c = _empty(M, N, dtype=out_dtype, device=a.device)
    r_pad, block_r = _r_blocks(R)
    gemm = _gemm_kind(a, b_op, c)
    if gemm == "tma":
        _launch_gemm_tma(a, b_op, lo, ro, scale, c, r_pad, block_r, seed, p)
    elif gemm == "cublas":  # low-rank term first (K = 0 loop), then cuBLAS accumulates into it (beta = 1)
        _launch_gemm(a, b_op, lo, ro, scale, c, 0, r_pad, block_r, seed, p)
        c.addmm_(a, b_op)
    else:
        _launch_gemm(a, b_op, lo, ro, scale, c, K, r_pad, block_r, seed, p)
    return c


def _tma_ready(*tensors):
    """TMA descriptors need a 16-byte aligned base, unit stride in the last dim and 16-byte aligned row strides."""
    return all(t.data_ptr() % 16 == 0 and t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0
               for t in tensors)


def _use_tma(*tensors):
    """TMA loads: Hopper or newer (the interpreter emulates them), and strides TMA accepts."""
    return (INTERPRET or _capability(tensors[0].device)[0] >= 9) and _tma_ready(*tensors)


def _gemm_kind(a, b_op, c):
    """GEMM="auto": the TMA kernel wherever the hardware (Hopper or newer) and the strides allow it, else cuBLAS
    plus the low-rank pass on the GPU (faster there than the pointer kernel), the pointer kernel in the interpreter."""
    if GEMM != "auto":
        return GEMM
    w = b_op.t() if b_op.stride(0) == 1 else b_op  # W itself in the forward (K-major), as is in the backward
    if a.element_size() <= 2 and _use_tma(a, w, c):  # fp32 (ieee FMA dot) runs out of shared memory there
        return "tma"
    return "triton" if INTERPRET else "cublas"


def _launch_gemm_tma(a, b_op, lo, ro, scale, c, r_pad, block_r, seed, p):
    M, K = a.shape
    N, R = c.shape[1], lo.shape[1]
    b_kmajor = b_op.stride(0) == 1
    w = b_op.t() if b_kmajor else b_op
    num_sms = _num_sms(a.device)
    grid = lambda m: (min(num_sms, _cdiv(M, m["BLOCK_M"]) * _cdiv(N, m["BLOCK_N"])),)
    args = (a, w, c, lo, ro, M, N, K, R, float(scale), seed, p, 1.0 / (1.0 - p), a.stride(0), w.stride(0), c.stride(0),
            lo.stride(0), lo.stride(1), ro.stride(0), ro.stride(1))
    meta = dict(M_BUCKET=_m_bucket(M), B_KMAJOR=b_kmajor, DTYPE=str(a.dtype), DOT_PREC=_prec(a.dtype), R_PAD=r_pad,
                BLOCK_R=block_r, DROPOUT=p > 0, NUM_SMS=num_sms)
    _launch("tma", grid, args, meta, a.dtype)


def _launch_gemm(a, b_op, lo, ro, scale, c, K, r_pad, block_r, seed, p):
    M, N, R = c.shape[0], c.shape[1], lo.shape[1]
    grid = lambda m: (_cdiv(M, m["BLOCK_M"]) * _cdiv(N, m["BLOCK_N"]),)
    args = (a, b_op, lo, ro, c, M, N, K, R, float(scale), seed, p, 1.0 / (1.0 - p), a.stride(0), a.stride(1),
            b_op.stride(0), b_op.stride(1), lo.stride(0), lo.stride(1), ro.stride(0), ro.stride(1), c.stride(0), c.stride(1))
    _launch("gemm", grid, args, dict(M_BUCKET=_m_bucket(M), DOT_PREC=_prec(a.dtype), R_PAD=r_pad, BLOCK_R=block_r,
                                     DROPOUT=p > 0), a.dtype)


@functools.lru_cache(maxsize=None)
def _capability(device):
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    return 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


def _split(n, parts, block=_SPLIT):
    """(per-item length rounded up to `block`, number of items) splitting n into about `parts` pieces."""
    per = _cdiv(_cdiv(n, max(1, parts)), block) * block
    return per, _cdiv(n, per)


def _programs(items, device):
    """Persistent skinny kernels: at most SKINNY_WAVES waves of programs, each walking items in turn."""
    return max(1, min(items, SKINNY_WAVES * _num_sms(device)))


def _lora_down(x2, A, seed, p):
    """S = dropout(x) A^T, (M, r) fp32."""
    M, K = x2.shape
    R = A.shape[0]
    _, block_r = _r_blocks(R)
    s = _empty(M, R, dtype=torch.float32, device=x2.device)
    progs = lambda m: _programs(_cdiv(M, m["BLOCK_M"]), x2.device)
    grid = lambda m: (progs(m), _cdiv(R, block_r))
    args = (x2, A, s, M, K, R, seed, p, 1.0 / (1.0 - p), x2.stride(0), x2.stride(1), A.stride(0), A.stride(1))
    _launch("down", grid, args, dict(M_BUCKET=_m_bucket(M), DROPOUT=p > 0, DOT_PREC=_prec(x2.dtype), BLOCK_R=block_r),
            x2.dtype)
    return s


def _lora_dy(dy2, B, s, scale):
    """(G, dB) = (scale dy B, scale dy^T S), fp32, from one pass over dy."""
    M, N = dy2.shape
    R = B.shape[1]
    _, block_r = _r_blocks(R)
    bm = 32 if INTERPRET else _DY_ROWS_NARROW if N <= 4096 else _DY_ROWS
    gm = _cdiv(M, bm)
    cols, gn = _split(N, _cdiv(SKINNY_WAVES * _num_sms(dy2.device), gm), 32 if INTERPRET else _SPLIT)
    gp = torch.empty(gn, M, R, dtype=torch.float32, device=dy2.device)  # every element written by the kernel
    dbp = torch.empty(gm, N, R, dtype=torch.float32, device=dy2.device)
    progs = _programs(gm * gn, dy2.device)
    grid = lambda m: (progs, _cdiv(R, block_r))
    args = (dy2, B, s, gp, dbp, M, N, R, float(scale), gn, cols, dy2.stride(0), dy2.stride(1), B.stride(0), B.stride(1))
    _launch("dy", grid, args, dict(M_BUCKET=_m_bucket(M), DOT_PREC=_prec(dy2.dtype), BLOCK_R=block_r, BLOCK_M=bm),
            dy2.dtype)
    return gp.sum(0) if gn > 1 else gp[0], dbp.sum(0) if gm > 1 else dbp[0]


def _lora_da(x2, g, seed, p):
    """dA = G^T dropout(x), (r, in) fp32, mask regenerated from the seed."""
    M, K = x2.shape
    R = g.shape[1]
    _, block_r = _r_blocks(R)
    blk = 32 if INTERPRET else _SPLIT
    rows, gm = _split(M, _cdiv(SKINNY_WAVES * _num_sms(x2.device), _cdiv(K, 128)), blk)
    dap = torch.empty(gm, R, K, dtype=torch.float32, device=x2.device)
    progs = lambda m: _programs(_cdiv(K, m["BLOCK_K"]) * gm, x2.device)
    grid = lambda m: (progs(m), _cdiv(R, block_r))
    args = (x2, g, dap, M, K, R, seed, p, 1.0 / (1.0 - p), gm, rows, x2.stride(0), x2.stride(1))
    _launch("da", grid, args, dict(M_BUCKET=_m_bucket(M), DROPOUT=p > 0, DOT_PREC=_prec(x2.dtype), BLOCK_R=block_r),
            x2.dtype)
    return dap.sum(0) if gm > 1 else dap[0]


def dropout_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p), fp32, `shape` = (..., in)) that the kernels apply for this seed."""
    *lead, K = shape
    M = 1
    for d in lead:
        M *= d
    out = torch.empty(M, K, dtype=torch.float32, device=device)
    grid = (_cdiv(M, 32), _cdiv(K, 32))
    with _on(out):
        _dropout_mask_kernel[grid](out, M, K, seed, p, 1.0 / (1.0 - p), BLOCK_M=32, BLOCK_K=32)
    return out.view(*shape)


def _on(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- autograd
class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + s (dropout(x) A^T) B^T, dropout mask = Philox(seed) (p = 0: no dropout).

    Gradients (xd = dropout(x), S = xd A^T, G = s dy B):
        dx = dy W + (G A) * mask   -- mask applied to the LoRA part only (p > 0)
        dA = G^T xd,   dB = s dy^T S,   dW = None (frozen)
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scale, dropout_p, seed):
        assert weight.dtype == x.dtype, f"x {x.dtype} and W {weight.dtype} must share a dtype (W is never cast)"
        assert x.shape[-1] == weight.shape[1] == lora_A.shape[1] and lora_B.shape == (weight.shape[0], lora_A.shape[0])
        x2 = x.reshape(-1, x.shape[-1])  # a view when possible; strides go to the kernels
        with _on(x):
            s = _lora_down(x2, lora_A, seed, dropout_p)
            y = _gemm(x2, weight.t(), s, lora_B.t(), scale, x.dtype)
        ctx.save_for_backward(x, weight, lora_A, lora_B, s)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, s = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        p = ctx.dropout_p
        with _on(dy):
            g, db = _lora_dy(dy2, lora_B, s, ctx.scale)  # (M, r), (out, r) fp32
            da = _lora_da(x2, g, ctx.seed, p)  # (r, in) fp32
            dx = None
            if ctx.needs_input_grad[0]:  # dx = dy W + (G A) * mask, mask regenerated in the GEMM epilogue
                dx = _gemm(dy2, weight, g, lora_A, 1.0, x.dtype, ctx.seed, p).view(x.shape)
        return dx, None, da.to(lora_A.dtype), db.to(lora_B.dtype), None, None, None


def lora_linear_reference(x, weight, lora_A, lora_B, scale, dropout_mask=None):
    """The spec (and the CPU path): in x's dtype, A/B cast to it; dropout_mask is the 0 or 1/(1-p) multiplier."""
    xd = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    return x @ weight.t() + scale * ((xd @ lora_A.t().to(x.dtype)) @ lora_B.t().to(x.dtype))


def lora_linear(x, weight, lora_A, lora_B, scale: float, dropout_p: float = 0.0, training: bool = True,
                *, backend=None, seed=None) -> torch.Tensor:
    """Autograd-aware LoRA linear. backend: "triton", "torch" or None (= triton iff x.is_cuda).
    seed: dropout seed (None: drawn from torch's CPU generator, so checkpoint recompute replays it)."""
    p = float(dropout_p) if training else 0.0
    if backend is None:
        backend = "triton" if x.is_cuda else "torch"
    if backend == "torch":
        mask = None if p == 0 else F.dropout(torch.ones_like(x), p)
        return lora_linear_reference(x, weight, lora_A, lora_B, scale, mask)
    if p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, float(scale), p, 0 if seed is None else int(seed))
