"""The loss fused with lm_head (phi3/loss.py) and its kernel (kernels/cross_entropy.py) against float64.

The kernel: loss rows and softmax - onehot written over the logits, on fresh random logits (rows from nearly uniform
to one token near probability 1), any vocabulary size. cross_entropy_sum: with a frozen plain lm_head it computes
d hidden in the forward; loss and d hidden against the recomputing (checkpointed) path and float64, with ignored
labels, several chunks (the last partial) and an incoming gradient of 1 / tokens, as train.py divides. Any other
lm_head must still take the recomputing path and get its gradients.
CPU: the kernel under TRITON_INTERPRET=1 in fp32 and fp16, small shapes. GPU (`pytest -m cuda`): bf16 at 4096 rows,
hidden 3072 and the vocabularies of Phi-3 (32,064), Phi-4 (100,352) and Phi-4-mini (200,064).
Tolerance: tests/test_fused_ops.py's rule (DESIGN.md's): max|ours - fp64| <= 2 max|torch - fp64| + eps * max|fp64|.
"""
import pytest
import torch

import phi3.loss
from conftest import DEV, cuda, needs_cuda, needs_triton
from phi3.loss import cross_entropy_sum
from phi3.ops import cross_entropy_grad, cross_entropy_grad_reference
from test_fused_ops import _assert_close


def _logits(n, V, dtype, seed, device=DEV):
    """(n, V) logits and targets: per-row scales 0.1..10 and offsets (softmax from near uniform to peaked), and every
    third row's target raised by 12 (its probability near 1: softmax - 1 cancels)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (n,), generator=g)
    scale = 10 ** (2 * torch.rand(n, 1, generator=g) - 1)
    x = torch.randn(n, V, generator=g) * scale + 20 * torch.randn(n, 1, generator=g)
    x[torch.arange(0, n, 3), targets[::3]] += 12
    return x.to(device, dtype), targets.to(device)


def _check_kernel(n, V, dtype, seed=0, extra_columns=0):
    """The kernel's loss rows and gradient; extra_columns: its rows are the first V columns of a wider buffer (a row
    stride of their own), whose other columns it must leave alone."""
    logits, targets = _logits(n, V, dtype, seed)
    wide = torch.cat([logits, logits[:, :extra_columns]], 1)
    buffer = wide[:, :V]
    loss, grad = cross_entropy_grad(buffer, targets, backend="triton")
    assert grad.data_ptr() == buffer.data_ptr(), "the gradient is written over the logits"
    assert torch.equal(wide[:, V:], logits[:, :extra_columns]), "columns past V are not the row's"
    _assert_close(["loss", "grad"], [loss, grad], list(cross_entropy_grad_reference(logits, targets)),
                  list(cross_entropy_grad_reference(logits.double(), targets)))


# ----------------------------------------------------------------------------------------------- the kernel
@needs_triton
@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,V", [(1, 1), (3, 7), (7, 1000), (5, 1031), (2, 4095), (4, 4097), (2, 9001)])
def test_kernel_odd_vocabularies(n, V, dtype):
    """Below, at and past the 4096-column block (several blocks, the last one partial)."""
    _check_kernel(n, V, dtype, seed=n * V)


@needs_triton
@pytest.mark.usefixtures("poison_outputs")
def test_kernel_strided_rows():
    _check_kernel(6, 1031, torch.float16, seed=2, extra_columns=5)


def test_torch_path_also_writes_in_place():
    logits, targets = _logits(5, 50, torch.float32, seed=1, device="cpu")
    buffer = logits.clone()
    loss, grad = cross_entropy_grad(buffer, targets)
    ref_loss, ref_grad = cross_entropy_grad_reference(logits, targets)
    assert grad.data_ptr() == buffer.data_ptr() and torch.equal(grad, ref_grad) and torch.equal(loss, ref_loss)


@pytest.mark.parametrize("shape,targets", [((4, 9), torch.zeros(3, dtype=torch.int64)),
                                           ((4, 9), torch.zeros(4, dtype=torch.int32)),
                                           ((2, 2, 9), torch.zeros(2, dtype=torch.int64))])
def test_rejects_mismatched_inputs(shape, targets):
    with pytest.raises(ValueError, match="cross_entropy_grad"):
        cross_entropy_grad(torch.randn(shape), targets, backend="triton")


# ----------------------------------------------------------------------------------------------- cross_entropy_sum
def _head_case(T, H, V, dtype, seed, device=DEV):
    """hidden (2, T, H), labels with every 4th position ignored, a frozen bias-free lm_head whose logits have std 3."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, T, H, generator=g).to(device, dtype)
    labels = torch.randint(0, V, (2, T), generator=g)
    labels[:, ::4] = phi3.loss.IGNORE
    head = torch.nn.Linear(H, V, bias=False, device=device, dtype=dtype).requires_grad_(False)
    head.weight.copy_(torch.randn(V, H, generator=g) * 3 / H ** 0.5)
    return hidden, head, labels.to(device)


