"""Config parsing for the real Phi-3 family, checkpoint loading errors, save/reload round trips."""

import json
import math
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from phi3 import CheckpointError, ConfigError, Phi3Config, load_model, save_model
from phi3.checkpoint import read_safetensors
from test_model import assert_as_accurate
from tiny import save_hf, transformers_or_skip

CONFIGS = Path(__file__).parent.parent / "assets" / "configs"
TOKENIZER = Path(__file__).parent.parent / "assets" / "tokenizer"


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
        assert math.isclose(c.rope_attention_factor, 1.1902380714, rel_tol=1e-9)  # the literal is rounded to 4e-11


def write_config(tmp_path, **changes):
    d = json.loads((CONFIGS / "phi3-mini-4k-instruct" / "config.json").read_text())
    d.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path / "config.json"


@pytest.mark.parametrize("model_type,architecture,name", [
    ("phi3small", "Phi3SmallForCausalLM", "Phi-3-small"), ("phi4mm", "Phi4MMForCausalLM", "Phi-4-multimodal"),
    ("phi4flash", "Phi4FlashForCausalLM", "Phi-4-mini-flash"), ("phi3_v", "Phi3VForCausalLM", "Phi-3-vision"),
    ("phimoe", "PhiMoEForCausalLM", "Phi-3.5-MoE"), ("phi3", "Phi4MMForCausalLM", "Phi-4-multimodal"),
    ("llama", "LlamaForCausalLM", "not a Phi3ForCausalLM checkpoint"),
    ("phi3", "LlamaForCausalLM", "not a Phi3ForCausalLM checkpoint")])
def test_other_architectures_are_refused_by_name(tmp_path, model_type, architecture, name):
    with pytest.raises(ConfigError, match=name):
        Phi3Config.from_json(write_config(tmp_path, model_type=model_type, architectures=[architecture]))


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
    save_model(model, tmp_path / "sharded", max_shard_bytes=2**20, tokenizer_from=TOKENIZER)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match="shard listed in model.safetensors.index.json is missing"):
        load_model(tmp_path / "sharded")


# ---- saving ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 2**20])
def test_save_reload_is_bit_identical_and_loads_in_transformers(ckpt, tmp_path, shard_bytes):
    transformers = transformers_or_skip()
    model = load_model(ckpt)
    out = save_model(model, tmp_path / "saved", max_shard_bytes=shard_bytes, tokenizer_from=TOKENIZER)
    assert (out / "model.safetensors.index.json").exists() == (shard_bytes < 2**21)
    again = load_model(out)
    for (n1, a), (n2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and a.dtype == b.dtype and torch.equal(a, b), n1
    hf = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 32000, (1, 9))
    with torch.no_grad():
        ref = hf(ids).logits
        assert_as_accurate(model(ids), ref, hf.double()(ids).logits)


