"""phi3/offload.py: checkpointed layer inputs in host memory give bit for bit the gradients kept ones give.

CPU: the same code with plain copies (no streams): which tensors move, the order they come back in, buffer reuse.
GPU (`pytest -m cuda`): pinned memory and the copy stream, with dropout on and two micro-batches of different sizes;
the peak memory falls by about the layer inputs that moved (memory is a count of bytes, not a timing).
"""
import dataclasses
import gc
import weakref

import pytest
import torch

from phi3 import Phi3Config, Phi3ForCausalLM
from phi3.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable
from phi3.offload import CheckpointOffload

CUDA = torch.cuda.is_available()


def lora_model(device, dtype, layers=4, hidden=64, heads=4, dropout=0.1):
    config = Phi3Config.from_json("assets/configs/phi3-mini-4k-instruct/config.json")
    config = dataclasses.replace(config, hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
                                 num_attention_heads=heads, num_key_value_heads=heads, vocab_size=512,
                                 sliding_window=40, pad_token_id=0)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.init_weights(seed=0)
    add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=dropout))
    mark_only_lora_as_trainable(model)
    with torch.no_grad():  # B = 0 would give A no gradient
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator(device=device).manual_seed(hash(name) % 2**31))
    model.gradient_checkpointing = True
    return model.train()


def gradients(model, batches, offload):
    model.offload = offload
    model.zero_grad(set_to_none=True)
    for i, ids in enumerate(batches):
        torch.manual_seed(i)  # dropout masks: the same draws in both runs
        model.hidden_states(ids).float().square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def micro_batches(device, vocab=512):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, shape, generator=gen).to(device) for shape in [(3, 50), (2, 50), (3, 50)]]


def test_offloaded_gradients_are_bit_identical_on_the_cpu():
    model, batches = lora_model("cpu", torch.float32), micro_batches("cpu")
    kept = gradients(model, batches, None)
    offload = CheckpointOffload(torch.device("cpu"))
    moved = gradients(model, batches, offload)
    assert kept.keys() == moved.keys()
    for name in kept:
        assert torch.equal(kept[name], moved[name]), name
    # 3 of the 4 layer inputs moved (the last stays) and their buffers were reused by the next micro-batches
    assert len(offload.free) == 3
    assert offload.allocated_bytes == 3 * 3 * 50 * 64 * 4
    gradients(model, batches, offload)  # another step allocates nothing
    assert offload.allocated_bytes == 3 * 3 * 50 * 64 * 4


def test_only_the_layer_inputs_move_and_nothing_keeps_them():
    model, (ids, *_) = lora_model("cpu", torch.float32), micro_batches("cpu")
    offload = CheckpointOffload(torch.device("cpu"))
    model.offload = offload
    passes = []
    new_pass = offload.new_pass
    offload.new_pass = lambda: passes.append(new_pass()) or passes[-1]
    inputs = []  # weak references to each layer's input in the forward pass
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda _, args: inputs.append(weakref.ref(args[0])))
    out = model.hidden_states(ids).sum()
    gc.collect()
    # the moved inputs are gone from the device (here: freed), the last layer's is kept for the backward pass
    assert [ref() is None for ref in inputs] == [True, True, True, False]
    out.backward()
    (saved,) = passes
    assert [tuple(s.shape) for s in saved.saved] == [(3, 50, 64)] * 3
    assert all(s.host is None for s in saved.saved)  # each one was taken back by the backward pass


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU (run `pytest -m cuda` on the device machine)")
def test_offloaded_gradients_are_bit_identical_on_the_gpu():
    model = lora_model("cuda", torch.bfloat16, layers=8, hidden=1024, heads=8)
    batches = [torch.randint(0, 512, shape, device="cuda") for shape in [(4, 1024), (2, 1024)]]
    peaks = {}
    for name, offload in (("kept", None), ("moved", CheckpointOffload(torch.device("cuda")))):
        gradients(model, batches, offload)  # warm-up: kernel choices, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = gradients(model, batches, offload)
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base, grads)
    (kept_peak, kept), (moved_peak, moved) = peaks["kept"], peaks["moved"]
    for name in kept:
        assert torch.equal(kept[name], moved[name]), name
    layer_input = 4 * 1024 * 1024 * 2  # bytes of one (4, 1024, 1024) bf16 layer input
    assert moved_peak <= kept_peak - 4 * layer_input, (kept_peak, moved_peak)  # 7 moved; 2 may be back at once


def test_pinning_that_fails_falls_back_to_pageable_memory(monkeypatch, capsys):
    offload = CheckpointOffload(torch.device("cpu"))
    offload.pinned = True  # as on a GPU machine
    real_empty = torch.empty

    def empty(*shape, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return real_empty(*shape, **kwargs)
    monkeypatch.setattr(torch, "empty", empty)
    buffer = offload.host_buffer(1000, torch.bfloat16)
    assert buffer.numel() == 1000 and not offload.pinned and offload.allocated_bytes == 2000
    assert "pinned host memory ran out" in capsys.readouterr().err
    offload.host_buffer(500, torch.bfloat16)  # no second attempt, no second note
    assert capsys.readouterr().err == ""
