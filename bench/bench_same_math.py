"""Same math on the GPU: 50 bf16 LoRA steps of this project and of transformers + peft from the same start, both curves.

    python3 bench/bench_same_math.py                          # Phi-3-mini shapes, random bf16 weights, 50 steps
    python3 bench/bench_same_math.py --tiny --device cpu --steps 5   # smoke run of the same code on a CPU (fp32)
    python3 bench/bench_same_math.py --qlora    # also ours on a 4-bit base and transformers + peft + bitsandbytes
    python3 bench/bench_same_math.py --fp8 --steps 200    # ours with the base's GEMMs in FP8 against two bf16 runs

Both start from the same random base weights and the same LoRA weights (peft's init, handed over through the PEFT
files), see the same batches (examples/chat.jsonl, right-padded, assistant tokens trained, 4 x up to 1024 tokens)
and take AdamW steps with gradient clipping; LoRA dropout is off (the two draw different masks). bf16 noise is
measured in the same run: transformers + peft once more with eager attention instead of SDPA, another rounding
of the same math. Issue 12, item 5: ours vs reference should differ by about what reference vs reference does.
--fp8 (issue 29): ours only, LoRA dropout 0.05, three runs from the same start: bf16 with dropout seeds 1 and 2 (the
run-to-run noise) and FP8 (train.py --fp8) with seed 1; the batches repeat in new orders past one epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIG = REPO / "assets" / "configs" / "phi3-mini-4k-instruct" / "config.json"
TINY = dict(hidden_size=192, intermediate_size=448, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)


def batches(steps: int):
    from phi3 import load_tokenizer
    from phi3.data import make_batches, pad_token_for, read_jsonl
    tok = load_tokenizer(REPO / "assets" / "tokenizer")
    examples, _ = read_jsonl(REPO / "examples" / "chat.jsonl", tok, max_seq_len=1024)
    return make_batches(examples, 4, 1024, pad_token_for(tok), packing=False, shuffle=True, seed=0)[:steps]


def reference_model(args, device, dtype, base_state, attention: str, adapter_dir: Path | None):
    import peft
    import transformers
    config = transformers.Phi3Config.from_json_file(str(CONFIG))
    for k, v in (TINY if args.tiny else {}).items():
        setattr(config, k, v)
    config._attn_implementation = attention
    with torch.device(device):
        model = transformers.Phi3ForCausalLM(config).to(dtype)  # transformers' own random init
    if base_state is None:
        return model
    model.load_state_dict(base_state)
    if adapter_dir is None:
        return model
    return peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)


def train_curve(model, loss_of, data, device) -> list[float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    losses = []
    for b in data:
        loss = loss_of(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--qlora", action="store_true", help="also 4-bit bases (NF4): ours and peft + bitsandbytes (GPU)")
    p.add_argument("--fp8", action="store_true", help="only ours: FP8 against two bf16 runs with other dropout seeds")
    args = p.parse_args()
    import peft
    import train
    from phi3 import Phi3Config, Phi3ForCausalLM
    from phi3.lora import load_adapter, mark_only_lora_as_trainable
    from phi3.model import Recompute

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    # the base weights: transformers' own random init, kept on the CPU and handed to all three models
    base_state = {k: v.to("cpu", torch.float32) for k, v in
                  reference_model(args, "cpu", torch.float32, None, "sdpa", None).state_dict().items()}
    data = batches(args.steps)
    if args.fp8:
        while len(data) < args.steps:  # more epochs, each in its own order
            data += batches(args.steps)[::-1][: args.steps - len(data)]
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        init = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,  # random B: A moves too
                               target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
        base = reference_model(args, "cpu", torch.float32, base_state, "sdpa", None)
        peft.get_peft_model(base, init).save_pretrained(tmp)
        del base
        references = (("transformers+peft", "sdpa"), ("transformers+peft eager", "eager"))
        for name, attention in () if args.fp8 else references:
            model = reference_model(args, device, dtype, base_state, attention, Path(tmp)).train()

            def loss_of(b, model=model):  # transformers shifts itself: its labels[t + 1] is our labels[t]
                shifted = torch.cat([torch.full_like(b.labels[:, :1], -100), b.labels[:, :-1]], dim=1)
                return model(input_ids=b.input_ids.to(device), labels=shifted.to(device)).loss
            curves[name] = train_curve(model, loss_of, data, device)
            del model
            torch.cuda.empty_cache() if device.type == "cuda" else None
        config = Phi3Config.from_json(CONFIG)
        if args.tiny:
            config = dataclasses.replace(config, **TINY)
        with torch.device("meta"):
            ours = Phi3ForCausalLM(config, Recompute() if device.type == "cuda" else None)
        ours.load_state_dict(base_state, strict=False, assign=True)  # (+ no buffers of ours missing: RoPE is computed)
        ours = load_adapter(ours.to(device=device, dtype=dtype), tmp)
        if args.fp8:
            return fp8_curves(ours, data, device, dtype)
        if args.qlora:
            curves.update(qlora_curves(args, config, base_state, tmp, data, device, dtype))
    mark_only_lora_as_trainable(ours)
    ours.train()
    curves["ours"] = train_curve(ours, lambda b: train.batch_loss_sum(ours, b, device) / b.trained_tokens, data, device)

    ref, eager, mine = curves["transformers+peft"], curves["transformers+peft eager"], curves["ours"]
    print(f"{len(data)} LoRA steps, {'tiny' if args.tiny else 'Phi-3-mini'} shapes, {str(dtype)[6:]}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    print(f"{'step':>5}{'ours':>10}{'t+p sdpa':>10}{'t+p eager':>11}")
    for i, (a, b, c) in enumerate(zip(mine, ref, eager)):
        print(f"{i + 1:>5}{a:>10.4f}{b:>10.4f}{c:>11.4f}")
    worst = lambda x, y: max(abs(u - v) for u, v in zip(x, y))  # noqa: E731
    print(f"largest |ours - reference|: {worst(mine, ref):.2e}; rounding noise, |reference sdpa - reference eager|: "
          f"{worst(ref, eager):.2e}")
    if args.qlora:
        q, bnb = curves["ours nf4"], curves["transformers+peft+bnb"]
        print(f"{'step':>5}{'ours nf4':>10}{'t+p+bnb':>10}")
        for i, (a, b) in enumerate(zip(q, bnb)):
            print(f"{i + 1:>5}{a:>10.4f}{b:>10.4f}")
        print(f"4-bit: largest |ours nf4 - transformers+peft+bnb|: {worst(q, bnb):.2e} (bf16 rounding noise above: "
              f"{worst(ref, eager):.2e}); the quantization's own effect, largest |ours nf4 - ours bf16|: "
              f"{worst(q, mine):.2e}")


def fp8_curves(ours, data, device, dtype) -> None:
    """Ours bf16 (dropout seeds 1, 2) and ours FP8 (seed 1), each from the same base and adapter."""
    import copy
    import train
    from phi3.lora import lora_modules, mark_only_lora_as_trainable, use_fp8
    start = copy.deepcopy(ours.state_dict())
    curves = {}
    for name, seed, fp8 in (("bf16 seed 1", 1, False), ("bf16 seed 2", 2, False), ("fp8 seed 1", 1, True)):
        ours.load_state_dict(start)
        for m in lora_modules(ours).values():
            m.dropout, m.fp8 = 0.05, None
        if fp8:
            use_fp8(ours)
        mark_only_lora_as_trainable(ours)
        torch.manual_seed(seed)  # the dropout masks' seeds come from torch's generator
        curves[name] = train_curve(ours.train(), lambda b: train.batch_loss_sum(ours, b, device) / b.trained_tokens,
                                   data, device)
    a, b, f = curves["bf16 seed 1"], curves["bf16 seed 2"], curves["fp8 seed 1"]
    print(f"{len(data)} LoRA steps, Phi-3-mini shapes, dropout 0.05, {torch.cuda.get_device_name()}")
    print(f"{'step':>5}{'bf16 s1':>10}{'bf16 s2':>10}{'fp8 s1':>10}")
    for i in range(0, len(a), max(1, len(a) // 40)):
        print(f"{i + 1:>5}{a[i]:>10.4f}{b[i]:>10.4f}{f[i]:>10.4f}")
    worst = lambda x, y: max(abs(u - v) for u, v in zip(x, y))  # noqa: E731
    tail = lambda x: sum(x[-20:]) / len(x[-20:])  # noqa: E731
    print(f"largest |bf16 s1 - bf16 s2| (run-to-run noise): {worst(a, b):.3e}; largest |fp8 s1 - bf16 s1|: "
          f"{worst(f, a):.3e}; |fp8 s1 - bf16 s2|: {worst(f, b):.3e}")
    print(f"mean loss of the last 20 steps: bf16 s1 {tail(a):.4f}, bf16 s2 {tail(b):.4f}, fp8 s1 {tail(f):.4f}")


def qlora_curves(args, config, base_state, adapter_dir, data, device, dtype) -> dict:
    """The same 50 steps on 4-bit bases made from the same weights: ours (quantized at load, as --quantize nf4) and
    transformers + peft + bitsandbytes (NF4, double quantization, bf16 compute; norms left in bf16 as ours)."""
    import peft
    import train
    import transformers
    from phi3 import Phi3ForCausalLM
    from phi3.lora import load_adapter, mark_only_lora_as_trainable
    from phi3.model import Recompute
    from phi3.quantized import quantize_layers, quantized_names
    with torch.device("meta"):
        ours = Phi3ForCausalLM(config, Recompute())
    ours.load_state_dict(base_state, strict=False, assign=True)
    ours = ours.to(device=device, dtype=dtype)
    quantize_layers(ours, {f"{n}.weight": ours.get_submodule(n).weight.detach() for n in quantized_names(ours)},
                    device, dtype, None)
    ours = load_adapter(ours, adapter_dir)
    mark_only_lora_as_trainable(ours)
    curves = {"ours nf4": train_curve(ours.train(), lambda b: train.batch_loss_sum(ours, b, device) / b.trained_tokens,
                                      data, device)}
    del ours
    with tempfile.TemporaryDirectory() as folder:
        reference_model(args, "cpu", torch.float32, base_state, "sdpa", None).to(dtype).save_pretrained(folder)
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = transformers.Phi3ForCausalLM.from_pretrained(folder, quantization_config=q, dtype=dtype,
                                                             device_map={"": device.index or 0},
                                                             attn_implementation="sdpa")
    model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True).train()

    def loss_of(b):
        shifted = torch.cat([torch.full_like(b.labels[:, :1], -100), b.labels[:, :-1]], dim=1)
        return model(input_ids=b.input_ids.to(device), labels=shifted.to(device)).loss
    curves["transformers+peft+bnb"] = train_curve(model, loss_of, data, device)
    return curves


if __name__ == "__main__":
    main()
