"""Token-by-token decoding with a KV cache, and sampling (greedy, temperature, top-k, top-p).

    for token in generate(model, prompt_ids, max_new_tokens=200, stop_ids=tok.stop_ids):
        print(tok.decode([token]), end="")
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from phi3.model import KVCache, Phi3ForCausalLM


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> int:
    """One token id from the last position's logits (vocab,). temperature 0 = greedy (argmax)."""
    logits = logits.float()
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Phi3ForCausalLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_ids=(), use_cache: bool = True,
             generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (the stop id that ends the reply is yielded too).

    With LongRoPE the cached keys were rotated with the short factors; when the sequence first grows past
    original_max_position_embeddings the whole sequence is re-encoded with the long factors, as transformers does.
    """
    config = model.config
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    ids = list(prompt_ids)
    total = len(ids) + max_new_tokens
    cache = KVCache(config, 1, total, device, dtype) if use_cache else None
    switch_at = config.original_max_position_embeddings if config.rope_type == "longrope" else None
    pending = ids  # tokens not yet seen by the model
    for _ in range(max_new_tokens):
        if cache is not None and switch_at is not None and cache.length <= switch_at < len(ids):
            cache.length, pending = 0, ids  # crossing into long factors: re-encode everything
        inputs = torch.tensor([pending if cache is not None else ids], device=device)
        logits = model(inputs, kv_cache=cache)[0, -1]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        ids.append(token)
        pending = [token]
        yield token
        if token in stop_ids:
            return
