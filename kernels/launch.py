"""Launching the LoRA kernels: autotune tables, the fixed configs used untuned, and prepared launches.

Host time matters here: one LoRA linear is 5 kernel launches forward + backward, and for the smaller Phi-3
projections the Python around them took longer than the GPU work. So the autotuner is consulted once per key,
and each launch site keeps its kernel compiled for the problem at hand (`cached`, `Prepared`): a repeat call
allocates its outputs and goes straight to Triton's launcher.

Prepared calls Triton internals (requirements leave Triton's version open), so the first fast launch of each
kernel + config + device is checked against Triton's own launcher, bit for bit; if they ever disagree, a warning
says so and every later launch goes through Triton's launcher (`Slow`): slower on the host, never wrong.
"""
import functools
import os
import warnings

import torch
import triton
from triton import knobs

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
    "down": triton.autotune(_DOWN_CONFIGS, key=["M_BUCKET", "K", "R", "COPY"])(_lora_down_kernel),
    "dy": triton.autotune(_DY_CONFIGS, key=["M_BUCKET", "N", "R"])(_lora_dy_kernel),
    "da": triton.autotune(_DA_CONFIGS, key=["M_BUCKET", "K", "R"])(_lora_da_kernel),
}
_KERNELS = {"gemm": _lora_gemm_kernel, "tma": _lora_gemm_tma_kernel, "down": _lora_down_kernel,
            "dy": _lora_dy_kernel, "da": _lora_da_kernel}
_SMALL = dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=4, BLOCK_M=32)  # interpreter: small blocks, no autotune
_best = {}  # autotune key (`choice_key`) -> chosen config, read once per key so later launches skip the autotuner
# the arguments each kernel writes: what the fast-launch check compares (the counters reset themselves)
_WRITES = {"gemm": ("c_ptr",), "tma": ("c_ptr",), "down": ("s_ptr", "xs_ptr", "w_ptr"),
           "dy": ("gp_ptr", "g_ptr", "dbp_ptr", "count_ptr"), "da": ("dap_ptr", "da_ptr", "count_ptr", "db_ptr")}
_fast_checked = set()  # (kernel, config, device) whose fast launch wrote what Triton's launcher wrote
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
    """Launch kernel `name` and return it prepared for this problem (`Prepared`; None after an autotuning run).
    Autotuned on the GPU (keys: shapes only, M bucketed); a fixed config under the interpreter, with AUTOTUNE off,
    for small M and for fp32 (a correctness path: see _plain_config). Each autotune key is tuned once; later
    launches reuse its choice without the autotuner's per-call bookkeeping."""
    fn = _KERNELS[name]
    cfg = None
    tuned = AUTOTUNE and not INTERPRET and meta["M_BUCKET"] >= AUTOTUNE_MIN_M and dtype != torch.float32
    if name == "tma" and not INTERPRET:
        triton.set_allocator(_scratch)  # see Prepared.__call__
    if tuned:
        tuner = _tuned[name]
        key = choice_key(name, [("dtype", dtype)] + [(k, meta[k] if k in meta else args[fn.arg_names.index(k)])
                                                     for k in tuner.keys])
        cfg = _best.get(key)
        if cfg is None:
            tuner[grid](*args, **meta)
            _best[key] = tuner.best_config
            return None
    cfg = cfg or _plain_config(name, dtype)
    full = {**meta, **cfg.kwargs}
    grid = (tuple(grid(full)) + (1, 1))[:3]
    opts = {} if INTERPRET else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    slow = Slow(fn, grid, full, opts, name == "tma" and not INTERPRET)
    check = (name, str(cfg), args[0].device.index)
    if INTERPRET or not FAST_LAUNCH or (check not in _fast_checked and torch.cuda.is_current_stream_capturing()):
        slow(args)  # (no check inside a CUDA graph capture: it compares on the host)
        return slow
    writes = list({id(t): t for t in (args[fn.arg_names.index(n)] for n in _WRITES[name])}.values())
    before = [t.clone() for t in writes] if check not in _fast_checked else None
    kernel = fn[grid](*args, **full, **opts)
    tail = tuple(full[n] for n in fn.arg_names[len(args):])  # the constexprs follow the runtime arguments
    prepared = Prepared(kernel, grid, tail, args[0].device.index, name == "tma")
    if before is None or _fast_launch_agrees(prepared, args, writes, before, check):
        return prepared
    return slow


