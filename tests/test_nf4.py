"""phi3/nf4.py against bitsandbytes, the oracle (its CPU build quantizes and dequantizes NF4): quantize() bit for bit,
dequantization, the checkpoint tensors both ways, every refusal of a bad file, and a 4-bit Phi-3 saved by
transformers. Inputs are fresh random each run; a failure names its seed (torch.Generator().manual_seed(seed))."""

import json
import secrets

import pytest
import torch

from phi3 import nf4
from phi3.kernels.nf4_weight import dequantize_reference

# 0.50 replaced the CPU kernel that quantizes the absmax (a lookup table instead of a nearest-value search): the
# bits quantize() matches are those of 0.50 and later.
pytest.importorskip("bitsandbytes", minversion="0.50",
                    reason="bitsandbytes >= 0.50 is the NF4 oracle; pip install -r requirements-test.txt")
import bitsandbytes.functional as BF  # noqa: E402  (after the skip)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INF, NAN = float("inf"), float("nan")
# Single values, partial blocks, odd counts, rows shorter than a block, several nested blocks of 256 absmax.
EDGE_SHAPES = [(1, 1), (1, 2), (1, 63), (1, 64), (1, 65), (3, 21), (5, 16), (2, 96), (64, 96), (7, 33), (4, 256),
               (257, 64), (130, 129), (300, 200)]
PREFIX = "model.layers.0.mlp.down_proj"
FILE = "/models/phi-bnb-4bit/model-00001-of-00002.safetensors"  # only named in messages


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(32)
    return torch.Generator().manual_seed(seed), seed


def random_shapes(gen: torch.Generator, count: int) -> list[tuple[int, int]]:
    return [tuple(int(d) for d in torch.randint(1, 300, (2,), generator=gen)) for _ in range(count)]


