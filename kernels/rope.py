"""Rotary position embedding (rotate-half, Phi-3's RoPE and LongRoPE) on q and k, read straight from qkv_proj's output.

    q, k, v = qkv.split([nh hd, nkv hd, nkv hd], -1), each viewed (B, heads, T, hd)
    q' = q cos + rotate_half(q) sin,   rotate_half([x1 | x2]) = [-x2 | x1],   the same for k; v passes through
    cos, sin: (B, T, rot) tables (any positions: packing restarts them per document), broadcast over heads;
    rot < hd is partial rotary (Phi-4-mini rotates 96 of 128 dims): the first rot dims turn, the rest pass through

Unfused, torch runs chunk, neg, cat, two products and a sum per tensor, forward and backward (and again in
checkpoint recompute). Here one kernel each way. Each product and the sum is rounded to the model dtype where
torch rounds it, so q' and k' equal the torch reference bit for bit (fp32 too: no fused multiply-add).

Layout: q' (B, T, nh, hd) and k' (B, T, nkv, hd) are fresh and returned as (B, heads, T, hd) transposed views:
the strides torch's own elementwise ops give them (they follow q's view of qkv), so SDPA takes the path it takes
today, and flash attention reads (B, T, heads, hd) natively. v is returned as the zero-copy view the model takes.

Backward: saves only cos and sin (the rotation's transpose needs no activation). The kernel writes the q and k
columns of one d(qkv) and dv is copied into its v columns, so d(qkv) is built in one buffer: v is an output of the
same autograd.Function instead of a split outside it, whose backward would concatenate [dq | dk | dv] again.
"""
import torch
import triton
import triton.language as tl

from . import launch

_TILE = 1024  # values of each half (x1, x2) per program: heads per program = _TILE / (hd/2 padded); fastest on an H200


