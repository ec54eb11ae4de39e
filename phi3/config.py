"""Phi-3 model configuration: a frozen dataclass built from a checkpoint's config.json.

Covers the whole Phi3ForCausalLM family (mini-4k/128k, medium-4k/128k, Phi-3.5-mini). Reads both the
classic `rope_scaling` key and transformers v5's `rope_parameters`; "su" and "yarn" are old names of
"longrope" (transformers maps them the same way).
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config.json we cannot use; the message names the file, the problem and what to do."""


# Bounds far above any Phi-3 (medium: hidden 5120, intermediate 17920, 40 layers, 40 heads, 131072 positions)
# that stop a config from asking `--init random` for terabytes.
SIZE_LIMITS = {"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**18, "num_hidden_layers": 2**10,
               "num_attention_heads": 2**10}
MAX_POSITIONS = 2**24
# Phi models that are another architecture than Phi3ForCausalLM, refused by name (model_type or class name)
OTHER_ARCHITECTURES = {
    "phi3small": "Phi-3-small (gegelu MLP, block-sparse attention)", "Phi3SmallForCausalLM": "Phi-3-small",
    "phi3_v": "Phi-3-vision / Phi-3.5-vision", "Phi3VForCausalLM": "Phi-3-vision / Phi-3.5-vision",
    "phimoe": "Phi-3.5-MoE", "PhiMoEForCausalLM": "Phi-3.5-MoE", "phi": "Phi-2 / Phi-1.5", "PhiForCausalLM": "Phi-2",
    "phi4mm": "Phi-4-multimodal", "Phi4MMForCausalLM": "Phi-4-multimodal",
    "phi4flash": "Phi-4-mini-flash", "Phi4FlashForCausalLM": "Phi-4-mini-flash"}
MAX_PARAMETERS = 2**37  # ~137e9; Phi-3-medium has 14e9
MAX_JSON_BYTES = 64 * 2**20  # config / index / tokenizer / adapter JSON files: the real ones are under 4 MiB


# ---- reading files from others (shared by checkpoint, tokenizer and adapter loading) ------------------------

def show(value, limit: int = 60) -> str:
    """repr() of a value read from a file, cut to `limit` characters: an error message stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class NotARegularFile(OSError):
    """A FIFO, device or socket where a file was expected."""


def open_regular(path: str | Path, fifo_ok: bool = False):
    """`path` opened for reading in binary, if it is a regular file (or, with fifo_ok, a pipe such as bash's
    `<(zcat data.gz)`); else OSError "not a regular file". Opened without blocking first: a FIFO nobody writes to
    would otherwise hang the program in open(), beyond Ctrl-C; read from one without a writer it is empty."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "a folder, not a file", os.fspath(path))
        if not (stat.S_ISREG(mode) or (fifo_ok and stat.S_ISFIFO(mode))):
            raise NotARegularFile(errno.EINVAL, "not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class DuplicateKey(ValueError):
    """A JSON object that names one key twice (json.loads would keep the last without a word)."""


def unique_keys(pairs: list) -> dict:
    """json.loads' object_pairs_hook: the object, or DuplicateKey for a key it names twice."""
    d = {}
    for key, value in pairs:
        if key in d:
            raise DuplicateKey(key)
        d[key] = value
    return d


def read_json_object(path: str | Path, error: type[ValueError], fix: str) -> dict:
    """The JSON object in `path`. A missing, unreadable, special (a FIFO would block), huge, non-UTF-8, invalid,
    too deeply nested or non-object file raises `error` with one line: "PATH: what is wrong; `fix`"."""
    try:
        with open_regular(path) as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise error(f"{path}: too large for this file (more than {MAX_JSON_BYTES} bytes); {fix}")
    try:
        data = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=unique_keys)  # -sig: a byte-order mark is fine
    except DuplicateKey as e:  # which of the two the file's author meant is a guess
        raise error(f"{path}: key {show(e.args[0])} appears twice in one object; keep one, or {fix}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); {fix}") from None
    except json.JSONDecodeError as e:  # its message names the line and column
        raise error(f"{path}: not valid JSON ({e}); {fix}") from None
    except (ValueError, RecursionError):  # an integer of more than 4300 digits; nesting deeper than the parser goes
        raise error(f"{path}: not valid JSON (a number too long or nesting too deep); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__} {show(data)}; {fix}")
    return data


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the number 1


