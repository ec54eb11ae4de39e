"""Resumable training state: checkpoint-STEP/ folders written atomically, RNG capture, learning-rate schedules.

A checkpoint folder holds the adapter in the PEFT layout (or the full model in Hugging Face layout), the
exact trainable tensors (trainable.safetensors), and state.pt: optimizer, scheduler, RNG states, step and
data position. It is written under a temporary name and renamed when complete, so killing the process at
any moment leaves every checkpoint-* folder either absent or whole.
"""

from __future__ import annotations

import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from phi3.atomic import atomic_dir

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak lr at optimizer step s: linear warmup from 0, then cosine/linear decay to 0 or constant."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, position: dict, write_model_files,
                    keep: int) -> Path:
    """Write run_dir/checkpoint-STEP atomically; delete the oldest so that `keep` remain."""
    final = run_dir / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        write_model_files(tmp)  # adapter (PEFT) or full model (HF layout), for users
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save({"step": step, "position": position, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*")
             if (m := CHECKPOINT_RE.search(p.name)) and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest complete checkpoint-* inside a run folder."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint-STEP folder with state.pt to resume from")
    return found[-1]


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore trainable tensors, optimizer, scheduler and RNG; return (step, data position)."""
    tensors = load_file(folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state["position"]
