"""FP8 LoRA linear (kernels/fp8_linear.py: the frozen W's two GEMMs on e4m3 operands, kernels/fp8.py's rowwise
quantization) against a float64 reference of the same quantized operands.

The spec: q(x), q(W) and, in the backward, q(dy), q(W^T) as quantize_rows_reference makes them (torch's own e4m3
rounding), their products exact, scaled, plus lora_linear's low-rank term and gradients. The rule is
test_lora_kernel's: max|kernel - fp64| <= 2 max|torch at the dtype - fp64| + 1 ulp of the largest value. On the GPU
the forward's sums stay in the tensor cores' FP8 accumulator (fp8_linear.FAST_FORWARD), which keeps about 13 mantissa
bits rather than fp32's 24: y's error may exceed the rule by what that accumulator can lose, bounded per element from
the exact partial sums (_fast_accumulation_bound).
CPU: the TMA GEMM under TRITON_INTERPRET=1 (fp16 outputs; the interpreter's FP8 cast rounds otherwise than the GPU,
so the operands are quantized by the reference there). GPU (`pytest -m cuda`): bf16 at Phi-3-mini, Phi-4-mini and
Phi-4 shapes with dropout, ranks 1 to 64, and the quantization kernel's bits against torch's.
"""
import pytest
import torch

from conftest import DEV, cuda, needs_cuda, needs_triton
from test_lora_kernel import _assert_close
from phi3.kernels import choices, fp8_linear, launch
from phi3.kernels.fp8 import FP8Weight, quantize_rows, quantize_rows_reference, quantize_weight
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


ACCUMULATOR_BITS = 13  # Hopper's FP8 sums: "around 14 bits" (DeepSeek-V3 report, 3.3.2); one fewer for safety
WGMMA_K = 32  # an FP8 wgmma instruction adds 32 products of K to the accumulator


def _fast_accumulation_bound(a, w: FP8Weight):
    """Per element of q(a) q(W)^T s_a s_w, what the tensor cores' own accumulator can lose against exact sums. Each
    instruction adds 32 products to the running sum, aligned to the largest magnitude among them and cut to
    ACCUMULATOR_BITS bits below it: it loses at most 2^-(bits - 1) (|running sum| + sum of its |products|). Summed
    over the K / 32 additions, with the running sums taken exactly (float64)."""
    aq, a_scale = quantize_rows_reference(a)
    aq, wq = aq.double(), w.w.double()
    running = torch.zeros(aq.shape[0], wq.shape[0], dtype=torch.float64, device=aq.device)
    lost = aq.abs() @ wq.abs().t()  # every product's magnitude, once
    for k in range(0, aq.shape[1], WGMMA_K):
        lost += running.abs()
        running += aq[:, k:k + WGMMA_K] @ wq[:, k:k + WGMMA_K].t()
    return 2.0 ** (1 - ACCUMULATOR_BITS) * lost * a_scale.double()[:, None] * w.w_scale.double()[None, :]


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
    allowance = [0.0] * 4
    if fp8_linear.FAST_FORWARD and x.is_cuda:  # (the interpreter's dot sums in fp32 either way)
        allowance[0] = _fast_accumulation_bound(x.reshape(-1, k), w).view(y.shape)
    _assert_close(got, [t.to(e.dtype) if i >= 2 else t for i, (t, e) in enumerate(zip(ref, got))], exact, dtype,
                  allowance)


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


def _cut(v, reference, bits=ACCUMULATOR_BITS):
    """v kept to `bits` bits below the leading bit of |reference|, cut toward zero."""
    ulp = torch.exp2(torch.floor(torch.log2(reference.clamp(min=1e-300))) - bits)
    return torch.trunc(v / ulp) * ulp


def test_fast_accumulation_bound_holds_for_a_truncating_accumulator():
    """The bound's model, simulated in float64 at K 4,096: each block of 32 products is cut to 13 bits below the
    larger of it and the running sum, the new sum to 13 bits below its own magnitude (toward zero: the errors add
    up, the worst case). The simulated sums stay within the bound, and the bound means something: a few % of the
    largest output (a wrong tile or scale would be off by the output's own size)."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(16, 4096, generator=g, dtype=torch.float64)
    w = quantize_weight(torch.randn(24, 4096, generator=g) / 64)
    aq, a_scale = quantize_rows_reference(a)
    products = aq.double()[:, None, :] * w.w.double()[None, :, :]  # (16, 24, 4096), exact
    running = torch.zeros(16, 24, dtype=torch.float64)
    for k in range(0, 4096, WGMMA_K):
        block = products[..., k:k + WGMMA_K]
        total = block.sum(-1)  # the block's exact sum
        total = running + _cut(total, torch.maximum(running.abs(), block.abs().amax(-1)))
        running = _cut(total, total.abs())
    scales = a_scale.double()[:, None] * w.w_scale.double()[None, :]
    got, exact = running * scales, products.sum(-1) * scales
    bound = _fast_accumulation_bound(a, w)
    assert ((got - exact).abs() <= bound).all()
    assert (got != exact).any() and bound.max() < 0.05 * exact.abs().max()


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


@cuda
@needs_cuda
@pytest.mark.parametrize("option", list(choices.CONFIGS["tma-fp8"]))
def test_cuda_every_config(forced_config_runs, option):
    """Each config a table may name for the FP8 GEMM, forced for its forward and dx, at gate_up's shape."""
    used = []
    choices.set_timer(lambda key, options, run: used.append(key) or (option if option in options else options[0]))
    try:
        _check((1, 1024, 3072), 16384, 16, torch.bfloat16, scale=2.0, p=0.05, seed=5)
    finally:
        choices.set_timer(None)
    assert {key.split()[0] for key in used} >= {"fp8.fwd.tma-fp8", "fp8.dx.tma-fp8"}, used
