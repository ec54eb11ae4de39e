"""RoPE on q and k straight from qkv (kernels/rope.py) against a float64 reference and against torch's own rounding.

CPU: the Triton path runs under TRITON_INTERPRET=1 (fp32 and fp16, small odd shapes, GQA, hd 8 and 96). GPU
(`pytest -m cuda`): bf16 at Phi-3-mini (B 4, T 2048, 32 heads, hd 96) and Phi-3-medium-like (40 heads, 10 KV
heads, hd 128) shapes. cos/sin come from the model's own RotaryEmbedding (LongRoPE factors and attention factor,
positions that restart per packed document, and rows at the end of a 128k context), or are independent random
tables (cos's two halves differ: the backward must be the exact transpose, not only a rotation by -sin).
Tolerance (flash-attention's rule, DESIGN.md section 4): max|kernel - fp64| <= 2 * max|torch - fp64| + eps(dtype) *
max|fp64|. On top, every output and gradient must equal torch's at the same dtype bit for bit: the kernel rounds
each product and sum where torch does (that is the model's semantics, and what keeps a checkpoint's behaviour).
"""

import pytest
import torch

from conftest import CUDA, DEV, cuda, needs_cuda, needs_triton
from phi3.ops import rope_qk, rope_qk_reference
from phi3.config import Phi3Config
from phi3.model import RotaryEmbedding

NAMES = ["q", "k", "v", "d_qkv"]


pytestmark = pytest.mark.usefixtures("poison_outputs")


def _tables(B, T, n_head, n_kv_head, hd, dtype, kind, g, rot=None):
    """cos, sin (B, T, rot) in dtype (rot: the rotary dims, hd by default; fewer is partial rotary, Phi-4-mini's). "longrope": the model's RotaryEmbedding with Phi-3-128k-style factors, row b's
    positions restarting every 4 + 3b tokens (packed documents), the last row 130,000 positions in (long factors,
    angles of 10^5 radians, attention factor 1.19). "random": independent normal tables."""
    rot = rot or hd
    if kind == "random":
        return [torch.randn(B, T, rot, generator=g).to(DEV, dtype) for _ in range(2)]
    half = rot // 2
    config = Phi3Config(hidden_size=n_head * hd, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                        partial_rotary_factor=rot / hd,
                        max_position_embeddings=131072, original_max_position_embeddings=4096, rope_type="longrope",
                        rope_short_factor=tuple(1 + 0.05 * i for i in range(half)),
                        rope_long_factor=tuple(1 + 1.5 * i for i in range(half)))
    pos = torch.stack([torch.arange(T) % (4 + 3 * b) + (130_000 if b == B - 1 else 0) for b in range(B)])
    return RotaryEmbedding(config)(pos.to(DEV), dtype)


def _inputs(B, T, n_head, n_kv_head, hd, dtype, tables="longrope", seed=0, qkv_pad=0, heads_major_douts=True,
            rot=None):
    """[qkv, cos, sin], [dq, dk, dv]. qkv_pad > 0: qkv is a slice of rows wider by qkv_pad (a strided row).
    heads_major_douts: gradients contiguous as (B, heads, T, hd), else as (B, T, heads, hd) transposed views."""
    g = torch.Generator().manual_seed(seed)
    W = (n_head + 2 * n_kv_head) * hd
    qkv = (torch.randn(B, T, W + qkv_pad, generator=g) * 3).to(DEV, dtype)[..., :W].requires_grad_()
    cos, sin = _tables(B, T, n_head, n_kv_head, hd, dtype, tables, g, rot)

    def dout(n):
        t = torch.randn(B, n, T, hd, generator=g) if heads_major_douts else torch.randn(B, T, n, hd, generator=g)
        return t.to(DEV, dtype) if heads_major_douts else t.to(DEV, dtype).transpose(1, 2)
    return [qkv, cos, sin], [dout(n_head), dout(n_kv_head), dout(n_kv_head)]


def _grads(fn, inputs, douts):
    """[outputs..., d(qkv)] of fn(*inputs) with douts fed back (only qkv requires grad). Strided inputs are used as
    they are (clone would make them contiguous)."""
    fresh = lambda t: t.detach().clone() if t.is_contiguous() else t.detach()
    inputs = [fresh(t).requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*inputs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, inputs[0], douts))


