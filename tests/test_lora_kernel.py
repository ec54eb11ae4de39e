"""Fused LoRA linear (kernels/lora_linear.py) against a float64 reference.

CPU: the Triton path runs under TRITON_INTERPRET=1 (fp32 and fp16, small odd shapes; the interpreter cannot do
bf16 tl.dot). GPU (`pytest -m cuda`): bf16 at Phi-3-mini shapes, r up to 256, fp16/fp32.
Tolerance (flash-attention's rule): for y, dx, dA, dB, max|kernel - fp64| <= 2 * max|torch - fp64| + slack,
where torch = lora_linear_reference at the same dtype (with autograd) and slack = c * eps(dtype) * max|fp64|,
c = 1 for fp16/bf16 and 16 for fp32 (2e-6 relative: fp32 summation-order noise over K ~ 1000).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import CUDA, DEV, cuda, needs_cuda, needs_triton
from phi3.kernels import choices, launch
from phi3.kernels import lora_linear as ll  # the module (its lora_linear is the function)
from phi3.kernels.lora_linear import dropout_mask
from phi3.ops import lora_linear, lora_linear_reference
from phi3.kernels.lowrank import _dropout


@pytest.fixture(autouse=True)
def _poison(poison_outputs, monkeypatch):
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


def _check(shape, n_out, r, dtype, scale=2.0, p=0.0, noncontig=False, seed=0):
    x, w, a, b, dy = _inputs(shape, n_out, r, dtype, noncontig, seed)
    mask = dropout_mask(1234, x.shape, p, DEV) if p > 0 else None
    got = _run(lambda *t: lora_linear(*t, scale, p, backend="triton", seed=1234), x, w, a, b, dy)
    ref = _run(lambda *t: lora_linear_reference(*t, scale, mask), x, w, a, b, dy)
    f64 = lambda t: t.double()
    exact = _run(lambda x_, w_, a_, b_: lora_linear_reference(x_, w_, a_, b_, scale, None if mask is None else mask.double()),
                 f64(x), f64(w), f64(a), f64(b), f64(dy))
    _assert_close(got, ref, exact, dtype)


def _assert_close(got, ref, exact, dtype, allowance=(0.0, 0.0, 0.0, 0.0)):
    """got (kernel), ref (torch at the same dtype), exact (fp64): y, dx, dA, dB. allowance: per output, the error
    that the kernel's own arithmetic may add beyond torch's, per element (test_fp8_kernel's fast accumulation)."""
    for name, k, t, e, extra in zip(("y", "dx", "dA", "dB"), got, ref, exact, allowance):
        assert k.dtype == t.dtype and k.shape == e.shape, name
        assert torch.isfinite(k).all(), f"{name}: non-finite values (unwritten output?)"
        err, torch_err = ((k.double() - e).abs() - extra).max().item(), (t.double() - e).abs().max().item()
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
    assert ll._kinds(x, w.t())[0] == ll._kinds(dy, w)[0] == "tma"
    assert ll._kinds(x.float(), w.float().t()) == ["triton"]
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


# Philox4x32-10 on the host (Random123, Salmon et al. SC'11), the reference for the dropout mask's draws
_M32 = np.uint64(0xFFFFFFFF)


def _philox(counter, key):
    """Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1), each word a uint32 value (or array of them),
    held in uint64 so the 32 x 32-bit products are exact. Returns the four output words (uint64 arrays)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.uint64(k) for k in key)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2  # (hi, lo) = mulhilo
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _M32, (p0 >> 32) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def _philox_at(counter, seed):
    """The words tl.randint4x(seed, counter) draws for int64 counters: Philox counter (low 32 bits, high 32 bits,
    0, 0), key (the seed's low 32 bits, its high 32 bits)."""
    c = np.asarray(counter, dtype=np.int64).astype(np.uint64)
    return _philox((c & _M32, c >> 32, 0, 0), (seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF))


def _keep_reference(seed, counters, cols, p):
    """The dropout decisions at counters (m * cdiv(n_cols, 4) + k // 4) and columns k: word k % 4 of the counter's
    Philox output, kept iff uniform(word) >= p, uniform being tl.rand's: the word as int32, negative x -> -x - 1,
    times 4.6566127342e-10, all in fp32."""
    words = _philox_at(counters, seed)
    word = np.choose(np.broadcast_to(np.asarray(cols) % 4, np.shape(counters)), words)
    x = word.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, -(x + 1), x)  # -x - 1 without int32 overflow at -2^31
    return torch.from_numpy(x.astype(np.float32) * np.float32(4.6566127342e-10) >= np.float32(p))


def _reference_counters(rows, cols, n_cols):
    """(rows, cols) int64 Philox counters of an (M, n_cols) input: m * cdiv(n_cols, 4) + k // 4."""
    return np.asarray(rows, np.int64)[:, None] * -(-n_cols // 4) + np.asarray(cols, np.int64)[None, :] // 4


@triton.jit(do_not_specialize=["seed"])
def _randint4x_kernel(out_ptr, counter_ptr, seed, N: tl.constexpr):
    """out (4, N) int32 = the bits of tl.randint4x(seed, counter) for N int64 counters."""
    offs = tl.arange(0, N)
    r0, r1, r2, r3 = tl.randint4x(seed, tl.load(counter_ptr + offs))
    tl.store(out_ptr + offs, r0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + N + offs, r1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 2 * N + offs, r2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 3 * N + offs, r3.to(tl.int32, bitcast=True))


@needs_triton
def test_philox_reference():
    """The host Philox gives Random123's known answers (its kat_vectors file) and tl.randint4x's words, for
    counters past 2^32 (the high word is Philox's second counter word) and seeds past 2^32 (the key's high word)."""
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in kat:
        assert tuple(int(w) for w in _philox(counter, key)) == expected
    counters = torch.tensor([0, 1, 2, 3, 7, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**33 + 7,
                             2**40 + 12345, 2**62 + 3, 2**63 - 1, 123456789])
    for seed in (0, 1234, 2**31 - 1, 2**40 + 99):
        out = torch.empty(4, len(counters), dtype=torch.int32, device=DEV)
        _randint4x_kernel[(1,)](out, counters.to(DEV), seed, N=len(counters))
        expected = np.stack(_philox_at(counters.numpy(), seed)).astype(np.uint32).view(np.int32)
        assert np.array_equal(out.cpu().numpy(), expected), seed


@triton.jit(do_not_specialize=["seed"])
def _mask_at_kernel(out_ptr, row0, col0, n_cols, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """_dropout's multiplier (0 or 2 at p = 0.5) at rows row0 .. (int32 row indices), columns col0 .. of n_cols."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    ones = tl.full((BLOCK_M, BLOCK_K), 1.0, tl.float32)
    tl.store(out_ptr + tile, _dropout(ones, seed, offs_m, col0, n_cols, p, 2.0, True))


@needs_triton
@pytest.mark.parametrize("n_cols,row0", [(8192, 2**31 // 8192 - 2), (8192, 2**32 // 8192 - 2),
                                         (8192, 2**31 // 2048 - 2), (8192, 2**32 // 2048 - 2), (3070, 2**33 // 768)])
def test_dropout_counter_is_exact_past_int32(n_cols, row0):
    """The Philox counter m * cdiv(n_cols, 4) + k // 4 is int64: rows whose element index straddles 2^31 and 2^32,
    whose counter straddles 2^31 and 2^32 (an int32 counter is the counter mod 2^32: past 2^32 it would repeat
    earlier rows' words), and counters past 2^33 in rows of 3070 (not a multiple of 4) keep exactly as the host
    Philox says, at the last columns of the row, with column blocks of 16 and 64."""
    rows, seed, p = 4, 1234, 0.5
    for block in (16, 64):
        col0 = -(-n_cols // block) * block - block  # the last block (past the row's end for 3070: not compared)
        out = torch.empty(rows, block, device=DEV)
        _mask_at_kernel[(1,)](out, row0, col0, n_cols, seed, p, BLOCK_M=rows, BLOCK_K=block)
        cols = np.arange(col0, min(col0 + block, n_cols))
        counters = _reference_counters(np.arange(row0, row0 + rows), cols, n_cols)
        keep = _keep_reference(seed, counters, cols, p)
        assert 0 < keep.sum() < keep.numel()
        assert torch.equal(out.cpu()[:, :len(cols)] != 0, keep)
    assert (row0 + rows) * n_cols > 2**31  # element indices past int32 (counters past it in the last three cases)
    if (counters >= 2**32).any():  # an int32 counter is the counter mod 2^32: other masks (earlier rows' words)
        wrapped = _keep_reference(seed, counters % 2**32, cols, p)
        assert not torch.equal(wrapped[counters >= 2**32], keep[counters >= 2**32])


@needs_triton
@pytest.mark.parametrize("blocks", [None, (16, 64), (64, 16), (8, 128)])
def test_dropout_mask_is_the_reference(blocks):
    """Every multiplier of dropout_mask (blocks None: its own 32 x 32) or of _dropout_mask_kernel with other block
    sizes is the host reference's, in rows of 45 (not a multiple of 4: a row's last group is partly past its end)."""
    M, K, seed, p = 37, 45, 99, 0.3
    if blocks is None:
        m = dropout_mask(seed, (M, K), p, DEV)
    else:
        m = torch.full((M, K), float("nan"), device=DEV)
        grid = (launch.cdiv(M, blocks[0]), launch.cdiv(K, blocks[1]))
        ll._dropout_mask_kernel[grid](m, M, K, seed, p, 1.0 / (1.0 - p), BLOCK_M=blocks[0], BLOCK_K=blocks[1])
    keep = _keep_reference(seed, _reference_counters(np.arange(M), np.arange(K), K), np.arange(K), p)
    assert torch.equal(m.cpu(), torch.where(keep, torch.tensor(1.0 / (1.0 - p), dtype=torch.float32), 0.0))


@needs_triton
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (37, 45)), (torch.float16, (37, 48))])
def test_dropout_independent_of_block_sizes(monkeypatch, dtype, shape):
    """Each kernel draws the mask in its own column blocks (here 16 to 64; dropout_mask's are 32): the layer still
    equals the reference with dropout_mask's mask. fp16 rows of 48 take the TMA GEMM, fp32 the pointer one."""
    small = choices.SMALL
    monkeypatch.setitem(small, "down", {**small["down"], "BLOCK_M": 16, "BLOCK_K": 16})
    monkeypatch.setitem(small, "da", {**small["da"], "BLOCK_M": 16, "BLOCK_K": 64})
    monkeypatch.setitem(small, "gemm", {**small["gemm"], "BLOCK_N": 16})
    monkeypatch.setitem(small, "tma", {**small["tma"], "BLOCK_N": 64})
    _check(shape, 40, 8, dtype, scale=1.5, p=0.3, seed=4)


# ---------------------------------------------------------------------------------- the choices a launch takes
@needs_triton
def test_the_table_decides_each_launch(monkeypatch):
    """A table naming the cuBLAS hybrid for both GEMMs and a skinny config: those run (the rule would take the TMA
    GEMM here; in the interpreter both kinds run), results stay exact, and the keys are the ones looked up."""
    x, w, *_ = _inputs((37, 48), 56, 4, torch.float16)
    assert ll._kinds(x, w.t())[0] == "tma"
    monkeypatch.setattr(ll, "_kinds", lambda a, b_op: ["tma", "cublas"])  # both apply, as on a Hopper GPU
    fwd, dx = "fwd 64 56 48 4 0", "dx 64 48 56 4 1"  # (site, token bucket, N, K, rank, dropout)
    asked, launched = [], []
    real_choose, real_run = choices.choose, launch.run
    monkeypatch.setattr(choices, "choose", lambda site, key, *a: asked.append((site, key)) or real_choose(site, key, *a))
    monkeypatch.setattr(launch, "run", lambda fn, grid, args, meta: launched.append(fn.__name__) or
                        real_run(fn, grid, args, meta))
    choices.use_table({fwd: "cublas", dx: "cublas"})
    try:
        _check((37, 48), 56, 4, torch.float16, scale=1.3, p=0.25)
    finally:
        choices.use_table(None)
    assert ("fwd", (64, 56, 48, 4, 0)) in asked and ("dx", (64, 48, 56, 4, 1)) in asked
    assert "_lora_gemm_tma_kernel" not in launched and "_lora_gemm_kernel" in launched


# ------------------------------------------------------------------------------------------- GPU only
PHI3 = [(3072, 9216), (3072, 3072), (3072, 16384), (8192, 3072)]  # qkv, o, gate_up, down


@cuda
@needs_cuda
@pytest.mark.parametrize("gemm", ["auto", "triton", "cublas"])
@pytest.mark.parametrize("k,n", PHI3)
def test_cuda_phi3_bf16(monkeypatch, k, n, gemm):
    monkeypatch.setattr(ll, "GEMM", gemm)
    _check((2, 2048, k), n, 16, torch.bfloat16, scale=2.0)


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
@pytest.mark.parametrize("gemm", ["auto", "triton", "cublas"])
def test_cuda_dropout_bf16(monkeypatch, gemm):
    monkeypatch.setattr(ll, "GEMM", gemm)
    _check((4096, 3072), 3072, 16, torch.bfloat16, scale=2.0, p=0.1)


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
@pytest.mark.parametrize("gemm", ["auto", "cublas"])
def test_cuda_second_gpu_while_first_is_current(monkeypatch, gemm):
    """Launch plans, last-to-arrive counters and TMA descriptor scratch are per device (every GPU's default
    stream has the same handle): a layer on cuda:1 while cuda:0 is the current device, then one on cuda:0."""
    monkeypatch.setattr(ll, "GEMM", gemm)
    torch.cuda.set_device(0)
    for device in ("cuda:1", "cuda:0"):
        monkeypatch.setitem(globals(), "DEV", device)
        _check((2048, 3072), 3072, 16, torch.bfloat16, scale=2.0, p=0.1)
        assert torch.cuda.current_device() == 0


def _gpu_gib():
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if CUDA else 0


@cuda
@needs_cuda
@pytest.mark.skipif(_gpu_gib() < 80, reason="needs a GPU with 80 GiB (inputs, outputs and the torch reference)")
@pytest.mark.parametrize("k,n,m,p,gemms", [
    (3072, 16384, 2**31 // 16384 + 300, 0.0, ("auto", "triton", "cublas")),  # gate_up: y and dy rows
    (8192, 3072, 2**31 // 8192 + 300, 0.1, ("auto", "triton")),  # down: x rows and dropout counters past 2^31
])
def test_cuda_offsets_past_int32(monkeypatch, k, n, m, p, gemms):
    """More tokens than int32 offsets reach (row x stride >= 2^31 in the last 300 rows), bf16. y and dx are checked
    on sampled rows (all of the last 400) against those rows in fp64; dA and dB (sums over every row) against fp64
    sums taken by chunks; the torch error at bf16 sets the tolerance as in _check; every output is written."""
    r, scale, seed = 16, 2.0, 7
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, generator=g, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, generator=g, device="cuda") / k**0.5).bfloat16()
    a = torch.randn(r, k, generator=g, device="cuda") / k**0.5
    b = torch.randn(n, r, generator=g, device="cuda") / r**0.5
    dy = torch.randn(m, n, generator=g, device="cuda", dtype=torch.bfloat16)
    mask = dropout_mask(seed, (m, k), p, "cuda") if p > 0 else None
    sample = torch.randperm(m - 464, generator=torch.Generator().manual_seed(0))[:192] + 64
    rows = torch.cat([torch.arange(64), sample, torch.arange(m - 400, m)]).cuda()
    ref = _run(lambda *t: lora_linear_reference(*t, scale, mask), x, w, a, b, dy)
    ref = [ref[0][rows], ref[1][rows], ref[2], ref[3]]  # y and dx on the sampled rows only (memory)

    w64, a64, b64 = w.double(), a.double(), b.double()
    xd = lambda i: x[i].double() * (1.0 if mask is None else mask[i].double())  # dropout(x) in fp64
    y64 = x[rows].double() @ w64.T + scale * (xd(rows) @ a64.T) @ b64.T
    dx_lora = scale * (dy[rows].double() @ b64) @ a64
    dx64 = dy[rows].double() @ w64 + dx_lora * (1.0 if mask is None else mask[rows].double())
    da64, db64 = torch.zeros(r, k, dtype=torch.float64, device="cuda"), torch.zeros(n, r, dtype=torch.float64, device="cuda")
    for c in range(0, m, 8192):
        i = slice(c, c + 8192)
        d = dy[i].double()
        da64 += scale * (d @ b64).T @ xd(i)
        db64 += scale * d.T @ (xd(i) @ a64.T)
    exact = [y64, dx64, da64, db64]
    for gemm in gemms:
        monkeypatch.setattr(ll, "GEMM", gemm)
        got = _run(lambda *t: lora_linear(*t, scale, p, seed=seed), x, w, a, b, dy)
        for name, t in zip(("y", "dx"), got):  # poisoned before the launch: NaN left where nothing was written
            assert torch.isfinite(t).all(), f"{gemm} {name}: rows left unwritten"
        _assert_close([got[0][rows], got[1][rows], got[2], got[3]], ref, exact, torch.bfloat16)
        del got


@pytest.fixture(scope="module")
def gate_up_problem():
    """gate_up at 4000 tokens, bf16, r = 16, dropout 0.1: inputs, the torch result and the fp64 one, computed once
    for every config."""
    x, w, a, b, dy = _inputs((4000, 3072), 16384, 16, torch.bfloat16, seed=2)
    mask = dropout_mask(1234, x.shape, 0.1, DEV)
    ref = _run(lambda *t: lora_linear_reference(*t, 2.0, mask), x, w, a, b, dy)
    exact = _run(lambda *t: lora_linear_reference(*t, 2.0, mask.double()), *(t.double() for t in (x, w, a, b, dy)))
    return (x, w, a, b, dy), ref, exact


@cuda
@needs_cuda
@pytest.mark.parametrize("kernel,option", [(k, o) for k in ("tma", "gemm", "down", "dy", "da")
                                           for o in choices.CONFIGS[k]])
def test_cuda_every_config(monkeypatch, forced_config_runs, gate_up_problem, kernel, option):
    """Each config a table may name for the kernels lora_linear runs, forced for its kernel (the others take the
    rule's), at a Phi-3-mini shape: outputs and gradients within the rule of _check. "gemm" configs run as the
    pointer GEMM (GEMM="triton"), the rest under the TMA GEMM. (FP8's, NF4's and DoRA's configs: their kernels'
    test files.)"""
    monkeypatch.setattr(ll, "GEMM", "triton" if kernel == "gemm" else "auto")
    used = []
    choices.set_timer(lambda key, options, run: used.append(key) or (option if option in options else options[0]))
    try:
        inputs, ref, exact = gate_up_problem
        got = _run(lambda *t: lora_linear(*t, 2.0, 0.1, seed=1234), *inputs)
    finally:
        choices.set_timer(None)
    assert any(key.split()[0].endswith("." + kernel) for key in used), used
    _assert_close(got, ref, exact, torch.bfloat16)


_CHILD = r"""
import sys, torch
from phi3.ops import lora_linear
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(4000, 3072, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(16384, 3072, generator=g, device="cuda", dtype=torch.bfloat16) / 64
a = (torch.randn(16, 3072, generator=g, device="cuda") / 64).requires_grad_()
b = (torch.randn(16384, 16, generator=g, device="cuda") / 4).requires_grad_()
dy = torch.randn(4000, 16384, generator=g, device="cuda", dtype=torch.bfloat16)
results = {}
for p in (0.0, 0.1):
    y = lora_linear(x, w, a, b, 2.0, p, seed=5)
    y.backward(dy)
    results.update({f"{n} {p}": t.detach().cpu() for n, t in (("y", y), ("dx", x.grad), ("dA", a.grad), ("dB", b.grad))})
    x.grad = a.grad = b.grad = None
torch.save(results, sys.argv[1])
"""


@cuda
@needs_cuda
def test_cuda_two_processes_compute_the_same_bits(tmp_path):
    """Choices come from the shipped table or the rule, never from timing: two fresh processes (as two torchrun
    ranks, or a run and its resume) compute the same bits."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                         os.environ.get("PYTHONPATH", "")])}
    for name in ("first.pt", "second.pt"):
        subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / name)], env=env, check=True, timeout=500)
    first, second = (torch.load(tmp_path / name, weights_only=True) for name in ("first.pt", "second.pt"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
