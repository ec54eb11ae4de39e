"""Decoding through CUDA graphs (phi3/decode_graph.py) on a GPU: the replayed steps give the eager decoder's logits.

The CPU half of this is in tests/test_generate.py (the graphed step run eagerly, against transformers in float64).
Here the graphs are recorded and replayed, in bf16: each step's logits against the float64 model's for that prefix
(DESIGN.md's rule: at most twice the error of the eager bf16 decoder, plus one bf16 rounding of the largest logit),
over prompts and replies that cross a window (the smallest made 64 tokens here), the KV cache's growth, the sliding
window and LongRoPE's switch to the long factors; and a 4-bit base (its one-token kernel splits K among programs,
which count their arrivals: the counters inside a recorded graph), against its dequantized weights in float64.
"""
import pytest
import torch

import phi3.generate
from conftest import cuda, needs_cuda
from phi3 import load_model
from phi3.generate import generate, sample_next
from phi3.kernels.nf4_weight import dequantize_reference
from phi3.quantized import quantized_names
from test_model import max_rel_err
from tiny import save_hf

pytestmark = [cuda, needs_cuda]


@pytest.mark.parametrize("name,prompt_len,new,quantize", [("4k", 20, 40, None), ("phi4mini", 20, 90, None),
                                                           ("gqa", 1, 140, None), ("4k", 20, 40, "nf4")])
def test_replayed_steps_decode_as_eager_steps(tmp_path, monkeypatch, name, prompt_len, new, quantize):
    monkeypatch.setattr(phi3.decode_graph, "MIN_WINDOW", 64)  # crossings in short replies
    save_hf(name, tmp_path, seed=3)
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cuda", quantize=quantize)
    exact_model = load_model(tmp_path, dtype=torch.float64, device="cuda")
    for layer in quantized_names(model) if quantize else ():  # the 4-bit weights, exactly (code x absmax in fp32, unrounded)
        exact_model.get_submodule(layer).weight.data = dequantize_reference(model.get_submodule(layer).weight4,
                                                                            torch.float32).double()
    prompt = torch.randint(0, 32000, (prompt_len,), generator=torch.Generator().manual_seed(7)).tolist()
    seen, recorded = [], []
    monkeypatch.setattr(phi3.generate, "sample_next", lambda logits, *a: seen.append(logits.double()) or
                        sample_next(logits, *a))
    real_record = phi3.decode_graph.DecodeGraphs._record
    monkeypatch.setattr(phi3.decode_graph.DecodeGraphs, "_record", lambda self, window: recorded.append(window) or
                        real_record(self, window))
    tokens = list(generate(model, prompt, new))
    assert len(tokens) == new and recorded, "no graph was recorded"
    for i, ours in enumerate(seen):
        ids = torch.tensor([prompt + tokens[:i]], device="cuda")
        with torch.no_grad():
            exact = exact_model(ids)[0, -1]
            eager = model(ids)[0, -1].double()
        slack = torch.finfo(torch.bfloat16).eps  # one bf16 rounding of the largest logit (errors are relative to it)
        assert max_rel_err(ours, exact) <= 2 * max_rel_err(eager, exact) + slack, f"step {i}"


def test_graphs_are_recorded_once_per_window(tmp_path, monkeypatch):
    """One recording per window as the reply grows (256, 512 tokens, then the cache's 700), none per token; the
    warm-up step before the first only."""
    save_hf("gqa", tmp_path, seed=4)
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    cache = phi3.model.KVCache(model.config, 1, 700, "cuda", torch.bfloat16)
    graphs, recorded = phi3.decode_graph.DecodeGraphs(model, cache), []
    real_record = graphs._record
    monkeypatch.setattr(graphs, "_record", lambda window: recorded.append(window) or real_record(window))
    steps, real_step = [], graphs._step
    monkeypatch.setattr(graphs, "_step", lambda window: steps.append(window) or real_step(window))
    for position in range(600):
        graphs(5, position)
        cache.length += 1
    assert recorded == [256, 512, 700]
    assert steps == [256, 256, 512, 700]  # eager steps: the first window's warm-up, then each one's capture
