"""DoRA's weight norm, || W[n, :] + s B[n, :] A || per output row, at Phi-3-mini shapes (GPU only): the Triton kernel
(kernels/dora.py, one pass over W) against torch and against the time to read W once.

    python bench/bench_dora_norm.py                  # r = 16, bf16 and NF4 W, the four projections
    python bench/bench_dora_norm.py --r 64 --configs  # also each dora-norm config, forced (one that overflows
                                                      # shared memory at that rank falls back: choices.launch_with)

Columns (us; triton.testing.do_bench medians, L2 flushed between calls):
  read W   W's bytes (bf16: 2 a weight; NF4: packed codes + absmax codes) at the bandwidth of a 1 GiB device copy
  kernel   phi3.ops.dora_weight_norm as shipped (the table's config, else the rule's), called from Python
  graph    the same launch replayed from a CUDA graph: GPU time alone, no host time
  torch    torch.linalg.vector_norm(W.float() + s * (B @ A), dim=1) (NF4: W dequantized to fp32 by torch first,
           dora_weight_norm's torch path)
ratios: graph / read W (1.0 = at memory bandwidth), torch / kernel.
"""
import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from phi3.kernels import choices  # noqa: E402
from phi3.nf4 import quantize  # noqa: E402
from phi3.ops import dora_weight_norm  # noqa: E402

SHAPES = {"qkv": (9216, 3072), "o": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)}  # (out, in)
time_us = lambda fn: 1e3 * do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731


def copy_bandwidth():
    """Bytes per second of a 1 GiB device-to-device copy, counting its reads and its writes."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_us(lambda: dst.copy_(src)) * 1e-6)


def nbytes(w):
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.packed.numel() + w.absmax_code.numel() * w.absmax_code.element_size()


def graphed(fn):
    """fn captured in a CUDA graph: its replay. A first call on the capture stream compiles and makes the launch's
    per-stream counters, so the graph holds the kernel alone."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    return graph.replay


def forced(option):
    """Every dora-norm launch takes `option` (a name of choices.CONFIGS["dora-norm"])."""
    choices.set_timer(lambda key, options, run: option)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--configs", action="store_true", help="also time the kernel with each config, forced")
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, r = {args.r}, "
          f"s = {args.scale}")
    print(f"{'layer':8} {'W':5} {'MB':>6} {'read W':>7} {'kernel':>7} {'graph':>7} {'torch':>8} "
          f"{'graph/read':>10} {'torch/kernel':>12}")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        a = torch.randn(args.r, k, device="cuda") / k**0.5
        b = torch.randn(n, args.r, device="cuda") / args.r**0.5
        for kind, w in (("bf16", dense), ("nf4", quantize(dense))):
            run = lambda: dora_weight_norm(w, a, b, args.scale)  # noqa: E731
            read = nbytes(w) / bandwidth * 1e6
            kernel, graph = time_us(run), time_us(graphed(run))
            torch_us = time_us(lambda: dora_weight_norm(w, a, b, args.scale, backend="torch"))
            print(f"{name:8} {kind:5} {nbytes(w) / 1e6:6.1f} {read:7.1f} {kernel:7.1f} {graph:7.1f} {torch_us:8.1f} "
                  f"{graph / read:10.2f} {torch_us / kernel:12.1f}")
            for option in choices.CONFIGS["dora-norm"] if args.configs else []:
                forced(option)
                try:
                    print(f"{'':8} {'':5} {option:>14}: graph {time_us(graphed(run)):7.1f} us")
                finally:
                    choices.set_timer(None)


if __name__ == "__main__":
    main()
