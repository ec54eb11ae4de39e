"""Resumable training state: checkpoint-STEP/ folders written atomically, read back as untrusted data, lr schedules.

A checkpoint folder holds the adapter in the PEFT layout (or the full model in Hugging Face layout), the exact
trainable tensors (trainable.safetensors), the optimizer's tensors (optimizer.safetensors) and state.json (step,
data position, processes). Tensors are always whole, also when torchrun processes each held a shard (--full), so a
run resumes on any number of processes. Nothing is pickled: a checkpoint may come from someone else, and reading it runs no code.
Everything else a resumed run needs follows from the step: the learning rate is the schedule's value there, and
dropout masks are reseeded per step (train.step_seed), so no RNG state is stored.

Each folder is written under a temporary name and renamed when complete, so killing the process at any moment
leaves every checkpoint-* folder either absent or whole; leftovers of a killed write are removed by
clean_stale_writes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from phi3.atomic import TEMPORARY_RE, atomic_dir, atomic_file, write_safetensors
from phi3.config import open_regular, read_json_object
from phi3.distributed import shard_like

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
STATE_FILE, TRAINABLE_FILE, OPTIMIZER_FILE = "state.json", "trainable.safetensors", "optimizer.safetensors"
FORMAT = 2  # 1 was a pickled state.pt, no longer read


class RunStateError(ValueError):
    """A run folder or checkpoint we cannot use; the message names the path, the problem and what to do."""


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


# ---- writing -------------------------------------------------------------------------------------------------

def trainable_tensors(model) -> dict[str, torch.Tensor]:
    """The trained parameters by name (shards of them when the model is sharded: phi3/distributed.gather_to_cpu)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state under the parameter's name: '<name>:exp_avg', '<name>:exp_avg_sq', '<name>:step',
    in the model's parameter order (the same on every process: sharded moments are gathered in this order)."""
    out = {}
    for name, p in model.named_parameters():
        for key, t in optimizer.state.get(p, {}).items():
            out[f"{name}:{key}"] = t
    return out


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], moments: dict[str, torch.Tensor],
                    position: dict, write_model_files, keep: int, processes: int = 1) -> Path:
    """Write run_dir/checkpoint-STEP atomically; delete the oldest so that `keep` remain. trainable and moments: whole
    CPU tensors (trainable_tensors and optimizer_tensors, gathered); processes: how many torchrun processes shared
    each step (a resumed run on another count keeps the step's size)."""
    final = run_dir / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        write_model_files(tmp)  # adapter (PEFT) or full model (HF layout), for users
        write_safetensors(trainable, tmp / TRAINABLE_FILE)
        write_safetensors(moments, tmp / OPTIMIZER_FILE)
        state = {"format": FORMAT, "step": step, "position": {k: int(v) for k, v in position.items()},
                 "processes": processes}
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")  # last: its presence marks the folder complete
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint-STEP folders directly inside run_dir, oldest first. Links are never followed: a run
    folder from elsewhere must not make --keep delete outside it."""
    found = []
    for p in Path(run_dir).glob("checkpoint-*"):
        m = CHECKPOINT_RE.fullmatch(p.name)
        if m and not p.is_symlink() and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def clean_stale_writes(run_dir: Path) -> list[Path]:
    """Remove what a killed write left in run_dir (.NAME.tmp-* folders and files); an .old-* copy whose final
    folder is missing (killed between the two renames of atomic_dir) is put back. Returns what was removed."""
    removed = []
    for p in Path(run_dir).iterdir():
        m = TEMPORARY_RE.fullmatch(p.name)
        if not m:
            continue
        final = p.with_name(m.group("name"))
        if m.group("kind") == "old" and not final.exists() and not p.is_symlink():
            os.replace(p, final)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_json_atomic(path: Path, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


# ---- reading (untrusted) -------------------------------------------------------------------------------------

def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest complete checkpoint-* inside a run folder."""
    path = Path(path)
    if not path.is_dir():
        raise RunStateError(f"{path}: no such folder; --resume takes a run folder or one of its checkpoint-STEP folders")
    if (path / STATE_FILE).is_file():
        return path
    if os.path.lexists(path / STATE_FILE):  # a FIFO or a link: never opened
        raise RunStateError(f"{path / STATE_FILE}: not a regular file; resume from another checkpoint")
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if (path / "state.pt").is_file() or any(path.glob("checkpoint-*/state.pt")):
        raise RunStateError(f"{path}: written by an older version of train.py (a pickled state.pt, which is never "
                            "read because loading a pickle can run code); start a new run")
    if (path / "train_config.json").is_file() and not CHECKPOINT_RE.fullmatch(path.name):
        raise RunStateError(f"{path}: its run never saved a step (it stopped before its first checkpoint), so there is "
                            f"nothing to resume; start it again with --out {path} and its flags")
    raise RunStateError(f"{path}: no checkpoint-STEP folder with {STATE_FILE} to resume from")


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a resumed run writes to when no --out is given: the folder --resume named, or, where that is a
    checkpoint-STEP folder, the run folder holding it. Never the `out` of the saved train_config.json: that file
    may come from elsewhere, and a copied or moved run must not write into the original."""
    return checkpoint.parent if CHECKPOINT_RE.fullmatch(checkpoint.name) else checkpoint


def read_state(folder: Path) -> tuple[int, dict, int]:
    """(step, data position, torchrun processes) from state.json, every value checked."""
    path = folder / STATE_FILE
    state = read_json_object(path, RunStateError, "resume from another checkpoint")
    position = state.get("position") if isinstance(state, dict) else None
    ok = (isinstance(state, dict) and state.get("format") == FORMAT and _count(state.get("step"))
          and isinstance(position, dict) and set(position) == {"epoch", "batch"} and all(map(_count, position.values()))
          and _count(state.get("processes")) and 1 <= state["processes"] <= 65536)
    if not ok:
        raise RunStateError(f"{path}: not a checkpoint state this version wrote (expected format {FORMAT} with a step, "
                            "an epoch/batch position and a process count, all non-negative integers); resume from "
                            "another checkpoint")
    return state["step"], dict(position), state["processes"]


def _count(v) -> bool:
    return type(v) is int and 0 <= v < 2**62


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        open_regular(path).close()  # a FIFO would block load_file's open, beyond Ctrl-C
        return load_file(path)
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise RunStateError(f"{path}: unreadable or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            "resume from another checkpoint") from None


def _check_same(path: Path, found: dict[str, torch.Tensor], expected: dict[str, torch.Size], what: str) -> None:
    missing, unknown = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unknown:
        problem = (f"lacks {missing[0]}" if missing else f"has the unknown tensor {unknown[0]}")
        raise RunStateError(f"{path}: {problem} ({len(missing)} missing, {len(unknown)} unknown); the checkpoint was "
                            f"written for another {what} (--rank, --targets, --full or --model differ?); resume with "
                            "the flags it was trained with, or start a new run")
    for name, t in found.items():
        if tuple(t.shape) != tuple(expected[name]) or not t.is_floating_point():
            raise RunStateError(f"{path}: {name} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, this run "
                                f"needs a float tensor of shape {list(expected[name])} (--rank or --targets differ?); "
                                "resume with the flags it was trained with")
        if not torch.isfinite(t).all():
            raise RunStateError(f"{path}: {name} holds NaN or infinite values; resume from an earlier checkpoint")


def load_checkpoint(folder: Path, model, optimizer) -> tuple[int, dict]:
    """Restore trainable tensors and AdamW state; return (step, data position). Every file is checked before
    anything is changed: names, shapes and dtypes must be exactly what this run's model has. The files hold whole
    tensors, whatever number of processes wrote them: a sharded model takes its shard of each."""
    step, position, _ = read_state(folder)
    params = trainable_tensors(model)
    tensors = _read_tensors(folder / TRAINABLE_FILE)
    _check_same(folder / TRAINABLE_FILE, tensors, {n: p.shape for n, p in params.items()}, "model")
    moments = _read_tensors(folder / OPTIMIZER_FILE)
    expected = {}
    for n, p in params.items():
        expected.update({f"{n}:exp_avg": p.shape, f"{n}:exp_avg_sq": p.shape, f"{n}:step": torch.Size([])})
    if step == 0 and not moments:
        expected = {}  # saved before the first optimizer step: AdamW has no state yet
    _check_same(folder / OPTIMIZER_FILE, moments, expected, "optimizer")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(shard_like(t, params[name]))
    index = {p: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state = optimizer.state_dict()  # the fresh optimizer's groups (hyperparameters come from this run's flags)
    state["state"] = {index[p]: {"step": moments[f"{n}:step"], "exp_avg": shard_like(moments[f"{n}:exp_avg"], p),
                                 "exp_avg_sq": shard_like(moments[f"{n}:exp_avg_sq"], p)}
                      for n, p in params.items() if f"{n}:step" in moments}
    optimizer.load_state_dict(state)
    return step, position
