"""LoRA linear with the frozen W's GEMMs in FP8 (train.py --fp8, Hopper): kernels/lora_linear.py's layer, except

    forward   y  = [q(x) q(W)^T] s_x s_w + S (s B)^T        q(): e4m3 with a scale per row (kernels/fp8.py)
    backward  dx = [q(dy) q(W^T)^T] s_dy s_wt + (G A) * mask

Only the two frozen GEMMs change: the TMA GEMM (kernels/gemm.py) takes the FP8 operands and scales its
accumulator by the row and column scales before adding the low-rank term (FAST_FORWARD, below, says which sums
stay in the tensor cores' own accumulator). The low-rank path, S, G, dA, dB and what
is saved for the backward (x in 16 bits, S, the seed) are lora_linear's own: the adapter trains on the same
gradients' formulas, only the base's products carry FP8's rounding (about 2^-4 relative per operand element). The
autograd Function is the QLoRA layer's (kernels/qlora_linear.py), which takes these GEMMs for an FP8Weight.
"""
from . import choices, launch
from .fp8 import FP8Weight, quantize_rows
from .lora_linear import _tma_gemm
from .qlora_linear import FROZEN_GEMMS, QLoRALinearFunction


# The forward's (and the recompute's) sums stay in the tensor cores' own accumulator (about 13 mantissa bits) over
# all of K instead of joining an fp32 one every K block: torchao's float8 recipe (use_fast_accum for the output GEMM,
# not for the gradient's). On an H100 the FP8 step runs 1.11x faster with it, and 200 steps stay within bf16's
# run-to-run noise (bench/README.md). The backward's dx GEMM keeps the promotion, as torchao's gradient GEMMs do.
FAST_FORWARD = True


def _fp8_gemm(site, a, w: FP8Weight, lo, ro, scale, seed=0, p=0.0):
    """C (M, N) = q(a) q(W)^T ("fwd") or q(a) q(W^T)^T ("dx"), scaled, + scale * lo ro (times the dropout mask at
    p > 0), in a's dtype."""
    weight_q, weight_scale = (w.w, w.w_scale) if site == "fwd" else (w.wt, w.wt_scale)
    a_q, a_scale = quantize_rows(a)
    c = launch.empty(a.shape[0], weight_q.shape[0], dtype=a.dtype, device=a.device)
    key = choices.key(a.shape[0], c.shape[1], a.shape[1], lo.shape[1], p > 0)
    _tma_gemm("fp8." + site, key, a_q, weight_q.t(), lo, ro, scale, c, seed, p, (a_scale, weight_scale),
              kernel="tma-fp8", fast_accum=site == "fwd" and FAST_FORWARD)
    return c


FROZEN_GEMMS[FP8Weight] = _fp8_gemm
FP8LoRALinearFunction = QLoRALinearFunction  # with an FP8Weight
