"""phi3/offload.py: checkpointed layer inputs in host memory give bit for bit the gradients kept ones give, and so
does keeping attention's output there for the recompute (phi3/attention.py) instead of computing it again.

CPU: the same code with plain copies (no streams): which tensors move, the order they come back in, buffer reuse;
the GPU attention path runs on torch's flash-attention ops written out in float math.
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
from phi3.model import Recompute
from phi3.offload import CheckpointOffload
from phi3.quantized import quantize_layers
from test_attention import mask_of_sequences

CUDA = torch.cuda.is_available()


def lora_model(device, dtype, layers=4, hidden=64, heads=4, dropout=0.1, window=40, four_bit=False):
    config = Phi3Config.from_json("assets/configs/phi3-mini-4k-instruct/config.json")
    config = dataclasses.replace(config, hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
                                 num_attention_heads=heads, num_key_value_heads=heads, vocab_size=512,
                                 sliding_window=window, pad_token_id=0)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.init_weights(seed=0)
    if four_bit:  # a QLoRA base: the layers' weights in NF4
        quantize_layers(model, dict(model.state_dict()), device, dtype, lambda name, message: pytest.fail(message))
    add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=dropout))
    mark_only_lora_as_trainable(model)
    with torch.no_grad():  # B = 0 would give A no gradient
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator(device=device).manual_seed(hash(name) % 2**31))
    model.recompute = Recompute()
    return model.train()


def gradients(model, batches, offload):
    model.offload = offload
    if model.recompute is not None:  # offloading with checkpointing, as train.py sets it up on a GPU
        model.recompute = dataclasses.replace(model.recompute, offload=offload is not None)
    model.zero_grad(set_to_none=True)
    for i, ids in enumerate(batches):
        torch.manual_seed(i)  # dropout masks: the same draws in both runs
        hidden = model.hidden_states(ids).float()
        # the hidden states along a fixed random direction: after the final RMSNorm their mean square is constant,
        # and its gradient would be rounding noise
        direction = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(100 + i))
        (hidden * direction.to(hidden.device)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def recorded_passes(offload):
    """The passes `offload` makes from now on, appended to the returned list as new_pass makes them."""
    passes = []
    new_pass = offload.new_pass
    offload.new_pass = lambda *args: passes.append(new_pass(*args)) or passes[-1]
    return passes


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
    model.offload, model.recompute = offload, Recompute(offload=True)
    passes = recorded_passes(offload)
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


def test_host_memory_limits_which_layer_inputs_move(capsys):
    """Half the RAM holds 2 of the 3-row micro-batches' 3 movable layer inputs: layers 0 and 1 move, layer 2 keeps
    its input on the device (as layer 3 always does); the 2-row micro-batch's smaller inputs all fit. Gradients are
    bit for bit those without offloading, and one note says what stayed."""
    model, batches = lora_model("cpu", torch.float32), micro_batches("cpu")
    plain = gradients(model, batches, None)
    offload = CheckpointOffload(torch.device("cpu"))
    layer_input = lambda rows: rows * 50 * 64 * 4
    offload.host_limit_bytes = 2 * layer_input(3) + 1000
    passes = recorded_passes(offload)
    limited = gradients(model, batches, offload)
    for name in plain:
        assert torch.equal(plain[name], limited[name]), name
    assert [sorted(p.of_layer) for p in passes] == [[0, 1], [0, 1, 2], [0, 1]]
    assert offload.allocated_bytes == 2 * layer_input(3) + layer_input(2)  # the 2-row input took a new buffer
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "holds the checkpointed inputs of 2 of 3 layers" in err


def test_processes_on_one_machine_share_its_ram(monkeypatch):
    """Under torchrun each process on a machine gets its share of the half of RAM that offloading may use."""
    import phi3.offload
    monkeypatch.setattr(phi3.offload, "physical_memory_bytes", lambda: 64 << 30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert CheckpointOffload(torch.device("cpu")).host_limit_bytes == 32 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert CheckpointOffload(torch.device("cpu")).host_limit_bytes == 8 << 30
    assert "half of this machine's 64 GiB, shared by 4 processes" == phi3.offload._half_the_ram()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "four")  # not torchrun's: as one process
    assert CheckpointOffload(torch.device("cpu")).host_limit_bytes == 32 << 30


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


def math_attention(q, k, v, cu_seqlens, left):
    """What torch's flash-attention forward op returns, by its definition: out (N, nh, hd), lse (nh, N)."""
    seen = mask_of_sequences(cu_seqlens, left + 1 if left >= 0 else None)  # keys i - left .. i of i's sequence
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~seen, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).contiguous(), scores.logsumexp(-1)


