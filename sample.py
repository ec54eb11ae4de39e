"""Chat with a Phi-3 model, optionally with a LoRA adapter.

    python sample.py                                    # the embedded tiny model + the adapter in ./out if present
    python sample.py --model ~/Phi-3-mini-4k-instruct --prompt "Why is the sky blue?"
    python sample.py --adapter runs/a                   # adapter on its base model (merged for speed)
    echo "Define 'cat'." | python sample.py             # prompt from stdin

Only the assistant's reply goes to stdout, streamed token by token; statistics go to stderr. Without
--prompt on a terminal it is a multi-turn chat (empty line or Ctrl-D to quit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from phi3 import CheckpointError, ConfigError, load_model, load_tokenizer
from phi3.checkpoint import EMBEDDED_MODEL, parse_dtype
from phi3.lora import adapter_base_model, load_adapter, merge_lora
from phi3.generate import generate
from phi3.tokenizer import TokenizerError

DEFAULT_ADAPTER = Path("out")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint folder in Hugging Face layout (default: the adapter's base, else models/tiny-phi3)")
    p.add_argument("--adapter", type=Path, default=None,
                   help="LoRA adapter folder (PEFT layout); default ./out when it holds one, 'none' to disable")
    p.add_argument("--prompt", default=None, help="one user message; without it: interactive chat (or stdin)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    return p.parse_args(argv)


def resolve_adapter(arg: Path | None) -> Path | None:
    if arg is not None:
        return None if str(arg) == "none" else arg
    return DEFAULT_ADAPTER if (DEFAULT_ADAPTER / "adapter_config.json").is_file() else None


def load_for_chat(model_dir: Path | None, adapter: Path | None, device: str, dtype: str | None = None):
    """(model, tokenizer) for generation: the adapter merged into the weights (no training follows), and the
    base taken from --model, else the adapter's base_model_name_or_path, else the embedded tiny model."""
    model_dir = model_dir or (adapter_base_model(adapter) if adapter else None) or EMBEDDED_MODEL
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=parse_dtype(dtype), device=device)
    if adapter is not None:
        load_adapter(model, adapter)
        merge_lora(model)  # fold B A into W once: decoding runs at base speed
    print(f"model {model_dir}" + (f" + adapter {adapter}" if adapter else ""), file=sys.stderr)
    return model, tokenizer


def reply(model, tokenizer, messages, args, generator) -> list[int]:
    """Stream one assistant reply to stdout; return its token ids (without the stop id)."""
    prompt, _ = tokenizer.render(messages, add_generation_prompt=True)
    out_ids: list[int] = []
    printed = ""
    start = time.perf_counter()
    for token in generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          stop_ids=tokenizer.stop_ids, generator=generator):
        if token in tokenizer.stop_ids:
            break
        out_ids.append(token)
        text = tokenizer.decode(out_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    seconds = time.perf_counter() - start
    sys.stdout.write(tokenizer.decode(out_ids)[len(printed):] + "\n")
    sys.stdout.flush()
    print(f"[prompt {len(prompt)} tokens, reply {len(out_ids)} tokens, {len(out_ids) / max(seconds, 1e-9):.1f} tokens/s]",
          file=sys.stderr)
    return out_ids


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    try:
        model, tokenizer = load_for_chat(args.model, resolve_adapter(args.adapter), args.device, args.dtype)
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None or not sys.stdin.isatty():
        text = args.prompt if args.prompt is not None else sys.stdin.read().strip()
        reply(model, tokenizer, messages + [{"role": "user", "content": text}], args, generator)
        return 0
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not text:
            return 0
        messages.append({"role": "user", "content": text})
        ids = reply(model, tokenizer, messages, args, generator)
        messages.append({"role": "assistant", "content": tokenizer.decode(ids)})


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while a reply streams: stop quietly
        print(file=sys.stderr)
        sys.exit(130)
