"""Fused LoRA linear: y = x W^T + s * (dropout(x) A^T) B^T, W frozen.

Shapes: x (..., in), W (out, in) frozen, A (r, in), B (out, r) (A, B usually fp32 master weights), s float.

Design (numbers in bench/NOTES-lora.md):
  forward   S  = dropout(x) A^T                    (M, r) fp32   skinny kernel, one pass over x
            y  = x W^T + S (s B)^T                 (M, out)      one of two GEMM kinds (below)
  backward  G  = s dy B,  dB = s dy^T S            one pass over dy (both skinny products)
            dA = G^T dropout(x)                    skinny kernel, one pass over x, mask regenerated from the seed
            dx = dy W + G A                        one GEMM, same kinds as the forward (other strides)
Sums split across programs (G, dA, dB) finish inside those launches: no torch ops between the kernels.
GEMM kinds: "tma" = a Triton GEMM that adds the low-rank term to its fp32 accumulator after the K loop
(LoRAFusion's approach; TMA loads, Hopper and newer); "cublas" = the low-rank term written first, then cuBLAS
accumulates x W^T into it (beta = 1: one extra write + read of y). Which one runs is chosen per shape (GEMM,
below). (A third kind, one cuBLAS GEMM [x | S] [W | sB]^T through spare columns of W, was removed: the whole
training step ran 1.4 % faster without it, bench/README.md.)
Saved for backward: x, S (M x r fp32) and the seed; never a W gradient, never an (out x in) temporary.

Files: kernels/gemm.py (the GEMMs), kernels/lowrank.py (the skinny kernels, dropout), kernels/choices.py (which
kind and config each launch uses: a shipped table per GPU architecture, else a rule); this file: the host side and
the autograd Function (phi3/ops.py: the pure-torch spec and the dropout seed). GEMM kinds (env LORA_GEMM): "auto" =
the table's or the rule's ("tma" where it applies: 16-bit, Hopper, 16-byte aligned rows; else "cublas", or the
pointer-load Triton GEMM, "triton", in the interpreter); "triton" and "cublas" force a kind.
"""
import math
import os

import torch

from . import choices, launch
from .gemm import _lora_gemm_kernel, _lora_gemm_tma_kernel
from .lowrank import _dropout_mask_kernel, _lora_da_kernel, _lora_down_kernel, _lora_dy_kernel

GEMM_CHOICES = ("auto", "triton", "cublas")
GEMM = os.environ.get("LORA_GEMM", "auto")  # train.py rejects other values before loading anything
SKINNY_WAVES = 2  # persistent skinny kernels: programs = this many waves of the GPU's SMs
# rows per dy-pass work item: sets the dB partial count, so not a config; 256 beat 64 and 128 at out = 3072, 9216
# and 16384 (bench/NOTES-lora.md, v4)
_DY_ROWS = 256
_SPLIT = 256  # per-program row/col ranges are multiples of every block size


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 must not silently drop to tf32


def _r_blocks(r):
    r_pad = max(16, launch.next_pow2(r))
    return r_pad, min(r_pad, 64)


def _programs(items, device):
    """Persistent skinny kernels: at most SKINNY_WAVES waves of programs, each walking items in turn."""
    return max(1, min(items, SKINNY_WAVES * launch.num_sms(device)))


def _split(n, parts, block=_SPLIT):
    """(per-item length rounded up to `block`, number of items) splitting n into about `parts` pieces."""
    per = launch.cdiv(launch.cdiv(n, max(1, parts)), block) * block
    return per, launch.cdiv(n, per)


def _kinds(a, b_op):
    """The GEMM kinds that can run C = a b_op + ..., the rule's first. TMA descriptors need 16-bit inputs here (fp32
    overflows the kernel's shared memory), Hopper or newer (the interpreter emulates TMA), 16-byte aligned bases and
    row strides."""
    if GEMM != "auto":
        return [GEMM]
    w = b_op.t() if b_op.stride(0) == 1 else b_op  # W itself in the forward (K-major), as is in the backward
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0
                  for t in (a, w)) and b_op.shape[1] * a.element_size() % 16 == 0
    if a.element_size() <= 2 and aligned and (launch.INTERPRET or launch.capability(a.device)[0] >= 9):
        return ["tma"] if launch.INTERPRET else ["tma", "cublas"]  # cuBLAS's main loop outruns Triton's on some
    return ["triton" if launch.INTERPRET else "cublas"]


