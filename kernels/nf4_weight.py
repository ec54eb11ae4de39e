"""A frozen weight in bitsandbytes' NF4 format (QLoRA's): the container the 4-bit kernels read, and its spec.

    W (N, K) flattened row-major into blocks of 64 values; value i of the flat tensor is
        W[i] = code[nibble(i)] * absmax[i // 64]                   (fp32, then rounded to W's dtype)
        nibble(i) = packed[i // 2] >> 4 for even i, & 15 for odd i    (the high nibble first)
    absmax itself is double-quantized (bitsandbytes' compress_statistics=True): 8-bit codes in blocks of 256,
        absmax[b] = nested_code[absmax_code[b]] * nested_absmax[b // 256] + offset      (fp32)
    or, for a checkpoint saved with compress_statistics=False, kept as it is: absmax_code holds the fp32 absmax and
    nested_absmax, nested_code are None (offset 0).

A checkpoint stores these as `<layer>.weight` (packed, uint8 (ceil(N K / 2), 1)), `.weight.absmax` (absmax_code),
`.weight.quant_map` (code), `.weight.nested_absmax`, `.weight.nested_quant_map` (nested_code) and a JSON record
`.weight.quant_state.bitsandbytes__nf4` holding shape, dtype and offset (phi3/nf4.py reads and writes them).
"""
from dataclasses import dataclass

import torch

BLOCK = 64  # values per absmax
NESTED_BLOCK = 256  # absmax values per nested absmax


@dataclass(frozen=True)
class NF4Weight:
    packed: torch.Tensor  # uint8 (ceil(N K / 2),): two 4-bit codes per byte
    absmax_code: torch.Tensor  # uint8 (ceil(N K / 64),); the fp32 absmax itself when nested_code is None
    nested_absmax: torch.Tensor | None  # fp32 (ceil(blocks / 256),)
    nested_code: torch.Tensor | None  # fp32 (256,): bitsandbytes' dynamic 8-bit map
    code: torch.Tensor  # fp32 (16,): the NF4 values
    offset: float  # the mean of the absmax, subtracted before its 8-bit quantization
    shape: tuple  # (N, K) = (out_features, in_features)
    dtype: torch.dtype  # the dtype W had, and dequantizes to

    def to(self, device) -> "NF4Weight":
        move = lambda t: None if t is None else t.to(device)
        return NF4Weight(move(self.packed), move(self.absmax_code), move(self.nested_absmax),
                         move(self.nested_code), move(self.code), self.offset, self.shape, self.dtype)

    @property
    def device(self) -> torch.device:
        return self.packed.device


def absmax(w: NF4Weight) -> torch.Tensor:
    """The fp32 scale of each block of 64, from its double-quantized form."""
    if w.nested_code is None:
        return w.absmax_code
    blocks = torch.arange(w.absmax_code.numel(), device=w.device) // NESTED_BLOCK
    return w.nested_code[w.absmax_code.long()] * w.nested_absmax[blocks] + w.offset


def dequantize_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W (N, K) in `dtype` (default: W's own), rounded once from fp32 as bitsandbytes' dequantize_4bit does."""
    n = w.shape[0] * w.shape[1]
    codes = torch.stack((w.packed >> 4, w.packed & 15), -1).flatten()[:n].long()
    scale = absmax(w).repeat_interleave(BLOCK)[:n]
    return (w.code[codes] * scale).to(dtype or w.dtype).view(w.shape)
