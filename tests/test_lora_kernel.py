"""Fused LoRA linear (kernels/lora_linear.py) against a float64 reference.

CPU: the Triton path runs under TRITON_INTERPRET=1 (fp32 and fp16, small odd shapes; the interpreter cannot do
bf16 tl.dot). GPU (`pytest -m cuda`): bf16 at Phi-3-mini shapes, r up to 256, fp16/fp32.
Tolerance (flash-attention's rule): for y, dx, dA, dB, max|kernel - fp64| <= 2 * max|torch - fp64| + slack,
where torch = lora_linear_reference at the same dtype (with autograd) and slack = c * eps(dtype) * max|fp64|,
c = 1 for fp16/bf16 and 16 for fp32 (2e-6 relative: fp32 summation-order noise over K ~ 1000).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by kernels

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import importlib  # noqa: E402

from kernels import dropout_mask, lora_linear, lora_linear_reference, with_spare_columns  # noqa: E402

ll = importlib.import_module("kernels.lora_linear")  # the module (kernels.lora_linear is the function)
launch = importlib.import_module("kernels.launch")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not CUDA and not launch.INTERPRET, reason="no CUDA, and triton was imported before TRITON_INTERPRET=1 was set")
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU (run `pytest -m cuda` on the device machine)")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ll, "POISON_OUTPUTS", True)  # y, S, dx buffers start as NaN
    monkeypatch.setattr(launch, "AUTOTUNE", False)  # one config per kernel: compile time (bench checks the tuned ones)
    monkeypatch.setattr(ll, "GEMM", "auto")  # TMA GEMM where strides allow it (test_gemm_backends: the others)


def _inputs(shape, n_out, r, dtype, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    if noncontig == "slice":  # row stride > in: reshape(-1, in) stays a strided view
        x = torch.randn(*shape[:-1], k + 7, generator=g)[..., :k]
    elif noncontig == "transpose":  # (T, B, in) -> (B, T, in): reshape copies
        x = torch.randn(shape[1], shape[0], *shape[2:], generator=g).transpose(0, 1)
    else:
        x = torch.randn(*shape, generator=g)
    w = torch.randn(n_out, k, generator=g) / k**0.5
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n_out, r, generator=g) / r**0.5  # never zero (peft's init) so the LoRA path is exercised
    dy = torch.randn(*shape[:-1], n_out, generator=g)
    dev = lambda t, dt: t.to(DEV, dt)
    return dev(x, dtype), dev(w, dtype), dev(a, torch.float32), dev(b, torch.float32), dev(dy, dtype)


def _run(fn, x, w, a, b, dy):
    x, a, b = (t.detach().clone().requires_grad_() if t.is_contiguous() else t.detach().requires_grad_() for t in (x, a, b))
    y = fn(x, w, a, b)
    y.backward(dy)
    return [y.detach(), x.grad, a.grad, b.grad]


def _check(shape, n_out, r, dtype, scale=2.0, p=0.0, noncontig=False, seed=0, spare=False):
    x, w, a, b, dy = _inputs(shape, n_out, r, dtype, noncontig, seed)
    spare_cols = 0
    if spare:  # W as LoRALinear lays it out: a view of a wider buffer whose spare columns the kernel may use
        w, spare_cols = with_spare_columns(w, r)
    mask = dropout_mask(1234, x.shape, p, DEV) if p > 0 else None
    got = _run(lambda *t: lora_linear(*t, scale, p, backend="triton", seed=1234, spare_cols=spare_cols), x, w, a, b, dy)
    ref = _run(lambda *t: lora_linear_reference(*t, scale, mask), x, w, a, b, dy)
    f64 = lambda t: t.double()
    exact = _run(lambda x_, w_, a_, b_: lora_linear_reference(x_, w_, a_, b_, scale, None if mask is None else mask.double()),
                 f64(x), f64(w), f64(a), f64(b), f64(dy))
    for name, k, t, e in zip(("y", "dx", "dA", "dB"), got, ref, exact):
        assert k.dtype == t.dtype and k.shape == e.shape, name
        assert torch.isfinite(k).all(), f"{name}: non-finite values (unwritten output?)"
        err, torch_err = (k.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        # fp32: 16 ulps of the largest value (summation-order noise of long fp32 sums); 16-bit: 1 ulp
        slack = (16 if dtype == torch.float32 else 1) * torch.finfo(dtype).eps * e.abs().max().item()
        assert err <= 2 * torch_err + slack, f"{name}: err {err:.3g} > 2 * torch {torch_err:.3g} + {slack:.3g}"


# ------------------------------------------------------------------------------ CPU (interpreter) + GPU
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [1, 8, 16, 64])
def test_odd_shapes(dtype, r):
    _check((37, 45), 53, r, dtype, scale=1.7)


@needs_triton
@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_tma_gemm_odd_shapes(r, p):
    """Sizes off the block grid but with 16-byte aligned rows: the TMA GEMM (edges zero-filled / clipped by TMA).
    16-bit only: fp32 takes the pointer GEMM (its FMA dot does not fit the TMA kernel's shared memory)."""
    x, w, _, _, dy = _inputs((37, 48), 56, r, torch.float16)
    assert ll._static_kind(x, w.t()) == ll._static_kind(dy, w) == "tma"
    assert ll._static_kind(x.float(), w.float().t()) == "triton"
    _check((37, 48), 56, r, torch.float16, scale=1.3, p=p, seed=r)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("noncontig", ["slice", "transpose"])
def test_3d_noncontiguous(dtype, noncontig):
    _check((2, 19, 40), 33, 8, dtype, scale=0.5, noncontig=noncontig)


@needs_triton
def test_many_tiles_per_program():
    """More row tiles / work items than programs: the persistent skinny kernels walk several each."""
    _check((200, 45), 40, 8, torch.float32, scale=0.7, p=0.2, seed=5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_mask(dtype):
    _check((2, 21, 47), 35, 16, dtype, scale=2.0, p=0.25, seed=3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r,p", [(1, 0.0), (16, 0.3), (24, 0.0)])
def test_concat_forward(monkeypatch, dtype, r, p):
    """GEMM="concat": the forward as one GEMM [x | S] [W | sB]^T through W's spare columns (the S kernel writes
    both extra column blocks); W's own columns are untouched, its spare ones hold s*B then zeros."""
    monkeypatch.setattr(ll, "GEMM", "concat")
    _check((37, 48), 56, r, dtype, scale=1.3, p=p, seed=r)
    x, w, a, b, _ = _inputs((37, 48), 56, r, dtype, seed=r)
    wide, spare = with_spare_columns(w, r)
    assert spare >= r and (48 + spare) * w.element_size() % 16 == 0 and torch.equal(wide, w)
    lora_linear(x, wide, a, b, 1.3, backend="triton", spare_cols=spare)
    full = torch.as_strided(wide, (56, 48 + spare), (wide.stride(0), 1))
    assert torch.equal(wide, w)
    assert torch.equal(full[:, 48:48 + r], (1.3 * b).to(dtype)) and not full[:, 48 + r:].any()


@needs_triton
def test_spare_columns_ignored_unless_the_layout_has_them(monkeypatch):
    """A contiguous W (e.g. after .to() copied the weight) never has its neighbours overwritten."""
    monkeypatch.setattr(ll, "GEMM", "concat")
    x, w, a, b, _ = _inputs((10, 32), 24, 4, torch.float16)
    pair = torch.cat([w, w])  # w's rows followed by other data: spare_cols is a promise the layout cannot keep
    first = pair[:24]
    assert ll._spare_columns(first, 4, 8) == 0 and ll._spare_columns(pair[24:], 4, 8) == 0
    assert torch.equal(lora_linear(x, first, a, b, 2.0, backend="triton", spare_cols=8),
                       lora_linear(x, first, a, b, 2.0, backend="triton"))  # the same path as without the promise
    assert torch.equal(pair[24:], w)


@needs_triton
@pytest.mark.parametrize("shape,n_out", [((20, 45), 40), ((70, 30), 24), ((37, 45), 53)])
def test_split_sums(shape, n_out):
    """The backward's sums split over programs finish in-kernel (last program of a group adds the partials): one
    row block (dB written directly), one column range (G written directly), and both split, dA split too."""
    x, *_ = _inputs(shape, n_out, 8, torch.float32)
    _, gm, _, gn, _, gm_da, _ = ll._backward_splits(shape[0], n_out, shape[1], 8, x.device)
    expected = {(20, 45): (1, 2, 1), (70, 30): (3, 1, 3), (37, 45): (2, 2, 2)}[shape] if not CUDA else None
    assert CUDA or (gm, gn, gm_da) == expected
    _check(shape, n_out, 8, torch.float32, scale=1.1, seed=11)


@needs_triton
@pytest.mark.parametrize("gemm", ["auto", "triton", "cublas"])
def test_gemm_backends(monkeypatch, gemm):
    monkeypatch.setattr(ll, "GEMM", gemm)
    _check((33, 40), 48, 8, torch.float16, p=0.1)  # aligned 16-bit rows: "auto" is the TMA GEMM


@needs_triton
def test_dropout_mask_rate_and_determinism():
    p = 0.3
    m = dropout_mask(7, (256, 300), p, DEV)
    keep = (m != 0).double().mean().item()
    assert abs(keep - (1 - p)) < 0.01, keep  # 76800 draws: 5 sigma is 0.008
    assert torch.equal(m.unique().cpu(), torch.tensor([0.0, 1 / (1 - p)]))
    assert torch.equal(m, dropout_mask(7, (256, 300), p, DEV))
    assert not torch.equal(m, dropout_mask(8, (256, 300), p, DEV))


@needs_triton
def test_eval_and_p0_disable_dropout():
    x, w, a, b, _ = _inputs((20, 32), 24, 4, torch.float32)
    y0 = lora_linear(x, w, a, b, 2.0, 0.0, backend="triton")
    y_eval = lora_linear(x, w, a, b, 2.0, 0.5, training=False, backend="triton")
    y_train = lora_linear(x, w, a, b, 2.0, 0.5, training=True, backend="triton", seed=1)
    assert torch.equal(y0, y_eval) and not torch.allclose(y0, y_train)


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):  # keep the storage address: views of W (W.t()) are no allocation
                self.shapes.append((str(func), tuple(t.shape), t.untyped_storage().data_ptr()))
        return out


@needs_triton
def test_no_weight_grad_no_out_by_in_tensor():
    x, w, a, b, dy = _inputs((3, 10, 40), 24, 4, torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    with _RecordShapes() as rec:
        y = lora_linear(x, w, a, b, 2.0, 0.1, backend="triton", seed=5)
        y.backward(dy)
    assert w.grad is None and not w.requires_grad
    assert a.grad.dtype == b.grad.dtype == torch.float32
    w_ptr = w.untyped_storage().data_ptr()
    assert [r for r in rec.shapes if r[1] in [(24, 40), (40, 24)] and r[2] != w_ptr] == []


def test_torch_backend_cpu():
    x, w, a, b, dy = _inputs((2, 5, 16), 12, 4, torch.float32)
    y = lora_linear(x, w, a, b, 2.0, backend="torch")
    torch.testing.assert_close(y, lora_linear_reference(x, w, a, b, 2.0))


# ------------------------------------------------------------------------------------------- GPU only
PHI3 = [(3072, 9216), (3072, 3072), (3072, 16384), (8192, 3072)]  # qkv, o, gate_up, down


@cuda
@needs_cuda
@pytest.mark.parametrize("gemm", ["auto", "triton", "cublas", "concat"])
@pytest.mark.parametrize("k,n", PHI3)
def test_cuda_phi3_bf16(monkeypatch, k, n, gemm):
    monkeypatch.setattr(ll, "GEMM", gemm)
    _check((2, 2048, k), n, 16, torch.bfloat16, scale=2.0, spare=gemm in ("auto", "concat"))


@cuda
@needs_cuda
@pytest.mark.parametrize("gemm", ["auto", "triton", "cublas"])
@pytest.mark.parametrize("r", [1, 64, 256])
def test_cuda_ranks_bf16(monkeypatch, r, gemm):
    monkeypatch.setattr(ll, "GEMM", gemm)
    _check((1000, 3000), 2500, r, torch.bfloat16, scale=0.5)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_other_dtypes(dtype):
    _check((2, 777, 1000), 1500, 16, dtype, scale=2.0, noncontig="slice")


@cuda
@needs_cuda
@pytest.mark.parametrize("gemm", ["auto", "triton", "cublas", "concat"])
def test_cuda_dropout_bf16(monkeypatch, gemm):
    monkeypatch.setattr(ll, "GEMM", gemm)
    _check((4096, 3072), 3072, 16, torch.bfloat16, scale=2.0, p=0.1, spare=gemm == "concat")


@cuda
@needs_cuda
@pytest.mark.parametrize("r", [1, 256])
def test_cuda_concat_ranks_bf16(monkeypatch, r):
    monkeypatch.setattr(ll, "GEMM", "concat")
    _check((1000, 3000), 2500, r, torch.bfloat16, scale=0.5, spare=True)


@cuda
@needs_cuda
def test_cuda_backward_deterministic_and_counters_reset():
    """The in-kernel sums add partials in a fixed order: two backward passes agree bit for bit; and every
    last-to-arrive counter is back at zero afterwards (the next launch on this stream relies on it)."""
    x, w, a, b, dy = _inputs((4096, 3072), 3072, 16, torch.bfloat16)
    grads = [_run(lambda *t: lora_linear(*t, 2.0, 0.1, seed=3), x, w, a, b, dy) for _ in range(2)]
    for first, second in zip(*grads):
        assert torch.equal(first, second)
    assert all(int(c.abs().sum()) == 0 for c in launch._counters.values())


@cuda
@needs_cuda
def test_cuda_no_out_by_in_tensor():
    x, w, a, b, dy = _inputs((2048, 3072), 8192, 16, torch.bfloat16)
    x.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    with _RecordShapes() as rec:
        lora_linear(x, w, a, b, 2.0, 0.1).backward(dy)
    w_ptr = w.untyped_storage().data_ptr()
    assert w.grad is None and [r for r in rec.shapes if r[1] in [(8192, 3072), (3072, 8192)] and r[2] != w_ptr] == []


@cuda
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("gemm", ["auto", "concat"])
def test_cuda_second_gpu_while_first_is_current(monkeypatch, gemm):
    """Launch plans, last-to-arrive counters and TMA descriptor scratch are per device (every GPU's default
    stream has the same handle): a layer on cuda:1 while cuda:0 is the current device, then one on cuda:0."""
    monkeypatch.setattr(ll, "GEMM", gemm)
    torch.cuda.set_device(0)
    for device in ("cuda:1", "cuda:0"):
        monkeypatch.setitem(globals(), "DEV", device)
        _check((2048, 3072), 3072, 16, torch.bfloat16, scale=2.0, p=0.1, spare=True)
        assert torch.cuda.current_device() == 0
