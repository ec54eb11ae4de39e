"""The model's fused operations: each one's plain-torch spec (the CPU path, and the oracle its kernel is tested
against) and the switch to its Triton kernel (kernels/) on a GPU.

    rms_norm(x, w, eps[, residual])           RMSNorm, after the residual add         phi3/model.py's norms
    swiglu(gate_up)                            up * silu(gate)                         the MLP between its projections
    rope_qk(qkv, cos, sin, heads..., hd)       split + rotary embedding of q and k     the attention's start
    lora_linear(x, W, A, B, s, p)              x W^T + s dropout(x) A^T B^T             phi3/lora.py's layers
    qlora_linear(x, W4, A, B, s, p)            the same, W frozen in NF4 (an NF4Weight)  LoRA on a 4-bit base
    nf4_linear(x, W4)                          x W^T, W in NF4                          a 4-bit base's other layers
    dora_linear(x, W or W4, A, B, s, g, p)     peft's DoRA layer, g = m / ||W + s B A||  LoRA layers with --dora
    dora_weight_norm(W or W4, A, B, s)         ||W + s B A|| per output row, no grad    DoRA's g
    column_scale(L, g)                         (L * g).to(L dtype), g (N,) fp32         DoRA's g applied
    cross_entropy_grad(logits, t)              loss rows and softmax - onehot(t), in place  phi3/loss.py's chunks

backend: "triton", "torch" or None (= triton iff the input is on a GPU). Every function is autograd-aware but
cross_entropy_grad (it runs inside phi3/loss.py's autograd Function, whose forward computes the gradient).
"""
import torch
import torch.nn.functional as F

from phi3.kernels import cross_entropy, dora
from phi3.kernels.dora import ColumnScaleFunction
from phi3.kernels.fp8 import FP8Weight
from phi3.kernels.fp8_linear import FP8LoRALinearFunction
from phi3.kernels.lora_linear import LoRALinearFunction
from phi3.kernels.nf4_weight import NF4Weight, dequantize_reference
from phi3.kernels.qlora_linear import NF4LinearFunction, QLoRALinearFunction
from phi3.kernels.rmsnorm import MAX_HIDDEN, RMSNormFunction
from phi3.kernels.rope import RoPEFunction
from phi3.kernels.swiglu import SwiGLUFunction

_ROPE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the RoPE kernel's; fp64 takes the torch path


def _triton(backend, t: torch.Tensor) -> bool:
    return (backend or ("triton" if t.is_cuda else "torch")) == "triton"


def rms_norm_reference(x, weight, eps, residual=None):
    """y = w * (s * rsqrt(mean(s^2) + eps)).to(s dtype), s = x (+ residual), the mean in fp32 (fp64 stays fp64).
    Returns y, or (y, s) with a residual."""
    s = x if residual is None else x + residual
    h = s.to(torch.promote_types(s.dtype, torch.float32))
    y = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return y if residual is None else (y, s)


def rms_norm(x, weight, eps: float, residual=None, *, backend=None):
    """RMSNorm(x) -> y, or with a residual r: (RMSNorm(x + r), x + r)."""
    if weight.shape != x.shape[-1:] or residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} needs weight ({x.shape[-1]},) and a residual like x")
    if not _triton(backend, x) or x.shape[-1] > MAX_HIDDEN:
        return rms_norm_reference(x, weight, eps, residual)
    return RMSNormFunction.apply(x, weight, residual, float(eps))


