"""FP8 LoRA linear (kernels/fp8_linear.py: the frozen W's two GEMMs on e4m3 operands, kernels/fp8.py's rowwise
quantization) against a float64 reference of the same quantized operands.

The spec: q(x), q(W) and, in the backward, q(dy), q(W^T) as quantize_rows_reference makes them (torch's own e4m3
rounding), their products exact, scaled, plus lora_linear's low-rank term and gradients. The rule is
test_lora_kernel's: max|kernel - fp64| <= 2 max|torch at the dtype - fp64| + 1 ulp of the largest value.
CPU: the TMA GEMM under TRITON_INTERPRET=1 (fp16 outputs; the interpreter's FP8 cast rounds otherwise than the GPU,
so the operands are quantized by the reference there). GPU (`pytest -m cuda`): bf16 at Phi-3-mini, Phi-4-mini and
Phi-4 shapes with dropout, ranks 1 to 64, and the quantization kernel's bits against torch's.
"""
import pytest
import torch

from conftest import DEV, cuda, needs_cuda, needs_triton
from test_lora_kernel import _assert_close
from phi3.kernels import launch
from phi3.kernels.fp8 import quantize_rows, quantize_rows_reference, quantize_weight
from phi3.kernels.fp8_linear import FP8LoRALinearFunction
from phi3.kernels.lora_linear import dropout_mask

pytestmark = pytest.mark.usefixtures("poison_outputs")  # every kernel-written buffer starts as NaN


def _dequantized(q, s, dtype):
    return (q.to(torch.float64) * s.to(torch.float64)[:, None]).to(dtype)


def _reference(x, w, a, b, dy, scale, mask, dtype):
    """(y, dx, dA, dB) of the spec, computed in `dtype` from the quantized operands (float64: the exact result)."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    a, b = a.to(dtype), b.to(dtype)
    xd = x2.to(dtype) if mask is None else x2.to(dtype) * mask.reshape(x2.shape).to(dtype)
    s_ = xd @ a.t()
    y = (_dequantized(*quantize_rows_reference(x2), dtype) @ _dequantized(w.w, w.w_scale, dtype).t()
         + scale * (s_ @ b.t()))
    g = scale * (dy2.to(dtype) @ b)
    low = g @ a if mask is None else (g @ a) * mask.reshape(x2.shape).to(dtype)
    dx = _dequantized(*quantize_rows_reference(dy2), dtype) @ _dequantized(w.wt, w.wt_scale, dtype).t() + low
    return [y.view(*x.shape[:-1], -1), dx.view(x.shape), g.t() @ xd, scale * (dy2.to(dtype).t() @ s_)]


def _check(shape, n_out, r, dtype, scale=2.0, p=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape, generator=g).to(dtype).to(DEV)
    w = quantize_weight((torch.randn(n_out, k, generator=g) / k**0.5).to(dtype).to(DEV))
    a = (torch.randn(r, k, generator=g) / k**0.5).to(DEV)
    b = torch.randn(n_out, r, generator=g).to(DEV)
    dy = torch.randn(*shape[:-1], n_out, generator=g).to(dtype).to(DEV)
    mask = dropout_mask(1234, x.shape, p, DEV) if p > 0 else None
    xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, b))
    y = FP8LoRALinearFunction.apply(xg, w, ag, bg, scale, p, 1234)
    y.backward(dy)
    got = [y.detach(), xg.grad, ag.grad, bg.grad]
    ref = _reference(x, w, a, b, dy, scale, mask, torch.float32 if dtype == torch.float32 else dtype)
    exact = _reference(x, w, a, b, dy, scale, mask, torch.float64)
    _assert_close(got, [t.to(e.dtype) if i >= 2 else t for i, (t, e) in enumerate(zip(ref, got))], exact, dtype)


# ------------------------------------------------------------------------------ CPU (interpreter) + GPU
@needs_triton
@pytest.mark.parametrize("r,p", [(1, 0.0), (16, 0.1)])
def test_fp8_lora_linear(r, p):
    """Sizes that are multiples of 16 (TMA's 16-byte rows of FP8), not of the 32-wide test tiles."""
    dtype = torch.float16 if launch.INTERPRET else torch.bfloat16
    _check((2, 24, 80), 48, r, dtype, scale=1.5, p=p, seed=r)


@needs_triton
def test_quantized_weight_copies():
    """w: a scale per row of W; wt: W^T with a scale per column of W; each row's largest value at e4m3's 448."""
    W = torch.randn(48, 80, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float().to(DEV)
    w = quantize_weight(W)
    assert w.w.shape == (48, 80) and w.wt.shape == (80, 48) and w.w.dtype == w.wt.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(w.w_scale, W.abs().amax(1) / 448, rtol=0, atol=0)
    torch.testing.assert_close(w.wt_scale, W.abs().amax(0) / 448, rtol=0, atol=0)
    assert (w.w.float().abs().amax(1) == 448).all() and (w.wt.float().abs().amax(1) == 448).all()
    assert ((_dequantized(w.w, w.w_scale, torch.float64) - W.double()).abs() <= W.abs().double() / 16 + 1e-30).all()


def test_quantize_reference_zero_rows_and_extremes():
    x = torch.tensor([[0.0, 0.0], [1e-30, -2e-30], [3e38, -1.0]])
    q, s = quantize_rows_reference(x)
    assert s[0] == 1 and (q[0].float() == 0).all()
    assert torch.isfinite(q.float()).all() and q[2, 0].float() == 448


# ------------------------------------------------------------------------------ GPU
@cuda
@needs_cuda
@pytest.mark.parametrize("shape", [(64, 3072), (1000, 5120), (2, 4096, 3072)])
def test_cuda_quantize_kernel_is_torchs_bits(shape):
    x = (torch.randn(*shape, device="cuda") * torch.logspace(-3, 3, shape[-1], device="cuda")).to(torch.bfloat16)
    x2 = x.reshape(-1, shape[-1])
    x2[0] = 0  # a zero row: scale 1
    q, s = quantize_rows(x2)
    q_ref, s_ref = quantize_rows_reference(x2)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@cuda
@needs_cuda
@pytest.mark.parametrize("k,n,r", [(3072, 9216, 16), (3072, 3072, 1), (8192, 3072, 64), (3072, 5120, 16),
                                   (5120, 35840, 16), (17920, 5120, 8)])
def test_cuda_bf16_real_shapes(k, n, r):
    _check((1, 512, k), n, r, torch.bfloat16, scale=2.0, p=0.05, seed=k + n)
