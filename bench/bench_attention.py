"""Causal attention alone: cuDNN's kernels against flash attention 2, both through torch's SDPA, at Phi-3-mini's
heads (32 x 96) over the row lengths that decide `phi3.attention.cudnn_from_tokens`.

    python3 bench/bench_attention.py                      # batch x tokens: 4x2048 1x2048 1x4096 ... 1x131072
    python3 bench/bench_attention.py --shapes 1x16384
    python3 bench/bench_attention.py --heads 24 --kv-heads 8 --head-dim 128 --shapes 2x4096   # Phi-4-mini

q, k, v and the output gradient are (B, heads, T, hd) views of (B, T, heads, hd) memory, as the model hands them
over. Prints the forward and forward + backward milliseconds of each (CUDA events, mean of n calls after one).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = "4x2048,1x2048,1x4096,2x4096,1x8192,1x16384,1x32768,1x131072"


def milliseconds(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=SHAPES, help="batch x tokens, comma-separated")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=0, help="key/value heads (grouped-query attention); 0: --heads")
    p.add_argument("--head-dim", type=int, default=96)
    args = p.parse_args()
    kv_heads = args.kv_heads or args.heads
    print(f"causal attention, {args.heads} query / {kv_heads} key-value heads x {args.head_dim}, bf16, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    for shape in args.shapes.split(","):
        batch, tokens = (int(n) for n in shape.split("x"))
        make = lambda heads: torch.randn(batch, tokens, heads, args.head_dim, device="cuda",  # noqa: E731
                                         dtype=torch.bfloat16).transpose(1, 2)
        q, k, v, grad = make(args.heads), make(kv_heads), make(kv_heads), make(args.heads)
        attend = lambda *qkv: F.scaled_dot_product_attention(*qkv, is_causal=True,  # noqa: E731
                                                             enable_gqa=kv_heads != args.heads)
        calls = 20 if tokens <= 16384 else 3
        row = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(backend):
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                forward = milliseconds(lambda: attend(q, k, v), calls)
                both = milliseconds(lambda: attend(*leaves).backward(grad), calls)
            row[name] = (forward, both)
        print(f"{shape:>9}: " + " | ".join(f"{name} forward {f:7.2f} ms, + backward {b:8.2f} ms"
                                          for name, (f, b) in row.items())
              + f" | flash / cudnn {row['flash'][1] / row['cudnn'][1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