def random_weight(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal values whose rows differ in scale by up to 1e6, the second row zeros."""
    rows, cols = shape
    weight = torch.randn(rows, cols, generator=gen) * 10 ** (torch.rand(rows, 1, generator=gen) * 6 - 3)
    if rows > 2:
        weight[1] = 0
    return weight.to(dtype)


def bnb_quantize(weight: torch.Tensor, compress_statistics: bool = True, quant_storage=torch.uint8):
    return BF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=compress_statistics,
                            quant_storage=quant_storage)


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit, asked for the flat tensor: its AVX-512 CPU kernel (0.50) takes the absmax of a
    (N, K) weight per row, which is wrong when K is a multiple of 16 but not of 64 (blocks run across rows); flat,
    it takes them in order. Eager, because its fallback path is torch.compile'd (seconds per shape on a CPU)."""
    flat = BF.QuantState(state.absmax, torch.Size([state.shape.numel()]), state.code, state.blocksize,
                         state.quant_type, state.dtype, state.offset, state.state2)
    with torch.compiler.set_stance("force_eager"):
        return BF.dequantize_4bit(packed, flat, quant_type="nf4").view(state.shape)


def bnb_state_dict(weight: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """What transformers saves for the 4-bit linear PREFIX (bitsandbytes' Linear4bit._save_to_state_dict)."""
    packed, state = bnb_quantize(weight, **kwargs)
    return {f"{PREFIX}.weight": packed} | {f"{PREFIX}.weight.{k}": v for k, v in state.as_dict(packed=True).items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_same_state_dicts(ours: dict, theirs: dict, note: str) -> None:
    assert list(ours) == list(theirs), note
    for key in theirs:
        assert same_bits(ours[key], theirs[key]), f"{key}, {note}"


def assert_quantizes_like_bitsandbytes(weight: torch.Tensor, note: str) -> None:
    packed, state = bnb_quantize(weight)
    ours = nf4.quantize(weight)
    note = f"{tuple(weight.shape)} {weight.dtype}, {note}"
    assert same_bits(ours.packed, packed.view(-1)), note
    assert same_bits(ours.absmax_code, state.absmax), note
    assert same_bits(ours.nested_absmax, state.state2.absmax), note
    assert same_bits(torch.tensor(ours.offset, dtype=torch.float32), state.offset), note
    assert same_bits(ours.code, state.code) and same_bits(ours.nested_code, state.state2.code), note
    assert ours.shape == tuple(state.shape) and ours.dtype == state.dtype, note


# ---- quantize ------------------------------------------------------------------------------------------------------

def test_tables_are_bitsandbytes():
    assert same_bits(nf4.NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    assert same_bits(nf4.DYNAMIC_MAP, BF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_matches_bitsandbytes(dtype):
    gen, seed = fresh_generator()
    for shape in EDGE_SHAPES + random_shapes(gen, 8):
        assert_quantizes_like_bitsandbytes(random_weight(shape, dtype, gen), f"seed {seed}")


def test_quantize_matches_bitsandbytes_across_chunks(monkeypatch):
    """Chunks of 3 blocks: many chunk boundaries, and a partial block only in the last chunk."""
    monkeypatch.setattr(nf4, "CHUNK", 3 * 64)
    gen, seed = fresh_generator()
    for shape in [(7, 100), (3, 64), (1, 193)] + random_shapes(gen, 4):
        assert_quantizes_like_bitsandbytes(random_weight(shape, torch.bfloat16, gen), f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("absmax", [1.0, 2.0, 0.5, 3.0])
def test_quantize_ties_on_the_nf4_midpoints(dtype, absmax):
    """Values on the midpoints between NF4 codes (exactly, with a power-of-two absmax in fp32) and their nearest
    neighbours, in whole blocks and in a partial last block (the division path)."""
    midpoints = ((nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / 2).to(dtype)
    neighbours = torch.cat([midpoints, torch.nextafter(midpoints, midpoints.new_tensor(2.0)),
                            torch.nextafter(midpoints, midpoints.new_tensor(-2.0))])  # 45 values
    block = torch.cat([neighbours.new_tensor([1.0]), neighbours, neighbours[:18]])  # 64, with max 1.0
    tail = torch.cat([neighbours.new_tensor([-1.0]), neighbours])  # 46: a partial block
    weight = (torch.cat([block, block.flip(0), tail]).float() * absmax).to(dtype).view(1, -1)
    assert_quantizes_like_bitsandbytes(weight, f"absmax {absmax}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_extreme_values(dtype):
    gen, seed = fresh_generator()
    huge, tiny = {torch.float16: (6e4, 1e-6)}.get(dtype, (1e30, 1e-40))  # fp16's range; bf16 has fp32's
    uniform = lambda *shape: torch.rand(*shape, generator=gen) * 2 - 1  # stays below `huge`
    cases = {"zeros": torch.zeros(5, 70), "ones": torch.ones(6, 64),
             "a column": torch.zeros(9, 65).index_fill_(1, torch.tensor([3]), -2.5),
             "huge": uniform(40, 70) * huge, "subnormal": uniform(40, 70) * tiny,
             "huge, subnormal, ordinary and zero rows": uniform(4, 200) * torch.tensor([[huge], [tiny], [1], [0]])}
    for name, weight in cases.items():
        assert_quantizes_like_bitsandbytes(weight.to(dtype), f"{name}, seed {seed}")


def test_quantize_absmax_too_small_to_invert():
    """Block maxima of about 1e-39: the centred absmax have no fp32 inverse, and 0 * inf is NaN, which bitsandbytes'
    C kernel turns into code 0."""
    for maxima in ([0.0, 1e-39, 2e-39], [2**-130] * 5 + [2**-129]):
        weight = torch.zeros(len(maxima), 64)
        weight[:, 5] = torch.tensor(maxima)
        assert_quantizes_like_bitsandbytes(weight, f"maxima {maxima}")


def test_dynamic_quantization_on_lookup_boundaries():
    """The 8-bit step of the double quantization, alone against bitsandbytes' CPU quantize_blockwise (which
    quantize_4bit uses for it): values on the 65,536 grid points of the kernel's table and on the midpoints of the
    dynamic map, each with its neighbours, in blocks of 256 whose max is 1."""
    gen, seed = fresh_generator()
    grid = -1.0 + (2.0 * torch.arange(nf4.LOOKUP_SIZE, dtype=torch.float32)) / (nf4.LOOKUP_SIZE - 1)
    points = torch.cat([grid, 0.5 * (nf4.DYNAMIC_MAP[:-1] + nf4.DYNAMIC_MAP[1:])])
    values = torch.cat([points, torch.nextafter(points, torch.tensor(2.0)),
                        torch.nextafter(points, torch.tensor(-2.0))])
    values = values.clamp(-1, 1)[torch.randperm(values.numel(), generator=gen)]
    rows = torch.nn.functional.pad(values, (0, -values.numel() % 255)).view(-1, 255)
    values = torch.cat([torch.ones(len(rows), 1), rows], 1).flatten()[:-7]  # max 1 per 256, a partial last block
    codes, block_max = nf4._quantize_dynamic(values)
    their_codes, state = BF.quantize_blockwise(values, blocksize=256)
    assert same_bits(codes, their_codes) and same_bits(block_max, state.absmax), f"seed {seed}"


def test_quantize_refuses_what_nf4_cannot_hold():
    with_value = lambda value: torch.ones(2, 64).index_fill_(1, torch.tensor([7]), value)
    bad = {"1-D": torch.ones(64), "3-D": torch.ones(2, 2, 64), "empty": torch.ones(0, 64),
           "int": torch.ones(2, 64, dtype=torch.int8), "fp64": torch.ones(2, 64, dtype=torch.float64),
           "NaN": with_value(NAN), "inf": with_value(INF), "sum overflows": torch.full((64, 64), 3e38)}
    for name, weight in bad.items():
        with pytest.raises(ValueError) as error:
            nf4.quantize(weight)
        assert str(weight.dtype) in str(error.value) or "NF4 cannot store" in str(error.value), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_reference_matches_bitsandbytes(dtype):
    gen, seed = fresh_generator()
    for shape in EDGE_SHAPES + random_shapes(gen, 4):
        weight = random_weight(shape, dtype, gen)
        expected = bnb_dequantize(*bnb_quantize(weight))
        assert same_bits(dequantize_reference(nf4.quantize(weight)), expected), f"{shape}, seed {seed}"


# ---- checkpoint tensors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_to_state_dict_is_what_bitsandbytes_saves(dtype):
    gen, seed = fresh_generator()
    for shape in [(1, 1), (3, 21), (64, 96), (257, 64)] + random_shapes(gen, 3):
        weight = random_weight(shape, dtype, gen)
        ours = nf4.to_state_dict(PREFIX, nf4.quantize(weight))
        assert_same_state_dicts(ours, bnb_state_dict(weight), f"{shape}, seed {seed}")


@pytest.mark.parametrize("compress_statistics", [True, False], ids=["double-quantized", "plain absmax"])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
def test_from_state_dict_reads_bitsandbytes(compress_statistics, quant_storage):
    gen, seed = fresh_generator()
    for shape in [(1, 4), (64, 96), (130, 130)] + [(rows, 4 * cols) for rows, cols in random_shapes(gen, 3)]:
        weight = random_weight(shape, torch.bfloat16, gen)  # counts a multiple of 4: bf16 storage holds 2 bytes
        theirs = bnb_state_dict(weight, compress_statistics=compress_statistics, quant_storage=quant_storage)
        ours = nf4.from_state_dict(PREFIX, theirs, FILE)
        packed, state = bnb_quantize(weight, compress_statistics=compress_statistics)
        assert same_bits(dequantize_reference(ours), bnb_dequantize(packed, state)), f"{shape}, seed {seed}"
        if quant_storage == torch.uint8:  # written back, byte for byte what was read
            assert_same_state_dicts(nf4.to_state_dict(PREFIX, ours), theirs, f"{shape}, seed {seed}")


def test_state_dict_round_trip():
    gen, seed = fresh_generator()
    for shape in [(1, 1), (7, 33)] + random_shapes(gen, 3):
        weight = nf4.quantize(random_weight(shape, torch.float16, gen))
        back = nf4.from_state_dict(PREFIX, nf4.to_state_dict(PREFIX, weight), FILE)
        for field in ("packed", "absmax_code", "nested_absmax", "nested_code", "code"):
            assert same_bits(getattr(back, field), getattr(weight, field)), f"{field}, {shape}, seed {seed}"
        assert (back.offset, back.shape, back.dtype) == (weight.offset, weight.shape, weight.dtype)


B = f"{PREFIX}.weight"
RECORD = f"{B}.quant_state.bitsandbytes__nf4"


def set_record(sd: dict, **fields) -> None:
    """Change, add or (with None) remove fields of the JSON record."""
    record = json.loads(bytes(sd[RECORD].tolist()))
    record.update(fields)
    set_record_text(sd, json.dumps({k: v for k, v in record.items() if v is not None}))


def set_record_text(sd: dict, text: str | bytes) -> None:
    sd[RECORD] = torch.tensor(list(text.encode() if isinstance(text, str) else text), dtype=torch.uint8)


def record(**fields):
    return lambda sd: set_record(sd, **fields)


def record_text(text: str | bytes):
    return lambda sd: set_record_text(sd, text)


def change(key: str, how):
    """sd[key] replaced by how(sd[key])."""
    return lambda sd: sd.update({key: how(sd[key])})


def plain(then):
    """The state dict bitsandbytes saves with compress_statistics=False (an fp32 absmax, no nested tensors), then
    `then` applied to it."""
    def make(sd):
        sd.clear()
        sd.update(bnb_state_dict(torch.randn(8, 96), compress_statistics=False))
        then(sd)
    return make


def nan_offset(sd: dict) -> None:
    set_record_text(sd, bytes(sd[RECORD].tolist()).decode().replace('"nested_offset": ', '"nested_offset": NaN, "x": '))


ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP = (f"{B}.{s}" for s in ("absmax", "quant_map", "nested_absmax",
                                                                    "nested_quant_map"))
# (what is wrong, how to make it from a good state dict of an (8, 96) weight, the key the error names, a phrase in it)
BAD_FILES = [
    ("no record", lambda sd: sd.pop(RECORD), RECORD, "missing"),
    ("fp4", lambda sd: sd.update({f"{B}.quant_state.bitsandbytes__fp4": sd.pop(RECORD)}), B, "fp4"),
    ("record int32", change(RECORD, torch.Tensor.int), RECORD, "uint8 vector"),
    ("record empty", record_text(""), RECORD, "uint8 vector"),
    ("record too long", record_text(" " * 5000), RECORD, "uint8 vector"),
    ("not UTF-8", record_text(b"\xff\xfe{}"), RECORD, "not JSON"),
    ("not JSON", record_text('{"quant_type": "nf4"'), RECORD, "not JSON"),
    ("NaN", nan_offset, RECORD, "not JSON"),
    ("deep JSON", record_text("[" * 2000 + "]" * 2000), RECORD, "not JSON"),
    ("JSON list", record_text("[64, 96]"), RECORD, "not a JSON object"),
    ("field missing", record(dtype=None), RECORD, "'dtype' is missing"),
    ("extra field", record(compress=True), RECORD, "'compress' is not one"),
    ("quant_type fp4", record(quant_type="fp4"), RECORD, "quant_type"),
    ("blocksize 128", record(blocksize=128), RECORD, "blocksize is 128"),
    ("blocksize true", record(blocksize=True), RECORD, "blocksize is True"),
    ("blocksize 64.0", record(blocksize=64.0), RECORD, "blocksize is 64.0"),
    ("nested_blocksize 64", record(nested_blocksize=64), RECORD, "nested_blocksize"),
    ("dtype float64", record(dtype="float64"), RECORD, "dtype is 'float64'"),
    ("dtype a list", record(dtype=["bfloat16"]), RECORD, "dtype is ['bfloat16']"),
    ("shape 1-D", record(shape=[768]), RECORD, "shape"),
    ("shape zero", record(shape=[0, 96]), RECORD, "shape"),
    ("shape negative", record(shape=[-8, -96]), RECORD, "shape"),
    ("shape strings", record(shape=["8", "96"]), RECORD, "shape"),
    ("shape huge", record(shape=[2**40, 96]), RECORD, "shape"),
    ("shape not the tensors'", record(shape=[8, 97]), B, "(388, 1)"),
    ("nested_dtype", record(nested_dtype="bfloat16"), RECORD, "nested_dtype"),
    ("offset a string", record(nested_offset="0.1"), RECORD, "nested_offset"),
    ("offset true", record(nested_offset=True), RECORD, "nested_offset"),
    ("offset beyond fp32", record(nested_offset=1e39), RECORD, "nested_offset"),
    ("offset beyond fp64", record(nested_offset=10**400), RECORD, "nested_offset"),
    ("no weight", lambda sd: sd.pop(B), B, "missing"),
    ("weight int32", change(B, torch.Tensor.int), B, "uint8 (384, 1)"),
    ("weight short", change(B, lambda t: t[:-1]), B, "uint8 (384, 1)"),
    ("weight flat", change(B, lambda t: t.view(-1)), B, "uint8 (384, 1)"),
    ("weight a list", change(B, torch.Tensor.tolist), B, "a list"),
    ("absmax fp32", change(ABSMAX, torch.Tensor.float), ABSMAX, "torch.uint8 (12,)"),
    ("absmax short", change(ABSMAX, lambda t: t[:-1]), ABSMAX, "(12,)"),
    ("quant_map not NF4", change(QUANT_MAP, lambda t: t / 2), QUANT_MAP, "NF4 table"),
    ("quant_map fp16", change(QUANT_MAP, torch.Tensor.half), QUANT_MAP, "float32 (16,)"),
    ("nested_absmax inf", change(NESTED_ABSMAX, lambda t: t.fill_(INF)), NESTED_ABSMAX, "inf or NaN"),
    ("nested_absmax size", change(NESTED_ABSMAX, lambda t: torch.ones(2)), NESTED_ABSMAX, "(1,)"),
    ("nested_quant_map NaN", change(NESTED_MAP, lambda t: t.fill_(NAN)), NESTED_MAP, "inf or NaN"),
    ("nested_quant_map short", change(NESTED_MAP, lambda t: t[:255]), NESTED_MAP, "(256,)"),
    ("no nested_absmax", lambda sd: sd.pop(NESTED_ABSMAX), NESTED_ABSMAX, "missing"),
    ("extra tensor", lambda sd: sd.update({f"{B}.absmax2": torch.ones(1)}), f"{B}.absmax2", "not part of"),
    ("plain record, nested tensors", record(nested_blocksize=None, nested_dtype=None, nested_offset=None),
     NESTED_ABSMAX, "not part of"),
    ("plain absmax NaN", plain(change(ABSMAX, lambda t: t.fill_(NAN))), ABSMAX, "inf or NaN"),
    ("plain absmax uint8", plain(change(ABSMAX, torch.Tensor.byte)), ABSMAX, "torch.float32 (12,)"),
]


@pytest.mark.parametrize("make_bad, key, phrase", [case[1:] for case in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_from_state_dict_refuses_bad_files(make_bad, key, phrase):
    sd = nf4.to_state_dict(PREFIX, nf4.quantize(torch.randn(8, 96, dtype=torch.bfloat16)))
    sd = {k: v.clone() for k, v in sd.items()} | {"model.norm.weight": torch.ones(96)}  # other layers' keys are fine
    make_bad(sd)
    with pytest.raises(nf4.NF4Error) as error:
        nf4.from_state_dict(PREFIX, sd, FILE)
    message = str(error.value)
    assert message.startswith(f"{FILE}: {key} ") or message.startswith(f"{FILE}: {key}: "), message
    assert phrase in message and "\n" not in message and len(message) < 400, message


# ---- a 4-bit Phi-3 saved by transformers ---------------------------------------------------------------------------

def test_reads_a_4bit_phi3_saved_by_transformers(tmp_path):
    """transformers + bitsandbytes quantize a tiny Phi-3 at load on the CPU and save it: every quantized linear read
    with from_state_dict holds what quantize() makes of the 16-bit weight, and dequantizes to the weights of
    transformers' own dequantize(). intermediate_size is 128, a multiple of 64: with 96, bitsandbytes' AVX-512 CPU
    dequantizer would give down_proj wrong values (see bnb_dequantize)."""
    transformers = pytest.importorskip("transformers", reason="transformers saves the 4-bit reference checkpoint")
    from safetensors.torch import load_file
    seed = secrets.randbits(32)
    torch.manual_seed(seed)
    config = transformers.Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    original = transformers.Phi3ForCausalLM(config).to(torch.bfloat16)
    original.save_pretrained(tmp_path / "16-bit")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "16-bit", quantization_config=quantization,
                                                         device_map="cpu")
    model.save_pretrained(tmp_path / "4-bit")
    tensors = load_file(tmp_path / "4-bit" / "model.safetensors")
    with torch.compiler.set_stance("force_eager"):
        dequantized = dict(model.dequantize(dtype=torch.bfloat16).named_parameters())  # its default: a string, fails
    prefixes = [k.removesuffix(".weight.quant_state.bitsandbytes__nf4") for k in tensors if k.endswith("__nf4")]
    assert len(prefixes) == 2 * 4  # qkv_proj, o_proj, gate_up_proj, down_proj per layer; lm_head stays 16-bit
    for prefix in prefixes:
        weight = nf4.from_state_dict(prefix, tensors, tmp_path / "4-bit" / "model.safetensors")
        ours = nf4.to_state_dict(prefix, nf4.quantize(original.get_parameter(f"{prefix}.weight")))
        saved = {k: v for k, v in sorted(tensors.items()) if k.startswith(f"{prefix}.")}  # a file has no key order
        assert_same_state_dicts(dict(sorted(ours.items())), saved, f"{prefix}, seed {seed}")
        assert same_bits(dequantize_reference(weight), dequantized[f"{prefix}.weight"]), f"{prefix}, seed {seed}"
