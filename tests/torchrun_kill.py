"""Kill one of two torchrun workers mid-run, as a crash or the OOM killer would (tests of LoRA and --full)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from phi3.run_state import find_checkpoint, list_checkpoints

REPO = Path(__file__).parent.parent


def kill_a_worker_past_step(train_args: list, out: Path, step: int, env: dict) -> int:
    """Run train.py with `train_args` under torchrun (2 processes, --save-every 2, --out `out`), SIGKILL one worker
    once a checkpoint of at least `step` exists, and check that the run stops within a bounded time (torchrun ends
    the other process) with a failure, leaving a complete two-process checkpoint. Returns that checkpoint's step."""
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(REPO / "train.py"), *map(str, train_args), "--max-steps", "100000", "--save-every",
                              "2", "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    reached = lambda: [p for p in list_checkpoints(out) if int(p.name.split("-")[1]) >= step]  # noqa: E731
    while not reached() and time.time() < deadline and agent.poll() is None:  # (--keep 2: `step` may be gone)
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    _, err = agent.communicate(timeout=120)  # bounded: torchrun notices the death and stops the other process
    assert agent.returncode != 0, err[-2000:]
    last = int(find_checkpoint(out).name.split("-")[1])
    assert last >= step and json.loads((out / f"checkpoint-{last}" / "state.json").read_text())["processes"] == 2
    return last
