"""Memory-bound low-rank kernels of the LoRA linear (kernels/lora_linear.py), all reading x or dy once:

    S  = dropout(x) A^T                 _lora_down_kernel   forward, (M, r) fp32
    G  = s dy B,  dB = s dy^T S         _lora_dy_kernel     backward, one pass over dy (dB as partials)
    dA = G^T dropout(x)                 _lora_da_kernel     backward, mask regenerated from the seed; sums dB

Dropout is Philox4x32-10 keyed by the seed, one evaluation per four elements of a row (`_dropout`): the mask is
never stored, and `_dropout_mask_kernel` materializes the same multiplier for tests. Each kernel is persistent: its
programs (a wave or two of the GPU) walk the work items, so no partly filled last wave idles the GPU.

Offsets into tensors of M rows are int64 (the row index is cast before it meets a stride, as in Liger and
flash-attention; also the column index where the stride is the caller's): past 131,072 tokens gate_up's dy has
2^31 elements, and int32 products would wrap silently. tl.cast, not .to: under the interpreter loop counters are
Python ints.

Sums split over several programs need no extra launch: each program stores its partial, and the last of a group
to finish (an atomic ticket per group, `_last_to_arrive`) adds the group's partials in a fixed order, so the
result is deterministic. The counters live in a buffer the launcher keeps zeroed per CUDA stream.
"""
import triton
import triton.language as tl


@triton.jit
def _kept(word, p):
    """1 (int8) where a Philox word keeps its element: uniform(word) >= p, tl.rand's uint32 -> [0, 1) conversion."""
    return (tl.uint_to_uniform_float(word) >= p).to(tl.int8)