def _gemm(site, a, b_op, lo, ro, scale, out_dtype, seed=0, p=0.0):
    """C (M, N) = a (M, K) @ b_op (K, N) + scale * lo (M, R) @ ro (R, N), b_op/ro maybe transposed views; seed, p:
    the dropout mask on the low-rank term (the backward's dx = dy W + (G A) * mask; the forward's is in S)."""
    c = launch.empty(a.shape[0], b_op.shape[1], dtype=out_dtype, device=a.device)
    key = choices.key(a.shape[0], b_op.shape[1], a.shape[1], lo.shape[1], p > 0)
    run = lambda kind: _KINDS[kind](site, key, a, b_op, lo, ro, scale, c, seed, p)
    run(choices.choose(site, key, _kinds(a, b_op), run, a.device))
    return c


def _tma_gemm(site, key, a, b_op, lo, ro, scale, c, seed, p, scales=(None, None), kernel="tma", fast_accum=False):
    """scales: FP8 operands' (per row of a, per column of b_op) scales (kernels/fp8_linear.py); fast_accum: theirs
    summed without fp32 promotion."""
    (M, K), (N, R) = a.shape, (c.shape[1], lo.shape[1])
    b_kmajor = b_op.stride(0) == 1
    w = b_op.t() if b_kmajor else b_op
    (r_pad, block_r), sms = _r_blocks(R), launch.num_sms(a.device)
    args = (a, w, c, lo, ro, *scales, M, N, K, R, float(scale), seed, p, 1.0 / (1.0 - p), a.stride(0), w.stride(0),
            c.stride(0), lo.stride(0), lo.stride(1), ro.stride(0), ro.stride(1))
    meta = dict(B_KMAJOR=b_kmajor, DOT_PREC=_prec(c.dtype), R_PAD=r_pad, BLOCK_R=block_r, DROPOUT=p > 0, NUM_SMS=sms,
                FAST_ACCUM=fast_accum)
    go = lambda cfg: launch.run(_lora_gemm_tma_kernel, (min(sms, launch.cdiv(M, cfg["BLOCK_M"]) * launch.cdiv(
        N, cfg["BLOCK_N"])),), args, {**meta, **cfg})
    choices.launch_with(site, kernel, key, a, go)


def _pointer_gemm(site, key, a, b_op, lo, ro, scale, c, seed, p, K=None):
    """The pointer-load Triton GEMM ("triton"); with K = 0 the low-rank term alone (the "cublas" kind's first pass)."""
    (M, N), R, K = c.shape, lo.shape[1], a.shape[1] if K is None else K
    r_pad, block_r = _r_blocks(R)
    args = (a, b_op, lo, ro, c, M, N, K, R, float(scale), seed, p, 1.0 / (1.0 - p), a.stride(0), a.stride(1),
            b_op.stride(0), b_op.stride(1), lo.stride(0), lo.stride(1), ro.stride(0), ro.stride(1), c.stride(0),
            c.stride(1))
    meta = dict(DOT_PREC=_prec(a.dtype), R_PAD=r_pad, BLOCK_R=block_r, DROPOUT=p > 0)
    go = lambda cfg: launch.run(_lora_gemm_kernel, (launch.cdiv(M, cfg["BLOCK_M"]) * launch.cdiv(N, cfg["BLOCK_N"]),),
                                args, {**meta, **cfg})
    choices.launch_with(site if K else site + ".low-rank", "gemm", key, a, go)


def _cublas_gemm(site, key, a, b_op, lo, ro, scale, c, seed, p):
    _pointer_gemm(site, key, a, b_op, lo, ro, scale, c, seed, p, K=0)  # the low-rank term first, then cuBLAS
    c.addmm_(a, b_op)  # accumulates x W^T into it (beta = 1)


