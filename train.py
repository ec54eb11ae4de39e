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
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from phi3 import CheckpointError, ConfigError, Phi3Config, Phi3ForCausalLM, load_model, load_tokenizer, save_model
from phi3 import compile_ahead, distributed
from phi3.atomic import atomic_file
from phi3.checkpoint import default_dtype, parse_dtype, write_hf_files
from phi3.config import open_regular
from phi3.data import DataError, make_batches, pad_token_for, read_jsonl, split_eval
from phi3.lora import (LoRAConfig, add_lora, add_trainable_tokens, lora_state_dict, mark_only_lora_as_trainable,
                       merge_lora, parse_targets, save_adapter, use_fp8)
from phi3.quantized import is_4bit, is_4bit_config
from phi3.loss import cross_entropy_sum
from phi3.model import Recompute
from phi3.recompute import keeping_less_where_memory_runs_out
from phi3.progress import Progress, emit, peak_memory_gib, plot_loss
from phi3.run_state import (RunStateError, clean_stale_writes, find_checkpoint, load_checkpoint, lr_lambda,
                            optimizer_tensors, run_folder_of, save_checkpoint, trainable_tensors, write_json_atomic)
from phi3.run_folder import RunFolderError, RunFolderLock, check_fresh_run_folder
from phi3.train_config import (MAX_STEPS, FlagError, TrainConfig, check_against_model, fp8_problem, resolve_config,
                               trainable_token_ids)
from phi3.tokenizer import TokenizerError



def lora_config(cfg: TrainConfig) -> LoRAConfig:
    return LoRAConfig(cfg.rank, cfg.alpha, cfg.dropout, parse_targets(cfg.targets), cfg.rslora, cfg.dora)


def add_adapters(model: Phi3ForCausalLM, cfg: TrainConfig, token_ids: list[int]) -> Phi3ForCausalLM:
    """LoRA (DoRA with --dora) on --targets, and the rows of --trainable-tokens: the embedding's, and lm_head's too
    unless lm_head has LoRA (on a tied model they are one set of rows; train_config refuses lm_head there)."""
    add_lora(model, lora_config(cfg))
    if token_ids:
        add_trainable_tokens(model, token_ids, lm_head="lm_head" not in parse_targets(cfg.targets))
    return model


def recompute_of(cfg: TrainConfig) -> Recompute | None:
    """The model's gradient checkpointing, from the flags (resolved: see Run.start)."""
    if not cfg.gradient_checkpointing:
        return None
    keep = None if cfg.keep_outputs == "auto" else int(cfg.keep_outputs)
    return Recompute(layers=cfg.checkpoint_layers, offload=cfg.offload_checkpoints, keep_outputs=keep)


def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, token_ids=()) -> Phi3ForCausalLM:
    if cfg.init == "random":
        model = Phi3ForCausalLM(Phi3Config.from_json(Path(cfg.model) / "config.json"), recompute_of(cfg)).to(device)
        model.init_weights(cfg.seed)
    else:
        # --full keeps fp32 master weights and computes in `dtype` under autocast; LoRA keeps the base in `dtype`.
        model = load_model(cfg.model, dtype=torch.float32 if cfg.full else dtype, device=device,
                           recompute=recompute_of(cfg), quantize=cfg.quantize)
    if cfg.full:
        model.requires_grad_(True)  # already fp32: built that way or loaded with dtype=float32 above
    else:
        add_adapters(model, cfg, list(token_ids))
        mark_only_lora_as_trainable(model)
        if cfg.fp8 and not use_fp8(model):
            raise FlagError(f"--fp8: {cfg.model} has no 16-bit decoder layer with LoRA to compute in FP8 (a 4-bit "
                            "base?); drop --fp8")
    return model.train()


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
    """The outline: set up, train step by step until done, stopped or diverged, then save and finish."""
    state = Run(cfg, world, device)
    if state.finished_already():
        return 0
    with StopRequest(state.log) as stop:  # from here on, Ctrl-C and SIGTERM end the run at a step boundary
        state.open_folder()
        progress = Progress(state.total_steps, cfg.log_every, state.run_dir / "metrics.jsonl", enabled=world.is_main)
        progress.watch(state.model.model.layers)  # where a long step is, on the live line
        if state.step == 0 and state.eval_batches:
            state.evaluate(progress, "before training")
        failure = None
        while state.step < state.total_steps and not stop.requested and failure is None:
            failure = state.train_step(progress, stop)
        return state.finish(progress, failure)


