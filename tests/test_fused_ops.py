"""Fused RMSNorm (+ residual add) and SwiGLU (kernels/rmsnorm.py, kernels/swiglu.py) against a float64 reference.

CPU: the Triton path runs under TRITON_INTERPRET=1 (fp32 and fp16, small odd shapes). GPU (`pytest -m cuda`):
bf16 at Phi-3-mini shapes (8192 tokens, hidden 3072, gate_up 16384).
Tolerance (flash-attention's rule): for every output and gradient, max|kernel - fp64| <= 2 * max|torch - fp64| +
slack, where torch = the reference at the same dtype (with autograd) and slack = eps(dtype) * max|fp64|, one
rounding of the largest value (the sums here are short: a row, or the rows of the weight gradient; fp32 errors
came out at most 0.42 of the bound, fp16 0.35).
"""
import pytest
import torch

from conftest import CUDA, DEV, cuda, needs_cuda, needs_triton
from phi3.kernels import rmsnorm as rn
from phi3.ops import rms_norm, rms_norm_reference, swiglu, swiglu_reference
EPS = 1e-5  # Phi-3's rms_norm_eps


pytestmark = pytest.mark.usefixtures("poison_outputs")


def _grads(fn, inputs, douts):
    """[outputs..., grads of the inputs that require grad...] of fn(*inputs) with douts fed back. Strided inputs
    are used as they are (clone would make them contiguous)."""
    fresh = lambda t: t.detach().clone() if t.is_contiguous() else t.detach()
    inputs = [None if t is None else fresh(t).requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*inputs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, douts))


def _assert_close(names, got, ref, exact):
    """got (kernel), ref (torch at the same dtypes), exact (fp64), element by element of `names`."""
    assert len(got) == len(ref) == len(exact) == len(names)
    for name, k, t, e in zip(names, got, ref, exact):
        assert k.dtype == t.dtype and k.shape == e.shape, name
        assert torch.isfinite(k).all(), f"{name}: non-finite values (unwritten output?)"
        err, torch_err = (k.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        slack = torch.finfo(k.dtype).eps * e.abs().max().item()
        assert err <= 2 * torch_err + slack, f"{name}: err {err:.3g} > 2 * torch {torch_err:.3g} + {slack:.3g}"


# ----------------------------------------------------------------------------------------------- RMSNorm
def _norm_inputs(shape, dtype, residual, weight_grad, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(*shape[:-1], n + 5 if noncontig else n, generator=g)  # sliced to n (strided rows) below
    x = (x + 0.5) * 10 ** (4 * torch.rand(*shape[:-1], 1, generator=g) - 3)  # off-centre rows, scales 1e-3..10:
    # eps (1e-5) dominates mean(x^2) in the smallest, rstd is far from 1 in all
    w = 1 + 0.5 * torch.randn(n, generator=g)  # random, not the ones init: dw and dy * w are exercised
    r = torch.randn(*shape, generator=g) if residual else None
    douts = [torch.randn(*shape, generator=g) for _ in range(2 if residual else 1)]
    dev = lambda t: None if t is None else t.to(DEV, dtype)
    x, w = dev(x)[..., :n].requires_grad_(), dev(w).requires_grad_(weight_grad)
    r = r if r is None else dev(r).requires_grad_()
    return [x, w, r], [dev(t) for t in douts]


def _check_norm(shape, dtype, residual, weight_grad, seed=0, noncontig=False, w_r_dtypes=None):
    inputs, douts = _norm_inputs(shape, dtype, residual, weight_grad, seed, noncontig)
    assert inputs[0].is_contiguous() != noncontig
    for i, dt in enumerate(w_r_dtypes or (), start=1):  # weight and residual in dtypes of their own
        inputs[i] = inputs[i].detach().to(dt).requires_grad_(inputs[i].requires_grad)
    got = _grads(lambda x_, w_, r_: rms_norm(x_, w_, EPS, r_, backend="triton"), inputs, douts)
    ref = _grads(lambda x_, w_, r_: rms_norm_reference(x_, w_, EPS, r_), inputs, douts)
    f64 = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    exact = _grads(lambda x_, w_, r_: rms_norm_reference(x_, w_, EPS, r_), [f64(t) for t in inputs],
                   [t.double() for t in douts])
    names = ["y", "s", "dx", "dw", "dr"] if residual else ["y", "dx", "dw"]
    _assert_close([n for n in names if n != "dw" or weight_grad], got, ref, exact)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("hidden", [96, 200])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_odd_shapes(dtype, rows, hidden, residual, weight_grad):
    _check_norm((rows, hidden), dtype, residual, weight_grad, seed=rows * hidden)


@needs_triton
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_3d_strided(residual):
    """(B, T, hidden) with a row stride wider than hidden (a slice): the kernel takes the strides as they are."""
    _check_norm((3, 5, 72), torch.float16, residual, weight_grad=True, noncontig=True)


@needs_triton
def test_rms_norm_frozen_weight_skips_its_gradient(monkeypatch):
    """LoRA training freezes the norm: the backward launches without WEIGHT_GRAD and allocates no partials."""
    launches = []

    class Recorded:  # kernel[grid](*args, **meta), recording grid, the dW-partials argument and meta
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((grid, a[6], kw)) or kernel[grid](*a, **kw)
    kernel = rn._rms_norm_bwd_kernel
    monkeypatch.setattr(rn, "_rms_norm_bwd_kernel", Recorded())
    (x, w, r), douts = _norm_inputs((9, 40), torch.float32, residual=True, weight_grad=False)
    y, s = rms_norm(x, w, EPS, r, backend="triton")
    torch.autograd.backward([y, s], douts)
    assert w.grad is None and x.grad is not None and r.grad is not None
    (grid, dwp, kw), = launches
    assert grid == (9,) and dwp is None and kw["WEIGHT_GRAD"] is False


@needs_triton
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16])
def test_rms_norm_mixed_dtypes(w_dtype):
    """Full fine-tuning under autocast: an fp32 residual stream plus a 16-bit branch output (fp32 weight; a 16-bit
    one too). The kernel follows torch's promotion (s and y fp32) and hands each input a gradient of its own
    dtype (_assert_close compares dtypes with torch's: dr is fp16)."""
    _check_norm((7, 96), torch.float32, residual=True, weight_grad=True, w_r_dtypes=(w_dtype, torch.float16))


