"""Fused Triton kernels for the LoRA linear: lora_linear.py (API, autograd, reference), gemm.py, lowrank.py, launch.py,
tuning.py (the record of timed choices, for reproducible runs)."""
from kernels.lora_linear import LoRALinearFunction, dropout_mask, lora_linear, lora_linear_reference, with_spare_columns
from kernels.tuning import tuning_record, use_tuning_record

__all__ = ["LoRALinearFunction", "dropout_mask", "lora_linear", "lora_linear_reference", "tuning_record",
           "use_tuning_record", "with_spare_columns"]
