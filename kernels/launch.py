"""Launching the LoRA kernels: autotune tables, the fixed configs used untuned, and a launch cache.

Host time matters here: one LoRA linear is 5 kernel launches forward + backward, and for the smaller Phi-3
projections the Python around them takes as long as the GPU work. So the autotuner is consulted once per key
and later launches call the compiled kernel directly (`run`).
"""
import functools
import os

import torch
import triton

from kernels.gemm import _lora_gemm_kernel, _lora_gemm_tma_kernel
from kernels.lowrank import _lora_da_kernel, _lora_down_kernel, _lora_dy_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("LORA_AUTOTUNE", "1") == "1"  # False: first config of each list (fast GPU tests)
FAST_LAUNCH = os.environ.get("LORA_FAST_LAUNCH", "1") == "1"  # False: every launch through Triton's launcher
# Below this many tokens the first config is used untuned: tuning a small problem costs far more than it can win,
# and short unpadded batches (chat data) would otherwise tune every kernel for several small M buckets.
AUTOTUNE_MIN_M = 2048


def _cfg(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def _prune_gemm(configs, named_args, **kw):  # drop tiles far larger than the problem (tests, small M)
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(128, named_args["M"])]
    return keep or configs[:1]


_GEMM_CONFIGS = [_cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
                 _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
                 _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                 _cfg(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                 _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)]


def _tma_cfg(num_warps, num_stages, bm, bn, bk, subtile=True, flatten=False, group=8, warp_spec=False):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, SUBTILE=subtile, FLATTEN=flatten,
                              WARP_SPEC=warp_spec), num_warps=num_warps, num_stages=num_stages)


# 128 x 256 x 64 tiles, two consumer warpgroups: the shape cuBLAS-class Hopper GEMMs use for bf16. The warp-
# specialized one measured 0.59 ms against cuBLAS's 0.66 on the qkv dx GEMM but slower on o (NOTES-lora.md, v4).
_TMA_CONFIGS = [_tma_cfg(8, 3, 128, 256, 64), _tma_cfg(8, 4, 128, 256, 64), _tma_cfg(8, 3, 128, 256, 64, subtile=False),
                _tma_cfg(8, 3, 128, 256, 64, warp_spec=True), _tma_cfg(8, 4, 256, 128, 64), _tma_cfg(8, 4, 128, 128, 64)]
_TMA_PLAIN = _TMA_CONFIGS[0]
_TMA_SMALL = _tma_cfg(1, 1, 32, 32, 32, subtile=True, flatten=True)  # interpreter

# memory-bound skinny kernels: many programs and deep pipelines keep enough bytes in flight
_DOWN_CONFIGS = [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(8, 3, BLOCK_M=64, BLOCK_K=256), _cfg(4, 4, BLOCK_M=32, BLOCK_K=256),
                 _cfg(4, 6, BLOCK_M=32, BLOCK_K=128)]
_DY_CONFIGS = [_cfg(8, 3, BLOCK_N=128), _cfg(8, 4, BLOCK_N=64), _cfg(4, 3, BLOCK_N=64)]  # BLOCK_M fixed: _DY_ROWS
_DA_CONFIGS = [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(8, 3, BLOCK_M=64, BLOCK_K=256), _cfg(4, 6, BLOCK_M=32, BLOCK_K=128)]
_tuned = {
    "gemm": triton.autotune(_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R_PAD", "DROPOUT"],
                            prune_configs_by={"early_config_prune": _prune_gemm})(_lora_gemm_kernel),
    "tma": triton.autotune(_TMA_CONFIGS, key=["M_BUCKET", "N", "K", "R_PAD", "DROPOUT", "B_KMAJOR", "DTYPE"],
                           prune_configs_by={"early_config_prune": _prune_gemm})(_lora_gemm_tma_kernel),
    "down": triton.autotune(_DOWN_CONFIGS, key=["M_BUCKET", "K", "R"])(_lora_down_kernel),
    "dy": triton.autotune(_DY_CONFIGS, key=["M_BUCKET", "N", "R"])(_lora_dy_kernel),
    "da": triton.autotune(_DA_CONFIGS, key=["M_BUCKET", "K", "R"])(_lora_da_kernel),
}
_KERNELS = {"gemm": _lora_gemm_kernel, "tma": _lora_gemm_tma_kernel, "down": _lora_down_kernel,
            "dy": _lora_dy_kernel, "da": _lora_da_kernel}
