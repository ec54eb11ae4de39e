"""phi3/attention.py: the visibility rule (causal, sliding window, packed documents) and flash attention against it.

CPU: the sequences the flash path hands to its kernels (cu_seqlens) describe exactly the SDPA mask, for random
packed batches; the CPU picks SDPA. GPU (`pytest -m cuda`): flash attention at Phi-3-mini (32/32 heads, hd 96) and
-medium (40/10, hd 128) shapes in bf16 against float64, output and the gradients of q, k and v, with packing and a
window that binds; the model's logits and LoRA gradients through flash equal those through SDPA within the same rule.
Tolerance (flash-attention's rule, as tests/test_fused_ops.py): max|flash - fp64| <= 2 * max|SDPA - fp64| + slack,
SDPA run with the same bf16 inputs and the dense mask, slack = eps(bf16) * max|fp64| (one rounding).
"""
import random

import pytest
import torch

from phi3.attention import Visibility, attend, attention_mask, flash_supported, sequence_starts

CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU (run `pytest -m cuda` on the device machine)")


def packed_documents(batch: int, length: int, rng: random.Random) -> torch.Tensor:
    """document_ids as phi3/data.py packs them: per row 0, 0, 1, 1, 1, ... then -1 on the padding (maybe none)."""
    rows = []
    for _ in range(batch):
        row, doc = [], 0
        while len(row) < length and rng.random() < 0.85:
            row += [doc] * rng.randint(1, max(1, length // 3))
            doc += 1
        row = row[:length]
        rows.append(row + [-1] * (length - len(row)))
    return torch.tensor(rows)


def mask_of_sequences(cu_seqlens: torch.Tensor, window: int | None) -> torch.Tensor:
    """The (N, N) visibility of the flattened tokens that flash computes from cu_seqlens and its left window."""
    n = int(cu_seqlens[-1])
    seq = torch.zeros(n, dtype=torch.long)
    seq[cu_seqlens[1:-1].long()] = 1
    seq = seq.cumsum(0)
    pos = torch.arange(n)
    mask = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    return mask


def dense_mask(batch: int, length: int, window: int | None, document_ids) -> torch.Tensor:
    """attention_mask (the SDPA path's rule) as the same (N, N) matrix: block-diagonal over the rows."""
    mask = attention_mask(length, 0, window, document_ids, "cpu")
    if isinstance(mask, str):
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    full = torch.zeros(batch * length, batch * length, dtype=torch.bool)
    for b in range(batch):
        full[b * length:(b + 1) * length, b * length:(b + 1) * length] = mask[min(b, mask.shape[0] - 1), 0]
    return full


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("window", [None, 1, 5, 40])
def test_flash_sequences_are_the_sdpa_mask(seed, window):
    rng = random.Random(seed)
    batch, length = rng.randint(1, 4), rng.randint(1, 60)
    for document_ids in (None, packed_documents(batch, length, rng)):
        cu_seqlens, max_len = sequence_starts(batch, length, document_ids)
        assert cu_seqlens.dtype == torch.int32 and cu_seqlens[0] == 0 and cu_seqlens[-1] == batch * length
        assert (cu_seqlens[1:] > cu_seqlens[:-1]).all(), "empty sequences"
        assert max_len == int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        assert torch.equal(mask_of_sequences(cu_seqlens, window), dense_mask(batch, length, window, document_ids))


def test_rows_that_continue_a_document_id_are_still_separate():
    # row 0 is one document (id 0, no padding), row 1 starts with id 0 too: two sequences, not one
    cu_seqlens, max_len = sequence_starts(2, 3, torch.tensor([[0, 0, 0], [0, 0, 1]]))
    assert cu_seqlens.tolist() == [0, 3, 5, 6] and max_len == 3


def test_the_cpu_takes_sdpa():
    assert not flash_supported(torch.bfloat16, torch.device("cpu"), 96)
    seen = Visibility.of(2, 8, 0, 4, None, torch.bfloat16, torch.device("cpu"), 96)
    assert seen.backend == "sdpa" and seen.mask.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("q_len, offset, window, packed, backend", [
    (16384, 0, None, False, "cudnn"),   # the 128k models at length: no window (grouped heads or not)
    (16384, 0, 2047, False, "flash"),   # the 4k models' window binds
    (16384, 0, None, True, "flash"),    # packed documents
    (2048, 0, None, False, "flash"),    # shorter rows: flash attention is faster there
    (1, 30, None, False, "sdpa"),       # decoding with a KV cache
])
@pytest.mark.parametrize("cached", [False, True])
def test_the_gpu_backend_follows_the_pattern(monkeypatch, q_len, offset, window, packed, backend, cached):
    import phi3.attention
    monkeypatch.setattr(phi3.attention, "flash_supported", lambda *args: True)  # as on a Hopper GPU in bf16
    monkeypatch.setattr(phi3.attention, "cudnn_preferred", lambda device: True)
    document_ids = torch.zeros(1, q_len, dtype=torch.long) if packed else None
    if packed:
        document_ids[:, q_len // 2:] = 1
    seen = Visibility.of(1, q_len, offset, window, document_ids, torch.bfloat16, torch.device("cpu"), 96, cached=cached)
    # a prompt's prefill into a KV cache stays on flash attention: its keys are views of the cache
    assert seen.backend == ("flash" if cached and backend == "cudnn" else backend)


@pytest.mark.parametrize("capability, cudnn", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), False)])
def test_only_hopper_prefers_cudnn(monkeypatch, capability, cudnn):
    import phi3.attention
    monkeypatch.setattr(phi3.attention, "_CUDNN_OPS", True)  # (this CPU build of torch has the ops; a CUDA build too)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert phi3.attention.cudnn_preferred(torch.device("cuda")) == cudnn
    assert not phi3.attention.cudnn_preferred(torch.device("cpu"))


