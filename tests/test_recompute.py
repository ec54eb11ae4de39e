"""phi3/recompute.py: a checkpointed layer knows when it runs again, the down projection's recompute skips x W^T,
and the recompute takes back what the first run kept (every LoRA layer's S, and in the layers given the memory the
frozen GEMMs' outputs) instead of computing it again.

The kernels' path (LoRA layers under TRITON_INTERPRET=1 on the CPU): a checkpointed model's LoRA gradients equal,
bit for bit, those of the same model keeping its activations (the recompute replays the same kernels and the same
dropout draws; the skipped product is never read), whatever it keeps; each layer's recompute runs three of its four
frozen GEMMs, none where it kept their outputs, and no S kernel. The same on a 4-bit base and with --fp8's products.
"""
import dataclasses

import pytest
import torch

import phi3.lora_layers
from phi3.kernels import launch
from phi3.kernels import lora_linear as lora_kernels
from phi3.kernels import qlora_linear as qlora_kernels
from phi3.kernels.fp8 import FP8Weight
from phi3.lora import use_fp8
from phi3.model import Recompute, kept_output_bytes
from phi3.offload import CheckpointOffload
from phi3.recompute import (Kept, KeptOutputBudget, checkpoint_layer, keeping_less_where_memory_runs_out,
                            kept_slot, recomputing)
from test_offload import gradients, lora_model


def test_recomputing_is_true_only_in_the_second_run_and_below():
    seen = []

    def inner(x):
        seen.append(("inner", recomputing()))
        return x * 2

    def outer(x):
        seen.append(("outer", recomputing()))
        return checkpoint_layer(inner, x.sin()).cos()

    x = torch.randn(3, requires_grad=True)
    y = checkpoint_layer(outer, x)
    assert seen == [("outer", False), ("inner", False)] and not recomputing()
    y.sum().backward()
    # the backward recomputes outer, and inner inside it (torch may run inner once more: a recompute too)
    assert seen[2:4] == [("outer", True), ("inner", True)] and all(r for _, r in seen[2:]) and not recomputing()
    x2 = x.detach().clone().requires_grad_()
    (2 * x2.sin()).cos().sum().backward()
    assert torch.equal(x.grad, x2.grad)


interpreted = pytest.mark.skipif(not launch.INTERPRET, reason="the kernels on CPU tensors: TRITON_INTERPRET=1 (a "
                                 "GPU's run: tests/test_long_context.py, its gradients through the same recompute)")


def test_kept_entries_go_back_in_order_once_and_a_nested_checkpoint_keeps_nothing():
    first, second = object(), object()
    kept = Kept(outputs=True)
    s, y = torch.ones(2, 1), torch.ones(2, 3, requires_grad=True)
    kept.keep(first, s, y)
    kept.keep(second, s, None)
    got = kept.take(first)
    assert got[0] is s and torch.equal(got[1], y) and not got[1].requires_grad
    with pytest.raises(RuntimeError, match="order"):
        kept.take(first)  # the second entry is `second`'s
    got = kept.take(second)
    assert got[0] is s and got[1] is None
    assert kept.take(first) is None  # taken once: a second recompute computes again
    products_only = Kept(outputs=False)
    products_only.keep(first, s, y)
    assert products_only.take(first)[1] is None

    slots = []
    def inner(x):
        slots.append(kept_slot())
        return x.sin()
    def outer(x):
        slots.append(kept_slot())
        return checkpoint_layer(inner, x.cos())
    outer_kept = Kept(outputs=False)
    checkpoint_layer(outer, torch.randn(3, requires_grad=True), kept=outer_kept).sum().backward()
    assert slots[0] == (outer_kept, False) and slots[1] is None
    assert slots[2] == (outer_kept, True) and all(slot is None for slot in slots[3:])


class FakeGPU:
    """torch.cuda's memory figures as the budget reads them, in GiB."""

    def __init__(self, monkeypatch, total, held, peak, fraction=1.0):
        self.total, self.held, self.peak, self.fraction = total, held, peak, fraction
        GiB = 2**30
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: ((self.total - self.held) * GiB, self.total * GiB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: self.held * GiB)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: self.held * GiB)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: self.peak * GiB)
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: self.fraction)


