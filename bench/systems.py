"""The two systems the side-by-side benchmarks train, built the same way in every script.

    model = ours_lora(config, device, dtype)                        # as train.py builds it on a GPU
    reference = peft_lora(hf_random(CONFIG_PATH, overrides, device, dtype))

LoRA r=16, alpha 32, dropout 0.05 (unless asked otherwise) on qkv/o/gate_up/down on both sides; per-layer gradient
checkpointing (non-reentrant) unless asked otherwise; random weights (transformers' init on its side, ours' on ours:
speed and memory do not depend on the values).
"""

from __future__ import annotations

import dataclasses
import gzip
import tempfile
from pathlib import Path

import torch

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def ours_lora(config, device, dtype, checkpointing: bool = True, offload: bool = True, layers: int | None = None,
              four_bit: bool = False, dora: bool = False, dropout: float = 0.05, embedding: bool = False,
              tokens: tuple[int, ...] = ()):
    """This project's Phi-3 with LoRA, training mode; checkpointed layer inputs offloaded on a GPU (train.py's
    default); layers: only the first N checkpointed; four_bit: QLoRA, the layers' weights quantized to NF4 (as
    train.py --quantize nf4 does at load, one tensor at a time); embedding: LoRA on embed_tokens too; tokens: those
    token rows trainable (train.py --trainable-tokens)."""
    from phi3 import Phi3ForCausalLM
    from phi3.lora import LoRAConfig, add_lora, add_trainable_tokens, mark_only_lora_as_trainable
    from phi3.model import Recompute

    device = torch.device(device)
    recompute = Recompute(layers, offload=offload and device.type == "cuda") if checkpointing else None
    with torch.device("meta"):
        model = Phi3ForCausalLM(config, recompute)
    model = model.to(dtype).to_empty(device=device)  # never an fp32 copy: Phi-4's would not fit an 80 GB GPU
    model.init_weights(seed=0)
    if four_bit:
        from phi3.quantized import quantize_layers, quantized_names
        weights = {f"{n}.weight": model.get_submodule(n).weight.detach() for n in quantized_names(model)}
        quantize_layers(model, weights, device, dtype, None)
    targets = ("qkv", "o", "gate_up", "down") + (("embed_tokens",) if embedding else ())
    add_lora(model, LoRAConfig(rank=16, alpha=32, dropout=dropout, dora=dora, targets=targets))
    if tokens:
        add_trainable_tokens(model, tokens)
    mark_only_lora_as_trainable(model)
    return model.train()


def ours_config(path: Path, overrides: dict | None = None):
    from phi3 import Phi3Config
    return dataclasses.replace(Phi3Config.from_json(path), **(overrides or {}))


def random_checkpoint(folder: Path, config, device, tokenizer: Path | None = None) -> None:
    """A checkpoint on disk (bf16 safetensors, HF layout, `tokenizer`'s files or the shipped Phi-3 tokenizer) with
    random weights of `config`, for the benchmarks that time train.py itself."""
    from phi3 import Phi3ForCausalLM, save_model
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    model.init_weights(seed=0)
    tokenizer = tokenizer or Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
    with tempfile.TemporaryDirectory() as unpacked:  # models/tokenizers/ keeps tokenizer.json gzipped
        for f in tokenizer.iterdir():
            target = Path(unpacked) / f.name.removesuffix(".gz")
            target.write_bytes(gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes())
        save_model(model, folder, dtype=torch.bfloat16, tokenizer_from=unpacked)


def hf_random(path: Path, overrides: dict | None, device, dtype):
    """transformers' Phi3ForCausalLM from a config.json (with overrides), randomly initialised, SDPA attention."""
    import transformers
    config = transformers.Phi3Config.from_json_file(str(path))
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype, never an fp32 copy: Phi-4's would not fit an 80 GB GPU
    try:
        with torch.device(device):
            return transformers.Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def bnb_4bit(path: Path, overrides: dict | None, device, dtype):
    """transformers' Phi3ForCausalLM with random weights, saved to a temporary folder (removed once loaded: a 14B
    model's is 28 GB, and three of them filled a 64 GB disk) and loaded back through bitsandbytes in 4-bit (NF4,
    double quantization, bf16 compute), prepared for k-bit training as peft's QLoRA recipe does."""
    import peft
    import transformers
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="bench-bnb-") as folder:
        hf_random(path, overrides, device, dtype).save_pretrained(folder)
        torch.cuda.empty_cache()
        model = transformers.Phi3ForCausalLM.from_pretrained(folder, quantization_config=q, dtype=dtype,
                                                             device_map={"": torch.device(device).index or 0},
                                                             attn_implementation="sdpa")
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def peft_lora(model, checkpointing: bool = True, dora: bool = False, dropout: float = 0.05, embedding: bool = False,
              tokens: tuple[int, ...] = ()):
    """peft's LoRA on a transformers model, training mode, with transformers' own gradient checkpointing; the same
    kinds as ours_lora (tokens: their embedding and lm_head rows, peft's dict form, as ours on an untied model)."""
    import peft
    extra = dict(trainable_token_indices={"embed_tokens": list(tokens), "lm_head": list(tokens)}) if tokens else {}
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, task_type="CAUSAL_LM",
                                                       target_modules=TARGETS + (["embed_tokens"] if embedding else []),
                                                       use_dora=dora, **extra))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model.train()