_SMALL = dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=4, BLOCK_M=32)  # interpreter: small blocks, no autotune
_best = {}  # autotune key -> chosen config, read once per key so later launches skip the autotuner


def cdiv(a, b):
    return -(-a // b)  # plain ints: triton.cdiv is a constexpr function, microseconds per host-side call


def next_pow2(n):
    return 1 << (n - 1).bit_length()


def m_bucket(m: int) -> int:
    """Autotune key for the token count: powers of two, so batches of new lengths reuse a tuned config
    instead of re-running the autotuner (training on unpadded chat data sees a new M almost every step)."""
    return next_pow2(max(int(m), 16))


def _plain_config(name, dtype):
    """The config used untuned: the first of each list, shrunk for fp32 and for the interpreter."""
    if name == "tma":
        return _TMA_SMALL if INTERPRET else _TMA_PLAIN
    cfg = _tuned[name].configs[0]
    if INTERPRET:
        return triton.Config({k: v for k, v in _SMALL.items() if k in cfg.kwargs})
    if dtype == torch.float32:  # tiles of <= 64 and two stages: fp32 tiles are twice the bytes of 16-bit ones
        small = {k: min(v, 64) if k.startswith("BLOCK_") else v for k, v in cfg.kwargs.items()}
        return triton.Config(small, num_warps=cfg.num_warps, num_stages=2)
    return cfg


def launch(name, grid, args, meta, dtype):
    """Launch kernel `name`: autotuned on the GPU (keys: shapes only, M bucketed), a fixed config under the
    interpreter, with AUTOTUNE off, for small M and for fp32 (a correctness path: see _plain_config). The first
    launch per autotune key goes through the autotuner; later ones reuse its choice directly (the autotuner's
    per-call bookkeeping costs host time)."""
    fn = _KERNELS[name]
    cfg = None
    tuned = AUTOTUNE and not INTERPRET and meta["M_BUCKET"] >= AUTOTUNE_MIN_M and dtype != torch.float32
    if name == "tma" and not INTERPRET:
        # device-built TMA descriptors live in per-launch scratch memory from this allocator; Triton keeps it
        # per thread (a context variable) and autograd runs the backward on its own thread, so set it every time
        triton.set_allocator(_scratch)
    if tuned:
        tuner = _tuned[name]
        key = (name, dtype) + tuple(meta[k] if k in meta else args[fn.arg_names.index(k)] for k in tuner.keys)
        cfg = _best.get(key)
        if cfg is None:
            tuner[grid](*args, **meta)
            _best[key] = tuner.best_config
            return
    cfg = cfg or _plain_config(name, dtype)
    full = {**meta, **cfg.kwargs}
    opts = {} if INTERPRET else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    run(fn, grid(full), args, full, opts)


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")  # the current device: callers set it (x's GPU)


_compiled = {}  # (kernel, argument specialization, constexprs) -> compiled kernel


def _spec(v):
    """Launch-cache key of one argument: tensors by dtype and 16-byte alignment (what Triton specializes them on),
    everything else by value (a superset of Triton's integer specializations: a new value costs one pass through
    Triton's own launcher, which finds its compiled kernel)."""
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16 == 0
    return v


def run(fn, grid, args, meta, opts):
    """fn[grid](*args, **meta, **opts); after the first launch of a specialization the compiled kernel is called
    directly, skipping Triton's per-launch argument binding (tens of microseconds of Python per launch, which
    for the smaller projections is as long as the GPU work). FAST_LAUNCH = False: always through Triton."""
    if INTERPRET or not FAST_LAUNCH:
        fn[grid](*args, **meta, **opts)
        return
    # compiled kernels are loaded per GPU: the device is part of the key (one process may drive several GPUs)
    key = (fn, args[0].device, tuple(map(_spec, args)), tuple(meta.items()), tuple(opts.items()))
    hit = _compiled.get(key)
    if hit is None:
        if len(_compiled) > 10_000:  # keys hold sizes by value: bound the cache over many batch shapes
            _compiled.clear()
        kernel = fn[grid](*args, **meta, **opts)
        _compiled[key] = kernel, [meta[n] for n in fn.arg_names[len(args):]]  # constexprs follow the runtime args
        return
    kernel, tail = hit
    kernel[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)


@functools.lru_cache(maxsize=None)
def capability(device):
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def num_sms(device):
    return 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count