@triton.jit
def _dropout(x, seed, offs_m, col0, n_cols, p, inv_keep, DROPOUT: tl.constexpr):
    """dropout(x) for x = rows offs_m, columns col0 .. col0 + BLOCK_K - 1 of an (M, n_cols) input.

    Element (m, k) takes word k % 4 of Philox4x32-10(seed, counter = m * cdiv(n_cols, 4) + k // 4), the counter
    int64 (tl.randint4x puts its high 32 bits in Philox's second counter word: no wrap past 2^32 counters); it is
    kept iff uniform(word) >= p, uniform being tl.rand's conversion (keep rate 1 - p); kept values are scaled by
    1/(1-p). One Philox evaluation serves four elements: its integer work, not memory, bounded the skinny kernels
    when each element took one (tl.rand). The decision depends on (seed, m, k, n_cols, p) only, never on the block
    sizes, provided col0 is a multiple of 4 (callers start blocks at multiples of their block size) and BLOCK_K is too.
    """
    if DROPOUT:
        tl.static_assert(x.shape[1] % 4 == 0, "dropout blocks span whole groups of four columns")
        groups = col0 // 4 + tl.arange(0, x.shape[1] // 4)
        counter = tl.cast(offs_m, tl.int64)[:, None] * tl.cdiv(n_cols, 4) + groups[None, :]  # (BLOCK_M, BLOCK_K / 4)
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        # interleave(a, b) alternates a and b along the last axis: rows read r0 r1 r2 r3 r0 ..., column k is r[k % 4].
        # int8 flags, not the words, go through that layout change: its shared-memory scratch stays small
        keep = tl.interleave(tl.interleave(_kept(r0, p), _kept(r2, p)), tl.interleave(_kept(r1, p), _kept(r3, p)))
        x = tl.where(keep != 0, x.to(tl.float32) * inv_keep, 0.0).to(x.dtype)
    return x


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(out_ptr, M, K, seed, p, inv_keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, k] = keep(seed, m, k) / (1 - p), the exact multiplier the other kernels apply to x."""
    offs_m = tl.cast(tl.program_id(0), tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ones = tl.full((BLOCK_M, BLOCK_K), 1.0, tl.float32)
    mask = _dropout(ones, seed, offs_m, tl.program_id(1) * BLOCK_K, K, p, inv_keep, True)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], mask,
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit(do_not_specialize=["seed"])
def _lora_down_kernel(x_ptr, a_ptr, s_ptr, M, K, R, seed, p, inv_keep, stride_xm, stride_xk, stride_ar, stride_ak,
                      DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """S[m, j] = sum_k dropout(x)[m, k] A[j, k]   (M, R) fp32; rank chunk of BLOCK_R per program axis 1.
    Persistent: the programs (a wave or two) walk the row tiles, so no partly filled last wave idles the GPU.
    (TMA loads were measured no faster than these pointer loads for the skinny kernels: bench/NOTES-lora.md.)
    """
    dt = x_ptr.dtype.element_ty
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        offs_m = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            mk = (offs_m[:, None] < M) & (ks[None, :] < K)
            x_offs = offs_m[:, None] * stride_xm + tl.cast(ks, tl.int64)[None, :] * stride_xk  # any x strides
            x = _dropout(tl.load(x_ptr + x_offs, mask=mk, other=0.0), seed, offs_m, k0, K, p, inv_keep, DROPOUT)
            a = tl.load(a_ptr + offs_r[None, :] * stride_ar + ks[:, None] * stride_ak,
                        mask=(offs_r[None, :] < R) & (ks[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R)
            acc = tl.dot(x, a.to(dt), acc, input_precision=DOT_PREC)
        tl.store(s_ptr + offs_m[:, None] * R + offs_r[None, :], acc,
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _last_to_arrive(count_ptr, expected):
    """True in the last of `expected` programs that call this on one counter, each after storing its partial.
    The barrier and the release half of the atomic publish this program's stores GPU-wide; the acquire half makes
    the other programs' stores visible to the last one, which resets the counter for the next launch."""
    tl.debug_barrier()
    last = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == expected - 1
    if last:
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def _summed(part, parts_ptr, part_stride, tile, mask, count_ptr, n_parts, index):
    """(last, total) for a sum split over n_parts programs: this program stores its partial (number `index`, the
    partials `part_stride` floats apart) and takes a ticket; in the last program to arrive, total = the n_parts
    partials added in order (deterministic). n_parts = 1: nothing stored, (True, part)."""
    last = n_parts == 1
    total = part
    if n_parts > 1:
        tl.store(parts_ptr + tl.cast(index, tl.int64) * part_stride + tile, part, mask=mask)
        last = _last_to_arrive(count_ptr, n_parts)
        total = tl.zeros_like(part)
        if last:
            for j in range(n_parts):  # .cg: read the other programs' partials from L2, never a stale L1 line
                total += tl.load(parts_ptr + tl.cast(j, tl.int64) * part_stride + tile, mask=mask, other=0.0,
                                 cache_modifier=".cg")
    return last, total


