"""QLoRA on the model: a 4-bit NF4 base (phi3/quantized.py) loaded, saved, trained and sampled, against
bitsandbytes + transformers + peft (tests/ only). The kernels' own tests are tests/test_qlora_kernel.py; the format's
tests/test_nf4.py. On the CPU the 4-bit layers run their torch spec: W dequantized (bitsandbytes' rounding), then the
16-bit math, so a 4-bit model must compute exactly what the 16-bit model with those dequantized weights computes."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import sample
import train
from phi3 import CheckpointError, load_model, save_model
from phi3.kernels.nf4_weight import dequantize_reference
from phi3.lora import LoRAConfig, add_lora, load_adapter, lora_modules, merge_lora, save_adapter
from phi3.quantized import NF4Linear, quantized_names
from test_model import assert_as_accurate
from tiny import save_hf, transformers_or_skip

IDS = torch.randint(0, 32000, (2, 11), generator=torch.Generator().manual_seed(0))


def bnb_or_skip():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the 4-bit oracle; pip install "
                                                                 "bitsandbytes")


def dequantized(model):
    """The 16-bit model whose linears hold the 4-bit model's weights as bitsandbytes dequantizes them."""
    plain = load_model(model.source)
    for name in quantized_names(plain):
        plain.get_submodule(name).weight.data = dequantize_reference(model.get_submodule(name).weight4)
    return plain


def four_bit(tmp_path, name="gqa"):
    save_hf(name, tmp_path / "base")
    model = load_model(tmp_path / "base", quantize="nf4")
    model.source = tmp_path / "base"
    return model


@pytest.mark.parametrize("name", ["gqa", "phi4mini"])
def test_quantize_at_load_is_bitsandbytes_nf4_and_computes_its_weights(tmp_path, name):
    """Each layer's qkv/o/gate_up/down is bitsandbytes' quantize_4bit of the checkpoint's tensor, bit for bit; the
    embedding, norms and lm_head are the checkpoint's; the logits are those of the dequantized weights, exactly."""
    F = bnb_or_skip()
    model = four_bit(tmp_path, name)
    plain = load_model(tmp_path / "base")
    names = quantized_names(model)
    assert len(names) == 4 * model.config.num_hidden_layers
    for n in names:
        q, state = F.quantize_4bit(plain.get_submodule(n).weight.detach(), quant_type="nf4", compress_statistics=True)
        w = model.get_submodule(n).weight4
        assert isinstance(model.get_submodule(n), NF4Linear)
        assert torch.equal(w.packed, q.flatten()) and torch.equal(w.absmax_code, state.absmax), n
        assert torch.equal(w.nested_absmax, state.state2.absmax) and w.offset == state.offset.item(), n
    for n, p in plain.named_parameters():
        if n.removesuffix(".weight") not in names:
            assert torch.equal(p, model.get_parameter(n)), n
    with torch.no_grad():
        assert torch.equal(model(IDS), dequantized(model)(IDS))


def test_a_4bit_model_saves_as_transformers_and_bitsandbytes_do(tmp_path):
    """save_model writes bitsandbytes' tensors and quantization_config; a folder transformers + bitsandbytes saved
    in 4-bit loads here as it is (no dequantize-requantize), with the same weights as ours."""
    transformers = transformers_or_skip()
    bnb_or_skip()
    model = four_bit(tmp_path)
    save_model(model, tmp_path / "ours4", tokenizer_from="assets/tokenizer")
    config = json.loads((tmp_path / "ours4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and config["torch_dtype"] == "float32"
    again = load_model(tmp_path / "ours4")
    for n in quantized_names(model):
        a, b = model.get_submodule(n).weight4, again.get_submodule(n).weight4
        assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax_code, b.absmax_code) and a.offset == b.offset
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q,
                                                          dtype=torch.float32, device_map="cpu")
    theirs.save_pretrained(tmp_path / "hf4")
    for folder in (tmp_path / "hf4", tmp_path / "ours4"):  # theirs read here; ours read by transformers
        read = load_model(tmp_path / "hf4") if folder.name == "hf4" else transformers.Phi3ForCausalLM.from_pretrained(
            folder, dtype=torch.float32, device_map="cpu")
        for n in quantized_names(model):  # (bitsandbytes 0.50's CPU dequantize is wrong at K = 96: bytes compared)
            layer, ours = read.get_submodule(n), model.get_submodule(n).weight4
            if isinstance(layer, NF4Linear):
                packed, absmax, offset = layer.packed, layer.absmax_code, layer.offset
            else:
                state = layer.weight.quant_state
                packed, absmax, offset = layer.weight.data.flatten(), state.absmax, state.offset.item()
            assert torch.equal(packed, ours.packed) and torch.equal(absmax, ours.absmax_code), (folder.name, n)
            assert offset == ours.offset, (folder.name, n)