@triton.jit
def _rotate_heads(src, src_sh, dst, cos_row, sin_row, h0, n_heads, MID: tl.constexpr, BACKWARD: tl.constexpr,
                  HD: tl.constexpr, ROT: tl.constexpr, HEADS: tl.constexpr, HALF_PAD: tl.constexpr,
                  PASS_PAD: tl.constexpr):
    """Rotates heads h0 .. h0 + HEADS - 1 (those < n_heads) of one token: x = [x1 | x2] at src + h src_sh + (0..HD-1),
    with the token's cos = [c1 | c2], sin = [s1 | s2]; the result goes to dst + h HD (rows of (heads, hd)).
        forward:   y = x cos + R(x) sin,    R[x1 | x2] = [-x2 | x1]     y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
        backward: dx = x cos + R^T(x sin),  R^T[z1 | z2] = [z2 | -z1]   y1 = x1 c1 + x2 s2,   y2 = x2 c2 - x1 s1
    (backward: x = dq or dk.) Each product is rounded to MID (the dtype torch multiplies in: q's, or dq's), then to
    dst's (forward a no-op; backward autograd's cast to qkv's dtype), and the sum to dst's: torch's roundings.
    Partial rotary (ROT < HD, Phi-4-mini's 96 of 128): x = [x1 | x2 | rest], the tables cover x1 and x2, and the
    last HD - ROT dims pass through both ways (cast to dst's dtype, as torch's cat and autograd's cast do)."""
    HALF: tl.constexpr = ROT // 2
    h = h0 + tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < n_heads) & (d < HALF)
    x1 = tl.load(src + h * src_sh + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + h * src_sh + HALF + d, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_row + d, mask=d < HALF, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=d < HALF, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    dt = dst.dtype.element_ty
    a1 = (x1 * c1).to(MID).to(dt).to(tl.float32)
    a2 = (x2 * c2).to(MID).to(dt).to(tl.float32)
    if BACKWARD:
        y1 = a1 + (x2 * s2).to(MID).to(dt).to(tl.float32)
        y2 = a2 - (x1 * s1).to(MID).to(dt).to(tl.float32)
    else:
        y1 = a1 - (x2 * s1).to(MID).to(dt).to(tl.float32)
        y2 = a2 + (x1 * s2).to(MID).to(dt).to(tl.float32)
    tl.store(dst + h * HD + d, y1.to(dt), mask=mask)
    tl.store(dst + h * HD + HALF + d, y2.to(dt), mask=mask)
    if ROT < HD:
        e = tl.arange(0, PASS_PAD)[None, :]
        rest = (h < n_heads) & (e < HD - ROT)
        tl.store(dst + h * HD + ROT + e, tl.load(src + h * src_sh + ROT + e, mask=rest, other=0.0).to(dt), mask=rest)


@triton.jit
def _rope_fwd_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, T, stride_qkv, stride_cb, stride_ct, NH: tl.constexpr,
                     NKV: tl.constexpr, HD: tl.constexpr, ROT: tl.constexpr, HEADS: tl.constexpr, HALF_PAD: tl.constexpr,
                     PASS_PAD: tl.constexpr):
    """Program (token m = b T + t, head block): q' (program axis 1 < cdiv(NH, HEADS)) or k' heads of token m, from
    qkv's row m (any row stride) and the cos/sin row (b, t). q, k: fresh, rows of NH * HD, NKV * HD."""
    row = tl.cast(tl.program_id(0), tl.int64)  # row * stride passes 2^31 past 233k tokens of Phi-3-mini's qkv
    blk = tl.program_id(1)
    cs = (row // T) * stride_cb + (row % T) * stride_ct
    x = qkv_ptr + row * stride_qkv
    QB: tl.constexpr = tl.cdiv(NH, HEADS)
    if blk < QB:
        _rotate_heads(x, HD, q_ptr + row * NH * HD, cos_ptr + cs, sin_ptr + cs, blk * HEADS, NH,
                      q_ptr.dtype.element_ty, False, HD, ROT, HEADS, HALF_PAD, PASS_PAD)
    else:
        _rotate_heads(x + NH * HD, HD, k_ptr + row * NKV * HD, cos_ptr + cs, sin_ptr + cs, (blk - QB) * HEADS, NKV,
                      k_ptr.dtype.element_ty, False, HD, ROT, HEADS, HALF_PAD, PASS_PAD)


@triton.jit
def _rope_bwd_kernel(dq_ptr, dk_ptr, cos_ptr, sin_ptr, dqkv_ptr, T, stride_cb, stride_ct, sq_b, sq_h, sq_t,
                     sk_b, sk_h, sk_t, NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, ROT: tl.constexpr,
                     HEADS: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr):
    """The forward's grid over d(qkv)'s q and k columns (fresh rows of (NH + 2 NKV) HD); dq (B, NH, T, HD) and dk
    with any strides but the last. Products rounded in dq's dtype (torch's), then in d(qkv)'s (the input's)."""
    row = tl.cast(tl.program_id(0), tl.int64)
    blk = tl.program_id(1)
    b, t = row // T, row % T
    cs = b * stride_cb + t * stride_ct
    dx = dqkv_ptr + row * (NH + 2 * NKV) * HD
    QB: tl.constexpr = tl.cdiv(NH, HEADS)
    if blk < QB:
        _rotate_heads(dq_ptr + b * sq_b + t * sq_t, sq_h, dx, cos_ptr + cs, sin_ptr + cs, blk * HEADS, NH,
                      dq_ptr.dtype.element_ty, True, HD, ROT, HEADS, HALF_PAD, PASS_PAD)
    else:
        _rotate_heads(dk_ptr + b * sk_b + t * sk_t, sk_h, dx + NH * HD, cos_ptr + cs, sin_ptr + cs,
                      (blk - QB) * HEADS, NKV, dk_ptr.dtype.element_ty, True, HD, ROT, HEADS, HALF_PAD, PASS_PAD)


# ------------------------------------------------------------------------------- host side: launches, autograd
def _launch(kernel, B, T, n_head, n_kv_head, head_dim, rot, args):
    half = launch.next_pow2(rot // 2)
    heads = min(launch.next_pow2(max(n_head, n_kv_head)), max(1, _TILE // half))
    grid = (B * T, launch.cdiv(n_head, heads) + launch.cdiv(n_kv_head, heads))
    # no fused multiply-add: torch rounds each product before the sum, and so must fp32 here
    launch.run(kernel, grid, args, dict(NH=n_head, NKV=n_kv_head, HD=head_dim, ROT=rot, HEADS=heads, HALF_PAD=half,
                                        PASS_PAD=launch.next_pow2(max(1, head_dim - rot)), enable_fp_fusion=False))


def _tables(cos, sin, B, T):
    """cos and sin as (B, T, hd) views with the same strides and a unit last stride (copies only if not)."""
    cos, sin = cos.expand(B, T, -1), sin.expand(B, T, -1)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _heads_view(t):  # (B, heads, T, hd) with a unit last stride (SDPA's gradients have one)
    return t if t.stride(-1) == 1 else t.contiguous()


class RoPEFunction(torch.autograd.Function):
    """(q', k', v) = (q cos + R q sin, k cos + R k sin, v) from qkv (B, T, (nh + 2 nkv) hd), R [x1 | x2] = [-x2 | x1];
    q', k' (B, heads, T, hd) in promote(qkv, cos) dtype, v a view of qkv.

    Gradients (cos and sin are constants of the positions: none for them):
        dq = dq' cos + R^T (dq' sin),  dk likewise,  R^T [z1 | z2] = [z2 | -z1]   (a rotation by -sin)
        d(qkv) = [dq | dk | dv] (B, T, (nh + 2 nkv) hd), one buffer, in qkv's dtype
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head, n_kv_head):
        (B, T, W), rot = qkv.shape, cos.shape[-1]
        hd = W // (n_head + 2 * n_kv_head)
        x = launch.rows(qkv, W)
        cos, sin = _tables(cos, sin, B, T)
        dtype = torch.promote_types(qkv.dtype, cos.dtype)
        q = launch.empty(B, T, n_head, hd, dtype=dtype, device=qkv.device)
        k = launch.empty(B, T, n_kv_head, hd, dtype=dtype, device=qkv.device)
        with launch.on_device(qkv):
            _launch(_rope_fwd_kernel, B, T, n_head, n_kv_head, hd, rot,
                    (x, cos, sin, q, k, T, x.stride(0), cos.stride(0), cos.stride(1)))
        ctx.save_for_backward(cos, sin)
        ctx.qkv_dtype = qkv.dtype
        v = qkv[..., (n_head + n_kv_head) * hd:].view(B, T, n_kv_head, hd)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        (B, n_head, T, hd), n_kv_head = dq.shape, dk.shape[1]
        dq, dk = _heads_view(dq), _heads_view(dk)
        dqkv = launch.empty(B, T, (n_head + 2 * n_kv_head) * hd, dtype=ctx.qkv_dtype, device=dq.device)
        with launch.on_device(dq):
            _launch(_rope_bwd_kernel, B, T, n_head, n_kv_head, hd, cos.shape[-1],
                    (dq, dk, cos, sin, dqkv, T, cos.stride(0), cos.stride(1), *dq.stride()[:3], *dk.stride()[:3]))
        dqkv[..., (n_head + n_kv_head) * hd:].view(B, T, n_kv_head, hd).copy_(dv.transpose(1, 2))
        return dqkv, None, None, None, None
