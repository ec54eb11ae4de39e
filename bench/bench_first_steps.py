"""Launch to the end of step 10, cold and warm, and train.py's own tokens/s: this project vs transformers + peft.

    python3 bench/bench_first_steps.py --ckpt /tmp/phi3-mini-random   # writes a random Phi-3-mini checkpoint if missing
    python3 bench/bench_first_steps.py --config phi4-mini-instruct   # its shapes and tokenizer, in /tmp/CONFIG-random
    python3 bench/bench_first_steps.py --ckpt /tmp/tiny --tiny --device cpu --steps 3   # smoke run on a CPU

Issue 12, items 6 and 7. Each run is a fresh process, timed from its launch to the end of its 10th optimizer step,
loading the checkpoint included:
- ours: `train.py --model CKPT --data examples/chat.jsonl --packing --max-steps 10 --log-every 1` (its defaults
  otherwise: LoRA r16 on qkv/o/gate_up/down, batch 4 x 2048, checkpointing and offloading on). "Cold": an empty Triton
  cache (a fresh machine or container); "warm": as the cold run left it.
- transformers + peft: from_pretrained, get_peft_model (same LoRA), gradient checkpointing, AdamW, the same examples
  in batches of 4 padded to their longest (no packing in transformers without extra code). Its cold run has an
  empty Triton cache too (torch may compile nothing; then cold = warm).
Also printed: train.py's tokens/s over steps 3-10 (its own live-line number) next to `bench_train.py`'s at the same
shapes, which item 6 wants within 5 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from systems import ours_config, peft_lora, random_checkpoint  # bench/ itself: the script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO / "examples" / "chat.jsonl"
CONFIGS = REPO / "assets" / "configs"
TOKENIZERS = {"phi4-mini-instruct": REPO / "models" / "tokenizers" / "phi-4-mini-instruct",
              "phi4": REPO / "models" / "tokenizers" / "phi-4"}  # (the others: the shipped Phi-3 tokenizer)
TINY = dict(hidden_size=192, intermediate_size=448, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)


def reference(args) -> None:
    """transformers + peft: load, LoRA, 10 steps; prints one JSON line at the end of each step (seconds since launch
    are measured by the parent)."""
    import transformers
    from phi3 import load_tokenizer
    from phi3.data import make_batches, pad_token_for, read_jsonl
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = peft_lora(transformers.Phi3ForCausalLM.from_pretrained(args.ckpt, dtype=dtype, device_map=device))
    tok = load_tokenizer(args.ckpt)
    examples, _ = read_jsonl(DATA, tok, max_seq_len=2048)
    batches = make_batches(examples, 4, 2048, pad_token_for(tok), packing=False, shuffle=True, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=device == "cuda")
    for step, b in enumerate(batches[:args.steps]):
        width = int((b.input_ids != pad_token_for(tok)).sum(1).max())
        ids, labels = b.input_ids[:, :width].to(device), b.labels[:, :width].to(device)
        shifted = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)  # it shifts itself
        model(input_ids=ids, labels=shifted).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        print(json.dumps({"step": step + 1}), flush=True)


def timed(cmd: list[str], env: dict, until: str, show: str = "kernels:") -> float:
    """Seconds from launching cmd to the first output line (stdout or stderr) containing `until`; lines containing
    `show` are printed with their time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = None
    for line in proc.stdout:
        if seen is None and until in line:
            seen = time.perf_counter() - start
        if show in line:
            print(f"    {time.perf_counter() - start:5.1f} s: {line.strip()}", flush=True)
    if proc.wait() != 0 or seen is None:
        sys.exit(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}) before {until!r}")
    return seen


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["reference"])
    p.add_argument("--config", default="phi3-mini-4k-instruct", help="the model's shapes: a folder of assets/configs")
    p.add_argument("--ckpt", type=Path, help="default: /tmp/phi3-mini-random, or /tmp/CONFIG-random")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    if args.system:
        return reference(args)
    if args.ckpt is None:
        name = "phi3-mini" if args.config == "phi3-mini-4k-instruct" else args.config
        args.ckpt = Path(f"/tmp/{name}-random")
    if not any(args.ckpt.glob("*.safetensors")):
        config = ours_config(CONFIGS / args.config / "config.json")
        if args.tiny:  # two of its heads: its RoPE tables' lengths stand
            config = dataclasses.replace(config, **dict(TINY, hidden_size=2 * config.head_dim))
        random_checkpoint(args.ckpt, config, args.device, TOKENIZERS.get(args.config))
    caches = Path(tempfile.mkdtemp(prefix="first-steps-"))
    results = {}
    scenarios = ("cold", "warm")
    for temperature in scenarios:  # warm: the cache as the cold run left it
        env = {**os.environ, "TRITON_CACHE_DIR": str(caches / "triton")}
        out = caches / f"run-{temperature.replace(' ', '-')}"
        ours = [sys.executable, "train.py", "--model", str(args.ckpt), "--data", str(DATA), "--packing",
                "--max-steps", str(args.steps), "--log-every", "1", "--save-every", "0", "--eval-fraction", "0",
                "--device", args.device, "--out", str(out)]
        print(f"  ours, {temperature}:", flush=True)
        results[f"ours {temperature}"] = timed(ours, env, f"step {args.steps}/{args.steps}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[f"ours tokens/s {temperature}"] = sorted(r["tokens_per_s"] for r in rows if r.get("step", 0) >= 3
                                                        and "tokens_per_s" in r)
        ref = [sys.executable, __file__, "--system", "reference", "--ckpt", str(args.ckpt), "--steps", str(args.steps),
               "--device", args.device]
        env_ref = {**env, "TRITON_CACHE_DIR": str(caches / "triton-ref")}
        results[f"reference {temperature}"] = timed(ref, env_ref, f'"step": {args.steps}}}')
    print(f"launch to the end of step {args.steps}, {'tiny' if args.tiny else args.config} checkpoint {args.ckpt}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'} (load included)")
    for temperature in scenarios:
        a, b = results[f"ours {temperature}"], results[f"reference {temperature}"]
        print(f"  {temperature}: ours {a:.1f} s, transformers+peft {b:.1f} s, ratio {a / b:.2f} (target <= 1)")
    speeds = results["ours tokens/s warm"]
    if speeds:
        print(f"train.py's own tokens/s, steps 3-{args.steps} (warm run): median {speeds[len(speeds) // 2]:,.0f} "
              f"(min {speeds[0]:,.0f}, max {speeds[-1]:,.0f}); compare bench_train.py's at batch 4 x 2048 (item 6: "
              "within 5 %)")


if __name__ == "__main__":
    main()