@pytest.fixture
def flash_on_the_cpu(monkeypatch):
    """The GPU's flash path on the CPU (float math in place of torch's ops); counts the forward calls."""
    import phi3.attention
    calls = []

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, window_size_left=-1, window_size_right=0):
        calls.append(q.shape)
        out, lse = math_attention(q, k, v, cu_q, window_size_left)
        return out, lse, torch.zeros(2, dtype=torch.int64), torch.empty(0), torch.empty(0)

    def backward(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, causal, rng, unused,
                 window_size_left=-1, window_size_right=0):
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            return torch.autograd.grad(math_attention(*inputs, cu_q, window_size_left)[0], inputs, grad)

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", forward)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", backward)
    monkeypatch.setattr(phi3.attention, "flash_supported", lambda *args: True)
    return calls


def test_kept_attention_outputs_give_the_same_gradients_and_skip_the_recompute(flash_on_the_cpu, monkeypatch):
    import phi3.attention
    from phi3.offload import OffloadedPass
    monkeypatch.setattr(phi3.attention, "keep_outputs", True)
    monkeypatch.setattr(OffloadedPass, "small_bytes", 1)  # the tiny model's outputs move to the host as large ones do
    model, batches = lora_model("cpu", torch.float32), micro_batches("cpu")
    plain = gradients(model, batches, None)
    calls_plain = len(flash_on_the_cpu)
    monkeypatch.setattr(phi3.attention, "keep_outputs", False)
    recomputed = gradients(model, batches, CheckpointOffload(torch.device("cpu")))
    calls_recomputed = len(flash_on_the_cpu) - calls_plain
    monkeypatch.setattr(phi3.attention, "keep_outputs", True)
    offload = CheckpointOffload(torch.device("cpu"))
    kept = gradients(model, batches, offload)
    calls_kept = len(flash_on_the_cpu) - calls_plain - calls_recomputed
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]) and torch.equal(plain[name], kept[name]), name
    # 3 micro-batches x 4 layers, each recomputed once; keeping: the 3 layers whose input moved skip the recompute
    assert calls_plain == calls_recomputed == 3 * 8 and calls_kept == 3 * 5
    # per micro-batch of 3 rows: 3 layer inputs, 3 outputs (3 x 50 x 64 floats) and 3 lse (4 heads x 150 tokens),
    # and the ops' 3 random states (2 int64)
    assert offload.allocated_bytes == 4 * 3 * (2 * 3 * 50 * 64 + 4 * 150) + 3 * 8 * 2