def test_rms_norm_cpu_default_is_the_reference():
    (x, w, r), _ = _norm_inputs((4, 24), torch.float32, residual=True, weight_grad=False)
    x, r = x.cpu(), r.cpu()
    for a, b in zip(rms_norm(x, w.cpu(), EPS, r), rms_norm_reference(x, w.cpu(), EPS, r)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("w_shape,r_shape", [((95,), None), ((96, 1), None), ((96,), (7, 95)), ((96,), (1, 96))])
def test_rms_norm_rejects_mismatched_shapes(w_shape, r_shape):
    x = torch.randn(7, 96)
    with pytest.raises(ValueError, match="rms_norm"):
        rms_norm(x, torch.ones(w_shape), EPS, None if r_shape is None else torch.randn(r_shape), backend="triton")


# ----------------------------------------------------------------------------------------------- SwiGLU
def _check_swiglu(shape, dtype, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(*shape[:-1], shape[-1] + (3 if noncontig else 0), generator=g) * 3  # |gate| to ~9:
    # both tails of silu; sliced to shape[-1] (strided rows) below
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)
    inputs, douts = [gate_up.to(DEV, dtype)[..., :shape[-1]].requires_grad_()], [dout.to(DEV, dtype)]
    assert inputs[0].is_contiguous() != noncontig
    got = _grads(lambda t: swiglu(t, backend="triton"), inputs, douts)
    ref = _grads(swiglu_reference, inputs, douts)
    exact = _grads(swiglu_reference, [inputs[0].detach().double().requires_grad_()], [douts[0].double()])
    _assert_close(["out", "d_gate_up"], got, ref, exact)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("inter", [37, 100, 1100])  # 1100: two column blocks, the second partly masked
def test_swiglu_odd_shapes(dtype, rows, inter):
    _check_swiglu((rows, 2 * inter), dtype, seed=rows + inter)


@needs_triton
def test_swiglu_3d_strided():
    """A (B, T, 2I) slice of a wider buffer: row strides are the caller's."""
    _check_swiglu((2, 5, 96), torch.float16, seed=1, noncontig=True)


def test_swiglu_rejects_odd_width():
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.randn(3, 7), backend="triton")


@needs_triton
def test_16bit_forward_rounds_where_torch_rounds():
    """The model's semantics, not only its accuracy: the normalized row (RMSNorm) and silu(gate) (SwiGLU) are
    rounded to the model dtype before the final product, as torch does. Then the outputs equal torch's bit for bit
    except where exp / rsqrt differ in fp32's last bit at a 16-bit rounding boundary (a few in 10^4 elements);
    skipping either rounding changes about a quarter of them."""
    dt = torch.bfloat16 if CUDA else torch.float16  # the interpreter's CPU numpy has no bf16 arithmetic
    g = torch.Generator().manual_seed(5)
    x, w = (torch.randn(33, 200, generator=g) * 3).to(DEV, dt), (1 + torch.randn(200, generator=g)).to(DEV, dt)
    gate_up = (torch.randn(33, 2 * 1100, generator=g) * 3).to(DEV, dt)
    for got, ref in ((rms_norm(x, w, EPS, backend="triton"), rms_norm_reference(x, w, EPS)),
                     (swiglu(gate_up, backend="triton"), swiglu_reference(gate_up))):
        assert (got == ref).double().mean().item() >= 0.99


# ----------------------------------------------------------------------------------------------- GPU
PHI3_ROWS, PHI3_HIDDEN, PHI3_INTER = 8192, 3072, 8192  # Phi-3-mini, B4 x 2048 tokens


@cuda
@needs_cuda
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_cuda_rms_norm_phi3_bf16(residual, weight_grad):
    _check_norm((4, PHI3_ROWS // 4, PHI3_HIDDEN), torch.bfloat16, residual, weight_grad, seed=3)


@cuda
@needs_cuda
def test_cuda_rms_norm_weight_grad_is_deterministic():
    """The weight gradient's partials are summed in a fixed order: two backward passes agree bit for bit."""
    inputs, douts = _norm_inputs((PHI3_ROWS, PHI3_HIDDEN), torch.bfloat16, residual=False, weight_grad=True)
    fn = lambda x_, w_, r_: rms_norm(x_, w_, EPS, None, backend="triton")
    assert torch.equal(_grads(fn, inputs, douts)[2], _grads(fn, inputs, douts)[2])


@cuda
@needs_cuda
def test_cuda_swiglu_phi3_bf16():
    _check_swiglu((PHI3_ROWS, 2 * PHI3_INTER), torch.bfloat16, seed=4)
