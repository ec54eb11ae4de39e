"""train.py's configuration: TrainConfig (every field is a command-line flag), parsing, resuming and checking.

    cfg = resolve_config(["--data", "chat.jsonl", "--rank", "8"])   # FlagError: one line saying what is wrong

Flags are checked before anything loads (validate), then against the model's config.json (check_against_model).
A resumed run's saved train_config.json is read as untrusted data (config_from_json): its `out` is never used,
and the flags that shape the model and the batches keep their saved values (RESUME_FIXED).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phi3.kernels.lora_linear import GEMM_CHOICES
from phi3 import distributed, quantized
from phi3.checkpoint import EMBEDDED_MODEL, CheckpointError, check_replaceable, check_tokenizer_fits
from phi3.config import Phi3Config, read_json_object
from phi3.lora import parse_targets
from phi3.run_folder import check_fresh_run_folder, check_places
from phi3.run_state import find_checkpoint, read_state, run_folder_of


@dataclass
class TrainConfig:
    data: str = field(default="", metadata={"help": "training JSONL (messages / prompt+completion / text / ShareGPT)"})
    model: str = field(default=str(EMBEDDED_MODEL), metadata={"help": "base checkpoint folder (HF layout)"})
    out: str = field(default="out", metadata={"help": "run folder: adapter, checkpoints, metrics"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out JSONL (default: --eval-fraction of --data)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of --data held out when no --eval-data"})
    epochs: float = 1.0
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides --epochs when > 0"})
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (LoRA; try ~2e-5 with --full)"})
    lr_schedule: str = field(default="cosine", metadata={"choices": ["cosine", "linear", "constant"]})
    warmup: float = field(default=0.03, metadata={"help": "warmup: fraction of the steps if < 1, else steps"})
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 2048
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = field(default="qkv,o,gate_up,down", metadata={
        "help": "e.g. qkv,o,gate_up,down or q,v or all-linear (+lm_head, +embed_tokens)"})
    rslora: bool = field(default=False, metadata={"help": "scale alpha/sqrt(rank) instead of alpha/rank"})
    dora: bool = field(default=False, metadata={
        "help": "DoRA: LoRA with a trained magnitude per output row, as peft's use_dora (not with embed_tokens)"})
    trainable_tokens: str | None = field(default=None, metadata={
        "help": "comma-separated token ids, or tokens as the vocabulary spells them (e.g. '<|placeholder1|>,32003'), "
                "whose embedding and lm_head rows train on their own (peft's trainable_token_indices)"})
    train_on: str = field(default="assistant", metadata={"choices": ["assistant", "all"]})
    packing: bool = field(default=False, metadata={"help": "pack examples into full rows (attention kept per example)"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "default: on for CUDA, off on CPU"})
    offload_checkpoints: bool | None = field(default=None, metadata={
        "help": "keep checkpointed layer inputs in pinned CPU memory (default: on with checkpointing on CUDA)"})
    checkpoint_layers: int | None = field(default=None, metadata={
        "help": "with gradient checkpointing, checkpoint only the first N layers: the others keep their activations "
                "(faster; 0.85 GiB more per layer on Phi-3-mini at 8k tokens per micro-batch); default: all"})
    keep_outputs: str = field(default="auto", metadata={
        "help": "with gradient checkpointing, N checkpointed layers keep their frozen GEMMs' outputs for the "
                "recompute, which then runs no GEMM (0.38 GiB per layer on Phi-4-mini at 8k tokens per micro-batch); "
                "auto: as many as fit beside what a step needs (measured in the first, which keeps none), at most as much "
                "as the step needs without them"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    dtype: str = field(default="auto", metadata={"choices": ["auto", "bf16", "fp16", "fp32"]})
    seed: int = 0
    eval_every: int = field(default=0, metadata={"help": "steps between evals (0: five evals per run)"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints (0: only at the end)"})
    keep: int = field(default=2, metadata={"help": "checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "steps between lines in metrics.jsonl / non-terminal logs"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint or run folder to continue from"})
    full: bool = field(default=False, metadata={"help": "train all parameters (fp32 master weights) instead of LoRA"})
    quantize: str | None = field(default=None, metadata={
        "choices": ["nf4"], "help": "nf4: QLoRA, the base's layer weights held in 4 bits (bitsandbytes' NF4); a folder "
                                    "saved in 4-bit loads as 4-bit without it"})
    fp8: bool = field(default=False, metadata={
        "help": "Hopper GPUs (H100, H200): the frozen base's matrix products in FP8 (e4m3, a scale per row), LoRA in "
                "bf16/fp32: faster, the base's products less exact (README.md); not with --quantize, --dora, --full"})
    init: str = field(default="pretrained", metadata={"choices": ["pretrained", "random"],
                                                      "help": "random: build from --model's config.json (pretraining)"})
    export_merged: str | None = field(default=None, metadata={"help": "also write base+adapter merged (HF layout) here"})


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own prints a usage block first: one line instead, exit 2 (see main)
        raise FlagError(f"{message}; see python train.py --help")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="train.py", description="LoRA fine-tuning of Phi-3 on a chat JSONL (or "
                                     "full-parameter training with --full); README.md has the details.")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + (f" (default: {f.default})" if f.default not in (None, "") else "")
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = {"int": int, "int | None": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=f.metadata.get("choices"), help=help_text)
    return parser


class FlagError(ValueError):
    """A command-line value that cannot work."""


MAX_STEPS = 2**31 - 1  # optimizer steps in one run: counts past it are typos (--epochs 1e300), not plans


# Fields added after version 1 of train_config.json: a run saved before them resumes with their defaults.
ADDED_LATER = ("offload_checkpoints", "checkpoint_layers", "dora", "trainable_tokens", "fp8", "keep_outputs")

# Flags that shape the trained tensors or the sequence of batches: a resumed run keeps the saved values (it
# would otherwise fail to load, or silently train on other batches than the run it continues).
RESUME_FIXED = ("full", "init", "rank", "alpha", "dropout", "targets", "rslora", "dora", "trainable_tokens", "fp8",
                "train_on", "max_seq_len", "packing", "batch_size", "grad_accum", "seed", "eval_fraction")


def config_from_json(path: Path) -> TrainConfig:
    """A saved train_config.json, read as untrusted data: every field present, of its declared type."""
    saved = read_json_object(path, FlagError, "start a new run, or resume another run folder")
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    problem = None
    if not isinstance(saved, dict) or not set(fields) - set(ADDED_LATER) <= set(saved) <= set(fields):
        problem = "not the train_config.json of this version (fields differ)"
    else:
        for name, kind in fields.items():
            if name not in saved:
                continue  # one of ADDED_LATER: its default
            value = saved[name]
            ok = {"str": type(value) is str, "int": type(value) is int, "bool": type(value) is bool,
                  "int | None": value is None or type(value) is int,
                  "float": type(value) in (int, float), "str | None": value is None or type(value) is str,
                  "bool | None": value is None or type(value) is bool}[kind]
            if not ok:
                problem = f"{name} is {json.dumps(value)[:40]}, not a {kind}"
                break
    if problem:
        raise FlagError(f"{path}: {problem}; start a new run, or resume another run folder")
    return TrainConfig(**saved)


def resolve_config(argv) -> TrainConfig:
    """Flags given on the command line override the defaults, or, with --resume, the resumed run's config.

    A resumed run writes into --out when given, else into the run folder --resume names (run_folder_of):
    never into the `out` its saved config names, which may be another machine's path or a stranger's choice."""
    given = vars(build_parser().parse_args(argv))
    if given.get("resume"):
        ckpt = find_checkpoint(given["resume"])
        saved = ckpt / "train_config.json"
        if not os.path.lexists(saved):
            raise FlagError(f"{saved}: missing; every checkpoint-STEP folder train.py writes has one: resume from a "
                            "complete checkpoint")
        base = dataclasses.replace(config_from_json(saved), export_merged=None)  # only the command line says where
        changed = [n for n in RESUME_FIXED if n in given and given[n] != getattr(base, n)]  # (before grad_accum is set)
        if changed:
            n = changed[0]
            raise FlagError(f"--{n.replace('_', '-')} {given[n]} differs from the resumed run's "
                            f"{getattr(base, n)}; a resumed run keeps the flags that shape its model and batches "
                            f"({', '.join('--' + f.replace('_', '-') for f in RESUME_FIXED)}): drop the flag, or "
                            "start a new run with another --out")
        given.setdefault("out", str(run_folder_of(ckpt)))
        _, _, processes = read_state(ckpt)
        now = int(os.environ.get("WORLD_SIZE", "1"))
        if now != processes:  # the same micro-batches per optimizer step, shared out among this many processes
            per_step = base.grad_accum * processes
            if per_step % now:
                raise FlagError(f"{ckpt}: the run took {per_step} micro-batches per step over {processes} processes; "
                                f"{now} processes cannot share them evenly: resume on a number of processes that "
                                f"divides {per_step}")
            given["grad_accum"] = per_step // now
        return check_outputs(validate(dataclasses.replace(base, **given)), run_folder_of(ckpt))
    config = TrainConfig(**given)
    if not config.data:
        raise FlagError("--data is required (a JSONL file; see README.md for the formats)")
    return check_outputs(validate(config))


def check_outputs(cfg: TrainConfig, resumed_run: Path | None = None) -> TrainConfig:
    """Where the run writes, checked against what it reads and keeps before anything loads (phi3/run_folder.py).
    A resumed run may write into its own run folder; any other --out must not hold a run."""
    check_places(cfg.out, {"--model": cfg.model, "--data": cfg.data, "--eval-data": cfg.eval_data},
                 cfg.export_merged, resumed_run)
    if cfg.export_merged is not None:
        try:  # the export replaces its folder whole: only a new or empty one, or an earlier export
            check_replaceable(cfg.export_merged)
        except CheckpointError as e:
            raise FlagError(f"--export-merged {e}") from None
    if resumed_run is None or Path(cfg.out).resolve() != resumed_run.resolve():
        check_fresh_run_folder(Path(cfg.out))
    return cfg


def validate(cfg: TrainConfig) -> TrainConfig:
    """Catch impossible flag values before anything is loaded; one line each, exit code 2."""
    flag = lambda name: "--" + name.replace("_", "-")
    problems = [f"{flag(n)} must be a finite number, not {getattr(cfg, n)}" for n in
                ("lr", "warmup", "epochs", "alpha", "max_grad_norm", "weight_decay", "dropout", "eval_fraction")
                if not math.isfinite(getattr(cfg, n))]
    if problems:  # NaN compares false with everything: the range checks below would let it through
        raise FlagError("; ".join(problems))
    positive = ("batch_size", "grad_accum", "max_seq_len", "rank", "keep", "log_every", "lr", "epochs", "alpha",
                "max_grad_norm")
    problems = [f"{flag(n)} must be > 0" for n in positive if getattr(cfg, n) <= 0]
    problems += [f"{flag(n)} must be >= 0" for n in ("weight_decay", "warmup", "eval_every", "save_every")
                 if getattr(cfg, n) < 0]
    if cfg.lr > 1:
        problems.append("--lr must be <= 1 (AdamW moves each weight by about lr per step)")
    if cfg.max_steps != -1 and not 0 < cfg.max_steps <= MAX_STEPS:
        problems.append(f"--max-steps must be in [1, {MAX_STEPS}] (or left out: --epochs decides)")
    if cfg.warmup > MAX_STEPS:
        problems.append(f"--warmup must be at most {MAX_STEPS} steps (or a fraction < 1 of the run)")
    if not 0 <= cfg.seed < 2**31:
        problems.append("--seed must be in [0, 2**31)")
    if not 0 <= cfg.dropout < 1:
        problems.append("--dropout must be in [0, 1)")
    if not 0 <= cfg.eval_fraction < 1:
        problems.append("--eval-fraction must be in [0, 1)")
    if cfg.checkpoint_layers is not None and cfg.checkpoint_layers < 0:
        problems.append("--checkpoint-layers must be >= 0 (0: checkpoint none, like --no-gradient-checkpointing)")
    if cfg.keep_outputs != "auto" and not (cfg.keep_outputs.isdigit() and cfg.keep_outputs.isascii()):
        problems.append("--keep-outputs must be auto or a number of layers >= 0 (0: every recompute runs its GEMMs "
                        "again)")
    try:
        targets = parse_targets(cfg.targets)
    except ValueError as e:
        problems.append(str(e))
    else:
        problems += adapter_problems(cfg, targets)
    problems += distributed.device_problems(cfg.device)
    if os.environ.get("LORA_GEMM", "auto") not in GEMM_CHOICES:
        problems.append(f"environment LORA_GEMM={os.environ['LORA_GEMM']!r} must be one of {', '.join(GEMM_CHOICES)}"
                        " (or unset)")
    if problems:
        raise FlagError("; ".join(problems))
    if not cfg.out.strip():
        raise FlagError("--out must name a folder (it is created if missing)")
    for name in ("out", "export_merged"):
        if getattr(cfg, name) is not None:
            check_writable_folder(Path(getattr(cfg, name)), flag(name))
    if cfg.quantize and (cfg.full or cfg.init == "random"):
        raise FlagError("--quantize holds a pretrained base frozen in 4 bits for LoRA; drop it with --full or "
                        "--init random")
    if cfg.fp8 and (cfg.full or cfg.quantize or cfg.dora):
        clash = [f for f, on in (("--full", cfg.full), ("--quantize", cfg.quantize), ("--dora", cfg.dora)) if on]
        raise FlagError(f"--fp8 computes a frozen 16-bit base's products for plain LoRA in FP8; it does not go with "
                        f"{' or '.join(clash)}: drop one")
    if cfg.export_merged is not None:
        if cfg.full:
            raise FlagError("--export-merged merges a LoRA adapter into its base; a --full run's folder already holds "
                            "the whole model: drop --export-merged")
    return cfg


def token_items(spec: str) -> list[str]:
    return [item.strip() for item in spec.split(",")]


def adapter_problems(cfg: TrainConfig, targets: tuple[str, ...]) -> list[str]:
    """--dora and --trainable-tokens against the other flags (the tokens against the model: trainable_token_ids)."""
    problems = []
    if cfg.full and (cfg.dora or cfg.trainable_tokens is not None):
        problems.append("--dora and --trainable-tokens shape a LoRA adapter; --full trains every weight: drop them")
    if cfg.dora and "embed_tokens" in targets:
        problems.append("--dora with embed_tokens in --targets is not supported (peft's DoRA on an embedding rescales "
                        "each dimension by a norm over the whole vocabulary); drop one of them")
    if cfg.trainable_tokens is not None and not all(token_items(cfg.trainable_tokens)):
        problems.append(f"--trainable-tokens {cfg.trainable_tokens!r} has an empty item; give comma-separated token "
                        "ids or tokens, e.g. '<|placeholder1|>,32003'")
    if cfg.trainable_tokens is not None and "embed_tokens" in targets:
        problems.append("--trainable-tokens with embed_tokens in --targets: the embedding takes one kind of adapter "
                        "(as in peft); drop one of them")
    return problems


def trainable_token_ids(cfg: TrainConfig, tokenizer, config: Phi3Config) -> list[int]:
    """--trainable-tokens as token ids: an item of digits is an id, any other item a token of the tokenizer's
    vocabulary, spelled as there. Each must be a distinct row of the model's embedding."""
    if cfg.trainable_tokens is None:
        return []
    if config.tie_word_embeddings and "lm_head" in parse_targets(cfg.targets):
        raise FlagError(f"--trainable-tokens on {cfg.model}, whose lm_head is its embedding (tied), trains the tokens' "
                        "lm_head rows too; drop lm_head from --targets")
    ids = {}
    for item in token_items(cfg.trainable_tokens):
        token = int(item) if re.fullmatch(r"[0-9]{1,12}", item) else tokenizer.tok.token_to_id(item)
        if token is None:
            raise FlagError(f"--trainable-tokens: {item!r} is not a token of {cfg.model}'s tokenizer; give token ids, "
                            "or tokens as its vocabulary spells them (e.g. <|placeholder1|>)")
        if not 0 <= token < config.vocab_size:
            raise FlagError(f"--trainable-tokens: {item} is not a token id of {cfg.model} (its embedding has "
                            f"{config.vocab_size} rows)")
        if token in ids:
            raise FlagError(f"--trainable-tokens: {item!r} is token {token}, given already as {ids[token]!r}; name "
                            "each token once")
        ids[token] = item
    return list(ids)


