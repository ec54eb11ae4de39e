"""kernels/launch.py's compile_ahead: launches inside it note the kernel binaries they would need, each once, and run
nothing. CPU: what is noted (the chosen config, every candidate of a choice still to be timed, one job per
specialization). GPU (`pytest -m cuda`): after phi3/kernel_tuning.py's compile_run_kernels, tuning and a training
step compile nothing more."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by kernels

launch = importlib.import_module("phi3.kernels.launch")
from phi3.kernels.lowrank import _lora_down_kernel  # noqa: E402
from phi3.kernels.swiglu import _swiglu_fwd_kernel  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def noting(monkeypatch):
    """Launches as on a GPU with autotuning on, inside compile_ahead's noting (its compiling needs a GPU)."""
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "AUTOTUNE", True)
    monkeypatch.setattr(launch, "_best", {})
    monkeypatch.setattr(launch, "_ahead", launch._Binaries())
    return launch._ahead


def down_args(m, seed=0, k=3072, r=16, offset=0):
    x = torch.empty(m * k + offset, dtype=torch.bfloat16)[offset:].view(m, k)
    a = torch.empty(r, k, dtype=torch.float32)
    s = torch.empty(m, r, dtype=torch.float32)
    return (x, a, s, m, k, r, seed, 0.1, 1 / 0.9, x.stride(0), x.stride(1), a.stride(0), a.stride(1))


def down_meta(m):
    return dict(M_BUCKET=launch.m_bucket(m), DROPOUT=True, DOT_PREC="tf32", BLOCK_R=16)


