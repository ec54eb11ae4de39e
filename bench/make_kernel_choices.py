"""Make the kernels' table for this GPU's architecture (kernels/tables/smXY.json) by timing every option, on that GPU.

    python3 bench/make_kernel_choices.py            # all the shapes below; writes kernels/tables/sm90.json on Hopper
    python3 bench/make_kernel_choices.py --quick    # Phi-3-mini at r16 up to 8,192 tokens only (about a minute)
    python3 bench/make_kernel_choices.py --runs phi4:16:8192 --merge   # add one model's shapes to the shipped table
    python3 bench/make_kernel_choices.py --qlora --merge    # the 4-bit (NF4) layers' kernels, QLORA_RUNS' shapes

For each LoRA layer shape of the models below (train.py's defaults: qkv/o/gate_up/down) and each token bucket (powers
of two) up to each run's longest, the layer runs forward + backward with dropout (training) and forward without
(evaluation) while kernels/choices.py's timer is set: every launch site times each of its options (GEMM kinds, and
each kind's configs first) in three interleaved rounds of triton.testing.do_bench and keeps the median's fastest.
Runs never time anything: they read the table (a key it lacks takes the nearest bucket of the same shape, else the
rule), so every process and every resume computes with the same kernels. After a change to the kernels or to
choices.CONFIGS, run this again on each architecture that has a table (tests/test_choices.py checks the names).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from phi3 import Phi3Config  # noqa: E402
from phi3.atomic import atomic_file  # noqa: E402
from phi3.kernels import choices  # noqa: E402
from phi3.nf4 import quantize  # noqa: E402
from phi3.ops import lora_linear, qlora_linear  # noqa: E402

CONFIGS = REPO / "assets" / "configs"
RUNS = [("phi3-mini-4k-instruct", 16, 32768), ("phi3-mini-4k-instruct", 8, 8192), ("phi3-mini-4k-instruct", 32, 8192),
        ("phi3-mini-4k-instruct", 64, 8192), ("phi3-medium-4k-instruct", 16, 8192),
        ("phi4-mini-instruct", 16, 32768), ("phi4", 16, 8192)]
QUICK = [("phi3-mini-4k-instruct", 16, 8192)]
QLORA_RUNS = [("phi3-mini-4k-instruct", 16, 8192), ("phi3-medium-4k-instruct", 16, 8192), ("phi4", 16, 8192)]
SMALLEST = 1024  # the first bucket timed; smaller ones take the nearest (its choices differ little there)


def layer_shapes(config: Phi3Config) -> list[tuple[int, int]]:
    """(in, out) of qkv_proj, o_proj, gate_up_proj and down_proj."""
    h, i = config.hidden_size, config.intermediate_size
    return [(h, sum(config.qkv_sizes)), (h, h), (h, 2 * i), (i, h)]


class Timer:
    """choices' timer: each key's options timed once, the fastest kept (and returned for later asks of that key)."""

    def __init__(self, rounds: int = 3):
        self.rounds, self.table = rounds, {}

    def __call__(self, key: str, options: list, run) -> str:
        if key not in self.table:
            times = {option: [] for option in options}
            for _ in range(self.rounds):  # interleaved: clock and power drift hit every option alike
                for option in options:
                    times[option].append(self.time(run, option))
            self.table[key] = min(options, key=lambda o: sorted(times[o])[self.rounds // 2])
        return self.table[key]


    @staticmethod
    def time(run, option) -> float:
        try:
            return do_bench(lambda: run(option), warmup=5, rep=20)
        except OutOfResources:  # the config does not fit this GPU at this rank (shared memory): never chosen
            return math.inf


def time_layer(k: int, n: int, rank: int, tokens: int, four_bit: bool = False) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, k, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n, k, generator=g, device="cuda") / k**0.5).bfloat16()
    a = (torch.randn(rank, k, generator=g, device="cuda") / k**0.5).requires_grad_()
    b = (torch.randn(n, rank, generator=g, device="cuda") / rank**0.5).requires_grad_()
    layer = qlora_linear if four_bit else lora_linear
    w = quantize(w) if four_bit else w
    layer(x, w, a, b, 2.0, 0.05, seed=1).backward(torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        layer(x, w, a, b, 2.0, 0.0, training=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="file to write (default: the shipped one of this GPU)")
    p.add_argument("--quick", action="store_true", help="only Phi-3-mini r16 up to 8,192 tokens (train.py's defaults)")
    p.add_argument("--runs", help="only these: NAME:RANK:LONGEST,... (NAME a folder of assets/configs)")
    p.add_argument("--qlora", action="store_true", help="the 4-bit layers' kernels (QLORA_RUNS unless --runs)")
    p.add_argument("--merge", action="store_true", help="keep the table's other choices (default: a new table)")
    args = p.parse_args()
    runs = QUICK if args.quick else QLORA_RUNS if args.qlora else RUNS
    if args.runs:
        runs = [(name, int(rank), int(longest)) for name, rank, longest in (r.split(":") for r in args.runs.split(","))]
    device = torch.device("cuda")
    timer, started = Timer(), time.perf_counter()
    choices.set_timer(timer)
    for name, rank, longest in runs:
        config = Phi3Config.from_json(CONFIGS / name / "config.json")
        for tokens in (SMALLEST << i for i in range(20) if SMALLEST << i <= longest):
            for k, n in layer_shapes(config):
                time_layer(k, n, rank, tokens, args.qlora)
            print(f"{name} r{rank} {tokens} tokens: {len(timer.table)} choices, {time.perf_counter() - started:.0f} s",
                  flush=True)
    choices.set_timer(None)
    architecture = choices.architecture(device)
    out = args.out or choices.TABLES / f"{architecture}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = {**(json.loads(out.read_text())["choices"] if args.merge and out.is_file() else {}), **timer.table}
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps({"architecture": architecture, "made_on": torch.cuda.get_device_name(device),
                                   "made_with": {"torch": torch.__version__, "triton": triton.__version__},
                                   "choices": dict(sorted(table.items()))}, indent=1) + "\n")
    print(f"wrote {out} ({len(table)} choices)")


if __name__ == "__main__":
    main()
