"""Small random Phi-3 checkpoints for tests, written by transformers (the reference) or by us."""

from __future__ import annotations

import pytest
import torch

TINY = dict(vocab_size=32064, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=4096, original_max_position_embeddings=4096,
            rms_norm_eps=1e-5, pad_token_id=32000, bos_token_id=1, eos_token_id=32000)

CONFIGS = {
    # 4k-style: plain RoPE and a sliding window that binds in the tests (sequences longer than 24).
    "4k": dict(TINY, sliding_window=24, max_position_embeddings=64, original_max_position_embeddings=64),
    # 128k-style LongRoPE: short factors up to 32 positions, long factors beyond.
    "longrope": dict(TINY, max_position_embeddings=256, original_max_position_embeddings=32, sliding_window=None,
                     rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(8)],
                                   "long_factor": [1.5 + 0.3 * i for i in range(8)]}),
    # medium-style grouped-query attention (2 query heads per KV head) with an uneven q/k/v split.
    "gqa": dict(TINY, num_attention_heads=4, num_key_value_heads=2, sliding_window=2047),
    "tied": dict(TINY, tie_word_embeddings=True, sliding_window=2047),
    # Phi-4-mini's geometry at a smaller width: heads of 128 (3 query, 1 key-value: its 24/8 ratio), RoPE on the first
    # 96 dims (partial_rotary_factor 0.75: 48 LongRoPE factors), tied embeddings, its 200,064-token vocabulary
    "phi4mini": dict(TINY, vocab_size=200064, hidden_size=384, intermediate_size=512, num_attention_heads=3,
                     num_key_value_heads=1, partial_rotary_factor=0.75, tie_word_embeddings=True, sliding_window=262144,
                     max_position_embeddings=256, original_max_position_embeddings=32,
                     rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(48)],
                                   "long_factor": [1.5 + 0.3 * i for i in range(48)]},
                     bos_token_id=199999, eos_token_id=199999, pad_token_id=199999),
    # Phi-4's: heads of 128 (4 query, 1 key-value: its 40/10), rope_theta 250,000, no scaling, 100,352 tokens, untied
    "phi4": dict(TINY, vocab_size=100352, hidden_size=512, intermediate_size=640, num_attention_heads=4,
                 num_key_value_heads=1, rope_theta=250000.0, max_position_embeddings=16384,
                 original_max_position_embeddings=16384, sliding_window=None, bos_token_id=100257, eos_token_id=100265,
                 pad_token_id=100349),
}


def transformers_or_skip():
    return pytest.importorskip("transformers", reason="transformers is the reference oracle; pip install transformers")


def hf_model(name: str, seed: int = 0):
    """A random-initialised transformers Phi3ForCausalLM (fp32, eval)."""
    transformers = transformers_or_skip()
    torch.manual_seed(seed)
    config = transformers.Phi3Config(**CONFIGS[name])
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises norms to 1: randomise them so the weight path is tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def save_hf(name: str, folder, seed: int = 0, dtype=torch.float32):
    model = hf_model(name, seed).to(dtype)
    model.save_pretrained(folder)
    return model
