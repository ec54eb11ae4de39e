"""Same math as transformers + peft: 50 LoRA training steps (fp32, CPU, small shapes) give the same losses.

Both start from the same random Phi-3 checkpoint and the same LoRA weights (peft's, loaded here through the PEFT
files), see the same batches (right-padded chat examples, only assistant tokens trained) and take AdamW steps
with gradient clipping. The losses must agree within 1e-5 at every step (issue 12's bound for fp32 on the CPU):
the two implementations round differently (e.g. the order of the attention and lm_head sums), by a few fp32 ulps
per step, and 50 steps of AdamW at lr 1e-3 keep that far below 1e-5.
"""

from pathlib import Path

import pytest
import torch

import train
from phi3 import load_model, load_tokenizer
from phi3.data import make_batches, pad_token_for, read_jsonl
from phi3.lora import load_adapter, mark_only_lora_as_trainable
from tiny import save_hf, transformers_or_skip

REPO = Path(__file__).parent.parent


def test_fifty_lora_steps_match_transformers_and_peft(tmp_path):
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")
    save_hf("gqa", tmp_path / "base", seed=5)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # random B: A moves too
                             target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    reference = peft.get_peft_model(transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base"), config)
    reference.save_pretrained(tmp_path / "init")
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "init")
    mark_only_lora_as_trainable(ours)
    ours.train(), reference.train()

    tok = load_tokenizer(REPO / "assets" / "tokenizer")
    examples, _ = read_jsonl(REPO / "examples" / "chat.jsonl", tok, max_seq_len=128)
    batches = make_batches(examples[:200], 4, 128, pad_token_for(tok), packing=False, shuffle=True, seed=0)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for m in (ours, reference)]
    ours_losses, reference_losses = [], []
    for step in range(50):
        b = batches[step]
        loss = train.batch_loss_sum(ours, b, "cpu") / b.trained_tokens
        # transformers shifts the labels itself: its labels[t + 1] is our (already shifted) labels[t]
        shifted = torch.cat([torch.full_like(b.labels[:, :1], -100), b.labels[:, :-1]], dim=1)
        ref_loss = reference(input_ids=b.input_ids, labels=shifted).loss
        for model, value, opt, losses in ((ours, loss, optimizers[0], ours_losses),
                                          (reference, ref_loss, optimizers[1], reference_losses)):
            value.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(value.item())
    assert ours_losses[-1] < ours_losses[0] - 0.1  # it trains
    worst = max(abs(a - b) for a, b in zip(ours_losses, reference_losses))
    assert worst <= 1e-5, (worst, ours_losses[:3], reference_losses[:3])
