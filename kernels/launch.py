"""Launching the LoRA kernels: autotune tables, the fixed configs used untuned, and launches bound to a config.

One LoRA linear is 5 kernel launches forward + backward, so the autotuner is consulted once per key, and each
launch site keeps its kernel, config and grid for the problem at hand (`cached`, `Bound`): a repeat call
allocates its outputs and launches through Triton's own launcher. (A private launcher that skipped Triton's
argument binding was removed: it bought 0.1 % of a Phi-3-mini training step on an H200, bench/README.md.)

Compiling: Triton compiles a kernel binary the first time a launch needs it, one after another on the launching
thread, ~1 s each for the TMA GEMM; a Phi-3 run needs dozens (each chosen config, forward and backward, dropout on
and off) and tuning needs every candidate config. `compile_ahead` compiles them all in parallel threads first,
and builds their launchers there too.
"""
import contextlib
import functools
import os
import queue
import threading

import torch
import triton

from .gemm import _lora_gemm_kernel, _lora_gemm_tma_kernel
from .lowrank import _lora_da_kernel, _lora_down_kernel, _lora_dy_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("LORA_AUTOTUNE", "1") == "1"  # False: first config of each list (fast GPU tests)
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


# 128 x 256 x 64 tiles, two consumer warpgroups: the shape cuBLAS-class Hopper GEMMs use for bf16. Each config
# here was the fastest on at least one Phi-3-mini GEMM in a sweep (bench/NOTES-lora.md, v5); the warp-specialized
# ones (a producer warp feeding the tensor cores while the consumers run the epilogue) won on qkv, down and o.
_TMA_CONFIGS = [_tma_cfg(8, 3, 128, 256, 64), _tma_cfg(8, 4, 128, 256, 64), _tma_cfg(8, 3, 128, 256, 64, subtile=False),
                _tma_cfg(8, 4, 128, 256, 64, warp_spec=True), _tma_cfg(8, 3, 128, 256, 64, subtile=False, warp_spec=True),
                _tma_cfg(8, 4, 128, 256, 64, group=4, warp_spec=True), _tma_cfg(8, 5, 128, 128, 64, warp_spec=True)]
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
_best = {}  # autotune key (`choice_key`) -> chosen config, read once per key so later launches skip the autotuner
_raw_stream = torch._C._cuda_getCurrentRawStream if torch.cuda.is_available() else None