def finite_number(value) -> float | None:
    """`value` as a finite float; None for non-numbers, bools, NaN, Infinity and integers too big for a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class Phi3Config:
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" or "longrope"
    partial_rotary_factor: float = 1.0  # Phi-4-mini: 0.75, RoPE on the first 96 of 128 dims of each head
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_attention_factor_override: float | None = None  # explicit `attention_factor` in the config
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 32000
    pad_token_id: int | None = 32000
    torch_dtype: str = "bfloat16"

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones; the rest pass through), as transformers rounds it."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Rows of qkv_proj's output: Q, then K, then V (head-major inside each)."""
        hd = self.head_dim
        return self.num_attention_heads * hd, self.num_key_value_heads * hd, self.num_key_value_heads * hd

    @property
    def rope_attention_factor(self) -> float:
        """LongRoPE scales cos and sin by sqrt(1 + ln s / ln L0), s = max_pos / L0 (1.0 for plain RoPE)."""
        if self.rope_type != "longrope":
            return 1.0
        if self.rope_attention_factor_override is not None:
            return self.rope_attention_factor_override
        s = self.max_position_embeddings / self.original_max_position_embeddings
        return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings))

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Phi3Config":
        """Every value is checked for type and range: config.json may come from anyone (note isinstance(True, int),
        NaN / Infinity literals, 10**400), and each problem names its key."""
        r = _Reader(d, source)
        if not isinstance(d, dict):
            raise r.fail(f"expected a JSON object, found {show(d)}; restore the checkpoint's original config.json")
        _check_architecture(r)
        sizes = _sizes(r)
        max_pos = r.integer("max_position_embeddings", d.get("max_position_embeddings", 4096), hi=MAX_POSITIONS)
        window = d.get("sliding_window")
        dtype = d.get("torch_dtype") or d.get("dtype") or "bfloat16"
        if not isinstance(dtype, str):
            raise r.bad("torch_dtype", "a string such as 'bfloat16'", dtype)
        return cls(**sizes, **_rope(r, sizes), **_token_ids(r, sizes["vocab_size"]),
                   max_position_embeddings=max_pos,
                   sliding_window=None if window is None else r.integer("sliding_window", window),
                   rms_norm_eps=r.positive("rms_norm_eps", d.get("rms_norm_eps", 1e-5)), torch_dtype=dtype)

    @classmethod
    def from_json(cls, path: str | Path) -> "Phi3Config":
        return cls.read(path)[0]

    @classmethod
    def read(cls, path: str | Path) -> tuple["Phi3Config", dict]:
        """The config and the JSON object it came from, read once (its other keys, e.g. a 4-bit folder's
        quantization_config, then agree with the config: the file cannot change in between)."""
        path = Path(path)
        if path.is_dir() and path.name != "config.json":  # a folder; a folder named config.json is no file to read
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: file not found; a checkpoint folder needs the config.json of its model")
        d = read_json_object(path, ConfigError, "restore the checkpoint's original config.json")
        return cls.from_dict(d, source=str(path)), d

    def to_hf_dict(self) -> dict:
        """config.json contents in the Hugging Face layout (loads in transformers' Phi3ForCausalLM)."""
        d = {
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "initializer_range": 0.02, "use_cache": True,
        }
        d.update({k: v for k, v in asdict(self).items() if not k.startswith("rope_") or k == "rope_theta"})
        d["rope_scaling"] = None
        if self.rope_type == "longrope":
            d["rope_scaling"] = {"type": "longrope", "short_factor": list(self.rope_short_factor),
                                 "long_factor": list(self.rope_long_factor)}
            if self.rope_attention_factor_override is not None:
                d["rope_scaling"]["attention_factor"] = self.rope_attention_factor_override
        return d


