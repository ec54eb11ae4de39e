"""Benchmark one LoRA linear, forward + backward (dx, dA, dB), at Phi-3-mini shapes (GPU only).

    python bench/bench_lora.py                 # M=8192 tokens, r=16, bf16, all four projections
    python bench/bench_lora.py --m 4096 --r 64

Columns (ms; each variant timed with triton.testing.do_bench, L2 flushed between calls, 3 rotating input sets,
in 5 interleaved rounds (--rounds); the median round is reported):
  a   frozen linear alone: cuBLAS forward + dx (the floor)
  b   peft-style: base in bf16, adapter path in fp32 (x cast up), result added in fp32 and cast back
  b'  all-bf16 torch LoRA (kernels.lora_linear_reference with autograd)
  c   kernels.lora_linear as shipped (GEMM="auto": per shape, the kind and configs kernels/choices.py's table names,
      the TMA Triton GEMM or the cuBLAS hybrid)
  c_ptr  GEMM="triton" (pointer-load Triton GEMM)      c_cub  GEMM="cublas" (cuBLAS + low-rank term)
graph = the same step replayed from a CUDA graph: GPU time alone. The do_bench columns also hold host time
wherever Python and launches take longer than the GPU work (the o projection: see bench/NOTES-lora.md).
peak = extra peak memory of one fwd+bwd over the live inputs, MiB.
"""
import argparse
import importlib
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from phi3.ops import lora_linear, lora_linear_reference  # noqa: E402

ll = importlib.import_module("phi3.kernels.lora_linear")
SHAPES = {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384), "down": (8192, 3072)}


# Each variant gets (x, W, A, B, s): W as the frozen layer holds it.
def frozen(x, w, a, b, s):
    return F.linear(x, w)


def peft_style(x, w, a, b, s):
    result = F.linear(x, w)
    xa = x.to(a.dtype)  # peft casts the input to the adapter's dtype (fp32)
    return (result + F.linear(F.linear(xa, a), b) * s).to(x.dtype)


def bf16_torch(x, w, a, b, s):
    return lora_linear_reference(x, w, a, b, s)


def fused(gemm):
    def f(x, w, a, b, s):
        ll.GEMM = gemm
        return lora_linear(x, w, a, b, s)
    return f


def prepare(fn, sets, s, with_lora):
    """One variant's fwd+bwd step (rotating input sets), its extra peak memory (MiB) and the same step captured
    in a CUDA graph (GPU time alone: no Python, no launch gaps)."""
    i = [0]

    def step():
        x, w, a, b, dy = sets[i[0] % len(sets)]
        i[0] += 1
        y = fn(x, w, a, b, s)
        torch.autograd.grad(y, [x, a, b] if with_lora else [x], dy)

    step()  # compiles
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        step()
    return step, peak, graph


