"""Phi-3 model configuration: a frozen dataclass built from a checkpoint's config.json.

Covers the whole Phi3ForCausalLM family (mini-4k/128k, medium-4k/128k, Phi-3.5-mini). Reads both the
classic `rope_scaling` key and transformers v5's `rope_parameters`; "su" and "yarn" are old names of
"longrope" (transformers maps them the same way).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config.json we cannot use; the message names the file, the problem and what to do."""


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
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_attention_factor_override: float | None = None  # explicit `attention_factor` in the config
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 32000
    pad_token_id: int | None = 32000
    torch_dtype: str = "bfloat16"

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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
        def fail(what: str) -> ConfigError:
            return ConfigError(f"{source}: {what}")

        model_type = d.get("model_type")
        if model_type == "phi3small" or "Phi3SmallForCausalLM" in (d.get("architectures") or []):
            raise fail("Phi-3-small (model_type 'phi3small') is a different architecture (gegelu MLP, block-sparse "
                       "attention, tiktoken vocabulary) and is not supported; use Phi-3-mini, Phi-3-medium or Phi-3.5-mini")
        if model_type != "phi3":
            raise fail(f"model_type is {model_type!r}, expected 'phi3' (Phi3ForCausalLM: Phi-3-mini/medium, Phi-3.5-mini)")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                raise fail(f"'{key}' must be a positive integer, got {d.get(key)!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise fail(f"hidden_act {d['hidden_act']!r} is not supported (Phi-3 uses 'silu')")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise fail("partial_rotary_factor != 1.0 is not a Phi-3 checkpoint; not supported")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if d["hidden_size"] % heads or heads % kv_heads:
            raise fail(f"hidden_size {d['hidden_size']} / heads {heads} / kv heads {kv_heads} do not divide evenly")
        if d.get("head_dim") not in (None, d["hidden_size"] // heads):
            raise fail(f"head_dim {d['head_dim']} != hidden_size / num_attention_heads; not a Phi-3 layout")

        max_pos = d.get("max_position_embeddings", 4096)
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_theta = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type in ("su", "yarn"):
            rope_type = "longrope"
        original_max = d.get("original_max_position_embeddings", rope.get("original_max_position_embeddings", max_pos))
        short = long = attn_factor = None
        if rope_type == "longrope":
            short, long = rope.get("short_factor"), rope.get("long_factor")
            half = d["hidden_size"] // heads // 2
            for name, factors in (("short_factor", short), ("long_factor", long)):
                if not isinstance(factors, list) or len(factors) != half:
                    raise fail(f"rope_scaling.{name} must be a list of head_dim/2 = {half} numbers")
            short, long = tuple(float(x) for x in short), tuple(float(x) for x in long)
            attn_factor = rope.get("attention_factor")
        elif rope_type != "default":
            raise fail(f"rope type {rope_type!r} is not supported; Phi-3 uses none (4k models) or "
                       "'longrope' (also called 'su'/'yarn', 128k models)")

        eos = d.get("eos_token_id", 32000)
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=max_pos, original_max_position_embeddings=original_max, rope_theta=rope_theta,
            rope_type=rope_type, rope_short_factor=short, rope_long_factor=long,
            rope_attention_factor_override=attn_factor, sliding_window=d.get("sliding_window"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id", 1), eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"), torch_dtype=d.get("torch_dtype") or d.get("dtype") or "bfloat16",
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "Phi3Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: file not found; a checkpoint folder needs the config.json of its model")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); restore the checkpoint's original config.json") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

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
