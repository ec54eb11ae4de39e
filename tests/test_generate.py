"""Greedy decoding: KV cache and no cache both pick transformers' argmax; sampling options behave; every argument is
checked; prompt + reply stay within the context."""

import copy

import pytest
import torch

import phi3.generate
from phi3 import load_model
from phi3.generate import generate, sample_next
from tiny import save_hf


@pytest.mark.parametrize("name,prompt_len,new", [("4k", 10, 30), ("gqa", 5, 20), ("gqa", 50, 30), ("tied", 1, 8),
                                                  ("longrope", 26, 12), ("phi4mini", 26, 12)])
def test_greedy_cache_and_no_cache_match_the_reference(tmp_path, monkeypatch, name, prompt_len, new):
    """At every step, with the cache or without, or through the step a CUDA graph replays (phi3/decode_graph.py, run
    eagerly here: its fixed attention windows with masks, the sliding window, the window and the cache growing past
    64 tokens, LongRoPE's switch, a one-token prompt decoded from position 0), our logits are transformers' float64
    logits for that prefix (what transformers' greedy generate computes, LongRoPE's re-encoding past
    original_max_position_embeddings included) up to fp32 rounding, and the token taken is their argmax up to that
    rounding.

    Tolerance from the arithmetic: e = 2x transformers' own fp32 error at that prefix (DESIGN's rule) plus a few
    fp32 ulps of the largest logit. The token taken beats every other in our logits, so in the exact logits it is
    at most 2e below the best. Demanding the same tokens as another run instead would hold only while no two top
    logits lie closer than the rounding of this CPU's summation order.
    """
    ref = save_hf(name, tmp_path, seed=1)
    exact_model = copy.deepcopy(ref).double()
    model = load_model(tmp_path)
    prompt = torch.randint(0, 32000, (prompt_len,), generator=torch.Generator().manual_seed(5)).tolist()
    seen = []  # the logits generate samples from, step by step
    monkeypatch.setattr(phi3.generate, "sample_next", lambda logits, *a: seen.append(logits.double()) or
                        sample_next(logits, *a))
    for use_cache, graph in ((True, False), (True, True), (False, False)):
        seen.clear()
        monkeypatch.setattr(phi3.generate, "_graphable", lambda model, device: graph)
        tokens = list(generate(model, prompt, new, use_cache=use_cache))
        assert len(tokens) == len(seen) == new
        for i, ours in enumerate(seen):
            ids = torch.tensor([prompt + tokens[:i]])
            with torch.no_grad():
                exact = exact_model(ids).logits[0, -1]
                fp32_error = (ref(ids).logits[0, -1].double() - exact).abs().max()
            e = 2 * fp32_error + 8 * torch.finfo(torch.float32).eps * exact.abs().max()
            assert (ours - exact).abs().max() <= e, f"step {i} (use_cache={use_cache}, graph={graph})"
            assert exact[tokens[i]] >= exact.max() - 2 * e, f"step {i}: token {tokens[i]} is not the argmax"


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


def test_extreme_temperatures_stay_finite():
    logits = torch.tensor([0.0, 5.0, 4.0, -3.0, 4.5, float("-inf")])  # the last one masked out by the caller
    gen = torch.Generator().manual_seed(0)
    cold = {sample_next(logits, temperature=1e-300, generator=gen) for _ in range(20)}  # 5 / 1e-300 is inf in fp32
    assert cold == {1}
    hot = {sample_next(logits, temperature=1e300, generator=gen) for _ in range(300)}  # -inf / inf would be NaN
    assert hot == {0, 1, 2, 3, 4}  # all but the masked one (each ~1/5; missing one in 300 draws: < 1e-28)
    assert {sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=gen) for _ in range(300)} >= {1, 2, 4}


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=True), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(temperature=None), "temperature"),
    (dict(temperature=1.0, top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p="0.9"), "top_p"),
])
def test_bad_sampling_options_are_value_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_next(torch.tensor([0.0, 1.0]), **kwargs)


@pytest.mark.parametrize("logits", [[0.0, float("nan")], [float("inf"), 0.0], [float("-inf")] * 2, [], [[0.0, 1.0]]])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logits_that_cannot_be_sampled_are_value_errors(logits, temperature):
    with pytest.raises(ValueError, match="logits"):  # NaN from fp16 overflow or broken weights; a wrong shape
        sample_next(torch.tensor(logits), temperature)


@pytest.fixture(scope="module")
def model_64(tmp_path_factory):
    """A tiny model whose context (max_position_embeddings) is 64 tokens."""
    folder = tmp_path_factory.mktemp("4k")
    save_hf("4k", folder, seed=2)
    return load_model(folder)


@pytest.mark.parametrize("prompt,kwargs", [
    ([], {}), ([-1], {}), ([32064], {}), ([1.0], {}), ([True], {}), ([1, None], {}), (list(range(1, 65)), {}),
    ([1], dict(max_new_tokens=-1)), ([1], dict(max_new_tokens=2.0)), ([1], dict(max_new_tokens=True)),
    ([1], dict(temperature=float("nan"))), ([1], dict(temperature=1.0, top_p=2.0)), ([1], dict(top_k=-5)),
])
def test_bad_generate_arguments_are_value_errors_on_the_call(model_64, prompt, kwargs):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError):
        generate(model_64, prompt, **kwargs)  # raised by the call itself, before any next()


def test_generation_stops_at_the_context(model_64):
    """Positions past max_position_embeddings (64 here) were never trained: prompt + reply stop there."""
    for use_cache in (True, False):
        assert len(list(generate(model_64, list(range(1, 61)), 30, use_cache=use_cache))) == 4
    assert len(list(generate(model_64, list(range(1, 64)), 30))) == 1
    assert len(list(generate(model_64, [1, 2, 3], 10**18))) == 61  # the KV cache is sized by the context, not this
    assert list(generate(model_64, [1, 2, 3], 0)) == []
    assert list(generate(model_64, torch.tensor([1, 2, 3]), 5)) == list(generate(model_64, [1, 2, 3], 5))


def test_the_kv_cache_grows_with_the_reply_not_with_max_new_tokens(tmp_path, monkeypatch):
    """A long-context model asked for a huge reply allocates the cache only for tokens generated: a reply that stops
    early holds at most twice its length, whatever max_new_tokens says (a 131k model's cache up front is ~50 GB)."""
    save_hf("longrope", tmp_path, seed=1)
    model = load_model(tmp_path)
    caches = []
    real = phi3.generate.KVCache
    monkeypatch.setattr(phi3.generate, "KVCache", lambda *a: caches.append(real(*a)) or caches[-1])
    tokens = []
    for token in generate(model, [5, 6, 7], max_new_tokens=10**9):
        tokens.append(token)
        if len(tokens) == 40:
            break
    (cache,) = caches
    assert cache.max_len == model.config.max_position_embeddings and cache.length == 3 + 39
    assert 42 <= cache.k.shape[3] <= 2 * 42 and cache.v.shape == cache.k.shape
