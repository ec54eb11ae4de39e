"""LoRA on the model: identity at init, merge, trainable set, PEFT file exchange with peft + transformers."""

import json

import pytest
import torch

from phi3 import load_model
from phi3.lora import (LoRAConfig, LoRALinear, add_lora, load_adapter, lora_modules, lora_state_dict,
                       mark_only_lora_as_trainable, merge_lora, parse_targets, save_adapter, unmerge_lora)
from tiny import save_hf, transformers_or_skip


def randomize_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)


def lora_model(tmp_path, name="gqa", dtype=torch.float32, **cfg):
    save_hf(name, tmp_path / "base")
    model = load_model(tmp_path / "base", dtype=dtype)
    add_lora(model, LoRAConfig(**{"rank": 4, "alpha": 8, "dropout": 0.0, **cfg}))
    return model


IDS = torch.randint(0, 32000, (2, 11), generator=torch.Generator().manual_seed(0))


def test_zero_init_lora_leaves_logits_unchanged(tmp_path):
    save_hf("gqa", tmp_path / "base")
    base = load_model(tmp_path / "base")
    model = add_lora(load_model(tmp_path / "base"), LoRAConfig(rank=8, targets=("qkv", "o", "gate_up", "down", "lm_head")))
    assert len(lora_modules(model)) == 2 * 4 + 1
    assert all(m.lora_A.abs().sum() > 0 and m.lora_B.abs().sum() == 0 for m in lora_modules(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base(IDS), rtol=0, atol=0)


def test_lora_weight_has_spare_columns_and_saves_plainly(tmp_path):
    """LoRALinear keeps W as an (out, in) view of a buffer with spare columns (the kernel's concat forward writes
    s*B there): same values as the base weight, saved contiguous under the checkpoint's names, merged in place."""
    from phi3.checkpoint import base_state_dict
    save_hf("gqa", tmp_path / "base")
    base = load_model(tmp_path / "base")
    model = lora_model(tmp_path, targets=("q", "v", "o"))
    for name, m in lora_modules(model).items():
        out, inp = m.weight.shape
        assert m.spare_cols >= m.lora_A.shape[0] and m.weight.stride() == (inp + m.spare_cols, 1)
        assert (inp + m.spare_cols) * m.weight.element_size() % 16 == 0
        assert torch.equal(m.weight, base.get_submodule(name).weight) and not m.weight.requires_grad
    state = base_state_dict(model)
    assert all(t.is_contiguous() for t in state.values())
    assert state.keys() == base_state_dict(base).keys()
    randomize_lora(model)
    m = lora_modules(model)["model.layers.0.self_attn.o_proj"]
    expected = m.weight + m.delta()
    m.merge()
    torch.testing.assert_close(m.weight, expected, rtol=1e-6, atol=1e-6)
    assert m.weight.stride(0) == m.in_features + m.spare_cols  # merged in place, layout kept


@pytest.mark.parametrize("targets", [("qkv", "o", "gate_up", "down"), ("q", "v"), ("k", "up", "o")])
def test_merge_and_unmerge_agree(tmp_path, targets):
    model = lora_model(tmp_path, targets=targets)
    randomize_lora(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(IDS)
        merge_lora(model)
        merged = model(IDS)
        unmerge_lora(model)
        again = model(IDS)
    assert not any(m.merged for m in lora_modules(model.eval()).values())  # eval() does not merge
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)
    for n, p in model.state_dict().items():
        torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-6)


def test_per_slice_targets_touch_only_their_rows(tmp_path):
    model = lora_model(tmp_path, targets=("q", "v"))  # GQA: q is 64 rows, k and v 32 each
    randomize_lora(model)
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, LoRALinear) and layer.slices == [(0, 64), (96, 128)]
    delta = layer.delta()
    assert delta[:64].abs().min() >= 0 and delta[:64].abs().sum() > 0
    assert delta[64:96].abs().max() == 0 and delta[96:].abs().sum() > 0


def test_only_lora_parameters_train(tmp_path):
    model = lora_model(tmp_path, targets=("q", "v", "o", "gate_up", "down"), dropout=0.1).train()
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and trainable
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(IDS).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in base:
            assert p.grad is None and torch.equal(p, base[n]), n
        else:
            assert not torch.equal(p, lora_before[n]), n


def test_lora_parameters_stay_fp32_on_a_bf16_base(tmp_path):
    model = lora_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in lora_state_dict(model).values())
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert model(IDS).dtype == torch.bfloat16


def test_rslora_scale():
    assert LoRAConfig(rank=16, alpha=32).scale == 2.0
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scale == 8.0
    assert parse_targets("qkv_proj, o,all-linear") == ("qkv", "o", "gate_up", "down")
    with pytest.raises(ValueError, match="unknown LoRA target 'attn'"):
        parse_targets("attn")


@pytest.mark.parametrize("targets", [("qkv", "o", "gate_up", "down"), ("q", "v", "down")])
def test_adapter_round_trip_is_exact(tmp_path, targets):
    model = lora_model(tmp_path, targets=targets, rslora=True)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    again = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), model(IDS), rtol=1e-6, atol=1e-6)
    save_adapter(again, tmp_path / "adapter2")
    a = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "adapter2" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("targets", [("qkv", "o", "gate_up", "down", "lm_head"), ("q", "v"), ("q", "v", "o")])
def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path, targets):
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")
    model = lora_model(tmp_path, targets=targets)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS), rtol=1e-5, atol=1e-5)


def test_peft_trained_adapter_loads_here_with_equal_logits(tmp_path):
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")
    save_hf("gqa", tmp_path / "base")
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["qkv_proj", "down_proj"], lora_dropout=0.0,
                             rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3}, init_lora_weights=False)
    hf = peft.get_peft_model(hf, config).eval()  # init_lora_weights=False: random non-zero B
    hf.save_pretrained(tmp_path / "peft_adapter")
    assert json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())["r"] == 4
    model = load_adapter(load_model(tmp_path / "base"), tmp_path / "peft_adapter")
    assert model.model.layers[0].mlp.down_proj.rank == 2
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, rtol=1e-5, atol=1e-5)