@triton.jit
def _lora_dy_kernel(dy_ptr, b_ptr, s_ptr, gp_ptr, g_ptr, dbp_ptr, count_ptr, M, N, R, scale, gn, cols_per_item,
                    stride_dym, stride_dyn, stride_bn, stride_br,
                    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One pass over dy for both skinny products. Work item (pm, pn) = row block pm, column range pn:
        Gp[pn]      = s dy[rows, cols] B[cols]      G accumulates in registers over the column loop
        dBp[pm][c]  = s dy[rows, c]^T S[rows]       one partial per (row block, column block), no read-modify-write
    G: the last of a row block's gn items to finish sums their partials in order (`_summed`: deterministic, no
    extra launch). dB: the dA kernel sums the dBp (the launcher passes dB itself as dBp when there is one row
    block). The programs walk the items.
    """
    dt = dy_ptr.dtype.element_ty
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    for item in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * gn, tl.num_programs(0)):
        pm = item // gn
        pn = item % gn
        offs_m = tl.cast(pm, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mr = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        s = tl.load(s_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mr, other=0.0).to(dt)  # (BLOCK_M, BLOCK_R)
        g = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        n_start = pn * cols_per_item
        n_end = min(n_start + cols_per_item, N)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nr = (offs_n[:, None] < n_end) & (offs_r[None, :] < R)
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + tl.cast(offs_n, tl.int64)[None, :] * stride_dyn,
                         mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_end), other=0.0)
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=nr, other=0.0)
            g = tl.dot(dy, (b * scale).to(dt), g, input_precision=DOT_PREC)
            db = tl.dot(tl.trans(dy), s, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_R)
            dbp = dbp_ptr + tl.cast(pm, tl.int64) * N * R  # (M / 256) N R floats: past 2^31 at r = 256
            tl.store(dbp + offs_n[:, None] * R + offs_r[None, :], db * scale, mask=nr)
        g_tile = offs_m[:, None] * R + offs_r[None, :]
        last, g = _summed(g, gp_ptr, M * R, g_tile, mr, count_ptr + pm * tl.num_programs(1) + tl.program_id(1), gn, pn)
        if last:
            tl.store(g_ptr + g_tile, g, mask=mr)


@triton.jit(do_not_specialize=["seed"])
def _lora_da_kernel(x_ptr, g_ptr, dap_ptr, da_ptr, count_ptr, dbp_ptr, db_ptr, M, K, R, seed, p, inv_keep,
                    gm, rows_per_item, db_items, db_parts, db_numel, stride_xm, stride_xk,
                    DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DB: tl.constexpr):
    """dA = G^T dropout(x)  (R, K) fp32, the mask regenerated from the seed; also finishes dB.

    dA work item (column block kb, row range pm): dAp[pm] tile = dropout(x)[rows, cols]^T G[rows] (BLOCK_K x
    BLOCK_R, so the tensor-core M dimension is BLOCK_K); the last of a column block's gm items to finish sums the
    gm partials in order into dA (`_summed`).
    The first db_items items sum the dy pass's db_parts dB partials (db_numel floats each) in BLOCK_DB chunks:
    done here, on programs that would otherwise wait for the dy pass to end, instead of in a launch of its own.
    """
    dt = x_ptr.dtype.element_ty
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    for item in tl.range(tl.program_id(0), db_items + tl.cdiv(K, BLOCK_K) * gm, tl.num_programs(0)):
        if item < db_items:
            if tl.program_id(1) == 0:  # dB is summed once, not per rank chunk
                offs = item * BLOCK_DB + tl.arange(0, BLOCK_DB)
                db = tl.zeros((BLOCK_DB,), tl.float32)
                for j in range(db_parts):
                    db += tl.load(dbp_ptr + tl.cast(j, tl.int64) * db_numel + offs, mask=offs < db_numel, other=0.0)
                tl.store(db_ptr + offs, db, mask=offs < db_numel)
        else:
            pm = (item - db_items) % gm
            kb = (item - db_items) // gm
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            m_start = pm * rows_per_item
            m_end = min(m_start + rows_per_item, M)
            acc = tl.zeros((BLOCK_K, BLOCK_R), tl.float32)
            for m0 in range(m_start, m_end, BLOCK_M):
                offs_m = tl.cast(m0, tl.int64) + tl.arange(0, BLOCK_M)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + tl.cast(offs_k, tl.int64)[None, :] * stride_xk,
                            mask=(offs_m[:, None] < m_end) & (offs_k[None, :] < K), other=0.0)
                x = _dropout(x, seed, offs_m, kb * BLOCK_K, K, p, inv_keep, DROPOUT)
                g = tl.load(g_ptr + offs_m[:, None] * R + offs_r[None, :],
                            mask=(offs_m[:, None] < m_end) & (offs_r[None, :] < R), other=0.0)  # (BLOCK_M, BLOCK_R)
                acc = tl.dot(tl.trans(x), g.to(dt), acc, input_precision=DOT_PREC)
            da_tile = offs_r[None, :] * K + offs_k[:, None]
            kr = (offs_r[None, :] < R) & (offs_k[:, None] < K)
            last, acc = _summed(acc, dap_ptr, R * K, da_tile, kr, count_ptr + kb * tl.num_programs(1) + tl.program_id(1),
                                gm, pm)
            if last:
                tl.store(da_ptr + da_tile, acc, mask=kr)
