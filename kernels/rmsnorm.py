"""Fused RMSNorm, optionally after the residual add: Phi-3's norm in one pass over each row.

    s    = x + r                                  (optional; torch's dtype promotion, as the model's x + attn(...))
    rstd = 1 / sqrt(mean(s.float()^2) + eps)      fp32, one value per row
    y    = w * (s.float() * rstd).to(s.dtype)     the product in torch's promoted dtype of w and s

Unfused, torch runs this as ~8 elementwise kernels (pow, mean, add, rsqrt, mul, casts, the residual add), each
reading or writing a full activation, and again in checkpoint recompute. Here: one program per row (hidden sizes
up to 5120, Phi-3-medium, fit one block), fp32 math in registers, one read of x (and r), one write of y (and s).
Saved for backward: s (x itself without a residual) and rstd; the normalized row is recomputed.

The norm weight is frozen in LoRA training, and its gradient is then not computed at all. When it is trained (full
fine-tuning) each backward program adds its rows' dy * xhat into a partial of its own, and torch sums the
partials: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from . import launch

MAX_HIDDEN = 65536  # one row per block; wider rows (no Phi-3 comes close) take the torch path
_DW_WAVES = 4  # weight-gradient backward: programs = this many waves of SMs, each owning one fp32 partial


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, N, eps, stride_x, stride_r,
                         RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """One row: s = x + r (RESIDUAL; stored, in s's dtype), rstd = rsqrt(mean(s^2) + eps) (fp32, stored),
    y = w * (s rstd).to(s dtype). A product of two 16-bit values is exact in fp32, so rounding it once to y's
    dtype gives torch's product bit for bit. y and s are fresh (rows of N); x and r have the caller's row strides."""
    row = tl.cast(tl.program_id(0), tl.int64)  # row * stride passes 2^31 past ~700k tokens of hidden 3072
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if RESIDUAL:
        s_dt = s_ptr.dtype.element_ty
        s = s.to(s_dt) + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(s_dt)
        tl.store(s_ptr + row * N + cols, s, mask=mask)
    sf = s.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(sf * sf, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    h = (sf * rstd).to(s.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * h.to(tl.float32)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, ds_ptr, s_ptr, w_ptr, rstd_ptr, dx_ptr, dwp_ptr, M, N, stride_dy, stride_ds,
                         stride_s, WEIGHT_GRAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows pid, pid + programs, ...; g = dy * w, xhat = s * rstd (fp32), ds_out = the gradient that reached s:
        dx  = rstd * (g - xhat * mean(g * xhat)) + ds_out     in dx's dtype (ds_ptr = None: no ds_out)
        dwp[pid] = sum over this program's rows of dy * xhat.to(s dtype)      fp32 (WEIGHT_GRAD)
    The cast of xhat to the model dtype passes gradients straight through, as torch's .to() does."""
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), tl.float32)
    for i in tl.range(tl.program_id(0), M, tl.num_programs(0)):
        row = tl.cast(i, tl.int64)
        s = tl.load(s_ptr + row * stride_s + cols, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = s.to(tl.float32) * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        if ds_ptr is not None:
            dx += tl.load(ds_ptr + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            dw += dy * xhat.to(s.dtype).to(tl.float32)
    if WEIGHT_GRAD:
        tl.store(dwp_ptr + tl.program_id(0) * N + cols, dw, mask=mask)


# ------------------------------------------------------------------------------- host side: launches, autograd
def _meta(n):  # the whole row in one block; warps so each thread holds 4-16 values (vector loads, few registers)
    return dict(BLOCK_N=launch.next_pow2(n), num_warps=min(16, max(4, launch.next_pow2(n) // 512)))


class RMSNormFunction(torch.autograd.Function):
    """y = w * (s rstd).to(s dtype), s = x (+ r), rstd = 1 / sqrt(mean(s^2) + eps) in fp32.
    Returns y, or (y, s) with a residual r.

    Gradients (g = dy * w, xhat = s rstd, ds_out = the gradient that reached the returned s):
        ds = rstd * (g - xhat * mean(g * xhat)) + ds_out,   dx = dr = ds   (each cast to its input's dtype)
        dw = sum over rows of dy * xhat.to(s dtype)      only when w requires grad (frozen in LoRA training)
    """

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        n, res = x.shape[-1], residual is not None
        x2, r2 = launch.rows(x, n), launch.rows(residual if res else x, n)  # without a residual r2 is never read
        s_dtype = torch.promote_types(x.dtype, r2.dtype)
        y = launch.empty(x2.shape[0], n, dtype=torch.promote_types(weight.dtype, s_dtype), device=x.device)
        s = launch.empty(x2.shape[0], n, dtype=s_dtype, device=x.device) if res else x2
        rstd = launch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        with launch.on_device(x):
            launch.run(_rms_norm_fwd_kernel, (x2.shape[0],), (x2, r2, weight, y, s, rstd, n, eps, x2.stride(0),
                                                             r2.stride(0)), dict(RESIDUAL=res, **_meta(n)))
        ctx.save_for_backward(s, weight, rstd)
        return (y.view(x.shape), s.view(x.shape)) if res else y.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds_out=None):
        s, weight, rstd = ctx.saved_tensors
        (M, n), weight_grad = s.shape, ctx.needs_input_grad[1]
        dy2, ds2 = launch.rows(dy, n), None if ds_out is None else launch.rows(ds_out, n)
        dx = launch.empty(M, n, dtype=s.dtype, device=s.device)
        programs = min(M, _DW_WAVES * launch.num_sms(s.device)) if weight_grad else M  # frozen: one row each
        dwp = launch.empty(programs, n, dtype=torch.float32, device=s.device) if weight_grad else None
        with launch.on_device(s):
            launch.run(_rms_norm_bwd_kernel, (programs,), (dy2, ds2, s, weight, rstd, dx, dwp, M, n, dy2.stride(0),
                       0 if ds2 is None else ds2.stride(0), s.stride(0)), dict(WEIGHT_GRAD=weight_grad, **_meta(n)))
        dw = dwp.sum(0).to(weight.dtype) if weight_grad else None  # fixed-order sum of the partials
        dx = dx.view(dy.shape)  # in s's dtype: autograd casts it to x's and r's (the same in a 16-bit model)
        return dx, dw, dx if ctx.needs_input_grad[2] else None, None
