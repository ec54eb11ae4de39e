"""Long context (issue 13): logits, loss and LoRA gradients at length match transformers + peft.

The model has Phi-3-mini-128k's attention and LongRoPE (hidden 3072, 32 heads of 96, its long/short factors, no
window), two layers, random weights. Ours runs as train.py runs it: gradient checkpointing, checkpointed inputs
offloaded (on a GPU), the MLP in token tiles, the chunked loss, cuDNN attention (on a GPU: rows from 4,096 tokens on),
attention outputs kept for the recompute (on a GPU; also without, as `keep_outputs = False` runs). The rule is
DESIGN.md's: our error against the exact result is at most 2x transformers' own at our precision, plus a rounding of
slack.
GPU (`pytest -m cuda`): bf16 at 8,192 and 32,768 tokens, fp32 transformers as the exact result. CPU: the same code
at 600 tokens on a narrow model (fp32, fp64 exact) with 256-token tiles and original_max 256 (long factors on).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import train

from phi3 import load_model
from phi3.lora import load_adapter, mark_only_lora_as_trainable
from phi3.loss import cross_entropy_sum
from phi3.model import MLP, Recompute
from test_model import assert_as_accurate
from tiny import save_hf, transformers_or_skip

CONFIG = "assets/configs/phi3-mini-128k-instruct/config.json"
NARROW = dict(hidden_size=192, intermediate_size=448, num_attention_heads=2, num_key_value_heads=2,
              original_max_position_embeddings=256, max_position_embeddings=8192)


def reference_model(device, narrow: bool, seed: int = 0):
    transformers = transformers_or_skip()
    config = transformers.Phi3Config.from_json_file(CONFIG)
    config.num_hidden_layers = 2
    for key, value in (NARROW if narrow else {}).items():
        setattr(config, key, value)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.Phi3ForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so their weights are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def lora_peft(model, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is the reference oracle")
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,  # B random: A learns
                             target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    model = peft.get_peft_model(model, config)
    model.save_pretrained(tmp_path / "adapter")
    return model


def peft_name(ours: str) -> str:
    """model.layers.0.mlp.down_proj.lora_A -> base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"""
    module, _, kind = ours.rpartition(".")
    return f"base_model.model.{module}.{kind}.default.weight"


def check_at_length(tmp_path, device, length, dtype, exact_dtype, narrow, monkeypatch):
    reference = reference_model(device, narrow).to(exact_dtype)
    reference.save_pretrained(tmp_path / "base")
    ids = torch.randint(0, 32000, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100

    ours = load_model(tmp_path / "base", dtype=dtype, device=device)
    with torch.no_grad():
        exact = reference(ids).logits
        theirs = reference_model(device, narrow).to(dtype).eval()  # same seed: the same weights at our dtype
        theirs.load_state_dict(reference.state_dict())
        assert_as_accurate(ours(ids).float(), theirs(ids).logits.float(), exact, slack=torch.finfo(dtype).eps)
        del theirs

    # one LoRA step: the loss and every LoRA gradient
    peft_exact = lora_peft(reference, tmp_path)
    peft_low = lora_peft(reference_model(device, narrow).to(dtype), tmp_path / "low")
    peft_low.load_state_dict(peft_exact.state_dict())
    ours = load_adapter(ours, tmp_path / "adapter")
    mark_only_lora_as_trainable(ours)
    ours.recompute = Recompute(offload=True)
    monkeypatch.setattr(MLP, "tile_tokens", 256 if narrow else MLP.tile_tokens)
    ours.train()
    losses, grads = [], []
    shifted = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)  # transformers shifts itself
    for model in (peft_exact, peft_low):
        model.train()
        loss = model(input_ids=ids, labels=shifted).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    loss = cross_entropy_sum(ours.hidden_states(ids), ours.lm_head, labels) / (length - 1)
    loss.backward()
    ours_grads = {peft_name(n): p.grad.float() for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == grads[0].keys() and len(ours_grads) == 2 * 4 * 2
    assert_as_accurate(loss.detach().float(), losses[1], losses[0], slack=torch.finfo(dtype).eps)
    for name, g in ours_grads.items():
        assert_as_accurate(g, grads[1][name], grads[0][name], slack=torch.finfo(dtype).eps)


def test_long_context_code_path_on_the_cpu(tmp_path, monkeypatch):
    check_at_length(tmp_path, "cpu", 600, torch.float32, torch.float64, narrow=True, monkeypatch=monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (`pytest -m cuda`)")
@pytest.mark.parametrize("length", [8192, 32768])
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "kept-attention"])
def test_long_context_matches_transformers_on_the_gpu(tmp_path, monkeypatch, length, keep):
    import phi3.attention
    monkeypatch.setattr(phi3.attention, "keep_outputs", keep)  # layer 0's input is offloaded: it keeps its output
    check_at_length(tmp_path, "cuda", length, torch.bfloat16, torch.float32, narrow=False, monkeypatch=monkeypatch)


@pytest.mark.parametrize("packing", [False, True])
def test_train_py_at_length_as_a_long_context_user_runs_it(tmp_path, monkeypatch, capsys, packing):
    """train.py on a LongRoPE model (long factors past 32 positions) and documents longer than --max-seq-len, with and
    without packing, checkpointing on and the MLP in 64-token tiles: every long-context mechanism that runs on a CPU.
    The data summary says what the cut dropped, and the model learns the documents."""
    base = tmp_path / "base"
    save_hf("longrope", base, seed=2)
    for f in (Path("assets") / "tokenizer").iterdir():
        shutil.copy(f, base / f.name)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(words[(d + i) % len(words)] for i in range(n))  # short ones share packed rows, long ones are cut
            for d, n in enumerate([30, 45, 60, 400, 600, 900])]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs * 2))
    monkeypatch.setattr(MLP, "tile_tokens", 64)
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--model", str(base), "--out", str(out), "--max-seq-len", "256",
                       "--batch-size", "1", "--train-on", "all", "--gradient-checkpointing", "--max-steps", "24",
                       "--lr", "1e-2", "--eval-fraction", "0", "--log-every", "1", "--save-every", "0"]
                      + (["--packing"] if packing else [])) == 0
    err = capsys.readouterr().err
    assert "truncated to 256 tokens (" in err and " tokens cut)" in err
    losses = [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5  # the repeated words are learnt
