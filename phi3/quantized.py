"""A 4-bit base for QLoRA: the transformer layers' linear weights in NF4 (bitsandbytes' format), frozen.

    model = load_model(folder, quantize="nf4")       # a 16-bit checkpoint, quantized one tensor at a time at load
    model = load_model(bnb_4bit_folder)               # a folder transformers + bitsandbytes saved in 4-bit, as it is

What is quantized is what QLoRA quantizes: qkv_proj, o_proj, gate_up_proj and down_proj of every layer. The
embedding, the norms and lm_head stay 16-bit (bitsandbytes leaves lm_head out by default; at Phi-4-mini's tied 200k
vocabulary it is also the embedding). A 4-bit model's state_dict holds the quantized layers under bitsandbytes'
names (`...qkv_proj.weight` uint8, `.weight.absmax`, ...), so save_model writes a folder transformers +
bitsandbytes load, with their quantization_config in config.json.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

import torch
import torch.nn as nn

from phi3 import nf4
from phi3.kernels.nf4_weight import NF4Weight
from phi3.model import set_module
from phi3.ops import nf4_linear

LAYERS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
QUANTIZATION_CONFIG = {  # config.json's, as transformers writes it for bnb_4bit_quant_type="nf4", double quant
    "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
    "llm_int8_skip_modules": ["lm_head"]}
_FIELDS = ("packed", "absmax_code", "nested_absmax", "nested_code", "code")


class NF4Linear(nn.Module):
    """y = x W^T with W frozen in NF4; the kernels dequantize W inside their GEMMs (kernels/qlora_linear.py)."""

    def __init__(self, weight: NF4Weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype, self.offset = weight.dtype, weight.offset
        for name in _FIELDS:  # buffers: .to(device) moves them; saved under bitsandbytes' names (below)
            self.register_buffer(name, getattr(weight, name), persistent=False)

    @property
    def weight4(self) -> NF4Weight:
        return NF4Weight(*(getattr(self, name) for name in _FIELDS), self.offset, (self.out_features,
                         self.in_features), self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight4)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination.update(nf4.to_state_dict(prefix.removesuffix("."), self.weight4))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4"


def quantized_names(model: nn.Module) -> list[str]:
    """The linear layers a 4-bit base holds in NF4."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))
            and name.startswith("model.layers.") and name.endswith(LAYERS)]


def is_4bit(model: nn.Module) -> bool:
    return any(isinstance(m, NF4Linear) for m in model.modules())


def is_4bit_config(raw: dict) -> bool:
    """Whether a config.json says its weights are bitsandbytes 4-bit (its other formats are refused on load)."""
    q = raw.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit") is True


def quantize_layers(model: nn.Module, state: dict, device, dtype, error) -> None:
    """Quantize each of the model's LAYERS from `state` (16-bit tensors, memory-mapped), one tensor at a time on
    `device`: the 16-bit model is never in memory, on the GPU or (its file's pages given back as each tensor is
    done) in the process's host memory. Their tensors leave `state`. error(name, message) raises."""
    for name in quantized_names(model):
        source = state.pop(f"{name}.weight")
        w = source.to(device=device, dtype=dtype)
        try:
            set_module(model, name, NF4Linear(nf4.quantize(w)))
        except ValueError as e:
            error(name, str(e))
        del w
        give_back_pages(source)


_libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4


def give_back_pages(t: torch.Tensor) -> None:
    """Drop the whole memory pages of a CPU tensor that nothing reads again (a quantized layer's 16-bit source, a
    tensor already copied to the GPU or to another dtype): a
    file's pages read through its private map would otherwise stay in the process's memory until the load ends,
    the whole 16-bit file at its peak. Read again, a page of a file comes back from the file."""
    if _libc is None or t.device.type != "cpu":
        return
    start = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # only pages wholly inside t: neighbours keep theirs
    end = (t.data_ptr() + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def read_4bit_layers(model: nn.Module, state: dict, device, path) -> None:
    """Take the model's LAYERS from a bitsandbytes 4-bit checkpoint's tensors as they are (nf4.from_state_dict
    checks each); their tensors leave `state`."""
    for name in quantized_names(model):
        linear = model.get_submodule(name)
        w = nf4.from_state_dict(name, state, path).to(device)
        if w.shape != (linear.out_features, linear.in_features):
            raise nf4.NF4Error(f"{path}: {name}.weight is {list(w.shape)} in its quant_state, config.json implies "
                               f"{[linear.out_features, linear.in_features]}; config.json does not match the weights")
        for key in [k for k in state if k == f"{name}.weight" or k.startswith(f"{name}.weight.")]:
            del state[key]
        set_module(model, name, NF4Linear(w))
