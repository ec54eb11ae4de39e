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
GEMM = os.environ.get("LORA_GEMM", "cublas")  # "cublas" (measured faster on H200) | "triton"
AUTOTUNE = os.environ.get("LORA_AUTOTUNE", "1") == "1"  # False: first config of each list (fast GPU tests)
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
    """S[m, j] = sum_k dropout(x)[m, k] A[j, k]   (M, R) fp32, one rank chunk of BLOCK_R per program axis 1."""
    dt = x_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
        x = _dropout(x, seed, offs_m, ks, K, p, inv_keep, DROPOUT)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + ks[:, None] * stride_ak,
                    mask=(offs_r[None, :] < R) & (ks[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R)
        acc = tl.dot(x, a.to(dt), acc, input_precision=DOT_PREC)
    tl.store(s_ptr + offs_m[:, None] * R + offs_r[None, :], acc, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_kernel(a_ptr, b_ptr, l_ptr, r_ptr, c_ptr, M, N, K, R, scale, seed, p, inv_keep,
                      stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_rr, stride_rn,
                      stride_cm, stride_cn, M_BUCKET,
                      DOT_PREC: tl.constexpr, R_PAD: tl.constexpr, BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A_op B_op + scale * L R   with A_op (M, K), B_op (K, N), L (M, R) fp32, R (R, N); fp32 accumulator.

    forward:  A_op = x, B_op = W^T, L = S, R = B^T, scale = s.   backward: A_op = dy, B_op = W, L = G, R = A, scale = 1.
    The rank-R term is added to the accumulator after the K loop, so C is written exactly once.
    DROPOUT (backward only): the rank-R term is multiplied by the dropout mask of element (m, n) of x.
    """
    dt = c_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n  # grouped ordering: GROUP_M row-tiles share B_op tiles in L2
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # wrap out-of-range rows/cols onto valid memory; the store masks them
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
    if DROPOUT:
        low = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    else:
        low = acc  # accumulate the low-rank term straight into the main accumulator
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in tl.static_range(0, R_PAD, BLOCK_R):  # low-rank epilogue, rank padded to >= 16 for tl.dot
        rs = r0 + offs_r
        lo = tl.load(l_ptr + rows[:, None] * stride_lm + rs[None, :] * stride_lr, mask=rs[None, :] < R, other=0.0)
        ro = tl.load(r_ptr + rs[:, None] * stride_rr + cols[None, :] * stride_rn, mask=rs[:, None] < R, other=0.0)
        low = tl.dot(lo.to(dt), (ro * scale).to(dt), low, input_precision=DOT_PREC)
    if DROPOUT:
        acc += _dropout(low, seed, offs_m, offs_n, N, p, inv_keep, True)
    else:
        acc = low
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(dt),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _lora_dy_kernel(dy_ptr, b_ptr, s_ptr, gp_ptr, dbp_ptr, M, N, R, scale, cols_per_prog,
                    stride_dym, stride_dyn, stride_bn, stride_br, M_BUCKET,
                    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One pass over dy for both skinny products; program (pm, pn, pr) owns rows pm*BLOCK_M.. and a column range:
        Gp[pn]      = s dy[rows, cols] B[cols]      G accumulates in registers over the column loop
        dBp[pm][c]  = s dy[rows, c]^T S[rows]       one partial per (row block, column block), no read-modify-write
    The launcher sums Gp over pn (G = s dy B) and dBp over pm (dB = s dy^T S).
    """
    dt = dy_ptr.dtype.element_ty
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    s = tl.load(s_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mr, other=0.0).to(dt)  # (BLOCK_M, BLOCK_R)
    g = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    n_start = pn * cols_per_prog
    n_end = min(n_start + cols_per_prog, N)
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
def _lora_da_kernel(x_ptr, g_ptr, dap_ptr, M, K, R, seed, p, inv_keep, rows_per_prog,
                    stride_xm, stride_xk, M_BUCKET,
                    DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dAp[pm, j, k] = sum_{m in rows(pm)} G[m, j] dropout(x)[m, k]; the mask is regenerated from the seed.
    Computed as dA^T tiles = dropout(x)^T G (BLOCK_K x BLOCK_R) so the tensor-core M dimension is BLOCK_K."""
    dt = x_ptr.dtype.element_ty
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    pm = tl.program_id(1)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_start = pm * rows_per_prog
    m_end = min(m_start + rows_per_prog, M)
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
# memory-bound skinny kernels: many programs and deep pipelines keep enough bytes in flight
_DOWN_CONFIGS = [_cfg(4, 4, BLOCK_M=32, BLOCK_K=256), _cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(4, 4, BLOCK_M=16, BLOCK_K=256)]
_DY_CONFIGS = [_cfg(8, 3, BLOCK_N=64), _cfg(8, 2, BLOCK_N=128), _cfg(4, 3, BLOCK_N=64)]  # BLOCK_M fixed: _DY_ROWS
_DA_CONFIGS = [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(8, 3, BLOCK_M=64, BLOCK_K=256), _cfg(8, 3, BLOCK_M=128, BLOCK_K=128)]
_DY_ROWS = 256  # rows per dy-pass program (sets the dB partial count, so not autotuned)
_SPLIT = 256  # per-program row/col ranges are multiples of every block size above
_tuned = {
    "gemm": triton.autotune(_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R_PAD", "DROPOUT"],
                            prune_configs_by={"early_config_prune": _prune_gemm})(_lora_gemm_kernel),
    "down": triton.autotune(_DOWN_CONFIGS, key=["M_BUCKET", "K", "R"])(_lora_down_kernel),
    "dy": triton.autotune(_DY_CONFIGS, key=["M_BUCKET", "N", "R"])(_lora_dy_kernel),
    "da": triton.autotune(_DA_CONFIGS, key=["M_BUCKET", "K", "R"])(_lora_da_kernel),
}
_plain = {"gemm": (_lora_gemm_kernel, _GEMM_CONFIGS[0]), "down": (_lora_down_kernel, _DOWN_CONFIGS[0]),
          "dy": (_lora_dy_kernel, _DY_CONFIGS[0]), "da": (_lora_da_kernel, _DA_CONFIGS[0])}
_SMALL = dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=4, BLOCK_M=32)  # interpreter: small blocks, no autotune


def _m_bucket(m: int) -> int:
    """Autotune key for the token count: powers of two, so batches of new lengths reuse a tuned config
    instead of re-running the autotuner (training on unpadded chat data sees a new M almost every step)."""
    return triton.next_power_of_2(max(int(m), 16))


def _launch(name, grid, *args, **meta):
    """Autotuned on the GPU (keys: shapes only, M bucketed); a fixed config under the interpreter or with AUTOTUNE off."""
    if AUTOTUNE and not INTERPRET and meta["M_BUCKET"] >= AUTOTUNE_MIN_M:
        return _tuned[name][grid](*args, **meta)
    fn, cfg = _plain[name]
    small = {k: v for k, v in _SMALL.items() if k in cfg.kwargs}
    conf = small if INTERPRET else cfg.kwargs
    kw = {} if INTERPRET else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return fn[grid(conf)](*args, **meta, **conf, **kw)


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 must not silently drop to tf32


def _r_blocks(r):
    r_pad = max(16, triton.next_power_of_2(r))
    return r_pad, min(r_pad, 64)


def _gemm(a, b_op, lo, ro, scale, out_dtype, seed=0, p=0.0):
    """C (M, N) = a (M, K) @ b_op (K, N) + scale * lo (M, R) @ ro (R, N); b_op/ro may be transposed views."""
    M, K = a.shape
    N, R = b_op.shape[1], lo.shape[1]
    c = _empty(M, N, dtype=out_dtype, device=a.device)
    r_pad, block_r = _r_blocks(R)
    if GEMM == "cublas":  # low-rank term first (K = 0 loop), then cuBLAS accumulates into it (beta = 1)
        _launch_gemm(a, b_op, lo, ro, scale, c, 0, r_pad, block_r, seed, p)
        return c.addmm_(a, b_op)
    _launch_gemm(a, b_op, lo, ro, scale, c, K, r_pad, block_r, seed, p)
    return c


def _launch_gemm(a, b_op, lo, ro, scale, c, K, r_pad, block_r, seed, p):
    M, N, R = c.shape[0], c.shape[1], lo.shape[1]
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)
    _launch("gemm", grid, a, b_op, lo, ro, c, M, N, K, R, float(scale), seed, p, 1.0 / (1.0 - p),
            a.stride(0), a.stride(1), b_op.stride(0), b_op.stride(1), lo.stride(0), lo.stride(1),
            ro.stride(0), ro.stride(1), c.stride(0), c.stride(1),
            M_BUCKET=_m_bucket(M), DOT_PREC=_prec(a.dtype), R_PAD=r_pad, BLOCK_R=block_r, DROPOUT=p > 0)


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    return 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


def _split(n, parts, block=_SPLIT):
    """(per-program length rounded up to `block`, number of programs) splitting n into about `parts` pieces."""
    per = triton.cdiv(triton.cdiv(n, max(1, parts)), block) * block
    return per, triton.cdiv(n, per)


def _lora_down(x2, A, seed, p):
    """S = dropout(x) A^T, (M, r) fp32."""
    M, K = x2.shape
    R = A.shape[0]
    _, block_r = _r_blocks(R)
    s = _empty(M, R, dtype=torch.float32, device=x2.device)
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(R, block_r))
    _launch("down", grid, x2, A, s, M, K, R, seed, p, 1.0 / (1.0 - p), x2.stride(0), x2.stride(1),
            A.stride(0), A.stride(1), M_BUCKET=_m_bucket(M), DROPOUT=p > 0, DOT_PREC=_prec(x2.dtype), BLOCK_R=block_r)
    return s


def _lora_dy(dy2, B, s, scale):
    """(G, dB) = (scale dy B, scale dy^T S), fp32, from one pass over dy."""
    M, N = dy2.shape
    R = B.shape[1]
    _, block_r = _r_blocks(R)
    bm = 32 if INTERPRET else _DY_ROWS
    gm = triton.cdiv(M, bm)
    cols, gn = _split(N, triton.cdiv(3 * _num_sms(dy2.device), gm), 32 if INTERPRET else _SPLIT)
    gp = torch.empty(gn, M, R, dtype=torch.float32, device=dy2.device)  # every element written by the kernel
    dbp = torch.empty(gm, N, R, dtype=torch.float32, device=dy2.device)
    grid = lambda m: (gm, gn, triton.cdiv(R, block_r))
    _launch("dy", grid, dy2, B, s, gp, dbp, M, N, R, float(scale), cols, dy2.stride(0), dy2.stride(1),
            B.stride(0), B.stride(1), M_BUCKET=_m_bucket(M), DOT_PREC=_prec(dy2.dtype), BLOCK_R=block_r, BLOCK_M=bm)
    return gp.sum(0) if gn > 1 else gp[0], dbp.sum(0) if gm > 1 else dbp[0]


def _lora_da(x2, g, seed, p):
    """dA = G^T dropout(x), (r, in) fp32, mask regenerated from the seed."""
    M, K = x2.shape
    R = g.shape[1]
    _, block_r = _r_blocks(R)
    blk = 32 if INTERPRET else _SPLIT
    rows, gm = _split(M, triton.cdiv(4 * _num_sms(x2.device), triton.cdiv(K, 128)), blk)
    dap = torch.empty(gm, R, K, dtype=torch.float32, device=x2.device)
    grid = lambda m: (triton.cdiv(K, m["BLOCK_K"]), gm, triton.cdiv(R, block_r))
    _launch("da", grid, x2, g, dap, M, K, R, seed, p, 1.0 / (1.0 - p), rows, x2.stride(0), x2.stride(1),
            M_BUCKET=_m_bucket(M), DROPOUT=p > 0, DOT_PREC=_prec(x2.dtype), BLOCK_R=block_r)
    return dap.sum(0) if gm > 1 else dap[0]


def dropout_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p), fp32, `shape` = (..., in)) that the kernels apply for this seed."""
    *lead, K = shape
    M = 1
    for d in lead:
        M *= d
    out = torch.empty(M, K, dtype=torch.float32, device=device)
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
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