def time_ms(fn, reps=7):
    """Median GPU time of fn() over reps runs after a warm-up run (which also compiles and autotunes)."""
    fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)[reps // 2]


def cdiv(a, b):
    return -(-a // b)  # plain ints: triton.cdiv is a constexpr function, microseconds per host-side call


def next_pow2(n):
    return 1 << (n - 1).bit_length()


def choice_key(head, fields):
    """Key of a timed choice, as tuning records hold it (kernels/tuning.py): "head NAME=value ...", no device."""
    return " ".join([head] + [f"{name}={value}" for name, value in fields])


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
    """Launch kernel `name` and return it bound to this problem's config and grid (`Bound`; None after an
    autotuning run). Autotuned on the GPU (keys: shapes only, M bucketed); a fixed config under the interpreter,
    with AUTOTUNE off, for small M and for fp32 (a correctness path: see _plain_config). Each autotune key is
    tuned once; later launches reuse its choice without the autotuner's per-call bookkeeping."""
    fn = _KERNELS[name]
    cfg = None
    tuned = AUTOTUNE and not INTERPRET and meta["M_BUCKET"] >= AUTOTUNE_MIN_M and dtype != torch.float32
    if name == "tma" and not INTERPRET:
        triton.set_allocator(_scratch)  # see Bound.__call__
    if tuned:
        tuner = _tuned[name]
        key = choice_key(name, [("dtype", dtype)] + [(k, meta[k] if k in meta else args[fn.arg_names.index(k)])
                                                     for k in tuner.keys])
        cfg = _best.get(key)
        if cfg is None and _ahead is not None:  # every config the autotuner will time, passed as it passes them
            for candidate in _candidates(name, args):
                _ahead.add(fn, args, {**meta, **candidate.all_kwargs()})
            return None
        if cfg is None:
            tuner[grid](*args, **meta)
            _best[key] = tuner.best_config
            return None
    cfg = cfg or _plain_config(name, dtype)
    full = {**meta, **cfg.kwargs}
    grid = (tuple(grid(full)) + (1, 1))[:3]
    opts = {} if INTERPRET else _options(cfg)
    if _ahead is not None:
        _ahead.add(fn, args, {**full, **opts})
        return None
    bound = Bound(fn, grid, full, opts, name == "tma" and not INTERPRET)
    bound(args)
    return bound


def _options(cfg):
    """A config's compile options (num_warps, num_ctas, num_stages, ...) as the autotuner passes them when it times
    the config: Triton keys its binaries by the options as passed, so a launch that left out num_ctas=1 would not
    find the binary compiled for the same config ahead or while tuning, and would load it again."""
    return {k: v for k, v in cfg.all_kwargs().items() if k not in cfg.kwargs}


def plain(fn, grid, *args, **meta):
    """Launch a kernel that has one config (RMSNorm, RoPE, SwiGLU); inside compile_ahead, note its binary."""
    if _ahead is not None:
        _ahead.add(fn, args, meta)
    else:
        fn[grid](*args, **meta)


def _candidates(name, args):
    """The configs the autotuner times for these arguments (after its pruning)."""
    configs = _tuned[name].configs
    if name in ("gemm", "tma"):
        configs = _prune_gemm(configs, dict(zip(_KERNELS[name].arg_names, args)))
    return configs


class _Binaries:
    """The kernel binaries launches asked for inside compile_ahead, each once: Triton specializes a binary on each
    tensor's dtype and 16-byte alignment, each int's class (1, a multiple of 16, its width), the constexprs and the
    options. `start` compiles them in worker threads, `wait` returns when all are done."""

    def __init__(self):
        self.jobs = {}
        self.threads, self.errors = [], []

    def add(self, fn, args, kwargs):
        skip = {fn.arg_names[i] if type(i) is int else i for i in getattr(fn, "do_not_specialize", ())}
        spec = []
        for name, value in zip(fn.arg_names, args):
            if hasattr(value, "data_ptr"):
                if value.data_ptr() % 16:
                    return  # (never seen: allocations are aligned) compiled at its launch instead
                spec.append(str(value.dtype))
            elif type(value) is int:
                spec.append((name in skip or value == 1, name in skip or value % 16 == 0, -2**31 <= value < 2**31))
            else:
                spec.append(type(value).__name__ if type(value) is float else value)
        key = (fn, tuple(spec), tuple(sorted(kwargs.items())))
        if key not in self.jobs:
            # a dtype stands for a tensor in a warmup: an aligned one of that dtype, no memory held
            self.jobs[key] = (fn, [v.dtype if hasattr(v, "data_ptr") else v for v in args], kwargs)

    def start(self, device, threads=None):
        """Compile the noted binaries in `threads` daemon threads (one per core by default): a run that stops on an
        error meanwhile exits at once, without waiting for them."""
        for fn in {fn for fn, _, _ in self.jobs.values()}:
            fn.cache_key  # its source hash, computed here once: older Triton computes it unlocked, and racing threads
            # then key some binaries by a placeholder (they compile again at their launch, and could match stale code)
        todo = queue.SimpleQueue()
        for job in self.jobs.values():
            todo.put(job)

        def work():
            if device.type == "cuda":  # a new thread's current device is the first GPU
                torch.cuda.set_device(torch.cuda.current_device() if device.index is None else device.index)
            while True:
                try:
                    fn, args, kwargs = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    binary = fn.warmup(*args, grid=(1,), **kwargs)
                except Exception as e:  # raised by wait(), as the launch would raise it
                    self.errors.append(e)
                    continue
                try:
                    # Triton loads a binary onto the GPU and builds its launcher at its first launch, on the
                    # launching thread; Triton 3.6's launcher is a C extension per signature built with the host's C
                    # compiler (a fifth of a second each, 14 in a Phi-3 run's first step when its cache is cold)
                    getattr(binary, "_init_handles", lambda: None)()
                except Exception:  # (too large for this GPU, say) left to the launch, which raises it or, while
                    pass  # tuning, skips that config
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = [threading.Thread(target=work, name="compile-ahead", daemon=True)
                        for _ in range(min(threads or min(32, cores), len(self.jobs)))]
        for thread in self.threads:
            thread.start()

    def wait(self):
        """Return when every binary is compiled; the first compile error is raised here."""
        for thread in self.threads:
            thread.join()
        if self.errors:
            raise self.errors[0]


_ahead = None  # the _Binaries being collected while compile_ahead is active


def compiling_ahead() -> bool:
    return _ahead is not None


@contextlib.contextmanager
def compile_ahead(device, wait=True, threads=None):
    """Inside the block, launches run nothing (their outputs are garbage, random draws are undone) and note the
    binaries they would need: the chosen config, or every candidate of a choice still to be timed. On leaving,
    those are compiled in `threads` parallel threads (Triton's compiler releases the GIL for much of its work) into
    Triton's caches, where later launches find them; with wait=False compiling goes on after the block, and the
    yielded object's wait() waits for it."""
    global _ahead
    binaries = _Binaries()
    if INTERPRET or device.type != "cuda":
        yield binaries
        return
    _ahead = binaries
    try:
        with torch.random.fork_rng([device]):  # what the block draws (inputs, dropout seeds) is handed back
            yield binaries
    finally:
        _ahead = None
    binaries.start(device, threads)
    if wait:
        binaries.wait()


class Bound:
    """A kernel with its config, constexprs and grid fixed for one problem; a call launches it on new tensors."""
    __slots__ = ("fn", "grid", "meta", "opts", "scratch")

    def __init__(self, fn, grid, meta, opts, scratch):
        self.fn, self.grid, self.meta, self.opts, self.scratch = fn, grid, meta, opts, scratch

    def __call__(self, args):
        if self.scratch:
            # device-built TMA descriptors live in scratch memory from this allocator; Triton keeps it per thread
            # (a context variable) and autograd runs the backward on its own thread, so set it every time
            triton.set_allocator(_scratch)
        self.fn[self.grid](*args, **self.meta, **self.opts)


def cached(plan, site, name, args, setup, dtype):
    """Launch kernel `name` for launch site `site` of a problem whose shapes, strides, dtypes and alignments are
    fixed by `plan` (a dict the caller keeps per problem): the first call runs setup() -> (grid, meta) and goes
    through `launch`, later ones call the bound kernel."""
    bound = plan.get(site)
    if bound is None:
        grid, meta = setup()
        bound = launch(name, grid, args, meta, dtype)
        if bound is not None:
            plan[site] = bound
    else:
        bound(args)


_scratch_buffers = {}  # (device, stream, size) -> buffer: launches on one stream run one after another


def _scratch(size, alignment, stream):
    # the current device (callers set it to x's GPU) belongs in the key: every GPU's default stream is handle 0
    key = (torch.cuda.current_device(), stream, size)
    buf = _scratch_buffers.get(key)
    if buf is None:
        buf = _scratch_buffers[key] = torch.empty(size, dtype=torch.int8, device="cuda")
    return buf


_counters = {}  # (device, stream) -> int32 counters of the last-to-arrive sums, kept zeroed by the kernels


def counters(device, n):
    """At least n zeroed int32 counters for kernels on the current stream of `device`. The kernels that take a
    ticket reset it, so one buffer serves every launch on that stream (launches on one stream never overlap)."""
    if device.type != "cuda":
        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)  # interpreter: fresh each time
    key = (device, _raw_stream(device.index))
    buf = _counters.get(key)
    if buf is None or buf.numel() < n:
        buf = _counters[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


@functools.lru_cache(maxsize=None)
def capability(device):
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def num_sms(device):
    return 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count