def _exact(hidden, head, labels):
    """[loss / labelled tokens, d hidden] in float64, the whole logits at once."""
    h = hidden.detach().double().requires_grad_()
    keep = labels != phi3.loss.IGNORE
    logits = h[keep] @ head.weight.detach().double().t()
    loss = torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum") / keep.sum()
    loss.backward()
    return [loss.detach(), h.grad]


def _loss_and_dh(hidden, head, labels, chunk, monkeypatch, fused):
    """[loss / labelled tokens, d hidden] with the fused path allowed or not."""
    monkeypatch.setattr(phi3.loss, "fused_linear_loss", fused)
    h = hidden.detach().clone().requires_grad_()
    loss = cross_entropy_sum(h, head, labels, chunk) / (labels != phi3.loss.IGNORE).sum()
    loss.backward()
    return [loss.detach(), h.grad]


@pytest.fixture
def kernel_calls(monkeypatch):
    """phi3/loss.py's cross_entropy_grad with the backend chosen by `kernel_calls.backend`, each call recorded."""
    calls = []

    def recorded(logits, targets):
        calls.append(logits.shape)
        return cross_entropy_grad(logits, targets, backend=recorded.backend)
    recorded.backend, recorded.calls = None, calls
    monkeypatch.setattr(phi3.loss, "cross_entropy_grad", recorded)
    return recorded


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend,dtype,V", [
    ("torch", torch.float32, 1031), ("torch", torch.float64, 1031),
    pytest.param("triton", torch.float32, 4100, marks=needs_triton)])
def test_fused_loss_matches_recompute_and_float64(backend, dtype, V, monkeypatch, kernel_calls):
    """60 labelled rows in chunks of 16 (16, 16, 16, 12)."""
    kernel_calls.backend = backend
    hidden, head, labels = _head_case(40, 48, V, dtype, seed=V)
    got = _loss_and_dh(hidden, head, labels, 16, monkeypatch, fused=True)
    assert kernel_calls.calls == [(16, V)] * 3 + [(12, V)]
    ref = _loss_and_dh(hidden, head, labels, 16, monkeypatch, fused=False)
    assert len(kernel_calls.calls) == 4, "the recompute path does not run the fused op"
    exact = _exact(hidden, head, labels)
    if dtype == torch.float64:  # fp64 against fp64: agreement to its rounding
        for name, a, b in zip(["loss", "dh"], got, exact):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=lambda m: f"{name}: {m}")
    else:
        _assert_close(["loss", "dh"], got, ref, exact)


def test_tied_embedding_weight_takes_the_fused_path(monkeypatch, kernel_calls):
    """Phi-4-mini's lm_head is its embedding's weight: frozen, it is the fused case."""
    hidden, head, labels = _head_case(8, 16, 50, torch.float32, seed=4, device="cpu")
    embedding = torch.nn.Embedding(50, 16).requires_grad_(False)
    head.weight = embedding.weight
    _loss_and_dh(hidden, head, labels, 4, monkeypatch, fused=True)
    assert len(kernel_calls.calls) == 3


