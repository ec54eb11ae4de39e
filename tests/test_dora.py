"""DoRA (LoRAConfig(dora=True), train.py --dora) against peft's use_dora=True: forward, every gradient (with dropout
live and without), the adapter files both ways, merging, a 4-bit base, and the kernel path's composition."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import sample
from phi3 import CheckpointError, load_model, save_model
from phi3.kernels.nf4_weight import dequantize_reference
from phi3.lora import (LoRAConfig, add_lora, load_adapter, lora_modules, mark_only_lora_as_trainable, merge_lora,
                       save_adapter, unmerge_lora)
from phi3.ops import dora_linear, dora_linear_reference
from conftest import needs_triton
from peft_oracle import assert_trains_like_peft, peft_model, peft_or_skip
from test_lora import EPS32, delta_size, edit_config, edit_tensors
from test_model import assert_as_accurate
from test_qlora import dequantized, four_bit
from tiny import save_hf

IDS = torch.randint(0, 32000, (2, 11), generator=torch.Generator().manual_seed(0))


def randomize_dora(model, seed=0):
    """Non-zero B and a magnitude away from ||W||, so that every DoRA term counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)
            m.lora_magnitude.mul_(torch.rand(m.lora_magnitude.shape, generator=gen) + 0.5)


def dora_model(tmp_path, name="gqa", targets=("qkv", "o", "gate_up", "down"), dropout=0.0, dtype=torch.float32):
    save_hf(name, tmp_path / "base")
    model = add_lora(load_model(tmp_path / "base", dtype=dtype),
                     LoRAConfig(rank=4, alpha=8, dropout=dropout, targets=targets, dora=True))
    randomize_dora(model)
    return model


def test_dora_starts_as_the_base_model(tmp_path):
    """B = 0 and m = ||W||: g = 1 exactly and the LoRA term is 0, so each layer gives x W^T bit for bit."""
    save_hf("gqa", tmp_path / "base")
    base = load_model(tmp_path / "base")
    model = add_lora(load_model(tmp_path / "base"), LoRAConfig(rank=4, targets=("q", "v", "o", "down"), dora=True))
    with torch.no_grad():
        for m in lora_modules(model).values():
            assert torch.equal(m.dora_scale(), torch.ones(m.out_features))
        torch.testing.assert_close(model(IDS), base(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("name,targets,dropout", [
    ("gqa", ("qkv", "o", "gate_up", "down"), 0.1),  # dropout live: peft's second path, (g - 1) (dropout(x) W^T)
    ("tied", ("q", "v", "down", "lm_head"), 0.0),   # per-slice targets, a tied lm_head, peft's identity path
])
def test_dora_forward_and_every_gradient_equal_peft(tmp_path, name, targets, dropout):
    model = dora_model(tmp_path, name, targets, dropout)
    mark_only_lora_as_trainable(model)
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B", "lora_magnitude"}
    with torch.no_grad():  # eval: no dropout, peft reuses the base output
        theirs = peft_model(tmp_path / "base", save_adapter(model, tmp_path / "adapter")).eval()
        assert_as_accurate(model.eval()(IDS), theirs(IDS).logits, copy.deepcopy(theirs).double()(IDS).logits)
    assert_trains_like_peft(model, tmp_path / "base", tmp_path, IDS)


def test_dora_norm_once_per_step_and_anew_after_every_change(tmp_path, monkeypatch):
    """The norm ||W + s B A|| is kept while W, A and B are unchanged: a checkpointed layer's recompute reuses the
    forward's (one norm per layer per step, not two); an optimizer step, a load into A or B, and moving the model make
    it anew, and the kept norm always equals a fresh one."""
    import phi3.lora_layers
    from phi3.model import Recompute
    save_hf("gqa", tmp_path / "base")
    model = add_lora(load_model(tmp_path / "base", recompute=Recompute()), LoRAConfig(rank=4, dora=True))
    mark_only_lora_as_trainable(model)
    layers = list(lora_modules(model).values())
    computed = []
    real = phi3.lora_layers.dora_weight_norm
    monkeypatch.setattr(phi3.lora_layers, "dora_weight_norm", lambda *a: computed.append(1) or real(*a))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step():
        computed.clear()
        model.train()(IDS).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        return len(computed)

    assert step() == 0  # each norm was made with the magnitude, and A and B have not changed since
    assert step() == len(layers)  # the optimizer step changed them: every norm anew, shared by forward and recompute
    for m in layers:
        assert torch.equal(m.dora_norm(), real(m.frozen_weight(), m.lora_A, m.full_B(), m.scale))
    computed.clear()
    with torch.no_grad():
        layers[0].lora_B.copy_(torch.randn(layers[0].lora_B.shape))  # as load_adapter writes
        layers[1].lora_A.add_(1.0)
    model.eval()(IDS)
    assert len(computed) == 2
    computed.clear()
    model.to(torch.float64)(IDS)
    assert len(computed) == len(layers) and all(m._norm[1].dtype == torch.float32 for m in layers)


def test_peft_trained_dora_adapter_loads_here_and_in_sample_py(tmp_path, capsys):
    peft = peft_or_skip()
    import transformers
    save_hf("gqa", tmp_path / "base")
    for f in Path("assets/tokenizer").iterdir():
        shutil.copy(f, tmp_path / "base" / f.name)
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["qkv_proj", "down_proj"], lora_dropout=0.0,
                             rank_pattern={"down_proj": 2}, use_dora=True, init_lora_weights=False)
    theirs = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape) + 0.5)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    assert json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())["use_dora"] is True
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "peft_adapter")
    assert all(m.lora_magnitude is not None for m in lora_modules(ours).values())
    with torch.no_grad():
        assert_as_accurate(ours(IDS), theirs(IDS).logits, theirs.double()(IDS).logits)
    assert sample.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft_adapter"), "--prompt",
                        "Hi", "--max-new-tokens", "3"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name,targets", [("gqa", ("q", "v", "o")), ("tied", ("qkv", "lm_head"))])
