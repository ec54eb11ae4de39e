"""--full under torchrun (FSDP2, CPU processes over gloo): sharded training equals one process, checkpoints hold whole
tensors that resume on any number of processes, the saved model loads in transformers.

Why the weights can be compared bit for bit: every run is a subprocess with one thread, so each micro-batch's
gradient is computed by the same kernels with the same blocking, on the same weights (FSDP's all-gather copies them
exactly). Two processes with one micro-batch each reduce-scatter the sum of two fp32 gradients, a + b, which is the
same number as the one process's accumulation of its two micro-batches (a + b == b + a), and AdamW is elementwise,
so a shard's update is exactly those elements of the whole's. One thing is computed in another order: the gradient
norm, which each process takes over its shards before they are combined. torch's CPU norm sums the squares in
fp32 along vector lanes: over the 2M squares of the embeddings' gradient that is chains of ~2.6e5 additions, whose
relative error is bounded by 2.6e5 x 6e-8 = 1.6e-2 and is in practice a drift of a few 1e-5 (2.8e-5 measured for 2M
random squares against fp64, 1.1e-5 for 1M: the 2 processes' halves); the two runs' norms differ by up to 1.1e-4
here. Clipping would then scale the gradients by coefficients that differ in the last bits, so the runs here clip
at a norm no gradient reaches (--max-grad-norm 1e9: the coefficient is clamped to exactly 1.0), and the logged norms
are compared with a relative tolerance of 1e-3: ten times the largest difference seen, well inside the bound. (With
more micro-batches per process the sums would be grouped differently, (a + c) + (b + d) against ((a + b) + c) + d,
and the weights only equal within a few fp32 ulps per step.)
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phi3 import load_model
from tiny import transformers_or_skip
from torchrun_kill import kill_a_worker_past_step

REPO = Path(__file__).parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def train(*args, processes: int = 1) -> subprocess.CompletedProcess:
    """train.py in a subprocess, under torchrun when processes > 1; fails the test unless it exits 0."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    done = subprocess.run([sys.executable, *launcher, str(REPO / "train.py"), *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(a_file, b_file):
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def common(data, model):
    return ["--data", data, "--model", model, "--full", "--batch-size", 2, "--lr", 1e-3, "--max-grad-norm", 1e9,
            "--device", "cpu"]


@pytest.fixture(scope="module")
def two_and_one(base, small_chat, tmp_path_factory):
    """The same 4 steps trained by 2 sharded processes and by 1 process with --grad-accum 2, with an eval split (evals
    run through the sharded model), gradient checkpointing (recomputed layers gather their weights again) and a
    checkpoint at step 2. Returns (folder of the 2-process run, its stderr, folder of the 1-process run)."""
    folder = tmp_path_factory.mktemp("runs")
    flags = [*common(small_chat, base), "--max-steps", 4, "--eval-fraction", 0.2, "--log-every", 1,
             "--gradient-checkpointing", "--save-every", 2]
    two = train(*flags, "--out", folder / "two", processes=2)
    train(*flags, "--grad-accum", 2, "--out", folder / "one")
    return folder / "two", two.stderr, folder / "one"


def test_two_sharded_processes_train_like_one_with_double_accumulation(two_and_one):
    two, _, one = two_and_one
    assert_same_tensors(one / "model.safetensors", two / "model.safetensors")
    for name in ("trainable.safetensors", "optimizer.safetensors"):  # whole tensors, gathered from the shards
        assert_same_tensors(one / "checkpoint-2" / name, two / "checkpoint-2" / name)
    one_rows, two_rows = metrics(one), metrics(two)
    assert [sorted(r) for r in one_rows] == [sorted(r) for r in two_rows] and len(one_rows) == 9  # 4 steps, 5 evals
    for r1, r2 in zip(one_rows, two_rows):
        # losses: sums over processes in float64 of per-process fp32 sums, another order of fp32 additions over
        # ~10^2 token losses (relative error a few 1e-7); gradient norms: see the module docstring
        for key, rel in (("loss", 1e-5), ("eval_loss", 1e-5), ("grad_norm", 1e-3)):
            if key in r1:
                assert r1["step"] == r2["step"] and r2[key] == pytest.approx(r1[key], rel=rel), (key, r1, r2)


def test_each_process_holds_half_of_the_weights(two_and_one):
    """The 2-process run's log: all parameters, and those the main process holds (its shards, which the gradients
    and AdamW moments share), about half: each parameter is cut in two along its first dimension."""
    _, stderr, _ = two_and_one
    found = re.search(r"model .*: ([\d,]+) parameters, .* 2 processes, sharded: ([\d,]+) parameters in this process",
                      stderr)
    assert found, stderr[-3000:]
    total, here = (int(n.replace(",", "")) for n in found.groups())
    assert total > 4_000_000 and abs(2 * here - total) <= total // 1000


def test_sharded_full_model_loads_in_transformers(two_and_one, base):
    transformers = transformers_or_skip()
    two, _, _ = two_and_one
    trained = load_model(two)
    assert not torch.equal(trained.model.norm.weight, load_model(base).model.norm.weight)  # it trained
    ids = torch.randint(0, 32000, (1, 9))
    with torch.no_grad():
        hf = transformers.Phi3ForCausalLM.from_pretrained(two).eval()
        torch.testing.assert_close(hf(ids).logits, trained(ids), rtol=1e-5, atol=1e-5)


def test_one_process_checkpoint_resumes_on_two_processes(two_and_one, tmp_path):
    """The 1-process run's step-2 checkpoint, resumed by 2 processes (one micro-batch each), ends with the weights of
    both uninterrupted runs: every process cut its shards out of the whole tensors, AdamW moments included."""
    two, _, one = two_and_one
    train("--resume", one / "checkpoint-2", "--out", tmp_path / "resumed", processes=2)
    assert json.loads((tmp_path / "resumed" / "train_config.json").read_text())["grad_accum"] == 1
    assert_same_tensors(two / "model.safetensors", tmp_path / "resumed" / "model.safetensors")


def test_killed_worker_stops_the_run_which_resumes_exactly_on_one_and_on_two_processes(base, small_chat, tmp_path):
    """SIGKILL one of two sharded processes: the run stops (torchrun ends the other), the last complete checkpoint
    loads, and resuming it on one process (which then takes both processes' micro-batches per step) or on two trains
    exactly like one process with --grad-accum 2 from the start."""
    flags = [*common(small_chat, base), "--lr-schedule", "constant", "--warmup", 0, "--eval-fraction", 0]  # lr: no total
    out = tmp_path / "killed"
    last = kill_a_worker_past_step(flags, out, 4, ENV)
    shutil.copytree(out, tmp_path / "again")  # (with whatever the kill left half-written: the resumed run removes it)
    train("--resume", out, "--max-steps", last + 2)
    assert json.loads((out / "train_config.json").read_text())["grad_accum"] == 2
    train("--resume", tmp_path / "again", "--max-steps", last + 2, processes=2)
    train(*flags, "--grad-accum", 2, "--max-steps", last + 2, "--out", tmp_path / "straight")
    assert_same_tensors(tmp_path / "straight" / "model.safetensors", out / "model.safetensors")
    assert_same_tensors(tmp_path / "straight" / "model.safetensors", tmp_path / "again" / "model.safetensors")
