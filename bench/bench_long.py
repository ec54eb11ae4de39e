"""Long-context LoRA training: one sequence per step at 16k-131k tokens, this project vs transformers + peft.

    python3 bench/bench_long.py                              # Phi-3-mini-128k shapes, 16k 32k 64k 131k, 2 steps each
    python3 bench/bench_long.py --lengths 131072 --steps 1
    python3 bench/bench_long.py --config phi4-mini-instruct --lengths 131072   # another model (assets/configs/NAME)
    python3 bench/bench_long.py --config phi3-medium-128k-instruct --lengths 32768 --ablation ours-nf4   # + QLoRA
    python3 bench/bench_long.py --lengths 32768 --ablation ours-no-cudnn  # also ours with flash attention only
    python3 bench/bench_long.py --lengths 32768 --ablation ours-no-keep   # also ours recomputing attention
    python3 bench/bench_long.py --config phi4-mini-instruct --lengths 65536 --chunked-reference
    python3 bench/bench_long.py --tiny --device cpu --lengths 512 --steps 1   # smoke run of the same code on a CPU

Workload (issue 13): random bf16 weights with the Phi-3-mini-128k config (LongRoPE: the long factors apply past 4,096
positions), LoRA r=16 alpha=32 dropout 0.05 on qkv/o/gate_up/down, every token trained, AdamW, gradient checkpointing
on both sides. This project as train.py runs it by default on a GPU: cuDNN attention (flash attention below 4k
tokens), the checkpointed layer inputs in pinned CPU memory (with their attention outputs, from 8k tokens), the MLP in
token tiles, the chunked loss. Each system and length runs in its own process (clean peak memory); one that runs out
of memory is reported as such. Prints tokens/s, peak GiB and ratios.

--chunked-reference also runs transformers + peft with its loss computed in checkpointed chunks of 4,096 tokens
(the logits of one chunk at a time) instead of its own, which holds every position's logits in fp32: at Phi-4-mini's
200,064 words that is 24 GiB at 32,768 tokens and 98 GiB at 131,072, so stock transformers runs out of memory there
even on an H200. The chunked loss is what a transformers user can write in a few lines; it makes the reference
stronger, never weaker, and its own column says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from systems import hf_random, ours_config, ours_lora, peft_lora  # bench/ itself: the script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIGS = REPO / "assets" / "configs"
CONFIG = CONFIGS / "phi3-mini-128k-instruct" / "config.json"  # --config replaces it
ABLATIONS = ["ours-no-cudnn", "ours-no-keep", "ours-nf4"]  # the last: QLoRA, the layers' weights in NF4
LOSS_CHUNK = 4096  # tokens per chunk of --chunked-reference's loss
TINY = dict(hidden_size=192, intermediate_size=448, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)  # hd 96: LongRoPE factors


def build_ours(args, device, dtype):
    import phi3.attention
    from phi3.loss import cross_entropy_sum
    if args.system == "ours-no-cudnn":
        phi3.attention.use_cudnn = False  # every GPU call through flash attention 2
    elif args.system == "ours-no-keep":
        phi3.attention.keep_outputs = False  # the recompute computes attention again instead of taking it from the host
    # as train.py runs it on a GPU: offloaded layer inputs, MLP tiles, kernel choices made before the timed steps
    model = ours_lora(ours_config(CONFIG, TINY if args.tiny else None), device, dtype,
                      four_bit=args.system == "ours-nf4")

    def loss_fn(ids, labels):
        return cross_entropy_sum(model.hidden_states(ids), model.lm_head, labels) / labels.numel()
    return model, loss_fn


def build_reference(args, device, dtype):
    model = peft_lora(hf_random(CONFIG, TINY if args.tiny else None, device, dtype))
    if args.system == "reference-chunked":
        base = model.get_base_model()  # transformers' Phi3ForCausalLM, peft's LoRA layers inside
        return model, lambda ids, labels: chunked_loss(base.model(input_ids=ids).last_hidden_state, base.lm_head,
                                                       labels)

    def loss_fn(ids, labels):
        return model(input_ids=ids, labels=ids).loss  # shifts itself: every position trained, as ours
    return model, loss_fn


def chunked_loss(hidden, lm_head, labels):
    """Mean cross-entropy over LOSS_CHUNK-token chunks, each chunk's logits made again in the backward (checkpoint):
    one chunk's fp32 logits alive at a time."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk_sum(h, y):
        return F.cross_entropy(lm_head(h).float().flatten(0, 1), y.flatten(), reduction="sum")
    total = sum(checkpoint(chunk_sum, hidden[:, i:i + LOSS_CHUNK], labels[:, i:i + LOSS_CHUNK], use_reentrant=False)
                for i in range(0, hidden.shape[1], LOSS_CHUNK))
    return total / labels.numel()


