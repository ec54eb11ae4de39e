"""QLoRA linear (kernels/qlora_linear.py, kernels/nf4_gemm.py: W frozen in NF4, dequantized inside the GEMM) against
a float64 reference built from dequantize_reference(W, float64).

NF4 weights are made from random bytes, absmax codes, nested absmax and nested code (bitsandbytes' NF4 code table),
so no bitsandbytes is needed (one test compares the dequantize kernel with bitsandbytes where it is installed).
CPU: the Triton path under TRITON_INTERPRET=1, fp32 and fp16 (the interpreter cannot tl.dot bf16, and rounds fp32 to
bf16 by truncation), small odd shapes, in_features a multiple of 64 (the whole-block tile) and not (the per-element
tile), both GEMM kinds. GPU (`pytest -m cuda`): bf16 at Phi-3 / Phi-3-medium / Phi-4 shapes, ranks 1 to 256.
Tolerance: test_lora_kernel's rule, max|kernel - fp64| <= 2 max|torch - fp64| + slack, torch = lora_linear_reference
at the same dtype on dequantize_reference(W, dtype) (W rounded exactly as the kernels round it), slack = 1 ulp of the
largest value (16 for fp32's summation-order noise).
"""
import pytest
import torch

from conftest import CUDA, DEV, cuda, needs_cuda, needs_triton
from test_lora_kernel import _assert_close, _RecordShapes, _run
from phi3.kernels import choices, launch
from phi3.kernels import qlora_linear as ql
from phi3.kernels.lora_linear import dropout_mask
from phi3.kernels.nf4_weight import NF4Weight, dequantize_reference
from phi3.ops import lora_linear_reference, nf4_linear, qlora_linear

pytestmark = pytest.mark.usefixtures("poison_outputs")  # every kernel-written buffer starts as NaN

NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def _nf4_weight(n, k, dtype, seed=0, device=DEV, nested=True) -> NF4Weight:
    """A random NF4 W (n, k): random codes and absmax codes; absmax = offset +- nested absmax, around 2.5 / sqrt(k)
    (|W| up to ~3 / sqrt(k), like a quantized randn(n, k) / sqrt(k)). nested=False: the fp32 absmax kept as it is
    (a checkpoint saved with compress_statistics=False)."""
    g = torch.Generator().manual_seed(seed)
    numel, cdiv = n * k, launch.cdiv
    blocks = cdiv(numel, 64)
    packed = torch.randint(0, 256, (cdiv(numel, 2),), dtype=torch.uint8, generator=g)
    if nested:
        w = NF4Weight(packed, absmax_code=torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g),
                      nested_absmax=(0.5 + 0.2 * torch.rand(cdiv(blocks, 256), generator=g)) / k**0.5,
                      nested_code=torch.sort(2 * torch.rand(256, generator=g) - 1).values,
                      code=torch.tensor(NF4_CODE), offset=2.5 / k**0.5 + 1e-3 * torch.rand((), generator=g).item(),
                      shape=(n, k), dtype=dtype)
    else:
        w = NF4Weight(packed, absmax_code=(2 + torch.rand(blocks, generator=g)) / k**0.5, nested_absmax=None,
                      nested_code=None, code=torch.tensor(NF4_CODE), offset=0.0, shape=(n, k), dtype=dtype)
    return w.to(device)


def _inputs(shape, n_out, r, dtype, seed=0, noncontig=False, nested=True):
    g = torch.Generator().manual_seed(seed + 1)
    k = shape[-1]
    x = torch.randn(*shape[:-1], k + 7 if noncontig else k, generator=g)[..., :k]  # slice: strided rows
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n_out, r, generator=g) / r**0.5  # never zero (peft's init) so the LoRA path is exercised
    dy = torch.randn(*shape[:-1], n_out, generator=g)
    return (x.to(DEV, dtype), _nf4_weight(n_out, k, dtype, seed, nested=nested), a.to(DEV), b.to(DEV),
            dy.to(DEV, dtype))


@pytest.fixture
def kind(monkeypatch, request):
    """Force the GEMM kind (the param; None: the table's or the rule's)."""
    if request.param is not None:
        monkeypatch.setattr(ql, "_kinds", lambda tokens: [request.param])
    return request.param


