"""LoRA fine-tuning of Phi-3 on a chat JSONL (or full-parameter training with --full).

    python train.py --data chat.jsonl                            # embedded tiny Phi-3, run folder ./out
    python train.py --data chat.jsonl --model ~/Phi-3-mini-4k-instruct --out runs/a
    python train.py --resume runs/a                              # continue from the newest checkpoint
    python sample.py --adapter runs/a                            # chat with the result
    torchrun --nproc_per_node 2 train.py --data chat.jsonl ...   # data parallel on 2 GPUs (phi3/distributed.py)
    torchrun --nproc_per_node 2 train.py --full ...              # full training, sharded over 2 GPUs (FSDP2)

Every flag is a field of TrainConfig (phi3/train_config.py; `--max-seq-len` sets max_seq_len). The resolved configuration
is printed and saved as train_config.json in the run folder, next to metrics.jsonl, the final adapter
(PEFT layout) and checkpoint-STEP/ folders. Bad data stops the run before training, with file and line.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # Ctrl-C while the imports below load (seconds) ends the process quietly: nothing is
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # written before run() takes the signals over (StopRequest)

import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from phi3 import CheckpointError, ConfigError, Phi3Config, Phi3ForCausalLM, load_model, load_tokenizer, save_model
from phi3 import distributed, kernel_tuning
from phi3.atomic import atomic_file
from phi3.checkpoint import default_dtype, parse_dtype, write_hf_files
from phi3.config import open_regular, read_json_object
from phi3.data import DataError, make_batches, pad_token_for, read_jsonl, split_eval
from phi3.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable, merge_lora, parse_targets, save_adapter
from phi3.loss import cross_entropy_sum
from phi3.offload import CheckpointOffload
from phi3.progress import Progress, emit, peak_memory_gib, plot_loss
from phi3.run_state import (RunStateError, clean_stale_writes, find_checkpoint, load_checkpoint, lr_lambda,
                            optimizer_tensors, run_folder_of, save_checkpoint, trainable_tensors, write_json_atomic)
from phi3.run_folder import RunFolderError, RunFolderLock, check_fresh_run_folder
from phi3.train_config import MAX_STEPS, FlagError, TrainConfig, check_against_model, resolve_config
from phi3.tokenizer import TokenizerError



def lora_config(cfg: TrainConfig) -> LoRAConfig:
    return LoRAConfig(cfg.rank, cfg.alpha, cfg.dropout, parse_targets(cfg.targets), cfg.rslora)


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
        add_lora(model, lora_config(cfg))
        mark_only_lora_as_trainable(model)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.checkpoint_layers = cfg.checkpoint_layers
    if cfg.offload_checkpoints:
        model.offload = CheckpointOffload(device)
    return model


class MicroBatchLoss(torch.nn.Module):
    """One micro-batch's summed token loss as a module's forward. Under torchrun this is what DDP wraps (LoRA), or
    FSDP's root (--full), so that their hooks see the whole forward and backward: DDP reduces gradients in buckets
    while backward still runs; FSDP gathers the embeddings, final norm and lm_head that this forward uses besides
    the layers."""

    def __init__(self, model: Phi3ForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, document_ids, labels) -> torch.Tensor:
        hidden = self.model.hidden_states(input_ids, position_ids, document_ids)
        return cross_entropy_sum(hidden, self.model.lm_head, labels)


def batch_loss_sum(loss_of, batch, device) -> torch.Tensor:
    """loss_of: the model, or the module computing a micro-batch's loss (MicroBatchLoss, or DDP around one)."""
    if isinstance(loss_of, Phi3ForCausalLM):
        loss_of = MicroBatchLoss(loss_of)
    return loss_of(batch.input_ids.to(device), batch.position_ids.to(device),
                   None if batch.document_ids is None else batch.document_ids.to(device), batch.labels.to(device))