def swiglu_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def swiglu(gate_up, *, backend=None):
    """up * silu(gate) for gate_up = [gate | up] (..., 2I)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: gate_up's last dim ({gate_up.shape[-1]}) must be even: [gate | up]")
    return SwiGLUFunction.apply(gate_up) if _triton(backend, gate_up) else swiglu_reference(gate_up)


def rope_qk_reference(qkv, cos, sin, n_head, n_kv_head, head_dim):
    """q, k, v (B, heads, T, hd) from qkv, q and k rotated: x cos + rotate_half(x) sin, rotate_half([x1 | x2]) =
    [-x2 | x1]. cos and sin may cover fewer dims than a head (partial rotary: Phi-4-mini's 96 of 128): those are
    rotated, the rest pass through."""
    (B, T, _), heads = qkv.shape, (n_head, n_kv_head, n_kv_head)
    q, k, v = (t.view(B, T, n, head_dim).transpose(1, 2)  # (B, heads, T, hd)
               for t, n in zip(qkv.split([n * head_dim for n in heads], -1), heads))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rotary_dim) broadcast over heads
    rot, half = cos.shape[-1], cos.shape[-1] // 2
    rope = lambda x: x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin
    if rot < head_dim:
        return *(torch.cat((rope(x[..., :rot]), x[..., rot:]), -1) for x in (q, k)), v
    return rope(q), rope(k), v


def rope_qk(qkv, cos, sin, n_head: int, n_kv_head: int, head_dim: int, *, backend=None):
    """RoPE on q and k of qkv (B, T, (n_head + 2 n_kv_head) head_dim) -> (q, k, v), each (B, heads, T, head_dim),
    v unrotated; cos, sin (B or 1, T or 1, rotary_dim <= head_dim), any positions. No gradients for cos and sin:
    tables that require one take the torch path, as does fp64."""
    sizes = (n_head, n_kv_head, head_dim)
    if not all(isinstance(n, int) and n > 0 for n in sizes) or head_dim % 2:
        raise ValueError(f"rope_qk: heads and head_dim must be positive ints and head_dim even, got {sizes}")
    if qkv.dim() != 3 or qkv.shape[-1] != (n_head + 2 * n_kv_head) * head_dim:
        raise ValueError(f"rope_qk: qkv {tuple(qkv.shape)} must be (B, T, (n_head + 2 n_kv_head) head_dim = "
                         f"{(n_head + 2 * n_kv_head) * head_dim})")
    B, T, _ = qkv.shape
    rot = cos.shape[-1] if cos.dim() == 3 else 0
    fits = lambda t: t.dim() == 3 and t.shape[0] in (1, B) and t.shape[1] in (1, T) and t.shape[2] == rot
    if not (fits(cos) and fits(sin) and cos.dtype == sin.dtype and 2 <= rot <= head_dim and rot % 2 == 0):
        raise ValueError(f"rope_qk: cos {tuple(cos.shape)} {cos.dtype} and sin {tuple(sin.shape)} {sin.dtype} must "
                         f"be ({B} or 1, {T} or 1, an even rotary dim <= {head_dim}), one dtype")
    if (not _triton(backend, qkv) or torch.promote_types(qkv.dtype, cos.dtype) not in _ROPE_DTYPES
            or cos.requires_grad or sin.requires_grad):
        return rope_qk_reference(qkv, cos, sin, n_head, n_kv_head, head_dim)
    return RoPEFunction.apply(qkv, cos, sin, n_head, n_kv_head)


def lora_linear_reference(x, weight, lora_A, lora_B, scale, dropout_mask=None):
    """x W^T + scale (xd A^T) B^T in x's dtype (A, B cast to it), xd = x * dropout_mask (the 0 or 1/(1-p)
    multiplier)."""
    xd = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    return x @ weight.t() + scale * ((xd @ lora_A.t().to(x.dtype)) @ lora_B.t().to(x.dtype))


def lora_linear(x, weight, lora_A, lora_B, scale: float, dropout_p: float = 0.0, training: bool = True,
                *, backend=None, seed=None, output=True, reuse=None, keep=None) -> torch.Tensor:
    """A LoRA layer with W frozen. seed: the kernels' dropout seed (None: drawn from torch's CPU generator, so
    checkpoint recompute replays it). output=False: the kernels skip x W^T and return uninitialized memory, saving
    for the backward all the same (a recompute's, phi3/recompute.py); the torch path computes it anyway.
    reuse=(S, y or None): the kernels take those instead of computing them (a recompute's, from its layer's first
    run); keep(S, y or None) receives what they made (kernels/lora_linear.py `made`). The torch path ignores both."""
    p = float(dropout_p) if training else 0.0
    if not _triton(backend, x):
        mask = None if p == 0 else F.dropout(torch.ones_like(x), p)
        return lora_linear_reference(x, weight, lora_A, lora_B, scale, mask)
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, float(scale), p, _kernel_seed(p, seed), output, reuse,
                                    keep)


def _kernel_seed(p, seed):
    """The kernels' dropout seed, a 32-bit int (a compiled kernel's argument types never change between calls)."""
    if p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return 0 if seed is None else int(seed) & 0x7FFFFFFF


def qlora_linear(x, weight: NF4Weight, lora_A, lora_B, scale: float, dropout_p: float = 0.0, training: bool = True,
                 *, backend=None, seed=None, output=True, reuse=None, keep=None) -> torch.Tensor:
    """lora_linear with W frozen in NF4. The spec: W = dequantize_reference(W4, x.dtype) (fp32 values rounded once
    to x's dtype), then lora_linear's; the kernels dequantize W inside their GEMM (kernels/qlora_linear.py)."""
    if not _triton(backend, x):
        return lora_linear(x, dequantize_reference(weight, x.dtype), lora_A, lora_B, scale, dropout_p, training,
                           backend="torch")
    p = float(dropout_p) if training else 0.0
    return QLoRALinearFunction.apply(x, weight, lora_A, lora_B, float(scale), p, _kernel_seed(p, seed), output, reuse,
                                     keep)


def fp8_lora_linear(x, weight: FP8Weight, lora_A, lora_B, scale: float, dropout_p: float = 0.0, training: bool = True,
                    *, seed=None, output=True, reuse=None, keep=None) -> torch.Tensor:
    """lora_linear with the frozen W's two GEMMs on FP8 operands (kernels/fp8_linear.py; train.py --fp8). Kernels
    only: its spec is tests/test_fp8_kernel.py's reference, and it needs a Hopper GPU (or the interpreter)."""
    p = float(dropout_p) if training else 0.0
    return FP8LoRALinearFunction.apply(x, weight, lora_A, lora_B, float(scale), p, _kernel_seed(p, seed), output,
                                       reuse, keep)


def nf4_linear(x, weight: NF4Weight, *, backend=None) -> torch.Tensor:
    """x W^T for a frozen NF4 layer without LoRA (sample.py's 4-bit layers, a quantized lm_head); dx flows back."""
    if not _triton(backend, x):
        return x @ dequantize_reference(weight, x.dtype).t()
    return NF4LinearFunction.apply(x, weight)


def dora_linear_reference(x, weight, lora_A, lora_B, scale, g, dropout_mask=None):
    """peft's DoRA layer term for term (its lora/variants.py DoraLinearVariant.forward and lora/dora.py
    DoraLinearLayer.forward): y = x W^T + ((g - 1) (xd W^T) + g (xd A^T B^T) s), x cast to the adapter's dtype for
    the adapter terms and the sum rounded once to x's dtype; xd = x * dropout_mask. Without dropout peft reuses the
    base output x W^T for xd W^T; with it, xd W^T is a second product (in the adapter's dtype). g (out,): m / ||W +
    s B A||, fp32."""
    base = x @ weight.t()
    xa = x.to(lora_A.dtype)
    if dropout_mask is None:
        xd, base_d = xa, base
    else:
        xd = xa * dropout_mask.to(xa.dtype)
        base_d = xd @ weight.to(xa.dtype).t()
    lora = (xd @ lora_A.t()) @ lora_B.t()
    return (base + ((g - 1) * base_d + g * lora * scale)).to(x.dtype)


def dora_linear(x, weight, lora_A, lora_B, scale: float, g, dropout_p: float = 0.0, *, backend=None) -> torch.Tensor:
    """A DoRA layer, W frozen (a 16-bit tensor or an NF4Weight); g = m / ||W + s B A|| (out,) with the norm detached.
    dropout_p: the dropout in force (0 in eval). The mask is drawn in fp32 from torch's generator on both paths, so
    a recomputed (checkpointed) forward replays it.

    The kernel path uses that, without dropout, peft's sum is g (x W^T + s x A^T B^T): one fused LoRA GEMM, then a
    per-column scale. With dropout peft adds (g - 1) (xd W^T) with the dropped xd, which is g L(xd) + (x - xd) W^T
    for L the LoRA layer without dropout: a second GEMM over W (frozen: no weight gradient)."""
    four_bit = isinstance(weight, NF4Weight)
    mask = None if dropout_p == 0 else F.dropout(torch.ones(x.shape, dtype=torch.float32, device=x.device), dropout_p)
    if not _triton(backend, x):
        dense = dequantize_reference(weight, x.dtype) if four_bit else weight
        return dora_linear_reference(x, dense, lora_A, lora_B, scale, g, mask)
    lora = qlora_linear if four_bit else lora_linear
    xd = x if mask is None else x * mask.to(x.dtype)
    y = column_scale(lora(xd, weight, lora_A, lora_B, scale, backend="triton"), g, backend="triton")
    if mask is None:
        return y
    rest = x - xd
    if four_bit:
        return y + nf4_linear(rest, weight, backend="triton")
    return torch.addmm(y.reshape(-1, y.shape[-1]), rest.reshape(-1, x.shape[-1]), weight.t()).view(y.shape)  # one pass


def column_scale_reference(L, g):
    """(L * g).to(L.dtype): each column of L (..., N) times g (N,) fp32, the product in fp32, one rounding."""
    return (L * g).to(L.dtype)


def column_scale(L, g, *, backend=None):
    """L (..., N) scaled per column by g (N,), gradients to both (kernels/dora.py on a GPU)."""
    if g.shape != L.shape[-1:]:
        raise ValueError(f"column_scale: L {tuple(L.shape)} needs g ({L.shape[-1]},)")
    return ColumnScaleFunction.apply(L, g) if _triton(backend, L) else column_scale_reference(L, g)


def dora_weight_norm_reference(weight: torch.Tensor, lora_A, lora_B, scale: float) -> torch.Tensor:
    """||W + scale B A|| of each output row (out,), fp32: DoRA's column norm (peft's get_weight_norm, in fp32).
    weight (out, in) in any float dtype, lora_A (r, in), lora_B (out, r)."""
    return torch.linalg.vector_norm(weight.float() + scale * (lora_B.float() @ lora_A.float()), dim=1)


def dora_weight_norm(weight, lora_A, lora_B, scale: float, *, backend=None) -> torch.Tensor:
    """DoRA's weight norm, no gradient (peft detaches it). weight: a 16-bit (out, in) tensor or an NF4Weight.
    The torch path materialises W + s B A; the kernel (kernels/dora.py) reads W once without it."""
    with torch.no_grad():
        if _triton(backend, lora_A):
            return dora.dora_weight_norm(weight, lora_A, lora_B, scale)
        dense = dequantize_reference(weight, torch.float32) if isinstance(weight, NF4Weight) else weight
        return dora_weight_norm_reference(dense, lora_A, lora_B, scale)


def cross_entropy_grad_reference(logits, targets):
    """Per-row cross entropy lse(x) - x[t] (F.cross_entropy's, no reduction) and its gradient softmax(x) - onehot(t)
    rounded once to logits' dtype, x = logits upcast to fp32 (fp64 stays fp64) as `F.cross_entropy(logits.float())`
    sees them. logits (n, V), targets (n,) int64 in [0, V). Loss rows in x's dtype."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    grad = torch.softmax(x, -1)
    grad[torch.arange(len(targets), device=x.device), targets] -= 1
    return F.cross_entropy(x, targets, reduction="none"), grad.to(logits.dtype)


def cross_entropy_grad(logits, targets, *, backend=None):
    """(loss rows, d(sum of losses)/d logits), the spec above; the gradient is written over logits and returned (its
    buffer), so a chunk's logits and their gradient never both exist. No autograd."""
    if (logits.dim() != 2 or logits.stride(-1) != 1 or targets.shape != logits.shape[:1]
            or targets.dtype != torch.int64):
        raise ValueError(f"cross_entropy_grad: logits {tuple(logits.shape)} with stride {logits.stride()} must be "
                         f"(n, V) with unit column stride, targets {tuple(targets.shape)} {targets.dtype} (n,) int64")
    if not _triton(backend, logits) or logits.dtype == torch.float64:
        loss, grad = cross_entropy_grad_reference(logits, targets)
        return loss, logits.copy_(grad)
    return cross_entropy.cross_entropy_grad(logits, targets), logits
