"""Config parsing for the real Phi-3 family, checkpoint loading errors, save/reload round trips."""

import json
import math
from pathlib import Path

import pytest
import torch

from phi3 import CheckpointError, ConfigError, Phi3Config, load_model, save_model
from tiny import save_hf, transformers_or_skip

CONFIGS = Path(__file__).parent.parent / "assets" / "configs"


@pytest.mark.parametrize("name,heads,kv,rope,window", [
    ("phi3-mini-4k-instruct", 32, 32, "default", 2047),
    ("phi3-mini-128k-instruct", 32, 32, "longrope", 262144),
    ("phi3-mini-128k-instruct-2024-05", 32, 32, "longrope", 262144),  # rope type "su"
    ("phi3-medium-4k-instruct", 40, 10, "default", 2047),
    ("phi3-medium-128k-instruct", 40, 10, "longrope", 131072),
])
def test_real_configs_parse(name, heads, kv, rope, window):
    c = Phi3Config.from_json(CONFIGS / name / "config.json")
    assert (c.num_attention_heads, c.num_key_value_heads, c.rope_type, c.sliding_window) == (heads, kv, rope, window)
    assert c.head_dim == c.hidden_size // heads
    q, k, v = c.qkv_sizes
    assert (q, k, v) == (heads * c.head_dim, kv * c.head_dim, kv * c.head_dim)
    if rope == "longrope":
        assert len(c.rope_short_factor) == c.head_dim // 2
        assert math.isclose(c.rope_attention_factor, math.sqrt(1 + math.log(32) / math.log(4096)))
        assert math.isclose(c.rope_attention_factor, 1.1902380714, rel_tol=1e-9)


def write_config(tmp_path, **changes):
    d = json.loads((CONFIGS / "phi3-mini-4k-instruct" / "config.json").read_text())
    d.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path / "config.json"


def test_phi3_small_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="Phi-3-small.*not supported"):
        Phi3Config.from_json(write_config(tmp_path, model_type="phi3small", architectures=["Phi3SmallForCausalLM"]))


def test_unknown_rope_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="rope type 'dynamic' is not supported.*longrope"):
        Phi3Config.from_json(write_config(tmp_path, rope_scaling={"type": "dynamic", "factor": 2.0}))


def test_config_round_trips_through_hf_dict():
    c = Phi3Config.from_json(CONFIGS / "phi3-mini-128k-instruct" / "config.json")
    assert Phi3Config.from_dict(c.to_hf_dict()) == c


# ---- loading errors: each a one-line CheckpointError naming the problem -----------------------------

@pytest.fixture
def ckpt(tmp_path):
    save_hf("gqa", tmp_path / "m")
    return tmp_path / "m"


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_model(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_model(ckpt)


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(ckpt)


def test_truncated_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*cut short"):
        load_model(ckpt)


def test_corrupt_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt.*not JSON"):
        load_model(ckpt)


def test_config_does_not_match_weights(ckpt):
    d = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(d, intermediate_size=128)))
    with pytest.raises(CheckpointError, match=r"gate_up_proj.weight has shape \[192, 64\].*\[256, 64\].*does not match"):
        load_model(ckpt)


def test_missing_and_unexpected_tensors(ckpt):
    d = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(d, num_hidden_layers=3)))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: model\.layers\.2\..* and 3 more"):
        load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps(dict(d, num_hidden_layers=1)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*model\.layers\.1\."):
        load_model(ckpt)


def test_missing_shard(ckpt, tmp_path):
    model = load_model(ckpt)
    save_model(model, tmp_path / "sharded", max_shard_bytes=2**20)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match="shard listed in model.safetensors.index.json is missing"):
        load_model(tmp_path / "sharded")


# ---- saving ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 2**20])
def test_save_reload_is_bit_identical_and_loads_in_transformers(ckpt, tmp_path, shard_bytes):
    transformers = transformers_or_skip()
    model = load_model(ckpt)
    out = save_model(model, tmp_path / "saved", max_shard_bytes=shard_bytes)
    assert (out / "model.safetensors.index.json").exists() == (shard_bytes < 2**21)
    again = load_model(out)
    for (n1, a), (n2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and a.dtype == b.dtype and torch.equal(a, b), n1
    hf = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 32000, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_save_bf16_and_tied_embeddings(tmp_path):
    save_hf("tied", tmp_path / "t")
    model = load_model(tmp_path / "t", dtype="bf16")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = save_model(model, tmp_path / "saved")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_model(out, dtype=torch.bfloat16)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_save_replaces_existing_folder_atomically(ckpt, tmp_path):
    model = load_model(ckpt)
    target = tmp_path / "saved"
    save_model(model, target)
    (target / "stale.txt").write_text("old run")
    save_model(model, target, tokenizer_from=Path(__file__).parent.parent / "assets" / "tokenizer")
    assert not (target / "stale.txt").exists() and (target / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
