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

Files: kernels/gemm.py (the GEMMs), kernels/lowrank.py (the skinny kernels, dropout), kernels/launch.py (autotune
tables, launches bound to a config); this file: the host side, the autograd Function and the pure-torch reference.
Host side: each problem (shapes, strides, dtypes, alignment) gets a plan the first time it is seen; later calls
allocate their outputs and launch the kernels with the configs chosen for it (kernels/launch.py: cached).

GEMM choice (module switch GEMM, env LORA_GEMM): "auto" = on tuned problems (16-bit, >= 2048 tokens) every kind
that applies is timed once per shape and the fastest kept, which differs between shapes and between GPUs of one
model; otherwise "tma" where it applies (16-bit, Hopper, 16-byte aligned rows), else "cublas" (the pointer-load
Triton GEMM, "triton", in the interpreter). "triton" and "cublas" force a kind.
"""
import contextlib
import os

import torch
import torch.nn.functional as F

from . import launch
from .lowrank import _dropout_mask_kernel

GEMM_CHOICES = ("auto", "triton", "cublas")  # auto: timed choice; triton: pointer loads; cublas: hybrid
GEMM = os.environ.get("LORA_GEMM", "auto")  # train.py rejects other values before loading anything
POISON_OUTPUTS = False  # tests set True: kernel-written buffers are filled with NaN before launch
SKINNY_WAVES = 2  # persistent skinny kernels: programs = this many waves of the GPU's SMs
# rows per dy-pass work item: sets the dB partial count, so not autotuned; 256 beat 64 and 128 at out = 3072, 9216
# and 16384 (bench/NOTES-lora.md, v4)
_DY_ROWS = 256
_SPLIT = 256  # per-program row/col ranges are multiples of every block size above


def _empty(*shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 must not silently drop to tf32


def _r_blocks(r):
    r_pad = max(16, launch.next_pow2(r))
    return r_pad, min(r_pad, 64)


_plans = {}  # problem key -> plan: a dict of what never changes for that problem (launch sites, work splits)


def _plan(key):
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 10_000:  # keys hold sizes: bound the cache over many batch shapes
            _plans.clear()
        plan = _plans[key] = {}
    return plan


def _layout(t):
    """What a compiled kernel is specialized on, per tensor: sizes and strides (ints), dtype, 16-byte alignment."""
    return t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0


def _forward(plan, x2, weight, A, B, scale, seed, p):
    """(S, y) of the forward: S by the skinny kernel, then y by the GEMM kind chosen for this problem."""
    s = _lora_down(plan, x2, A, seed, p)
    return s, _gemm(plan, "fwd", x2, weight.t(), s, B.t(), scale, x2.dtype)


def _gemm(plan, site, a, b_op, lo, ro, scale, out_dtype, seed=0, p=0.0):
    """C (M, N) = a (M, K) @ b_op (K, N) + scale * lo (M, R) @ ro (R, N); b_op/ro may be transposed views.
    seed, p: dropout applied to ro's product with lo (the backward's dx = dy W + (G A) * mask); the forward's
    dropout is in S already. The kind is fixed per plan and site the first time: the rule's, or where the TMA
    kernel and the cuBLAS hybrid both apply to a tuned problem, the faster of the two, timed once per shape as
    the autotuner times configs (which one wins differs between shapes and between H200s: bench/NOTES-lora.md, v5)."""
    c = _empty(a.shape[0], b_op.shape[1], dtype=out_dtype, device=a.device)
    kind = plan.get(site + " kind")
    if kind is None:
        kind = _static_kind(a, b_op)
        if kind == "tma" and _timed(a):  # cuBLAS's main loop may outrun Triton's by more than the extra pass
            key = _kind_key(site, a, b_op, lo, p)
            runs = {k: lambda k=k: _launch_kind(k, plan, site, a, b_op, lo, ro, scale, c, seed, p)
                    for k in ("tma", "cublas")}
            if launch.compiling_ahead() and _chosen_kinds.get(key) not in runs:
                for run in runs.values():  # (nothing runs: each kind's kernels are compiled for the timing)
                    run()
                return c
            kind = _fastest(key, runs)
        plan[site + " kind"] = kind
    _launch_kind(kind, plan, site, a, b_op, lo, ro, scale, c, seed, p)
    return c


def _launch_kind(kind, plan, site, a, b_op, lo, ro, scale, c, seed, p):
    if kind == "tma":
        _launch_gemm_tma(plan, site + " tma", a, b_op, lo, ro, scale, c, seed, p)
    elif kind == "cublas":  # low-rank term first (K = 0 loop), then cuBLAS accumulates into it (beta = 1)
        _launch_gemm(plan, site + " low-rank", a, b_op, lo, ro, scale, c, 0, seed, p)
        c.addmm_(a, b_op)
    else:
        _launch_gemm(plan, site + " triton", a, b_op, lo, ro, scale, c, a.shape[1], seed, p)


def _tma_ready(*tensors):
    """TMA descriptors need a 16-byte aligned base, unit stride in the last dim and 16-byte aligned row strides."""
    return all(t.data_ptr() % 16 == 0 and t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0
               for t in tensors)


def _static_kind(a, b_op):
    """The GEMM kind by rule. GEMM="auto": the TMA kernel for 16-bit inputs wherever the hardware (Hopper or newer;
    the interpreter emulates TMA) and the strides allow it (C, fresh, is aligned if its rows are), else cuBLAS plus
    the low-rank pass on the GPU (faster there than the pointer kernel), the pointer kernel in the interpreter.
    fp32 (ieee FMA dot) overflows the TMA kernel's shared memory."""
    if GEMM not in GEMM_CHOICES:
        raise ValueError(f"LORA_GEMM={GEMM!r}: use one of {', '.join(GEMM_CHOICES)}")
    if GEMM != "auto":
        return GEMM
    w = b_op.t() if b_op.stride(0) == 1 else b_op  # W itself in the forward (K-major), as is in the backward
    hopper = launch.INTERPRET or launch.capability(a.device)[0] >= 9
    if a.element_size() <= 2 and hopper and _tma_ready(a, w) and b_op.shape[1] * a.element_size() % 16 == 0:
        return "tma"
    return "triton" if launch.INTERPRET else "cublas"


