"""Fused Triton kernels for the LoRA linear: lora_linear.py (API, autograd, reference), gemm.py, lowrank.py, launch.py."""
from kernels.lora_linear import LoRALinearFunction, dropout_mask, lora_linear, lora_linear_reference, with_spare_columns

__all__ = ["LoRALinearFunction", "dropout_mask", "lora_linear", "lora_linear_reference", "with_spare_columns"]