class _LoRAHead(torch.nn.Module):
    """What a LoRA wrapper on lm_head is to the loss: a frozen plain Linear inside a module of another type."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.B = torch.nn.Parameter(torch.randn(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


def _trained_heads(head):
    """{case: (lm_head, the parameters that must get a gradient)} for every case the fused path must leave alone."""
    trained = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    with_bias = torch.nn.Linear(head.in_features, head.out_features).requires_grad_(False)
    with_bias.bias.requires_grad_(True)
    lora = _LoRAHead(head)
    tied = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    tied.weight = torch.nn.Embedding(head.out_features, head.in_features).weight  # a trainable embedding, tied
    return {"trained weight": (trained, [trained.weight]), "bias": (with_bias, [with_bias.bias]),
            "lora": (lora, [lora.A, lora.B]), "trained tied embedding": (tied, [tied.weight])}


@pytest.mark.parametrize("case", ["trained weight", "bias", "lora", "trained tied embedding"])
def test_other_heads_recompute_and_get_their_gradients(case, monkeypatch, kernel_calls):
    hidden, head, labels = _head_case(8, 16, 50, torch.float32, seed=5, device="cpu")
    lm_head, params = _trained_heads(head)[case]
    h = hidden.clone().requires_grad_()
    cross_entropy_sum(h, lm_head, labels, chunk=4).backward()
    assert kernel_calls.calls == [], "the fused path was taken"
    keep = labels != phi3.loss.IGNORE
    h_ref = hidden.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(lm_head(h_ref[keep]).float(), labels[keep], reduction="sum")
    grads = torch.autograd.grad(ref, [h_ref] + params)
    for got, want in zip([h.grad] + [p.grad for p in params], grads):
        torch.testing.assert_close(got, want)


def test_no_gradient_keeps_the_plain_path(monkeypatch, kernel_calls):
    """Eval (no_grad) keeps the plain path; its loss is the fused path's."""
    hidden, head, labels = _head_case(12, 16, 50, torch.float32, seed=6, device="cpu")
    with torch.no_grad():
        plain = cross_entropy_sum(hidden, head, labels, chunk=4)
    assert kernel_calls.calls == []
    fused = cross_entropy_sum(hidden.clone().requires_grad_(), head, labels, chunk=4)
    assert len(kernel_calls.calls) == 5
    torch.testing.assert_close(fused.detach(), plain)


def test_autocast_keeps_the_recompute_path(kernel_calls):
    """--full under autocast: lm_head computes in autocast's dtype, which only the module call gives."""
    hidden, head, labels = _head_case(8, 16, 50, torch.float32, seed=7, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cross_entropy_sum(hidden.clone().requires_grad_(), head, labels, chunk=4).backward()
    assert kernel_calls.calls == []


# ----------------------------------------------------------------------------------------------- GPU
PHI_HIDDEN = 3072


@cuda
@needs_cuda
@pytest.mark.parametrize("V", [32064, 100352, 200064])
def test_cuda_fused_loss_bf16(V, monkeypatch, kernel_calls):
    """4096 labelled rows (2 x 2304 tokens, every 9th ignored) at hidden 3072, one 4096-row chunk, bf16."""
    g = torch.Generator().manual_seed(V)
    hidden = torch.randn(2, 2304, PHI_HIDDEN, generator=g).to("cuda", torch.bfloat16)
    labels = torch.randint(0, V, (2, 2304), generator=g)
    labels[:, ::9] = phi3.loss.IGNORE
    labels = labels.cuda()
    head = torch.nn.Linear(PHI_HIDDEN, V, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    head.weight.copy_(torch.randn(V, PHI_HIDDEN, generator=g) * 3 / PHI_HIDDEN ** 0.5)
    assert (labels != phi3.loss.IGNORE).sum() == 4096
    got = _loss_and_dh(hidden, head, labels, 4096, monkeypatch, fused=True)
    assert kernel_calls.calls == [(4096, V)]
    ref = _loss_and_dh(hidden, head, labels, 4096, monkeypatch, fused=False)
    exact = _exact(hidden, head, labels)
    _assert_close(["loss", "dh"], got, ref, exact)


@cuda
@needs_cuda
@pytest.mark.usefixtures("poison_outputs")
def test_cuda_kernel_bf16_phi4_mini_vocabulary():
    _check_kernel(256, 200064, torch.bfloat16, seed=1)


@cuda
@needs_cuda
def test_cuda_kernel_rows_past_2_31_elements():
    """10,800 rows of 200,064: the last rows start past element 2^31 (int32 offsets would wrap)."""
    n, V = 10800, 200064
    assert n * V > 2**31
    logits = torch.randn(n, V, device="cuda", dtype=torch.bfloat16) * 3
    targets = torch.randint(0, V, (n,), device="cuda")
    ends = torch.cat([torch.arange(8), torch.arange(n - 64, n)]).cuda()  # first rows, and rows past 2^31
    before = logits[ends].clone()
    loss, grad = cross_entropy_grad(logits, targets, backend="triton")
    _assert_close(["loss", "grad"], [loss[ends], grad[ends]],
                  list(cross_entropy_grad_reference(before, targets[ends])),
                  list(cross_entropy_grad_reference(before.double(), targets[ends])))
