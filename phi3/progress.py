"""Training progress: a live line (step, loss, lr, tokens/s, ETA, peak memory), metrics.jsonl, loss.png."""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import stat
import sys
import time
from pathlib import Path

import torch

from phi3.atomic import atomic_file
from phi3.config import NotARegularFile, open_regular


def emit(text: str, end: str = "\n") -> None:
    """Text to stderr. A closed or failing stderr (`2>&-` under a scheduler, /dev/full, a reader that left) loses
    the text, never the run."""
    if sys.stderr is None:  # started with it closed
        return
    try:
        print(text, end=end, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # ValueError: the stream was closed
        pass


def open_metrics(path: Path):
    """metrics.jsonl opened for appending: only a regular file (a FIFO would block the open, beyond Ctrl-C), and
    never through a link (a stranger's link would send the lines elsewhere)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotARegularFile(0, "not a regular file; remove it", str(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a")


class Progress:
    """One live line on a terminal (rewritten every step), plain lines every log_every steps elsewhere.
    Only the main process of a torchrun job prints and writes metrics.jsonl."""

    def __init__(self, total: int, log_every: int, metrics_path: Path, enabled: bool = True):
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self.metrics = open_metrics(metrics_path) if enabled else None
        self.tty = sys.stderr is not None and sys.stderr.isatty()
        self.start = time.perf_counter()
        # within-step reports use a clock of their own: reading it never moves train.py's timing of a step
        self.step_started = self.last_within = time.monotonic()
        self.current_step, self.micro_batch, self.in_step, self.forward_done = 0, (1, 1), False, set()

    def begin_step(self, step: int) -> None:
        """Step `step` (1-based) starts: within_step reports against it."""
        self.current_step, self.step_started = step, time.monotonic()
        self.begin_micro_batch(0, 1)
        self.in_step = True  # until step() reports it: evals and saves in between are not "within" it

    def begin_micro_batch(self, index: int, count: int) -> None:
        self.micro_batch, self.forward_done = (index + 1, count), set()

    def watch(self, layers) -> None:
        """Report where a long step is as each decoder layer's forward is issued and as the backward pass reaches it
        (its output's gradient arrives). A checkpointed layer's forward runs again in the backward pass: skipped."""
        for i, layer in enumerate(layers):
            layer.register_forward_hook(functools.partial(self._layer_forward, i, len(layers)))

    def _layer_forward(self, layer: int, layers: int, module, args, output) -> None:
        if layer in self.forward_done:  # the recompute, in the backward pass
            return
        self.forward_done.add(layer)
        self.within_step("forward", layer, layers)
        if output.requires_grad:
            output.register_hook(lambda grad: self.within_step("backward", layer, layers))

    def within_step(self, phase: str, layer: int, layers: int) -> None:
        """Where a long step is: shown once a step has run 2 s, then at most twice a second on a terminal, once a
        minute in a log."""
        now = time.monotonic()
        quiet = 0.5 if self.tty else 60
        if not (self.enabled and self.in_step) or now - self.step_started < 2 or now - self.last_within < quiet:
            return
        self.last_within = now
        done = layer + 1 if phase == "forward" else layers - layer
        micro, micros = self.micro_batch
        self._show(f"step {self.current_step}/{self.total} | micro-batch {micro}/{micros} | {phase} layer "
                   f"{done}/{layers} | {now - self.step_started:.0f} s into the step")

    def _show(self, line: str) -> None:
        """On a terminal the one live line is rewritten; elsewhere each line is printed."""
        if self.tty:
            emit("\r" + line.ljust(110), end="")
        else:
            emit(line)

    def log(self, record: dict) -> None:
        if self.enabled:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, peak_gib: float, done_steps: int) -> None:
        self.in_step = False
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done_steps, 1) * (self.total - step)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s | peak {peak_gib:.2f} GiB")
        if self.tty or step % self.log_every == 0 or step == self.total:
            self._show(line)

    def say(self, text: str) -> None:
        if self.enabled:
            emit(("\n" if self.tty else "") + text)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_host_gib()


def peak_host_gib() -> float:
    """This process's peak resident memory since it started: Linux's VmHWM. Not ru_maxrss, which a process started by
    a larger one inherits from it (the parent's peak at the fork comes through exec). ru_maxrss elsewhere."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(status["VmHWM"].split()[0]) / 2**20  # kB
    except (OSError, KeyError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**(20 if sys.platform != "darwin" else 30)


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl that hold an integer step and finite numbers. The file may be a stranger's (a
    copied run folder) or cut short by a kill: any other line, or byte that is not UTF-8, is skipped."""
    try:
        with open_regular(path) as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict) and type(row.get("step")) is int and all(
                type(v) in (int, float) and math.isfinite(v) for k, v in row.items() if k.endswith("loss")):
            rows.append(row)
    return rows


def plot_loss(run_dir: Path, say=lambda text: None) -> None:
    """loss.png from metrics.jsonl (matplotlib is in requirements.txt; without it the plot is skipped, with a note)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("loss.png skipped: matplotlib is not installed (pip install matplotlib)")
        return
    rows = read_metrics(run_dir / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4))
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    try:
        with atomic_file(run_dir / "loss.png") as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