# ---- reading config.json, a part at a time (Phi3Config.from_dict) -------------------------------------------

class _Reader:
    """config.json's object and where it came from: checks that raise ConfigError naming the key."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def fail(self, what: str) -> ConfigError:
        return ConfigError(f"{self.source}: {what}")

    def bad(self, key: str, want: str, value) -> ConfigError:
        return self.fail(f"'{key}' must be {want}, got {show(value)}; restore the checkpoint's original config.json")

    def integer(self, key: str, value, lo: int = 1, hi: int = 2**31) -> int:
        if not is_int(value) or not lo <= value <= hi:
            raise self.bad(key, f"an integer in [{lo}, {hi}]", value)
        return value

    def positive(self, key: str, value, lo: float = 0.0, hi: float = math.inf) -> float:
        f = finite_number(value)
        if f is None or not lo < f <= hi:
            raise self.bad(key, "a finite number > 0" if hi == math.inf else f"a number in ({lo:g}, {hi:g}]", value)
        return f


def _check_architecture(r: _Reader) -> None:
    model_type, architectures = r.d.get("model_type"), r.d.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise r.bad("architectures", "a list of class names", architectures)
    other = next((name for key, name in OTHER_ARCHITECTURES.items()
                  if model_type == key or key in (architectures or [])), None)
    if other:
        raise r.fail(f"{other} is another architecture than Phi3ForCausalLM and is not supported; use Phi-3-mini, "
                     "Phi-3-medium, Phi-3.5-mini, Phi-4-mini or Phi-4")
    if model_type != "phi3" or architectures and "Phi3ForCausalLM" not in architectures:
        raise r.fail(f"model_type {show(model_type)}, architectures {show(architectures)}: not a Phi3ForCausalLM "
                     "checkpoint (Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini, Phi-4); use one")
    if r.d.get("hidden_act", "silu") != "silu":
        raise r.fail(f"hidden_act {show(r.d['hidden_act'])} is not supported; Phi-3 uses 'silu', restore the "
                     "checkpoint's original config.json")


def _sizes(r: _Reader) -> dict:
    """The layer sizes, heads and embedding tying, consistent with each other and within MAX_PARAMETERS."""
    d = r.d
    sizes = {key: r.integer(key, d.get(key), hi=limit) for key, limit in SIZE_LIMITS.items()}
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else r.integer("num_key_value_heads", kv_heads, hi=heads)
    if hidden % heads or heads % kv_heads or hidden // heads % 2:
        raise r.fail(f"hidden_size {hidden} / heads {heads} / kv heads {kv_heads} do not divide evenly into heads of "
                     "an even size; restore the checkpoint's original config.json")
    if d.get("head_dim") is not None and (not is_int(d["head_dim"]) or d["head_dim"] != hidden // heads):
        raise r.fail(f"head_dim {show(d['head_dim'])} != hidden_size / num_attention_heads, not a Phi-3 layout; "
                     "restore the checkpoint's original config.json")
    tie = d.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise r.bad("tie_word_embeddings", "true or false", tie)
    qkv_rows = hidden + 2 * kv_heads * (hidden // heads)
    n_params = sizes["vocab_size"] * hidden * (1 if tie else 2) + sizes["num_hidden_layers"] * hidden * (
        qkv_rows + hidden + 3 * sizes["intermediate_size"])  # qkv, o, gate_up and down per layer
    if n_params > MAX_PARAMETERS:
        raise r.fail(f"these sizes make a model of {n_params:.3g} parameters (more than {MAX_PARAMETERS:.3g}); "
                     "not a Phi-3 checkpoint, restore its original config.json")
    return dict(sizes, num_key_value_heads=kv_heads, tie_word_embeddings=tie)


def _rope(r: _Reader, sizes: dict) -> dict:
    """RoPE's settings: theta, partial rotary, and LongRoPE's factors and attention factor. Its numbers are used in
    float32 (1 / (factor * theta**e), e in [0, 1)): these ranges keep every frequency finite and non-zero. Phi-3:
    theta 1e4, factors 1 to ~60, attention factor ~1.19."""
    d = r.d
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise r.bad(key, "an object or null", d[key])
    rope_key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    rope = d.get(rope_key) or {}
    setting = lambda key, default: d[key] if d.get(key) is not None else rope.get(key, default)  # noqa: E731
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    partial = r.positive("partial_rotary_factor", setting("partial_rotary_factor", 1.0), hi=1.0)
    rotary = int(head_dim * partial)  # (transformers rounds down too)
    if rotary < 2 or rotary % 2:
        raise r.fail(f"partial_rotary_factor {partial:g} of head_dim {head_dim} rotates {rotary} dims, not an "
                     "even number >= 2; restore the checkpoint's original config.json")
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if not isinstance(rope_type, str):
        raise r.bad(f"{rope_key}.type", "a string", rope_type)
    factors = [name for name in ("short_factor", "long_factor") if rope.get(name) is not None]
    if factors and rope_type == "default":  # transformers would check their lengths, then ignore them
        raise r.fail(f"{rope_key} has {' and '.join(factors)} but no type, so they would be ignored; LongRoPE "
                     "checkpoints say \"type\": \"longrope\": restore the checkpoint's original config.json")
    if rope_type == "yarn" and not factors:  # Phi-3's old name of LongRoPE comes with its factor lists
        raise r.fail(f"{rope_key}: YaRN scaling (type 'yarn' without short_factor/long_factor lists) is not "
                     "supported; Phi-3 models use none (4k) or LongRoPE's factor lists (128k)")
    rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type
    out = dict(rope_theta=r.positive("rope_theta", setting("rope_theta", 10000.0), lo=1.0, hi=1e30),
               partial_rotary_factor=partial, rope_type=rope_type, original_max_position_embeddings=r.integer(
                   "original_max_position_embeddings", setting("original_max_position_embeddings", 4096),
                   lo=2, hi=MAX_POSITIONS))  # LongRoPE divides by its log
    if rope_type == "default":
        return out
    if rope_type != "longrope":
        raise r.fail(f"rope type {show(rope_type)} is not supported; Phi-3 uses none (4k models) or "
                     "'longrope' (also called 'su'/'yarn', 128k models)")
    for name in ("short_factor", "long_factor"):
        value = rope.get(name)
        if not isinstance(value, list) or len(value) != rotary // 2:
            raise r.fail(f"{rope_key}.{name} must be a list of rotary_dim/2 = {rotary // 2} numbers; restore the "
                         "checkpoint's original config.json")
        out[f"rope_{name}"] = tuple(r.positive(f"{rope_key}.{name}[{i}]", x, 1e-4, 1e4) for i, x in enumerate(value))
    if rope.get("attention_factor") is not None:
        out["rope_attention_factor_override"] = r.positive(f"{rope_key}.attention_factor", rope["attention_factor"],
                                                           1e-4, 1e4)
    return out


def _token_ids(r: _Reader, vocab: int) -> dict:
    """bos, eos (the first of a list of stop ids) and pad, each an id of the vocabulary or null."""
    ids = {}
    for key, default in (("bos_token_id", 1), ("eos_token_id", 32000), ("pad_token_id", None)):
        value = r.d.get(key, default)
        if key == "eos_token_id" and isinstance(value, list):  # [eos, other stop ids]: the first is the eos
            if not value:
                raise r.bad(key, "a token id or a non-empty list of them", value)
            value = [r.integer(f"{key}[{i}]", v, lo=0, hi=vocab - 1) for i, v in enumerate(value)][0]
        ids[key] = None if value is None else r.integer(key, value, lo=0, hi=vocab - 1)
    return ids
