"""Adapter files in the PEFT layout: save_adapter writes what peft writes, load_adapter reads what peft (or we) wrote.

    save_adapter(model, "out", base_model="~/Phi-3-mini-4k-instruct")   # loads in peft and vLLM
    load_adapter(model, "out")                                           # adds the adapter's layers to a plain model

adapter_model.safetensors holds, under base_model.model.<module>.:
    lora_A.weight, lora_B.weight           LoRA on a linear layer (LoRALinear)
    lora_magnitude_vector                  its DoRA magnitude, one per output row (adapter_config use_dora: true)
    lora_embedding_A, lora_embedding_B     LoRA on the embedding (LoRAEmbedding)
    token_adapter.trainable_tokens_delta   the trained rows of trainable_token_indices' tokens (TrainableTokens)
A file may come from anyone: every value of adapter_config.json this loader uses and every tensor's name, dtype, shape
and values are checked before the model is touched, and a problem is one CheckpointError line naming the file.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from phi3.atomic import atomic_file, write_safetensors
from phi3.checkpoint import CheckpointError, read_safetensors
from phi3.config import finite_number, is_int, read_json_object, show
from phi3.lora_layers import LoRAEmbedding, LoRALinear, TrainableTokens, adapter_modules, check_token_ids
from phi3.model import set_module
from phi3.patterns import PatternError, Patterns
from phi3.quantized import NF4Linear

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ADAPTER_FIX = "use the files that came with the adapter (as peft or train.py wrote them)"
EMBEDDING, HEAD = "model.embed_tokens", "lm_head"  # the layers trainable tokens can be on


# ---- saving --------------------------------------------------------------------------------------------------

def _peft_tensors(name: str, m: LoRALinear | LoRAEmbedding) -> dict[str, torch.Tensor]:
    key = f"{PEFT_PREFIX}{name}."
    if isinstance(m, LoRAEmbedding):
        return {key + "lora_embedding_A": m.lora_embedding_A, key + "lora_embedding_B": m.lora_embedding_B}
    tensors = {key + "lora_A.weight": m.lora_A, key + "lora_B.weight": m.full_B()}
    if m.lora_magnitude is not None:  # the whole layer's m: rows outside the slices get ||W + s B A|| (factor 1)
        tensors[key + "lora_magnitude_vector"] = m.full_magnitude(m.dora_norm())
    return tensors


def _token_indices(tokens: dict[str, TrainableTokens]):
    """peft's trainable_token_indices: a list for the embedding's rows alone (a tied lm_head follows them), else an
    object of layer -> ids (peft matches its keys as the ends of module names)."""
    if not tokens:
        return None
    if set(tokens) == {EMBEDDING}:
        return tokens[EMBEDDING].token_ids
    return {name.rsplit(".", 1)[-1]: m.token_ids for name, m in tokens.items()}


def save_adapter(model: nn.Module, folder: str | Path, base_model: str | Path | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors as peft writes them (keys base_model.model.<module>.lora_A.weight,
    ...; the module docstring lists them).

    Per-slice adapters are exported as stacked A (n*r, in) and block-diagonal B (out, n*r); their rank n*r and
    an alpha that keeps the same scale go into rank_pattern / alpha_pattern when ranks differ between modules.
    """
    layers = {n: m for n, m in adapter_modules(model).items() if not isinstance(m, TrainableTokens)}
    tokens = {n: m for n, m in adapter_modules(model).items() if isinstance(m, TrainableTokens) and not m.source}
    if not layers:
        raise ValueError("the model has no LoRA layers to save (peft's LoraConfig targets at least one)")
    dora = {m.lora_magnitude is not None for m in layers.values() if isinstance(m, LoRALinear)}
    if len(dora) > 1:
        raise ValueError("some LoRA layers have DoRA and some not; peft's use_dora is one setting for all of them")
    tensors, ranks, alphas = {}, {}, {}
    rslora = all(m.rslora for m in layers.values())
    for name, m in layers.items():
        tensors.update(_peft_tensors(name, m))
        rank = m.rank if isinstance(m, LoRAEmbedding) else len(m.slices) * m.rank
        ranks[name] = rank
        alphas[name] = m.scale * (math.sqrt(rank) if rslora else rank)  # peft's scale = alpha / r (or / sqrt r)
    for name, m in tokens.items():
        tensors[f"{PEFT_PREFIX}{name}.token_adapter.trainable_tokens_delta"] = m.lora_token_rows
    r, alpha = ranks[next(iter(layers))], alphas[next(iter(layers))]
    dropout = next((m.dropout for m in layers.values() if isinstance(m, LoRALinear)), 0.0)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model) if base_model else None,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "use_rslora": rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}), "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "use_dora": dora == {True},
        "trainable_token_indices": _token_indices(tokens), "layers_to_transform": None, "revision": None,
        # Exact full names (anchored the way peft matches pattern keys) for modules whose rank/alpha differ.
        "rank_pattern": {f"^{re.escape(n)}$": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(n)}$": v for n, v in alphas.items() if v != alpha},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors({k: t.detach().float().contiguous().cpu() for k, t in tensors.items()}, folder / ADAPTER_WEIGHTS,
                      metadata={"format": "pt"})
    with atomic_file(folder / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder


# ---- adapter_config.json -------------------------------------------------------------------------------------

def _token_ids_value(v) -> bool:
    return isinstance(v, list) and bool(v) and all(is_int(i) and i >= 0 for i in v) and len(set(v)) == len(v)


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

    check("peft_type", lambda v: v == "LORA", "'LORA' (only LoRA adapters, with DoRA and trainable tokens, are "
          "supported)", "LORA")
    check("use_dora", optional_bool, "true or false")
    check("lora_bias", lambda v: not v and optional_bool(v), "false (trained LoRA biases are not supported)")
    check("bias", lambda v: v == "none", "'none' (trained biases are not supported)", "none")
    check("modules_to_save", lambda v: v is None or v == [], "null (modules_to_save are not supported; export a "
          "LoRA-only adapter)")
    check("fan_in_fan_out", optional_bool, "true or false")  # peft ignores it for nn.Linear layers, and so do we
    check("use_rslora", optional_bool, "true or false")
    check("ensure_weight_tying", optional_bool, "true or false")  # its tied copies are saved as tensors: read as such
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
    check("trainable_token_indices", lambda v: v is None or _token_ids_value(v) or (isinstance(v, dict) and v and all(
        _token_ids_value(x) for x in v.values())), "null, a list of distinct token ids, or an object of layer -> such "
          "a list")
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


# ---- loading -------------------------------------------------------------------------------------------------

_KINDS = {  # a tensor's kind -> its key after the module's name (peft's, with or without the adapter name)
    "A": r"lora_A(?:\.default)?\.weight", "B": r"lora_B(?:\.default)?\.weight",
    "magnitude": r"lora_magnitude_vector(?:\.default)?(?:\.weight)?",
    "embedding_A": r"lora_embedding_A(?:\.default)?", "embedding_B": r"lora_embedding_B(?:\.default)?",
    "token_rows": r"token_adapter\.trainable_tokens_delta(?:\.default)?",
}
_KEYS = {kind: re.compile(rf"(?:base_model\.model\.)?(.+)\.{suffix}") for kind, suffix in _KINDS.items()}
_NAMES = {"A": "lora_A", "B": "lora_B", "magnitude": "lora_magnitude_vector", "embedding_A": "lora_embedding_A",
          "embedding_B": "lora_embedding_B", "token_rows": "trainable_tokens_delta"}


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


class _AdapterFiles:
    """An adapter folder being read: its two paths, its checked config and rank/alpha patterns; each check below
    raises CheckpointError naming the file at fault."""

    def __init__(self, folder: Path):
        self.config_path, self.weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        self.cfg = read_adapter_config(self.config_path)
        if not self.weights_path.is_file():
            raise CheckpointError(f"{self.weights_path}: not found; an adapter folder holds {ADAPTER_CONFIG} and "
                                  f"{ADAPTER_WEIGHTS}")
        try:
            self.ranks = Patterns(self.cfg.get("rank_pattern") or {}, "rank_pattern")
            self.alphas = Patterns(self.cfg.get("alpha_pattern") or {}, "alpha_pattern")
        except PatternError as e:
            raise _pattern_error(self.config_path, e) from None
        self.rslora, self.dora = bool(self.cfg.get("use_rslora")), bool(self.cfg.get("use_dora"))

    def tensors(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """The file's adapter tensors by module and kind (copies of the model's own layers skipped)."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in read_safetensors(self.weights_path).items():
            if _same_base_layer(model, key, t, self.weights_path):
                continue
            found = next(((m.group(1), kind) for kind, p in _KEYS.items() if (m := p.fullmatch(key))), None)
            if found is None:
                raise CheckpointError(f"{self.weights_path}: unexpected tensor {show(key)}; expected <module>.lora_A."
                                      "weight / .lora_B.weight (or peft's DoRA, embedding or trainable-token keys)")
            module, kind = found
            if kind in groups.get(module, {}):
                raise CheckpointError(f"{self.weights_path}: two tensors for {_NAMES[kind]} of {show(module)}; "
                                      f"{ADAPTER_FIX}")
            groups.setdefault(module, {})[kind] = t
        if not groups:
            raise CheckpointError(f"{self.weights_path}: holds no LoRA tensors; {ADAPTER_FIX}")
        return groups

    def float32(self, name: str, kind: str, t: torch.Tensor, shape: tuple[int, ...], layer: str) -> torch.Tensor:
        """t as the fp32 tensor a layer keeps, checked: floating point, of `shape`, finite."""
        if not t.is_floating_point():
            raise CheckpointError(f"{self.weights_path}: {name} has {_NAMES[kind]} {t.dtype}; adapter weights are "
                                  f"floating point. {ADAPTER_FIX}")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{self.weights_path}: {name} has {_NAMES[kind]} {list(t.shape)}, the layer "
                                  f"({layer}) needs {list(shape)}; adapter for another model size")
        t = t.float()
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{self.weights_path}: {name} has NaN or infinite values (as float32); the adapter "
                                  "is corrupt (e.g. training diverged)")
        return t

    def pair(self, name: str, A: torch.Tensor, B: torch.Tensor, fan_in: int, fan_out: int, dtype, kinds=("A", "B")):
        """A (r, fan_in) and B (fan_out, r) checked, with the rank and scale adapter_config gives the module:
        (A, B, rank, scale), A and B in fp32."""
        a, b = (_NAMES[k] for k in kinds)
        if not (A.is_floating_point() and B.is_floating_point()):
            raise CheckpointError(f"{self.weights_path}: {name} has {a} {A.dtype} / {b} {B.dtype}; LoRA weights are "
                                  f"floating point. {ADAPTER_FIX}")
        rank = A.shape[0] if A.dim() == 2 else 0
        if A.shape != (rank, fan_in) or B.shape != (fan_out, rank) or rank == 0:
            raise CheckpointError(f"{self.weights_path}: {name} has {a} {list(A.shape)} / {b} {list(B.shape)}, the "
                                  f"layer is {fan_out}x{fan_in}; adapter for another model size")
        if rank > min(fan_in, fan_out):  # also bounds the memory the layer allocates
            raise CheckpointError(f"{self.weights_path}: {name} has rank {rank}, more than the layer's "
                                  f"{fan_out}x{fan_in} can use; {ADAPTER_FIX}")
        try:
            configured = self.ranks.value(name, self.cfg.get("r", 8))
            alpha = self.alphas.value(name, self.cfg.get("lora_alpha", 8))
        except PatternError as e:  # over the step budget
            raise _pattern_error(self.config_path, e) from None
        if rank != configured:
            raise CheckpointError(f"{self.weights_path}: {name} has rank {rank}, but {ADAPTER_CONFIG} gives it rank "
                                  f"{configured} (r / rank_pattern); the two files do not belong together")
        A, B = A.float(), B.float()  # the layer keeps LoRA weights in fp32; check the values it will hold
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise CheckpointError(f"{self.weights_path}: {name} has NaN or infinite values (as float32); the adapter "
                                  "is corrupt (e.g. training diverged)")
        scale = alpha / math.sqrt(rank) if self.rslora else alpha / rank
        # |scale * (B A)_ij| <= |scale| * rank * max|B| * max|A|: below the largest value of the model's dtype, the
        # merge cannot overflow to inf (a finite but absurd alpha or weight would).
        if abs(scale) * rank * A.abs().max().item() * B.abs().max().item() >= torch.finfo(dtype).max:
            raise CheckpointError(f"{self.config_path}: lora_alpha {show(alpha)} with {name}'s weights overflows "
                                  f"{str(dtype).removeprefix('torch.')}; {ADAPTER_FIX}")
        return A, B, rank, scale

    def token_layers(self, model: nn.Module) -> dict[str, list[int]]:
        """trainable_token_indices as {EMBEDDING or HEAD: ids}. On a tied model lm_head's rows are the embedding's:
        a separate set for it (peft's when the ids differ) is refused."""
        spec = self.cfg.get("trainable_token_indices")
        if spec is None:
            return {}
        if isinstance(spec, list):
            spec = {EMBEDDING: spec}
        layers = {}
        for key, ids in spec.items():
            named = [n for n in (EMBEDDING, HEAD) if n.endswith(key)]  # peft's matching: the end of a module name
            if len(named) != 1 or named[0] in layers:
                raise CheckpointError(f"{self.config_path}: trainable_token_indices key {show(key)} must name the "
                                      f"embedding ({EMBEDDING}) or lm_head, once each; {ADAPTER_FIX}")
            try:
                layers[named[0]] = check_token_ids(ids, model.config.vocab_size)
            except ValueError as e:
                raise CheckpointError(f"{self.config_path}: {e}; {ADAPTER_FIX}") from None
        if model.config.tie_word_embeddings and HEAD in layers:
            if layers.get(EMBEDDING) != layers[HEAD]:
                raise CheckpointError(f"{self.config_path}: trainable_token_indices gives lm_head its own tokens, but "
                                      "this model's lm_head is its embedding (tied): train the same tokens on both")
            del layers[HEAD]  # tied: follows the embedding's rows (peft saves none of its own)
        return layers


def _plan_linear(files: _AdapterFiles, model, name: str, base, ts: dict):
    if files.dora != ("magnitude" in ts):
        raise CheckpointError(f"{files.weights_path}: {name} {'lacks' if files.dora else 'has'} a "
                              f"lora_magnitude_vector, but {ADAPTER_CONFIG} says use_dora {str(files.dora).lower()}; "
                              "the two files do not belong together")
    dtype = base.dtype if isinstance(base, NF4Linear) else base.weight.dtype
    A, B, rank, scale = files.pair(name, ts["A"], ts["B"], base.in_features, base.out_features, dtype)
    m = ts.get("magnitude")
    m = None if m is None else files.float32(name, "magnitude", m, (base.out_features,), f"{base.out_features} rows")
    # a merged row is m_i times a unit vector, so no merged value exceeds max |m|: below the dtype's largest, no inf
    if m is not None and m.abs().max().item() >= torch.finfo(dtype).max:
        raise CheckpointError(f"{files.weights_path}: {name}'s lora_magnitude_vector overflows "
                              f"{str(dtype).removeprefix('torch.')}; {ADAPTER_FIX}")
    tied = name == "lm_head" and model.config.tie_word_embeddings

    def build():
        layer = LoRALinear(base, rank, scale, float(files.cfg.get("lora_dropout", 0.0)), [(0, base.out_features)],
                           files.rslora, tied, dora=m is not None)
        for param, value in ((layer.lora_A, A), (layer.lora_B, B), (layer.lora_magnitude, m)):
            if value is not None:
                param.copy_(value)
        return layer
    return build


def _plan_embedding(files: _AdapterFiles, model, name: str, base: nn.Embedding, ts: dict):
    if files.dora or "magnitude" in ts:
        raise CheckpointError(f"{files.config_path}: use_dora with LoRA on the embedding ({name}) is not supported "
                              "(peft's DoRA there rescales each dimension by a norm over the vocabulary)")
    A, B, rank, scale = files.pair(name, ts["embedding_A"], ts["embedding_B"], base.num_embeddings,
                                   base.embedding_dim, base.weight.dtype, ("embedding_A", "embedding_B"))

    def build():
        layer = LoRAEmbedding(base, rank, scale, files.rslora, model.config.tie_word_embeddings)
        layer.lora_embedding_A.copy_(A)
        layer.lora_embedding_B.copy_(B)
        return layer
    return build


def _plan_tokens(files: _AdapterFiles, model, name: str, base, ts: dict, ids: list[int]):
    dim = base.embedding_dim if isinstance(base, nn.Embedding) else base.in_features
    rows = files.float32(name, "token_rows", ts["token_rows"], (len(ids), dim), f"{len(ids)} tokens x {dim}")
    tied = name == EMBEDDING and model.config.tie_word_embeddings

    def build():
        layer = TrainableTokens(base, ids)
        layer.lora_token_rows.copy_(rows)
        if tied:  # lm_head computes with the same rows (built before any LoRA on lm_head: refused with them)
            model.lm_head = TrainableTokens(model.lm_head, ids, tied_to=layer)
        return layer
    return build


# The tensors a module may have, and the layer they make.
_LAYERS = {frozenset({"A", "B"}): (_plan_linear, (nn.Linear, NF4Linear)),
           frozenset({"A", "B", "magnitude"}): (_plan_linear, (nn.Linear, NF4Linear)),
           frozenset({"embedding_A", "embedding_B"}): (_plan_embedding, (nn.Embedding,)),
           frozenset({"embedding_A", "embedding_B", "magnitude"}): (_plan_embedding, (nn.Embedding,)),  # refused
           frozenset({"token_rows"}): (_plan_tokens, (nn.Embedding, nn.Linear))}


def _plan(files: _AdapterFiles, model: nn.Module) -> dict[str, callable]:
    """Module name -> a function making its adapter layer, every tensor and value checked first."""
    groups, modules, token_layers = files.tensors(model), dict(model.named_modules()), files.token_layers(model)
    with_rows = {name for name, ts in groups.items() if "token_rows" in ts}
    if with_rows != set(token_layers):
        have, want = sorted(with_rows) or ["no layer"], sorted(token_layers) or ["no layer"]
        raise CheckpointError(f"{files.weights_path}: holds trainable token rows of {', '.join(have)}, "
                              f"{ADAPTER_CONFIG}'s trainable_token_indices names {', '.join(want)}; the two files do "
                              "not belong together")
    if EMBEDDING in token_layers and model.config.tie_word_embeddings and HEAD in groups:
        raise CheckpointError(f"{files.weights_path}: LoRA on lm_head with trainable tokens on this tied model (whose "
                              "lm_head uses the tokens' rows too) is not supported")
    plans = {}
    for name, ts in groups.items():
        make, bases = _LAYERS.get(frozenset(ts), (None, ()))
        base = modules.get(name)
        if make is None or type(base) not in bases:  # (exact types: a layer with an adapter already is no base)
            raise CheckpointError(f"{files.weights_path}: module {show(name)} is not a linear layer of this model or "
                                  f"lacks lora_A/lora_B (has {', '.join(sorted(_NAMES[k] for k in ts))}); was the "
                                  "adapter trained on another model?")
        extra = (token_layers[name],) if make is _plan_tokens else ()
        plans[name] = make(files, model, name, base, ts, *extra)
    return plans


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Add the adapter layers of PEFT files (ours or trained by peft) to a plain model: LoRA (with DoRA) on linears,
    LoRA on the embedding, trainable token rows. Returns the model.

    Everything is checked before the model is touched: a bad adapter raises CheckpointError and leaves the
    model as it was."""
    plans = _plan(_AdapterFiles(Path(folder)), model)
    with torch.no_grad():
        layers = {name: build() for name, build in plans.items()}
    for name, layer in layers.items():
        set_module(model, name, layer)
    return model