def measure(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model, loss_fn = (build_reference if args.system.startswith("reference") else build_ours)(args, device, dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, 32000, (1, args.length), device=device)
    labels = torch.roll(ids, -1, dims=1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps + 1):  # the first step warms up (allocator, compilation)
        sync()
        start = time.perf_counter()
        loss_fn(ids, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": args.length / (sum(times[1:]) / args.steps), "peak_gib": peak}


def run_one(system: str, length: int, args) -> dict:
    """One system at one length in a fresh process; {"oom": True} if it ran out of GPU memory."""
    cmd = [sys.executable, __file__, "--system", system, "--length", str(length), "--steps", str(args.steps),
           "--device", args.device, "--config", args.config] + (["--tiny"] if args.tiny else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        if "OutOfMemoryError" in out.stderr or "out of memory" in out.stderr:
            return {"oom": True}
        sys.exit(f"{system} at {length} tokens failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def against(ours: dict, ref: dict) -> str:
    """A reference's tokens/s and GiB, and ours' ratios to them ("-" where either ran out of memory)."""
    if ref.get("oom"):
        return "OOM"
    ratios = "-, -" if ours.get("oom") else (f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x, "
                                             f"{ours['peak_gib'] / ref['peak_gib']:.2f}x")
    return f"{ref['tokens_per_s']:,.0f}, {ref['peak_gib']:.2f}, {ratios}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["ours", "reference", "reference-chunked"] + ABLATIONS)
    p.add_argument("--length", type=int)
    p.add_argument("--config", default="phi3-mini-128k-instruct", help="the model's shapes: a folder of assets/configs")
    p.add_argument("--lengths", default="16384,32768,65536,131072")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="a 4-layer model (smoke runs on the CPU)")
    p.add_argument("--ablation", choices=ABLATIONS, help="also run ours with a mechanism switched (last column)")
    p.add_argument("--chunked-reference", action="store_true",
                   help="also run transformers + peft with a chunked, checkpointed loss (see the docstring)")
    args = p.parse_args()
    global CONFIG
    CONFIG = CONFIGS / args.config / "config.json"
    if args.system:
        print(json.dumps(measure(args)))
        return
    name = "tiny" if args.tiny else args.config
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"long-context LoRA step, {name} shapes, one sequence per step, r=16, checkpointing on, {gpu}, "
          f"mean of {args.steps} steps after one warm-up")
    print(f"{'tokens':>8}{'ours tok/s':>12}{'ours GiB':>10}{'ref tok/s':>11}{'ref GiB':>9}{'speed':>8}{'memory':>8}"
          + (f"  {args.ablation} tok/s, GiB" if args.ablation else "")
          + ("  chunked-loss ref tok/s, GiB, speed, memory" if args.chunked_reference else ""))
    show = lambda r, key, fmt: "OOM" if r.get("oom") else format(r[key], fmt)  # noqa: E731
    for length in (int(n) for n in args.lengths.split(",")):
        ours, ref = run_one("ours", length, args), run_one("reference", length, args)
        both = not ours.get("oom") and not ref.get("oom")
        speed = f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if both else "-"
        memory = f"{ours['peak_gib'] / ref['peak_gib']:.2f}x" if both else "-"
        off = ""
        if args.ablation:
            abl = run_one(args.ablation, length, args)
            off = f"  {show(abl, 'tokens_per_s', ',.0f')}, {show(abl, 'peak_gib', '.2f')}"
        if args.chunked_reference:
            off += "  " + against(ours, run_one("reference-chunked", length, args))
        print(f"{length:>8}{show(ours, 'tokens_per_s', ',.0f'):>12}{show(ours, 'peak_gib', '.2f'):>10}"
              f"{show(ref, 'tokens_per_s', ',.0f'):>11}{show(ref, 'peak_gib', '.2f'):>9}{speed:>8}{memory:>8}{off}",
              flush=True)


if __name__ == "__main__":
    main()
