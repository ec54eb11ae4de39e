"""LoRA for Phi-3: wrappers around the frozen layers, and adapter files in the PEFT layout.

    add_lora(model, LoRAConfig(rank=16, alpha=32, targets=("qkv", "o", "gate_up", "down")))
    add_trainable_tokens(model, [32002])                                 # optional: new tokens' own rows
    mark_only_lora_as_trainable(model)
    ...train...
    save_adapter(model, "out", base_model="~/Phi-3-mini-4k-instruct")   # loads in peft and vLLM
    merge_lora(model)                                                    # explicit; never a side effect of .eval()

Three kinds of adapter (the layers are phi3/lora_layers.py's), each computed and saved as peft does it (its
LoraConfig option in brackets):
- LoRALinear on a linear layer; with LoRAConfig(dora=True) DoRA [use_dora]: a trained magnitude m per output row,
  y = m / ||W + s B A|| (x (W + s B A)^T) row-wise, the norm taken without gradient.
- LoRAEmbedding on the input embedding [target_modules "embed_tokens"].
- TrainableTokens: chosen tokens' embedding (and lm_head) rows trained on their own [trainable_token_indices].

A target may be a slice of a fused layer ("q", "v" inside `qkv_proj`, "gate"/"up" inside `gate_up_proj`): each slice
gets its own rank-r pair, which is the same thing as one LoRA of rank n*r with stacked A and block-diagonal B. That is
how it runs (one kernel call) and how it is exported (PEFT and vLLM need no special case). With DoRA the rows outside
the slices keep a factor of 1. The PEFT file exchange is phi3/peft_files.py; its functions are importable from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from phi3.kernels.fp8 import quantize_weight
from phi3.lora_layers import (ADAPTERS, LoRAEmbedding, LoRALinear, TrainableTokens, adapter_modules,  # noqa: F401
                              check_token_ids)
from phi3.model import set_module
from phi3.peft_files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, adapter_base_model,  # noqa: F401
                             load_adapter, read_adapter_config, save_adapter)
from phi3.quantized import NF4Linear

# Short target name -> (module name suffix, index of the slice in the fused output, or None for all of it).
TARGETS = {
    "qkv": ("self_attn.qkv_proj", None), "q": ("self_attn.qkv_proj", 0), "k": ("self_attn.qkv_proj", 1),
    "v": ("self_attn.qkv_proj", 2), "o": ("self_attn.o_proj", None),
    "gate_up": ("mlp.gate_up_proj", None), "gate": ("mlp.gate_up_proj", 0), "up": ("mlp.gate_up_proj", 1),
    "down": ("mlp.down_proj", None), "lm_head": ("lm_head", None), "embed_tokens": ("model.embed_tokens", None),
}
ALIASES = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down", "all-linear": "all"}


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("qkv", "o", "gate_up", "down")
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA)
    dora: bool = False  # weight-decomposed LoRA on the linear layers (peft's use_dora)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


def parse_targets(spec: str | tuple[str, ...]) -> tuple[str, ...]:
    """'qkv,o,gate_up,down', 'q,v', 'all-linear', '...,embed_tokens' -> validated short names. all-linear is peft's:
    the decoder layers' linears, neither lm_head nor the embedding (name them to adapt them)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out = []
    for name in names:
        name = ALIASES.get(name, name)
        if name == "all":
            out += ["qkv", "o", "gate_up", "down"]
        elif name in TARGETS:
            out.append(name)
        else:
            raise ValueError(f"unknown LoRA target {name!r}; choose from {', '.join(TARGETS)} or all-linear")
    if not out:
        raise ValueError("no LoRA targets given; e.g. --targets qkv,o,gate_up,down")
    return tuple(dict.fromkeys(out))