def test_a_choice_to_time_notes_every_candidate_and_runs_nothing(noting):
    grid = lambda meta: (1, 1)
    assert launch.launch("down", grid, down_args(8192), down_meta(8192), torch.bfloat16) is None
    noted = [kwargs for fn, args, kwargs in noting.jobs.values()]
    assert [{k: v for k, v in kw.items() if k in ("BLOCK_M", "BLOCK_K", "num_warps", "num_stages")} for kw in noted] == [
        {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in launch._DOWN_CONFIGS]
    assert all(kw["M_BUCKET"] == 8192 and kw["DROPOUT"] for kw in noted)
    assert launch._best == {}  # nothing was timed or chosen
    fn, args, _ = next(iter(noting.jobs.values()))
    assert fn is _lora_down_kernel and args[:3] == [torch.bfloat16, torch.float32, torch.float32]  # dtypes: no memory


def test_a_made_choice_notes_that_config_alone(noting):
    args, meta = down_args(8192), down_meta(8192)
    key = launch.choice_key("down", [("dtype", torch.bfloat16), ("M_BUCKET", 8192), ("K", 3072), ("R", 16)])
    launch._best[key] = launch._DOWN_CONFIGS[2]
    launch.launch("down", lambda meta: (1, 1), args, meta, torch.bfloat16)
    [(fn, _, kwargs)] = noting.jobs.values()
    cfg = launch._DOWN_CONFIGS[2]
    assert kwargs == {**meta, **cfg.all_kwargs()}  # the options as the autotuner passes them (num_ctas included)


def test_a_chosen_config_is_the_binary_its_candidate_was(noting):
    """Triton keys a binary by the options as passed: the chosen config's launch must pass them as the autotuner
    passed them while timing it (num_ctas=1 too), or it loads the same binary a second time at first use."""
    args, meta = down_args(8192), down_meta(8192)
    launch.launch("down", lambda meta: (1, 1), args, meta, torch.bfloat16)
    candidates = dict(noting.jobs)
    key = launch.choice_key("down", [("dtype", torch.bfloat16), ("M_BUCKET", 8192), ("K", 3072), ("R", 16)])
    for cfg in launch._DOWN_CONFIGS:
        launch._best[key] = cfg
        launch.launch("down", lambda meta: (1, 1), args, meta, torch.bfloat16)
        assert noting.jobs == candidates


def test_one_job_per_specialization(noting):
    """Ints that Triton specializes alike (multiples of 16; any value of an unspecialized one) share a binary; a count
    that is not a multiple of 16 does not; a tensor off 16-byte alignment is left to be compiled at its launch."""
    kernel = type("Kernel", (), dict(arg_names=_lora_down_kernel.arg_names, do_not_specialize=["seed"]))()  # as jit's
    meta = dict(**down_meta(8192), BLOCK_M=64, BLOCK_K=128)
    for m, seed in ((8192, 0), (4096, 12345), (8192, 7)):
        noting.add(kernel, down_args(m, seed), meta)
    assert len(noting.jobs) == 1
    noting.add(kernel, down_args(8191), meta)
    assert len(noting.jobs) == 2
    noting.add(kernel, down_args(4096, offset=1), meta)
    assert len(noting.jobs) == 2
    noting.add(kernel, down_args(4096), {**meta, "BLOCK_K": 256})
    assert len(noting.jobs) == 3


def test_plain_launches_are_noted_not_run(noting):
    gu, out = torch.empty(64, 128, dtype=torch.bfloat16), torch.full((64, 64), 7.0, dtype=torch.bfloat16)
    launch.plain(_swiglu_fwd_kernel, (64, 1), gu, out, 64, gu.stride(0), BLOCK=1024)
    [(fn, args, kwargs)] = noting.jobs.values()
    assert fn is _swiglu_fwd_kernel and kwargs == {"BLOCK": 1024} and (out == 7).all()


def test_compile_ahead_is_nothing_off_the_gpu():
    with launch.compile_ahead(torch.device("cpu")):
        assert not launch.compiling_ahead()


_CHILD = r"""
import sys, torch
from pathlib import Path
from phi3 import Phi3Config, Phi3ForCausalLM, kernel_tuning
from phi3.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable
cache = Path(sys.argv[1])
seen = []  # every compile: kernel, options, constants, argument types and attributes (triton >= 3.4 has the hook)
import triton
if hasattr(triton, "knobs"):
    triton.knobs.runtime.jit_post_compile_hook = lambda **kw: seen.append(
        (kw["fn"].name, kw["compile"]["num_warps"], kw["compile"]["num_stages"], str(kw["compile"]["constants"]),
         str(kw["compile"]["signature"]), str(kw["compile"]["configs"])))
config = Phi3Config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                    num_key_value_heads=16, sliding_window=2047)
lora = LoRAConfig(rank=16, alpha=32, dropout=0.05)
# micro-batches of a run: long ones (tuned choices), short ones (fixed configs), one not a multiple of 16
device, counts = torch.device("cuda"), {"train": [4096, 1024, 1008], "eval": [4096, 1000]}
# as train.py: compiling against two layers starts, the model is built meanwhile, then prepare's own pass
early = kernel_tuning.start_compiling(kernel_tuning.stand_in(config, lora, device, torch.bfloat16), counts,
                                      torch.bfloat16, device)
with torch.device("cuda"):
    model = Phi3ForCausalLM(config).to(torch.bfloat16)
add_lora(model, lora)
mark_only_lora_as_trainable(model)
model.gradient_checkpointing = True
early.wait()
compiled, ahead = sorted(p.name for p in cache.iterdir()), len(seen)
assert compiled, "nothing was compiled ahead"
kernel_tuning.compile_run_kernels(model, counts, torch.bfloat16, device, whole_steps=False)  # as prepare does
kernel_tuning.tune_lora_layers(model, counts, torch.bfloat16)  # times every choice: candidates compiled already
for training in (True, False):  # what the run's micro-batches run
    model.train(training)
    for tokens in counts["train" if training else "eval"]:
        ids = torch.randint(0, 32000, (1, tokens), device="cuda")
        positions = torch.arange(tokens, device="cuda")[None]
        with torch.set_grad_enabled(training):
            hidden = model.hidden_states(ids, positions, None)
            if training:
                hidden.float().square().mean().backward()
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
    """In a fresh process with an empty Triton cache, as train.py goes: once what start_compiling began against a
    two-layer stand-in is done, prepare's pass over the model, timing every choice and training steps (forward,
    backward, an eval forward) write no new binary to the cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_AUTOTUNE", "LORA_GEMM", "TRITON_INTERPRET")}
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
    binaries = launch._Binaries()
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
    binaries = launch._Binaries()
    binaries.add(FakeKernel(), (torch.empty(8), 3), {})
    binaries.add(FakeKernel(fail=True), (torch.empty(8), 3), {})
    binaries.start(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="ptxas failed"):
        binaries.wait()
