"""Greedy decoding: KV cache == no cache == transformers' generate; sampling options behave."""

import pytest
import torch

from phi3 import load_model
from phi3.generate import generate, sample_next
from tiny import save_hf


@pytest.mark.parametrize("name,prompt_len,new", [("4k", 10, 30), ("gqa", 5, 20), ("longrope", 26, 12)])
def test_greedy_cache_matches_no_cache_and_transformers(tmp_path, name, prompt_len, new):
    ref = save_hf(name, tmp_path, seed=1)
    model = load_model(tmp_path)
    prompt = torch.randint(0, 32000, (prompt_len,), generator=torch.Generator().manual_seed(5)).tolist()
    cached = list(generate(model, prompt, new))
    uncached = list(generate(model, prompt, new, use_cache=False))
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                       pad_token_id=0, min_new_tokens=new)
    assert cached == uncached
    assert cached == out[0, prompt_len:].tolist()


def test_generation_stops_at_stop_id(tmp_path):
    save_hf("4k", tmp_path, seed=2)
    model = load_model(tmp_path)
    free = list(generate(model, [1, 2, 3], 12))
    stop = free[4]
    stopped = list(generate(model, [1, 2, 3], 12, stop_ids=(stop,)))
    assert stopped == free[: free.index(stop) + 1]


def test_sampling_filters():
    logits = torch.tensor([0.0, 5.0, 4.0, -3.0, 4.5])
    assert sample_next(logits) == 1  # greedy
    gen = torch.Generator().manual_seed(0)
    top1 = {sample_next(logits, temperature=1.0, top_k=1, generator=gen) for _ in range(50)}
    assert top1 == {1}
    top2 = {sample_next(logits, temperature=5.0, top_k=2, generator=gen) for _ in range(200)}
    assert top2 == {1, 4}
    # probs ~ [.., .51, .19, .., .31]: nucleus 0.6 keeps tokens 1 and 4 only
    nucleus = {sample_next(logits, temperature=1.0, top_p=0.6, generator=gen) for _ in range(300)}
    assert nucleus == {1, 4}