def test_merge_folds_the_magnitude_in_as_peft_does(tmp_path, name, targets):
    """W' = m / ||W + s B A|| (W + s B A) row-wise, as peft's merge_and_unload: the same weights (judged against
    peft merging in float64), the logits of the unmerged model, a saved merged model that transformers loads with
    them; a tied lm_head unties (peft's merge writes W' into the weight the embedding shares: its merged model's
    logits are not its unmerged ones, so those are the reference); unmerge gives W back."""
    import transformers
    model = dora_model(tmp_path, name, targets)
    before = {n: m.weight.clone() for n, m in lora_modules(model).items()}
    theirs = peft_model(tmp_path / "base", save_adapter(model, tmp_path / "adapter")).eval()
    with torch.no_grad():
        exact_logits = copy.deepcopy(theirs).double()(IDS).logits
        exact_merged = copy.deepcopy(theirs).double().merge_and_unload()
        theirs_merged = theirs.merge_and_unload()
        unmerged = model(IDS)
        merge_lora(model)
        for n, m in lora_modules(model).items():
            assert_as_accurate(m.weight, theirs_merged.get_submodule(n).weight, exact_merged.get_submodule(n).weight)
        assert_as_accurate(model(IDS), unmerged, exact_logits)
        assert model.config.tie_word_embeddings is False
        save_model(model, tmp_path / "merged", tokenizer_from="assets/tokenizer")
        loaded = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert_as_accurate(loaded(IDS).logits, unmerged, exact_logits)
        unmerge_lora(model)
        for n, m in lora_modules(model).items():  # W' / g - s B A: a few fp32 roundings of |W| + |s B A|
            g = m.dora_scale()
            bound = 4 * EPS32 * (before[n].abs() + delta_size(m)) * torch.maximum(g, 1 / g).unsqueeze(1)
            assert ((m.weight - before[n]).abs() <= bound).all(), n
        assert model.config.tie_word_embeddings is (name == "tied")
        assert_as_accurate(model(IDS), unmerged, exact_logits)


def test_dora_on_a_bf16_base_as_peft_on_it(tmp_path):
    """A bf16 base: the magnitude stays fp32, the output is bf16, and its error is within twice peft's in bf16
    (fp32 peft stands in for exact)."""
    model = dora_model(tmp_path, dtype=torch.bfloat16)
    assert all(m.lora_magnitude.dtype == torch.float32 for m in lora_modules(model).values())
    save_adapter(model, tmp_path / "adapter")
    theirs = peft_model(tmp_path / "base", tmp_path / "adapter").eval()
    with torch.no_grad():
        exact = theirs(IDS).logits
        out = model(IDS)
        assert out.dtype == torch.bfloat16
        assert_as_accurate(out, theirs.to(torch.bfloat16)(IDS).logits, exact, slack=2**-10)


