"""Where a training step's GPU time goes, by kernel family, against the step's wall time and the matmul ceiling.

    python bench/profile_step.py                                     # ours, Phi-3-mini shapes, batch 4 x 2048
    python bench/profile_step.py --config phi4-mini-instruct --system reference     # transformers + peft
    python bench/profile_step.py --system ours-nf4 --top 20          # a bench_train.py system, its 20 largest kernels

The step is bench_train.py's (same build, same workload: random bf16 weights, LoRA r16 on qkv/o/gate_up/down,
checkpointing on). Two warm-up steps, then --steps steps under torch.profiler. Each GPU kernel's time goes to the
first family whose name pattern it matches; the table gives ms per step and the share of the step's wall time (what
is not covered is the GPU waiting on the host, or kernels overlapping). The last line: the step's matmul work (the
frozen GEMMs forward, recomputed forward and input gradient, plus lm_head's; 2 FLOPs a multiply-add) over its wall
time, against the ~700 TFLOP/s cuBLAS reaches at these shapes on an H100 or H200 (DESIGN.md section 6).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch

import bench_train

FAMILIES = [  # (family, substrings of a kernel's name): the first that matches
    ("LoRA GEMMs (Triton)", ("_lora_gemm", "_nf4_gemm")),
    ("LoRA skinny kernels (Triton)", ("_lora_down", "_lora_dy", "_lora_da", "_dropout_mask")),
    ("attention", ("flash", "fmha", "attn", "cudnn", "sdpa")),  # before cuBLAS: flash kernels' names hold "cutlass"
    ("cuBLAS GEMMs", ("gemm", "xmma", "nvjet", "cutlass", "splitk")),
    ("RMSNorm, SwiGLU, RoPE (Triton)", ("_rms_norm", "_swiglu", "_rope")),
    ("DoRA (Triton)", ("_dora_norm", "_scale_fwd", "_scale_bwd")),
    ("cross-entropy", ("cross_entropy", "softmax", "nll_loss")),
    ("NF4 dequantize", ("_nf4_dequantize",)),
    ("optimizer", ("adam", "multi_tensor")),
    ("copies, casts, fills", ("memcpy", "memset", "copy", "fill")),
    ("other elementwise and reductions", ("elementwise", "vectorized", "reduce", "unrolled", "index", "scatter")),
]


def family(kernel_name: str) -> str:
    name = kernel_name.lower()
    return next((f for f, patterns in FAMILIES if any(p in name for p in patterns)), "other")


def matmul_flops(config, tokens: int) -> float:
    """The step's frozen matmul work: each layer's projections three times (forward, its recompute, the input
    gradient), lm_head twice (forward and input gradient: the loss computes it in the forward, no recompute)."""
    hd = config.hidden_size // config.num_attention_heads
    qkv = config.hidden_size * (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    mlp = 3 * config.hidden_size * config.intermediate_size
    per_layer = qkv + config.hidden_size * config.num_attention_heads * hd + mlp
    return 2 * tokens * (3 * config.num_hidden_layers * per_layer + 2 * config.hidden_size * config.vocab_size)


def profile(system: str, batch: int, seq: int, steps: int):
    """{kernel name: total device seconds}, the median step's wall seconds."""
    torch.manual_seed(0)
    if system.startswith("reference"):
        model, loss_fn = bench_train.build_reference(True, system == "reference-bnb", system.removeprefix("reference-"))
    else:
        model, loss_fn = bench_train.build_ours(True, None if system == "ours" else system)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    labels = torch.roll(ids, -1, dims=1)

    def step():
        loss_fn(ids, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    kernels = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] += event.device_time_total / 1e6  # microseconds
    return kernels, sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", default="ours", help="ours, reference, or another bench_train.py system")
    p.add_argument("--config", default="phi3-mini-4k-instruct", help="the model's shapes: a folder of assets/configs")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=0, help="also list the N kernels that take longest")
    args = p.parse_args()
    bench_train.CONFIG = bench_train.CONFIGS / args.config / "config.json"
    kernels, step_s = profile(args.system, args.batch, args.seq, args.steps)
    per_step = {name: t / args.steps for name, t in kernels.items()}
    families = defaultdict(float)
    for name, t in per_step.items():
        families[family(name)] += t
    tokens = args.batch * args.seq
    print(f"{args.system}, {args.config} shapes, batch {args.batch} x {args.seq}, {torch.cuda.get_device_name()}: "
          f"step {step_s * 1e3:.1f} ms, {tokens / step_s:,.0f} tokens/s")
    print(f"{'kernel family':36}{'ms/step':>10}{'% of step':>11}")
    for name, t in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"{name:36}{t * 1e3:10.1f}{100 * t / step_s:10.1f}%")
    print(f"{'all kernels':36}{sum(families.values()) * 1e3:10.1f}{100 * sum(families.values()) / step_s:10.1f}%")
    for name, t in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {t * 1e3:8.2f} ms  {family(name):32} {name[:100]}")
    from phi3 import Phi3Config
    flops = matmul_flops(Phi3Config.from_json(bench_train.CONFIG), tokens)
    print(f"frozen matmul work {flops / 1e12:.1f} TFLOP a step: {flops / step_s / 1e12:.0f} TFLOP/s over the step's "
          f"wall time; at ~700 TFLOP/s it alone would take {flops / 700e12 * 1e3:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
