"""LoRA for Phi-3: a wrapper around the frozen linear layers, and adapter files in the PEFT layout.

    add_lora(model, LoRAConfig(rank=16, alpha=32, targets=("qkv", "o", "gate_up", "down")))
    mark_only_lora_as_trainable(model)
    ...train...
    save_adapter(model, "out", base_model="~/Phi-3-mini-4k-instruct")   # loads in peft and vLLM
    merge_lora(model)                                                    # explicit; never a side effect of .eval()

A LoRALinear keeps the frozen base weight under the checkpoint's own name (`qkv_proj.weight`), so merged
models save in the Hugging Face layout unchanged. A target may be a slice of a fused layer ("q", "v" inside
`qkv_proj`, "gate"/"up" inside `gate_up_proj`): each slice gets its own rank-r pair, which is the same thing
as one LoRA of rank n*r with stacked A and block-diagonal B. That is how it runs (one kernel call) and how
it is exported (PEFT and vLLM need no special case).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from phi3.atomic import atomic_file, write_safetensors
from phi3.checkpoint import CheckpointError, read_safetensors
from phi3.config import finite_number, is_int, read_json_object, show
from phi3.ops import lora_linear, qlora_linear
from phi3.quantized import NF4Linear
from phi3.patterns import PatternError, Patterns

# Short target name -> (module name suffix, index of the slice in the fused output, or None for all of it).
TARGETS = {
    "qkv": ("self_attn.qkv_proj", None), "q": ("self_attn.qkv_proj", 0), "k": ("self_attn.qkv_proj", 1),
    "v": ("self_attn.qkv_proj", 2), "o": ("self_attn.o_proj", None),
    "gate_up": ("mlp.gate_up_proj", None), "gate": ("mlp.gate_up_proj", 0), "up": ("mlp.gate_up_proj", 1),
    "down": ("mlp.down_proj", None), "lm_head": ("lm_head", None),
}
ALIASES = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down", "all-linear": "all"}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("qkv", "o", "gate_up", "down")
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


def parse_targets(spec: str | tuple[str, ...]) -> tuple[str, ...]:
    """'qkv,o,gate_up,down', 'q,v', 'all-linear' ... -> validated short names."""
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


class LoRALinear(nn.Module):
    """y = x W^T + scale * dropout(x) A^T B^T, W frozen; A (n*r, in) and B (out, r) per slice, in fp32.

    `slices` are the output row ranges that get an adapter (one range = the whole layer). The full B is
    block-diagonal: rows of slice i only see columns i*r..(i+1)*r of the stacked A.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float, slices: list[tuple[int, int]],
                 rslora: bool = False, tied: bool = False):
        super().__init__()
        # tied: W is also the input embedding (a tied lm_head, Phi-4-mini's). As in peft, the adapter changes the
        # output projection only; merging gives lm_head a weight of its own instead of changing the embedding.
        self.tied, self.shared = tied, ()  # merged tied: (W,), unregistered (not a second state_dict entry)
        self.rslora = rslora  # only recorded for the exported adapter_config; the scale already includes it
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base4 = base if isinstance(base, NF4Linear) else None  # a 4-bit base (QLoRA): W stays in NF4
        self.weight = None if self.base4 else base.weight  # the base layer's own tensor, frozen: no copy
        if self.weight is not None:
            self.weight.requires_grad_(False)
        self.rank, self.scale, self.dropout, self.slices = rank, scale, dropout, slices
        device = base.packed.device if self.base4 else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(len(slices) * rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(sum(e - s for s, e in slices), rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft; B = 0 -> starts at the base
        self.merged = False
        self.train(base.training)  # an adapter added to a model in eval mode has no dropout: as the layer it wraps

    def full_B(self) -> torch.Tensor:
        """B as one (out, n*r) matrix: the layer's B itself, or the slices' Bs placed block-diagonally."""
        if self.slices == [(0, self.out_features)]:
            return self.lora_B
        full = self.lora_B.new_zeros(self.out_features, len(self.slices) * self.rank)
        row = 0
        for i, (start, end) in enumerate(self.slices):
            full[start:end, i * self.rank:(i + 1) * self.rank] = self.lora_B[row:row + end - start]
            row += end - start
        return full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight)
        if self.base4 is not None:
            return qlora_linear(x, self.base4.weight4, self.lora_A, self.full_B(), self.scale,
                                dropout_p=self.dropout if self.training else 0.0, training=self.training)
        return lora_linear(x, self.weight, self.lora_A, self.full_B(), self.scale,
                           dropout_p=self.dropout if self.training else 0.0, training=self.training)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        return self.scale * (self.full_B().float() @ self.lora_A.float())  # (out, in), fp32

    @torch.no_grad()
    def merge(self) -> None:
        if self.base4 is not None:
            raise ValueError("a LoRA layer on a 4-bit base does not merge (W + s B A would be rounded to 4 bits again):"
                             " load the model in 16 bits, load the adapter there, then merge")
        if self.merged:
            return
        merged = (self.weight.float() + self.delta()).to(self.weight.dtype)
        if self.tied:  # untied from here on: the embedding keeps W
            self.shared, self.weight = (self.weight,), nn.Parameter(merged, requires_grad=False)
        else:
            self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge (exact in fp32; in bf16 the weight keeps the rounding of the add and subtract)."""
        if not self.merged:
            return
        if self.tied:
            (self.weight,), self.shared = self.shared, ()
        else:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, slices={len(self.slices)}, scale={self.scale:g}"


def _slice_bounds(model, suffix: str) -> list[tuple[int, int]]:
    c = model.config
    sizes = c.qkv_sizes if suffix == "self_attn.qkv_proj" else (c.intermediate_size, c.intermediate_size)
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the targeted linear layers in place (all layers). Returns the model."""
    wanted: dict[str, set | None] = {}  # module suffix -> slice indices (None = whole layer)
    for target in parse_targets(config.targets):
        suffix, index = TARGETS[target]
        if index is None:
            wanted[suffix] = None
        elif wanted.get(suffix, set()) is not None:
            wanted.setdefault(suffix, set()).add(index)
    for name in [name for name, _ in model.named_modules()]:  # names first: the loop replaces modules
        module = model.get_submodule(name) if name else model
        for suffix, indices in wanted.items():
            if (name == suffix or name.endswith("." + suffix)) and isinstance(module, (nn.Linear, NF4Linear)):
                if indices is None:
                    slices = [(0, module.out_features)]
                else:
                    slices = [b for i, b in enumerate(_slice_bounds(model, suffix)) if i in indices]
                tied = name == "lm_head" and model.config.tie_word_embeddings
                _set_module(model, name, LoRALinear(module, config.rank, config.scale, config.dropout, slices,
                                                    config.rslora, tied))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """requires_grad only on LoRA parameters (+ biases: 'all', or 'lora_only' for biases of LoRA layers)."""
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
    """Only the LoRA parameters, under this project's names (`...qkv_proj.lora_A`)."""
    return {name: p for name, p in model.state_dict().items() if ".lora_" in name}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight. A tied lm_head's adapter unties it: the model (and a model saved from
    it) then has an lm_head of its own, and its config says tie_word_embeddings false."""
    for m in lora_modules(model).values():
        m.merge()
    if any(m.tied for m in lora_modules(model).values()):
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()
    if any(m.tied for m in lora_modules(model).values()):
        model.config = dataclasses.replace(model.config, tie_word_embeddings=True)


# ---- PEFT files ------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, folder: str | Path, base_model: str | Path | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors as peft writes them (keys base_model.model.<module>.lora_A.weight).

    Per-slice adapters are exported as stacked A (n*r, in) and block-diagonal B (out, n*r); their rank n*r and
    an alpha that keeps the same scale go into rank_pattern / alpha_pattern when ranks differ between modules.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA layers to save")
    tensors, ranks, alphas = {}, {}, {}
    any_m = next(iter(modules.values()))
    rslora = all(m.rslora for m in modules.values())
    for name, m in modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.full_B().detach().float().contiguous().cpu()
        rank = len(m.slices) * m.rank
        ranks[name] = rank
        alphas[name] = m.scale * (math.sqrt(rank) if rslora else rank)  # peft's scale = alpha / r (or / sqrt r)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in modules})
    r, alpha = ranks[next(iter(modules))], alphas[next(iter(modules))]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model) if base_model else None,
        "r": r, "lora_alpha": alpha, "lora_dropout": any_m.dropout, "target_modules": leaves, "bias": "none",
        "use_rslora": rslora, "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "use_dora": False, "layers_to_transform": None, "revision": None,
        # Exact full names (anchored the way peft matches pattern keys) for modules whose rank/alpha differ.
        "rank_pattern": {f"^{re.escape(n)}$": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(n)}$": v for n, v in alphas.items() if v != alpha},
    }
    write_safetensors(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    with atomic_file(folder / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder


ADAPTER_FIX = "use the files that came with the adapter (as peft or train.py wrote them)"


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json with every value this loader uses checked for type and range (the file may come from
    anyone): CheckpointError naming the key otherwise. Unsupported kinds of adapter are refused here too."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg = read_json_object(path, CheckpointError, ADAPTER_FIX)

    def check(key: str, ok, want: str, default=None):
        value = cfg.get(key, default)
        if not ok(value):
            raise CheckpointError(f"{path}: '{key}' must be {want}, got {show(value)}; {ADAPTER_FIX}")
        return value

    def optional_bool(v):
        return v is None or isinstance(v, bool)

    check("peft_type", lambda v: v == "LORA", "'LORA' (only plain LoRA adapters are supported)", "LORA")
    check("use_dora", lambda v: not v and optional_bool(v), "false (DoRA adapters are not supported)")
    check("lora_bias", lambda v: not v and optional_bool(v), "false (trained LoRA biases are not supported)")
    check("bias", lambda v: v == "none", "'none' (trained biases are not supported)", "none")
    check("modules_to_save", lambda v: v is None or v == [], "null (modules_to_save are not supported; export a "
          "LoRA-only adapter)")
    check("fan_in_fan_out", optional_bool, "true or false")  # peft ignores it for nn.Linear layers, and so do we
    check("use_rslora", optional_bool, "true or false")
    check("r", lambda v: is_int(v) and v > 0, "a positive integer", 8)  # peft's defaults for r and lora_alpha
    check("lora_alpha", lambda v: finite_number(v) is not None, "a finite number", 8)
    check("lora_dropout", lambda v: finite_number(v) is not None and 0 <= v < 1, "a number in [0, 1)", 0.0)
    check("base_model_name_or_path", lambda v: v is None or isinstance(v, str), "a folder name or null")
    check("target_modules", lambda v: v is None or isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(x, str) for x in v)), "a regular expression or a list of module names")
    check("rank_pattern", lambda v: v is None or (isinstance(v, dict) and all(
        is_int(x) and x > 0 for x in v.values())), "an object of module pattern -> positive integer rank")
    check("alpha_pattern", lambda v: v is None or (isinstance(v, dict) and all(
        finite_number(x) is not None for x in v.values())), "an object of module pattern -> finite number")
    return cfg


def adapter_base_model(folder: str | Path) -> Path | None:
    """The adapter's base checkpoint as adapter_config.json names it (base_model_name_or_path), or None when it
    names none. A name that is not a local folder (a hub id such as "microsoft/Phi-3-mini-4k-instruct", or a folder
    since moved) is a CheckpointError, never a silent fall back to another model."""
    path = Path(folder) / ADAPTER_CONFIG
    base = read_adapter_config(path).get("base_model_name_or_path")
    if not base:
        return None
    base = Path(os.path.expanduser(base))  # os.path's leaves "~nosuchuser" as it is; pathlib's would raise
    if not base.is_dir():
        raise CheckpointError(f"{path}: the adapter's base model {show(str(base))} is not a local folder; pass "
                              "--model with the folder of that checkpoint")
    return base


def _pattern_error(path: Path, e: PatternError) -> CheckpointError:
    return CheckpointError(f"{path}: {e}; write the keys as module names or plain regular expressions")


def _same_base_layer(model: nn.Module, key: str, t: torch.Tensor, path: Path) -> bool:
    """Whether `key` is a copy of the model's own lm_head or embedding that peft saves beside an adapter on them
    (save_embedding_layers). One equal to this model's is skipped; another (a resized vocabulary) is refused."""
    m = re.fullmatch(r"(?:base_model\.model\.)?(lm_head|model\.embed_tokens)\.base_layer\.weight", key)
    if not m:
        return False
    own = model.get_submodule(m.group(1)).weight
    if t.shape != own.shape or not torch.equal(t.to(own.dtype), own.detach().cpu()):
        raise CheckpointError(f"{path}: {show(key)} is not this model's {m.group(1)} (peft saved the layer beside "
                              "the adapter, e.g. after resizing the vocabulary); load the adapter on the model it "
                              "was trained with")
    return True


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Add LoRA layers from PEFT files (ours or trained by peft) to a plain model. Returns the model.

    Everything is checked before the model is touched: a bad adapter raises CheckpointError and leaves the
    model as it was."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    cfg = read_adapter_config(config_path)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: not found; an adapter folder holds {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS}")
    try:
        ranks, alphas = Patterns(cfg.get("rank_pattern") or {}, "rank_pattern"), Patterns(
            cfg.get("alpha_pattern") or {}, "alpha_pattern")
    except PatternError as e:
        raise _pattern_error(config_path, e) from None
    tensors = read_safetensors(weights_path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if _same_base_layer(model, key, t, weights_path):
            continue
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if not m:
            raise CheckpointError(f"{weights_path}: unexpected tensor {show(key)}; expected <module>.lora_A.weight / "
                                  ".lora_B.weight")
        if m.group(2) in pairs.get(m.group(1), {}):
            raise CheckpointError(f"{weights_path}: two tensors for lora_{m.group(2)} of {show(m.group(1))}; "
                                  f"{ADAPTER_FIX}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise CheckpointError(f"{weights_path}: holds no LoRA tensors; {ADAPTER_FIX}")
    modules = dict(model.named_modules())
    rslora = bool(cfg.get("use_rslora"))
    layers = {}
    for name, ab in pairs.items():
        base = modules.get(name)
        if not isinstance(base, (nn.Linear, NF4Linear)) or set(ab) != {"A", "B"}:
            raise CheckpointError(f"{weights_path}: module {show(name)} is not a linear layer of this model or lacks "
                                  "lora_A/lora_B; was the adapter trained on another model?")
        A, B = ab["A"], ab["B"]
        if not (A.is_floating_point() and B.is_floating_point()):
            raise CheckpointError(f"{weights_path}: {name} has lora_A {A.dtype} / lora_B {B.dtype}; LoRA weights are "
                                  f"floating point. {ADAPTER_FIX}")
        rank = A.shape[0] if A.dim() == 2 else 0
        if A.shape != (rank, base.in_features) or B.shape != (base.out_features, rank) or rank == 0:
            raise CheckpointError(f"{weights_path}: {name} has lora_A {list(A.shape)} / lora_B {list(B.shape)}, the "
                                  f"layer is {base.out_features}x{base.in_features}; adapter for another model size")
        if rank > min(base.in_features, base.out_features):  # also bounds the memory LoRALinear allocates
            raise CheckpointError(f"{weights_path}: {name} has rank {rank}, more than the layer's "
                                  f"{base.out_features}x{base.in_features} can use; {ADAPTER_FIX}")
        try:
            configured, alpha = ranks.value(name, cfg.get("r", 8)), alphas.value(name, cfg.get("lora_alpha", 8))
        except PatternError as e:  # over the step budget
            raise _pattern_error(config_path, e) from None
        if rank != configured:
            raise CheckpointError(f"{weights_path}: {name} has rank {rank}, but {ADAPTER_CONFIG} gives it rank "
                                  f"{configured} (r / rank_pattern); the two files do not belong together")
        A, B = A.float(), B.float()  # the layer keeps LoRA weights in fp32; check the values it will hold
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise CheckpointError(f"{weights_path}: {name} has NaN or infinite values (as float32); the adapter is "
                                  "corrupt (e.g. training diverged)")
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        # |scale * (B A)_ij| <= |scale| * rank * max|B| * max|A|: below the largest value of the model's dtype, the
        # merge cannot overflow to inf (a finite but absurd alpha or weight would).
        dtype = base.dtype if isinstance(base, NF4Linear) else base.weight.dtype
        if abs(scale) * rank * A.abs().max().item() * B.abs().max().item() >= torch.finfo(dtype).max:
            raise CheckpointError(f"{config_path}: lora_alpha {show(alpha)} with {name}'s weights overflows "
                                  f"{str(dtype).removeprefix('torch.')}; {ADAPTER_FIX}")
        layers[name] = (base, A, B, rank, scale)
    for name, (base, A, B, rank, scale) in layers.items():
        tied = name == "lm_head" and model.config.tie_word_embeddings
        layer = LoRALinear(base, rank, scale, float(cfg.get("lora_dropout", 0.0)), [(0, base.out_features)], rslora,
                           tied)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        _set_module(model, name, layer)
    return model