def test_host_memory_limits_what_is_kept(flash_on_the_cpu, monkeypatch, capsys):
    import phi3.attention
    from phi3.offload import OffloadedPass
    monkeypatch.setattr(phi3.attention, "keep_outputs", True)
    monkeypatch.setattr(OffloadedPass, "small_bytes", 1)
    model, batches = lora_model("cpu", torch.float32), micro_batches("cpu")
    plain = gradients(model, batches, None)
    calls_plain = len(flash_on_the_cpu)
    # the limit: the 3-row micro-batches' 3 layer inputs and the kept tensors of one layer (1 KiB to spare)
    layer_input = lambda rows: rows * 50 * 64 * 4
    kept_by_layer = lambda rows: layer_input(rows) + 4 * rows * 50 * 4 + 2 * 8  # out, lse, random state
    offload = CheckpointOffload(torch.device("cpu"))
    offload.host_limit_bytes = 3 * layer_input(3) + kept_by_layer(3) + 1024
    limited = gradients(model, batches, offload)
    for name in plain:
        assert torch.equal(plain[name], limited[name]), name
    keeping = [min(3, (offload.host_limit_bytes - 3 * layer_input(rows)) // kept_by_layer(rows)) for rows in (3, 2, 3)]
    assert keeping == [1, 2, 1]  # the 2-row micro-batch's smaller inputs leave room for a second layer
    assert len(flash_on_the_cpu) - calls_plain == sum(8 - n for n in keeping)
    assert "does not hold every layer's attention output" in capsys.readouterr().err


def test_buffers_of_several_sizes_and_dtypes_are_reused_by_size():
    offload = CheckpointOffload(torch.device("cpu"))
    made = [offload.host_buffer(n, dtype) for n, dtype in [(10, torch.float32), (30, torch.bfloat16),
                                                            (20, torch.bfloat16), (5, torch.uint8)]]
    offload.free.extend(made)
    assert offload.host_buffer(15, torch.bfloat16) is made[2]  # the smallest that fits, of its dtype
    assert offload.host_buffer(15, torch.bfloat16) is made[1]
    assert offload.host_buffer(8, torch.float32) is made[0]
    assert len(offload.free) == 1 and offload.free[0] is made[3]
    assert offload.host_buffer(40, torch.bfloat16) is not made[1] and offload.allocated_bytes == 40 + 60 + 40 + 5 + 80


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU (run `pytest -m cuda` on the device machine)")
@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_kept_attention_outputs_on_the_gpu(monkeypatch, backend):
    """Kept outputs against the gradients of no checkpointing at all (the backward sees the forward's own values):
    no further from them than the usual recompute is. Not bit for bit: on a GPU the recompute need not reproduce
    the forward's bits (cuBLAS may pick another algorithm on the backward's thread), and kept outputs mix the
    forward's attention output with the recompute's q, k and v."""
    import phi3.attention
    if backend == "cudnn" and not phi3.attention.cudnn_preferred(torch.device("cuda")):
        pytest.skip("cuDNN attention is chosen on Hopper GPUs only")
    monkeypatch.setattr(phi3.attention, "cudnn_from_tokens", 1024 if backend == "cudnn" else 1 << 30)  # (cuDNN's
    # rule moved to lengths a test can afford)
    model = lora_model("cuda", torch.bfloat16, layers=8, hidden=1024, heads=8, window=None)
    batches = [torch.randint(0, 512, shape, device="cuda") for shape in [(2, 2048), (1, 1024)]]
    seen = phi3.attention.Visibility.of(2, 2048, 0, None, None, torch.bfloat16, batches[0].device, 128)
    assert seen.backend == backend
    offload = CheckpointOffload(torch.device("cuda"))
    model.recompute = None
    exact = gradients(model, batches, None)
    model.recompute = Recompute()
    monkeypatch.setattr(phi3.attention, "keep_outputs", False)
    recomputed = gradients(model, batches, offload)
    monkeypatch.setattr(phi3.attention, "keep_outputs", True)
    passes = recorded_passes(offload)
    kept = gradients(model, batches, offload)
    assert [sorted(p.of_layer) for p in passes] == [list(range(7))] * 2
    assert all(len(p.of_layer[layer]) == 2 for p in passes for layer in range(7))  # each: its input and its output
    for name in exact:
        scale = exact[name].float().norm()
        off_kept = (kept[name].float() - exact[name].float()).norm()
        off_recomputed = (recomputed[name].float() - exact[name].float()).norm()
        # bf16 rounding (2^-8) of the gradient's norm: what two valid orders of the same sums may differ by
        assert off_kept <= 2 * off_recomputed + 2**-8 * scale, (name, off_kept, off_recomputed, scale)


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
