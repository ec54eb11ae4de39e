"""Training progress: a live line (step, loss, lr, tokens/s, ETA, peak memory), metrics.jsonl, loss.png."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from phi3.atomic import atomic_file


class Progress:
    """One live line on a terminal (rewritten every step), plain lines every log_every steps elsewhere.
    Only the main process of a torchrun job prints and writes metrics.jsonl."""

    def __init__(self, total: int, log_every: int, metrics_path: Path, enabled: bool = True):
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self.metrics = open(metrics_path, "a") if enabled else None
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def log(self, record: dict) -> None:
        if self.enabled:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, peak_gib: float, done_steps: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done_steps, 1) * (self.total - step)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s | peak {peak_gib:.2f} GiB")
        if self.tty:
            print("\r" + line.ljust(110), end="", file=sys.stderr, flush=True)
        elif step % self.log_every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def say(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def plot_loss(run_dir: Path, say=lambda text: None) -> None:
    """loss.png from metrics.jsonl (matplotlib is in requirements.txt; without it the plot is skipped, with a note)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("loss.png skipped: matplotlib is not installed (pip install matplotlib)")
        return
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    with atomic_file(run_dir / "loss.png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