def test_the_output_budget_measures_a_pass_first_then_keeps_what_spare_memory_holds(monkeypatch):
    gpu, GiB, cuda = FakeGPU(monkeypatch, total=80, held=40, peak=42), 2**30, torch.device("cuda", 0)
    budget = KeptOutputBudget()
    assert budget.layers(64, GiB, 8192, cuda) == 0  # the first pass keeps nothing: it measures
    gpu.peak = 43  # that pass needed 3 GiB beyond what was held at its start
    # spare: 40 GiB free, less 3 for the pass, less 80/16 for fragmentation = 32 GiB
    assert budget.layers(16, GiB, 8192, cuda) == 16 and budget.layers(64, GiB, 8192, cuda) == 32
    gpu.peak = 40  # peak statistics reset: the earlier bound stands
    assert budget.layers(64, GiB, 8192, cuda) == 32
    assert budget.layers(64, GiB, 16384, cuda) == 29  # twice the tokens: twice the working set
    gpu.fraction = 0.75  # a 60 GiB card, emulated: 20 GiB torch may take, less 3, less 60/16
    assert budget.layers(64, GiB, 8192, cuda) == 13
    small_model = KeptOutputBudget()  # 10 GiB held, 3 more in a pass: at most 13 GiB kept, whatever is free
    gpu = FakeGPU(monkeypatch, total=80, held=10, peak=10)
    assert small_model.layers(64, GiB, 8192, cuda) == 0
    gpu.peak = 13
    assert small_model.layers(64, GiB, 8192, cuda) == 13 and small_model.layers(64, GiB // 2, 16384, cuda) == 32
    small = KeptOutputBudget()  # a 16 GiB card that only just fits the step: nothing kept
    FakeGPU(monkeypatch, total=16, held=10, peak=10)
    assert small.layers(32, GiB, 8192, cuda) == 0
    FakeGPU(monkeypatch, total=16, held=10, peak=15)  # the pass took 5 of the 6 GiB free
    assert small.layers(32, GiB // 4, 8192, cuda) == 0
    assert KeptOutputBudget().layers(32, GiB, 8192, torch.device("cpu")) == 0


def test_after_running_out_the_budget_keeps_at_most_half_and_only_a_keeping_pass_is_retried(monkeypatch):
    gpu, GiB, cuda = FakeGPU(monkeypatch, total=80, held=40, peak=40), 2**30, torch.device("cuda", 0)
    budget = KeptOutputBudget()
    budget.layers(64, GiB, 8192, cuda)
    gpu.peak = 43
    assert budget.layers(64, GiB, 8192, cuda) == 32
    attempts = []

    def attempt():
        attempts.append(budget.layers(64, GiB, 8192, cuda))
        if len(attempts) < 3:
            raise torch.OutOfMemoryError("simulated")
        return "done"
    assert keeping_less_where_memory_runs_out(budget, attempt) == "done" and attempts == [32, 16, 8]
    assert budget.layers(64, GiB, 8192, cuda) == 8  # the ceiling stays
    def runs_out():
        raise torch.OutOfMemoryError("simulated")
    with pytest.raises(torch.OutOfMemoryError):  # a pass that kept nothing ran out for another reason: it stands
        keeping_less_where_memory_runs_out(KeptOutputBudget(), runs_out)
    with pytest.raises(torch.OutOfMemoryError):  # several processes: no retry
        keeping_less_where_memory_runs_out(None, runs_out)


def test_kept_output_bytes_are_the_three_outputs_the_recompute_would_compute():
    model = lora_model(torch.device("cpu"), torch.float32, layers=2, hidden=64)
    config = model.config
    assert kept_output_bytes(model, 10, torch.bfloat16) == 10 * 2 * (
        sum(config.qkv_sizes) + config.hidden_size + 2 * config.intermediate_size)


def _counting(monkeypatch, op_name):
    """Run the LoRA layers' `op_name` op through the kernels; count the forward's GEMMs (sites) and S kernels."""
    real_op, gemms, downs = getattr(phi3.lora_layers, op_name), [], []
    monkeypatch.setattr(phi3.lora_layers, op_name, lambda *a, **k: real_op(*a, **k, backend="triton"))
    real_down = lora_kernels._lora_down
    for module in (lora_kernels, qlora_kernels):
        monkeypatch.setattr(module, "_lora_down", lambda *a: downs.append(1) or real_down(*a))
    return gemms, downs


@interpreted
@pytest.mark.parametrize("dropout,keep_outputs", [(0.0, 0), (0.1, 0), (0.1, 1), (0.0, 2), (0.1, 2)])
def test_checkpointed_gradients_equal_and_the_recompute_skips_what_it_can(monkeypatch, dropout, keep_outputs):
    gemms, downs = _counting(monkeypatch, "lora_linear")
    real_gemm = lora_kernels._gemm
    monkeypatch.setattr(lora_kernels, "_gemm", lambda site, *a: gemms.append(site) or real_gemm(site, *a))
    model = lora_model(torch.device("cpu"), torch.float32, layers=2, hidden=64, dropout=dropout)
    model.recompute = Recompute(keep_outputs=keep_outputs)
    batches = [torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))]
    checkpointed = gradients(model, batches, None)
    # the forward's four products a layer, the recompute's three (down's output is never read) where the layer
    # kept no outputs, none where it did
    assert gemms.count("fwd") == 2 * 4 + (2 - keep_outputs) * 3
    assert gemms.count("dx") == 2 * 4 - 1  # no dx for the first qkv_proj: its input is a frozen embedding's
    assert len(downs) == 2 * 4  # S: in the forward only, the recompute takes it back
    model.recompute = None
    assert checkpointed.keys() == (kept := gradients(model, batches, None)).keys()
    for name in kept:
        assert torch.equal(checkpointed[name], kept[name]), name