def accumulate_gradients(loss_of, micro_batches, device, autocast, step_trained_tokens: int | None = None,
                         on_micro_batch=lambda index, count: None) -> float:
    """Backward over this process's micro-batches of one optimizer step; returns their loss sum / step tokens.

    The step's loss is the mean over all trained tokens of all its micro-batches (token-weighted), not a mean
    of per-batch means: each micro-batch's loss sum is divided by the step's total trained tokens, which
    under torchrun includes the other processes' micro-batches (DDP sums the gradients during the last
    micro-batch's backward, the earlier ones only accumulate locally; FSDP sums each micro-batch's into the shards).
    """
    trained = max(step_trained_tokens or sum(b.trained_tokens for b in micro_batches), 1)
    loss_sum = 0.0
    for i, b in enumerate(micro_batches):
        on_micro_batch(i, len(micro_batches))
        with distributed.no_sync(loss_of, i < len(micro_batches) - 1):
            with autocast():
                loss = batch_loss_sum(loss_of, b, device)
            (loss / trained).backward()
        loss_sum = loss_sum + loss.detach()  # stays on the device: one host sync per step, not per micro-batch
    return float(loss_sum) / trained


def evaluate(loss_of, batches, device, autocast, world=distributed.World()) -> tuple[float, float]:
    """Token-weighted mean loss and perplexity over all eval batches (shared out among torchrun processes).
    Every process runs the same number of forwards, as a sharded model needs (each gathers every layer's weights
    with all the others): one with a batch fewer runs the last batch again and does not count it."""
    loss_of.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast():
        for i in range(world.rank, math.ceil(len(batches) / world.size) * world.size, world.size):
            b = batches[min(i, len(batches) - 1)]
            loss = batch_loss_sum(loss_of, b, device).item()
            if i < len(batches):
                total, count = total + loss, count + b.trained_tokens
    distributed.reshard(loss_of)
    loss_of.train()
    total, count = distributed.sum_scalars([total, count], world, device)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50))