def _assert_close(got, ref, exact):
    """got (kernel), ref (torch at the same dtypes), exact (fp64): the fp64 tolerance rule, then torch's bits."""
    for name, k, t, e in zip(NAMES, got, ref, exact, strict=True):
        assert k.dtype == t.dtype and k.shape == e.shape, name
        assert torch.isfinite(k).all(), f"{name}: non-finite values (unwritten output?)"
        err, torch_err = (k.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        slack = torch.finfo(k.dtype).eps * e.abs().max().item()
        assert err <= 2 * torch_err + slack, f"{name}: err {err:.3g} > 2 * torch {torch_err:.3g} + {slack:.3g}"
        assert torch.equal(k, t), f"{name}: {(k != t).sum().item()} of {k.numel()} values differ from torch's"


def _check(B, T, n_head, n_kv_head, hd, dtype, **kw):
    inputs, douts = _inputs(B, T, n_head, n_kv_head, hd, dtype, **kw)
    sizes = (n_head, n_kv_head, hd)
    got = _grads(lambda *a: rope_qk(*a, *sizes, backend="triton"), inputs, douts)
    ref = _grads(lambda *a: rope_qk_reference(*a, *sizes), inputs, douts)
    f64 = lambda t: t.detach().double().requires_grad_(t.requires_grad)
    exact = _grads(lambda *a: rope_qk_reference(*a, *sizes), [f64(t) for t in inputs], [t.double() for t in douts])
    _assert_close(got, ref, exact)
    return got, ref


# ----------------------------------------------------------------------------------------------- CPU (interpreter)
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (3, 33)])
@pytest.mark.parametrize("hd", [8, 96])
@pytest.mark.parametrize("n_head,n_kv_head", [(3, 1), (3, 3)])  # GQA with one KV head; as many KV heads as q heads
def test_rope_odd_shapes(dtype, B, T, hd, n_head, n_kv_head):
    _check(B, T, n_head, n_kv_head, hd, dtype, seed=B * T + hd)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hd,rot,tables", [(16, 12, "longrope"), (16, 12, "random"), (8, 2, "random"),
                                           (128, 96, "longrope"), (10, 4, "random")])
def test_rope_partial_rotary(dtype, hd, rot, tables):
    """Partial rotary (Phi-4-mini: 96 of 128 dims turn, the other 32 pass through), pass-through widths that are and
    are not powers of two, GQA: both ways bit for bit with torch, within the fp64 rule."""
    _check(2, 7, 3, 1, hd, dtype, tables=tables, rot=rot, seed=hd + rot)


@needs_triton
@pytest.mark.parametrize("rot", [16, 12])
def test_rope_matches_transformers_phi3_bit_for_bit(rot):
    """The oracle of DESIGN.md section 4: transformers' modeling_phi3.apply_rotary_pos_emb on the q/k split of qkv
    (fp16, GQA, LongRoPE tables of packed positions, whole and partial rotary), forward and the qkv gradient, equal
    bit for bit."""
    hf = pytest.importorskip("transformers.models.phi3.modeling_phi3",
                             reason="transformers is the reference oracle; pip install transformers")
    B, T, nh, nkv, hd = 2, 9, 4, 2, 16
    inputs, douts = _inputs(B, T, nh, nkv, hd, torch.float16, seed=10, rot=rot)

    def reference(qkv, cos, sin):
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
        q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))
        return (*hf.apply_rotary_pos_emb(q, k, cos, sin), v)
    got = _grads(lambda *a: rope_qk(*a, nh, nkv, hd, backend="triton"), inputs, douts)
    for name, a, b in zip(NAMES, got, _grads(reference, inputs, douts), strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b), name


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_random_tables_exact_transpose(dtype):
    """cos/sin with unequal halves: the forward uses each half where rotate_half puts it and the backward is the
    transpose, not merely a rotation by -sin (equal on the model's tables, not here)."""
    _check(2, 7, 5, 1, 16, dtype, tables="random", seed=1)


@needs_triton
def test_rope_strided_qkv_and_gradient_layouts():
    """qkv rows wider than (nh + 2 nkv) hd (a slice) and gradients arriving as (B, T, heads, hd) transposed views,
    the layout SDPA's flash backward returns."""
    _check(2, 7, 4, 2, 24, torch.float16, qkv_pad=5, heads_major_douts=False, seed=2)