def test_lora_on_a_4bit_base_trains_like_the_dequantized_model_and_exchanges_with_peft(tmp_path):
    """LoRA on the 4-bit layers: outputs and every LoRA gradient equal LoRA on the dequantized 16-bit model; the
    adapter loads in peft on that model with the same logits; merging a 4-bit layer is refused with the reason."""
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")
    model = four_bit(tmp_path)
    plain = dequantized(model)
    save_model(plain, tmp_path / "dq", tokenizer_from="assets/tokenizer")
    for m in (model, plain):
        add_lora(m, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    for a, b in zip(lora_modules(model).values(), lora_modules(plain).values()):
        with torch.no_grad():
            a.lora_B.normal_()
            b.lora_B.copy_(a.lora_B), b.lora_A.copy_(a.lora_A)
    losses = [m.train()(IDS).float().square().mean() for m in (model, plain)]
    assert torch.equal(*losses)
    for loss in losses:
        loss.backward()
    for (n, a), b in zip(lora_modules(model).items(), lora_modules(plain).values()):
        assert torch.equal(a.lora_A.grad, b.lora_A.grad) and torch.equal(a.lora_B.grad, b.lora_B.grad), n
    save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "dq"),
                                            tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_as_accurate(model.eval()(IDS), theirs(IDS).logits, copy.deepcopy(theirs).double()(IDS).logits)
    with pytest.raises(ValueError, match="4-bit base does not merge"):
        merge_lora(model)


def test_train_py_quantize_nf4_trains_exports_and_samples(tmp_path, small_chat, capsys):
    """--quantize nf4 as a user runs it: the loss goes down, the adapter loads on the 4-bit base and on the 16-bit
    one, --export-merged merges into the 16-bit base (not into 4-bit weights), sample.py answers on the 4-bit base."""
    save_hf("gqa", tmp_path / "base", seed=3)
    for f in Path("assets/tokenizer").iterdir():
        shutil.copy(f, tmp_path / "base" / f.name)
    out, merged = tmp_path / "run", tmp_path / "merged"
    assert train.main(["--data", str(small_chat), "--model", str(tmp_path / "base"), "--out", str(out),
                       "--quantize", "nf4", "--max-steps", "8", "--lr", "1e-2", "--log-every", "1",
                       "--export-merged", str(merged)]) == 0
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]
    four = load_adapter(load_model(tmp_path / "base", quantize="nf4"), out)
    sixteen = load_adapter(load_model(tmp_path / "base"), out)
    merge_lora(sixteen)
    with torch.no_grad():
        assert torch.equal(load_model(merged)(IDS), sixteen(IDS).to(torch.float32))
        assert (four(IDS) - sixteen(IDS)).abs().max() < 0.5  # 4-bit rounding apart, the same adapter
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    capsys.readouterr()
    assert sample.main(["--model", str(tmp_path / "base"), "--adapter", str(out), "--quantize", "nf4",
                        "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_bad_4bit_requests_are_refused(tmp_path, small_chat, capsys):
    save_hf("gqa", tmp_path / "base")
    assert train.main(["--data", str(small_chat), "--out", str(tmp_path / "o"), "--quantize", "nf4", "--full"]) == 2
    assert "--quantize" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(ValueError, match="quantize"):
        load_model(tmp_path / "base", quantize="fp4")
    model = four_bit(tmp_path)
    save_model(model, tmp_path / "q4", tokenizer_from="assets/tokenizer")
    from safetensors.torch import load_file, save_file
    path = tmp_path / "q4" / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.0.mlp.down_proj.weight.quant_map"
    tensors[key] = tensors[key] * 2
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="quant_map"):
        load_model(tmp_path / "q4")