KINDS = pytest.mark.parametrize("kind", ["nf4", "nf4-cublas"], indirect=True)


def _check(shape, n_out, r, dtype, scale=2.0, p=0.0, seed=0, noncontig=False, nested=True):
    """y, dx, dA, dB of qlora_linear (triton) against lora_linear_reference on W rounded to dtype and in fp64."""
    x, w4, a, b, dy = _inputs(shape, n_out, r, dtype, seed, noncontig, nested)
    mask = dropout_mask(1234, x.shape, p, DEV) if p > 0 else None
    got = _run(lambda *t: qlora_linear(*t, scale, p, backend="triton", seed=1234), x, w4, a, b, dy)
    ref = _run(lambda *t: lora_linear_reference(*t, scale, mask), x, dequantize_reference(w4, dtype), a, b, dy)
    f64 = lambda t: t.double()
    m64 = None if mask is None else mask.double()
    exact = _run(lambda *t: lora_linear_reference(*t, scale, m64), f64(x), dequantize_reference(w4, torch.float64),
                 f64(a), f64(b), f64(dy))
    _assert_close(got, ref, exact, dtype)


def _y_dx(fn, x, w, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return [y.detach(), x.grad]


def _check_nf4_linear(shape, n_out, dtype, seed=0):
    """y = x W^T and dx = dy W of nf4_linear (triton) against torch on W rounded to dtype and in fp64."""
    x, w4, _, _, dy = _inputs(shape, n_out, 1, dtype, seed)
    got = _y_dx(lambda x_, w: nf4_linear(x_, w, backend="triton"), x, w4, dy)
    ref = _y_dx(lambda x_, w: x_ @ w.t(), x, dequantize_reference(w4, dtype), dy)
    exact = _y_dx(lambda x_, w: x_ @ w.t(), x.double(), dequantize_reference(w4, torch.float64), dy.double())
    _assert_close(got, ref, exact, dtype)


# ------------------------------------------------------------------------------ CPU (interpreter) + GPU
@needs_triton
@pytest.mark.parametrize("shape", [(3, 7), (53, 45), (72, 128), (5, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernel_is_bit_exact(shape, dtype):
    """Odd N K (the last byte holds one value, the last block is partial), blocks straddling rows, several nested
    blocks (5 x 4099 values: 321 absmax, 2 nested absmax)."""
    w = _nf4_weight(*shape, torch.float32, seed=sum(shape))
    got = ql.dequantize(w, dtype)
    assert got.dtype == dtype and got.shape == shape and torch.equal(got, dequantize_reference(w, dtype))
    assert torch.equal(ql.dequantize(w), dequantize_reference(w))  # W's own dtype by default


@needs_triton
@pytest.mark.parametrize("shape", [(3, 7), (5, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernel_without_nested_absmax(shape, dtype):
    w = _nf4_weight(*shape, torch.float32, seed=sum(shape), nested=False)
    assert torch.equal(ql.dequantize(w, dtype), dequantize_reference(w, dtype))


@needs_triton
@KINDS
@pytest.mark.parametrize("k", [128, 45])
def test_without_nested_absmax(kind, k):
    """A checkpoint saved with compress_statistics=False: the fp32 absmax as it is."""
    _check((37, k), 53, 8, torch.float16, scale=1.2, p=0.1, nested=False)


@needs_triton
@KINDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [1, 16, 64])
def test_odd_shapes_any_in_features(kind, dtype, r):
    """in = 45: 64-blocks straddle rows (the per-element tile); out = 53, 37 tokens: off every block size."""
    _check((37, 45), 53, r, dtype, scale=1.7, seed=r)


@needs_triton
@KINDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [1, 16])
def test_odd_shapes_whole_blocks(kind, dtype, r):
    """in = 128: whole 64-blocks per row (the (rows, blocks, 32 bytes) tile); out = 53 and 37 tokens still odd."""
    _check((37, 128), 53, r, dtype, scale=0.8, seed=r)


@needs_triton
@KINDS
@pytest.mark.parametrize("k", [256, 333])
def test_several_nested_blocks(kind, k):
    """72 x 256 and 72 x 333 values: more than 256 absmax, so two nested absmax, in both tile layouts."""
    _check((21, k), 72, 8, torch.float32, scale=0.9, p=0.1, seed=k)


@needs_triton
@pytest.mark.parametrize("k,n", [(192, 53), (45, 53)])
def test_partial_k_step(monkeypatch, k, n):
    """BLOCK_K = BLOCK_N = 128 over in = 192: the last K step (forward) and the last column tile (dx) are half
    past W's rows, whose blocks are clamped in the whole-block tile, and columns in the per-element one."""
    monkeypatch.setitem(choices.SMALL, "nf4", {**choices.SMALL["nf4"], "BLOCK_N": 128, "BLOCK_K": 128})
    _check((37, k), n, 8, torch.float32, scale=1.1, p=0.2, seed=k)


@needs_triton
@KINDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [64, 45])
def test_dropout_matches_mask(kind, dtype, k):
    _check((2, 21, k), 35, 16, dtype, scale=2.0, p=0.25, seed=3)


@needs_triton
@KINDS
@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("k", [128, 45])
def test_decode_tokens(kind, tokens, k):
    """Up to 16 tokens: the decode configs (BLOCK_M = 16), one row tile."""
    _check((1, tokens, k), 53, 8, torch.float16, scale=1.5, p=0.1, seed=tokens)


@needs_triton
@KINDS
@pytest.mark.parametrize("k", [128, 45])
def test_strided_input(kind, k):
    _check((2, 19, k), 33, 8, torch.float32, scale=0.5, noncontig=True, seed=7)


@needs_triton
@KINDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,n_out", [((37, 45), 53), ((3, 128), 72)])
def test_nf4_linear(kind, dtype, shape, n_out):
    """x W^T without LoRA (rank 0: no low-rank epilogue) and dx = dy W."""
    _check_nf4_linear(shape, n_out, dtype)


@needs_triton
def test_the_rule_and_the_decode_configs(monkeypatch):
    """The rule: in-loop dequant up to FUSED_MAX_TOKENS tokens, then dequant once + cuBLAS; up to DECODE_TOKENS
    tokens the fused GEMM runs with the decode configs."""
    assert ql._kinds(ql.FUSED_MAX_TOKENS) == ["nf4", "nf4-cublas"]
    assert ql._kinds(ql.FUSED_MAX_TOKENS + 1) == ["nf4-cublas", "nf4"]
    block_m, real_run = [], launch.run
    monkeypatch.setattr(launch, "run", lambda fn, grid, args, meta: (
        block_m.append(meta["BLOCK_M"]) if fn.__name__ == "_nf4_gemm_kernel" else None) or real_run(fn, grid, args, meta))
    x, w4, a, b, _ = _inputs((ql.DECODE_TOKENS, 64), 40, 4, torch.float32)
    qlora_linear(x, w4, a, b, 1.0, backend="triton")
    qlora_linear(torch.cat([x, x]), w4, a, b, 1.0, backend="triton")
    assert block_m == [choices.SMALL["nf4-decode"]["BLOCK_M"], choices.SMALL["nf4"]["BLOCK_M"]]


@needs_triton
def test_eval_and_p0_disable_dropout():
    x, w4, a, b, _ = _inputs((20, 64), 24, 4, torch.float32)
    y0 = qlora_linear(x, w4, a, b, 2.0, 0.0, backend="triton")
    y_eval = qlora_linear(x, w4, a, b, 2.0, 0.5, training=False, backend="triton")
    y_train = qlora_linear(x, w4, a, b, 2.0, 0.5, training=True, backend="triton", seed=1)
    assert torch.equal(y0, y_eval) and not torch.allclose(y0, y_train)


@needs_triton
def test_poison_shows_an_unwritten_element(monkeypatch):
    """The checks' premise: with one program of the dequantize grid dropped, its values stay NaN."""
    real_run = launch.run
    monkeypatch.setattr(launch, "run", lambda fn, grid, args, meta: real_run(fn, (grid[0] - 1,), args, meta))
    w = ql.dequantize(_nf4_weight(64, 64, torch.float32), torch.float32)  # 64 blocks: two programs or more
    assert torch.isnan(w).any() and torch.isfinite(w[0]).all()


@needs_triton
@KINDS
def test_no_weight_sized_tensor_saved(kind):
    """Backward keeps x, A, B and S (+ the NF4Weight it already had); the fused kind never even allocates an (out, in)
    tensor (the cuBLAS kind's dense W is a temporary of each call: test_cuda_no_weight_sized_tensor_kept)."""
    x, w4, a, b, dy = _inputs((3, 10, 64), 24, 4, torch.float32)
    x.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    with _RecordShapes() as rec:
        y = qlora_linear(x, w4, a, b, 2.0, 0.1, backend="triton", seed=5)
        saved = [tuple(t.shape) for t in y.grad_fn.saved_tensors]
        y.backward(dy)
    assert saved == [(3, 10, 64), (4, 64), (24, 4), (30, 4)]
    assert kind == "nf4-cublas" or [r for r in rec.shapes if r[1] in [(24, 64), (64, 24)]] == []


def test_torch_backend_is_the_reference_on_cpu():
    x, w4, a, b, _ = _inputs((2, 5, 70), 12, 4, torch.float32)
    x, w4, a, b = x.cpu(), w4.to("cpu"), a.cpu(), b.cpu()
    w = dequantize_reference(w4, torch.float32)
    assert torch.equal(qlora_linear(x, w4, a, b, 2.0), lora_linear_reference(x, w, a, b, 2.0))
    assert torch.equal(nf4_linear(x, w4), x @ w.t())


def test_bitsandbytes_dequantizes_the_same_bits():
    """A W quantized by bitsandbytes (CPU): its quant state as an NF4Weight, dequantized by the kernel (where Triton
    runs) and by the spec, equals bitsandbytes' own dequantize_4bit."""
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    w = torch.randn(40, 100, generator=torch.Generator().manual_seed(0))
    q, st = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    w4 = NF4Weight(q.flatten(), st.absmax, st.state2.absmax, st.state2.code, st.code, float(st.offset), (40, 100),
                   torch.float32)
    expected = bnb.dequantize_4bit(q, st)
    assert torch.equal(dequantize_reference(w4), expected)
    if CUDA or launch.INTERPRET:
        assert torch.equal(ql.dequantize(w4.to(DEV)).cpu(), expected)


# ------------------------------------------------------------------------------------------- GPU only
PHI = sorted({(3072, 9216), (3072, 3072), (3072, 16384), (8192, 3072),  # Phi-3-mini: qkv, o, gate_up, down
              (5120, 7680), (5120, 35840), (17920, 5120),  # Phi-3-medium: qkv, gate_up, down (o: 5120 -> 5120)
              (5120, 7168)})  # Phi-4: qkv (gate_up and down as Phi-3-medium's)


@cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["nf4", "nf4-cublas", None], indirect=True)
@pytest.mark.parametrize("k,n", PHI)
def test_cuda_phi_bf16(kind, k, n):
    _check((2, 1024, k), n, 16, torch.bfloat16, scale=2.0)


@cuda
@needs_cuda
@KINDS
@pytest.mark.parametrize("r", [1, 64, 256])
@pytest.mark.parametrize("k", [3072, 3000])
def test_cuda_ranks_bf16(kind, r, k):
    """in = 3072 (whole blocks) and 3000 (blocks straddle rows)."""
    _check((1000, k), 2500, r, torch.bfloat16, scale=0.5, seed=r)


@cuda
@needs_cuda
@KINDS
def test_cuda_dropout_bf16(kind):
    _check((4096, 3072), 3072, 16, torch.bfloat16, scale=2.0, p=0.1)


@cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["nf4", "nf4-cublas", None], indirect=True)
@pytest.mark.parametrize("tokens", [1, 7, 16, 200])
@pytest.mark.parametrize("k,n", [(3072, 9216), (8192, 3072), (5120, 35840)])
def test_cuda_decode_and_few_tokens_bf16(kind, tokens, k, n):
    _check((1, tokens, k), n, 16, torch.bfloat16, scale=2.0, seed=tokens)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1024, 1000])