@needs_triton
@pytest.mark.parametrize("layout", ["batch-broadcast", "strided-rows", "mixed"])
def test_rope_table_layouts(layout):
    """Tables as a caller may hold them: (1, T, hd) shared by the batch (a stride-0 batch dim after expand), rows
    sliced from wider buffers (row strides > hd), or one of each (then both are copied to one layout)."""
    g = torch.Generator().manual_seed(3)
    B, T, nh, nkv, hd = 3, 5, 2, 1, 8
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hd, generator=g).to(DEV).requires_grad_()
    shared = lambda: torch.randn(1, T, hd, generator=g).to(DEV)
    sliced = lambda: torch.randn(B, T, hd + 3, generator=g).to(DEV)[..., :hd]
    cos, sin = {"batch-broadcast": (shared(), shared()), "strided-rows": (sliced(), sliced()),
                "mixed": (shared(), sliced())}[layout]
    douts = [torch.randn(B, n, T, hd, generator=g).to(DEV) for n in (nh, nkv, nkv)]
    got = _grads(lambda *a: rope_qk(*a, nh, nkv, hd, backend="triton"), [qkv, cos, sin], douts)
    ref = _grads(lambda *a: rope_qk_reference(*a, nh, nkv, hd), [qkv, cos, sin], douts)
    for name, a, b in zip(NAMES, got, ref, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b), name


@needs_triton
def test_rope_mixed_dtypes_follow_promotion():
    """--full under autocast: a 16-bit qkv with the fp32 tables of an fp32 model. As torch: q and k come out fp32
    (promotion), d(qkv) is fp16 (each product's gradient cast to qkv's dtype before the sum)."""
    inputs, douts = _inputs(2, 7, 3, 1, 8, torch.float16, seed=4)
    inputs[1:] = [t.float() for t in inputs[1:]]
    douts[:2] = [t.float() for t in douts[:2]]
    got = _grads(lambda *a: rope_qk(*a, 3, 1, 8, backend="triton"), inputs, douts)
    ref = _grads(lambda *a: rope_qk_reference(*a, 3, 1, 8), inputs, douts)
    f64 = lambda t: t.detach().double().requires_grad_(t.requires_grad)
    exact = _grads(lambda *a: rope_qk_reference(*a, 3, 1, 8), [f64(t) for t in inputs], [t.double() for t in douts])
    assert [t.dtype for t in got] == [torch.float32, torch.float32, torch.float16, torch.float16]
    _assert_close(got, ref, exact)


@needs_triton
@pytest.mark.parametrize("used", [(0, 1), (0,), (2,)])
def test_rope_unused_outputs(used):
    """Outputs that take no part in the loss (v in a q/k-only loss, k, or everything but v) give zero gradients in
    their columns of d(qkv), as the reference's split does."""
    inputs, douts = _inputs(2, 7, 3, 1, 8, torch.float32, seed=5)
    pick = lambda fn: lambda *a: [fn(*a)[i] for i in used]
    got = _grads(pick(lambda *a: rope_qk(*a, 3, 1, 8, backend="triton")), inputs, [douts[i] for i in used])
    ref = _grads(pick(lambda *a: rope_qk_reference(*a, 3, 1, 8)), inputs, [douts[i] for i in used])
    assert torch.isfinite(got[-1]).all() and torch.equal(got[-1], ref[-1])


@needs_triton
def test_rope_saves_only_cos_and_sin():
    """The backward needs no activation: the tensors kept for it are the model's own cos and sin (views, no copy)."""
    inputs, douts = _inputs(2, 7, 3, 1, 8, torch.float32, seed=6)
    qkv, cos, sin = inputs
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = rope_qk(qkv, cos, sin, 3, 1, 8, backend="triton")
    assert [t.data_ptr() for t in saved] == [cos.data_ptr(), sin.data_ptr()]
    torch.autograd.backward(outs, douts)
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


@needs_triton
def test_rope_layout_is_torchs():
    """q and k are (B, T, heads, hd) buffers seen as (B, heads, T, hd): the strides the reference's elementwise ops
    give (so SDPA sees what the unfused model gave it); v is a view of qkv, not a copy."""
    (qkv, cos, sin), _ = _inputs(2, 7, 4, 2, 8, torch.float32, seed=7)
    got, ref = rope_qk(qkv, cos, sin, 4, 2, 8, backend="triton"), rope_qk_reference(qkv, cos, sin, 4, 2, 8)
    for name, a, b in zip("qkv", got, ref):
        assert a.shape == b.shape and a.stride() == b.stride(), name
    assert got[2].data_ptr() == qkv[..., 48:].data_ptr() and got[2]._base is not None