class StopRequest:
    """Ctrl-C and SIGTERM only set a flag; the training loop stops at the next step boundary and saves exactly
    that step's state. Raising from the handler instead could land anywhere: between optimizer.step() and the step
    counter, or in the middle of writing a checkpoint."""

    def __init__(self, say):
        self.requested, self.say = False, say

    def __call__(self, signum, frame):
        if not self.requested:
            self.say(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                     "(kill -9 is safe too: the last complete checkpoint stays loadable)")
        self.requested = True

    def __enter__(self):
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm of a step is NaN or infinite."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout masks come from torch's RNG, reseeded per step and process: resuming at any step replays them,
    and torchrun processes draw different masks."""
    return ((seed * 1_000_003 + step) * 1009 + rank) % 2**63


def train(cfg: TrainConfig) -> int:
    world, device = distributed.init(cfg.device)
    try:
        if not world.is_main:  # only the main process writes: it alone owns the run folder
            return run(cfg, world, device)
        with RunFolderLock(Path(cfg.out)):
            return run(cfg, world, device)
    finally:
        distributed.shutdown(world)


def run(cfg: TrainConfig, world: distributed.World, device: torch.device) -> int:
    log = emit if world.is_main else (lambda text: None)
    dtype = default_dtype(device) if cfg.dtype == "auto" else parse_dtype(cfg.dtype)
    if cfg.gradient_checkpointing is None:
        cfg.gradient_checkpointing = device.type == "cuda"
    offload_applies = cfg.gradient_checkpointing and device.type == "cuda"
    if cfg.offload_checkpoints and not offload_applies:  # given, or saved by a resumed run on a GPU
        log("note: --offload-checkpoints applies only with gradient checkpointing on a CUDA device; off here")
    cfg.offload_checkpoints = offload_applies and cfg.offload_checkpoints is not False  # (None: the default, on)
    run_dir = Path(cfg.out)
    continuing = bool(cfg.resume) and run_dir.resolve() == run_folder_of(find_checkpoint(cfg.resume)).resolve()
    if not continuing:  # checked again under the lock: another run may have saved here since the flags were read
        check_fresh_run_folder(run_dir)
    torch.manual_seed(cfg.seed)
    log("config: " + json.dumps(dataclasses.asdict(cfg)))

    tokenizer = load_tokenizer(cfg.model)
    check_against_model(cfg, Phi3Config.from_json(Path(cfg.model).expanduser() / "config.json"), tokenizer)
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
    group_size = cfg.grad_accum * world.size  # micro-batches per optimizer step, all processes together
    batches = epoch_batches(0)  # every epoch has the same number of batches
    if group_size > len(batches):
        raise FlagError(f"--grad-accum {cfg.grad_accum} x {world.size} processes = {group_size} micro-batches per step, "
                        f"more than the {len(batches)} of a whole epoch of {cfg.data}; lower --grad-accum or --batch-size")

    steps_per_epoch = math.ceil(len(batches) / group_size)
    if not (cfg.max_steps > 0 or steps_per_epoch * cfg.epochs <= MAX_STEPS):
        raise FlagError(f"--epochs {cfg.epochs} is {steps_per_epoch * cfg.epochs:.3g} steps of {cfg.data}, more than "
                        f"{MAX_STEPS:,}; lower --epochs")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.epochs))

    @functools.cache  # (asked for by the early compile and by prepare: every epoch's batches are built once)
    def token_counts():  # the tokens of every micro-batch this run can take (all processes), train and eval
        epochs = math.ceil(total_steps * group_size / len(batches))  # (the same number of batches each epoch)
        return {"train": {b.input_ids.numel() for e in range(epochs) for b in epoch_batches(e)},
                "eval": {b.input_ids.numel() for b in eval_batches}}

    early = None  # the kernels this run needs, compiling (in threads) against two layers while the checkpoint loads
    if device.type == "cuda" and world.is_main and not cfg.full:
        config = Phi3Config.from_json(Path(cfg.model).expanduser() / "config.json")
        early = kernel_tuning.start_compiling(kernel_tuning.stand_in(config, lora_config(cfg), device, dtype,
                                                                     cfg.gradient_checkpointing, cfg.checkpoint_layers),
                                              token_counts, dtype, device)
    model = build_model(cfg, device, dtype).train()
    compute_loss = MicroBatchLoss(model)
    if cfg.full:  # under torchrun, each process keeps 1/N of the weights, gradients and (built below) AdamW moments
        distributed.shard(compute_loss, model.model.layers, world, device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # (after sharding: the shards)
    held = sum(distributed.local(p).numel() for p in model.parameters())  # (this process's part)
    log(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trained, {device} {str(dtype).removeprefix('torch.')}, "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
        + (f" for the first {cfg.checkpoint_layers} layers" if cfg.gradient_checkpointing
           and cfg.checkpoint_layers is not None else "")
        + (" (layer inputs wait in pinned CPU memory)" if cfg.offload_checkpoints else "")
        + (f", {world.size} processes" if world.size > 1 else "")
        + (f", sharded: {held:,} parameters in this process" if cfg.full and world.size > 1 else ""))
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    warmup_steps = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    eval_every = cfg.eval_every or max(1, total_steps // 5)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=cfg.full and dtype != torch.float32)

    step, position, saved_tuning = 0, {"epoch": 0, "batch": 0}, None
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume)
        step, position = load_checkpoint(ckpt, model, optimizer)
        if position["batch"] > len(batches):
            raise RunStateError(f"{ckpt / 'state.json'}: data position {position} is past the {len(batches)} "
                                "batches of an epoch of this data; resume with the data the run was trained on")
        saved_tuning = read_tuning(ckpt, log)
        log(f"resumed from {ckpt} at step {step}")
        if step >= total_steps:
            log(f"the run already finished its {total_steps} steps; raise --max-steps or --epochs to train further")
            if cfg.export_merged:  # nothing to train: merge the finished adapter into its base
                export_merged(model, cfg, dtype, log)
            return 0
        if position["epoch"] != 0:
            batches = epoch_batches(position["epoch"])
    for group in optimizer.param_groups:  # LambdaLR's public way to start at `step` (last_epoch = step - 1) reads it
        group["initial_lr"] = cfg.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, warmup_steps, total_steps),
                                                  last_epoch=step - 1)  # its first step() sets lr = cfg.lr * f(step)
    try:
        tuning = kernel_tuning.prepare(model, token_counts, dtype, device, saved_tuning, world.rank, world.size, log,
                                       early)
    except ValueError as e:  # the resumed record is not one (a stranger's or damaged file)
        if saved_tuning is None:
            raise
        raise RunStateError(f"{ckpt / kernel_tuning.TUNING_FILE}: {e}; delete it to let the run choose kernels "
                            "afresh") from None

    with StopRequest(log) as stop:  # from here on, Ctrl-C and SIGTERM end the run at a step boundary
        # The run folder is created only now: the data, the model and the checkpoint are known to be good.
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in clean_stale_writes(run_dir):
                log(f"removed {stale}, left by a write that was killed")
            write_json_atomic(run_dir / "train_config.json", dataclasses.asdict(cfg))
            if (run_dir / "metrics.jsonl").is_symlink():  # appending would write wherever a stranger's link points
                (run_dir / "metrics.jsonl").unlink()
            drop_metrics_after(run_dir / "metrics.jsonl", step if continuing else -1)  # (a fresh run: none kept)
        tuning_text = {kernel_tuning.TUNING_FILE: kernel_tuning.to_file(tuning)} if tuning else {}

        def write_model_files(folder: Path, trained: dict[str, torch.Tensor]) -> None:
            """trained: the trained parameters, whole, on the CPU (the model itself may hold only shards)."""
            (folder / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            if cfg.full:
                write_hf_files(model, folder, dtype=dtype, tokenizer_from=cfg.model, state=trained)
            else:
                save_adapter(model, folder, base_model=Path(cfg.model).resolve())

        def save_now() -> tuple[Path, dict[str, torch.Tensor]]:
            """Written by the main process only, after every process took part in gathering the sharded tensors;
            the others wait so that no process runs ahead of a save. Returns the folder and the trained tensors."""
            final = run_dir / f"checkpoint-{step}"
            trained = distributed.gather_to_cpu(trainable_tensors(model), world.is_main)
            moments = distributed.gather_to_cpu(optimizer_tensors(model, optimizer), world.is_main)
            if world.is_main and not (final / "state.json").is_file():  # this step's state is already there
                save_checkpoint(run_dir, step, trained, moments, dict(position),
                                lambda folder: write_model_files(folder, trained), cfg.keep, tuning_text, world.size)
            distributed.barrier(world)
            return final, trained

        loss_of = distributed.data_parallel(compute_loss, world, device)  # after loading: no broadcast
        progress = Progress(total_steps, cfg.log_every, run_dir / "metrics.jsonl", enabled=world.is_main)
        model.on_layer = progress.within_step  # where a long step is, on the live line
        start_step, failure = step, None
        window_tokens, window_seconds = 0, 0.0  # training time only: evals and saves are not in tokens/s
        if step == 0 and eval_batches:
            loss, ppl = evaluate(compute_loss, eval_batches, device, autocast, world)
            progress.say(f"eval before training: loss {loss:.4f} ppl {ppl:.2f}")
            progress.log({"step": 0, "eval_loss": loss, "eval_ppl": ppl})
        while step < total_steps and not stop.requested:
            started = time.perf_counter()
            step_start_position, step_start_batches = dict(position), batches
            group = []  # this step's micro-batches, the same list in every process
            while len(group) < group_size:
                if position["batch"] >= len(batches):
                    position = {"epoch": position["epoch"] + 1, "batch": 0}
                    batches = epoch_batches(position["epoch"])
                group.append(batches[position["batch"]])
                position["batch"] += 1
            torch.manual_seed(step_seed(cfg.seed, step, world.rank))
            step_tokens = sum(b.trained_tokens for b in group)
            progress.begin_step(step + 1)
            loss = accumulate_gradients(loss_of, group[world.rank::world.size], device, autocast, step_tokens,
                                        progress.begin_micro_batch)
            grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)))
            # one collective carries the loss, the norm's finiteness and any process's stop request
            train_loss, bad, stopping = distributed.sum_scalars(
                [loss, float(not math.isfinite(loss + grad_norm)), float(stop.requested)], world, device)
            if stopping or bad:
                optimizer.zero_grad(set_to_none=True)  # this step is dropped: the state stays that of `step`
                position, batches = step_start_position, step_start_batches
                if bad:
                    failure = (f"step {step + 1}: the loss ({train_loss:.4g}) or the gradient norm ({grad_norm:.4g}) "
                               "is not finite")
                stop.requested = True
                break
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            window_tokens += sum(int((b.input_ids != pad_id).sum()) for b in group)
            window_seconds += time.perf_counter() - started
            tokens_per_s = window_tokens / max(window_seconds, 1e-9)
            peak = peak_memory_gib(device)
            progress.step(step, train_loss, lr, tokens_per_s, peak, step - start_step)
            if step % cfg.log_every == 0 or step == total_steps:
                progress.log({"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_s, "peak_gib": peak, "epoch": position["epoch"]})
                window_tokens, window_seconds = 0, 0.0
            if eval_batches and (step % eval_every == 0 or step == total_steps):
                loss, ppl = evaluate(compute_loss, eval_batches, device, autocast, world)
                progress.say(f"eval at step {step}: loss {loss:.4f} ppl {ppl:.2f}")
                progress.log({"step": step, "eval_loss": loss, "eval_ppl": ppl})
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_now()

        if failure and distributed.sum_scalars(  # (each process checks its shards; all take part)
                [float(not all(torch.isfinite(distributed.local(p)).all() for p in trainable))], world, device)[0]:
            raise NonFiniteLoss(f"{failure}, and the weights already hold NaN or inf; resume from an earlier "
                                f"checkpoint in {run_dir} with a lower --lr")
        final, trained = save_now()  # signals only set stop.requested from here on: this save always completes
        if failure:
            raise NonFiniteLoss(f"{failure}; saved the last good state as {final}. Lower the learning rate "
                                f"(python train.py --resume {run_dir} --lr ...), or start again with a lower --alpha")
        if step < total_steps:  # stopped by a signal
            if world.is_main:
                plot_loss(run_dir, progress.say)
            progress.say(f"interrupted: saved {final}; continue with: python train.py --resume {run_dir}")
            return 130
        if world.is_main:
            write_model_files(run_dir, trained)
            progress.say(f"done: {'model' if cfg.full else 'adapter'} in {run_dir}, checkpoint {final}")
            if cfg.export_merged:
                export_merged(model, cfg, dtype, progress.say)
            plot_loss(run_dir, progress.say)
        distributed.barrier(world)
    return 0


def export_merged(model: Phi3ForCausalLM, cfg: TrainConfig, dtype: torch.dtype, say) -> None:
    """Base + adapter merged into one complete model folder (weights, config, tokenizer) at --export-merged."""
    merge_lora(model)
    save_model(model, cfg.export_merged, dtype=dtype, tokenizer_from=cfg.model)
    say(f"merged model written to {cfg.export_merged}")


def read_tuning(checkpoint: Path, log) -> dict | None:
    """The kernel choices saved with a checkpoint (checked when they are used), or None."""
    path = checkpoint / kernel_tuning.TUNING_FILE
    if not path.is_file():
        return None
    fix = "delete it to let the run choose kernels afresh"
    data = read_json_object(path, RunStateError, fix)
    try:
        saved_settings, record = kernel_tuning.from_file(data)
    except ValueError as e:
        raise RunStateError(f"{path}: {e}; {fix}") from None
    if saved_settings != kernel_tuning.settings():
        log(f"warning: the run chose its kernels with {saved_settings}, this process has {kernel_tuning.settings()}; "
            "set the same environment to resume bit-exactly")
    return record


def drop_metrics_after(path: Path, step: int) -> None:
    """A run resumed from an older checkpoint (after a kill) redoes the steps past it: drop their old lines."""
    try:
        with open_regular(path) as f:  # (a FIFO in a stranger's run folder: an error, not a hang)
            lines = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
    except FileNotFoundError:
        return
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut short by a kill, or a stranger's
        if isinstance(row, dict) and type(row.get("step")) is int and row["step"] <= step:
            keep.append(line)
    if len(keep) != len(lines):
        with atomic_file(path) as tmp:
            tmp.write_text("".join(keep))


def main(argv=None) -> int:
    try:
        cfg = resolve_config(argv)
        return train(cfg)
    except (FlagError, DataError, CheckpointError, ConfigError, TokenizerError, RunStateError, RunFolderError,
            NonFiniteLoss) as e:
        message = str(e)
    except OSError as e:  # unreadable inputs, unwritable outputs, a full disk: the failed write left nothing behind
        message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    except torch.OutOfMemoryError:
        message = ("out of GPU memory; lower --batch-size or --max-seq-len, or turn on --gradient-checkpointing "
                   "(the last complete checkpoint, if any, can be resumed with --resume)")
    except KeyboardInterrupt:  # before training started (loading, tuning): no run folder was written yet
        emit("\ninterrupted")
        return 130
    emit(f"error: {message}")
    return 2


if __name__ == "__main__":
    for name in ("stdout", "stderr"):  # started with it closed (`2>&-`, as some job schedulers do): text is lost
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    sys.exit(main())