def test_cuda_other_dtypes(dtype, k):
    _check((2, 777, k), 1500, 16, dtype, scale=2.0, noncontig=True)


@cuda
@needs_cuda
@pytest.mark.parametrize("shape", [(9216, 3072), (5120, 17920), (1001, 999)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
def test_cuda_dequantize_bit_exact(shape, dtype, nested):
    w = _nf4_weight(*shape, dtype, nested=nested)
    assert torch.equal(ql.dequantize(w), dequantize_reference(w))


@cuda
@needs_cuda
@KINDS
@pytest.mark.parametrize("k", [3072, 3000])
def test_cuda_without_nested_absmax_bf16(kind, k):
    _check((2, 1024, k), 9216, 16, torch.bfloat16, scale=2.0, p=0.1, nested=False)


@cuda
@needs_cuda
@KINDS
@pytest.mark.parametrize("tokens", [1, 2048])
def test_cuda_nf4_linear_bf16(kind, tokens):
    _check_nf4_linear((tokens, 3072), 9216, torch.bfloat16)


@cuda
@needs_cuda
@KINDS
def test_cuda_no_weight_sized_tensor_kept(kind):
    """Between forward and backward only S (2048 x 16 fp32) is added to what is allocated: no dense W (48 MiB); the
    fused kind allocates no (out, in) tensor at all."""
    x, w4, a, b, dy = _inputs((2048, 3072), 8192, 16, torch.bfloat16)
    x.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    with _RecordShapes() as rec:
        qlora_linear(x, w4, a, b, 2.0, 0.1).backward(dy)  # compiles, and makes the launch buffers, first
        before = torch.cuda.memory_allocated()
        y = qlora_linear(x, w4, a, b, 2.0, 0.1)
        kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
        y.backward(dy)
    assert kept <= 2048 * 16 * 4, kept
    assert kind == "nf4-cublas" or [r for r in rec.shapes if r[1] in [(8192, 3072), (3072, 8192)]] == []


@cuda
@needs_cuda
@pytest.mark.parametrize("kernel,option", [(k, o) for k in ("nf4", "nf4-decode", "nf4-dequantize")
                                           for o in choices.CONFIGS[k]])
def test_cuda_every_nf4_config(kernel, option):
    """Each config a table may name, forced for its kernel (others: the rule's) at gate_up, bf16, dropout 0.1: 1000
    tokens for the GEMM configs through the fused kind, 8 for the decode ones, the cuBLAS kind for the dequantize."""
    kind = "nf4-cublas" if kernel == "nf4-dequantize" else "nf4"
    used = []

    def timer(key, options, run):
        used.append(key)
        return option if option in options else kind if kind in options else options[0]
    choices.set_timer(timer)
    try:
        _check((8 if kernel == "nf4-decode" else 1000, 3072), 16384, 16, torch.bfloat16, p=0.1, seed=2)
    finally:
        choices.set_timer(None)
    assert any(key.split()[0].endswith("." + kernel) for key in used), used


@cuda
@needs_cuda
@KINDS
def test_cuda_offsets_past_int32(kind):
    """gate_up with 2^31 / 16384 + 300 tokens: y's last rows lie past int32 offsets. y and dx on the first and last
    rows against fp64 (and the torch error at bf16, as in _check); every element of y and dx written."""
    k, n, r, scale = 3072, 16384, 16, 2.0
    m = 2**31 // n + 300
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w4 = _nf4_weight(n, k, torch.bfloat16)
    a = torch.randn(r, k, generator=g, device="cuda") / k**0.5
    b = torch.randn(n, r, generator=g, device="cuda") / r**0.5
    dy = torch.randn(m, n, generator=g, device="cuda", dtype=torch.bfloat16)
    y = qlora_linear(x, w4, a, b, scale)
    y.backward(dy)
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), "rows left unwritten"
    rows = torch.cat([torch.arange(64), torch.arange(m - 400, m)]).cuda()
    w = dequantize_reference(w4, torch.bfloat16)
    ref = [x[rows].detach() @ w.t() + scale * (x[rows].detach() @ a.bfloat16().t()) @ b.bfloat16().t(),
           dy[rows] @ w + (scale * dy[rows] @ b.bfloat16()) @ a.bfloat16()]
    w64, a64, b64, x64, dy64 = (dequantize_reference(w4, torch.float64), a.double(), b.double(),
                                x[rows].detach().double(), dy[rows].double())
    exact = [x64 @ w64.t() + scale * (x64 @ a64.t()) @ b64.t(), dy64 @ w64 + (scale * dy64 @ b64) @ a64]
    _assert_close([y[rows].detach(), x.grad[rows]], ref, exact, torch.bfloat16)
