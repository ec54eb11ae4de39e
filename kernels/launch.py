"""Launching the Triton kernels: every launch goes through `run`, and the helpers every kernel file shares.

Compiling ahead: Triton compiles a binary the first time a launch needs it, one after another on the launching
thread (seconds each for the TMA GEMM; a Phi-3 run needs dozens). Inside `noting(device)` launches run nothing
and note the binaries they would need; `Binaries.start` compiles those in parallel threads (Triton's compiler
releases the GIL for much of its work) into Triton's caches, where the real launches find them.
"""
import contextlib
import functools
import os
import queue
import threading

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
POISON_OUTPUTS = False  # tests set True: every kernel-written buffer starts as NaN


def empty(*shape, dtype, device):
    """A buffer a kernel writes whole (NaN-filled under POISON_OUTPUTS, so a missed element shows)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def on_device(t):
    """Launch on t's GPU: a device switch only when it is not the current one (the switch costs microseconds)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def rows(t, n):
    """t as (rows, n) with a unit last stride: a view when possible, any row stride."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def cdiv(a, b):
    return -(-a // b)  # plain ints: triton.cdiv is a constexpr function, microseconds per host-side call


def next_pow2(n):
    return 1 << (n - 1).bit_length()


@functools.cache
def capability(device):
    return torch.cuda.get_device_capability(device)


@functools.cache
def num_sms(device):
    return 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


def _scratch(size, alignment, stream):
    """Scratch memory for descriptors built on the device (the TMA GEMM), one buffer per device, stream and size."""
    key = (torch.cuda.current_device(), stream, size)
    if key not in _scratch_buffers:
        _scratch_buffers[key] = torch.empty(size, dtype=torch.int8, device="cuda")
    return _scratch_buffers[key]


_scratch_buffers, _counters = {}, {}


def counters(device, n):
    """At least n zeroed int32 counters for kernels on the current stream of `device`. The kernels that take a
    ticket reset it, so one buffer serves every launch on that stream (launches on one stream never overlap)."""
    if device.type != "cuda":
        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)  # interpreter: fresh each time
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    if key not in _counters or _counters[key].numel() < n:
        _counters[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return _counters[key]


_noted = None  # the Binaries being noted inside `noting`


def run(fn, grid, args, meta):
    """fn[grid](*args, **meta), or inside `noting` only the note of the binary it needs."""
    if _noted is not None:
        _noted.add(fn, args, meta)
    else:
        if not INTERPRET:  # Triton keeps the allocator per thread, and autograd's backward runs on its own
            triton.set_allocator(_scratch)
        fn[grid](*args, **meta)


@contextlib.contextmanager
def noting(device):
    """Inside, launches note their binaries instead of running (outputs are garbage; what the block draws from
    torch's random streams is handed back). Yields the Binaries; call its start() after the block."""
    global _noted
    _noted = Binaries()
    try:
        with torch.random.fork_rng([device] if device.type == "cuda" else []):
            yield _noted
    finally:
        _noted = None


class Binaries:
    """Kernel binaries to compile, each once. Triton specializes a binary on each tensor's dtype and 16-byte
    alignment, each int's class (1, a multiple of 16, its width), the constexprs and the options."""

    def __init__(self):
        self.jobs, self.threads, self.errors = {}, [], []

    def add(self, fn, args, meta):
        skip = {fn.arg_names[i] if type(i) is int else i for i in getattr(fn, "do_not_specialize", ())}
        spec = tuple(str(v.dtype) if hasattr(v, "data_ptr") else (name in skip or v == 1, name in skip or v % 16 == 0,
                     -2**31 <= v < 2**31) if type(v) is int else type(v).__name__ if type(v) is float else v
                     for name, v in zip(fn.arg_names, args))
        if any(hasattr(v, "data_ptr") and v.data_ptr() % 16 for v in args):
            return  # (never seen: allocations are aligned) compiled at its launch instead
        # a dtype stands for an aligned tensor of that dtype in a warmup: no memory held
        self.jobs.setdefault((fn, spec, tuple(sorted(meta.items()))),
                             (fn, [v.dtype if hasattr(v, "data_ptr") else v for v in args], meta))

    def start(self, device, threads=None):
        """Compile in daemon threads (one per core by default): a run that stops on an error exits at once."""
        for fn in {job[0] for job in self.jobs.values()}:
            fn.cache_key  # its source hash, once: older Triton computes it unlocked, and racing threads disagree
        todo = queue.SimpleQueue()
        for job in self.jobs.values():
            todo.put(job)

        def work():
            if device.type == "cuda":  # a new thread's current device is the first GPU
                torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())
            while True:
                try:
                    fn, args, meta = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    binary = fn.warmup(*args, grid=(1,), **meta)
                except Exception as e:  # raised by wait(), as the launch would raise it
                    self.errors.append(e)
                    continue
                try:  # loaded on the GPU and its launcher built here, not at the first launch (a private method,
                    getattr(binary, "_init_handles", lambda: None)()  # so: only where it exists)
                except Exception:  # (too large for this GPU, say) left to the launch, which raises it
                    pass
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = [threading.Thread(target=work, name="compile-ahead", daemon=True)
                        for _ in range(min(threads or min(32, cores), len(self.jobs)))]
        for thread in self.threads:
            thread.start()
        return self

    def wait(self):
        """Return when every binary is compiled; the first compile error is raised here."""
        for thread in self.threads:
            thread.join()
        if self.errors:
            raise self.errors[0]
