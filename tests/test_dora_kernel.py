"""DoRA's weight norm kernel (kernels/dora.py: || W[n, :] + s B[n, :] A || for every row n, reading W once)
against float64: || W64 + s B64 A64 || with W64 = W.double(), or dequantize_reference(W, float64) for NF4 (its fp32
values, exactly).

CPU: the kernel under TRITON_INTERPRET=1 with fp32, fp16 and bf16 W (the kernel only widens W: no tl.dot on 16-bit
operands), out never a multiple of BLOCK_N, in not a multiple of BLOCK_K, ranks 1, 3, 16, 64 and 100 (past one rank
chunk of 64), NF4 with in % 64 == 0 (whole-block tiles) and not, nested absmax and not, `in` split over programs (the
partial sums finished in-kernel). GPU (`pytest -m cuda`): bf16 and NF4 at Phi-3-mini, Phi-3-medium and Phi-4 shapes,
ranks 1 to 256, every config.

Tolerance (DESIGN.md's rule): max|kernel - fp64| <= 2 max|torch - fp64| + slack, torch = the spec in fp32
(dora_weight_norm_reference: W.float() + s (B @ A), then vector_norm) on the same W values. Both compute in fp32 from
exact W values, whatever W's dtype, so the slack is in fp32 ulps: 16 ulps of the largest norm (test_lora_kernel's fp32
slack for summation-order noise: the kernel adds each row's `in` squares in per-thread runs, a tree, a run over the
steps and `splits` partials, torch in another order; the worst-case bound of such sums, ~(steps + log2 BLOCK_K +
splits) / 2 units of rounding in the norm, is ~20 ulps at the longest tested rows, the typical error its square
root). Measured: ~1 ulp under the interpreter and in a CPU emulation of the GPU's 3xTF32
dot at Phi-3-mini shapes, against torch's ~2; plain tf32 would be 1400 to 6000 (kernels/dora.py).
"""
import pytest
import torch

from conftest import DEV, cuda, needs_cuda, needs_triton
from test_qlora_kernel import _nf4_weight
from phi3.kernels import choices, launch
from phi3.kernels.dora import _dora_norm_kernel
from phi3.kernels.nf4_weight import NF4Weight, dequantize_reference
from phi3.ops import dora_weight_norm, dora_weight_norm_reference

pytestmark = pytest.mark.usefixtures("poison_outputs")  # every kernel-written buffer starts as NaN


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """torch's fp32 reference must not run its B @ A in tf32 (its error would hide the kernel's)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _factors(n, k, r, seed=0):
    """A (r, in), B (out, r) fp32, scaled so that s B A is as large as W (B never zero, unlike peft's init)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, k, generator=g) / k**0.5).to(DEV), (torch.randn(n, r, generator=g) / r**0.5).to(DEV)


def _dense(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(n, k, generator=g) / k**0.5).to(DEV, dtype)


def _check(w, a, b, scale):
    """The kernel's norm of W + scale B A against fp64, within 2x torch's fp32 error + 16 ulps of the largest norm."""
    nf4 = isinstance(w, NF4Weight)
    got = dora_weight_norm(w, a, b, scale, backend="triton")
    ref = dora_weight_norm_reference(dequantize_reference(w, torch.float32) if nf4 else w, a, b, scale)
    w64 = dequantize_reference(w, torch.float64) if nf4 else w.double()
    exact = torch.linalg.vector_norm(w64 + scale * (b.double() @ a.double()), dim=1)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert torch.isfinite(got).all(), "rows left unwritten"
    err, torch_err = (got.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
    slack = 16 * torch.finfo(torch.float32).eps * exact.max().item()
    assert err <= 2 * torch_err + slack, f"err {err:.3g} > 2 * torch {torch_err:.3g} + {slack:.3g}"


def _grids(monkeypatch):
    """The grids of the norm kernel's launches, appended as they run."""
    grids, real_run = [], launch.run
    monkeypatch.setattr(launch, "run", lambda fn, grid, args, meta: (
        grids.append(grid) if fn is _dora_norm_kernel else None) or real_run(fn, grid, args, meta))
    return grids


# ------------------------------------------------------------------------------ CPU (interpreter) + GPU
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 3, 16, 64, 100])
@pytest.mark.parametrize("n,k", [(53, 45), (37, 333)])
def test_dense_odd_shapes(dtype, r, n, k):
    """out 53 / 37: a partial last row block; in 45 (less than one step) / 333 (a partial last step, two splits)."""
    a, b = _factors(n, k, r, seed=r)
    _check(_dense(n, k, dtype, seed=r), a, b, scale=1.7)


@needs_triton
@pytest.mark.parametrize("r", [1, 16, 100])
@pytest.mark.parametrize("k", [128, 45, 333])
@pytest.mark.parametrize("nested", [True, False])
def test_nf4(r, k, nested):
    """in = 128: whole 64-blocks per row; 45 and 333: blocks straddle rows (the per-element tile). 72 x 333 values
    hold 375 absmax: two nested absmax."""
    n = 72 if k == 333 else 53
    a, b = _factors(n, k, r, seed=k + r)
    _check(_nf4_weight(n, k, torch.bfloat16, seed=k, nested=nested), a, b, scale=1.3)


