"""Compiling ahead (kernels/launch.py's noting and Binaries, phi3/compile_ahead.py): launches inside `noting` note
the kernel binaries they would need, each once, and run nothing. CPU: what is noted (the chosen config, one job
per specialization) and the threads. GPU (`pytest -m cuda`): after compile_ahead.start, training and eval steps
compile nothing more."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phi3 import compile_ahead
from phi3.kernels import choices, launch
from phi3.kernels.lowrank import _lora_down_kernel
from phi3.kernels.swiglu import _swiglu_fwd_kernel

REPO = Path(__file__).resolve().parent.parent


def down_args(m, seed=0, k=3072, r=16, offset=0):
    x = torch.empty(m * k + offset, dtype=torch.bfloat16)[offset:].view(m, k)
    a = torch.empty(r, k, dtype=torch.float32)
    s = torch.empty(m, r, dtype=torch.float32)
    return (x, a, s, m, k, r, seed, 0.1, 1 / 0.9, x.stride(0), x.stride(1), a.stride(0), a.stride(1))


def test_a_launch_inside_noting_notes_its_binary_and_runs_nothing():
    gu, out = torch.empty(64, 128, dtype=torch.bfloat16), torch.full((64, 64), 7.0, dtype=torch.bfloat16)
    with launch.noting(torch.device("cpu")) as noted:
        launch.run(_swiglu_fwd_kernel, (64, 1), (gu, out, 64, gu.stride(0)), dict(BLOCK=1024))
    [(fn, args, meta)] = noted.jobs.values()
    assert fn is _swiglu_fwd_kernel and meta == {"BLOCK": 1024} and (out == 7).all()
    assert args[:2] == [torch.bfloat16, torch.bfloat16]  # dtypes stand for the tensors: no memory held


def test_one_job_per_specialization():
    """Ints that Triton specializes alike (multiples of 16; any value of an unspecialized one) share a binary; a count
    that is not a multiple of 16 does not; a tensor off 16-byte alignment is left to be compiled at its launch."""
    kernel = type("Kernel", (), dict(arg_names=_lora_down_kernel.arg_names, do_not_specialize=["seed"]))()  # as jit's
    noted = launch.Binaries()
    meta = dict(DROPOUT=True, DOT_PREC="tf32", BLOCK_R=16, **choices.CONFIGS["down"]["32x128 s6"])
    for m, seed in ((8192, 0), (4096, 12345), (8192, 7)):
        noted.add(kernel, down_args(m, seed), meta)
    assert len(noted.jobs) == 1
    noted.add(kernel, down_args(8191), meta)
    assert len(noted.jobs) == 2
    noted.add(kernel, down_args(4096, offset=1), meta)
    assert len(noted.jobs) == 2
    noted.add(kernel, down_args(4096), {**meta, "BLOCK_K": 256})
    assert len(noted.jobs) == 3


def test_the_stand_in_has_the_run_shapes_and_hands_back_its_draws():
    """compile_ahead's stand-in (two decoder layers) has every LoRA shape of the whole model, as train.py freezes it,
    and noting hands the random streams back: the run's own LoRA init draws next, as without compiling ahead."""
    from phi3 import Phi3Config, Phi3ForCausalLM
    from phi3.lora import LoRAConfig, add_lora, lora_modules
    from phi3.model import Recompute
    config = Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2)
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.1)
    full = add_lora(Phi3ForCausalLM(config), lora)
    state = torch.random.get_rng_state()
    with launch.noting(torch.device("cpu")):
        one = compile_ahead.stand_in(config, lora, torch.device("cpu"), torch.bfloat16, Recompute(layers=2))
    assert torch.equal(torch.random.get_rng_state(), state)
    shapes = lambda m: {(l.in_features, l.out_features, l.rank) for l in lora_modules(m).values()}
    assert len(one.model.layers) == 2 and one.recompute == Recompute(layers=2) and shapes(one) == shapes(full)
    assert not [n for n, p in one.named_parameters() if p.requires_grad and ".lora_" not in n]


def test_token_classes_one_per_set_of_binaries():
    """Configs follow the token bucket (powers of two); Triton specializes ints on 1 and multiples of 16."""
    lengths = compile_ahead.token_classes([8192, 8192, 8000, 6000, 4100, 1024, 512, 1000, 1, 2048])
    assert lengths == [1, 512, 1000, 1024, 2048, 4100, 8192]  # 8192 stands for 8000 and 6000 (multiples of 16)
    assert compile_ahead.token_classes([8192] * 20) == [8192]  # packed: every micro-batch alike
    assert compile_ahead.token_classes([]) == []


def test_nothing_is_compiled_ahead_off_the_gpu():
    from phi3 import Phi3Config
    from phi3.lora import LoRAConfig
    assert compile_ahead.start(Phi3Config(), LoRAConfig(), torch.device("cpu"), torch.float32, None,
                               {"train": [8192], "eval": []}) is None