def test_save_bf16_and_tied_embeddings(tmp_path):
    save_hf("tied", tmp_path / "t")
    model = load_model(tmp_path / "t", dtype="bf16")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = save_model(model, tmp_path / "saved", tokenizer_from=TOKENIZER)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_model(out, dtype=torch.bfloat16)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_save_replaces_an_earlier_save_atomically_and_nothing_else(ckpt, tmp_path):
    model = load_model(ckpt)
    target = tmp_path / "saved"
    save_model(model, target, tokenizer_from=TOKENIZER)
    first = (target / "model.safetensors").stat().st_ino
    save_model(model, target, tokenizer_from=TOKENIZER)  # an earlier save: replaced whole
    assert (target / "model.safetensors").stat().st_ino != first and (target / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (target / "notes.txt").write_text("the user's")  # now it holds a file save_model did not write: never replaced
    with pytest.raises(CheckpointError, match="did not write \\(notes.txt\\)"):
        save_model(model, target, tokenizer_from=TOKENIZER)
    assert (target / "notes.txt").read_text() == "the user's"


# ---- files from strangers: every bad value is one CheckpointError / ConfigError line, never a traceback ----------

def assert_one_line(error, path) -> None:
    """The house format: 'PATH: what is wrong; what to do' on one line."""
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message and ";" in message, message


NAN, INF = float("nan"), float("inf")
LONGROPE = {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}  # head_dim 96: 48 factors


BAD_VALUES = {  # config.json key -> values of a wrong type or out of range, one case each
    "hidden_size": ["3072", True, 0, 3072.0, None], "vocab_size": [-1, 2**40], "num_hidden_layers": [10**6],
    "intermediate_size": [10**400], "num_attention_heads": [[32]], "num_key_value_heads": [0, True, 64, "8"],
    "rms_norm_eps": [0, -1e-5, NAN, INF, "1e-5", True, 10**400], "rope_theta": [0, -1.0, 0.5, NAN, 1e300, {}],
    "sliding_window": [0, -5, 2047.5, True, "2047", 10**30], "max_position_embeddings": [0, 2**40, None],
    "original_max_position_embeddings": ["4096", -1, 1], "tie_word_embeddings": ["false", 0],
    "bos_token_id": [1.5, -1], "pad_token_id": [32064, -1, "<pad>"], "eos_token_id": [["32000"], [], 10**9],
    "torch_dtype": [16, ["bfloat16"]], "architectures": ["Phi3ForCausalLM", [5]], "model_type": [["phi3"], None],
    "head_dim": [96.0, 64], "hidden_act": [5, "gelu"], "partial_rotary_factor": [0, 1.5, "1", NAN, 0.01, 0.99],
    "rope_scaling": ["longrope", [1.0], {"type": 5}], "rope_parameters": [5],
}


@pytest.mark.parametrize("changes,key", [({key: v}, key) for key, values in BAD_VALUES.items() for v in values] + [
    ({"eos_token_id": [32000, True]}, r"eos_token_id\[1\]"),
    ({"rope_scaling": dict(LONGROPE, short_factor=["1.0"] * 48)}, r"short_factor\[0\]"),
    ({"rope_scaling": dict(LONGROPE, long_factor=[1.0] * 47 + [NAN])}, r"long_factor\[47\]"),
    ({"rope_scaling": dict(LONGROPE, long_factor=[1.0] * 47 + [INF])}, r"long_factor\[47\]"),
    ({"rope_scaling": dict(LONGROPE, short_factor=[True] * 48)}, r"short_factor\[0\]"),
    ({"rope_scaling": dict(LONGROPE, short_factor=[-1.0] * 48)}, r"short_factor\[0\]"),
    ({"rope_scaling": dict(LONGROPE, short_factor=[1.0] * 47)}, "short_factor must be a list of rotary_dim/2 = 48"),
    ({"rope_scaling": dict(LONGROPE, short_factor={"a": 1})}, "short_factor must be a list"),
    ({"rope_scaling": dict(LONGROPE, short_factor=[1e-30] * 48)}, r"short_factor\[0\]"),
    ({"rope_scaling": dict(LONGROPE, attention_factor=NAN)}, "attention_factor"),
    ({"rope_scaling": dict(LONGROPE, attention_factor=1e30)}, "attention_factor"),
    # LongRoPE's factors without a type would be dropped (plain RoPE); a YaRN "factor" is not LongRoPE
    ({"rope_scaling": {k: v for k, v in LONGROPE.items() if k != "type"}}, "short_factor and long_factor but no type"),
    ({"rope_scaling": dict(LONGROPE, type=None, long_factor=[5.0])}, "but no type"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "YaRN scaling .* is not supported"),
    # each size within its bound, together a model of terabytes: refused before `--init random` allocates it
    ({"hidden_size": 2**16, "num_attention_heads": 512, "num_key_value_heads": 512, "intermediate_size": 2**18,
      "num_hidden_layers": 2**10}, "parameters"),
])
def test_config_with_wrong_values_names_the_key(tmp_path, changes, key):
    path = write_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=key) as e:
        Phi3Config.from_json(path)
    assert_one_line(e, path)


@pytest.mark.parametrize("content,what", [
    (b"[]", "expected a JSON object"), (b"5", "expected a JSON object"), (b'"phi3"', "expected a JSON object"),
    (b"null", "expected a JSON object"), (b"{", "not valid JSON"), (b'{"a": 1,}', "not valid JSON"),
    (b"[" * 100_000, "nesting too deep"), (b'{"a": ' + b"1" * 5000 + b"}", "number too long"),
    (b'{"model_type": "phi3\xff"}', "not UTF-8"), (b"", "not valid JSON"),
    (b'{"rope_theta": 10000.0, "rope_theta": 500000.0}', "key 'rope_theta' appears twice"),  # json keeps the last
])
def test_config_file_that_is_not_a_json_object(tmp_path, content, what):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=what) as e:
        Phi3Config.from_json(tmp_path / "config.json")
    assert_one_line(e, tmp_path / "config.json")