def reference_attention(q, k, v, mask):
    """float64 (or any dtype) attention by its definition; q (B, nh, T, hd), k, v (B, nkv, T, hd), mask (N, N)."""
    B, nh, T, hd = q.shape
    k, v = (t.repeat_interleave(nh // t.shape[1], 1) for t in (k, v))
    tokens = lambda t: t.transpose(1, 2).reshape(B * T, nh, hd)
    scores = torch.einsum("qhd,khd->hqk", tokens(q), tokens(k)) / hd**0.5
    probs = scores.masked_fill(~mask.to(q.device), float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, tokens(v)).reshape(B, T, nh * hd)


@cuda
@needs_cuda
@pytest.mark.parametrize("heads", [(32, 32, 96), (40, 10, 128), (24, 8, 128)], ids=["mini", "medium", "phi4-mini"])
@pytest.mark.parametrize("window, packed, backend", [(1000, False, "flash"), (1000, True, "flash"),
                                                     (None, True, "flash"), (None, False, "cudnn"),
                                                     (1536, False, "cudnn")])
def test_gpu_attention_against_float64(monkeypatch, heads, window, packed, backend):
    import phi3.attention
    nh, nkv, hd = heads
    if backend == "cudnn" and not phi3.attention.cudnn_preferred(torch.device("cuda")):
        pytest.skip("cuDNN attention is chosen on Hopper GPUs only")
    batch, length = 2, 1536  # a window of 1000 binds, one of 1536 does not; documents up to 512 tokens
    # the cuDNN kernels at a length whose float64 reference fits (the rule sends only long rows there)
    monkeypatch.setattr(phi3.attention, "cudnn_from_tokens", length)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    q, k, v = rand(batch, length, nh, hd), rand(batch, length, nkv, hd), rand(batch, length, nkv, hd)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd) views, as rope_qk returns them
    grad = rand(batch, length, nh * hd)
    document_ids = packed_documents(batch, length, random.Random(1)).cuda() if packed else None
    seen = Visibility.of(batch, length, 0, window, document_ids, torch.bfloat16, q.device, hd)
    assert seen.backend == backend
    mask = dense_mask(batch, length, window, None if document_ids is None else document_ids.cpu())

    def run(fn, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        return [out.detach()] + list(torch.autograd.grad(out, inputs, grad.to(dtype)))

    got = run(lambda *t: attend(*t, seen), torch.bfloat16)
    exact = run(lambda *t: reference_attention(*t, mask), torch.float64)
    # the noise yardstick: SDPA with a bool mask (its memory-efficient kernel), a kernel other than the one tested
    bool_mask = attention_mask(length, 0, window, document_ids, "cuda")
    if isinstance(bool_mask, str):
        bool_mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None, None]
    sdpa_seen = Visibility(length, 0, window, "sdpa", mask=bool_mask)
    sdpa = run(lambda *t: attend(*t, sdpa_seen), torch.bfloat16)
    for name, g, s, e in zip(("out", "dq", "dk", "dv"), got, sdpa, exact):
        g, s = (t.reshape(e.shape) if t.shape != e.shape else t for t in (g, s))
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all(), name
        err, sdpa_err = (g.double() - e).abs().max().item(), (s.double() - e).abs().max().item()
        slack = torch.finfo(torch.bfloat16).eps * e.abs().max().item()
        assert err <= 2 * sdpa_err + slack, f"{name}: {backend} err {err:.3g} > 2 * SDPA {sdpa_err:.3g} + {slack:.3g}"