@interpreted
@pytest.mark.parametrize("keep_outputs", [0, 1])
def test_on_a_4bit_base_too(monkeypatch, keep_outputs):
    """QLoRA's layers: the recompute skips down's NF4 GEMM and takes S back, the gradients are those of keeping the
    activations."""
    gemms, downs = _counting(monkeypatch, "qlora_linear")
    real_gemm = qlora_kernels._gemm
    monkeypatch.setattr(qlora_kernels, "_gemm", lambda site, *a, **k: gemms.append(site) or real_gemm(site, *a, **k))
    model = lora_model(torch.device("cpu"), torch.float32, layers=2, hidden=64, dropout=0.1, four_bit=True)
    model.recompute = Recompute(keep_outputs=keep_outputs)
    batches = [torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))]
    checkpointed = gradients(model, batches, None)
    # S is kept; the outputs never are on a 4-bit base (its point is the least memory), whatever keep_outputs says
    assert gemms.count("nf4.fwd") == 2 * 4 + 2 * 3 and len(downs) == 2 * 4
    assert kept_output_bytes(model, 10, torch.bfloat16) == 0
    model.recompute = None
    kept = gradients(model, batches, None)
    for name in kept:
        assert torch.equal(checkpointed[name], kept[name]), name


@interpreted
@pytest.mark.parametrize("keep_outputs", [0, 2])
def test_with_fp8_products_too(monkeypatch, keep_outputs):
    """--fp8's layers: the recompute skips down's FP8 GEMM (and the kept ones), the gradients are those of keeping
    the activations."""
    gemms, real_gemm = [], qlora_kernels.FROZEN_GEMMS[FP8Weight]
    monkeypatch.setitem(qlora_kernels.FROZEN_GEMMS, FP8Weight, lambda site, *a, **k: gemms.append(site) or
                        real_gemm(site, *a, **k))
    model = lora_model(torch.device("cpu"), torch.float32, layers=2, hidden=64, dropout=0.1)
    assert use_fp8(model) == 2 * 4
    model.recompute = Recompute(keep_outputs=keep_outputs)
    batches = [torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))]
    checkpointed = gradients(model, batches, None)
    assert gemms.count("fwd") == 2 * 4 + (2 - keep_outputs) * 3 and gemms.count("dx") == 2 * 4 - 1
    model.recompute = None
    kept = gradients(model, batches, None)
    for name in kept:
        assert torch.equal(checkpointed[name], kept[name]), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_kept_outputs_change_no_bit_at_real_widths():
    """bf16, Phi-3-mini's widths, 4 x 2048 tokens, dropout, offloading: wherever two runs that keep nothing give the
    same bits, a run whose layers keep everything for the recompute gives them too. (Flash attention's backward sums
    dq with atomics, so gradients that pass through it differ between any two runs; the last layer's o, gate_up and
    down gradients do not, and must be among the equal ones.)"""
    device = torch.device("cuda")
    model = lora_model(device, torch.bfloat16, layers=2, hidden=3072, heads=32, dropout=0.05, window=2047)
    batches = [torch.randint(0, 512, (4, 2048), generator=torch.Generator().manual_seed(7)).to(device)]
    runs = []
    for keep in (0, 0, 2):
        model.recompute = Recompute(keep_outputs=keep)
        runs.append(gradients(model, batches, CheckpointOffload(device)))
    reproducible = [name for name in runs[0] if torch.equal(runs[0][name], runs[1][name])]
    last = [f"model.layers.1.{m}.lora_{ab}" for m in ("self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
            for ab in "AB"]
    assert set(last) <= set(reproducible), reproducible
    for name in reproducible:
        assert torch.equal(runs[0][name], runs[2][name]), name