def measure(prepared, rounds):
    """Median ms per variant over `rounds` interleaved rounds (each round times every variant once, called from
    Python and replayed from its graph): clock and power drift over the run then hits all variants alike."""
    times = {v: ([], []) for v in prepared}
    for _ in range(rounds):
        for v, (step, _, graph) in prepared.items():
            times[v][0].append(triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median"))
            times[v][1].append(triton.testing.do_bench(graph.replay, warmup=10, rep=60, return_mode="median"))
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return {v: (med(called), prepared[v][1], med(replayed)) for v, (called, replayed) in times.items()}


def parts(m, k, n, r):
    """Per-kernel medians for one shape: where the time above goes."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
    a = torch.randn(r, k, device=dev) / k**0.5
    b = torch.randn(n, r, device=dev) / r**0.5
    dy = torch.randn(m, n, device=dev, dtype=dt)
    s_ = ll._lora_down(x, a, 0, 0.0)
    g, _, _ = ll._lora_skinny_backward(x, dy, a, b, s_, 2.0, 0, 0.0)
    t = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
    out = {"mm x W^T": t(lambda: x @ w.t()), "mm dy W": t(lambda: dy @ w),
           "S=xA^T": t(lambda: ll._lora_down(x, a, 0, 0.0)),
           "dy+dA passes": t(lambda: ll._lora_skinny_backward(x, dy, a, b, s_, 2.0, 0, 0.0))}
    for gemm in ("auto", "cublas"):
        ll.GEMM = gemm
        out[f"fwd gemm {gemm}"] = t(lambda: ll._gemm("fwd", x, w.t(), s_, b.t(), 2.0, dt))
        out[f"dx gemm {gemm}"] = t(lambda: ll._gemm("dx", dy, w, g, a, 1.0, dt))
    out["GB/s of S (x read)"] = x.numel() * 2 / out["S=xA^T"] / 1e6
    out["GB/s of dy+dA (dy, x read)"] = (dy.numel() + x.numel()) * 2 / out["dy+dA passes"] / 1e6
    print(f"parts M={m} {k}->{n} r={r}: " + "  ".join(f"{kk}={v:.3f}" for kk, v in out.items()), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--variants", default="a,b,b',c,c_cub")
    ap.add_argument("--parts", action="store_true", help="also time each kernel for every shape")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians are reported)")
    args = ap.parse_args()
    dev, dt, s = "cuda", torch.bfloat16, 2.0
    fns = {"a": frozen, "b": peft_style, "b'": bf16_torch, "c": fused("auto"), "c_ptr": fused("triton"),
           "c_cub": fused("cublas")}
    variants = args.variants.split(",")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"M={args.m} r={args.r} bf16, A/B fp32")
    rows = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        if args.parts:
            parts(args.m, k, n, args.r)
        sets = []
        for _ in range(3):
            x = torch.randn(args.m, k, device=dev, dtype=dt, requires_grad=True)
            w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
            a = (torch.randn(args.r, k, device=dev) / k**0.5).requires_grad_()
            b = (torch.randn(n, args.r, device=dev) / args.r**0.5).requires_grad_()
            sets.append((x, w, a, b, torch.randn(args.m, n, device=dev, dtype=dt)))
        res = measure({v: prepare(fns[v], sets, s, v != "a") for v in variants}, args.rounds)
        flop = 4 * args.m * k * n  # fwd + dx of the frozen GEMM
        cells = "  ".join(f"{v}={ms:.3f}ms/{pk:.0f}MiB(graph {gr:.3f})" for v, (ms, pk, gr) in res.items())
        x, w, a, b, _ = sets[0]
        with torch.no_grad():  # the tuned kernels compute the right thing (tests run one fixed config)
            ref = lora_linear_reference(x.double(), w.double(), a.double(), b.double(), s)
            for v in ("c", "c_cub"):
                if v in res:
                    y = fns[v](x, w, a, b, s).double()
                    bf = bf16_torch(x, w, a, b, s).double()
                    cells += f"  relerr {v} {((y - ref).norm() / ref.norm()).item():.2e} (b' {((bf - ref).norm() / ref.norm()).item():.2e})"
        print(f"{name:8s} {cells}   a: {flop / res['a'][0] / 1e9:.0f} TFLOP/s" if "a" in res else cells, flush=True)
        rows.append((name, res))
        del sets
        torch.cuda.empty_cache()
    print("\n| shape | a ms | b ms | b' ms | c ms | c_cub ms | c/a | b/c | graph a / c ms | graph c/a | "
          "graph c_cub/a | peak MiB a / b / b' / c |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        g = lambda v: r[v][0] if v in r else float("nan")
        pk = lambda v: f"{r[v][1]:.0f}" if v in r else "-"
        gr = lambda v: r[v][2] if v in r else float("nan")
        bp = "b'"
        print(f"| {name} | {g('a'):.3f} | {g('b'):.3f} | {g(bp):.3f} | {g('c'):.3f} | {g('c_cub'):.3f} | "
              f"{g('c') / g('a'):.3f} | {g('b') / g('c'):.2f} | {gr('a'):.3f} / {gr('c'):.3f} | {gr('c') / gr('a'):.3f} | "
              f"{gr('c_cub') / gr('a'):.3f} | {pk('a')} / {pk('b')} / {pk(bp)} / {pk('c')} |")


if __name__ == "__main__":
    main()
