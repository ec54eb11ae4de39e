"""Phi-3 in plain PyTorch: model, checkpoints, tokenizer and chat template, LoRA.

    from phi3 import load_model, load_tokenizer
    model = load_model("models/tiny-phi3")               # fp32 on CPU, bf16 on CUDA by default
    tok = load_tokenizer("models/tiny-phi3")
    logits = model(torch.tensor([tok.encode("Hello")]))  # (B, T, vocab)
"""

from phi3.checkpoint import CheckpointError, load_model, save_model
from phi3.config import ConfigError, Phi3Config
from phi3.model import KVCache, Phi3ForCausalLM
from phi3.tokenizer import Phi3Tokenizer, TokenizerError, load_tokenizer

__all__ = ["CheckpointError", "ConfigError", "KVCache", "Phi3Config", "Phi3ForCausalLM", "Phi3Tokenizer",
           "TokenizerError", "load_model", "load_tokenizer", "save_model"]
