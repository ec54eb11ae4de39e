"""phi3/recompute.py: a checkpointed layer knows when it runs again, and the down projection's recompute skips x W^T.

The kernels' path (LoRA layers under TRITON_INTERPRET=1 on the CPU): a checkpointed model's LoRA gradients equal,
bit for bit, those of the same model keeping its activations (the recompute replays the same kernels and the same
dropout draws; the skipped product is never read), and each layer's recompute runs three of its four frozen GEMMs.
The same on a 4-bit base and with --fp8's products.
"""
import pytest
import torch

import phi3.lora_layers
from phi3.kernels import launch
from phi3.kernels import lora_linear as lora_kernels
from phi3.kernels import qlora_linear as qlora_kernels
from phi3.kernels.fp8 import FP8Weight
from phi3.lora import use_fp8
from phi3.recompute import checkpoint_layer, recomputing
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


@interpreted
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointed_gradients_equal_and_down_skips_its_product(monkeypatch, dropout):
    real_op, gemms = phi3.lora_layers.lora_linear, []
    monkeypatch.setattr(phi3.lora_layers, "lora_linear", lambda *a, **k: real_op(*a, **k, backend="triton"))
    real_gemm = lora_kernels._gemm
    monkeypatch.setattr(lora_kernels, "_gemm", lambda site, *a: gemms.append(site) or real_gemm(site, *a))
    model = lora_model(torch.device("cpu"), torch.float32, layers=2, hidden=64, dropout=dropout)
    batches = [torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))]
    checkpointed = gradients(model, batches, None)
    assert gemms.count("fwd") == 2 * 4 + 2 * 3  # the forward's four products a layer, the recompute's three
    assert gemms.count("dx") == 2 * 4 - 1  # no dx for the first qkv_proj: its input is a frozen embedding's
    model.recompute = None
    assert checkpointed.keys() == (kept := gradients(model, batches, None)).keys()
    for name in kept:
        assert torch.equal(checkpointed[name], kept[name]), name


@interpreted
def test_on_a_4bit_base_too(monkeypatch):
    """QLoRA's layers: the recompute skips down's NF4 GEMM, the gradients are those of keeping the activations."""
    real_op, gemms = phi3.lora_layers.qlora_linear, []
    monkeypatch.setattr(phi3.lora_layers, "qlora_linear", lambda *a, **k: real_op(*a, **k, backend="triton"))
    real_gemm = qlora_kernels._gemm
    monkeypatch.setattr(qlora_kernels, "_gemm", lambda site, *a, **k: gemms.append(site) or real_gemm(site, *a, **k))
    model = lora_model(torch.device("cpu"), torch.float32, layers=2, hidden=64, dropout=0.1, four_bit=True)
    batches = [torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))]
    checkpointed = gradients(model, batches, None)
    assert gemms.count("nf4.fwd") == 2 * 4 + 2 * 3
    model.recompute = None
    kept = gradients(model, batches, None)
    for name in kept:
        assert torch.equal(checkpointed[name], kept[name]), name


@interpreted
def test_with_fp8_products_too(monkeypatch):
    """--fp8's layers: the recompute skips down's FP8 GEMM, the gradients are those of keeping the activations."""
    gemms, real_gemm = [], qlora_kernels.FROZEN_GEMMS[FP8Weight]
    monkeypatch.setitem(qlora_kernels.FROZEN_GEMMS, FP8Weight, lambda site, *a, **k: gemms.append(site) or
                        real_gemm(site, *a, **k))
    model = lora_model(torch.device("cpu"), torch.float32, layers=2, hidden=64, dropout=0.1)
    assert use_fp8(model) == 2 * 4
    batches = [torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))]
    checkpointed = gradients(model, batches, None)
    assert gemms.count("fwd") == 2 * 4 + 2 * 3 and gemms.count("dx") == 2 * 4 - 1
    model.recompute = None
    kept = gradients(model, batches, None)
    for name in kept:
        assert torch.equal(checkpointed[name], kept[name]), name
