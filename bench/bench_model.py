"""Load time, peak memory and greedy decode speed: this project vs transformers, same checkpoint, same run.

    python bench/bench_model.py --ckpt /tmp/phi3-mini-random      # writes the random checkpoint first if missing
    python bench/bench_model.py --nf4    # also ours on a 4-bit base (quantized at load): load, memory, decode speed
    python bench/bench_model.py --eager  # also ours decoding without CUDA graphs (phi3/decode_graph.py): what they buy

The checkpoint is Phi-3-mini-4k shaped (assets/configs/phi3-mini-4k-instruct/config.json) with random bf16
weights (speed does not depend on the values). Each system runs in its own process so that peak host
memory (VmHWM: ru_maxrss would carry the parent's peak, the random checkpoint's writing, into each child) and peak
GPU memory are its own. Needs a GPU and transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from side_by_side import run_each  # bench/ itself: the script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from phi3 import Phi3Config, Phi3ForCausalLM, save_model  # noqa: E402
from phi3.progress import peak_host_gib  # noqa: E402


def make_checkpoint(path: Path) -> None:
    config = Phi3Config.from_json(REPO / "assets" / "configs" / "phi3-mini-4k-instruct" / "config.json")
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    model.init_weights(seed=0)
    save_model(model, path, dtype=torch.bfloat16, tokenizer_from=REPO / "assets" / "tokenizer")


def measure(system: str, ckpt: Path, prompt_len: int, new_tokens: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if system.startswith("ours"):
        import phi3.generate
        from phi3 import load_model
        phi3.generate.use_graphs = system != "ours-eager"
        model = load_model(ckpt, dtype=torch.bfloat16, device="cuda", quantize="nf4" if system == "ours-nf4" else None)
    else:
        import transformers
        model = transformers.Phi3ForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map="cuda").eval()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    host_gib = peak_host_gib()
    prompt = torch.randint(0, 32000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    def decode(n):
        if system != "transformers":
            from phi3.generate import generate
            return list(generate(model, prompt, n))
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, prompt_len:].tolist()

    decode(8)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = decode(new_tokens)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"system": system, "load_s": load_s, "host_peak_gib": host_gib,
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30, "decode_tok_s": len(tokens) / seconds,
            "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/phi3-mini-random"))
    p.add_argument("--system", choices=["ours", "transformers", "ours-nf4", "ours-eager"])
    p.add_argument("--nf4", action="store_true", help="also ours with the layers quantized to NF4 at load")
    p.add_argument("--eager", action="store_true", help="also ours decoding eagerly (no CUDA graphs)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    if args.system:
        print(json.dumps(measure(args.system, args.ckpt, args.prompt_len, args.new_tokens)))
        return
    if not (args.ckpt / "model.safetensors.index.json").exists() and not (args.ckpt / "model.safetensors").exists():
        start = time.perf_counter()
        make_checkpoint(args.ckpt)
        print(f"wrote random Phi-3-mini checkpoint to {args.ckpt} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    size = sum(f.stat().st_size for f in args.ckpt.glob("*.safetensors")) / 2**30
    systems = ("ours", "transformers") + (("ours-nf4",) if args.nf4 else ()) + (("ours-eager",) if args.eager else ())
    results = run_each(__file__, systems, ["--ckpt", str(args.ckpt), "--prompt-len",
                       str(args.prompt_len), "--new-tokens", str(args.new_tokens)])
    ours, ref = results["ours"], results["transformers"]
    print(f"\nPhi-3-mini-shaped random checkpoint, bf16, {size:.2f} GiB of safetensors; greedy, batch 1, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens; {torch.cuda.get_device_name()}")
    print(f"{'':22}{'ours':>12}{'transformers':>14}{'ratio':>9}")
    for key, label, better in (("load_s", "load time (s)", "lower"), ("host_peak_gib", "peak host RSS (GiB)", "lower"),
                               ("gpu_peak_gib", "peak GPU (GiB)", "lower"), ("decode_tok_s", "decode tokens/s", "higher")):
        print(f"{label:22}{ours[key]:12.2f}{ref[key]:14.2f}{ours[key] / ref[key]:9.2f}  ({better} is better)")
    if args.nf4:
        q = results["ours-nf4"]
        print(f"ours on a 4-bit base: load {q['load_s']:.2f} s, peak host RSS {q['host_peak_gib']:.2f} GiB, peak GPU "
              f"{q['gpu_peak_gib']:.2f} GiB, decode {q['decode_tok_s']:.2f} tokens/s "
              f"({q['decode_tok_s'] / ours['decode_tok_s']:.2f}x ours bf16)")
    if args.eager:
        e = results["ours-eager"]
        print(f"ours decoding eagerly (no CUDA graphs): {e['decode_tok_s']:.2f} tokens/s; the graphs buy "
              f"{ours['decode_tok_s'] / e['decode_tok_s']:.2f}x")
    same = ours["tokens"] == ref["tokens"]
    print(f"greedy tokens identical to transformers: {same}"
          + ("" if same else f" (first difference at {next(i for i, (a, b) in enumerate(zip(ours['tokens'], ref['tokens'])) if a != b)})"))


if __name__ == "__main__":
    main()