class Run:
    """A training run from its flags to its last checkpoint: the data, the model and optimizer, and where it is
    (step, data position). Built by __init__ (data, model, resume; nothing written yet), advanced by train_step."""

    def __init__(self, cfg: TrainConfig, world: distributed.World, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.log = emit if world.is_main else (lambda text: None)
        self.dtype = default_dtype(device) if cfg.dtype == "auto" else parse_dtype(cfg.dtype)
        self.resolve_memory_flags()
        problem = fp8_problem(cfg, device, self.dtype)
        if problem:
            raise FlagError(problem)
        self.run_dir = Path(cfg.out)
        self.continuing = bool(cfg.resume) and (self.run_dir.resolve() ==
                                                run_folder_of(find_checkpoint(cfg.resume)).resolve())
        if not self.continuing:  # checked again under the lock: another run may have saved here since the flags
            check_fresh_run_folder(self.run_dir)
        torch.manual_seed(cfg.seed)
        self.log("config: " + json.dumps(dataclasses.asdict(cfg)))
        self.read_data()
        compiling = self.start_compiling()  # on a GPU: the kernels, in threads, while the checkpoint loads
        self.build_model()
        self.resume()
        if compiling is not None and self.step < self.total_steps:
            waited = time.perf_counter()
            compiling.wait()
            self.log(f"kernels: {len(compiling.jobs)} binaries compiled in threads (waited "
                     f"{time.perf_counter() - waited:.1f} s for them after loading)")
        self.window_tokens, self.window_seconds, self.start_step = 0, 0.0, self.step  # tokens/s: training time only

    def resolve_memory_flags(self) -> None:
        cfg, on_gpu = self.cfg, self.device.type == "cuda"
        if cfg.gradient_checkpointing is None:
            cfg.gradient_checkpointing = on_gpu
        offload_applies = cfg.gradient_checkpointing and on_gpu
        if cfg.offload_checkpoints and not offload_applies:  # given, or saved by a resumed run on a GPU
            self.log("note: --offload-checkpoints applies only with gradient checkpointing on a CUDA device; off here")
        cfg.offload_checkpoints = offload_applies and cfg.offload_checkpoints is not False  # (None: default, on)

    def read_data(self) -> None:
        cfg, log = self.cfg, self.log
        tokenizer = load_tokenizer(cfg.model)
        config = Phi3Config.from_json(Path(cfg.model).expanduser() / "config.json")
        check_against_model(cfg, config, tokenizer)
        self.token_ids = trainable_token_ids(cfg, tokenizer, config)
        examples, stats = read_jsonl(cfg.data, tokenizer, cfg.train_on, cfg.max_seq_len)
        log(f"data {cfg.data}: {stats.summary()}")
        if cfg.eval_data:
            eval_examples, eval_stats = read_jsonl(cfg.eval_data, tokenizer, cfg.train_on, cfg.max_seq_len)
            log(f"eval {cfg.eval_data}: {eval_stats.summary()}")
        else:
            examples, eval_examples = split_eval(examples, cfg.eval_fraction, cfg.seed)
            log(f"eval: {len(eval_examples)} examples held out of {cfg.data}")
        self.pad_id = pad_token_for(tokenizer)
        self.epoch_batches = lambda epoch: make_batches(examples, cfg.batch_size, cfg.max_seq_len, self.pad_id,
                                                        cfg.packing, shuffle=True, seed=cfg.seed, epoch=epoch)
        self.eval_batches = make_batches(eval_examples, cfg.batch_size, cfg.max_seq_len, self.pad_id, cfg.packing,
                                         shuffle=False, seed=0) if eval_examples else []
        self.group_size = cfg.grad_accum * self.world.size  # micro-batches per optimizer step, all processes
        self.batches = self.epoch_batches(0)  # every epoch has the same number of batches
        if self.group_size > len(self.batches):
            raise FlagError(f"--grad-accum {cfg.grad_accum} x {self.world.size} processes = {self.group_size} "
                            f"micro-batches per step, more than the {len(self.batches)} of a whole epoch of "
                            f"{cfg.data}; lower --grad-accum or --batch-size")
        steps_per_epoch = math.ceil(len(self.batches) / self.group_size)
        if not (cfg.max_steps > 0 or steps_per_epoch * cfg.epochs <= MAX_STEPS):
            raise FlagError(f"--epochs {cfg.epochs} is {steps_per_epoch * cfg.epochs:.3g} steps of {cfg.data}, more "
                            f"than {MAX_STEPS:,}; lower --epochs")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.epochs))

    def start_compiling(self):
        """The kernels every micro-batch of this run needs, compiling in threads against a two-layer stand-in."""
        if self.device.type != "cuda" or not self.world.is_main or self.cfg.full:
            return None
        epochs = math.ceil(self.total_steps * self.group_size / len(self.batches))
        counts = {"train": {b.input_ids.numel() for e in range(epochs) for b in self.epoch_batches(e)},
                  "eval": {b.input_ids.numel() for b in self.eval_batches}}
        folder = Path(self.cfg.model).expanduser()
        config, raw_config = Phi3Config.read(folder / "config.json")
        four_bit = bool(self.cfg.quantize) or is_4bit_config(raw_config)
        return compile_ahead.start(config, lora_config(self.cfg), self.device, self.dtype, recompute_of(self.cfg),
                                   counts, four_bit, self.cfg.fp8)

    def build_model(self) -> None:
        cfg, world, device = self.cfg, self.world, self.device
        self.model = build_model(cfg, device, self.dtype, self.token_ids)
        self.compute_loss = MicroBatchLoss(self.model)
        if cfg.full:  # under torchrun, each process keeps 1/N of the weights, gradients and (below) AdamW moments
            distributed.shard(self.compute_loss, self.model.model.layers, world, device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # (after sharding: the shards)
        held = sum(distributed.local(p).numel() for p in self.model.parameters())  # (this process's part)
        self.log(f"model {cfg.model}: {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                 f"{sum(p.numel() for p in self.trainable):,} trained, {device} {str(self.dtype).removeprefix('torch.')}"
                 f", gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
                 + (f" for the first {cfg.checkpoint_layers} layers" if cfg.gradient_checkpointing
                    and cfg.checkpoint_layers is not None else "")
                 + (" (layer inputs wait in pinned CPU memory)" if cfg.offload_checkpoints else "")
                 + (", the frozen base's products in FP8 (--fp8)" if cfg.fp8 else "")
                 + (f", {world.size} processes" if world.size > 1 else "")
                 + (f", sharded: {held:,} parameters in this process" if cfg.full and world.size > 1 else ""))
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        self.autocast = lambda: torch.autocast(device.type, dtype=self.dtype,
                                               enabled=cfg.full and self.dtype != torch.float32)

    def resume(self) -> None:
        """Step and data position of the resumed checkpoint (0 and the start for a new run); the lr schedule there."""
        cfg = self.cfg
        self.step, self.position = 0, {"epoch": 0, "batch": 0}
        if cfg.resume:
            ckpt = find_checkpoint(cfg.resume)
            self.step, self.position = load_checkpoint(ckpt, self.model, self.optimizer)
            if self.position["batch"] > len(self.batches):
                raise RunStateError(f"{ckpt / 'state.json'}: data position {self.position} is past the "
                                    f"{len(self.batches)} batches of an epoch of this data; resume with the data the "
                                    "run was trained on")
            self.log(f"resumed from {ckpt} at step {self.step}")
            self.batches = self.epoch_batches(self.position["epoch"])
        warmup_steps = int(cfg.warmup * self.total_steps) if cfg.warmup < 1 else int(cfg.warmup)
        for group in self.optimizer.param_groups:  # LambdaLR's public way to start at `step` reads it
            group["initial_lr"] = cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(  # its first step() sets lr = cfg.lr * f(step)
            self.optimizer, lr_lambda(cfg.lr_schedule, warmup_steps, self.total_steps), last_epoch=self.step - 1)

    def finished_already(self) -> bool:
        """A resumed run that has no step left: said; with --export-merged, the adapter is merged now."""
        if self.step < self.total_steps:
            return False
        self.log(f"the run already finished its {self.total_steps} steps; raise --max-steps or --epochs to train "
                 "further")
        if self.cfg.export_merged and self.world.is_main:
            export_merged(self.model, self.cfg, self.dtype, self.log, self.token_ids)
        return True

    def open_folder(self) -> None:
        """The run folder is written only now: the data, the model and the checkpoint are known to be good."""
        self.loss_of = distributed.data_parallel(self.compute_loss, self.world, self.device)  # after loading
        if not self.world.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in clean_stale_writes(self.run_dir):
            self.log(f"removed {stale}, left by a write that was killed")
        write_json_atomic(self.run_dir / "train_config.json", dataclasses.asdict(self.cfg))
        if (self.run_dir / "metrics.jsonl").is_symlink():  # appending would write wherever a stranger's link points
            (self.run_dir / "metrics.jsonl").unlink()
        drop_metrics_after(self.run_dir / "metrics.jsonl", self.step if self.continuing else -1)  # (a new run: none)

    def next_micro_batches(self) -> list:
        """This step's micro-batches (all processes'), the data position moved past them."""
        group = []
        while len(group) < self.group_size:
            if self.position["batch"] >= len(self.batches):
                self.position = {"epoch": self.position["epoch"] + 1, "batch": 0}
                self.batches = self.epoch_batches(self.position["epoch"])
            group.append(self.batches[self.position["batch"]])
            self.position["batch"] += 1
        return group

    def train_step(self, progress: Progress, stop: StopRequest) -> str | None:
        """One optimizer step, or none when a process was asked to stop or the loss is not finite (then returned as
        the failure): the run's state stays that of the last step."""
        cfg, world = self.cfg, self.world
        started, before = time.perf_counter(), (dict(self.position), self.batches)
        group = self.next_micro_batches()

        def gradients():
            self.optimizer.zero_grad(set_to_none=True)  # (a failed attempt's partial sums)
            torch.manual_seed(step_seed(cfg.seed, self.step, world.rank))  # an attempt again draws the same dropout
            progress.begin_step(self.step + 1)
            return accumulate_gradients(self.loss_of, group[world.rank::world.size], self.device, self.autocast,
                                        sum(b.trained_tokens for b in group), progress.begin_micro_batch)

        budget = self.model.kept_budget if world.size == 1 else None  # (one process of several cannot retry alone)
        loss = keeping_less_where_memory_runs_out(budget, gradients, lambda kept: self.log(
            f"note: step {self.step + 1} ran out of GPU memory with {kept} layers keeping their outputs for the "
            f"recompute; it runs again keeping at most {kept // 2}"))
        grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)))
        # one collective carries the loss, the norm's finiteness and any process's stop request
        train_loss, bad, stopping = distributed.sum_scalars(
            [loss, float(not math.isfinite(loss + grad_norm)), float(stop.requested)], world, self.device)
        if stopping or bad:
            self.optimizer.zero_grad(set_to_none=True)  # this step is dropped: the state stays that of `step`
            self.position, self.batches = before
            stop.requested = True
            return (f"step {self.step + 1}: the loss ({train_loss:.4g}) or the gradient norm ({grad_norm:.4g}) is not "
                    "finite") if bad else None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.window_tokens += sum(int((b.input_ids != self.pad_id).sum()) for b in group)
        self.window_seconds += time.perf_counter() - started
        self.report(progress, train_loss, lr, grad_norm)
        return None

    def report(self, progress: Progress, train_loss: float, lr: float, grad_norm: float) -> None:
        """After a step: the live line, metrics every --log-every steps, evals and checkpoints when due."""
        cfg, step = self.cfg, self.step
        tokens_per_s, peak = self.window_tokens / max(self.window_seconds, 1e-9), peak_memory_gib(self.device)
        progress.step(step, train_loss, lr, tokens_per_s, peak, step - self.start_step)
        if step % cfg.log_every == 0 or step == self.total_steps:
            progress.log({"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": tokens_per_s, "peak_gib": peak, "epoch": self.position["epoch"]})
            self.window_tokens, self.window_seconds = 0, 0.0
        eval_every = cfg.eval_every or max(1, self.total_steps // 5)
        if self.eval_batches and (step % eval_every == 0 or step == self.total_steps):
            self.evaluate(progress, f"at step {step}")
        if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
            self.save()

    def evaluate(self, progress: Progress, when: str) -> None:
        loss, ppl = evaluate(self.compute_loss, self.eval_batches, self.device, self.autocast, self.world)
        progress.say(f"eval {when}: loss {loss:.4f} ppl {ppl:.2f}")
        progress.log({"step": self.step, "eval_loss": loss, "eval_ppl": ppl})

    def write_model_files(self, folder: Path, trained: dict[str, torch.Tensor]) -> None:
        """trained: the trained parameters, whole, on the CPU (the model itself may hold only shards)."""
        (folder / "train_config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")
        if self.cfg.full:
            write_hf_files(self.model, folder, dtype=self.dtype, tokenizer_from=self.cfg.model, state=trained)
        else:
            save_adapter(self.model, folder, base_model=Path(self.cfg.model).resolve())

    def save(self) -> tuple[Path, dict[str, torch.Tensor]]:
        """checkpoint-STEP, written by the main process only, after every process took part in gathering the
        sharded tensors; the others wait, so that none runs ahead of a save. Returns it and the trained tensors."""
        final = self.run_dir / f"checkpoint-{self.step}"
        trained = distributed.gather_to_cpu(trainable_tensors(self.model), self.world.is_main)
        moments = distributed.gather_to_cpu(optimizer_tensors(self.model, self.optimizer), self.world.is_main)
        if self.world.is_main and not (final / "state.json").is_file():  # this step's state is already there
            save_checkpoint(self.run_dir, self.step, trained, moments, dict(self.position),
                            lambda folder: self.write_model_files(folder, trained), self.cfg.keep, self.world.size)
        distributed.barrier(self.world)
        return final, trained

    def finish(self, progress: Progress, failure: str | None) -> int:
        """The last checkpoint, then the final adapter (or model), the merged export and loss.png; exit code."""
        world, run_dir = self.world, self.run_dir
        if failure and distributed.sum_scalars(  # (each process checks its shards; all take part)
                [float(not all(torch.isfinite(distributed.local(p)).all() for p in self.trainable))], world,
                self.device)[0]:
            raise NonFiniteLoss(f"{failure}, and the weights already hold NaN or inf; resume from an earlier "
                                f"checkpoint in {run_dir} with a lower --lr")
        final, trained = self.save()  # signals only set stop.requested from here on: this save always completes
        if failure:
            raise NonFiniteLoss(f"{failure}; saved the last good state as {final}. Lower the learning rate "
                                f"(python train.py --resume {run_dir} --lr ...), or start again with a lower --alpha")
        if self.step < self.total_steps:  # stopped by a signal
            if world.is_main:
                plot_loss(run_dir, progress.say)
            progress.say(f"interrupted: saved {final}; continue with: python train.py --resume {run_dir}")
            return 130
        if world.is_main:
            self.write_model_files(run_dir, trained)
            progress.say(f"done: {'model' if self.cfg.full else 'adapter'} in {run_dir}, checkpoint {final}")
            if self.cfg.export_merged:
                export_merged(self.model, self.cfg, self.dtype, progress.say, self.token_ids)
            plot_loss(run_dir, progress.say)
        distributed.barrier(world)
        return 0


def export_merged(model: Phi3ForCausalLM, cfg: TrainConfig, dtype: torch.dtype, say, token_ids=()) -> None:
    """Base + adapter merged into one complete model folder (weights, config, tokenizer) at --export-merged. A 4-bit
    run's adapter is merged into the 16-bit base, read again from --model (4-bit weights would be rounded again; a
    DoRA magnitude then rescales that base's W + s B A, as peft's merge into it would)."""
    if is_4bit(model):
        adapter = lora_state_dict(model)
        model = add_adapters(load_model(cfg.model, dtype=dtype, device="cpu"), cfg, list(token_ids))
        unexpected = model.load_state_dict({name: t.cpu() for name, t in adapter.items()}, strict=False).unexpected_keys
        assert not unexpected, f"adapter tensors the 16-bit model lacks: {unexpected[:3]}"  # (a bug, not bad input)
    merge_lora(model)
    save_model(model, cfg.export_merged, dtype=dtype, tokenizer_from=cfg.model)
    say(f"merged model written to {cfg.export_merged}")


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
        message = ("out of GPU memory; lower --batch-size or --max-seq-len, turn on --gradient-checkpointing, or "
                   "keep nothing for its recompute with --keep-outputs 0 (the last complete checkpoint, if any, can be "
                   "resumed with --resume)")
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