_KINDS = {"tma": _tma_gemm, "triton": _pointer_gemm, "cublas": _cublas_gemm}


def _lora_down(x2, A, seed, p):
    """S = dropout(x) A^T, (M, r) fp32."""
    (M, K), R = x2.shape, A.shape[0]
    s = launch.empty(M, R, dtype=torch.float32, device=x2.device)
    block_r = _r_blocks(R)[1]
    args = (x2, A, s, M, K, R, seed, p, 1.0 / (1.0 - p), x2.stride(0), x2.stride(1), A.stride(0), A.stride(1))
    meta = dict(DROPOUT=p > 0, DOT_PREC=_prec(x2.dtype), BLOCK_R=block_r)
    go = lambda cfg: launch.run(_lora_down_kernel, (_programs(launch.cdiv(M, cfg["BLOCK_M"]), x2.device),
                                                    launch.cdiv(R, block_r)), args, {**meta, **cfg})
    choices.launch_with("down", "down", choices.key(M, R, K, R, p > 0), x2, go)
    return s


def _backward_splits(M, N, K, R, device):
    """How the backward's skinny passes split their sums (partial buffers are sized by it): dy pass: gm row blocks
    of `rows_dy` x gn column ranges of `cols`; dA: gm_da row ranges of `rows_da`."""
    small = launch.INTERPRET
    rows_dy = 32 if small else _DY_ROWS
    gm = launch.cdiv(M, rows_dy)
    waves = SKINNY_WAVES * launch.num_sms(device)
    cols, gn = _split(N, launch.cdiv(waves, gm), 32 if small else _SPLIT)
    rows_da, gm_da = _split(M, launch.cdiv(waves, launch.cdiv(K, 128)), 32 if small else _SPLIT)
    n_counters = launch.cdiv(R, _r_blocks(R)[1]) * max(gm, launch.cdiv(K, 16))  # per (row | dA column block, r chunk)
    return rows_dy, gm, cols, gn, rows_da, gm_da, n_counters


def _lora_skinny_backward(x2, dy2, A, B, s, scale, seed, p):
    """(G, dA, dB) = (scale dy B, G^T dropout(x), scale dy^T S), fp32, in two launches: the dy pass (G, dB
    partials), then the dA pass (which also sums the dB partials). Sums split over programs finish in-kernel."""
    (M, N), K, R, dev = dy2.shape, x2.shape[1], B.shape[1], dy2.device
    rows_dy, gm, cols, gn, rows_da, gm_da, n_counters = _backward_splits(M, N, K, R, dev)
    count = launch.counters(dev, n_counters)
    g = launch.empty(M, R, dtype=torch.float32, device=dev)
    db = launch.empty(N, R, dtype=torch.float32, device=dev)
    da = launch.empty(R, K, dtype=torch.float32, device=dev)
    # partials (every element written before it is read); with one part the kernels store none, so G / dA stand in,
    # and one row block's dB partial is dB itself
    gp = torch.empty(gn, M, R, dtype=torch.float32, device=dev) if gn > 1 else g
    dbp = torch.empty(gm, N, R, dtype=torch.float32, device=dev) if gm > 1 else db
    dap = torch.empty(gm_da, R, K, dtype=torch.float32, device=dev) if gm_da > 1 else da
    block_r, block_db = _r_blocks(R)[1], 64 if launch.INTERPRET else 2048  # dB partials summed in chunks of block_db
    db_items = launch.cdiv(N * R, block_db) if gm > 1 else 0
    args = (dy2, B, s, gp, g, dbp, count, M, N, R, float(scale), gn, cols, dy2.stride(0), dy2.stride(1), B.stride(0),
            B.stride(1))
    meta = dict(DOT_PREC=_prec(dy2.dtype), BLOCK_R=block_r, BLOCK_M=rows_dy)
    go = lambda cfg: launch.run(_lora_dy_kernel, (_programs(gm * gn, dev), launch.cdiv(R, block_r)), args,
                                {**meta, **cfg})
    choices.launch_with("dy", "dy", choices.key(M, N, R, R, False), dy2, go)
    args = (x2, g, dap, da, count, dbp, db, M, K, R, seed, p, 1.0 / (1.0 - p), gm_da, rows_da, db_items, gm, N * R,
            x2.stride(0), x2.stride(1))
    meta = dict(DROPOUT=p > 0, DOT_PREC=_prec(x2.dtype), BLOCK_R=block_r, BLOCK_DB=block_db)
    go = lambda cfg: launch.run(_lora_da_kernel, (_programs(db_items + launch.cdiv(K, cfg["BLOCK_K"]) * gm_da, dev),
                                                  launch.cdiv(R, block_r)), args, {**meta, **cfg})
    choices.launch_with("da", "da", choices.key(M, R, K, R, p > 0), x2, go)
    return g, da, db


