"""Compile the kernels a training run needs before its first step, in parallel, while the checkpoint loads.

Triton compiles a kernel binary at its first launch, one after another on the launching thread: a fresh machine's
first Phi-3 step spent a minute or more there (transformers + peft, whose kernels ship compiled, took 21-34 s to
its tenth step). train.py calls start() before it loads the checkpoint: a two-layer stand-in of the run's model runs
one training step and one eval forward per class of micro-batch the run's data gives, inside kernels' `noting`
(launches note the binaries they need and run nothing), and those binaries compile in a thread per core.

    compiling = start(config, lora, device, dtype, recompute, {"train": [8192, 8000], "eval": [4096]})
    ...load the checkpoint...
    compiling.wait()
"""

from __future__ import annotations

import dataclasses

import torch

from phi3.kernels import launch
from phi3.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable, use_fp8
from phi3.loss import cross_entropy_sum
from phi3.model import Phi3ForCausalLM, Recompute
from phi3.quantized import quantize_layers, quantized_names


def token_classes(counts) -> list[int]:
    """One token count per set of binaries: configs change with the token bucket (kernels/choices.py), and Triton
    specializes an int on being 1 or a multiple of 16. The largest count of each class stands for it."""
    largest = {}
    for n in counts:
        key = (launch.next_pow2(max(n, 16)), n % 16 == 0, n == 1)
        largest[key] = max(largest.get(key, 0), n)
    return sorted(largest.values())


def stand_in(config, lora: LoRAConfig, device: torch.device, dtype: torch.dtype,
             recompute: Recompute | None, four_bit: bool = False, fp8: bool = False) -> Phi3ForCausalLM:
    """The run's model cut to two decoder layers (every layer has the same shapes; the second, like every later one,
    takes an input that needs a gradient, so its backward runs every kernel), LoRA added and the rest frozen as
    train.py does, weights left unset: nothing computed with them matters."""
    with torch.device("meta"):
        model = Phi3ForCausalLM(dataclasses.replace(config, num_hidden_layers=2), recompute)
    model = model.to_empty(device=device).to(dtype)
    if four_bit:  # a 4-bit base's layers run other kernels (any weight quantizes: ones do)
        quantize_layers(model, {f"{name}.weight": torch.ones(model.get_submodule(name).weight.shape, device=device,
                                dtype=dtype) for name in quantized_names(model)}, device, dtype, None)
    add_lora(model, lora)
    mark_only_lora_as_trainable(model)  # a frozen norm's backward is another binary (no weight gradient)
    if fp8:  # train.py --fp8: the base's GEMMs on FP8 operands
        use_fp8(model)
    return model


def start(config, lora: LoRAConfig, device: torch.device, dtype: torch.dtype, recompute: Recompute | None,
          token_counts: dict, four_bit: bool = False, fp8: bool = False) -> launch.Binaries | None:
    """Start compiling every binary a run with micro-batches of token_counts["train"] (training) and
    token_counts["eval"] tokens needs; returns what to wait() for (None on the CPU: nothing is compiled there)."""
    if device.type != "cuda":
        return None
    with launch.noting(device) as binaries:  # (the stand-in's random draws are handed back: the run's come next)
        model = stand_in(config, lora, device, dtype, recompute, four_bit, fp8)
        for training in (True, False):
            model.train(training)
            for tokens in token_classes(token_counts["train" if training else "eval"]):
                ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
                with torch.set_grad_enabled(training):
                    hidden = model.hidden_states(ids)
                    if training:  # the loss too: with a frozen lm_head its kernel runs in the forward
                        cross_entropy_sum(hidden, model.lm_head, ids).backward()
    return binaries.start(device)