_chosen_kinds = {}  # `_kind_key` -> the kind measured fastest for it (or taken from a tuning record)


def _timed(a):
    """Whether kinds are chosen by timing: GEMM="auto" on a problem the autotuner would tune."""
    return (GEMM == "auto" and not launch.INTERPRET and launch.AUTOTUNE and a.shape[0] >= launch.AUTOTUNE_MIN_M
            and a.element_size() <= 2 and not torch.cuda.is_current_stream_capturing())


def _kind_key(site, a, b_op, lo, p):
    """Shapes as the autotuner keys them, no device: one choice per process, and torchrun ranks share a record."""
    return launch.choice_key(site, [("M_BUCKET", launch.m_bucket(a.shape[0])), ("N", b_op.shape[1]),
                                    ("K", a.shape[1]), ("R", lo.shape[1]), ("DROPOUT", p > 0), ("dtype", a.dtype)])


def _fastest(key, runs, rounds=3):
    """The name of the fastest of `runs` (name -> callable), timed once per key: every candidate in each of
    `rounds` interleaved rounds (clock and power drift then hit all alike), the median round compared: one
    timing per kind is at the mercy of a single noisy run (the same matmul varies by up to 17 % between rounds).
    A kind already chosen for the key (kernels/tuning.py: a record) is kept unless it cannot run here."""
    if _chosen_kinds.get(key) not in runs:
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(launch.time_ms(run))
        _chosen_kinds[key] = min(times, key=lambda name: sorted(times[name])[rounds // 2])
    return _chosen_kinds[key]


def _launch_gemm_tma(plan, site, a, b_op, lo, ro, scale, c, seed, p):
    M, K = a.shape
    N, R = c.shape[1], lo.shape[1]
    b_kmajor = b_op.stride(0) == 1
    w = b_op.t() if b_kmajor else b_op
    args = (a, w, c, lo, ro, M, N, K, R, float(scale), seed, p, 1.0 / (1.0 - p), a.stride(0), w.stride(0), c.stride(0),
            lo.stride(0), lo.stride(1), ro.stride(0), ro.stride(1))

    def setup():
        r_pad, block_r = _r_blocks(R)
        num_sms = launch.num_sms(a.device)
        grid = lambda m: (min(num_sms, launch.cdiv(M, m["BLOCK_M"]) * launch.cdiv(N, m["BLOCK_N"])),)
        return grid, dict(M_BUCKET=launch.m_bucket(M), B_KMAJOR=b_kmajor, DTYPE=str(a.dtype), DOT_PREC=_prec(a.dtype),
                          R_PAD=r_pad, BLOCK_R=block_r, DROPOUT=p > 0, NUM_SMS=num_sms)
    launch.cached(plan, site, "tma", args, setup, a.dtype)


def _launch_gemm(plan, site, a, b_op, lo, ro, scale, c, K, seed, p):
    M, N, R = c.shape[0], c.shape[1], lo.shape[1]
    args = (a, b_op, lo, ro, c, M, N, K, R, float(scale), seed, p, 1.0 / (1.0 - p), a.stride(0), a.stride(1),
            b_op.stride(0), b_op.stride(1), lo.stride(0), lo.stride(1), ro.stride(0), ro.stride(1), c.stride(0), c.stride(1))

    def setup():
        r_pad, block_r = _r_blocks(R)
        grid = lambda m: (launch.cdiv(M, m["BLOCK_M"]) * launch.cdiv(N, m["BLOCK_N"]),)
        return grid, dict(M_BUCKET=launch.m_bucket(M), DOT_PREC=_prec(a.dtype), R_PAD=r_pad, BLOCK_R=block_r, DROPOUT=p > 0)
    launch.cached(plan, site, "gemm", args, setup, a.dtype)


def _split(n, parts, block=_SPLIT):
    """(per-item length rounded up to `block`, number of items) splitting n into about `parts` pieces."""
    per = launch.cdiv(launch.cdiv(n, max(1, parts)), block) * block
    return per, launch.cdiv(n, per)


def _programs(items, device):
    """Persistent skinny kernels: at most SKINNY_WAVES waves of programs, each walking items in turn."""
    return max(1, min(items, SKINNY_WAVES * launch.num_sms(device)))


def _lora_down(plan, x2, A, seed, p):
    """S = dropout(x) A^T, (M, r) fp32."""
    M, K = x2.shape
    R = A.shape[0]
    s = _empty(M, R, dtype=torch.float32, device=x2.device)
    args = (x2, A, s, M, K, R, seed, p, 1.0 / (1.0 - p), x2.stride(0), x2.stride(1), A.stride(0), A.stride(1))

    def setup():
        block_r = _r_blocks(R)[1]
        grid = lambda m: (_programs(launch.cdiv(M, m["BLOCK_M"]), x2.device), launch.cdiv(R, block_r))
        return grid, dict(M_BUCKET=launch.m_bucket(M), DROPOUT=p > 0, DOT_PREC=_prec(x2.dtype), BLOCK_R=block_r)
    launch.cached(plan, "down", "down", args, setup, x2.dtype)
    return s


def _backward_splits(M, N, K, R, device):
    """How the backward's skinny passes split their sums (fixed per problem; partial buffers are sized by it):
    dy pass: gm row blocks of `rows_dy` x gn column ranges of `cols`; dA: gm_da row ranges of `rows_da`."""
    interp = launch.INTERPRET
    rows_dy = 32 if interp else _DY_ROWS
    gm = launch.cdiv(M, rows_dy)
    cols, gn = _split(N, launch.cdiv(SKINNY_WAVES * launch.num_sms(device), gm), 32 if interp else _SPLIT)
    rows_da, gm_da = _split(M, launch.cdiv(SKINNY_WAVES * launch.num_sms(device), launch.cdiv(K, 128)),
                            32 if interp else _SPLIT)
    r_chunks = launch.cdiv(R, _r_blocks(R)[1])
    n_counters = r_chunks * max(gm, launch.cdiv(K, 16))  # per (row block | dA column block of >= 16, rank chunk)
    return rows_dy, gm, cols, gn, rows_da, gm_da, n_counters


def _lora_skinny_backward(plan, x2, dy2, A, B, s, scale, seed, p):
    """(G, dA, dB) = (scale dy B, G^T dropout(x), scale dy^T S), fp32, in two launches: the dy pass (G, dB
    partials), then the dA pass (which also sums the dB partials). Sums split over programs finish in-kernel."""
    M, N = dy2.shape
    K, R = x2.shape[1], B.shape[1]
    dev = dy2.device
    splits = plan.get("splits")
    if splits is None:
        splits = plan["splits"] = _backward_splits(M, N, K, R, dev)
    rows_dy, gm, cols, gn, rows_da, gm_da, n_counters = splits
    count = launch.counters(dev, n_counters)
    g = _empty(M, R, dtype=torch.float32, device=dev)
    db = _empty(N, R, dtype=torch.float32, device=dev)
    da = _empty(R, K, dtype=torch.float32, device=dev)
    # partials (every element written before it is read); with one part `_summed` stores none, so G / dA stand in,
    # and one row block's dB partial is dB itself
    gp = torch.empty(gn, M, R, dtype=torch.float32, device=dev) if gn > 1 else g
    dbp = torch.empty(gm, N, R, dtype=torch.float32, device=dev) if gm > 1 else db
    dap = torch.empty(gm_da, R, K, dtype=torch.float32, device=dev) if gm_da > 1 else da
    block_r = _r_blocks(R)[1]

    block_db = 64 if launch.INTERPRET else 2048  # dB partials summed per chunk of this many floats
    db_items = launch.cdiv(N * R, block_db) if gm > 1 else 0

    def dy_setup():
        grid = lambda m: (_programs(gm * gn, dev), launch.cdiv(R, block_r))
        return grid, dict(M_BUCKET=launch.m_bucket(M), DOT_PREC=_prec(dy2.dtype), BLOCK_R=block_r, BLOCK_M=rows_dy)

    def da_setup():
        grid = lambda m: (_programs(db_items + launch.cdiv(K, m["BLOCK_K"]) * gm_da, dev), launch.cdiv(R, block_r))
        return grid, dict(M_BUCKET=launch.m_bucket(M), DROPOUT=p > 0, DOT_PREC=_prec(x2.dtype), BLOCK_R=block_r,
                          BLOCK_DB=block_db)

    args = (dy2, B, s, gp, g, dbp, count, M, N, R, float(scale), gn, cols, dy2.stride(0), dy2.stride(1), B.stride(0),
            B.stride(1))
    launch.cached(plan, "dy", "dy", args, dy_setup, dy2.dtype)
    args = (x2, g, dap, da, count, dbp, db, M, K, R, seed, p, 1.0 / (1.0 - p), gm_da, rows_da, db_items, gm, N * R,
            x2.stride(0), x2.stride(1))
    launch.cached(plan, "da", "da", args, da_setup, x2.dtype)
    return g, da, db


def dropout_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p), fp32, `shape` = (..., in)) that the kernels apply for this seed."""
    *lead, K = shape
    M = 1
    for d in lead:
        M *= d
    out = torch.empty(M, K, dtype=torch.float32, device=device)
    grid = (launch.cdiv(M, 32), launch.cdiv(K, 32))
    with _on(out):
        _dropout_mask_kernel[grid](out, M, K, seed, p, 1.0 / (1.0 - p), BLOCK_M=32, BLOCK_K=32)
    return out.view(*shape)


_SAME_DEVICE = contextlib.nullcontext()


def _on(t):
    """Launch on t's GPU: a device switch only when it is not the current one (the switch costs microseconds)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _SAME_DEVICE


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
        # the problem's key: everything the kernels are compiled and split for, and the module switches
        key = (x.device, dropout_p > 0, GEMM, launch.AUTOTUNE, _layout(x2), _layout(weight), _layout(lora_A),
               _layout(lora_B))
        plan = _plan(key)
        with _on(x):
            s, y = _forward(plan, x2, weight, lora_A, lora_B, scale, seed, dropout_p)
        ctx.save_for_backward(x, weight, lora_A, lora_B, s)
        ctx.scale, ctx.dropout_p, ctx.seed, ctx.key = scale, dropout_p, seed, key
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, s = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        p = ctx.dropout_p
        plan = _plan(ctx.key + (_layout(dy2), ctx.needs_input_grad[0]))
        with _on(dy):
            g, da, db = _lora_skinny_backward(plan, x2, dy2, lora_A, lora_B, s, ctx.scale, ctx.seed, p)
            dx = None
            if ctx.needs_input_grad[0]:  # dx = dy W + (G A) * mask, mask regenerated in the GEMM epilogue
                dx = _gemm(plan, "dx", dy2, weight, g, lora_A, 1.0, x.dtype, ctx.seed, p).view(x.shape)
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
    # the kernels take the seed as a 32-bit int: a compiled kernel's argument types never change between calls
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, float(scale), p,
                                    0 if seed is None else int(seed) & 0x7FFFFFFF)