def _fast_launch_agrees(prepared, args, writes, before, check):
    """Run `prepared` on the inputs Triton's launcher just ran on (`writes` restored to `before`, which also
    covers outputs that are accumulated into) and compare what it writes bit for bit. On a difference or an
    error: Triton's results back in place, one warning, and Triton's launcher for every launch from now on."""
    global FAST_LAUNCH
    expected = [t.clone() for t in writes]
    for t, b in zip(writes, before):
        t.copy_(b)
    try:
        prepared(args)
        agrees = all(torch.equal(_bits(t), _bits(e)) for t, e in zip(writes, expected))
        why = "its outputs differ"
    except Exception as e:  # noqa: BLE001 - any failure of the fast path means: use Triton's own
        agrees, why = False, f"{type(e).__name__}: {e}"
    if agrees:
        _fast_checked.add(check)
        return True
    for t, e in zip(writes, expected):
        t.copy_(e)
    FAST_LAUNCH = False
    warnings.warn(f"kernels/launch.py: the fast kernel launch disagrees with Triton {triton.__version__}'s own "
                  f"launcher for kernel {check[0]!r} ({check[1]}) on cuda:{check[2]} ({why}); every launch now goes "
                  "through Triton's launcher (results are right, the host side is slower). Please report this "
                  f"message with torch {torch.__version__} to the project's maintainers (kernels/launch.py, "
                  "Prepared); LORA_FAST_LAUNCH=0 skips the fast path.", RuntimeWarning, stacklevel=3)
    return False


def _bits(t):
    """t's bits as integers: equal means identical (NaN == NaN, -0.0 != 0.0)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class Prepared:
    """A kernel compiled for one problem shape, config and grid fixed: a call launches it on new tensors and
    scalars through Triton's launcher alone, the way Triton's own runner does, minus its argument binding and
    device lookups (tens of microseconds of Python per launch, as long as the GPU work of a small projection)."""
    __slots__ = ("kernel", "grid", "tail", "device", "scratch")

    def __init__(self, kernel, grid, tail, device, scratch):
        self.kernel, self.grid, self.tail, self.device, self.scratch = kernel, grid, tail, device, scratch

    def __call__(self, args):
        if self.scratch:
            # device-built TMA descriptors live in scratch memory from this allocator; Triton keeps it per thread
            # (a context variable) and autograd runs the backward on its own thread, so set it every time
            triton.set_allocator(_scratch)
        k = self.kernel
        full = args + self.tail
        stream = _raw_stream(self.device)
        rt = knobs.runtime
        k.run(*self.grid, stream, k.function, k.packed_metadata, k.launch_metadata(self.grid, stream, *full),
              rt.launch_enter_hook, rt.launch_exit_hook, *full)


class Slow:
    """Prepared's stand-in where every launch goes through Triton's binder: the interpreter, LORA_FAST_LAUNCH=0,
    and after a failed fast-launch check."""
    __slots__ = ("fn", "grid", "meta", "opts", "scratch")

    def __init__(self, fn, grid, meta, opts, scratch):
        self.fn, self.grid, self.meta, self.opts, self.scratch = fn, grid, meta, opts, scratch

    def __call__(self, args):
        if self.scratch:
            triton.set_allocator(_scratch)  # as in Prepared: autograd's backward thread has its own
        self.fn[self.grid](*args, **self.meta, **self.opts)


def cached(plan, site, name, args, setup, dtype):
    """Launch kernel `name` for launch site `site` of a problem whose shapes, strides, dtypes and alignments are
    fixed by `plan` (a dict the caller keeps per problem): the first call runs setup() -> (grid, meta) and goes
    through `launch`, later ones call the prepared kernel."""
    prepared = plan.get(site)
    if prepared is None:
        grid, meta = setup()
        prepared = launch(name, grid, args, meta, dtype)
        if prepared is not None:
            plan[site] = prepared
    else:
        prepared(args)


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
