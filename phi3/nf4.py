"""bitsandbytes' NF4 (QLoRA's 4-bit format) on the host: quantize a weight exactly as bitsandbytes does on the CPU,
and read and write the tensors that transformers + bitsandbytes save for a 4-bit linear.

    w = quantize(linear.weight)                                        # an NF4Weight (kernels/nf4_weight.py)
    tensors.update(to_state_dict("model.layers.0.mlp.down_proj", w))
    w = from_state_dict("model.layers.0.mlp.down_proj", tensors, path)  # NF4Error if we cannot use the file

from_state_dict also reads a weight saved with compress_statistics=False (an fp32 absmax, no nested tensors).

What bitsandbytes 0.50 does for quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64) on the
CPU, and quantize() repeats step by step with the same torch operations (so the same bits):
  1. The 4-bit codes (backends/default/ops.py, torch in fp32). Each block of 64 of the flattened weight is scaled
     by its absmax, as x * (1 / max(absmax, 1e-38)) in whole blocks but as x / max(absmax, 1e-38) in a last
     partial block, clamped to [-1, 1] and given the code whose interval holds it (bucketize on the midpoints of
     the NF4 table: a value exactly on a midpoint takes the lower code). An odd count is padded with one 0.0, so
     the last low nibble is 7. A partial last block stores its absmax clamped to 1e-38; whole blocks store theirs
     as they are (0 for a block of zeros).
  2. offset = the mean of those fp32 absmax (torch's own reduction).
  3. absmax - offset in blocks of 256, by the C++ CPU kernel (csrc/cpu_ops.cpp, quantize_cpu_impl): each value
     times 1 / (max |value| of its block), clamped to [-1, 1], then looked up in a 65,536-entry table at
     trunc(((v + 1) * 0.5) * 65535 + 0.5); entry i is the code nearest -1 + 2 i / 65535 (a tie takes the lower).
     So the nearest code is only approximately nearest, and a block whose max is 0 gets code 0.
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from phi3.config import finite_number, is_int, show
from phi3.kernels.nf4_weight import BLOCK, NESTED_BLOCK, NF4Weight

NF4_CODE = torch.tensor([  # bitsandbytes' get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1]
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
LOOKUP_SIZE = 65536  # entries of the C++ kernel's table from a value in [-1, 1] to its 8-bit code
CHUNK = 1 << 20  # flat values quantized at once (a multiple of BLOCK): temporaries of a few MiB, not of the weight
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
NAMED_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
PACKED_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)  # bnb_4bit_quant_storage: same bytes
QUANT_STATE = "quant_state.bitsandbytes__nf4"
PLAIN_FIELDS = ("quant_type", "blocksize", "dtype", "shape")  # in bitsandbytes' order (QuantState.as_dict)
NESTED_FIELDS = PLAIN_FIELDS + ("nested_blocksize", "nested_dtype", "nested_offset")
MAX_QUANT_STATE_BYTES = 4096  # bitsandbytes writes about 200
MAX_DIM = 2**31  # rows or columns of one linear
REDO = "the file is damaged or was not written by transformers + bitsandbytes; download it again"


class NF4Error(ValueError):
    """A 4-bit weight we cannot use; the message names the file, the key, the problem and what to do."""


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True), computed as it does: 256 sorted fp32 values in [-1, 1], a
    sign, a decimal exponent 10^-6 .. 10^0 and 2^i evenly spaced fractions for exponent i (the 8-bit code of the
    double-quantized absmax)."""
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()


# ---- quantize --------------------------------------------------------------------------------------------------

