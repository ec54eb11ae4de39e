"""QLoRA linear: y = x W^T + s * (dropout(x) A^T) B^T with W frozen in NF4 (an NF4Weight, kernels/nf4_weight.py).

The LoRA linear of kernels/lora_linear.py (same skinny kernels, same dropout, same saved tensors: x, S, the seed) with
its main GEMM reading W as NF4 (kernels/nf4_gemm.py). Two GEMM kinds, chosen per shape by kernels/choices.py:
  "nf4"         W dequantized inside the GEMM's K loop: W is read as 4 bits, but every row tile dequantizes its
                columns again (work that grows with the token count); the decode configs (<= DECODE_TOKENS tokens)
                are one row tile, so each byte of W is read once.
  one token     (the forward at decoding) the matrix-vector kernel of kernels/nf4_gemv.py, whatever the kind.
  "nf4-cublas"  W dequantized once per call into a temporary (freed on return, so never kept from forward to
                backward; the caching allocator gives its block to the next layer of that shape), then lora_linear's
                "cublas" kind.
The rule (a GPU without a table, or a shape the table lacks) takes "nf4" up to FUSED_MAX_TOKENS tokens, else
"nf4-cublas". W is dequantized to x's dtype (one rounding of the fp32 value: dequantize_reference(W, x.dtype)).
This file: the launchers and the autograd Functions (phi3/ops.py: qlora_linear and nf4_linear, the torch spec and
the switch to these).
"""
import torch

from . import choices, launch
from .lora_linear import _cublas_gemm, _lora_down, _lora_skinny_backward, _prec, _r_blocks, made
from .nf4_gemm import _nf4_dequantize_kernel, _nf4_gemm_kernel
from .nf4_gemv import _nf4_gemv_kernel
from .nf4_weight import NF4Weight

FUSED_MAX_TOKENS = 512  # estimate: past it, the repeated in-loop dequant costs more than one pass + cuBLAS
DECODE_TOKENS = 16  # up to this many: the "nf4-decode" configs (BLOCK_M = 16)
GEMV_PROGRAMS_PER_SM = 8  # one token: programs per SM the K split aims at (8 and 16 were best on an H100)


def _nf4(w: NF4Weight):
    """The kernels' NF4 arguments."""
    assert w.shape[0] * w.shape[1] < 2**31, "NF4 kernels index W with int32"
    return w.packed, w.absmax_code, w.nested_absmax, w.nested_code, w.code, float(w.offset)


def _kinds(tokens):
    return ["nf4", "nf4-cublas"] if tokens <= FUSED_MAX_TOKENS else ["nf4-cublas", "nf4"]


def _gemm(site, a, w, lo=None, ro=None, scale=1.0, seed=0, p=0.0):
    """C = a W^T (site "nf4.fwd") or a W ("nf4.dx") + scale * lo ro (times the dropout mask at p > 0); lo None: no
    low-rank term (nf4_linear)."""
    if lo is None:
        lo, ro = a[:, :0], a[:0, :0]  # rank 0: never read
    n_out = w.shape[0] if site == "nf4.fwd" else w.shape[1]
    c = launch.empty(a.shape[0], n_out, dtype=a.dtype, device=a.device)
    key = choices.key(a.shape[0], c.shape[1], a.shape[1], lo.shape[1], p > 0)
    # one token (decoding): whole 64-blocks per row, read as int32 words (a view of a checkpoint's bytes may start
    # off a word boundary: the GEMM takes that)
    if site == "nf4.fwd" and a.shape[0] == 1 and w.shape[1] % 64 == 0 and w.packed.storage_offset() % 4 == 0:
        _gemv(key, a, w, lo, ro, scale, c)
        return c
    run = lambda kind: _KINDS[kind](site, key, a, w, lo, ro, scale, c, seed, p)
    run(choices.choose(site, key, _kinds(a.shape[0]), run, a.device))
    return c


def _fused_gemm(site, key, a, w, lo, ro, scale, c, seed, p):
    (M, N), R = c.shape, lo.shape[1]
    r_pad, block_r = _r_blocks(R) if R else (0, 16)
    args = (a, *_nf4(w), lo, ro, c, M, N, a.shape[1], R, float(scale), seed, p, 1.0 / (1.0 - p), a.stride(0),
            a.stride(1), lo.stride(0), lo.stride(1), ro.stride(0), ro.stride(1), c.stride(0))
    meta = dict(W_T=site == "nf4.fwd", WHOLE_BLOCKS=w.shape[1] % 64 == 0, DOT_PREC=_prec(a.dtype), R_PAD=r_pad,
                BLOCK_R=block_r, DROPOUT=p > 0, enable_fp_fusion=False)
    go = lambda cfg: launch.run(_nf4_gemm_kernel, (launch.cdiv(M, cfg["BLOCK_M"]) * launch.cdiv(N, cfg["BLOCK_N"]),),
                                args, {**meta, **cfg})
    choices.launch_with(site, "nf4-decode" if M <= DECODE_TOKENS else "nf4", key, a, go)


