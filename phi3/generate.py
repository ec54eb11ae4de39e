"""Token-by-token decoding with a KV cache, and sampling (greedy, temperature, top-k, top-p).

    for token in generate(model, prompt_ids, max_new_tokens=200, stop_ids=tok.stop_ids):
        print(tok.decode([token]), end="")

Both functions check their arguments (ValueError: what is wrong and what is allowed), so a caller gets the same
checks as sample.py's flags. Prompt + reply never pass the model's context (config.max_position_embeddings): the
positions beyond it were never trained, and what the model says there is garbage.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from numbers import Integral, Real

import torch

from phi3.decode_graph import DecodeGraphs
from phi3.model import KVCache, Phi3ForCausalLM

use_graphs = True  # decoding steps replayed as CUDA graphs on a GPU (phi3/decode_graph.py); bench/ switches it off


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)  # True is an int to Python, not a count


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError unless temperature is finite and >= 0 (0 = greedy), top_k is None or an int >= 0 (0 = no limit)
    and top_p is None or in (0, 1] (1 = no nucleus filter). NaN fails every comparison, so it is refused too."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 0):
        raise ValueError(f"top_k must be None or an int >= 0 (0 = no limit), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1] (1 = no filter), got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> int:
    """One token id from the last position's logits (vocab,). temperature 0 = greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    if logits.dim() != 1 or logits.numel() == 0:
        raise ValueError(f"logits must be one row (vocab,), got shape {tuple(logits.shape)}")
    top = float(logits.max())  # NaN when any logit is NaN
    if not math.isfinite(top):
        raise ValueError(f"the logits are not finite (max {top}): the model's weights hold NaN/inf, or fp16 "
                         "overflowed; check the checkpoint, or run it in bf16 or fp32")
    if temperature == 0:
        return int(logits.argmax())
    # float64 and the max subtracted first: the best logit becomes exactly 0, so any finite temperature > 0,
    # however small or large, gives finite scaled logits (-inf at worst) and softmax never sees inf - inf
    logits = (logits.double() - top) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model: Phi3ForCausalLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_ids=(), use_cache: bool = True,
             generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (the stop id that ends the reply is yielded too).

    At most max_new_tokens, and fewer when prompt + reply would pass the context: generation stops there (the
    caller sees it as fewer tokens than asked without a stop id). The arguments are checked here, when called,
    not at the first next(): a prompt that leaves no room for one new token is a ValueError.
    """
    config = model.config
    ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    bad = [i for i in ids if not (_is_int(i) and 0 <= i < config.vocab_size)]
    if not ids or bad:
        raise ValueError(f"prompt_ids must be a non-empty list of token ids in [0, {config.vocab_size}), "
                         f"got {'an empty one' if not ids else f'{bad[0]!r} among them'}")
    if len(ids) >= config.max_position_embeddings:
        raise ValueError(f"the prompt is {len(ids)} tokens and the model's context is {config.max_position_embeddings} "
                         "(max_position_embeddings): no room for a reply; shorten the prompt")
    if not (_is_int(max_new_tokens) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    max_new_tokens = min(max_new_tokens, config.max_position_embeddings - len(ids))
    return _decode(model, ids, max_new_tokens, temperature, top_k, top_p, stop_ids, use_cache, generator)


@torch.no_grad()
def _decode(model, ids, max_new_tokens, temperature, top_k, top_p, stop_ids, use_cache, generator) -> Iterator[int]:
    """generate's loop, on checked arguments.

    With LongRoPE the cached keys were rotated with the short factors; when the sequence first grows past
    original_max_position_embeddings the whole sequence is re-encoded with the long factors, as transformers does.
    """
    config = model.config
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    total = len(ids) + max_new_tokens
    cache = KVCache(config, 1, total, device, dtype) if use_cache else None
    # a graph replays fixed kernels: not while training (dropout draws a new mask each call)
    graphs = DecodeGraphs(model, cache) if cache is not None and _graphable(model, device) else None
    switch_at = config.original_max_position_embeddings if config.rope_type == "longrope" else None
    pending = ids  # tokens not yet seen by the model
    for _ in range(max_new_tokens):
        if cache is not None and switch_at is not None and cache.length <= switch_at < len(ids):
            cache.length, pending = 0, ids  # crossing into long factors: re-encode everything
        if graphs is not None and len(pending) == 1:
            logits = graphs(pending[0], cache.length)
            cache.length += 1
        else:
            inputs = torch.tensor([pending if cache is not None else ids], device=device)
            logits = model(inputs, kv_cache=cache)[0, -1]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        ids.append(token)
        pending = [token]
        yield token
        if token in stop_ids:
            return


def _graphable(model, device) -> bool:
    return use_graphs and device.type == "cuda" and isinstance(model, Phi3ForCausalLM) and not model.training