def quantize(weight: torch.Tensor) -> NF4Weight:
    """`weight` (N, K) bf16/fp16/fp32 as NF4 with a double-quantized absmax, equal bit for bit to bitsandbytes'
    quantize_4bit(weight, quant_type="nf4", compress_statistics=True, blocksize=64) on the CPU. Works on any
    device; a CUDA weight may differ from the CPU's in the offset's last bit (another summation order)."""
    if weight.dim() != 2 or weight.numel() == 0 or weight.dtype not in DTYPE_NAMES:
        raise ValueError(f"NF4 quantizes a non-empty 2-D bf16/fp16/fp32 weight, not {weight.dtype} "
                         f"{tuple(weight.shape)}")
    flat = weight.detach().reshape(-1)  # blocks run across rows, row-major (a copy only if not contiguous)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // BLOCK), dtype=torch.float32, device=weight.device)
    for start in range(0, n, CHUNK):  # chunks hold whole blocks: only the last can end in a partial one
        stop = min(start + CHUNK, n)
        packed[start // 2:(stop + 1) // 2], absmax[start // BLOCK:-(-stop // BLOCK)] = _nf4_chunk(flat[start:stop])
    offset = absmax.mean()  # inf or NaN if the weight holds one, or if the absmax are too large to sum in fp32
    if not offset.isfinite():
        raise ValueError(f"the {tuple(weight.shape)} weight holds inf or NaN, or values so large that the sum of "
                         f"its block maxima overflows fp32; NF4 cannot store it")
    absmax_code, nested_absmax = _quantize_dynamic(absmax - offset)
    copy = lambda table: table.to(weight.device, copy=True)  # each weight owns its tables (safetensors won't share)
    return NF4Weight(packed, absmax_code, nested_absmax, copy(DYNAMIC_MAP), copy(NF4_CODE), offset.item(),
                     tuple(weight.shape), weight.dtype)


def _nf4_chunk(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes ((n + 1) // 2,) uint8 and the fp32 absmax of each block of `values` (n,)."""
    scaled, absmax = _scale_blocks(values.float())
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))  # 0.0, bitsandbytes' padding
    # The code is the number of NF4 midpoints below the value (bitsandbytes' bucketize: a tie takes the lower code);
    # 15 comparisons run 3x faster on a CPU than bucketize's binary search.
    codes = torch.zeros(scaled.shape, dtype=torch.uint8, device=values.device)
    for midpoint in _midpoints(NF4_CODE.to(values.device)):
        codes += scaled > midpoint
    return (codes[0::2] << 4) | codes[1::2], absmax  # the high nibble first


def _scale_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) fp32 divided by its block's absmax and clamped to [-1, 1]; and the absmax of each block. bitsandbytes
    multiplies whole blocks by a reciprocal but divides the last partial one, and stores only that one's absmax
    clamped to 1e-38: the two paths differ in the last bit, so both are kept."""
    whole = x.numel() - x.numel() % BLOCK
    blocks = x[:whole].view(-1, BLOCK)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
    if whole == x.numel():
        return scaled, absmax
    tail = x[whole:]
    tail_absmax = tail.abs().max().clamp(min=1e-38)
    return torch.cat([scaled, (tail / tail_absmax).clamp_(-1, 1)]), torch.cat([absmax, tail_absmax.view(1)])


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2


def _quantize_dynamic(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU blockwise 8-bit quantization of `values` (m,) fp32 with the dynamic map, in blocks of 256:
    codes (m,) uint8 and the fp32 max |value| of each block."""
    m = values.numel()
    blocks = F.pad(values, (0, -m % NESTED_BLOCK)).view(-1, NESTED_BLOCK)  # zeros leave a max of |values| alone
    block_max = blocks.abs().amax(1)
    inverse = torch.where(block_max > 0, 1.0 / block_max, 0.0)
    normed = (blocks * inverse.view(-1, 1)).clamp_(-1, 1)
    position = ((normed + 1) * 0.5) * (LOOKUP_SIZE - 1) + 0.5  # fp32 steps as in C
    # NaN is 0 * inf, where a block max below 2^-128 has no fp32 inverse: x86 converts NaN to the integer 0.
    index = position.nan_to_num_(0.0).long()  # truncates, as C's cast does
    codes = _lookup_table(DYNAMIC_MAP.to(values.device))[index]
    codes[block_max == 0] = 0  # the kernel's choice for a block of zeros
    return codes.view(-1)[:m], block_max


def _lookup_table(code: torch.Tensor) -> torch.Tensor:
    """The C++ kernel's table: entry i is the number of midpoints of `code` below -1 + 2 i / 65535, in fp32."""
    grid = -1.0 + (2.0 * torch.arange(LOOKUP_SIZE, dtype=torch.float32, device=code.device)) / (LOOKUP_SIZE - 1)
    return torch.bucketize(grid, 0.5 * (code[:-1] + code[1:])).to(torch.uint8)


# ---- checkpoint tensors ----------------------------------------------------------------------------------------

