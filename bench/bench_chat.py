"""Variable-length chat training: real tokens/s of this project with packing vs transformers + peft with padding.

    python3 bench/bench_chat.py                 # Phi-3-mini shapes on an NVIDIA GPU, 8 optimizer steps
    python3 bench/bench_chat.py --tiny --device cpu --steps 2   # a smoke run of the same code on the CPU

Workload (issue 12, item 4): each optimizer step takes 16 examples whose lengths are drawn lognormal (median
400, sigma 0.9) and clipped to [50, 2048]; only real tokens count. transformers + peft: micro-batches of 4
examples, each padded to its longest, gradient checkpointing on (its 2,843 tokens/s and 12.1 GiB on the H200 were
the first baseline). This project: the same 16 examples packed (phi3/data.py, per-document attention, positions
restarting) into single-row micro-batches of about --row-tokens tokens (8192): as few rows as hold the step's
tokens, the examples balanced across them (longest first into the lightest row), each row rounded up to 64 tokens,
so almost nothing is padding and no micro-batch is a small remainder. `--rows 4` packs into rows of 2048 instead, 4
per micro-batch (the earlier way: ~88 % full rows, and a step of one 4-row and one 1-row micro-batch).
Checkpointing on, LoRA r=16 on qkv/o/gate_up/down, AdamW. Each system runs in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from side_by_side import run_each  # bench/ itself: the script's folder is on sys.path
from systems import hf_random, ours_config, ours_lora, peft_lora

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIG = REPO / "assets" / "configs" / "phi3-mini-4k-instruct" / "config.json"
TINY = dict(hidden_size=192, intermediate_size=448, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6)
ROW = 2048


def step_examples(steps: int, per_step: int = 16, seed: int = 0) -> list[list[list[int]]]:
    """Token ids of each step's examples (random ids; speed does not depend on them)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(400), 0.9, size=(steps, per_step))), 50, ROW).astype(int)
    return [[rng.integers(0, 32000, size=n).tolist() for n in row] for row in lengths]


def balanced_rows(examples: list, row_tokens: int) -> list[list]:
    """The examples in ceil(tokens / row_tokens) rows, each example (longest first) into the row with fewest tokens."""
    rows = [[] for _ in range(max(1, -(-sum(len(e.ids) for e in examples) // row_tokens)))]
    for e in sorted(examples, key=lambda e: -len(e.ids)):
        min(rows, key=lambda row: sum(len(d.ids) for d in row)).append(e)
    return rows


def ours(args, device):
    from phi3.data import Example, make_batches
    from train import MicroBatchLoss, accumulate_gradients

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = ours_lora(ours_config(CONFIG, TINY if args.tiny else None), device, dtype)
    loss_of = MicroBatchLoss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")

    def step(examples):
        examples = [Example(ids, [True] * len(ids)) for ids in examples]
        if args.rows:
            packed = make_batches(examples, args.rows, ROW, 0, packing=True, shuffle=False, seed=0)
        else:
            packed = [make_batches(row, 1, -(-sum(len(e.ids) for e in row) // 64) * 64, 0, packing=True,
                                   shuffle=False, seed=0)[0] for row in balanced_rows(examples, args.row_tokens)]
        accumulate_gradients(loss_of, packed, device, contextlib.nullcontext)  # bf16 weights: no autocast
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def reference(args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = peft_lora(hf_random(CONFIG, TINY if args.tiny else None, device, dtype))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")

    def step(examples):
        real = sum(len(e) for e in examples)
        for i in range(0, len(examples), 4):
            group = examples[i:i + 4]
            width = max(len(e) for e in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for r, e in enumerate(group):
                ids[r, :len(e)], mask[r, :len(e)] = torch.tensor(e), 1
            labels = ids.masked_fill(mask == 0, -100)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            # token-weighted over the step, as ours: this micro-batch's tokens / the step's
            (out.loss * (int(mask[:, 1:].sum()) / max(real - len(examples), 1))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(system: str, args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    step = (ours if system == "ours" else reference)(args, device)
    data = step_examples(args.steps + 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for examples in data:  # the first 2 steps warm up (autotuning, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(examples)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    real = sum(len(e) for examples in data[2:] for e in examples)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"system": system, "real_tokens_per_s": real / sum(times[2:]), "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["ours", "reference"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="a 4-layer model (smoke runs on the CPU)")
    p.add_argument("--rows", type=int, default=0, help="this project's packed rows of 2048 per micro-batch (0: "
                   "single-row micro-batches of about --row-tokens)")
    p.add_argument("--row-tokens", type=int, default=8192, help="tokens a single-row micro-batch aims at")
    args = p.parse_args()
    if args.system:
        print(json.dumps(measure(args.system, args)))
        return
    flags = ["--steps", str(args.steps), "--device", args.device, "--rows", str(args.rows), "--row-tokens",
             str(args.row_tokens)] + (
        ["--tiny"] if args.tiny else [])
    results = run_each(__file__, ("ours", "reference"), flags)
    a, b = results["ours"], results["reference"]
    print(f"variable-length chat, 16 examples per step (lognormal median 400, sigma 0.9, [50, 2048]), "
          f"{'tiny' if args.tiny else 'Phi-3-mini'} shapes, {args.steps} steps")
    packing = f"{args.rows} rows of {ROW} per micro-batch" if args.rows else f"single rows of ~{args.row_tokens}"
    print(f"ours (packed, {packing}): {a['real_tokens_per_s']:,.0f} real tokens/s, "
          f"{a['peak_gib']:.2f} GiB; transformers+peft (padded): {b['real_tokens_per_s']:,.0f}, {b['peak_gib']:.2f} GiB; ratio "
          f"{a['real_tokens_per_s'] / b['real_tokens_per_s']:.2f}x (target 6x)")


if __name__ == "__main__":
    main()