@needs_triton
@pytest.mark.parametrize("sms,splits", [(1, 1), (4, 2), (64, 6)])
@pytest.mark.parametrize("nf4", [False, True])
def test_splits(monkeypatch, sms, splits, nf4):
    """`in` = 333 (6 steps of 64) split over 1, 2 and 6 programs per row block (the grid aims at SKINNY_WAVES programs
    per SM): partial sums stored, the last program of a row block adds them."""
    monkeypatch.setattr(launch, "num_sms", lambda device: sms)
    grids = _grids(monkeypatch)
    n, k = 53, 333
    a, b = _factors(n, k, 16, seed=sms)
    w = _nf4_weight(n, k, torch.float16, seed=sms) if nf4 else _dense(n, k, torch.float16, seed=sms)
    _check(w, a, b, scale=0.9)
    assert grids == [(launch.cdiv(n, choices.SMALL["dora-norm"]["BLOCK_N"]), splits)]


@needs_triton
def test_strided_operands():
    """W a view with row stride in + 7, A and B transposed views (the kernel takes their strides)."""
    n, k, r = 37, 100, 16
    w = _dense(n, k + 7, torch.float32)[:, :k]
    a, b = _factors(n, k, r)
    _check(w, a.t().contiguous().t(), b.t().contiguous().t(), scale=2.0)


@needs_triton
def test_block_diagonal_b():
    """Per-slice adapters (qkv's q, k, v each with its own rank 8): a block-diagonal B (out, 3 x 8), dense to the
    kernel."""
    slices, r, k = (24, 16, 16), 8, 96
    a, _ = _factors(sum(slices), k, 3 * r)
    g = torch.Generator().manual_seed(5)
    b = torch.block_diag(*(torch.randn(n, r, generator=g) / r**0.5 for n in slices)).to(DEV)
    _check(_dense(sum(slices), k, torch.float32), a, b, scale=1.5)


@needs_triton
def test_poison_shows_an_unwritten_row(monkeypatch):
    """The checks' premise: with the last row block's programs dropped (each row block keeps all its splits, so the
    counters still reset), its rows stay NaN and the others are written."""
    real_run = launch.run
    monkeypatch.setattr(launch, "run", lambda fn, grid, args, meta: real_run(fn, (grid[0] - 1, grid[1]), args, meta))
    n, k = 53, 333
    a, b = _factors(n, k, 16)
    norm = dora_weight_norm(_dense(n, k, torch.float32), a, b, 1.0, backend="triton")
    block_n = choices.SMALL["dora-norm"]["BLOCK_N"]
    assert torch.isnan(norm[(n - 1) // block_n * block_n:]).all() and torch.isfinite(norm[:block_n]).all()


def test_torch_backend_is_the_reference():
    """backend "torch" (and None for CPU tensors) is the spec: W + s B A materialized in fp32; NF4 dequantized to
    fp32 first."""
    a, b = _factors(12, 70, 4)
    a, b = a.cpu(), b.cpu()
    w = _dense(12, 70, torch.bfloat16).cpu()
    w4 = _nf4_weight(12, 70, torch.bfloat16, device="cpu")
    assert torch.equal(dora_weight_norm(w, a, b, 2.0), dora_weight_norm_reference(w, a, b, 2.0))
    assert torch.equal(dora_weight_norm(w4, a, b, 2.0, backend="torch"),
                       dora_weight_norm_reference(dequantize_reference(w4, torch.float32), a, b, 2.0))


# ------------------------------------------------------------------------------------------- GPU only
PHI = sorted({(9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192),  # Phi-3-mini: qkv, o, gate_up, down (out, in)
              (7680, 5120), (5120, 5120), (35840, 5120), (5120, 17920),  # Phi-3-medium: qkv, o, gate_up, down
              (7168, 5120)})  # Phi-4: qkv (the others as Phi-3-medium's)


def _weight(kind, n, k, seed=0):
    return _nf4_weight(n, k, torch.bfloat16, seed=seed) if kind == "nf4" else _dense(n, k, torch.bfloat16, seed)


@cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["bf16", "nf4"])
@pytest.mark.parametrize("n,k", PHI)
def test_cuda_phi(kind, n, k):
    a, b = _factors(n, k, 16, seed=n + k)
    _check(_weight(kind, n, k), a, b, scale=2.0)


@cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["bf16", "nf4"])
@pytest.mark.parametrize("r", [1, 64, 256])
@pytest.mark.parametrize("n,k", [(9216, 3072), (3072, 8192)])
def test_cuda_ranks(kind, r, n, k):
    """r = 256: four rank chunks, and configs that overflow shared memory give way to one that fits."""
    a, b = _factors(n, k, r, seed=r)
    _check(_weight(kind, n, k, seed=r), a, b, scale=0.5)


