"""Load and save Phi-3 checkpoints in the Hugging Face layout (config.json + safetensors, single or sharded).

Loading builds the model on the `meta` device and assigns tensors that are zero-copy views of the
memory-mapped files (gpt-fast's recipe), so peak host memory stays about one checkpoint, not two. Every
problem with the files is a CheckpointError with a one-line message that says what to do.

    model = load_model("~/Phi-3-mini-4k-instruct", dtype=torch.bfloat16, device="cuda")
    save_model(model, "out/merged", tokenizer_from="~/Phi-3-mini-4k-instruct")
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from phi3 import nf4, quantized
from phi3.atomic import atomic_dir, atomic_file, write_safetensors
from phi3.config import (ConfigError, DuplicateKey, Phi3Config, is_int, open_regular, read_json_object, show,
                         unique_keys)
from phi3.model import Phi3ForCausalLM, Recompute


class CheckpointError(ValueError):
    """A checkpoint we cannot use; the message names the file, the problem and what to do."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-phi3"  # shipped in the repo
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return DTYPES[name]


def check_tokenizer_fits(tokenizer, config: Phi3Config, folder) -> None:
    """A tokenizer with ids past the model's vocab_size (files from different models) would fail mid-run in an
    embedding lookup: say so before anything runs."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens, more than the model's "
                              f"{config.vocab_size} (config.json vocab_size); the files come from different models")


def default_dtype(device) -> torch.dtype:
    """bf16 on GPUs, fp32 on the CPU (CPU bf16 matmuls are slow and less exact)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_DIMS = 8  # a Phi-3 tensor has 1 or 2