_CHILD = r"""
import sys, torch
from pathlib import Path
from phi3 import Phi3Config, Phi3ForCausalLM, compile_ahead
from phi3.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable
from phi3.loss import cross_entropy_sum
from phi3.model import Recompute
cache = Path(sys.argv[1])
seen = []  # every compile: kernel, options, constants, argument types and attributes (triton >= 3.4 has the hook)
import triton
if hasattr(triton, "knobs"):
    triton.knobs.runtime.jit_post_compile_hook = lambda **kw: seen.append(
        (kw["fn"].name, kw["compile"]["num_warps"], kw["compile"]["num_stages"], str(kw["compile"]["constants"]),
         str(kw["compile"]["signature"]), str(kw["compile"]["configs"])))
config = Phi3Config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                    num_key_value_heads=16, sliding_window=2047)
lora, recompute = LoRAConfig(rank=16, alpha=32, dropout=0.05), Recompute()
# micro-batches of a run: long ones and short ones (other buckets: other configs), one not a multiple of 16
device, counts = torch.device("cuda"), {"train": [4096, 1024, 1008], "eval": [4096, 1000]}
early = compile_ahead.start(config, lora, device, torch.bfloat16, recompute, counts)  # as train.py, then the model
with torch.device("cuda"):
    model = Phi3ForCausalLM(config, recompute).to(torch.bfloat16)
add_lora(model, lora)
mark_only_lora_as_trainable(model)
early.wait()
compiled, ahead = sorted(p.name for p in cache.iterdir()), len(seen)
assert compiled, "nothing was compiled ahead"
for training in (True, False):  # what the run's micro-batches run
    model.train(training)
    for tokens in counts["train" if training else "eval"]:
        ids = torch.randint(0, 32000, (1, tokens), device="cuda")
        positions = torch.arange(tokens, device="cuda")[None]
        with torch.set_grad_enabled(training):
            hidden = model.hidden_states(ids, positions, None)
            if training:
                (cross_entropy_sum(hidden, model.lm_head, ids) / tokens).backward()
new = sorted(set(p.name for p in cache.iterdir()) - set(compiled))
noted = [(fn.__name__, [a for a in args if type(a) is int], kw) for fn, args, kw in early.jobs.values()]
def closest(late):  # the noted jobs of that kernel: their int arguments and constexprs
    same = [job for job in noted if job[0] == late[0]]
    return "\n   noted: " + ("\n   noted: ".join(map(str, same)) if same else "none")
assert not new, f"{len(new)} kernel binaries compiled after compiling ahead (of {len(compiled)}); compiled or loaded " \
    f"from disk since: {sorted(set(c[0] for c in seen[ahead:]))}\n" + "\n".join(str(c) + closest(c) for c in seen[ahead:])
print(len(compiled), "binaries compiled ahead")
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run `pytest -m cuda` there)")
def test_cuda_nothing_left_to_compile(tmp_path):
    """In a fresh process with an empty Triton cache, as train.py goes: once what compile_ahead.start began against
    a two-layer stand-in is done, the model's training steps (forward, backward) and eval forwards write no new
    binary to the cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_GEMM", "TRITON_INTERPRET")}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), PYTHONPATH=str(REPO))
    (tmp_path / "triton").mkdir()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "triton")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


class FakeKernel:
    """Stands in for a Triton kernel: records warmups (and the hash being computed before any), may fail."""
    arg_names = ["x_ptr", "n"]

    def __init__(self, fail=False):
        self.fail, self.warmed, self.hashed = fail, [], False

    @property
    def cache_key(self):
        self.hashed = True
        return "hash"

    def warmup(self, *args, grid, **kwargs):
        assert self.hashed, "the source hash is computed before the threads start"
        if self.fail:
            raise RuntimeError("ptxas failed")
        self.warmed.append((args, kwargs))


def test_start_compiles_each_binary_once_in_daemon_threads():
    kernels = [FakeKernel() for _ in range(3)]
    binaries = launch.Binaries()
    x = torch.empty(8, dtype=torch.float16)
    for i, kernel in enumerate(kernels):
        for block in (16, 32, 64):
            binaries.add(kernel, (x, 16 * (i + 1)), {"BLOCK": block})
    binaries.start(torch.device("cpu"), threads=4)
    assert len(binaries.threads) == 4 and all(t.daemon for t in binaries.threads)  # an error exit does not wait
    binaries.wait()
    for i, kernel in enumerate(kernels):
        assert sorted(kw["BLOCK"] for _, kw in kernel.warmed) == [16, 32, 64]
        assert all(args == (torch.float16, 16 * (i + 1)) for args, _ in kernel.warmed)


def test_a_compile_error_is_raised_by_wait():
    binaries = launch.Binaries()
    binaries.add(FakeKernel(), (torch.empty(8), 3), {})
    binaries.add(FakeKernel(fail=True), (torch.empty(8), 3), {})
    binaries.start(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="ptxas failed"):
        binaries.wait()
