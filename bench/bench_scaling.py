"""Data-parallel scaling of a LoRA training step: N torchrun processes (one GPU each) vs one, side by side.

    python3 bench/bench_scaling.py --gpus 2                # Phi-3-mini shapes, 4 x 2048 tokens per GPU, r=16
    python3 bench/bench_scaling.py --gpus 2 --tiny --device cpu   # a smoke run of the same code on CPUs (gloo)

Each configuration runs in its own torchrun job: train.py's pieces (MicroBatchLoss, phi3.distributed's DDP with
its summing hook, fused AdamW), random bf16 weights, every token trained, gradient checkpointing on, the same
per-process batch. Prints tokens/s of each and the scaling ratio (the issue's target: >= 1.9x on two GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIG = REPO / "assets" / "configs" / "phi3-mini-4k-instruct" / "config.json"
TINY = dict(hidden_size=192, intermediate_size=448, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6)


def worker(args) -> dict:
    import dataclasses

    from phi3 import Phi3Config, Phi3ForCausalLM, distributed
    from phi3.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable
    from phi3.model import Recompute
    from train import MicroBatchLoss

    world, device = distributed.init(args.device)
    config = Phi3Config.from_json(CONFIG)
    if args.tiny:
        config = dataclasses.replace(config, **TINY)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config, Recompute() if device.type == "cuda" else None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to_empty(device=device).to(dtype)
    model.init_weights(seed=0)
    add_lora(model, LoRAConfig(rank=16, alpha=32, dropout=0.05))
    mark_only_lora_as_trainable(model)
    model.train()
    loss_of = distributed.data_parallel(MicroBatchLoss(model), world, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    torch.manual_seed(world.rank)
    ids = torch.randint(0, 32000, (args.batch, args.seq), device=device)
    labels, positions = torch.roll(ids, -1, dims=1), torch.arange(args.seq, device=device).expand(args.batch, -1)
    times = []
    for _ in range(args.steps + 2):  # 2 warm-up steps (autotuning, allocator, NCCL setup)
        distributed.barrier(world)
        start = time.perf_counter()
        (loss_of(ids, positions, None, labels) / labels.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = sorted(times[2:])[len(times[2:]) // 2]
    result = {"processes": world.size, "tokens_per_s": world.size * args.batch * args.seq / step_s, "step_s": step_s}
    distributed.shutdown(world)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="a 4-layer model (smoke runs on CPUs)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = worker(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        return
    flags = ["--worker", "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
             "--device", args.device] + (["--tiny"] if args.tiny else [])
    results = {}
    for n in (1, args.gpus):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                              __file__, *flags], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{n} processes failed:\n{out.stderr[-3000:]}")
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    one, many = results[1], results[args.gpus]
    print(f"LoRA step, {'tiny' if args.tiny else 'Phi-3-mini'} shapes, {args.batch} x {args.seq} tokens per process, "
          f"median of {args.steps} steps")
    print(f"1 process: {one['tokens_per_s']:,.0f} tokens/s; {args.gpus} processes: {many['tokens_per_s']:,.0f} tokens/s; "
          f"scaling {many['tokens_per_s'] / one['tokens_per_s']:.2f}x (ideal {args.gpus}.00x)")


if __name__ == "__main__":
    main()
