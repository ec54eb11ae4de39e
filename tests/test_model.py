"""Logits parity with transformers' Phi3ForCausalLM (the reference) on small random checkpoints."""

import pytest
import torch

from phi3 import load_model
from tiny import save_hf


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def assert_as_accurate(out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, slack: float = 2**-24) -> None:
    """DESIGN.md's accuracy rule: `out`'s error against the float64 result `exact` is at most twice the error of
    `ref` (the same function computed another way, at out's precision) plus `slack` (default: one fp32 rounding of
    the largest value). Two fp32 computations that add in different orders differ by a few roundings, and by how
    many depends on the CPU's kernels; this bound holds on any CPU, where a fixed atol holds on the one it was tried
    on. A real mistake (a wrong scale, a missing term) is orders of magnitude above it."""
    ours, theirs = max_rel_err(out, exact), max_rel_err(ref, exact)
    assert ours <= 2 * theirs + slack, (ours, theirs)


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 32000, (batch, length), generator=torch.Generator().manual_seed(seed))


CASES = [  # (config, sequence length): each attention / RoPE regime the model has
    ("4k", 16),        # window not binding
    ("4k", 40),        # sliding window (24) binding
    ("longrope", 20),  # below original_max_position_embeddings: short factors
    ("longrope", 48),  # above: long factors
    ("gqa", 30),
    ("tied", 12),
    ("phi4mini", 20),  # partial rotary, short factors
    ("phi4mini", 48),  # long factors
    ("phi4", 30),
]


@pytest.mark.parametrize("name,length", CASES)
def test_logits_match_transformers_fp32(tmp_path, name, length):
    ref_model = save_hf(name, tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    ids = random_ids(2, length, seed=length)
    with torch.no_grad():
        ref = ref_model(ids).logits
        exact = ref_model.double()(ids).logits
        out = model(ids)
    assert out.shape == (2, length, ref_model.config.vocab_size)
    assert_as_accurate(out, ref, exact)


@pytest.mark.parametrize("name,length", [("4k", 40), ("longrope", 48), ("gqa", 30), ("phi4mini", 48)])
def test_logits_bf16_error_within_2x_of_transformers_bf16(tmp_path, name, length):
    ref_model = save_hf(name, tmp_path)
    ids = random_ids(2, length, seed=7)
    with torch.no_grad():
        ref = ref_model(ids).logits
        ref_bf16 = ref_model.to(torch.bfloat16)(ids).logits
        out_bf16 = load_model(tmp_path, dtype=torch.bfloat16)(ids)
    assert out_bf16.dtype == torch.bfloat16
    assert_as_accurate(out_bf16, ref_bf16, ref, slack=2**-10)  # fp32 stands in for exact: its error is ~1e4x smaller;
    # the slack is a quarter of bf16's resolution (2**-8) at the largest logit


def test_longrope_switches_factors_at_original_max(tmp_path):
    """The same prefix gets different logits once the call's positions pass original_max (32)."""
    save_hf("longrope", tmp_path)
    model = load_model(tmp_path)
    ids = random_ids(1, 40, seed=3)
    with torch.no_grad():
        short = model(ids[:, :30])
        long = model(ids)[:, :30]
    # fp32 rounding moves these logits (size ~1) by ~1e-6 (test above); the factor switch moves them by ~1e-2
    assert (short - long).abs().max() > 1e-3


def test_document_ids_isolate_packed_examples(tmp_path):
    """Two examples packed in one row give the logits each gets alone (positions restart per document)."""
    save_hf("gqa", tmp_path)
    model = load_model(tmp_path)
    a, b = random_ids(1, 7, seed=1), random_ids(1, 5, seed=2)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    docs = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        out = model(packed, position_ids=positions, document_ids=docs)
        alone = torch.cat([model(a), model(b)], dim=1)
        model64 = load_model(tmp_path, dtype=torch.float64)
        exact = torch.cat([model64(a), model64(b)], dim=1)
    assert_as_accurate(out, alone, exact)  # packed (masked attention) is as accurate as each example alone


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (`pytest -m cuda`)")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name,length", [("4k", 40), ("longrope", 48), ("gqa", 30), ("tied", 12)])
def test_gpu_logits_through_flash_attention(tmp_path, name, length):
    """On the GPU in bf16 the model takes phi3/attention.py's flash path (window, GQA, LongRoPE): as accurate as
    transformers in bf16 (its SDPA path) against transformers in fp32, by the rule above."""
    from phi3.attention import flash_supported
    ref_model = save_hf(name, tmp_path).cuda()
    ids = random_ids(2, length, seed=7).cuda()
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    assert flash_supported(torch.bfloat16, ids.device, model.config.head_dim)
    with torch.no_grad():
        exact = ref_model(ids).logits
        ref_bf16 = ref_model.to(torch.bfloat16)(ids).logits
        out = model(ids)
    assert_as_accurate(out, ref_bf16, exact, slack=2**-10)


@pytest.mark.cuda
@needs_cuda
def test_gpu_packed_documents_through_flash_attention(tmp_path):
    """Packed documents on the flash path give the logits each gets alone (bf16; fp64 on the CPU is exact)."""
    save_hf("4k", tmp_path)  # window 24 binds inside the 30-token document
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    a, b, c = random_ids(1, 30, seed=1), random_ids(1, 5, seed=2), random_ids(1, 13, seed=3)
    packed = torch.cat([a, b, c], dim=1)
    positions = torch.cat([torch.arange(30), torch.arange(5), torch.arange(13)])[None]
    docs = torch.tensor([[0] * 30 + [1] * 5 + [2] * 13])
    with torch.no_grad():
        out = model(packed.cuda(), position_ids=positions.cuda(), document_ids=docs.cuda()).cpu()
        alone = torch.cat([model(t.cuda()).cpu() for t in (a, b, c)], dim=1)
        model64 = load_model(tmp_path, dtype=torch.float64)
        exact = torch.cat([model64(t) for t in (a, b, c)], dim=1)
    assert_as_accurate(out, alone, exact, slack=2**-10)


def test_mlp_token_tiles_are_as_accurate(monkeypatch):
    """Calls longer than MLP.tile_tokens run the MLP in token tiles (checkpointed again under gradient
    checkpointing): logits without grad, and the loss and every LoRA gradient with it, are as accurate as untiled."""
    from test_offload import lora_model
    from phi3.model import MLP
    ids = random_ids(2, 50, seed=5) % 512

    def run(dtype, tile):
        monkeypatch.setattr(MLP, "tile_tokens", tile)
        model = lora_model("cpu", dtype, dropout=0.0)  # the same weights each time (seeded)
        with torch.no_grad():
            logits = model(ids)
        model.zero_grad(set_to_none=True)
        loss = model.hidden_states(ids).square().mean()
        loss.backward()
        return [logits, loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]

    tiled, untiled, exact = run(torch.float32, 16), run(torch.float32, 10**9), run(torch.float64, 10**9)
    assert len(tiled) > 2
    for t, u, e in zip(tiled, untiled, exact):
        assert_as_accurate(t, u, e)
