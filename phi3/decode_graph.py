"""One decoding step (one new token, batch 1) replayed as a CUDA graph.

Eager decoding is bound by the host: a token of Phi-3-mini launches about a thousand kernels one after another from
Python, and the GPU waits for them (bench/README.md: 3.5 ms of GPU work in a 50 ms token on an H100). A CUDA graph
records those launches once and replays them with one call. A graph replays the same kernels on the same memory,
so everything that changes from token to token lives in tensors the graph reads: the token id and its position.
The key length grows by one a token, which a graph cannot follow; so each graph attends over a fixed window of the
KV cache, the next power of two of the tokens so far (at least MIN_WINDOW), with a mask that hides the slots not yet
written (and, for the 4k models, the keys past the sliding window). A new window, or a KV cache that grew (its
buffers moved), records a new graph: about log2(context) of them in a whole reply.

    step = DecodeGraphs(model, cache)      # model on a GPU, in eval mode; cache: its KVCache after the prompt
    logits = step(token, position)         # (vocab,) logits of the next token; the cache holds `token` at `position`

Off a GPU (or with `capture=False`) the same step runs eagerly: the CPU tests check it against transformers.
"""

from __future__ import annotations

import torch

from phi3.attention import Visibility
from phi3.model import KVCache, Phi3ForCausalLM

MIN_WINDOW = 256  # a recording costs one eager step's host time (a 4-bit one: ~36 ms); windows from 64 recorded
# three graphs in a reply's first 256 tokens. Attending over 256 slots instead of 64 costs ~1 us a layer.


class _CacheWindow:
    """The KVCache as the graphed step's layers see it: each layer writes its new key and value at `position` (a
    tensor) and attends over the first `window` slots."""

    def __init__(self, cache: KVCache, position: torch.Tensor, window: int):
        self.cache, self.position, self.window = cache, position, window

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.k[layer], self.cache.v[layer]  # (B, kv_heads, capacity, hd)
        keys.index_copy_(2, self.position, k)
        values.index_copy_(2, self.position, v)
        return keys[:, :, :self.window], values[:, :, :self.window]


class DecodeGraphs:
    def __init__(self, model: Phi3ForCausalLM, cache: KVCache, capture: bool | None = None):
        device = model.lm_head.weight.device
        capture = device.type == "cuda" if capture is None else capture
        self.model, self.cache, self.capture = model, cache, capture
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs = {}  # window -> (graph, its logits, the cache buffer it was recorded on)
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # one memory pool for all the windows

    def __call__(self, token: int, position: int) -> torch.Tensor:
        window = min(max(MIN_WINDOW, 1 << position.bit_length()), self.cache.max_len)  # > position
        if self.cache.k.shape[3] < window:
            self.cache.reserve(window)
        self.token.fill_(token)
        self.position.fill_(position)
        if not self.capture:
            return self._step(window)
        graph, logits, buffer = self.graphs.get(window, (None, None, None))
        if buffer is not self.cache.k:  # first use of this window, or the cache grew since: record (again)
            graph, logits = self._record(window)
            self.graphs[window] = graph, logits, self.cache.k
        graph.replay()
        return logits

    def _record(self, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if not self.graphs:  # a run before the first recording: kernels compiled and loaded, cuBLAS set up (later
            side = torch.cuda.Stream()  # windows run the same kernels: a second run would cost a token's host time)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(window)  # (it writes the cache slot the replay then writes again, with the same values)
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(window)
        return graph, logits

    @torch.no_grad()
    def _step(self, window: int) -> torch.Tensor:
        """The model's forward for one token at self.position (Phi3ForCausalLM.hidden_states, inference only)."""
        model, config = self.model, self.model.config
        x = model.model.embed_tokens(self.token)  # (1, 1, hidden)
        position_ids = self.position.view(1, 1)
        cos, sin = model.rotary(position_ids, x.dtype)
        slots = torch.arange(window, device=x.device)
        visible = slots <= self.position
        if config.sliding_window is not None:
            visible &= slots > self.position - config.sliding_window
        seen = Visibility(1, 0, None, "sdpa", mask=visible.view(1, 1, 1, window))
        cache = _CacheWindow(self.cache, self.position, window)
        for layer in model.model.layers:
            x = layer(x, cos, sin, seen, cache)
        return model.lm_head(model.model.norm(x))[0, -1]