def _slice_bounds(model, suffix: str) -> list[tuple[int, int]]:
    c = model.config
    sizes = c.qkv_sizes if suffix == "self_attn.qkv_proj" else (c.intermediate_size, c.intermediate_size)
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _wanted_modules(targets: tuple[str, ...]) -> dict[str, set | None]:
    """Module name suffix -> the indices of its slices to adapt (None: the whole layer)."""
    wanted: dict[str, set | None] = {}
    for target in targets:
        suffix, index = TARGETS[target]
        if index is None:
            wanted[suffix] = None
        elif wanted.get(suffix, set()) is not None:
            wanted.setdefault(suffix, set()).add(index)
    return wanted


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the targeted layers in place (all layers): LoRALinear on linears, LoRAEmbedding on the embedding.
    Returns the model."""
    targets = parse_targets(config.targets)
    if config.dora and "embed_tokens" in targets:
        raise ValueError("DoRA on the embedding is not supported (peft's DoRA there rescales each embedding dimension "
                         "by a norm over the whole vocabulary); drop embed_tokens from the targets, or DoRA")
    tied = model.config.tie_word_embeddings
    for name in [name for name, _ in model.named_modules()]:  # names first: the loop replaces modules
        module = model.get_submodule(name) if name else model
        for suffix, indices in _wanted_modules(targets).items():
            if not (name == suffix or name.endswith("." + suffix)):
                continue
            if isinstance(module, ADAPTERS):
                raise ValueError(f"{name} already has an adapter ({type(module).__name__}); one per layer")
            if isinstance(module, nn.Embedding):
                set_module(model, name, LoRAEmbedding(module, config.rank, config.scale, config.rslora, tied))
            elif isinstance(module, (nn.Linear, NF4Linear)):
                if indices is None:
                    slices = [(0, module.out_features)]
                else:
                    slices = [b for i, b in enumerate(_slice_bounds(model, suffix)) if i in indices]
                set_module(model, name, LoRALinear(module, config.rank, config.scale, config.dropout, slices,
                                                    config.rslora, tied and name == "lm_head", config.dora))
    return model


def add_trainable_tokens(model: nn.Module, token_ids, lm_head: bool = True) -> nn.Module:
    """Make the embedding rows of `token_ids` trainable on their own (peft's trainable_token_indices), W frozen. Their
    lm_head rows train too: on a tied model always (they are the same rows: peft ties them), on an untied one when
    `lm_head` (peft's {"embed_tokens": ids, "lm_head": ids}), so that the model can also learn to emit a new token.
    A layer that already has a LoRA adapter cannot also have token rows. Returns the model."""
    ids = check_token_ids(token_ids, model.config.vocab_size)
    tied = model.config.tie_word_embeddings
    embedding, head = model.model.embed_tokens, model.lm_head
    if type(embedding) is not nn.Embedding:
        raise ValueError(f"model.embed_tokens already has an adapter ({type(embedding).__name__}); trainable tokens "
                         "and LoRA on the embedding do not combine (nor do they in peft)")
    if (tied or lm_head) and type(head) is not nn.Linear:
        raise ValueError(f"lm_head already has an adapter ({type(head).__name__}), and the tokens' lm_head rows would "
                         "train too (a tied model's are the embedding's); drop lm_head from the LoRA targets"
                         + ("" if tied else ", or pass lm_head=False"))
    rows = TrainableTokens(embedding, ids)
    model.model.embed_tokens = rows
    if tied or lm_head:
        model.lm_head = TrainableTokens(head, ids, tied_to=rows if tied else None)
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA linear layers (adapter_modules has every kind)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def use_fp8(model: nn.Module) -> int:
    """Give every plain LoRA linear of the decoder layers (not DoRA, not on a 4-bit base) its frozen W in FP8 too,
    for its two GEMMs (kernels/fp8_linear.py, train.py --fp8); how many. W itself stays: merging, saving and the
    decoding after training read it. Dimensions must be multiples of 16 (TMA's 16-byte rows): every Phi's are."""
    layers = [m for name, m in lora_modules(model).items() if name.startswith("model.layers.")
              and m.base4 is None and m.lora_magnitude is None and not m.merged]
    for m in layers:
        if m.in_features % 16 or m.out_features % 16:
            raise ValueError(f"FP8 GEMMs need layer sizes that are multiples of 16, not {m.out_features} x "
                             f"{m.in_features}")
        m.fp8 = quantize_weight(m.weight)
    return len(layers)


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """requires_grad only on adapter parameters, every kind (+ biases: 'all', or 'lora_only' for biases of LoRA
    layers). Adapter parameters are named lora_*: lora_A/B, lora_magnitude, lora_embedding_A/B, lora_token_rows."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith("lora_"))
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for m in lora_modules(model).values():
            if getattr(m, "bias", None) is not None:
                m.bias.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter parameters, every kind, under this project's names (`...qkv_proj.lora_A`)."""
    return {name: p for name, p in model.state_dict().items() if ".lora_" in name}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight. A tied lm_head's or embedding's LoRA unties them: the model (and a model
    saved from it) then has an lm_head of its own, and its config says tie_word_embeddings false. Trainable token rows
    are written into W and keep a tied model tied."""
    modules = adapter_modules(model).values()
    for m in modules:
        m.merge()
    if any(m.tied for m in modules):
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)


def unmerge_lora(model: nn.Module) -> None:
    modules = adapter_modules(model).values()
    for m in modules:
        m.unmerge()
    if any(m.tied for m in modules):
        model.config = dataclasses.replace(model.config, tie_word_embeddings=True)

