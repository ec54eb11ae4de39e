"""Phi-3 (Phi3ForCausalLM) in plain PyTorch.

Parameter names and fused layouts are the checkpoint's own (`self_attn.qkv_proj` = [Q; K; V] rows,
`mlp.gate_up_proj` = [gate; up] rows), so Hugging Face weights load with no renaming. Numerics follow
transformers' modeling_phi3: RMSNorm upcasts to fp32 and multiplies the weight in the model dtype, RoPE is
"rotate half" with cos/sin computed in fp32, LongRoPE picks short/long factors from the largest position of
the call, the 4k models' sliding window lets query i see keys i-window < j <= i.

    model = Phi3ForCausalLM(config)
    logits = model(input_ids)                      # (B, T, vocab)
    model = Phi3ForCausalLM(config, Recompute(offload=True))   # for training: gradient checkpointing per layer
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from phi3.attention import Visibility, attend
from phi3.config import Phi3Config
from phi3.offload import CheckpointOffload
from phi3.ops import rms_norm, rope_qk, swiglu
from phi3.recompute import Kept, KeptOutputBudget, checkpoint_layer, recomputing
from phi3.tiles import in_tiles, token_tiles


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x), or with a residual (RMSNorm(x + residual), x + residual): one Triton kernel on the GPU
        (fp32 inside, the weight product in the model dtype, as the reference), phi3/ops.py's torch
        reference elsewhere."""
        return rms_norm(x, self.weight, self.eps, residual)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, incl. LongRoPE's short/long factors and attention factor."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        # Plain Python numbers, not buffers: nothing to re-create after building on the meta device and
        # nothing a model-wide .to(bfloat16) could round. The fp32 tables are rebuilt per call (hd/2 values).
        half = config.rotary_dim // 2  # (Phi-4-mini rotates 96 of its 128 dims: the tables cover those)
        self.dim = config.rotary_dim
        self.theta = config.rope_theta
        self.short_factor = list(config.rope_short_factor or [1.0] * half)
        self.long_factor = list(config.rope_long_factor or [1.0] * half)
        self.longrope = config.rope_type == "longrope"
        self.original_max = config.original_max_position_embeddings
        self.attention_factor = config.rope_attention_factor
        self._tables = {}  # device -> inv_freq's (short, long)

    def inv_freq(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """1 / (factor theta^(2i / dim)) for the short and the long factors, fp32, made once per device: a graphed
        decoding step (phi3/decode_graph.py) cannot copy a Python list to the GPU inside its recording."""
        key = str(device)
        if key not in self._tables:
            exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
            table = lambda factors: 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device)
                                           * self.theta**exponents)
            self._tables[key] = table(self.short_factor), table(self.long_factor)
        return self._tables[key]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, long = self.inv_freq(position_ids.device)
        if self.longrope:
            # One choice for the whole call, from its largest position (torch.where: no host sync).
            inv_freq = torch.where(position_ids.max() + 1 > self.original_max, long, inv_freq)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq  # (B, T, rotary_dim/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim)
            cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


class KVCache:
    """Keys/values for all layers: (layers, B, kv_heads, capacity, head_dim), for up to max_len tokens. The buffers
    grow as tokens arrive (to twice their size, at most max_len), so asking for a long reply on a long-context model
    costs memory only for the tokens actually generated."""

    def __init__(self, config: Phi3Config, batch_size: int, max_len: int, device, dtype):
        self.max_len = max_len
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, 0, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # tokens already stored; advanced by the model after all layers ran

    def reserve(self, needed: int) -> None:
        """Room for `needed` tokens (to twice the old size, at most max_len). New slots are zeros, not garbage: a
        graphed decoding step (phi3/decode_graph.py) reads slots beyond the tokens stored, masked, and a masked NaN
        would still poison softmax."""
        if needed <= self.k.shape[3]:
            return
        if needed > self.max_len:
            raise ValueError(f"the KV cache holds at most {self.max_len} tokens, {needed} were asked for")
        capacity = min(max(needed, 2 * self.k.shape[3]), self.max_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], capacity, old.shape[4]))
            new[:, :, :, :self.length] = old[:, :, :, :self.length]
            setattr(self, name, new)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.reserve(end)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, sum(config.qkv_sizes), bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, seen: Visibility, kv_cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = rope_qk(self.qkv_proj(x), cos, sin, self.n_head, self.n_kv_head, self.head_dim)  # (B, heads, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        return self.o_proj(attend(q, k, v, seen, self.layer_idx))


class MLP(nn.Module):
    # Calls with more tokens than this run in token tiles, so that only one tile's (tokens, 2 x intermediate)
    # activations exist at a time: at 131,072 tokens gate_up's output alone is 4 GiB on Phi-3-mini. In a checkpointed
    # layer the tiles are recomputed one at a time in the backward pass (phi3/tiles.py); without checkpointing
    # nothing is tiled under autograd (the activations are kept anyway). At or below this size nothing changes.
    tile_tokens = 16384

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def untiled(self, x: torch.Tensor) -> torch.Tensor:
        h = swiglu(self.gate_up_proj(x))  # up * silu(gate); gate is the first half
        if hasattr(self.down_proj, "backward_inputs"):
            # the output only joins the residual sum, which a recompute throws away (phi3/recompute.py): the first
            # run keeps none of it for the recompute, which computes only what the backward needs
            return self.down_proj.backward_inputs(h) if recomputing() else self.down_proj(h, keep_output=False)
        return self.down_proj(h)

    def forward(self, x: torch.Tensor, recompute_tiles: bool = False) -> torch.Tensor:
        tokens = x.shape[:-1].numel()
        if tokens <= self.tile_tokens or (torch.is_grad_enabled() and not recompute_tiles):
            return self.untiled(x)
        flat = x.reshape(tokens, x.shape[-1])
        sizes = token_tiles(tokens, self.tile_tokens)
        if torch.is_grad_enabled():
            trainable = [p for p in self.parameters() if p.requires_grad]
            out = in_tiles(self.untiled, flat, sizes, self.down_proj.out_features, trainable)
        else:
            out = torch.cat([self.untiled(tile) for tile in flat.split(sizes)])
        return out.view(*x.shape[:-1], -1)


class DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, seen: Visibility, kv_cache=None, recompute_tiles: bool = False) -> torch.Tensor:
        h, x = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, seen, kv_cache), x)
        return x + self.mlp(h, recompute_tiles)  # (the residual add and the second norm are one kernel)


class Phi3Model(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass(frozen=True)
class Recompute:
    """Gradient checkpointing while training (per layer, non-reentrant): the first `layers` decoder layers (None: all)
    keep only their input and recompute the rest in the backward pass; the others keep their activations, which
    skips their recompute for more memory (0.85 GiB a layer at batch 4 x 2048 on Phi-3-mini). offload: those inputs
    wait in pinned host memory (phi3/offload.py; CUDA only).

    keep_outputs: how many checkpointed layers also keep their frozen GEMMs' outputs for the recompute (qkv, o and
    gate_up: 0.38 GiB a layer at batch 4 x 2048 on Phi-4-mini, less than half of what a layer without checkpointing
    keeps, for most of what skipping its recompute buys: phi3/recompute.py). None: as many as the GPU's spare memory
    holds, up to as much as the pass needs without them, pass by pass (phi3/recompute.py KeptOutputBudget).
    Layers on a 4-bit base keep none (QLoRA is chosen for the least memory). Every checkpointed layer keeps its
    small low-rank products S either way. Results are the same bits whatever is kept."""
    layers: int | None = None
    offload: bool = False
    keep_outputs: int | None = None


def kept_output_bytes(model: nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """The GEMM outputs one layer keeps for its recompute at `tokens` tokens: its LoRA layers' but the MLP's last."""
    layer = model.model.layers[0]
    widths = sum(m.out_features for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj)
                 if getattr(m, "keeps_output", False))
    return tokens * widths * dtype.itemsize


class Phi3ForCausalLM(nn.Module):
    def __init__(self, config: Phi3Config, recompute: Recompute | None = None):
        super().__init__()
        self.config, self.recompute = config, recompute
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)
        self.offload: CheckpointOffload | None = None  # made at the first pass that offloads (it needs the device)
        self.kept_budget = KeptOutputBudget()

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      document_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden). position_ids default to 0.. (+ cache length)."""
        B, T = input_ids.shape
        offset = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary(position_ids, x.dtype)
        config = self.config
        seen = Visibility.of(B, T, offset, config.sliding_window, document_ids, x.dtype, x.device, config.head_dim,
                             cached=kv_cache is not None)
        layers, checkpointed, offloaded = len(self.model.layers), 0, None
        if self.recompute is not None and self.training and torch.is_grad_enabled():
            checkpointed = min(layers, layers if self.recompute.layers is None else self.recompute.layers)
        if checkpointed and self.recompute.offload:  # checkpointed layers' inputs but the last go to the host (the
            # last one stays: of those the backward pass reaches it first), as many as host memory holds
            self.offload = self.offload or CheckpointOffload(x.device)
            offloaded = self.offload.new_pass(checkpointed - 1, x.numel() * x.element_size())
        seen.keeper = offloaded  # where layer inputs wait, attention outputs wait too (phi3/attention.py)
        keeping = self.kept_outputs(checkpointed, B * T, x)
        for i, layer in enumerate(self.model.layers):
            if i < checkpointed:
                keep = offloaded is None or not offloaded.moves(i)
                kept = Kept(outputs=i >= checkpointed - keeping) if keeping is not None else None
                with contextlib.nullcontext() if keep else offloaded.layer_input(x, i):
                    x = checkpoint_layer(layer, x, cos, sin, seen, kv_cache, True, kept=kept)
            else:
                x = layer(x, cos, sin, seen, kv_cache)
        if offloaded is not None:
            offloaded.prefetch_last()
        if kv_cache is not None:
            kv_cache.length += T
        return self.model.norm(x)

    def kept_outputs(self, checkpointed: int, tokens: int, x: torch.Tensor) -> int | None:
        """How many checkpointed layers keep their GEMM outputs in this pass (the last ones); None: the layers keep
        nothing (no checkpointing, or an MLP cut into token tiles: at that length attention's time dwarfs what
        keeping would save, and the tiles keep nothing, phi3/tiles.py)."""
        if not checkpointed or tokens > MLP.tile_tokens:
            return None
        if self.recompute.keep_outputs is not None:
            return min(checkpointed, self.recompute.keep_outputs)
        return self.kept_budget.layers(checkpointed, kept_output_bytes(self, tokens, x.dtype), tokens, x.device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) in the model dtype (the loss upcasts)."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, document_ids, kv_cache))

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init as transformers does (normal(0, 0.02) weights, ones for norms); for --init random."""
        device = self.lm_head.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * std)
        pad = self.config.pad_token_id
        if pad is not None and pad < self.config.vocab_size:
            self.model.embed_tokens.weight[pad].zero_()


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule called `name` (e.g. "model.layers.0.mlp.down_proj"): how adapters and
    4-bit layers replace a model's own layers."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