def test_dora_on_a_4bit_base_is_dora_on_its_dequantized_weights(tmp_path):
    """The magnitude's norm and the output use the NF4 weights as dequantized: forward and every gradient equal
    DoRA on the 16-bit model holding those weights, bit for bit; the adapter loads in peft on it; merging is refused."""
    pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the 4-bit oracle; pip install bitsandbytes")
    model = four_bit(tmp_path)
    plain = dequantized(model)
    save_model(plain, tmp_path / "dq", tokenizer_from="assets/tokenizer")
    for m in (model, plain):
        add_lora(m, LoRAConfig(rank=4, alpha=8, dropout=0.1, dora=True))
    randomize_dora(model)
    for a, b in zip(lora_modules(model).values(), lora_modules(plain).values()):
        with torch.no_grad():
            for name in ("lora_A", "lora_B", "lora_magnitude"):
                getattr(b, name).copy_(getattr(a, name))
    losses = []
    for m in (model, plain):
        torch.manual_seed(3)  # dropout live: the same masks
        losses.append(m.train()(IDS).float().square().mean())
    assert torch.equal(*losses)
    for loss in losses:
        loss.backward()
    for (n, a), b in zip(lora_modules(model).items(), lora_modules(plain).values()):
        for name in ("lora_A", "lora_B", "lora_magnitude"):
            assert torch.equal(getattr(a, name).grad, getattr(b, name).grad), (n, name)
    theirs = peft_model(tmp_path / "dq", save_adapter(model, tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert_as_accurate(model.eval()(IDS), theirs(IDS).logits, copy.deepcopy(theirs).double()(IDS).logits)
    with pytest.raises(ValueError, match="4-bit base does not merge"):
        merge_lora(model)


@needs_triton
@pytest.mark.parametrize("four_bits", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_dora_linear_kernel_path_composes_peft_formula(p, four_bits):
    """dora_linear's kernel path (g L(x), and with dropout g L(xd) + (x - xd) W^T) against the torch spec, both
    judged in float64, outputs and the gradients of x, A, B and g; the masks are drawn once, the same on both paths."""
    from phi3 import nf4
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(72, 64, generator=gen) * 0.1
    weight = nf4.quantize(W) if four_bits else W
    dense = dequantize_reference(weight, torch.float32) if four_bits else W
    x = torch.randn(2, 9, 64, generator=gen)
    A, B = torch.randn(4, 64, generator=gen) * 0.1, torch.randn(72, 4, generator=gen) * 0.1
    g = torch.rand(72, generator=gen) + 0.5
    results = []
    for backend in ("triton", "torch"):
        inputs = [t.clone().requires_grad_() for t in (x, A, B, g)]
        torch.manual_seed(7)
        y = dora_linear(inputs[0], weight, inputs[1], inputs[2], 2.0, inputs[3], p, backend=backend)
        y.backward(torch.ones_like(y))
        results.append([y] + [t.grad for t in inputs])
    torch.manual_seed(7)
    mask = None if p == 0 else torch.nn.functional.dropout(torch.ones(x.shape), p)
    exact_inputs = [t.double().requires_grad_() for t in (x, A, B, g)]
    y = dora_linear_reference(exact_inputs[0], dense.double(), *exact_inputs[1:3], 2.0, exact_inputs[3],
                              None if mask is None else mask.double())
    y.backward(torch.ones_like(y))
    exact = [y] + [t.grad for t in exact_inputs]
    for ours, ref, want in zip(*results, exact):
        assert_as_accurate(ours, ref, want)


# ---- files and flags that cannot work: one line each -------------------------------------------------------------

@pytest.fixture
def dora_adapter(tmp_path):
    model = dora_model(tmp_path, targets=("q", "v", "o"))
    return save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")


MAGNITUDE = "base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector"
FP32_MAX = torch.finfo(torch.float32).max  # finite, and a merged value could reach it


@pytest.mark.parametrize("change,what,file", [
    (lambda f: edit_config(f, use_dora=False), "has a lora_magnitude_vector, but .* use_dora false",
     "adapter_model.safetensors"),
    (lambda f: edit_tensors(f, lambda ts: {k: v for k, v in ts.items() if k != MAGNITUDE}),
     "o_proj lacks a lora_magnitude_vector, but .* use_dora true", "adapter_model.safetensors"),
    (lambda f: edit_tensors(f, lambda ts: dict(ts, **{MAGNITUDE: ts[MAGNITUDE][:5]})), "another model size",
     "adapter_model.safetensors"),
    (lambda f: edit_tensors(f, lambda ts: dict(ts, **{MAGNITUDE: ts[MAGNITUDE] * float("nan")})), "NaN or infinite",
     "adapter_model.safetensors"),
    (lambda f: edit_tensors(f, lambda ts: dict(ts, **{MAGNITUDE: ts[MAGNITUDE].to(torch.int64)})),
     "lora_magnitude_vector torch.int64", "adapter_model.safetensors"),
    (lambda f: edit_tensors(f, lambda ts: dict(ts, **{MAGNITUDE: torch.full_like(ts[MAGNITUDE], FP32_MAX)})),
     "o_proj's lora_magnitude_vector overflows float32", "adapter_model.safetensors"),
])
def test_dora_files_that_do_not_fit_are_one_line(tmp_path, dora_adapter, change, what, file):
    change(dora_adapter)
    model = load_model(tmp_path / "base")
    with pytest.raises(CheckpointError, match=what) as e:
        load_adapter(model, dora_adapter)
    assert str(e.value).startswith(str(dora_adapter / file)) and "\n" not in str(e.value)
    assert not lora_modules(model)


def test_dora_on_the_embedding_is_refused(tmp_path):
    save_hf("gqa", tmp_path / "base")
    with pytest.raises(ValueError, match="DoRA on the embedding is not supported"):
        add_lora(load_model(tmp_path / "base"), LoRAConfig(targets=("qkv", "embed_tokens"), dora=True))
