"""Which GEMM kind and which block sizes each LoRA kernel launch uses: chosen by construction, never timed in a run.

A launch site asks `choose(site, key, options, ...)`, options in order of preference. The table of the GPU's
architecture (kernels/tables/sm90.json for Hopper: made on that GPU by bench/make_kernel_choices.py, which times
every option, and shipped with the package) names the option for each key it holds; a key it lacks takes the
table's choice for the nearest token count of the same layer shape, else the rule: the first option. Each list
below starts with the config that won most often in the H100's table. So every process and every resume of a run
computes with the same kernels, and a GPU without a table (any other architecture) runs the rule.

    key = (token bucket, N, K, rank, dropout)      bucket: the next power of two of the token count
"""
import functools
import json
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

from . import launch

TABLES = Path(__file__).resolve().parent / "tables"


def _c(num_warps, num_stages, **blocks):
    return dict(blocks, num_warps=num_warps, num_stages=num_stages)


def _tma(warps, stages, bm, bn, subtile=True, group=8, ws=False, bk=64):
    return _c(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, SUBTILE=subtile, FLATTEN=False,
              WARP_SPEC=ws)


# Hopper TMA GEMM: 128 x 128/256 x 64 tiles, two consumer warpgroups; warp-specialized ones (a producer warp
# feeding the tensor cores while the consumers run the epilogue) won on most shapes (bench/NOTES-lora.md, v5).
CONFIGS = {
    "tma": {"128x128 ws s5": _tma(8, 5, 128, 128, ws=True), "128x256 s3": _tma(8, 3, 128, 256),
            "128x256 s4": _tma(8, 4, 128, 256), "128x256 full s3": _tma(8, 3, 128, 256, subtile=False),
            "128x256 ws s4": _tma(8, 4, 128, 256, ws=True), "128x256 full ws s3": _tma(8, 3, 128, 256, False, ws=True),
            "128x256 ws g4 s4": _tma(8, 4, 128, 256, group=4, ws=True)},
    # the same GEMM on FP8 operands (kernels/fp8_linear.py): K steps of 128 bytes, as the bf16 tiles' 64 values;
    # in the order of an H100's times at Phi-3-mini's shapes, 8,192 tokens (bench/README.md). Five stages of
    # 128x256 (5 x 48 KB) exceed Hopper's 227 KB of shared memory: that config ran as its fallback, and is gone.
    "tma-fp8": {"128x256 ws s3": _tma(8, 3, 128, 256, ws=True, bk=128), "128x256 s3": _tma(8, 3, 128, 256, bk=128),
                "128x128 ws s5": _tma(8, 5, 128, 128, ws=True, bk=128)},
    "gemm": {"128x128 s4": _c(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
             "128x256 s3": _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
             "128x256 s4": _c(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
             "256x128 s3": _c(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)},
    # memory-bound skinny kernels: many programs and deep pipelines keep enough bytes in flight
    "down": {"32x128 s6": _c(4, 6, BLOCK_M=32, BLOCK_K=128), "64x256 s3": _c(8, 3, BLOCK_M=64, BLOCK_K=256),
             "32x256 s4": _c(4, 4, BLOCK_M=32, BLOCK_K=256), "64x128 s4": _c(4, 4, BLOCK_M=64, BLOCK_K=128)},
    "dy": {"128 w8 s3": _c(8, 3, BLOCK_N=128), "64 w8 s4": _c(8, 4, BLOCK_N=64), "64 w4 s3": _c(4, 3, BLOCK_N=64)},
    "da": {"64x256 s3": _c(8, 3, BLOCK_M=64, BLOCK_K=256), "32x128 s6": _c(4, 6, BLOCK_M=32, BLOCK_K=128),
           "64x128 s4": _c(4, 4, BLOCK_M=64, BLOCK_K=128)},
    # NF4 GEMM (kernels/nf4_gemm.py), not yet timed: W's tile dequantized on the CUDA cores each K step, so tall row
    # tiles share that work; BLOCK_K and BLOCK_N stay multiples of 64 (whole NF4 blocks)
    "nf4": {"128x128 s3": _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            "64x128 s4": _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            "128x256 s3": _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
            "256x128 s3": _c(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            "64x64x128 s4": _c(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8)},
    # up to 16 tokens (decoding): one row tile, memory-bound on W's bytes: narrow column tiles for more programs
    "nf4-decode": {"16x64x256 s4": _c(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1),
                   "16x128x128 s4": _c(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1),
                   "16x64x128 s6": _c(4, 6, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1)},
    # one token (kernels/nf4_gemv.py): rows per program x columns per step, in the order of an H100 sweep over
    # Phi-3-mini's and Phi-4's layers (bench/README.md, seventh session)
    "nf4-gemv": {"16x512 s3": _c(4, 3, BLOCK_N=16, BLOCK_K=512), "32x256 s3": _c(4, 3, BLOCK_N=32, BLOCK_K=256),
                 "8x512 w2 s4": _c(2, 4, BLOCK_N=8, BLOCK_K=512)},
    "nf4-dequantize": {"64 blocks": _c(4, 1, BLOCKS=64), "128 blocks": _c(8, 1, BLOCKS=128),
                       "32 blocks": _c(4, 1, BLOCKS=32)},
    # DoRA's weight norm (kernels/dora.py), not yet timed: BLOCK_N rows x BLOCK_K columns of W a step (BLOCK_K
    # whole NF4 blocks). Past r = 64 the first two overflow shared memory; "64x64 w8 s2" fits any rank.
    "dora-norm": {"64x128 s4": _c(4, 4, BLOCK_N=64, BLOCK_K=128), "64x128 w8 s4": _c(8, 4, BLOCK_N=64, BLOCK_K=128),
                  "64x64 w8 s2": _c(8, 2, BLOCK_N=64, BLOCK_K=64), "128x128 w8 s3": _c(8, 3, BLOCK_N=128, BLOCK_K=128),
                  "64x64 s4": _c(4, 4, BLOCK_N=64, BLOCK_K=64)},
}
# the interpreter (and fp32, whose tiles are twice the bytes): small tiles, untabled
SMALL = {"tma": _tma(1, 1, 32, 32), "tma-fp8": _tma(1, 1, 32, 32),
         "gemm": _c(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
         "down": _c(4, 2, BLOCK_M=32, BLOCK_K=32), "dy": _c(4, 2, BLOCK_N=32), "da": _c(4, 2, BLOCK_M=32, BLOCK_K=32),
         "nf4": _c(4, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4),
         "nf4-decode": _c(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1), "nf4-dequantize": _c(4, 1, BLOCKS=32),
         "nf4-gemv": _c(4, 1, BLOCK_N=16, BLOCK_K=128),
         "dora-norm": _c(4, 2, BLOCK_N=16, BLOCK_K=64)}

_table = None  # use_table's: None = the shipped one
_timer = None  # set_timer's: bench/make_kernel_choices.py


def use_table(table: dict | None) -> None:
    """Take the choices from `table` ({key text: option}) instead of the shipped table; {} = the rule alone
    (bench_train.py's measure of what the table buys); None = the shipped table again."""
    global _table
    _table = table


def set_timer(timer) -> None:
    """timer(key text, options, run) -> the option to use, after timing run(option) for each: how
    bench/make_kernel_choices.py makes a table. None: choose from the table again."""
    global _timer
    _timer = timer


@functools.cache
def shipped(architecture: str) -> dict:
    """The table made for this architecture ({} if none is shipped): {key text: option}."""
    path = TABLES / f"{architecture}.json"
    return json.loads(path.read_text())["choices"] if path.is_file() else {}


def architecture(device) -> str:
    return "sm%d%d" % launch.capability(device) if device.type == "cuda" else "cpu"


def _nearest(table: dict, site: str, key: tuple) -> str | None:
    """The table's option for the same site and shape at the token bucket nearest to key's (in powers of two)."""
    shape = " " + " ".join(map(str, key[1:]))
    buckets = [int(k.split()[1]) for k in table if k.startswith(site + " ") and k.endswith(shape)]
    if not buckets:
        return None
    nearest = min(buckets, key=lambda b: (abs(b.bit_length() - key[0].bit_length()), -b))
    return table[f"{site} {nearest}{shape}"]


def choose(site: str, key: tuple, options: list, run, device) -> str:
    """The option (a name of `options`) to use at `site` for `key`; run(option) launches it (the timer times it)."""
    if len(options) == 1:
        return options[0]
    if _timer is not None:
        return _timer(" ".join(map(str, (site, *key))), options, run)
    name = _lookup(architecture(device), site, key) if _table is None else _in(_table, site, key)
    return name if name in options else options[0]


def _in(table: dict, site: str, key: tuple) -> str | None:
    return table.get(" ".join(map(str, (site, *key)))) or _nearest(table, site, key)


@functools.cache
def _lookup(architecture: str, site: str, key: tuple) -> str | None:
    return _in(shipped(architecture), site, key)


def config(site: str, kernel: str, key: tuple, x: torch.Tensor, run) -> dict:
    """The config of `kernel` launched at `site` for `key` (x: its input); run(config) launches it."""
    if launch.INTERPRET or x.dtype == torch.float32:
        return SMALL[kernel]
    configs = CONFIGS[kernel]
    return configs[choose(f"{site}.{kernel}", key, list(configs), lambda name: run(configs[name]), x.device)]


_fits = {}  # (device, site, key) -> the config that runs where the chosen one is too large for the GPU


def launch_with(site: str, kernel: str, key: tuple, x: torch.Tensor, run) -> None:
    """run(config) with config(...)'s config. One that does not fit this GPU's shared memory (the rule's, on a GPU
    with less than Hopper's 227 KB a block) gives way to the next of its list that fits: the same in every process."""
    chosen = _fits.get((x.device, site, key)) or config(site, kernel, key, x, run)
    try:
        return run(chosen)
    except OutOfResources:
        if chosen is SMALL[kernel]:
            raise
    for cfg in CONFIGS[kernel].values():
        if cfg is not chosen:
            try:
                run(cfg)
            except OutOfResources:
                continue
            _fits[(x.device, site, key)] = cfg
            return
    raise OutOfResources(0, 0, f"shared memory: no config of {kernel} fits this GPU")


def key(tokens: int, n: int, k: int, rank: int, dropout: bool) -> tuple:
    return launch.next_pow2(max(tokens, 16)), n, k, rank, int(dropout)