@needs_triton
@pytest.mark.parametrize("B,T", [(0, 4), (2, 0)])
def test_rope_empty_batch(B, T):
    (qkv, cos, sin), douts = _inputs(B, T, 3, 1, 8, torch.float32, tables="random")
    q, k, v = rope_qk(qkv, cos, sin, 3, 1, 8, backend="triton")
    assert q.shape == (B, 3, T, 8) and k.shape == v.shape == (B, 1, T, 8)
    (dqkv,) = torch.autograd.grad([q, k, v], qkv, douts)
    assert dqkv.shape == qkv.shape


def test_rope_cpu_default_is_the_reference():
    (qkv, cos, sin), _ = _inputs(2, 5, 3, 1, 8, torch.float32)
    qkv, cos, sin = qkv.cpu(), cos.cpu(), sin.cpu()
    for a, b in zip(rope_qk(qkv, cos, sin, 3, 1, 8), rope_qk_reference(qkv, cos, sin, 3, 1, 8), strict=True):
        assert torch.equal(a, b)


@needs_triton
def test_rope_tables_that_need_gradients_take_the_torch_path():
    """The kernels give cos and sin no gradient; tables that require one (not the model's) get torch's."""
    (qkv, cos, sin), douts = _inputs(2, 5, 3, 1, 8, torch.float32, tables="random")
    cos.requires_grad_()
    torch.autograd.backward(rope_qk(qkv, cos, sin, 3, 1, 8, backend="triton"), douts)
    assert cos.grad is not None and torch.isfinite(cos.grad).all() and cos.grad.abs().sum() > 0


@pytest.mark.parametrize("qkv_shape,cos_shape,sizes,cos_dtype", [
    ((2, 5, 40), (2, 5, 8), (3, 1, 7), None),          # odd head_dim: no halves to rotate
    ((2, 5, 41), (2, 5, 8), (3, 1, 8), None),          # qkv width is not (nh + 2 nkv) hd
    ((10, 40), (2, 5, 8), (3, 1, 8), None),            # qkv without a batch dim
    ((2, 5, 40), (2, 5, 16), (3, 1, 8), None),         # tables of another head_dim
    ((2, 5, 40), (5, 8), (3, 1, 8), None),             # tables without a batch dim (would broadcast wrongly)
    ((2, 5, 40), (3, 5, 8), (3, 1, 8), None),          # tables of another batch
    ((2, 5, 40), (2, 5, 8), (3, 1, 8), torch.float16),  # sin and cos in different dtypes
    ((2, 5, 40), (2, 5, 8), (0, 0, 8), None),          # no heads
    ((2, 5, 40), (2, 5, 8), (3.0, 1, 8), None),        # a float head count
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rope_rejects_bad_arguments(qkv_shape, cos_shape, sizes, cos_dtype, backend):
    cos = torch.randn(cos_shape)
    sin = torch.randn(cos_shape, dtype=cos_dtype or torch.float32)
    with pytest.raises(ValueError, match="rope_qk"):
        rope_qk(torch.randn(qkv_shape), cos, sin, *sizes, backend=backend)


# ----------------------------------------------------------------------------------------------- GPU
@cuda
@needs_cuda
@pytest.mark.parametrize("n_head,n_kv_head,hd", [(32, 32, 96), (40, 10, 128)])  # Phi-3-mini; Phi-3-medium (GQA)
@pytest.mark.parametrize("tables", ["longrope", "random"])
def test_cuda_rope_phi3_bf16(n_head, n_kv_head, hd, tables):
    _check(4, 2048, n_head, n_kv_head, hd, torch.bfloat16, tables=tables, seed=8, heads_major_douts=False)


@cuda
@needs_cuda
@pytest.mark.parametrize("tables", ["longrope", "random"])
def test_cuda_rope_phi4_mini_bf16(tables):
    """Phi-4-mini: 24 query / 8 key-value heads of 128, rotary on the first 96 dims."""
    _check(4, 2048, 24, 8, 128, torch.bfloat16, tables=tables, seed=10, heads_major_douts=False, rot=96)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_rope_fp32_fp16(dtype):
    """fp32 bit for bit needs the launch's enable_fp_fusion=False (an FMA would skip the product's rounding)."""
    _check(2, 333, 40, 10, 128, dtype, seed=9)
