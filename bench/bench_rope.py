"""RoPE on q and k: kernels/rope.py's Triton kernel vs the torch ops it replaces, and SDPA on its output layout.

    python3 bench/bench_rope.py        # NVIDIA GPU; Phi-3-mini (32/32 heads, hd 96) and -medium (40/10, hd 128)

Prints forward and forward+backward times of both backends at B 4 x T 2048, a sweep of the kernel's tile size,
and SDPA's forward+backward on the (B, T, H, D)-strided views rope_qk returns vs contiguous (B, H, T, D).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from phi3.kernels import rope  # noqa: E402
from triton.testing import do_bench  # noqa: E402

time_ms = lambda fn: do_bench(fn, return_mode="median")  # noqa: E731
from phi3.ops import rope_qk  # noqa: E402

B, T = 4, 2048
for nh, nkv, hd in [(32, 32, 96), (40, 10, 128)]:
    W = (nh + 2 * nkv) * hd
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    qkv = r(B, T, W).requires_grad_()
    cos, sin = r(B, T, hd), r(B, T, hd)
    grads = [r(B, T, n, hd).transpose(1, 2) for n in (nh, nkv, nkv)]

    def forward(backend):
        with torch.no_grad():
            rope_qk(qkv, cos, sin, nh, nkv, hd, backend=backend)

    def forward_backward(backend):
        torch.autograd.backward(rope_qk(qkv, cos, sin, nh, nkv, hd, backend=backend), grads)

    mb = B * T * W * 2 / 1e6
    for backend in ("torch", "triton"):
        f, fb = time_ms(lambda: forward(backend)), time_ms(lambda: forward_backward(backend))
        print(f"{nh}/{nkv}/{hd} {backend}: fwd {f * 1e3:.0f} us, fwd+bwd {fb * 1e3:.0f} us (qkv {mb:.0f} MB)")
    default = rope._TILE
    for tile in (128, 256, 512, 1024, 2048):
        rope._TILE = tile
        print(f"  tile {tile}: fwd+bwd {time_ms(lambda: forward_backward('triton')) * 1e3:.0f} us")
    rope._TILE = default
    q, k, v = [t.detach().requires_grad_() for t in rope_qk(qkv, cos, sin, nh, nkv, hd)]

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nh != nkv)
        torch.autograd.backward(out, grads[0])
    contiguous = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    for name, qkv_set in (("(B, T, H, D) views", (q, k, v)), ("(B, H, T, D) contiguous", contiguous)):
        print(f"  SDPA fwd+bwd on {name}: {time_ms(lambda: sdpa(*qkv_set)) * 1e3:.0f} us")