def _tensor_entry(info, data_len: int) -> tuple[torch.dtype, list[int], int, int] | str:
    """(dtype, shape, begin, end) of one header entry, or what is wrong with it. The header is JSON from whoever
    wrote the file, so each value is checked for type and range before it is used."""
    if not isinstance(info, dict):
        return f"its entry is the {type(info).__name__} {show(info, 30)}, not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return f"unsupported dtype {show(dtype)}"
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(is_int(n) and 0 <= n < 2**63 for n in shape)):
        return f"shape {show(shape)} is not a list of at most {MAX_DIMS} sizes >= 0"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(n) for n in offsets)):
        return f"data_offsets {show(offsets)} is not a pair of integers"
    begin, end = offsets
    numel = 0 if 0 in shape else 1
    for n in shape if numel else ():
        numel *= n
        if numel > data_len:  # stop early: a shape of huge sizes cannot make a huge product to compute
            break
    if not 0 <= begin <= end <= data_len:
        return "it lies outside the file: it was cut short"
    size = numel * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != size:
        needed = "more than the file holds" if numel > data_len else f"{size}"
        return f"data_offsets span {end - begin} bytes, shape {shape} of {dtype} needs {needed}"
    return SAFETENSORS_DTYPES[dtype], shape, begin, end


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over a private (copy-on-write) memory map of one .safetensors file, validated: any
    header (any JSON value anywhere) either gives tensors that lie inside the file without overlapping, or a
    CheckpointError."""
    bad = f"{path}: truncated or corrupt safetensors file"
    fix = "download or copy the file again"
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{bad} ({size} bytes); {fix}")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{bad} (header says {header_len} bytes, file has {size}); {fix}")
            raw = f.read(header_len)
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); check the file, or {fix}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKey as e:  # json would keep the last entry of a tensor named twice
        raise CheckpointError(f"{bad} (header names {show(e.args[0])} twice); {fix}") from None
    except (ValueError, RecursionError):  # bad UTF-8 or JSON (both ValueErrors), or nesting too deep
        raise CheckpointError(f"{bad} (header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (header is a JSON {type(header).__name__}, not an object); {fix}")
    header.pop("__metadata__", None)
    data_start, data_len = 8 + header_len, size - 8 - header_len
    entries = {}
    for name, info in header.items():
        entry = _tensor_entry(info, data_len)
        if isinstance(entry, str):
            raise CheckpointError(f"{bad} (tensor {show(name)}: {entry}); {fix}")
        entries[name] = entry
    # Overlapping tensors would share memory (an in-place merge into one would change another): safetensors forbids it.
    previous_end, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin < previous_end:
            raise CheckpointError(f"{bad} (tensors {show(previous)} and {show(name)} overlap); {fix}")
        previous_end, previous = max(previous_end, end), name
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        offset = data_start + begin
        t = torch.frombuffer(buffer, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset).view(shape)
        tensors[name] = t if offset % dtype.itemsize == 0 else t.clone()  # misaligned (odd header length): copy
    return tensors


def _plain_file_name(name) -> bool:
    """A file directly inside the checkpoint folder: no folders, no '..', no absolute path."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def checkpoint_files(folder: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files of a checkpoint folder, and the index's weight_map (tensor -> shard) if it has one."""
    index, weight_map = folder / "model.safetensors.index.json", None
    if index.is_file():
        fix = "copy model.safetensors.index.json again from the checkpoint's source"
        weight_map = read_json_object(index, CheckpointError, fix).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: needs a 'weight_map' object (tensor name -> shard file), found "
                                  f"{show(weight_map)}; {fix}")
        for tensor, name in weight_map.items():
            if not _plain_file_name(name):
                raise CheckpointError(f"{index}: weight_map[{show(tensor)}] is {show(name)}, not the name of a file in "
                                      f"{folder}; {fix}")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(found[:3])}: convert them to safetensors)" if found else ""
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: shard listed in model.safetensors.index.json is missing; download it")
    return files, weight_map


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder as memory-mapped views (no copy)."""
    state, source = {}, {}
    files, weight_map = checkpoint_files(Path(folder))
    for file in files:
        for name, t in read_safetensors(file).items():
            if name in state:
                raise CheckpointError(f"{file}: tensor {show(name)} is also in {source[name].name}; the shards do not "
                                      "belong together, download the checkpoint again")
            state[name], source[name] = t, file
    for name, shard in (weight_map or {}).items():  # an index that disagrees with its shards: which one is right?
        if name not in source or source[name].name != shard:
            raise CheckpointError(f"{Path(folder) / 'model.safetensors.index.json'}: weight_map puts tensor "
                                  f"{show(name)} in {shard}, which does not hold it; the index and the shards do not "
                                  "belong together, download the checkpoint again")
    return state


def _names(names, limit: int = 3) -> str:
    names = [n if n.isprintable() and len(n) <= 80 else show(n) for n in sorted(names)]  # names from a file: no escapes
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               recompute: Recompute | None = None, quantize: str | None = None) -> Phi3ForCausalLM:
    """A Phi3ForCausalLM with the checkpoint's weights, in `dtype` (default: bf16 on CUDA, fp32 on CPU), in eval mode;
    recompute: its gradient checkpointing when it trains (phi3/model.py); quantize="nf4": the layers' linear weights
    held in 4 bits (phi3/quantized.py), as they are in a folder that transformers + bitsandbytes saved in 4-bit."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found; pass a folder in Hugging Face layout "
                              "(config.json + model.safetensors)")
    try:
        config, raw_config = Phi3Config.read(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', not {quantize!r}")
    device = torch.device(device)
    dtype = parse_dtype(dtype) or default_dtype(device)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config, recompute)
    state = load_state_dict(folder)

    expected = {name: p.shape for name, p in model.state_dict().items()}
    if quantized.is_4bit_config(raw_config):
        try:
            quantized.read_4bit_layers(model, state, device, folder)
        except nf4.NF4Error as e:
            raise CheckpointError(str(e)) from None
        for name in quantized.quantized_names(model):
            del expected[f"{name}.weight"]
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(expected) - set(state) - optional
    unexpected = set(state) - set(expected)
    if missing:
        raise CheckpointError(f"{folder}: tensors missing from the checkpoint: {_names(missing)}; the files are "
                              "incomplete or not a Phi-3 checkpoint")
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensors in the checkpoint: {_names(unexpected)}; config.json "
                              "does not match the weights (e.g. num_hidden_layers) or this is not Phi3ForCausalLM")
    for name in (n for n in expected if n in state):  # model order: the first mismatch is the one reported
        if tuple(state[name].shape) != tuple(expected[name]):
            raise CheckpointError(f"{folder}: tensor {name} has shape {list(state[name].shape)}, config.json implies "
                                  f"{list(expected[name])}; config.json does not match the weights")
    for name, t in state.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{folder}: tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}; a model's "
                                  "weights are floating point, the checkpoint is corrupt or not a Phi-3 checkpoint")
    if quantize and not quantized.is_4bit(model):
        def error(name, message):
            raise CheckpointError(f"{folder}: tensor {name}.weight cannot be quantized: {message}")
        quantized.quantize_layers(model, state, device, dtype, error)
    # .to() on an mmap view copies only when dtype/device differ, one tensor at a time; a copied tensor's file pages
    # are given back at once, so loading onto a GPU holds about one tensor of the file in host memory, not all of it.
    # The values are checked after the cast: a NaN in the file, or a value the chosen dtype cannot hold (fp16
    # overflows above 65504), would otherwise only show up as a NaN loss or garbage text.
    state = {name: _moved(t, device, dtype) for name, t in state.items()}
    for name, t in state.items():
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{folder}: tensor {name} has NaN or infinite values as "
                                  f"{str(dtype).removeprefix('torch.')}; the checkpoint is corrupt (or, if the file's "
                                  "values are finite, choose a wider --dtype)")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _moved(t: torch.Tensor, device, dtype) -> torch.Tensor:
    out = t.to(device=device, dtype=dtype)
    if out is not t:
        quantized.give_back_pages(t)
    return out


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain Phi-3 tensors of a model (LoRA parameters left out), tied lm_head dropped, each contiguous."""
    state = {}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[name] = t.detach().contiguous()
    return state


def write_hf_files(model: Phi3ForCausalLM, folder: Path, dtype: torch.dtype | str | None = None,
                   max_shard_bytes: int = 5 * 2**30, tokenizer_from: str | Path | None = None,
                   state: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + safetensors (sharded above max_shard_bytes, with an index) + tokenizer files into `folder`,
    each file written atomically. LoRA parameters are not saved: merge them first to export them. state: the
    tensors to write (default: base_state_dict(model)); a model sharded over processes passes whole copies."""
    dtype = parse_dtype(dtype)
    state = base_state_dict(model) if state is None else state
    cast = lambda name, t: t.to(dtype) if dtype and t.is_floating_point() and ".weight." not in name else t
    state = {n: cast(n, t).cpu() for n, t in state.items()}  # (".weight.": a 4-bit layer's fp32 statistics)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = t
        shard_bytes += nbytes
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(state["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    if quantized.is_4bit(model):
        config["quantization_config"] = {**quantized.QUANTIZATION_CONFIG,
                                         "bnb_4bit_compute_dtype": config["torch_dtype"]}
    with atomic_file(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        write_safetensors(shard, folder / name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {n: file for file, shard in zip(names, shards) for n in shard}}
        with atomic_file(folder / "model.safetensors.index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from).expanduser() / name
            if src.is_file():
                with atomic_file(folder / name) as tmp:
                    shutil.copyfile(src, tmp)


EXPORT_MARKER = "phi3_lora_export.json"  # marks a folder save_model wrote: a later save may replace it


def _written_by_save(name: str) -> bool:
    return (name in ("config.json", "model.safetensors", "model.safetensors.index.json", EXPORT_MARKER, *TOKENIZER_FILES)
            or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None)


def check_replaceable(folder: str | Path) -> None:
    """CheckpointError unless save_model may write `folder`: new, empty, or an earlier save_model output (its
    marker file and only the files save_model writes). A folder holding anything else is never replaced."""
    folder = Path(folder).expanduser()
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a file or a link); name a new folder to save the model in")
    names = sorted(p.name for p in folder.iterdir())
    if not names or (EXPORT_MARKER in names and all(map(_written_by_save, names))):
        return
    others = [n for n in names if not _written_by_save(n)] or names
    raise CheckpointError(f"{folder}: holds files this program did not write ({', '.join(others[:3])}); save the model "
                          "into a new or empty folder")


def save_model(model: Phi3ForCausalLM, path: str | Path, *, tokenizer_from: str | Path,
               dtype: torch.dtype | str | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """A complete model folder in Hugging Face layout: config.json, the weights, and the tokenizer and generation
    files of `tokenizer_from` (the base model's folder), so that it loads in sample.py, transformers and vLLM.
    Written under a temporary name and renamed at the end: a crash never leaves half a folder. It replaces only
    an earlier save (check_replaceable), never a folder holding other files."""
    final = Path(path).expanduser()
    source = Path(tokenizer_from).expanduser()
    if not (source / "tokenizer.json").is_file():
        raise CheckpointError(f"{source}: no tokenizer.json to save with the model; pass tokenizer_from= the base "
                              "model's folder")
    check_replaceable(final)
    with atomic_dir(final) as tmp:
        write_hf_files(model, tmp, dtype, max_shard_bytes, source)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "phi3-lora save_model",
                                                     "tokenizer_from": str(source.resolve())}, indent=2) + "\n")
    return final