@pytest.mark.parametrize("given", ["folder", "file"])
def test_config_json_that_is_a_folder(tmp_path, given):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"cannot be read \(a folder, not a file\)") as e:
        Phi3Config.from_json(tmp_path if given == "folder" else tmp_path / "config.json")
    assert_one_line(e, tmp_path / "config.json")
    assert "config.json/config.json" not in str(e.value)


def test_longrope_without_original_max_positions_takes_transformers_default(tmp_path):
    """transformers' Phi3Config defaults original_max_position_embeddings to 4096 (where the long factors start),
    not to max_position_embeddings (which would never switch to them)."""
    d = json.loads((CONFIGS / "phi3-mini-128k-instruct" / "config.json").read_text())
    del d["original_max_position_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours = Phi3Config.from_json(tmp_path / "config.json")
    assert ours.original_max_position_embeddings == 4096
    transformers = transformers_or_skip()
    theirs = transformers.Phi3Config.from_pretrained(tmp_path)
    assert theirs.original_max_position_embeddings == ours.original_max_position_embeddings


def test_config_that_is_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "config.json")  # open() would wait for a writer forever
    with pytest.raises(ConfigError, match="not a regular file"):
        Phi3Config.from_json(tmp_path)


def write_safetensors(path: Path, header, data: bytes = b"\0" * 16) -> Path:
    """A .safetensors file with any header: a JSON value (written as is) or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_hand_written_safetensors_reads_back(tmp_path):
    """The writer the next tests use makes files that load: the failures below come from the values alone."""
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    header = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "e": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [16, 16]}}
    tensors = read_safetensors(write_safetensors(tmp_path / "m.safetensors", header, data))
    assert torch.equal(tensors["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]])) and tensors["e"].shape == (0, 3)
    # an odd header length leaves the data misaligned for float32: the tensor is copied, values unchanged
    header_odd = json.dumps(header).encode() + b" "
    assert len(header_odd) % 4
    tensors = read_safetensors(write_safetensors(tmp_path / "odd.safetensors", header_odd, data))
    assert torch.equal(tensors["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def entry(**changes):
    return {"w": dict({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, **changes)}


@pytest.mark.parametrize("header,what", [
    ([], "header is a JSON list"), (5, "header is a JSON int"), ("w", "header is a JSON str"),
    (None, "header is a JSON"), (b"[" * 100_000, "header is not JSON"), (b"{\xff}", "header is not JSON"),
    (b"{'w': 1}", "header is not JSON"), ({"w": 5}, "entry is the int 5"), ({"w": ["F32", [4], [0, 16]]}, "the list"),
    ({"w": None}, "entry is the NoneType None"),
    (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "w": {"dtype": "F32", "shape": [4], '
     b'"data_offsets": [0, 16]}}', "header names 'w' twice"),  # json would keep the second
    (entry(dtype="F8"), "unsupported dtype 'F8'"), (entry(dtype=["F32"]), "unsupported dtype"),
    (entry(dtype=None), "unsupported dtype"), ({"w": {"shape": [4], "data_offsets": [0, 16]}}, "unsupported dtype"),
    (entry(shape=[-1, 2]), "shape"), (entry(shape=[2.0, 2]), "shape"), (entry(shape=[True, 4]), "shape"),
    (entry(shape="2,2"), "shape"), (entry(shape=None), "shape"), (entry(shape=[2**64, 1]), "shape"),
    (entry(shape=[1] * 9), "shape"), (entry(shape=[2**62] * 8), "needs more than the file holds"),
    (entry(data_offsets=[0]), "data_offsets"), (entry(data_offsets=[0, 8, 16]), "data_offsets"),
    (entry(data_offsets=[0, "16"]), "data_offsets"), (entry(data_offsets=[False, 16]), "data_offsets"),
    (entry(data_offsets=None), "data_offsets"), (entry(data_offsets=[0, 16.0]), "data_offsets"),
    (entry(data_offsets=[16, 0]), "outside the file"), (entry(data_offsets=[-16, 0]), "outside the file"),
    (entry(data_offsets=[0, 10**30]), "outside the file"), (entry(shape=[3, 2]), "needs 24"),
    (entry(data_offsets=[0, 8]), "span 8 bytes, shape [2, 2] of F32 needs 16"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "I32", "shape": [2], "data_offsets": [8, 16]}}, "overlap"),
])
def test_safetensors_header_any_json_value(tmp_path, header, what):
    path = write_safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError, match=re.escape(what)) as e:
        read_safetensors(path)
    assert_one_line(e, path)


@pytest.mark.parametrize("content,what", [
    (b"", "0 bytes"), (b"\x08\0\0", "3 bytes"), (struct.pack("<Q", 2**63) + b"{}", "header says"),
    (struct.pack("<Q", 200) + b"{}", "header says"),
])
def test_safetensors_too_short_for_its_header(tmp_path, content, what):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=what):
        read_safetensors(path)


@pytest.fixture
def sharded(ckpt, tmp_path):
    save_model(load_model(ckpt), tmp_path / "sharded", max_shard_bytes=2**20, tokenizer_from=TOKENIZER)
    return tmp_path / "sharded"


@pytest.mark.parametrize("weight_map,what", [
    ([], "needs a 'weight_map' object"), ("model.safetensors", "needs a 'weight_map' object"),
    ({}, "needs a 'weight_map' object"), (None, "needs a 'weight_map' object"),
] + [({"lm_head.weight": shard}, "not the name of a file") for shard in [
    5, None, ["a"], "../model.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ".", "", "a\\b.safetensors",
    "x\0.safetensors"]])
def test_index_names_only_files_inside_the_folder(sharded, weight_map, what):
    index = sharded / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"] = dict(d["weight_map"], **weight_map) if isinstance(weight_map, dict) and weight_map else weight_map
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=re.escape(what)) as e:
        load_model(sharded)
    assert_one_line(e, index)


@pytest.mark.parametrize("content", [b"[]", b"{", b"[" * 100_000, b"\xff"])
def test_index_that_is_not_a_json_object(sharded, content):
    (sharded / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: "):
        load_model(sharded)


@pytest.mark.parametrize("entry", ["a tensor no shard holds", "a tensor in the other shard"])
def test_index_that_disagrees_with_its_shards(sharded, entry):
    index = sharded / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    shards = sorted(set(d["weight_map"].values()))
    if entry == "a tensor no shard holds":
        d["weight_map"]["model.layers.99.mlp.down_proj.weight"] = shards[0]
    else:
        name = next(n for n, s in d["weight_map"].items() if s == shards[0])
        d["weight_map"][name] = shards[1]
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="which does not hold it") as e:
        load_model(sharded)
    assert_one_line(e, index)


def test_tensor_in_two_shards(sharded):
    shards = sorted(sharded.glob("model-*.safetensors"))
    first = load_file(shards[0])
    save_file(dict(load_file(shards[1]), **{next(iter(first)): next(iter(first.values()))}), shards[1])
    with pytest.raises(CheckpointError, match="is also in"):
        load_model(sharded)


@pytest.mark.parametrize("change,what", [
    (lambda t: t.to(torch.int32), "dtype int32"),
    (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "NaN or infinite"),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("-inf")), "NaN or infinite"),
])
def test_weights_that_are_not_finite_floats(ckpt, change, what):
    state = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    save_file(dict(state, **{name: change(state[name]).contiguous()}), ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{name} has {what}"):
        load_model(ckpt)


def test_weights_beyond_the_chosen_dtype(ckpt):
    """1e5 is a fine float32 but beyond float16's 65504: found after the cast, with a hint."""
    state = load_file(ckpt / "model.safetensors")
    name = "model.norm.weight"
    save_file(dict(state, **{name: torch.full_like(state[name], 1e5)}), ckpt / "model.safetensors")
    assert load_model(ckpt).model.norm.weight[0] == 1e5
    with pytest.raises(CheckpointError, match=f"{name} has NaN or infinite values as float16; .* wider --dtype"):
        load_model(ckpt, dtype="fp16")