@cuda
@needs_cuda
@pytest.mark.parametrize("nested", [True, False])
def test_cuda_nf4_blocks_straddling_rows(nested):
    """in = 3000: 64-blocks straddle rows (the per-element tile)."""
    a, b = _factors(2500, 3000, 16)
    _check(_nf4_weight(2500, 3000, torch.bfloat16, nested=nested), a, b, scale=2.0)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_other_dtypes(dtype):
    a, b = _factors(3072, 3072, 16)
    _check(_dense(3072, 3072, dtype), a, b, scale=2.0)


@cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["bf16", "nf4"])
@pytest.mark.parametrize("option", list(choices.CONFIGS["dora-norm"]))
def test_cuda_every_config(forced_config_runs, kind, option):
    """Each config a table may name, forced, at qkv (two splits) and down (six) with r = 16."""
    used = []

    def timer(key, options, run):
        used.append(key)
        return option
    choices.set_timer(timer)
    try:
        for n, k in [(9216, 3072), (3072, 8192)]:
            a, b = _factors(n, k, 16, seed=k)
            _check(_weight(kind, n, k, seed=k), a, b, scale=2.0)
    finally:
        choices.set_timer(None)
    assert len(used) == 2 and all(key.split()[0].endswith("dora.dora-norm") for key in used), used


@cuda
@needs_cuda
def test_cuda_deterministic_counters_reset_no_weight_sized_tensor():
    """The split sums add their partials in a fixed order: two calls agree bit for bit; every last-to-arrive counter
    is back at zero; and nothing W-sized is allocated (W + s B A never exists): only the norm and the partials."""
    n, k = 3072, 8192
    w = _dense(n, k, torch.bfloat16)
    a, b = _factors(n, k, 16)
    first = dora_weight_norm(w, a, b, 2.0)  # compiles, and makes the counters, first
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    second = dora_weight_norm(w, a, b, 2.0)
    assert torch.cuda.max_memory_allocated() - before <= 64 * n * 4  # up to 63 partials of n floats, and the norm
    assert torch.equal(first, second)
    assert all(int(c.abs().sum()) == 0 for c in launch._counters.values())


# ---- DoRA's output scale g * L (kernels/dora.py) --------------------------------------------------------------
# Tolerance: the same rule. y and dL are one rounding of an fp32 product (as torch's): equal to torch's but for the
# rare fp32 product that rounds to the other side of a 16-bit tie; dg sums M products in fp32 (the kernel per row
# block, then torch over the blocks; torch in its own order): 16 fp32 ulps of the largest |dg| of slack, as above.

def _column_scale_case(m, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    L = torch.randn(m, n, generator=gen).to(DEV, dtype)
    g = (torch.rand(n, generator=gen) + 0.5).to(DEV)
    dy = torch.randn(m, n, generator=gen).to(DEV, dtype)
    return L, g, dy


def _check_column_scale(L, g, dy):
    from phi3.ops import column_scale, column_scale_reference
    results = []
    for run in (lambda a, b: column_scale(a, b, backend="triton"), column_scale_reference):
        a, b = L.clone().requires_grad_(), g.clone().requires_grad_()
        y = run(a, b)
        y.backward(dy)
        results.append((y, a.grad, b.grad))
    a, b = L.double().requires_grad_(), g.double().requires_grad_()
    y = a * b
    y.backward(dy.double())
    for i, (got, ref, exact) in enumerate(zip(*results, (y, a.grad, b.grad))):
        assert got.dtype == ref.dtype and got.shape == ref.shape and torch.isfinite(got).all()
        slack = 16 * torch.finfo(torch.float32).eps * exact.abs().max().item() if i == 2 else 0.0
        err, torch_err = (got.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
        assert err <= 2 * torch_err + slack, (i, err, torch_err)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n", [(1, 1), (33, 257), (70, 600), (5, 31)])
def test_column_scale_against_float64(dtype, m, n):
    """Rows and columns that are not multiples of the blocks (32 x 256), one element, several row blocks."""
    _check_column_scale(*_column_scale_case(m, n, dtype, seed=m * n))


@needs_triton
def test_column_scale_keeps_leading_dims_and_strided_grads():
    """(B, T, N) inputs, and a gradient that is not contiguous (an expanded one, as a sum's backward gives)."""
    from phi3.ops import column_scale
    L, g, _ = _column_scale_case(6, 40, torch.float32, seed=3)
    L3 = L.view(2, 3, 40).requires_grad_()
    column_scale(L3, g.requires_grad_(), backend="triton").sum().backward()
    assert torch.equal(L3.grad, g.detach().expand(2, 3, 40)) and torch.allclose(g.grad, L.sum(0).float())


@cuda
@needs_cuda
@pytest.mark.parametrize("n", [9216, 3072, 16384, 7680, 35840])
def test_cuda_column_scale_bf16(n):
    """Phi-3-mini's and Phi-3-medium's layer widths at 8192 tokens, bf16."""
    _check_column_scale(*_column_scale_case(8192, n, torch.bfloat16, seed=n))