def dropout_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p), fp32, `shape` = (..., in)) that the kernels apply for this seed."""
    K = shape[-1]
    out = torch.empty(math.prod(shape[:-1]), K, dtype=torch.float32, device=device)
    with launch.on_device(out):
        launch.run(_dropout_mask_kernel, (launch.cdiv(out.shape[0], 32), launch.cdiv(K, 32)),
                   (out, out.shape[0], K, seed, p, 1.0 / (1.0 - p)), dict(BLOCK_M=32, BLOCK_K=32))
    return out.view(*shape)


# ----------------------------------------------------------------------------------------------- autograd
class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + s (dropout(x) A^T) B^T, dropout mask = Philox(seed) (p = 0: no dropout).

    Gradients (xd = dropout(x), S = xd A^T, G = s dy B):
        dx = dy W + (G A) * mask   -- mask applied to the LoRA part only (p > 0)
        dA = G^T xd,   dB = s dy^T S,   dW = None (frozen)
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scale, dropout_p, seed, output=True, reuse=None, keep=None):
        assert weight.dtype == x.dtype, f"x {x.dtype} and W {weight.dtype} must share a dtype (W is never cast)"
        assert x.shape[-1] == weight.shape[1] == lora_A.shape[1] and lora_B.shape == (weight.shape[0], lora_A.shape[0])
        x2 = x.reshape(-1, x.shape[-1])  # a view when possible; strides go to the kernels
        with launch.on_device(x):
            s, y = made(x2, weight.shape[0], output, reuse, keep, lambda: _lora_down(x2, lora_A, seed, dropout_p),
                        lambda s: _gemm("fwd", x2, weight.t(), s, lora_B.t(), scale, x2.dtype))
        ctx.save_for_backward(x, weight, lora_A, lora_B, s)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, s = ctx.saved_tensors
        x2, dy2, p = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), ctx.dropout_p
        with launch.on_device(dy):
            g, da, db = _lora_skinny_backward(x2, dy2, lora_A, lora_B, s, ctx.scale, ctx.seed, p)
            dx = None
            if ctx.needs_input_grad[0]:  # dx = dy W + (G A) * mask, mask regenerated in the GEMM epilogue
                dx = _gemm("dx", dy2, weight, g, lora_A, 1.0, x.dtype, ctx.seed, p).view(x.shape)
        return dx, None, da.to(lora_A.dtype), db.to(lora_B.dtype), None, None, None, None, None, None


def made(x2, out_features, output, reuse, keep, low_rank, frozen_gemm):
    """The forward's (S, y): S = low_rank(), y = frozen_gemm(S), except what `reuse` (S, y or None) gives (a
    recompute taking what its layer's first run kept, phi3/recompute.py); output=False: y is uninitialized memory (a
    recompute's, whose output nothing reads). keep(S, y or None) receives what was made (a first run that keeps)."""
    s, y = reuse if reuse is not None else (None, None)
    s = low_rank() if s is None else s
    if y is None:
        y = frozen_gemm(s) if output else x2.new_empty(x2.shape[0], out_features)
    if keep is not None:
        keep(s, y if output else None)
    return s, y
