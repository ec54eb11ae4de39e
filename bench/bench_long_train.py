"""train.py itself at Phi-3-mini-128k's full length, as a long-context user runs it, with and without --packing.

    python3 bench/bench_long_train.py                        # writes /tmp/phi3-mini-128k-random and long documents
    python3 bench/bench_long_train.py --tiny --device cpu --max-seq-len 512 --steps 1   # smoke run on a CPU

Issue 13, target 3. Writes a random bf16 checkpoint with the Phi-3-mini-128k config (once) and a JSONL of long
plain-text documents (one of 500,000 tokens, others of 131k-200k for the unpacked run; 12k-90k ones that share packed
rows), then runs `train.py --model CKPT --data DOCS --max-seq-len 131072 --batch-size 1 --train-on all` with its
defaults otherwise (LoRA r16 on qkv/o/gate_up/down, checkpointing, offloading and every other long-context mechanism
chosen by itself). Prints train.py's own data summary (what truncation cut), its lines from within a step, and per
step its tokens/s and peak GPU memory from metrics.jsonl. Not a comparison: bench_long.py measures the same step
against transformers + peft.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from systems import ours_config, random_checkpoint  # bench/ itself: the script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIG = REPO / "assets" / "configs" / "phi3-mini-128k-instruct" / "config.json"
TINY = dict(hidden_size=192, intermediate_size=448, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)


def documents(token_counts: list[int], seed: int) -> list[str]:
    """Plain text of about the given token counts: words that are one token each in Phi-3's vocabulary."""
    from phi3 import load_tokenizer
    vocab = load_tokenizer(REPO / "assets" / "tokenizer").tok.get_vocab()
    words = sorted(w[1:] for w in vocab if w.startswith("\u2581") and w[1:].isalpha() and w[1:].isascii()
                   and len(w) > 3)
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=n)) for n in token_counts]


def run(args, ckpt: Path, data: Path, out: Path, packing: bool) -> None:
    cmd = [sys.executable, "train.py", "--model", str(ckpt), "--data", str(data), "--out", str(out),
           "--max-seq-len", str(args.max_seq_len), "--batch-size", "1", "--train-on", "all",
           "--max-steps", str(args.steps), "--log-every", "1", "--save-every", "0", "--eval-fraction", "0",
           "--device", args.device] + (["--packing"] if packing else [])
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    lines = proc.stdout.splitlines()
    for line in lines:  # the data summary, the notes and the lines from within a step; the step lines come below
        if not line.startswith("config:") and any(key in line for key in ("truncated", "note", "micro-batch", "Error", "error", "packed", "examples")):
            print("  " + line[:160])
    if proc.returncode != 0:
        print("\n".join(lines[-20:]))
        sys.exit(f"train.py failed (exit {proc.returncode})")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if "tokens_per_s" in r:
            print(f"  step {r['step']}: loss {r['loss']:.4f}, {r['tokens_per_s']:,.0f} tok/s, peak {r['peak_gib']:.2f} GiB")
    print(f"  {wall:.0f} s from launch to exit (load and kernel choices included)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/phi3-mini-128k-random"))
    p.add_argument("--max-seq-len", type=int, default=131072)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--only", choices=["unpacked", "packed"])
    args = p.parse_args()
    if not any(args.ckpt.glob("*.safetensors")):
        random_checkpoint(args.ckpt, ours_config(CONFIG, TINY if args.tiny else None), args.device)
    n = args.max_seq_len
    work = Path(tempfile.mkdtemp(prefix="long-train-"))
    unpacked = work / "long.jsonl"  # each row: one document cut to n tokens
    unpacked.write_text("".join(json.dumps({"text": t}) + "\n"
                                for t in documents([500_000, n + n // 2, n + n // 8][:args.steps + 1], seed=0)))
    packed = work / "mixed.jsonl"  # documents of 0.1n-0.7n tokens share rows; the 500k one is cut first
    rng = random.Random(1)
    packed.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(
        [500_000] + [int(n * rng.uniform(0.1, 0.7)) for _ in range(3 * args.steps)], seed=1)))
    for name, data in (("unpacked", unpacked), ("packed", packed)):
        if args.only in (None, name):
            run(args, args.ckpt, data, work / f"run-{name}", packing=name == "packed")


if __name__ == "__main__":
    main()
