"""Fused Triton kernels; each file holds kernels + launcher + autograd.Function + pure-torch reference."""
from kernels.lora_linear import LoRALinearFunction, dropout_mask, lora_linear, lora_linear_reference

__all__ = ["LoRALinearFunction", "dropout_mask", "lora_linear", "lora_linear_reference"]
