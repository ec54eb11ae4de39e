"""The main GEMM of the LoRA linear with the low-rank term folded into its epilogue, so C is written once:

    C = A_op B_op + scale * L R     forward: x W^T + S (s B)^T      backward: dy W + G A (times the dropout mask)

Two kernels, same math: `_lora_gemm_tma_kernel` (Hopper and newer: persistent grid, TMA loads and stores: the
"tma" kind) and `_lora_gemm_kernel` (pointer loads: any strides, any GPU, fp32; with K = 0 it writes the low-rank
term alone for the "cublas" kind). kernels/choices.py picks the kind and the config per shape.
"""
import triton
import triton.language as tl

from .lowrank import _dropout


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles walk the column tiles together, so they share B_op tiles in L2."""
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group) % group_m, (tile % group) // group_m


@triton.jit
def _add_low_rank(acc, l_ptr, r_ptr, offs_m, col0, M, N, R, scale, seed, p, inv_keep,
                  stride_lm, stride_lr, stride_rr, stride_rn, dt: tl.constexpr, DOT_PREC: tl.constexpr,
                  R_PAD: tl.constexpr, BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr):
    """GEMM epilogue: acc + scale * L[offs_m] R[:, col0 + (0 .. BLOCK_N - 1)], in the fp32 accumulator before the
    one store of C. DROPOUT (backward only): the low-rank term is multiplied by the dropout mask of element (m, n) of
    x (col0 = pid_n * BLOCK_N: `_dropout` draws for whole groups of four columns)."""
    rows = offs_m % M  # wrap out-of-range rows/cols onto valid memory; those elements are never stored
    cols = (col0 + tl.arange(0, acc.shape[1])) % N
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
        return acc + _dropout(low, seed, offs_m, col0, N, p, inv_keep, True)
    return low


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_kernel(a_ptr, b_ptr, l_ptr, r_ptr, c_ptr, M, N, K, R, scale, seed, p, inv_keep,
                      stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_rr, stride_rn,
                      stride_cm, stride_cn,
                      DOT_PREC: tl.constexpr, R_PAD: tl.constexpr, BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A_op B_op + scale * L R   with A_op (M, K), B_op (K, N), L (M, R) fp32, R (R, N); fp32 accumulator.

    forward:  A_op = x, B_op = W^T, L = S, R = B^T, scale = s.   backward: A_op = dy, B_op = W, L = G, R = A, scale = 1.
    Pointer loads: the portable GEMM (any strides, any GPU); _lora_gemm_tma_kernel is the Hopper one.
    """
    dt = c_ptr.dtype.element_ty
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows x stride passes 2^31 (gate_up)
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
    acc = _add_low_rank(acc, l_ptr, r_ptr, offs_m, pid_n * BLOCK_N, M, N, R, scale, seed, p, inv_keep,
                        stride_lm, stride_lr, stride_rr, stride_rn, dt, DOT_PREC, R_PAD, BLOCK_R, DROPOUT)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(dt),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_tma_kernel(a_ptr, b_ptr, c_ptr, l_ptr, r_ptr, a_scale_ptr, b_scale_ptr, M, N, K, R, scale, seed, p,
                          inv_keep, stride_am, stride_b, stride_cm, stride_lm, stride_lr, stride_rr, stride_rn,
                          B_KMAJOR: tl.constexpr, DOT_PREC: tl.constexpr, R_PAD: tl.constexpr,
                          BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr, NUM_SMS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          SUBTILE: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr,
                          FAST_ACCUM: tl.constexpr = False):
    """The same C = A_op B_op + scale * L R, Hopper style: a persistent grid of NUM_SMS programs walking the
    tiles, operands fetched by the tensor-memory engine (TMA descriptors: async, pipelined num_stages deep, zero
    fill past the edges), C stored by TMA. B_KMAJOR: b_ptr holds B_op^T (N, K), i.e. W itself in the forward.
    SUBTILE stores C in two halves, which frees shared memory for one more pipeline stage. FLATTEN / WARP_SPEC:
    Triton's loop flattening (next tile's loads during this one's epilogue) and warp specialization, per config.
    FP8 operands (kernels/fp8.py) come with a scale per row of A_op and per column of B_op (a_scale_ptr,
    b_scale_ptr; None for 16-bit ones): the accumulator is scaled before the low-rank term joins it. FAST_ACCUM
    (FP8 only): no promotion to fp32 each K step (torchao's float8 recipe for the forward GEMM; faster, less exact).
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
            if a_scale_ptr is not None and not FAST_ACCUM:  # FP8: Hopper keeps 13 mantissa bits in FP8 sums;
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)  # fp32 again each K step
            elif a_scale_ptr is not None:  # FAST_ACCUM: the whole K sum in the tensor cores' own accumulator
                acc = tl.dot(a, b, acc)
            else:
                acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        tile_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
        offs_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        if a_scale_ptr is not None:
            cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
            acc = acc * tl.load(a_scale_ptr + offs_m % M)[:, None] * tl.load(b_scale_ptr + cols)[None, :]
        acc = _add_low_rank(acc, l_ptr, r_ptr, offs_m, pid_n * BLOCK_N, M, N, R, scale, seed, p, inv_keep,
                            stride_lm, stride_lr, stride_rr, stride_rn, dt, DOT_PREC, R_PAD, BLOCK_R, DROPOUT)
        if SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            c0, c1 = tl.split(halves)
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], c0.to(dt))
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], c1.to(dt))
        else:
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(dt))

