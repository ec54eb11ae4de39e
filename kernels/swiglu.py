"""Fused SwiGLU of Phi-3's MLP: out = up * silu(gate), gate_up = [gate | up] along the last dim (..., 2I).

Unfused, torch runs chunk + silu + mul forward and four elementwise kernels backward, keeping silu(gate) as an
extra activation. Here one kernel each way: the forward reads gate_up once and writes out; the backward saves
only gate_up, recomputes sigmoid(gate) from it, and writes d(gate_up) as one tensor, the layout the gate_up
projection's backward takes. silu is computed in fp32 and rounded to the model dtype before the product, as
torch's `up * F.silu(gate)` does, so the forward matches torch bit for bit up to exp's last-bit differences.
"""
import torch
import triton
import triton.language as tl

from . import launch

_BLOCK = 1024  # columns per program: 2 KiB of each bf16 operand per program, 4 warps of 16-byte loads


@triton.jit
def _swiglu_fwd_kernel(gu_ptr, out_ptr, I, stride_gu, BLOCK: tl.constexpr):
    """out[m, j] = up * silu(gate).to(dtype), gate = gu[m, j], up = gu[m, I + j]; program (row, column block).
    gate_up has the caller's row stride; out is fresh (rows of I)."""
    row = tl.cast(tl.program_id(0), tl.int64)  # gate_up passes 2^31 elements past 131,072 tokens of 2I = 16384
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0)
    silu = (gate * tl.sigmoid(gate)).to(up.dtype)
    out = up.to(tl.float32) * silu.to(tl.float32)  # exact for 16-bit operands: one rounding, as torch's product
    tl.store(out_ptr + row * I + cols, out.to(up.dtype), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gu_ptr, dout_ptr, dgu_ptr, I, stride_gu, stride_dout, BLOCK: tl.constexpr):
    """sig = sigmoid(gate) recomputed from the saved input, fp32:
        d_gate = dout * up * sig * (1 + gate * (1 - sig))      (silu'(gate) = sig + gate sig (1 - sig))
        d_up   = dout * gate * sig                             (the silu the forward multiplied by)
    both into d(gate_up) = [d_gate | d_up] (fresh: rows of 2I)."""
    row = tl.cast(tl.program_id(0), tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dout * gate * sig
    dt = dgu_ptr.dtype.element_ty
    tl.store(dgu_ptr + row * 2 * I + cols, d_gate.to(dt), mask=mask)
    tl.store(dgu_ptr + row * 2 * I + I + cols, d_up.to(dt), mask=mask)


# ------------------------------------------------------------------------------- host side: launches, autograd
class SwiGLUFunction(torch.autograd.Function):
    """out = up * silu(gate).to(dtype), [gate | up] = gate_up (..., 2I).

    Gradients (sig = sigmoid(gate), recomputed; only gate_up is saved):
        d_gate = dout * up * sig * (1 + gate (1 - sig)),   d_up = dout * gate * sig,   d(gate_up) = [d_gate | d_up]
    """

    @staticmethod
    def forward(ctx, gate_up):
        I = gate_up.shape[-1] // 2
        gu = launch.rows(gate_up, 2 * I)
        out = launch.empty(gu.shape[0], I, dtype=gate_up.dtype, device=gate_up.device)
        with launch.on_device(gate_up):
            launch.run(_swiglu_fwd_kernel, (gu.shape[0], launch.cdiv(I, _BLOCK)), (gu, out, I, gu.stride(0)),
                       dict(BLOCK=_BLOCK))
        ctx.save_for_backward(gu)  # a view of the input (a copy only if its last dim was strided)
        return out.view(gate_up.shape[:-1] + (I,))

    @staticmethod
    def backward(ctx, dout):
        (gu,) = ctx.saved_tensors
        M, I = gu.shape[0], gu.shape[1] // 2
        d2, dgu = launch.rows(dout, I), launch.empty(M, 2 * I, dtype=gu.dtype, device=gu.device)
        with launch.on_device(gu):
            launch.run(_swiglu_bwd_kernel, (M, launch.cdiv(I, _BLOCK)), (gu, d2, dgu, I, gu.stride(0), d2.stride(0)),
                       dict(BLOCK=_BLOCK))
        return dgu.view(dout.shape[:-1] + (2 * I,))
