"""Fused Triton kernels: the LoRA linear (lora_linear.py: API, autograd, reference; gemm.py, lowrank.py, launch.py;
tuning.py: the record of timed choices, for reproducible runs), RMSNorm with the residual add (rmsnorm.py) and
SwiGLU (swiglu.py)."""
from kernels.lora_linear import LoRALinearFunction, dropout_mask, lora_linear, lora_linear_reference
from kernels.rmsnorm import rms_norm, rms_norm_reference
from kernels.swiglu import swiglu, swiglu_reference
from kernels.tuning import tuning_record, use_tuning_record

__all__ = ["LoRALinearFunction", "dropout_mask", "lora_linear", "lora_linear_reference", "rms_norm",
           "rms_norm_reference", "swiglu", "swiglu_reference", "tuning_record", "use_tuning_record"]