def to_state_dict(prefix: str, w: NF4Weight) -> dict[str, torch.Tensor]:
    """The tensors transformers + bitsandbytes save for the linear `prefix` (Linear4bit: weight, then
    QuantState.as_dict(packed=True) under `weight.`), equal key for key and byte for byte."""
    base = f"{prefix}.weight"
    record = {"quant_type": "nf4", "blocksize": BLOCK, "dtype": DTYPE_NAMES[w.dtype], "shape": list(w.shape)}
    tensors = {base: w.packed.view(-1, 1), f"{base}.absmax": w.absmax_code, f"{base}.quant_map": w.code}
    if w.nested_code is not None:
        tensors[f"{base}.nested_absmax"] = w.nested_absmax
        tensors[f"{base}.nested_quant_map"] = w.nested_code
        record.update(nested_blocksize=NESTED_BLOCK, nested_dtype="float32", nested_offset=w.offset)
    tensors[f"{base}.{QUANT_STATE}"] = torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8)
    return tensors


def from_state_dict(prefix: str, tensors: dict, path) -> NF4Weight:
    """The linear `prefix`'s NF4 weight from a checkpoint's tensors (read from `path`, named in errors). Everything
    is checked as data from a stranger: an NF4Error (one line: file, key, problem, what to do) if anything is
    missing, extra, of the wrong type or size, or a format we do not read (fp4, other block sizes)."""
    base = f"{prefix}.weight"
    record = _quant_state(tensors, base, path)
    nested = "nested_offset" in record
    _check_keys(tensors, base, path, nested)
    n = record["shape"][0] * record["shape"][1]
    blocks = -(-n // BLOCK)
    read = lambda suffix, dtype, size: _tensor(tensors, f"{base}.{suffix}", dtype, size, path)
    code = read("quant_map", torch.float32, 16)
    if not torch.equal(code, NF4_CODE.to(code.device)):
        raise NF4Error(f"{path}: {base}.quant_map is not the NF4 table; {REDO}")
    common = dict(packed=_packed(tensors[base], base, n, path), code=code, shape=tuple(record["shape"]),
                  dtype=NAMED_DTYPES[record["dtype"]])
    if not nested:
        absmax = _finite(read("absmax", torch.float32, blocks), f"{base}.absmax", path)
        return NF4Weight(absmax_code=absmax, nested_absmax=None, nested_code=None, offset=0.0, **common)
    nested_absmax = _finite(read("nested_absmax", torch.float32, -(-blocks // NESTED_BLOCK)),
                            f"{base}.nested_absmax", path)
    nested_code = _finite(read("nested_quant_map", torch.float32, 256), f"{base}.nested_quant_map", path)
    offset = float(torch.tensor(float(record["nested_offset"]), dtype=torch.float32))  # as bitsandbytes reads it
    return NF4Weight(absmax_code=read("absmax", torch.uint8, blocks), nested_absmax=nested_absmax,
                     nested_code=nested_code, offset=offset, **common)


def _quant_state(tensors: dict, base: str, path) -> dict:
    """The JSON record of `base`, its fields checked."""
    key = f"{base}.{QUANT_STATE}"
    if key not in tensors:
        if f"{base}.quant_state.bitsandbytes__fp4" in tensors:
            raise NF4Error(f"{path}: {base} is quantized as fp4, which this program does not read; use an nf4 "
                           f"checkpoint (bnb_4bit_quant_type='nf4') or the 16-bit model, quantized at load")
        raise NF4Error(f"{path}: {key} is missing (a 4-bit weight needs it); {REDO}")
    raw = tensors[key]
    if not (isinstance(raw, torch.Tensor) and raw.dtype == torch.uint8 and raw.dim() == 1
            and 0 < raw.numel() <= MAX_QUANT_STATE_BYTES):
        raise NF4Error(f"{path}: {key} is {_describe(raw)}, not a uint8 vector of 1 to {MAX_QUANT_STATE_BYTES} "
                       f"bytes of JSON; {REDO}")
    try:
        record = json.loads(bytes(raw.tolist()).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise NF4Error(f"{path}: {key} is not JSON ({show(str(e))}); {REDO}") from None
    if not isinstance(record, dict):
        raise NF4Error(f"{path}: {key} holds {show(record)}, not a JSON object; {REDO}")
    problem = _record_problem(record)
    if problem:
        raise NF4Error(f"{path}: {key}: {problem}")
    return record


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _record_problem(record: dict) -> str | None:
    """What is wrong with the fields of a quant_state record, and what to do; None if it is one we read."""
    nested = "nested_offset" in record
    fields = NESTED_FIELDS if nested else PLAIN_FIELDS
    missing = [field for field in fields if field not in record]
    if missing:
        return f"the field {missing[0]!r} is missing; {REDO}"
    extra = sorted(set(record) - set(fields))
    if extra:
        return f"the field {show(extra[0])} is not one bitsandbytes writes here; {REDO}"
    quant_type, blocksize, dtype, shape = (record[f] for f in PLAIN_FIELDS)
    if quant_type != "nf4":
        return f"quant_type is {show(quant_type)}, only 'nf4' is read; use an nf4 checkpoint or the 16-bit model"
    if not (is_int(blocksize) and blocksize == BLOCK):
        return (f"blocksize is {show(blocksize)}, only {BLOCK} (bitsandbytes' default) is read; use the 16-bit "
                f"model, quantized at load")
    if not (isinstance(dtype, str) and dtype in NAMED_DTYPES):  # a JSON list is unhashable
        return f"dtype is {show(dtype)}, not one of {sorted(NAMED_DTYPES)}; {REDO}"
    if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(d) and 0 < d < MAX_DIM for d in shape)):
        return f"shape is {show(shape)}, not [rows, columns] of sizes 1 to {MAX_DIM - 1}; {REDO}"
    return _nested_problem(record) if nested else None


def _nested_problem(record: dict) -> str | None:
    if not (is_int(record["nested_blocksize"]) and record["nested_blocksize"] == NESTED_BLOCK):
        return (f"nested_blocksize is {show(record['nested_blocksize'])}, only {NESTED_BLOCK} is read; use the "
                f"16-bit model, quantized at load")
    if record["nested_dtype"] != "float32":
        return f"nested_dtype is {show(record['nested_dtype'])}, not 'float32'; {REDO}"
    offset = finite_number(record["nested_offset"])
    if offset is None or not math.isfinite(float(torch.tensor(offset, dtype=torch.float32))):
        return f"nested_offset is {show(record['nested_offset'])}, not a finite fp32 number; {REDO}"
    return None


def _check_keys(tensors: dict, base: str, path, nested: bool) -> None:
    """Every tensor `<base>.<suffix>` the record calls for is there, and no other: a nested key beside a plain
    record (or the reverse) means the file mixes two weights."""
    suffixes = ["absmax", "quant_map", QUANT_STATE] + (["nested_absmax", "nested_quant_map"] if nested else [])
    expected = {base} | {f"{base}.{s}" for s in suffixes}
    missing = sorted(expected - set(tensors))
    if missing:
        raise NF4Error(f"{path}: {missing[0]} is missing (the record at {base}.{QUANT_STATE} calls for it); {REDO}")
    extra = sorted(k for k in tensors if k.startswith(f"{base}.") and k not in expected)
    if extra:
        kind = "double" if nested else "single"
        raise NF4Error(f"{path}: {extra[0]} is not part of a {kind}-quantized NF4 weight; {REDO}")


def _tensor(tensors: dict, key: str, dtype: torch.dtype, size: int, path) -> torch.Tensor:
    t = tensors[key]
    if not (isinstance(t, torch.Tensor) and t.dtype == dtype and tuple(t.shape) == (size,)):
        raise NF4Error(f"{path}: {key} is {_describe(t)}, not {dtype} ({size},) for this shape; {REDO}")
    return t


def _packed(t, key: str, n: int, path) -> torch.Tensor:
    """The packed codes as bytes: (ceil(n / 2),) uint8, whatever storage dtype bitsandbytes was given."""
    size = (n + 1) // 2
    if not (isinstance(t, torch.Tensor) and t.dtype in PACKED_DTYPES
            and tuple(t.shape) == (size // t.element_size(), 1) and size % t.element_size() == 0):
        raise NF4Error(f"{path}: {key} is {_describe(t)}, not uint8 ({size}, 1) (or the same bytes as another "
                       f"dtype) for this shape; {REDO}")
    return t.contiguous().view(-1).view(torch.uint8)


def _finite(t: torch.Tensor, key: str, path) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise NF4Error(f"{path}: {key} holds inf or NaN; {REDO}")
    return t


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