def _gemv(key, a, w, lo, ro, scale, c):
    (N, K), R = w.shape, lo.shape[1]
    count = launch.counters(a.device, N)

    def go(cfg):
        rows, steps = launch.cdiv(N, cfg["BLOCK_N"]), launch.cdiv(K // 64, cfg["BLOCK_K"] // 64)
        wanted = launch.cdiv(GEMV_PROGRAMS_PER_SM * launch.num_sms(a.device), rows)  # splits of K, a step at least
        steps_per_split = launch.cdiv(steps, max(1, min(steps, wanted)))
        splits = launch.cdiv(steps, steps_per_split)
        partial = launch.empty(splits, N, dtype=torch.float32, device=a.device) if splits > 1 else c
        packed, *stats = _nf4(w)  # the kernel reads W as int32 words (whole 64-blocks: 8 words each)
        args = (a, packed.view(torch.int32), *stats, lo, ro, c, partial, count, N, K, R, float(scale),
                steps_per_split * cfg["BLOCK_K"] // 64, a.stride(1), lo.stride(1), ro.stride(0), ro.stride(1))
        launch.run(_nf4_gemv_kernel, (rows, splits), args, {**meta, **cfg})

    meta = dict(R_PAD=launch.next_pow2(R) if R else 0, enable_fp_fusion=False)
    choices.launch_with("nf4.fwd", "nf4-gemv", key, a, go)


def _dense_gemm(site, key, a, w, lo, ro, scale, c, seed, p):
    dense = dequantize(w, a.dtype)  # freed on return: the caching allocator hands its block to the next such call
    b_op = dense.t() if site == "nf4.fwd" else dense
    if lo.shape[1]:
        _cublas_gemm(site, key, a, b_op, lo, ro, scale, c, seed, p)
    else:
        torch.mm(a, b_op, out=c)


_KINDS = {"nf4": _fused_gemm, "nf4-cublas": _dense_gemm}


def dequantize(weight: NF4Weight, dtype=None) -> torch.Tensor:
    """W (N, K) in `dtype` (default: W's own) by the kernel: dequantize_reference's bits."""
    out = launch.empty(*weight.shape, dtype=dtype or weight.dtype, device=weight.device)
    n = out.numel()
    go = lambda cfg: launch.run(_nf4_dequantize_kernel, (launch.cdiv(n, 64 * cfg["BLOCKS"]),), (*_nf4(weight), out, n),
                                {**cfg, "enable_fp_fusion": False})
    with launch.on_device(out):
        choices.launch_with("nf4", "nf4-dequantize", choices.key(1, *weight.shape, 0, False), out, go)
    return out


# ----------------------------------------------------------------------------------------------- autograd
# The two GEMMs of a frozen W held in another format, per format: gemm("fwd", x, W, S, (s B)^T, s) = x W^T + S (s B)^T,
# gemm("dx", dy, W, G, A, 1, seed, p) = dy W + (G A) * mask. kernels/fp8_linear.py adds FP8Weight's.
FROZEN_GEMMS = {NF4Weight: lambda site, a, w, lo, ro, scale, seed=0, p=0.0: _gemm("nf4." + site, a, w, lo, ro, scale,
                                                                                  seed, p)}


class QLoRALinearFunction(torch.autograd.Function):
    """y = x W^T + s (dropout(x) A^T) B^T, W an NF4Weight (or another FROZEN_GEMMS format: an FP8Weight), dropout
    mask = Philox(seed) (p = 0: no dropout).

    Gradients (xd = dropout(x), S = xd A^T, G = s dy B), as LoRALinearFunction's:
        dx = dy W + (G A) * mask,   dA = G^T xd,   dB = s dy^T S,   W: none (frozen)
    Saved: x, S, the seed and a reference to the weight itself (never a dequantized W).
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scale, dropout_p, seed, output=True, reuse=None, keep=None):
        assert x.shape[-1] == weight.shape[1] == lora_A.shape[1] and lora_B.shape == (weight.shape[0], lora_A.shape[0])
        x2 = x.reshape(-1, x.shape[-1])
        with launch.on_device(x):
            s, y = made(x2, weight.shape[0], output, reuse, keep, lambda: _lora_down(x2, lora_A, seed, dropout_p),
                        lambda s: FROZEN_GEMMS[type(weight)]("fwd", x2, weight, s, lora_B.t(), scale))
        ctx.save_for_backward(x, lora_A, lora_B, s)
        ctx.weight, ctx.scale, ctx.dropout_p, ctx.seed = weight, scale, dropout_p, seed
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, s = ctx.saved_tensors
        x2, dy2, p = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), ctx.dropout_p
        with launch.on_device(dy):
            g, da, db = _lora_skinny_backward(x2, dy2, lora_A, lora_B, s, ctx.scale, ctx.seed, p)
            dx = None
            if ctx.needs_input_grad[0]:  # dx = dy W + (G A) * mask, W dequantized (or FP8) inside the GEMM
                dx = FROZEN_GEMMS[type(ctx.weight)]("dx", dy2, ctx.weight, g, lora_A, 1.0, ctx.seed, p).view(x.shape)
        return dx, None, da.to(lora_A.dtype), db.to(lora_B.dtype), None, None, None, None, None, None


class NF4LinearFunction(torch.autograd.Function):
    """y = x W^T, W an NF4Weight (frozen): dx = dy W. Saved: only the reference to the NF4Weight."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        with launch.on_device(x):
            return _gemm("nf4.fwd", x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        with launch.on_device(dy):
            dx = _gemm("nf4.dx", dy.reshape(-1, dy.shape[-1]), ctx.weight)
        return dx.view(*dy.shape[:-1], ctx.weight.shape[1]), None