def fp8_problem(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why --fp8 cannot run here (None: it can): its GEMM needs Hopper's FP8 tensor cores and TMA, and bf16."""
    if not cfg.fp8:
        return None
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        return (f"--fp8 needs an NVIDIA GPU with FP8 tensor cores and TMA (Hopper: H100, H200, or newer); this run is "
                f"on {name}: drop --fp8")
    if dtype != torch.bfloat16:
        return f"--fp8 computes the rest in bf16, not {str(dtype).removeprefix('torch.')}: drop --dtype or --fp8"
    return None


def check_writable_folder(path: Path, flag: str) -> None:
    """Fail now, not after loading a model for minutes: the folder (or its nearest existing parent) must be a
    writable folder. Writes can still fail later (a full disk); those are reported the same way."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is" if existing == path else f"is under {existing}, which is"
        raise FlagError(f"{flag} {path} {where} a file, not a folder; choose another {flag}")
    if not existing.exists() or not os.access(existing, os.W_OK | os.X_OK):
        raise FlagError(f"{flag} {path}: {existing} is not a writable folder; choose another {flag}")


def check_against_model(cfg: TrainConfig, config: Phi3Config, tokenizer) -> None:
    """Flags (and a tokenizer) that only the model's config.json can rule out, checked before its weights are read."""
    check_tokenizer_fits(tokenizer, config, cfg.model)
    if cfg.export_merged and quantized.is_4bit_config(read_json_object(Path(cfg.model) / "config.json", FlagError,
                                                                       "check --model")):
        raise FlagError(f"--export-merged: {cfg.model} is a 4-bit folder, and merging into 4-bit weights rounds them "
                        "again; train on its 16-bit original with --quantize nf4 to export a merged model")
    if cfg.max_seq_len > config.max_position_embeddings:
        raise FlagError(f"--max-seq-len {cfg.max_seq_len} is longer than the model's context "
                        f"({config.max_position_embeddings} tokens, max_position_embeddings in {cfg.model}/config.json)")
    sizes = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
             "head_dim": config.head_dim}
    odd = [f"{name} {size}" for name, size in sizes.items() if size % 16]
    if cfg.fp8 and odd:  # (every Phi's are multiples of 16)
        raise FlagError(f"--fp8: {', '.join(odd)} in {cfg.model}/config.json; FP8 products need layer sizes that are "
                        "multiples of 16: drop --fp8")
    smallest = min(config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim)
    if not cfg.full and cfg.rank > smallest:
        raise FlagError(f"--rank {cfg.rank} is larger than the smallest side of the adapted layers ({smallest}); "
                        "LoRA ranks are usually 8-64")
