"""LoRA fine-tuning of Phi-3 on a chat JSONL (or full-parameter training with --full).

    python train.py --data chat.jsonl                            # embedded tiny Phi-3, run folder ./out
    python train.py --data chat.jsonl --model ~/Phi-3-mini-4k-instruct --out runs/a
    python train.py --resume runs/a                              # continue from the newest checkpoint
    python sample.py --adapter runs/a                            # chat with the result
    torchrun --nproc_per_node 2 train.py --data chat.jsonl ...   # data parallel on 2 GPUs (phi3/distributed.py)

Every flag is a field of TrainConfig below (`--max-seq-len` sets max_seq_len). The resolved configuration
is printed and saved as train_config.json in the run folder, next to metrics.jsonl, the final adapter
(PEFT layout) and checkpoint-STEP/ folders. Bad data stops the run before training, with file and line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phi3 import CheckpointError, ConfigError, Phi3Config, Phi3ForCausalLM, load_model, load_tokenizer, save_model
from kernels.lora_linear import GEMM_CHOICES
from phi3 import distributed
from phi3.checkpoint import EMBEDDED_MODEL, default_dtype, parse_dtype, write_hf_files
from phi3.data import DataError, make_batches, pad_token_for, read_jsonl, split_eval
from phi3.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable, merge_lora, parse_targets, save_adapter
from phi3.loss import cross_entropy_sum
from phi3.progress import Progress, peak_memory_gib, plot_loss
from phi3.run_state import find_checkpoint, load_checkpoint, lr_lambda, save_checkpoint
from phi3.tokenizer import TokenizerError



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
    targets: str = field(default="qkv,o,gate_up,down", metadata={"help": "e.g. qkv,o,gate_up,down or q,v (+lm_head)"})
    rslora: bool = field(default=False, metadata={"help": "scale alpha/sqrt(rank) instead of alpha/rank"})
    train_on: str = field(default="assistant", metadata={"choices": ["assistant", "all"]})
    packing: bool = field(default=False, metadata={"help": "pack examples into full rows (attention kept per example)"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "default: on for CUDA, off on CPU"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    dtype: str = field(default="auto", metadata={"choices": ["auto", "bf16", "fp16", "fp32"]})
    seed: int = 0
    eval_every: int = field(default=0, metadata={"help": "steps between evals (0: five evals per run)"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints (0: only at the end)"})
    keep: int = field(default=2, metadata={"help": "checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "steps between lines in metrics.jsonl / non-terminal logs"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint or run folder to continue from"})
    full: bool = field(default=False, metadata={"help": "train all parameters (fp32 master weights) instead of LoRA"})
    init: str = field(default="pretrained", metadata={"choices": ["pretrained", "random"],
                                                      "help": "random: build from --model's config.json (pretraining)"})
    export_merged: str | None = field(default=None, metadata={"help": "also write base+adapter merged (HF layout) here"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + (f" (default: {f.default})" if f.default not in (None, "") else "")
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=f.metadata.get("choices"), help=help_text)
    return parser


class FlagError(ValueError):
    """A command-line value that cannot work."""


def resolve_config(argv) -> TrainConfig:
    """Flags given on the command line override the defaults, or, with --resume, the resumed run's config."""
    given = vars(build_parser().parse_args(argv))
    if given.get("resume"):
        ckpt = find_checkpoint(given["resume"])
        saved = ckpt / "train_config.json"
        try:
            base = TrainConfig(**json.loads(saved.read_text())) if saved.is_file() else TrainConfig()
        except (TypeError, json.JSONDecodeError) as e:
            raise FlagError(f"{saved}: not a train_config.json this version can read ({e}); "
                            "start a new run, or pass the flags again without --resume") from None
        return validate(dataclasses.replace(base, **given))
    config = TrainConfig(**given)
    if not config.data:
        raise FlagError("--data is required (a JSONL file; see README.md for the formats)")
    return validate(config)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Catch impossible flag values before anything is loaded; one line each, exit code 2."""
    positive = ("batch_size", "grad_accum", "max_seq_len", "rank", "keep", "log_every")
    problems = [f"--{n.replace('_', '-')} must be > 0" for n in positive if getattr(cfg, n) <= 0]
    problems += [f"--{n.replace('_', '-')} must be >= 0" for n in ("lr", "weight_decay", "warmup", "eval_every",
                                                                  "save_every", "max_grad_norm") if getattr(cfg, n) < 0]
    if not 0 <= cfg.dropout < 1:
        problems.append("--dropout must be in [0, 1)")
    if not 0 <= cfg.eval_fraction < 1:
        problems.append("--eval-fraction must be in [0, 1)")
    try:
        parse_targets(cfg.targets)
    except ValueError as e:
        problems.append(str(e))
    if os.environ.get("LORA_GEMM", "auto") not in GEMM_CHOICES:
        problems.append(f"environment LORA_GEMM={os.environ['LORA_GEMM']!r} must be one of {', '.join(GEMM_CHOICES)}"
                        " (or unset)")
    if problems:
        raise FlagError("; ".join(problems))
    return cfg


def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Phi3ForCausalLM:
    if cfg.init == "random":
        model = Phi3ForCausalLM(Phi3Config.from_json(Path(cfg.model) / "config.json")).to(device)
        model.init_weights(cfg.seed)
    else:
        # --full keeps fp32 master weights and computes in `dtype` under autocast; LoRA keeps the base in `dtype`.
        model = load_model(cfg.model, dtype=torch.float32 if cfg.full else dtype, device=device)
    if cfg.full:
        model.requires_grad_(True)  # already fp32: built that way or loaded with dtype=float32 above
    else:
        add_lora(model, LoRAConfig(cfg.rank, cfg.alpha, cfg.dropout, parse_targets(cfg.targets), cfg.rslora))
        mark_only_lora_as_trainable(model)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def batch_loss_sum(model, batch, device) -> torch.Tensor:
    hidden = model.hidden_states(batch.input_ids.to(device), batch.position_ids.to(device),
                                 None if batch.document_ids is None else batch.document_ids.to(device))
    return cross_entropy_sum(hidden, model.lm_head, batch.labels.to(device))


def accumulate_gradients(model, micro_batches, device, autocast, step_trained_tokens: int | None = None) -> float:
    """Backward over this process's micro-batches of one optimizer step; returns their loss sum / step tokens.

    The step's loss is the mean over all trained tokens of all its micro-batches (token-weighted), not a mean
    of per-batch means: each micro-batch's loss sum is divided by the step's total trained tokens, which
    under torchrun includes the other processes' micro-batches (their gradients are summed afterwards).
    """
    trained = max(step_trained_tokens or sum(b.trained_tokens for b in micro_batches), 1)
    loss_sum = 0.0
    for b in micro_batches:
        with autocast():
            loss = batch_loss_sum(model, b, device)
        (loss / trained).backward()
        loss_sum = loss_sum + loss.detach()  # stays on the device: one host sync per step, not per micro-batch
    return float(loss_sum) / trained


def evaluate(model, batches, device, autocast, world=distributed.World()) -> tuple[float, float]:
    """Token-weighted mean loss and perplexity over all eval batches (shared out among torchrun processes)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast():
        for b in batches[world.rank::world.size]:
            total += batch_loss_sum(model, b, device).item()
            count += b.trained_tokens
    model.train()
    total, count = distributed.sum_scalars([total, count], world, device)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50))


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout masks come from torch's RNG, reseeded per step and process: resuming at any step replays them,
    and torchrun processes draw different masks."""
    return (seed * 1_000_003 + step) * 1009 + rank


def train(cfg: TrainConfig) -> int:
    world, device = distributed.init(cfg.device)
    try:
        return run(cfg, world, device)
    finally:
        distributed.shutdown(world)


def run(cfg: TrainConfig, world: distributed.World, device: torch.device) -> int:
    log = (lambda text: print(text, file=sys.stderr)) if world.is_main else (lambda text: None)
    dtype = default_dtype(device) if cfg.dtype == "auto" else parse_dtype(cfg.dtype)
    if cfg.gradient_checkpointing is None:
        cfg.gradient_checkpointing = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    log("config: " + json.dumps(dataclasses.asdict(cfg)))

    tokenizer = load_tokenizer(cfg.model)
    examples, stats = read_jsonl(cfg.data, tokenizer, cfg.train_on, cfg.max_seq_len)
    log(f"data {cfg.data}: {stats.summary()}")
    if cfg.eval_data:
        eval_examples, eval_stats = read_jsonl(cfg.eval_data, tokenizer, cfg.train_on, cfg.max_seq_len)
        log(f"eval {cfg.eval_data}: {eval_stats.summary()}")
    else:
        examples, eval_examples = split_eval(examples, cfg.eval_fraction, cfg.seed)
        log(f"eval: {len(eval_examples)} examples held out of {cfg.data}")
    pad_id = pad_token_for(tokenizer)
    epoch_batches = lambda epoch: make_batches(examples, cfg.batch_size, cfg.max_seq_len, pad_id, cfg.packing,
                                               shuffle=True, seed=cfg.seed, epoch=epoch)
    eval_batches = make_batches(eval_examples, cfg.batch_size, cfg.max_seq_len, pad_id, cfg.packing,
                                shuffle=False, seed=0) if eval_examples else []

    model = build_model(cfg, device, dtype).train()
    run_dir = Path(cfg.out)  # created only once the data and the model are known to be good
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trained, {device} {str(dtype).removeprefix('torch.')}, "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
        + (f", {world.size} processes" if world.size > 1 else ""))
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    group_size = cfg.grad_accum * world.size  # micro-batches per optimizer step, all processes together
    batches = epoch_batches(0)  # every epoch has the same number of batches
    steps_per_epoch = math.ceil(len(batches) / group_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup_steps = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, warmup_steps, total_steps))
    eval_every = cfg.eval_every or max(1, total_steps // 5)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=cfg.full and dtype != torch.float32)

    step, position = 0, {"epoch": 0, "batch": 0}
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume)
        step, position = load_checkpoint(ckpt, model, optimizer, scheduler)
        log(f"resumed from {ckpt} at step {step}")
        if position["epoch"] != 0:
            batches = epoch_batches(position["epoch"])

    def write_model_files(folder: Path) -> None:
        (folder / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if cfg.full:
            write_hf_files(model, folder, dtype=dtype, tokenizer_from=cfg.model)
        else:
            save_adapter(model, folder, base_model=Path(cfg.model).resolve())

    def save_now() -> Path:
        return save_checkpoint(run_dir, step, model, optimizer, scheduler, dict(position), write_model_files, cfg.keep)

    def checkpoint_now() -> Path:
        """Written by the main process only; the others wait so that no process runs ahead of a save."""
        folder = save_now() if world.is_main else run_dir / f"checkpoint-{step}"
        distributed.barrier(world)
        return folder

    progress = Progress(total_steps, cfg.log_every, run_dir / "metrics.jsonl", enabled=world.is_main)
    if step == 0 and eval_batches:
        loss, ppl = evaluate(model, eval_batches, device, autocast, world)
        progress.say(f"eval before training: loss {loss:.4f} ppl {ppl:.2f}")
        progress.log({"step": 0, "eval_loss": loss, "eval_ppl": ppl})

    interrupted = False
    previous_handler = signal.signal(signal.SIGTERM, raise_interrupt)  # `kill` saves a checkpoint like Ctrl-C
    start_step, window_start, window_tokens = step, time.perf_counter(), 0
    try:
        while step < total_steps:
            group = []  # this step's micro-batches, the same list in every process
            while len(group) < group_size:
                if position["batch"] >= len(batches):
                    position = {"epoch": position["epoch"] + 1, "batch": 0}
                    batches = epoch_batches(position["epoch"])
                group.append(batches[position["batch"]])
                position["batch"] += 1
            torch.manual_seed(step_seed(cfg.seed, step, world.rank))
            step_tokens = sum(b.trained_tokens for b in group)
            loss = accumulate_gradients(model, group[world.rank::world.size], device, autocast, step_tokens)
            distributed.all_reduce_sum_([p.grad for p in trainable if p.grad is not None], world)
            (train_loss,) = distributed.sum_scalars([loss], world, device)
            window_tokens += sum(int((b.input_ids != pad_id).sum()) for b in group)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            peak = peak_memory_gib(device)
            progress.step(step, train_loss, lr, tokens_per_s, peak, step - start_step)
            if step % cfg.log_every == 0 or step == total_steps:
                progress.log({"step": step, "loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                              "tokens_per_s": tokens_per_s, "peak_gib": peak, "epoch": position["epoch"]})
                window_tokens = 0
            if eval_batches and (step % eval_every == 0 or step == total_steps):
                loss, ppl = evaluate(model, eval_batches, device, autocast, world)
                progress.say(f"eval at step {step}: loss {loss:.4f} ppl {ppl:.2f}")
                progress.log({"step": step, "eval_loss": loss, "eval_ppl": ppl})
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                checkpoint_now()
            if step % cfg.log_every == 0 or step % eval_every == 0:
                window_start = time.perf_counter()  # keep eval and saving out of tokens/s
    except KeyboardInterrupt:
        interrupted = True
        optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is dropped; state is that of `step`
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    if interrupted:  # no collectives here: the other processes may be stopping at another point
        if world.is_main:
            final = save_now()
            progress.say(f"interrupted: saved {final}; continue with: python train.py --resume {run_dir}")
        return 130
    final = checkpoint_now()
    if world.is_main:
        write_model_files(run_dir)
        progress.say(f"done: {'model' if cfg.full else 'adapter'} in {run_dir}, checkpoint {final}")
        if cfg.export_merged and not cfg.full:
            merge_lora(model)
            save_model(model, cfg.export_merged, dtype=dtype, tokenizer_from=cfg.model)
            progress.say(f"merged model written to {cfg.export_merged}")
        plot_loss(run_dir)
    distributed.barrier(world)
    return 0


def main(argv=None) -> int:
    try:
        cfg = resolve_config(argv)
        return train(cfg)
    except (FlagError, DataError, CheckpointError, ConfigError, TokenizerError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
