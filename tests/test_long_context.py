"""Long context (issues 13, 26): logits, loss and LoRA gradients at length match transformers + peft.

The model has Phi-3-mini-128k's attention and LongRoPE (hidden 3072, 32 heads of 96, its long/short factors, no
window), or Phi-4-mini's (24 query / 8 key-value heads of 128, rotary on 96 dims, tied 200,064-token vocabulary),
two layers, random weights. Ours runs as train.py runs it: gradient checkpointing, checkpointed inputs
offloaded (on a GPU), the MLP in token tiles, the chunked loss, cuDNN attention (on a GPU: rows from 4,096 tokens on),
attention outputs kept for the recompute (on a GPU; also without, as `keep_outputs = False` runs). The rule is
DESIGN.md's: our error against the exact result is at most 2x transformers' own at our precision, plus a rounding of
slack.
GPU (`pytest -m cuda`): bf16 at 8,192 and 32,768 tokens, fp32 transformers as the exact result. CPU: the same code
at 600 tokens on a narrow model (fp32, fp64 exact) with 256-token tiles and original_max 256 (long factors on).
Logits are compared at the last 4,096 positions and the reference loss is torch's cross entropy over chunks of the
reference's own hidden states and lm_head: at 32k tokens a 200k vocabulary's whole fp32 logits are 26 GB, three
copies would not fit the GPU (the chunked loss is checked against torch's whole one in tests/test_model.py).
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

MODELS = ["phi3-mini-128k-instruct", "phi4-mini-instruct"]
NARROW = {  # the CPU's: heads of the real width (the LongRoPE factor lists fit), fewer of them, a small vocabulary
    "phi3-mini-128k-instruct": dict(hidden_size=192, intermediate_size=448, num_attention_heads=2,
                                    num_key_value_heads=2, original_max_position_embeddings=256,
                                    max_position_embeddings=8192),
    "phi4-mini-instruct": dict(hidden_size=256, intermediate_size=448, num_attention_heads=2, num_key_value_heads=1,
                               original_max_position_embeddings=256, max_position_embeddings=8192, vocab_size=32064,
                               bos_token_id=1, eos_token_id=32000, pad_token_id=32000)}
KEEP_LOGITS = 4096


def reference_model(device, name: str, narrow: bool, seed: int = 0):
    transformers = transformers_or_skip()
    config = transformers.Phi3Config.from_json_file(f"assets/configs/{name}/config.json")
    config.num_hidden_layers = 2
    for key, value in (NARROW[name] if narrow else {}).items():
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


def reference_loss(model, ids, labels):
    """transformers' loss (mean cross entropy over the labelled positions) from its hidden states, in chunks."""
    inner = model.base_model.model  # peft's wrapper -> Phi3ForCausalLM
    hidden = inner.model(input_ids=ids).last_hidden_state
    return cross_entropy_sum(hidden, inner.lm_head, labels) / (labels != -100).sum()


def check_at_length(tmp_path, device, name, length, dtype, exact_dtype, narrow, monkeypatch):
    reference = reference_model(device, name, narrow).to(exact_dtype)
    reference.save_pretrained(tmp_path / "base")
    ids = torch.randint(0, 32000, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100

    ours = load_model(tmp_path / "base", dtype=dtype, device=device)
    with torch.no_grad():
        exact = reference(ids, logits_to_keep=KEEP_LOGITS).logits
        theirs = reference_model(device, name, narrow).to(dtype).eval()  # same seed: the same weights, our dtype
        theirs.load_state_dict(reference.state_dict())
        got = ours.lm_head(ours.hidden_states(ids)[:, -KEEP_LOGITS:]).float()
        assert_as_accurate(got, theirs(ids, logits_to_keep=KEEP_LOGITS).logits.float(), exact,
                           slack=torch.finfo(dtype).eps)
        del theirs, got, exact

    # one LoRA step: the loss and every LoRA gradient
    peft_exact = lora_peft(reference, tmp_path)
    peft_low = lora_peft(reference_model(device, name, narrow).to(dtype), tmp_path / "low")
    peft_low.load_state_dict(peft_exact.state_dict())
    ours = load_adapter(ours, tmp_path / "adapter")
    mark_only_lora_as_trainable(ours)
    ours.recompute = Recompute(offload=True)
    monkeypatch.setattr(MLP, "tile_tokens", 256 if narrow else MLP.tile_tokens)
    ours.train()
    losses, grads = [], []
    for model in (peft_exact, peft_low):
        model.train()
        loss = reference_loss(model, ids, labels)
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


@pytest.mark.parametrize("name", MODELS)
def test_long_context_code_path_on_the_cpu(tmp_path, monkeypatch, name):
    check_at_length(tmp_path, "cpu", name, 600, torch.float32, torch.float64, narrow=True, monkeypatch=monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (`pytest -m cuda`)")
@pytest.mark.parametrize("length", [8192, 32768])
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "kept-attention"])
@pytest.mark.parametrize("name", MODELS)
def test_long_context_matches_transformers_on_the_gpu(tmp_path, monkeypatch, name, length, keep):
    import phi3.attention
    # transformers hands grouped heads to SDPA as they are (enable_gqa), and in fp32 SDPA then takes its math kernel:
    # (24 heads, T, T) fp32 scores, 96 GiB at 32k tokens. The heads repeated first, as transformers does with a mask,
    # give the same attention through the memory-efficient kernel.
    sdpa = pytest.importorskip("transformers.integrations.sdpa_attention")
    monkeypatch.setattr(sdpa, "use_gqa_in_sdpa", lambda *args, **kwargs: False)
    monkeypatch.setattr(phi3.attention, "keep_outputs", keep)  # layer 0's input is offloaded: it keeps its output
    check_at_length(tmp_path, "cuda", name, length, torch.bfloat16, torch.float32, narrow=False,
                    monkeypatch=monkeypatch)


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
